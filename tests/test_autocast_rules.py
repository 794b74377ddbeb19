"""CUDA autocast's float32 rule on a CPU (vramlab.autocast_rules): what a GPU saves for GPT-2's GELU."""

import torch

from vramlab import get_arch
from vramlab.autocast_rules import cuda_fp32_ops
from vramlab.dryrun import saved_activations


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


def test_gpt2_block_saves_84h_per_token_under_cudas_rule_and_60h_under_cpus():
    """The review's count: CUDA autocast runs gelu_new's pow in fp32, 84h + 6as + 16 per token."""
    gpt2 = get_arch("gpt2")
    h, a, s = gpt2.hidden_size, gpt2.num_heads, 128

    def per_block() -> int:
        two = saved_activations(gpt2.with_(num_layers=2), 1, s, "amp-bf16", "eager")
        return two - saved_activations(gpt2.with_(num_layers=1), 1, s, "amp-bf16", "eager")

    assert per_block() == (60 * h + 6 * a * s + 16) * s
    with cuda_fp32_ops():
        assert per_block() == (84 * h + 6 * a * s + 16) * s
