"""What autograd saves for backward, per token and per layer (Korthikanti et al. 2022, redone for
the layers as transformers implements them and for each precision recipe)."""

from __future__ import annotations

from dataclasses import dataclass

from ..models import ArchConfig, get_arch
from ..recipes import Recipe, check_positive, get_recipe
from ..setups import ATTENTIONS


@dataclass(frozen=True)
class Term:
    """A tensor autograd keeps for backward: ``bytes_per_token`` of it per token (b·s)."""

    name: str
    bytes_per_token: float


def layer_terms(arch: ArchConfig, recipe: str, attention: str = "sdpa", seq: int = 1) -> list[Term]:
    """What one transformer block saves for backward, in bytes per token (b·s).

    ``seq`` matters only for eager attention, whose saved probabilities grow with seq².
    """
    rec = get_recipe(recipe)
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}; use one of {ATTENTIONS}")
    if arch.family == "gpt2":
        return _gpt2_layer(arch, rec, attention, seq)
    return _llama_layer(arch, rec, attention, seq)


def _gpt2_layer(arch: ArchConfig, rec: Recipe, attention: str, seq: int) -> list[Term]:
    c, h, i = rec.compute_bytes, arch.hidden_size, arch.intermediate_size
    r = rec.param_bytes  # LayerNorm runs in fp32 under autocast
    return [
        Term("LayerNorm inputs (the residual stream), 2 per block", 2 * r * h),
        Term("LayerNorm mean and rstd (fp32), 2 per block", 2 * 2 * 4),
        Term("LayerNorm outputs feeding c_attn and c_fc", 2 * c * h),
        Term("q, k, v (views of one c_attn output)", 3 * c * h),
        *_attention_terms(arch, c, attention, seq),
        _gelu_new_term(rec, i),
    ]


def _gelu_new_term(rec: Recipe, i: int) -> Term:
    """What ``c_fc`` and GPT-2's ``gelu_new`` save per token. Under autocast, CUDA's rule runs
    ``pow`` in fp32: the fp32 copy of ``c_fc``'s output, ``tanh``'s output and ``1 + tanh`` are
    fp32, beside ``0.5·x`` and ``c_proj``'s 16-bit copy of the product (CPU autocast keeps all
    five in 16 bits: ``5·c·i``)."""
    c = rec.compute_bytes
    if rec.autocast:
        name = "MLP: c_fc output upcast by pow, tanh, 1+tanh (fp32), 0.5·x and c_proj's input"
        return Term(name, (3 * 4 + 2 * c) * i)
    return Term("MLP: c_fc output and 4 GELU-tanh intermediates", 5 * c * i)


def _llama_layer(arch: ArchConfig, rec: Recipe, attention: str, seq: int) -> list[Term]:
    c, h, i = rec.compute_bytes, arch.hidden_size, arch.intermediate_size
    kvh = arch.num_kv_heads * arch.head_dim
    amp = rec.autocast
    repeated = attention == "eager" and kvh != h  # eager attention repeats k and v per head
    kv_saved = h if repeated else kvh
    norm_out = (
        Term("16-bit copies of the norm outputs: 3 for q/k/v, 2 for gate/up", 5 * c * h)
        if amp
        else Term("norm outputs feeding the projections", 2 * c * h)
    )
    return [
        Term("RMSNorm inputs upcast to fp32, 2 per block", 2 * 4 * h),
        Term("RMSNorm rsqrt (fp32), 2 per block", 2 * 4),
        Term("RMSNorm normalised x, 2 per block", 2 * rec.param_bytes * h),
        norm_out,
        Term("q, k, v after rotary embedding", c * (h + 2 * kv_saved)),
        *_attention_terms(arch, c, attention, seq),
        Term("SwiGLU: gate, silu(gate), up, and their product", 4 * c * i),
    ]


def _attention_terms(arch: ArchConfig, c: int, attention: str, seq: int) -> list[Term]:
    heads, h = arch.num_heads, arch.hidden_size
    if attention == "sdpa":
        return [Term("attention output", c * h), Term("fused attention log-sum-exp (fp32)", 4 * heads)]
    probs = 4 * heads * seq + (c * heads * seq if c != 4 else 0)
    return [
        Term("attention output (contiguous copy)", c * h),
        Term("attention probabilities: fp32 softmax and its 16-bit copy (grows with seq)", probs),
    ]


def head_terms(arch: ArchConfig, recipe: str) -> list[Term]:
    """What the final norm, LM head and loss save, in bytes per token."""
    rec = get_recipe(recipe)
    c, h, v = rec.compute_bytes, arch.hidden_size, arch.vocab_size
    if arch.family == "gpt2":
        r = rec.param_bytes
        norm = [Term("final LayerNorm input and mean/rstd", r * h + 8)]
    else:
        norm = [Term("final RMSNorm: fp32 input, rsqrt, normalised x", 4 * h + 4 + rec.param_bytes * h)]
    return norm + [
        Term("LM head input", c * h),
        Term("log-softmax over the vocabulary (fp32)", 4 * v),
        Term("shifted labels (int64)", 8),
    ]


def rotary_bytes(arch: ArchConfig, recipe: str, seq: int) -> int:
    """cos and sin tables of rotary embeddings (one per sequence position, shared by the batch)."""
    if arch.family == "gpt2":
        return 0
    return 2 * seq * arch.head_dim * get_recipe(recipe).param_bytes


def activation_bytes(
    model: str | ArchConfig,
    batch: int,
    seq: int,
    recipe: str = "fp32",
    attention: str = "sdpa",
    checkpointing: bool = False,
) -> int:
    """Bytes autograd holds at the end of the forward pass (without weight copies)."""
    arch = get_arch(model)
    check_positive(batch=batch, seq=seq)
    tokens = batch * seq
    head = sum(t.bytes_per_token for t in head_terms(arch, recipe)) * tokens
    if checkpointing:
        layers = arch.num_layers * checkpoint_input_bytes(arch, recipe) * tokens
    else:
        layers = arch.num_layers * sum(t.bytes_per_token for t in layer_terms(arch, recipe, attention, seq)) * tokens
    return int(layers + head + rotary_bytes(arch, recipe, seq))


def block_backward_bytes(
    model: str | ArchConfig, batch: int, seq: int, recipe: str, checkpointing: bool = True, attention: str = "sdpa"
) -> int:
    """Transient bytes of backward through one block, beyond what stays saved: gradients of the
    size of the block's saved tensors (other than its input), and under checkpointing the
    recomputed tensors themselves first (twice as much)."""
    arch = get_arch(model)
    full = activation_bytes(arch, batch, seq, recipe, attention)
    kept = activation_bytes(arch, batch, seq, recipe, attention, checkpointing=True)
    return (2 if checkpointing else 1) * (full - kept) // arch.num_layers


def checkpoint_input_bytes(arch: ArchConfig, recipe: str) -> int:
    """Bytes per token a checkpointed block keeps: its input hidden state."""
    rec = get_recipe(recipe)
    return arch.hidden_size * rec.param_bytes


def korthikanti_bytes_per_layer(
    seq: int, batch: int, hidden: int, heads: int, recompute_attention: bool = False
) -> int:
    """Activation bytes per layer of a GPT block at 16 bit, Korthikanti et al. eq. (1):
    s·b·h·(34 + 5·a·s/h); with selective recomputation of attention only 34·s·b·h."""
    check_positive(seq=seq, batch=batch, hidden=hidden, heads=heads)
    quadratic = 0 if recompute_attention else 5 * heads * seq / hidden
    return int(seq * batch * hidden * (34 + quadratic))
