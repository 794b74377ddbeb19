"""Optimizer offload (issue 12): AdamW's state and step in host memory, as torchao's
CPUOffloadOptimizer keeps them, by formula, dry run and a real CPU run."""

import copy
import json
import math

import pytest
import torch

from tiny_archs import TINY_GPT2, TINY_LLAMA
from vramlab import Setup, estimate, get_arch
from vramlab.cli import main
from vramlab.dryrun import dryrun, realrun
from vramlab.estimate import offload_bytes, optimizer_state_bytes, param_count
from vramlab.estimate.params import param_tensor_shapes
from vramlab.offload import OffloadedAdamW
from vramlab.tracker import on_host


@pytest.mark.parametrize("arch", [TINY_LLAMA, TINY_GPT2], ids=lambda a: a.name)
@pytest.mark.parametrize("recipe", ["fp32", "amp-bf16", "bf16"])
def test_offloaded_dry_run_equals_a_real_cpu_run_and_keeps_no_state_on_the_device(arch, recipe):
    fake = dryrun(arch, batch=2, seq=64, recipe=recipe, offload=True)
    real = realrun(arch, batch=2, seq=64, recipe=recipe, offload=True)
    assert fake.peak_bytes == pytest.approx(real.peak_bytes, rel=0.01)
    expected = offload_bytes(arch, recipe)
    assert fake.host_bytes == real.host_bytes == expected["host"]
    # the device keeps only the small tensors' AdamW state (and their fp32 step counters)
    small = sum(1 for s in param_tensor_shapes(arch) if math.prod(s) < 4096)
    assert fake.end_breakdown["optimizer"] == expected["device_state"] + 4 * small
    assert 0 < expected["device_state"] < optimizer_state_bytes(arch, "adamw", recipe) / 4


def test_offload_lowers_the_steady_state_by_the_state_and_the_foreach_temporary():
    arch = get_arch("llama-2-7b").with_(num_layers=2)
    plain = dryrun(arch, batch=1, seq=256, recipe="amp-bf16")
    off = dryrun(arch, batch=1, seq=256, recipe="amp-bf16", offload=True)
    params = param_count(arch)
    assert plain.end_breakdown["optimizer"] - off.end_breakdown["optimizer"] == pytest.approx(8 * params, rel=1e-6)
    assert off.peak_bytes < plain.first_step_peak_bytes - 4 * params  # no 8 B state, no 4 B temporary
    assert off.host_bytes == offload_bytes(arch, "amp-bf16")["host"] == pytest.approx(16 * params, rel=1e-6)


@pytest.mark.parametrize("name", ["gpt2", "llama-3-8b", "qwen2.5-0.5b"])
@pytest.mark.parametrize(
    "setup",
    [dict(recipe="fp32"), dict(recipe="amp-bf16", batch=4), dict(recipe="bf16", checkpointing=True, batch=4)],
    ids=str,
)
def test_offload_formula_within_3_percent_of_the_dry_run(name, setup):
    arch = get_arch(name).with_(num_layers=2)
    fake = dryrun(arch, seq=512, offload=True, **setup)
    est = estimate(arch, seq=512, offload=True, **setup)
    assert est.peak_bytes == pytest.approx(fake.peak_bytes, rel=0.03)
    assert est.host_bytes == fake.host_bytes
    # later steps add only the small tensors' state, kept on the device
    assert 0 <= est.peak_bytes - est.first_step_peak_bytes <= offload_bytes(arch, setup["recipe"])["device_state"]


def test_offloaded_adamw_trains_exactly_like_fused_adamw():
    """Not a stub: three steps with the offloaded optimizer give the weights AdamW gives."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4))
    twin = copy.deepcopy(model)
    off, ref = OffloadedAdamW(model.parameters(), lr=1e-2), torch.optim.AdamW(twin.parameters(), lr=1e-2, fused=True)
    assert off.device_optimizer is not None  # the biases (under 4096 elements) stay on the device
    for _ in range(3):
        x = torch.randn(8, 64)
        for net, opt in ((model, off), (twin, ref)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    moved = [p for p in model.parameters() if p.numel() >= 4096]
    assert moved and off.host_bytes() == sum(4 * p.nbytes + 4 for p in moved)
    with pytest.raises(ValueError, match="set_to_none"):
        off.zero_grad(set_to_none=False)


def test_host_work_is_invisible_to_the_tracker():
    from vramlab import measure

    with measure() as m:
        with on_host():
            host = torch.zeros(1000)
            host.add_(1)
        device = torch.zeros(10)
    assert m.peak_bytes == 40 and host.sum() == 1000 and device.numel() == 10


@pytest.mark.parametrize(
    "bad, words",
    [
        (dict(inference=True), "inference"),
        (dict(optimizer="sgd"), "use optimizer 'adamw'"),
        (dict(recipe="amp-fp16"), "amp-fp16 is not modelled"),
        (dict(offload="yes"), "True or False"),
    ],
)
def test_offload_refuses_what_it_does_not_model(bad, words):
    with pytest.raises(ValueError, match=words):
        Setup(offload=True, **bad) if "offload" not in bad else Setup(**bad)


def test_offload_from_the_command_line(capsys):
    assert main(["estimate", "llama-2-7b", "--recipe", "amp-bf16", "--offload", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    params = out["params"]
    assert out["setup"]["offload"] and out["breakdown"]["optimizer"] == 0
    assert out["host_bytes"] == offload_bytes(get_arch("llama-2-7b"), "amp-bf16")["host"]
    assert out["peak_bytes"] == pytest.approx(8 * params, rel=0.01)  # fp32 weights and gradients
    assert main(["estimate", "llama-2-7b", "--recipe", "amp-bf16", "--offload"]) == 0
    assert "host memory: 100.41 GiB" in capsys.readouterr().out
    assert main(["estimate", "llama-2-7b", "--offload", "--gpus", "2", "--zero", "1"]) == 2
    assert "single-GPU" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torchao_cpu_offload_on_a_gpu_matches_the_dry_run():
    """On a GPU: torchao's own CPUOffloadOptimizer, measured by the CUDA allocator over a
    second step, against the dry run of the same set-up."""
    pytest.importorskip("torchao")
    from torchao.optim import CPUOffloadOptimizer

    from vramlab.dryrun import build_hf_model

    arch = get_arch("qwen2.5-0.5b").with_(num_layers=4)
    setup = dict(batch=2, seq=256, recipe="bf16", offload=True)
    net = build_hf_model(arch, torch.bfloat16).cuda()
    opt = CPUOffloadOptimizer(net.parameters(), torch.optim.AdamW, lr=1e-4)
    ids = torch.randint(0, arch.vocab_size, (2, 256), device="cuda")
    for step in range(2):
        opt.zero_grad()
        if step == 1:
            torch.cuda.reset_peak_memory_stats()
        net(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
    peak = torch.cuda.max_memory_allocated() - ids.nbytes
    assert peak == pytest.approx(dryrun(arch, **setup).peak_bytes, rel=0.05)
