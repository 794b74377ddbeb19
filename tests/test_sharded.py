"""The sharded dry run (vramlab.sharded): one fake rank of FSDP2 / TP equals a real gloo rank of
the same step, its breakdown adds up, storage resizes are counted, bad flags get one line, and
the decision guide's sharded plans are dry-run fits."""

import json

import pytest
import torch

from tiny_archs import SMALL_LLAMA
from vramlab.cli import main
from vramlab.distributed import launch
from vramlab.planner import DEVICE_SIZES, dry_run_rung, first_fit, peak_table, rung_key
from vramlab.setups import Setup
from vramlab.sharded import PARTS, real_rank, sharded_dryrun
from vramlab.tracker import StorageTracker

ARCH = SMALL_LLAMA


@pytest.mark.parametrize(
    ("sharding", "checkpointing"),
    [
        (dict(gpus=2), False),
        (dict(gpus=2, reshard_after_forward=False), False),
        (dict(gpus=2, mixed_precision="bf16"), True),
        (dict(gpus=4, tp=2, mixed_precision="bf16"), False),
    ],
)
def test_a_fake_rank_equals_a_real_gloo_rank_within_1_percent(sharding, checkpointing):
    """Issue 26's validation: the same step on real gloo ranks, measured by the same tracker.

    A real rank sometimes lets go of a buffer later than its schedule says: one CI run saw
    rank 1 peak 163,584 bytes (1.4 %) above the 11,467,520 it reaches in every other run of
    the same launch. Lateness only ever adds to a peak, so a rank's peak is the least
    it reached over launches: a second launch is made only when the first disagrees with the
    dry run, and each rank keeps its smaller peak."""
    setup = Setup(batch=2, seq=48, checkpointing=checkpointing)
    fake = sharded_dryrun(ARCH, setup, **sharding)
    real = _least_peaks(
        fake.peak_bytes, lambda: launch(real_rank, sharding["gpus"], args=(ARCH, setup, sharding), timeout_s=300)
    )
    assert abs(fake.peak_bytes - real[0]["peak_bytes"]) <= 0.01 * real[0]["peak_bytes"]
    assert abs(fake.first_step_peak_bytes - real[0]["first_step_peak_bytes"]) <= 0.01 * real[0]["peak_bytes"]
    assert fake.peak_bytes == max(r["peak_bytes"] for r in real)  # rank 0 is the worst rank
    assert fake.parts == real[0]["parts"] and fake.peak_moment == real[0]["peak_moment"]


def _least_peaks(expected: int, run, launches: int = 2) -> list[dict]:
    """Each rank's result from the launch where its peak was least; a further launch only while
    the worst rank's peak differs from ``expected`` (bytes)."""
    best = run()
    for _ in range(launches - 1):
        if max(r["peak_bytes"] for r in best) == expected:
            break
        best = [min(a, b, key=lambda r: r["peak_bytes"]) for a, b in zip(best, run(), strict=True)]
    return best


def test_the_breakdown_adds_up_and_names_fsdp2s_buffers():
    run = sharded_dryrun(ARCH, Setup(batch=2, seq=48, checkpointing=True), gpus=4, mixed_precision="bf16")
    assert sum(run.parts.values()) == sum(run.breakdown.values()) == run.peak_bytes
    assert set(run.parts) == set(PARTS) and run.source == "dry-run"
    whole = sum(p.numel() for p in torch.nn.Module.parameters(_built(ARCH)))
    assert run.params == whole
    assert run.parts["gradient buffers"] > 0 and run.parts["gathered parameters"] > 0
    out = run.to_json()
    assert out["sharding"]["gpus"] == 4 and out["peak_bytes"] == run.peak_bytes and out["parts"] == run.parts


def _built(arch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from vramlab.dryrun import build_hf_model

    with FakeTensorMode():
        return build_hf_model(arch)


def test_more_ranks_hold_smaller_shards_and_keeping_gathered_blocks_costs_memory():
    setup = Setup(batch=1, seq=32)
    two, four = (sharded_dryrun(ARCH, setup, gpus=n) for n in (2, 4))
    assert four.peak_bytes < two.peak_bytes
    kept = sharded_dryrun(ARCH, setup, gpus=4, reshard_after_forward=False)
    assert kept.peak_bytes > four.peak_bytes


def test_the_tracker_counts_storage_resizes_and_labels():
    """FSDP2 frees and regathers through UntypedStorage.resize_, which no dispatch mode sees."""
    t = torch.empty(1000)
    with StorageTracker("cpu") as tracker:
        tracker.register(t)
        assert tracker.current_bytes == 4000
        t.untyped_storage().resize_(0)
        assert tracker.current_bytes == 0
        with tracker.labelled("parameters", "gathered parameters"):
            t.untyped_storage().resize_(8000)
        assert tracker.current_bytes == tracker.peak_bytes == 8000
        fresh = torch.empty(0)
        with tracker.labelled("gradients", "gradient buffers"):
            fresh.untyped_storage().resize_(400)
        assert [(r.role, r.part) for r in tracker.live_records()][-1] == ("gradients", "gradient buffers")
    assert torch.UntypedStorage.resize_.__name__ == "resize_"  # restored after the last tracker


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["dryrun", "llama-2-7b", "--gpus", "6", "--fsdp", "--tp", "4"], "not a multiple of --tp 4"),
        (["dryrun", "llama-2-7b", "--gpus", "24", "--fsdp", "--tp", "3"], "does not divide"),
        (["dryrun", "llama-2-7b", "--gpus", "8", "--fsdp", "--tp", "8", "--cpu-offload"], "--cpu-offload with --tp"),
        (["dryrun", "llama-2-7b", "--gpus", "8", "--fsdp", "--cpu-offload"], "not modelled"),
        (["dryrun", "gpt2", "--gpus", "4", "--fsdp", "--tp", "2"], "fuses its attention projection"),
        (["dryrun", "llama-2-7b", "--gpus", "8", "--tp", "2"], "add --fsdp"),
        (["dryrun", "llama-2-7b", "--fsdp"], "needs --gpus"),
        (["dryrun", "llama-2-7b", "--gpus", "0", "--fsdp"], "1 or more"),
        (["estimate", "llama-2-7b", "--tp", "2"], "does not take --tp"),
        (["dryrun", "llama-2-7b", "--gpus", "8", "--fsdp", "--recipe", "amp-fp16"], "sharded GradScaler"),
        (["dryrun", "llama-2-7b", "--gpus", "8", "--fsdp", "--optimizer", "adamw-8bit"], "no sharded dry-run"),
        (["dryrun", "llama-2-7b", "--gpus", "8", "--fsdp", "--inference"], "full training step"),
        (["estimate", "llama-2-7b", "--gpus", "8", "--zero", "2", "--dry-run-peak"], "--zero 3"),
    ],
)
def test_bad_sharding_flags_get_one_line(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vramlab: error:") and words in err and len(err.strip().splitlines()) == 1


def test_the_cli_prints_one_ranks_peak_and_estimate_shows_it_beside_the_formula(capsys):
    assert main(["dryrun", "gpt2", "--gpus", "4", "--fsdp", "--seq", "64", "--mixed-precision", "bf16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["source"] == "dry-run" and out["sharding"]["mixed_precision"] == "bf16"
    assert sum(out["parts"].values()) == out["peak_bytes"] == sum(out["breakdown"].values())
    argv = ["estimate", "gpt2", "--seq", "64", "--recipe", "amp-bf16", "--gpus", "4", "--zero", "3", "--dry-run-peak"]
    assert main([*argv, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["per_gpu"]["dry_run"]
    assert shown["peak_bytes"] == out["peak_bytes"]  # amp-bf16 is FSDP2's bf16 policy there
    assert main(argv) == 0
    assert "by dry run" in capsys.readouterr().out


def test_every_sharded_plan_of_the_guide_is_a_dry_run_fit():
    """The guide's plans come from the shipped table of dry runs, with the stated headroom."""
    from vramlab.hardware import CONTEXT_HEADROOM

    for model in ("llama-2-7b", "llama-2-13b", "llama-2-70b"):
        for size in DEVICE_SIZES.values():
            plan = first_fit(model, size)
            assert plan.devices, (model, size)
            assert plan.bytes_per_device + CONTEXT_HEADROOM <= size
            assert plan.source == "dry-run"
            if plan.devices > 1:
                tp = 8 if "TP" in plan.recipe else 1
                entry = peak_table()[rung_key(model, plan.devices, tp, 1, 2048, True)]
                assert entry["peak_bytes"] == plan.bytes_per_device


def test_the_table_holds_what_the_dry_run_measures_now():
    """A sample of the shipped table, run again: the 7B rungs on one and two devices, and the
    70B plan for 24 GB cards (the plan issue 26 corrected)."""
    plan = first_fit("llama-2-70b", DEVICE_SIZES["24 GB"])
    samples = [("llama-2-7b", 1, 1, True), ("llama-2-7b", 2, 1, True)]
    samples.append(("llama-2-70b", plan.devices, 8 if "TP" in plan.recipe else 1, True))
    for model, devices, tp, checkpointing in samples:
        key = rung_key(model, devices, tp, 1, 2048, checkpointing)
        from vramlab import planner

        fresh = planner._run_rung(model, devices, 1, 2048, tp, checkpointing)
        assert fresh["peak_bytes"] == peak_table()[key]["peak_bytes"], key
    assert (
        dry_run_rung("llama-2-7b", 2)["peak_bytes"]
        == peak_table()[rung_key("llama-2-7b", 2, 1, 1, 2048, True)]["peak_bytes"]
    )


def test_the_resize_watch_keeps_another_tools_patch_and_asks_the_budget_first():
    """Review finding: a tracker entered inside another resize_ patcher (PyTorch's MemTracker)
    must call that patch and leave it installed; a budget hook sees a growth before it happens;
    a real meta tensor's storage is not device memory."""
    plain, seen = torch.UntypedStorage.resize_, []

    def other(storage, size):
        seen.append(size)
        return plain(storage, size)

    torch.UntypedStorage.resize_ = other
    try:
        t = torch.empty(10)
        with StorageTracker("cpu") as tracker:
            tracker.register(t)
            t.untyped_storage().resize_(80)
            assert tracker.current_bytes == 80

            def refuse(in_use, request):
                raise MemoryError(f"{request} more bytes")

            tracker.add_alloc_hook(refuse)
            with pytest.raises(MemoryError, match="80 more bytes"):
                t.untyped_storage().resize_(160)
            assert t.untyped_storage().nbytes() == 80 and tracker.current_bytes == 80  # refused before it grew
            meta = torch.empty(0, device="meta")
            meta.untyped_storage().resize_(4000)
            assert tracker.current_bytes == 80
        assert seen == [80, 4000] and torch.UntypedStorage.resize_ is other  # the other patch ran (not for 160)
    finally:
        torch.UntypedStorage.resize_ = plain


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_real_rank_on_a_cuda_gpu_holds_what_the_dry_run_counts():
    """make gpu-check: rank 0 of the fake group with real tensors on the GPU. The tracked peak is
    the dry run's quantity (1 % bar, as for the gloo ranks); the allocator's peak adds what no
    tracker sees (cuBLAS's workspace, 512-byte rounding), bounded here at 5 % + 64 MiB."""
    from vramlab.sharded import cuda_rank_check

    arch = SMALL_LLAMA.with_(hidden_size=1024, intermediate_size=2816, num_heads=8, num_kv_heads=4, vocab_size=32001)
    got = cuda_rank_check(arch, Setup(batch=2, seq=512, checkpointing=True), gpus=4, mixed_precision="bf16")
    print(got)
    assert abs(got["tracked_peak_bytes"] - got["dry_run_peak_bytes"]) <= 0.01 * got["dry_run_peak_bytes"]
    assert got["tracked_peak_bytes"] <= got["allocated_peak_bytes"] <= 1.05 * got["tracked_peak_bytes"] + 2**26


def test_the_gpu_check_refuses_a_cpu_and_autocast(monkeypatch):
    from vramlab import device
    from vramlab.sharded import cuda_rank_check

    monkeypatch.setattr(device, "has_cuda", lambda: False)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        cuda_rank_check(ARCH, Setup(), gpus=2)
    monkeypatch.setattr(device, "has_cuda", lambda: True)
    with pytest.raises(ValueError, match="no autocast"):
        cuda_rank_check(ARCH, Setup(recipe="amp-bf16"), gpus=2)
