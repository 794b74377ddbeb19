"""Formulas against published numbers, real modules, and the dry run."""

import pytest
from torch._subclasses.fake_tensor import FakeTensorMode

from tiny_archs import TINY_GPT2, TINY_LLAMA
from vramlab import REGISTRY, estimate, get_arch, kv_cache_bytes, param_count
from vramlab.dryrun import build_hf_model, dryrun, realrun
from vramlab.estimate import (
    activation_bytes,
    korthikanti_bytes_per_layer,
    kv_cache_bytes_classic,
    optimizer_state_bytes,
    weight_bytes,
)

PUBLISHED = {  # parameter counts reported for the released checkpoints
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_count_matches_published(name):
    assert param_count(name) == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_param_count_matches_the_real_module(name):
    with FakeTensorMode():
        model = build_hf_model(get_arch(name))
        numel = sum(p.numel() for p in model.parameters())
    assert param_count(name) == numel


def test_weight_bytes_per_dtype():
    assert weight_bytes(7_000_000_000, "fp32") == 28_000_000_000
    assert weight_bytes(7_000_000_000, "bf16") == 14_000_000_000
    assert weight_bytes(7_000_000_000, "int4") == 3_500_000_000
    with pytest.raises(ValueError, match="unknown dtype"):
        weight_bytes(10, "fp12")


def test_adam_16_bytes_per_parameter_rule():
    arch = get_arch("llama-2-7b")
    P = param_count(arch)
    est = estimate(arch, batch=1, seq=16, recipe="fp32", optimizer="adamw")
    # fp32 weights + fp32 grads + two fp32 moments = 16 B/param; foreach AdamW adds a 4 B/param temporary
    assert est.peak_moment == "optimizer step"
    assert est.breakdown["parameters"] + est.breakdown["gradients"] + est.breakdown["optimizer"] == 16 * P
    assert est.breakdown["other"] == 4 * P
    assert optimizer_state_bytes(arch, "sgd") == 0
    assert optimizer_state_bytes(arch, "sgd-momentum") == 4 * P
    assert optimizer_state_bytes(arch, "adamw", "bf16") == 4 * P
    assert optimizer_state_bytes(arch, "adamw-8bit") < 2.1 * P


def test_kv_cache_classic_formula():
    # Llama-2-7B at 4k context in bf16: 2 * 32 * 32 * 128 * 4096 * 2 B = 2 GiB
    assert kv_cache_bytes_classic(32, 32, 128, 4096, 1, 2) == 2 * 2**30
    assert kv_cache_bytes("llama-2-7b", 1, 4096, "bf16") == 2 * 2**30
    # GQA: Llama-3-8B has 8 KV heads, a quarter of Llama-2-7B's 32
    assert kv_cache_bytes("llama-3-8b", 1, 4096, "bf16") == 2**30 // 2


def test_activations_grow_linearly_in_batch_and_quadratically_with_eager_attention():
    a1 = activation_bytes("gpt2", 1, 512)
    a2 = activation_bytes("gpt2", 2, 512)
    assert a2 == pytest.approx(2 * a1, rel=1e-6)
    e1 = activation_bytes("gpt2", 1, 512, attention="eager") - a1
    e2 = activation_bytes("gpt2", 1, 1024, attention="eager") - activation_bytes("gpt2", 1, 1024)
    assert e2 > 3.5 * e1  # the s^2 term dominates the extra memory of eager attention


def test_checkpointing_reduces_activations():
    full = activation_bytes("llama-2-7b", 1, 2048, "amp-bf16")
    ckpt = activation_bytes("llama-2-7b", 1, 2048, "amp-bf16", checkpointing=True)
    assert ckpt < full / 5


def test_korthikanti_formula():
    assert korthikanti_bytes_per_layer(2048, 1, 4096, 32) == int(2048 * 4096 * (34 + 5 * 32 * 2048 / 4096))
    assert korthikanti_bytes_per_layer(2048, 1, 4096, 32, recompute_attention=True) == 2048 * 4096 * 34


@pytest.mark.parametrize("bad", [dict(batch=0), dict(batch=-1), dict(seq=0), dict(batch=1.5)])
def test_bad_sizes(bad):
    with pytest.raises(ValueError, match="positive integer"):
        estimate("gpt2", **bad)


def test_unknown_names():
    with pytest.raises(KeyError, match="known models"):
        estimate("gpt5")
    with pytest.raises(ValueError, match="unknown recipe"):
        estimate("gpt2", recipe="fp8")
    with pytest.raises(ValueError, match="unknown optimizer"):
        estimate("gpt2", optimizer="lion")


@pytest.mark.parametrize("arch", [TINY_LLAMA, TINY_GPT2], ids=lambda a: a.name)
@pytest.mark.parametrize(
    "setup",
    [
        dict(recipe="fp32"),
        dict(recipe="amp-bf16"),
        dict(recipe="bf16", optimizer="sgd"),
        dict(recipe="fp32", checkpointing=True),
        dict(recipe="fp32", inference=True),
        dict(recipe="bf16", inference=True),
    ],
    ids=str,
)
def test_dry_run_equals_a_real_cpu_run(arch, setup):
    fake = dryrun(arch, batch=2, seq=64, **setup)
    real = realrun(arch, batch=2, seq=64, **setup)
    assert fake.measurement.source == "dry-run" and real.measurement.source == "cpu-tracked"
    assert fake.peak_bytes == pytest.approx(real.peak_bytes, rel=0.01)


@pytest.mark.parametrize("arch", [TINY_LLAMA, TINY_GPT2], ids=lambda a: a.name)
@pytest.mark.parametrize("optimizer", ["adafactor", "sgd-momentum", "adamw-8bit"])
def test_formula_matches_a_real_run_for_optimizers_without_a_dry_run(arch, optimizer):
    if optimizer == "adamw-8bit":
        pytest.importorskip("bitsandbytes")
    real = realrun(arch, batch=1, seq=16, optimizer=optimizer)
    est = estimate(arch, batch=1, seq=16, optimizer=optimizer)
    assert est.peak_bytes == pytest.approx(real.peak_bytes, rel=0.05)


def test_dry_run_refuses_optimizers_it_cannot_run():
    with pytest.raises(ValueError, match="no dry-run path"):
        dryrun("gpt2", optimizer="adafactor")


def test_7b_dry_run_agrees_with_the_formula():
    d = dryrun("llama-2-7b", batch=1, seq=4096, recipe="amp-bf16")
    e = estimate("llama-2-7b", batch=1, seq=4096, recipe="amp-bf16")
    assert d.params == 6_738_415_616
    assert e.peak_bytes == pytest.approx(d.peak_bytes, rel=0.05)
    assert d.breakdown["optimizer"] == pytest.approx(8 * d.params, rel=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "llama-3-8b", "qwen2.5-0.5b"])
@pytest.mark.parametrize(
    "setup",
    [
        dict(recipe="fp32"),
        dict(recipe="amp-bf16", attention="eager"),
        dict(recipe="bf16"),
        dict(recipe="amp-fp16", checkpointing=True),
    ],
    ids=str,
)
def test_activation_formula_equals_saved_tensors_of_the_dry_run(name, setup):
    from vramlab.dryrun import saved_activations

    arch = get_arch(name).with_(num_layers=2)
    assert activation_bytes(arch, 2, 256, **setup) == pytest.approx(saved_activations(arch, 2, 256, **setup), rel=1e-3)


def test_8bit_adamw_state_bytes_equal_bitsandbytes():
    pytest.importorskip("bitsandbytes")
    real = realrun(TINY_LLAMA, batch=1, seq=16, optimizer="adamw-8bit")
    assert real.measurement.end_breakdown["optimizer"] == optimizer_state_bytes(TINY_LLAMA, "adamw-8bit")


def test_eager_inference_is_refused_rather_than_estimated_wrong():
    with pytest.raises(ValueError, match="fused"):
        estimate("gpt2", seq=1024, inference=True, attention="eager")


def test_fused_adamw_is_adamw_without_the_foreach_temporary():
    """AdamW(fused=True): the same state, no parameter-sized temporary at the step (issue 12)."""
    arch = get_arch("llama-2-7b").with_(num_layers=4)
    foreach = dryrun(arch, batch=1, seq=16, recipe="fp32", optimizer="adamw")
    fused = dryrun(arch, batch=1, seq=16, recipe="fp32", optimizer="adamw-fused")
    assert foreach.end_breakdown["optimizer"] == fused.end_breakdown["optimizer"]
    assert foreach.first_step_peak_bytes - fused.first_step_peak_bytes == 4 * foreach.params
    est = estimate(arch, batch=1, seq=16, recipe="fp32", optimizer="adamw-fused")
    assert est.first_step_peak_bytes == 16 * foreach.params
    # from the second step the end of backward is the peak: weights, gradients and state (16 B/param)
    # beside the gradient of the embedding's output (4 bytes x hidden x tokens)
    assert est.peak_moment == "end of backward" and est.peak_bytes == 16 * foreach.params + 4 * 4096 * 16
    assert abs(fused.peak_bytes - est.peak_bytes) < 1024  # the dry run finds the same moment


def test_steady_state_holds_the_optimizer_state_through_forward_and_backward():
    """From the second step on, AdamW's 8 bytes per parameter are alive while activations
    peak: the classic "OOM on the second iteration" (issue 12). Here the first step peaks at
    its optimizer step and every later one at the start of backward, higher."""
    arch = get_arch("llama-2-7b").with_(name="llama-2-7b/2 layers", num_layers=2)
    setup = dict(batch=2, seq=4096, recipe="amp-bf16", optimizer="adamw")
    dry, est = dryrun(arch, **setup), estimate(arch, **setup)
    state = optimizer_state_bytes(arch, "adamw", "amp-bf16")  # 8 B/param (the dry run adds 4-byte step counts)
    assert dry.first_step is not None and 0 <= dry.measurement.breakdown["optimizer"] - state < 1024
    assert est.first_step_moment == "optimizer step" and est.peak_moment == "start of backward"
    assert est.breakdown["optimizer"] == state and est.peak_bytes > 1.2 * est.first_step_peak_bytes
    for got, want in ((est.peak_bytes, dry.peak_bytes), (est.first_step_peak_bytes, dry.first_step_peak_bytes)):
        assert abs(got - want) < 0.03 * want
    assert "steady-state peak" in str(est) and "first step" in str(est) and "first step" in str(dry)
    sgd = estimate(arch, **{**setup, "optimizer": "sgd"})
    assert sgd.peak_bytes == sgd.first_step_peak_bytes  # no state, nothing to carry over


def test_which_user_code_a_number_models_keep_outputs_and_full_logits():
    """The default models `loss = model(...).loss` and generate's last-position prefill; a loop
    that keeps `outputs` holds one more logits tensor, and a plain forward computes every
    position's logits. Dry runs measure both; the formula refuses them (issue 12)."""
    arch = get_arch("llama-2-7b").with_(name="llama-2-7b/2 layers", num_layers=2)
    train = dict(batch=2, seq=512, recipe="amp-bf16")
    plain, kept = dryrun(arch, **train), dryrun(arch, **train, keep_outputs=True)
    assert kept.peak_bytes - plain.peak_bytes == 2 * 512 * 32000 * 2  # one bf16 logits tensor (autocast)
    assert "outputs kept between steps" in str(kept)
    big_vocab = get_arch("llama-3-8b").with_(name="llama-3-8b/2 layers", num_layers=2)  # 128,256 tokens
    infer = dict(batch=2, seq=512, recipe="bf16", inference=True)
    last, full = dryrun(big_vocab, **infer), dryrun(big_vocab, **infer, full_logits=True)
    assert 0 < full.peak_bytes - last.peak_bytes <= 2 * 512 * 128256 * 2  # at most every position's bf16 logits
    for bad in (dict(keep_outputs=True), dict(inference=True, full_logits=True)):
        with pytest.raises(ValueError, match="dry run only"):
            estimate(arch, **bad)
    with pytest.raises(ValueError, match="training loop"):
        dryrun(arch, inference=True, keep_outputs=True)
    with pytest.raises(ValueError, match="inference forward"):
        dryrun(arch, full_logits=True)


def test_lora_dry_run_trains_only_fp32_adapters_and_equals_a_real_run():
    """LoRA (issue 12): the base frozen, rank-r fp32 adapters on the seven linears of each
    block; gradients and AdamW state exist for the adapters only. A dry run only: the formula
    refuses it."""
    from vramlab.estimate import lora_param_count

    adapters = lora_param_count(TINY_LLAMA, 4)
    fake, real = (run(TINY_LLAMA, batch=2, seq=64, recipe="bf16", lora_rank=4) for run in (dryrun, realrun))
    assert fake.peak_bytes == pytest.approx(real.peak_bytes, rel=0.01)
    end = fake.end_breakdown
    assert end["gradients"] == 4 * adapters  # fp32 adapter gradients, none for the frozen base
    assert 0 <= end["optimizer"] - 8 * adapters < 1024  # two fp32 moments (and step counts)
    assert end["parameters"] == 2 * fake.params + 4 * adapters  # bf16 base + fp32 adapters
    full = dryrun(TINY_LLAMA, batch=2, seq=64, recipe="bf16")
    assert fake.peak_bytes < full.peak_bytes
    with pytest.raises(ValueError, match="dry run only"):
        estimate(TINY_LLAMA, lora_rank=4)
    with pytest.raises(ValueError, match="Llama-style blocks"):
        dryrun("gpt2", seq=64, lora_rank=4)
    with pytest.raises(ValueError, match="lora_rank must be 0"):
        dryrun(TINY_LLAMA, lora_rank=-1)


def test_block_backward_bytes_is_one_blocks_saved_tensors_and_their_gradients():
    """What the planner's ZeRO-3 term and QLoRA's backward moment add: a block's saved tensors
    other than its input, once for their gradients, and once more when checkpointing recomputes them."""
    from vramlab.estimate import block_backward_bytes, checkpoint_input_bytes, layer_terms

    arch = get_arch("llama-2-7b")
    per_token = sum(t.bytes_per_token for t in layer_terms(arch, "bf16")) - checkpoint_input_bytes(arch, "bf16")
    tokens = 2 * 256
    assert block_backward_bytes(arch, 2, 256, "bf16") == pytest.approx(2 * per_token * tokens, abs=arch.num_layers)
    assert block_backward_bytes(arch, 2, 256, "bf16", checkpointing=False) == pytest.approx(per_token * tokens, abs=32)
