"""CUDA autocast's float32 rule on a CPU (vramlab.autocast_rules): what a GPU saves for GPT-2's GELU."""

import pytest
import torch
import torch.nn.functional as F

from vramlab import get_arch
from vramlab.autocast_rules import cuda_fp32_ops
from vramlab.dryrun import dryrun, saved_activations
from vramlab.estimate.activations import layer_terms


def test_the_rule_runs_cudas_fp32_ops_in_fp32_only_under_autocast():
    x = torch.ones(4, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.pow(x, 3.0).dtype == torch.bfloat16  # CPU autocast's own lists leave pow alone
        with cuda_fp32_ops():
            assert {torch.pow(x, 3.0).dtype, (x**3).dtype, x.rsqrt().dtype, torch.exp(x).dtype} == {torch.float32}
            assert (x * 2).dtype == torch.bfloat16  # not on CUDA's list
            y = torch.pow(x, 3.0)
    with cuda_fp32_ops():
        assert torch.pow(x, 3.0).dtype == torch.bfloat16  # autocast off: no cast
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.equal(x.grad.float(), torch.full((4,), 3.0))


def test_the_dtype_rule_gives_softmax_and_sum_an_fp32_output_unless_the_call_names_one():
    x = torch.ones(2, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), cuda_fp32_ops():
        assert {torch.softmax(x, -1).dtype, F.log_softmax(x, -1).dtype, x.sum(-1).dtype, x.cumsum(0).dtype} == {
            torch.float32
        }
        assert F.softmax(x, -1, dtype=torch.bfloat16).dtype == torch.bfloat16  # the caller's dtype wins
        assert torch.softmax(x, -1, torch.bfloat16).dtype == torch.bfloat16  # ... also by position
        assert x.log_softmax(-1, torch.bfloat16).dtype == torch.bfloat16
        assert torch.arange(4).sum().dtype == torch.int64  # not a floating tensor: untouched
        assert torch.ones(2, dtype=torch.float16).exp().dtype == torch.float32  # fp16 too, not only bf16


def test_gpt2_block_saves_84h_per_token_under_cudas_rule_and_60h_under_cpus():
    """The review's count: CUDA autocast runs gelu_new's pow in fp32, 84h + 6as + 16 per token."""
    gpt2 = get_arch("gpt2")
    h, a, s = gpt2.hidden_size, gpt2.num_heads, 128

    def per_block(rules: str) -> int:
        two = saved_activations(gpt2.with_(num_layers=2), 1, s, "amp-bf16", "eager", autocast_rules=rules)
        return two - saved_activations(gpt2.with_(num_layers=1), 1, s, "amp-bf16", "eager", autocast_rules=rules)

    assert per_block("cpu") == (60 * h + 6 * a * s + 16) * s
    assert per_block("cuda") == (84 * h + 6 * a * s + 16) * s
    gelu = [t for t in layer_terms(gpt2, "amp-bf16") if t.name.startswith("MLP")]
    assert [t.bytes_per_token for t in gelu] == [16 * gpt2.intermediate_size]  # the estimator's count: 64h
    with pytest.raises(ValueError, match="use one of"):
        saved_activations(gpt2, 1, 8, "amp-bf16", autocast_rules="gpu")


def test_a_checkpointed_amp_step_recomputes_under_the_same_rule():
    """Backward's recompute must save what the forward saved (non-reentrant checkpointing checks
    the dtypes): the dry run keeps the rule on through backward."""
    arch = get_arch("gpt2").with_(num_layers=2)
    r = dryrun(arch, batch=1, seq=64, recipe="amp-bf16", checkpointing=True)
    assert r.peak_bytes > 0
