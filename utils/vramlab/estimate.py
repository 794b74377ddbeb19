"""Closed-form memory estimates of decoder-only transformers, every size in bytes.

Sources of the formulas:
- Parameter count: the module shapes of the published architectures (GPT-2: Radford et
  al. 2019; Llama: Touvron et al. 2023, arXiv:2302.13971 and 2307.09288; GQA: Ainslie et
  al. 2023, arXiv:2305.13245).
- Weights, gradients and optimizer state per parameter: Rajbhandari et al., "ZeRO"
  (arXiv:1910.02054), section 3.1 (16 bytes per parameter for mixed-precision Adam), and
  the optimizer implementations of ``torch.optim`` (the foreach Adam/AdamW step keeps one
  parameter-sized temporary, ``exp_avg_sq_sqrt``).
- Activations: Korthikanti et al., "Reducing Activation Recomputation in Large Transformer
  Models" (arXiv:2205.05198), section 4: count the tensors autograd saves for backward,
  per token and per layer. Here the count is redone for the layers as transformers
  implements them (RMSNorm upcast to fp32, SwiGLU, rotary embeddings, GELU-tanh for GPT-2)
  and for each precision recipe, so the terms differ from the paper's 34·s·b·h; eager
  attention adds the a·s² terms, fused attention (SDPA/flash, Dao et al. 2022,
  arXiv:2205.14135) keeps only a log-sum-exp per head and token.
- Inference: weights plus the KV cache 2 · layers · kv_heads · head_dim · seq · batch ·
  bytes (Pope et al., "Efficiently Scaling Transformer Inference", arXiv:2211.05102),
  plus the transient working set of the prefill.

The peak of a training step is the largest of a few moments: the end of the forward pass,
the start of backward (loss gradients over the vocabulary), just after the LM head's
backward, the end of backward, and the optimizer step. :func:`estimate` returns each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .models import ArchConfig, get_arch
from .recipes import Recipe, check_optimizer, check_positive, get_recipe
from .units import format_bytes

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1, "int4": 0.5}
ATTENTIONS = ("sdpa", "eager")
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps 32-bit state for tensors smaller than this
BNB_BLOCK = 256  # bitsandbytes blockwise quantisation: one fp32 absmax per 256 values


# ----------------------------------------------------------------------------- parameters
def param_groups(arch: ArchConfig) -> dict[str, int]:
    """Parameter count of each part of the model (embedding, attention, mlp, norms, head)."""
    h, i, layers = arch.hidden_size, arch.intermediate_size, arch.num_layers
    q_out, kv_out = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    gpt2 = arch.family == "gpt2"
    attention = h * q_out + 2 * h * kv_out + q_out * h
    if arch.qkv_bias:
        attention += q_out + 2 * kv_out
    if gpt2:
        attention += h  # output projection bias
    mlp = (3 * h * i) if arch.gated_mlp else (2 * h * i + i + h)
    norm = 2 * h if gpt2 else h
    groups = {
        "embedding": arch.vocab_size * h + (arch.max_position * h if gpt2 else 0),
        "attention": layers * attention,
        "mlp": layers * mlp,
        "norms": (2 * layers + 1) * norm,
        "head": 0 if arch.tie_embeddings else arch.vocab_size * h,
    }
    return groups


def param_count(model: str | ArchConfig) -> int:
    """Number of parameters of a decoder-only transformer from its configuration."""
    return sum(param_groups(get_arch(model)).values())


def matmul_param_count(arch: ArchConfig) -> int:
    """Parameters that feed matrix products (linear weights and biases, the LM head):
    the ones autocast copies to 16 bit. Embedding lookups and norms are not copied."""
    groups = param_groups(arch)
    head = arch.vocab_size * arch.hidden_size  # tied heads still cast the shared matrix
    return groups["attention"] + groups["mlp"] + head


def param_tensor_shapes(arch: ArchConfig) -> list[tuple[int, ...]]:
    """The shape of every parameter tensor, as transformers builds them (bitsandbytes and
    Adafactor treat tensors by size and shape)."""
    h, i, hd = arch.hidden_size, arch.intermediate_size, arch.head_dim
    q_out, kv_out = arch.num_heads * hd, arch.num_kv_heads * hd
    shapes: list[tuple[int, ...]] = [(arch.vocab_size, h)]
    if arch.family == "gpt2":
        shapes.append((arch.max_position, h))
        layer = [(h,), (h,), (h, 3 * h), (3 * h,), (h, h), (h,), (h,), (h,), (h, i), (i,), (i, h), (h,)]
        final = [(h,), (h,)]
    else:
        layer = [(h,), (q_out, h), (kv_out, h), (kv_out, h), (h, q_out), (h,), (i, h), (i, h), (h, i)]
        if arch.qkv_bias:
            layer += [(q_out,), (kv_out,), (kv_out,)]
        final = [(h,)]
    shapes += layer * arch.num_layers + final
    if not arch.tie_embeddings:
        shapes.append((arch.vocab_size, h))
    return shapes


# ------------------------------------------------------------------ states per parameter
def weight_bytes(params: int, dtype: str = "fp32") -> int:
    """Bytes to hold ``params`` weights in ``dtype`` (fp32, fp16, bf16, fp8, int8, int4)."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_BYTES)}")
    return int(math.ceil(params * DTYPE_BYTES[dtype]))


def optimizer_state_bytes(arch: ArchConfig, optimizer: str, recipe: str = "fp32") -> int:
    """Bytes of optimizer state after the first step (states live in the parameters' dtype)."""
    optimizer = check_optimizer(optimizer)
    p = _param_bytes(get_recipe(recipe))
    shapes = param_tensor_shapes(arch)
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        if optimizer in ("adam", "adamw"):
            total += 2 * n * p
        elif optimizer == "sgd-momentum":
            total += n * p
        elif optimizer == "adafactor":
            total += (math.prod(shape[:-1]) + shape[-1]) * p if len(shape) >= 2 else n * p
        elif optimizer == "adamw-8bit":
            total += _bnb_state_bytes(n)
    if optimizer == "adamw-8bit" and any(math.prod(sh) >= BNB_MIN_8BIT_SIZE for sh in shapes):
        total += 2 * 256 * 4  # the two fp32 quantisation maps, shared by every 8-bit tensor
    return total


def _bnb_state_bytes(n: int) -> int:
    if n < BNB_MIN_8BIT_SIZE:
        return 2 * n * 4  # 32-bit state for small tensors
    return 2 * (n + 4 * math.ceil(n / BNB_BLOCK))  # two uint8 states and an fp32 absmax per block


def optimizer_temp_bytes(arch: ArchConfig, optimizer: str, recipe: str = "fp32") -> int:
    """Bytes of temporaries alive at the peak of ``optimizer.step()`` (foreach versions)."""
    optimizer = check_optimizer(optimizer)
    p = _param_bytes(get_recipe(recipe))
    params = param_count(arch)
    if optimizer in ("adam", "adamw"):
        return params * p  # exp_avg_sq_sqrt for every parameter at once
    if optimizer == "adafactor":
        return sum(math.prod(s) for s in param_tensor_shapes(arch) if len(s) >= 2) * p  # var_estimates
    return 0


def _param_bytes(recipe: Recipe) -> int:
    return 4 if recipe.param_dtype.itemsize == 4 else 2


def _compute_bytes(recipe: Recipe) -> int:
    return recipe.activation_dtype.itemsize


# ------------------------------------------------------------------------- activations
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
    c, h, i = _compute_bytes(rec), arch.hidden_size, arch.intermediate_size
    r = 2 if rec.name == "bf16" else 4  # LayerNorm runs in fp32 under autocast
    return [
        Term("LayerNorm inputs (the residual stream), 2 per block", 2 * r * h),
        Term("LayerNorm mean and rstd (fp32), 2 per block", 2 * 2 * 4),
        Term("LayerNorm outputs feeding c_attn and c_fc", 2 * c * h),
        Term("q, k, v (views of one c_attn output)", 3 * c * h),
        *_attention_terms(arch, c, attention, seq),
        Term("MLP: c_fc output and 4 GELU-tanh intermediates", 5 * c * i),
    ]


def _llama_layer(arch: ArchConfig, rec: Recipe, attention: str, seq: int) -> list[Term]:
    c, h, i = _compute_bytes(rec), arch.hidden_size, arch.intermediate_size
    kvh = arch.num_kv_heads * arch.head_dim
    amp = rec.compute_dtype is not None
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
        Term("RMSNorm normalised x, 2 per block", 2 * (2 if rec.name == "bf16" else 4) * h),
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
    c, h, v = _compute_bytes(rec), arch.hidden_size, arch.vocab_size
    if arch.family == "gpt2":
        r = 2 if rec.name == "bf16" else 4
        norm = [Term("final LayerNorm input and mean/rstd", r * h + 8)]
    else:
        norm = [Term("final RMSNorm: fp32 input, rsqrt, normalised x", 4 * h + 4 + (2 if rec.name == "bf16" else 4) * h)]
    return norm + [
        Term("LM head input", c * h),
        Term("log-softmax over the vocabulary (fp32)", 4 * v),
        Term("shifted labels (int64)", 8),
    ]


def rotary_bytes(arch: ArchConfig, recipe: str, seq: int) -> int:
    """cos and sin tables of rotary embeddings (one per sequence position, shared by the batch)."""
    if arch.family == "gpt2":
        return 0
    return 2 * seq * arch.head_dim * (2 if get_recipe(recipe).name == "bf16" else 4)


def activation_bytes(
    model: str | ArchConfig, batch: int, seq: int, recipe: str = "fp32",
    attention: str = "sdpa", checkpointing: bool = False,
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


def checkpoint_input_bytes(arch: ArchConfig, recipe: str) -> int:
    """Bytes per token a checkpointed block keeps: its input hidden state."""
    rec = get_recipe(recipe)
    return arch.hidden_size * (2 if rec.name == "bf16" else 4)


def korthikanti_bytes_per_layer(seq: int, batch: int, hidden: int, heads: int, recompute_attention: bool = False) -> int:
    """Activation bytes per layer of a GPT block at 16 bit, Korthikanti et al. eq. (1):
    s·b·h·(34 + 5·a·s/h); with selective recomputation of attention only 34·s·b·h."""
    check_positive(seq=seq, batch=batch, hidden=hidden, heads=heads)
    quadratic = 0 if recompute_attention else 5 * heads * seq / hidden
    return int(seq * batch * hidden * (34 + quadratic))


# ------------------------------------------------------------------ low-bit weights, QLoRA
NF4_BLOCK = 64  # bitsandbytes' default block for 4-bit weights
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def nf4_tensor_bytes(numel: int, block: int = NF4_BLOCK, double_quant: bool = True) -> int:
    """Bytes of one weight tensor in bitsandbytes NF4: two codes per byte, the 16-value code
    table (fp32) and one absmax per ``block`` values: fp32, or with double quantization one
    uint8 per block plus, per 256 blocks, an fp32 absmax (with a 256-entry fp32 code table
    and an fp32 offset per tensor)."""
    check_positive(numel=numel, block=block)
    blocks = math.ceil(numel / block)
    constants = blocks + 4 + 4 * math.ceil(blocks / 256) + 256 * 4 if double_quant else 4 * blocks
    return math.ceil(numel / 2) + 16 * 4 + constants


def linear_shapes(arch: ArchConfig) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each linear layer of one decoder block, by short name."""
    h, i = arch.hidden_size, arch.intermediate_size
    q_out, kv_out = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    shapes = {"q": (q_out, h), "k": (kv_out, h), "v": (kv_out, h), "o": (h, q_out)}
    if arch.gated_mlp:
        shapes.update(gate=(i, h), up=(i, h), down=(h, i))
    else:
        shapes.update(up=(i, h), down=(h, i))
    return shapes


def lora_param_count(model: str | ArchConfig, rank: int, targets: tuple[str, ...] = LORA_TARGETS) -> int:
    """Parameters of LoRA adapters: ``rank · (in + out)`` for each targeted linear of each
    block (A is rank x in, B is out x rank). ``targets`` name linears of
    :func:`linear_shapes` (q, k, v, o, gate, up, down); absent ones (no gate in GPT-2) skip."""
    arch = get_arch(model)
    check_positive(rank=rank)
    shapes = linear_shapes(arch)
    unknown = set(targets) - set(LORA_TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; use names from {LORA_TARGETS}")
    return arch.num_layers * sum(rank * (o + i) for name, (o, i) in shapes.items() if name in targets)


def qlora_estimate(model: str | ArchConfig, rank: int = 16, batch: int = 1, seq: int = 1024,
                   checkpointing: bool = True, double_quant: bool = True) -> Estimate:
    """QLoRA-style fine-tuning (Dettmers et al., 2023): frozen NF4 block linears, the
    embedding, norms and head frozen in bf16; LoRA adapters on every block linear trained in
    fp32 with AdamW (weights, gradients and two states: 16 bytes per adapter parameter).
    Activations are the bf16 training activations of :func:`activation_bytes` (the adapters'
    own rank-``r`` activations are smaller than the rounding and are left out).

    The total is what stays resident across a step after the first: weights, adapter
    gradients and optimizer states, and the activations saved by the forward. The backward's
    transient working set (one recomputed block under checkpointing) comes on top of it."""
    arch = get_arch(model)
    check_positive(rank=rank, batch=batch, seq=seq)
    layer_linears = list(linear_shapes(arch).values())
    nf4 = arch.num_layers * sum(nf4_tensor_bytes(o * i, double_quant=double_quant) for o, i in layer_linears)
    quantized = arch.num_layers * sum(o * i for o, i in layer_linears)
    frozen_bf16 = 2 * (param_count(arch) - quantized)
    adapters = lora_param_count(arch, rank)
    parts = _moment(parameters=nf4 + frozen_bf16 + 4 * adapters, gradients=4 * adapters,
                    optimizer=8 * adapters,
                    activations=activation_bytes(arch, batch, seq, "bf16", checkpointing=checkpointing))
    setup = dict(batch=batch, seq=seq, rank=rank, checkpointing=checkpointing, double_quant=double_quant,
                 recipe="qlora-nf4", optimizer="adamw")
    moment = "steady state (weights, adapter state, saved activations)"
    return Estimate(arch.name, param_count(arch), setup, parts, sum(parts.values()), moment,
                    {moment: sum(parts.values())})


# ------------------------------------------------------------------ sharding (ZeRO)
ZERO_STAGES = (0, 1, 2, 3)


def zero_bytes_per_rank(params: int, world_size: int, stage: int, weight_bytes: float = 4,
                        grad_bytes: float = 4, optimizer_bytes: float = 8) -> dict[str, int]:
    """Per-rank bytes of weights, gradients and optimizer state under ZeRO (Rajbhandari et al.,
    2020): stage 0 replicates everything (DDP), stage 1 shards the optimizer state, stage 2
    also the gradients, stage 3 also the weights, each over ``world_size`` ranks. Defaults
    are fp32 AdamW (4 + 4 + 8 bytes per parameter); the paper's mixed precision is 2, 2, 12.
    Activations are not sharded by ZeRO and are not included."""
    check_positive(params=params, world_size=world_size)
    if stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage must be one of {ZERO_STAGES}, got {stage!r}")
    def share(per_param: float, sharded: bool) -> int:
        return int(math.ceil(params / world_size) * per_param) if sharded else int(params * per_param)
    return {"parameters": share(weight_bytes, stage >= 3), "gradients": share(grad_bytes, stage >= 2),
            "optimizer": share(optimizer_bytes, stage >= 1)}


# ------------------------------------------------------------------------------ peaks
@dataclass
class Estimate:
    """A formula estimate of one training step or prefill. All sizes in bytes.

    ``bytes`` splits the peak into parameters, gradients, optimizer, activations and other
    (16-bit weight copies, loss and optimizer temporaries, the KV cache in inference);
    ``moments`` is the total at each candidate moment of the step; the peak is the largest.
    """

    model: str
    params: int
    setup: dict[str, Any]
    bytes: dict[str, int]
    peak_bytes: int
    peak_moment: str
    moments: dict[str, int] = field(default_factory=dict)
    kv_cache_bytes: int = 0
    source: str = "formula"

    def to_json(self) -> dict[str, Any]:
        """The object the CLI prints with --json."""
        return {
            "model": self.model, "params": self.params, "source": self.source,
            "setup": self.setup, "bytes": dict(self.bytes), "peak_bytes": self.peak_bytes,
            "peak_moment": self.peak_moment, "kv_cache_bytes": self.kv_cache_bytes,
        }

    def __str__(self) -> str:
        lines = [f"{self.model}: {self.params:,} parameters, {self.source} estimate, peak at {self.peak_moment}"]
        for role, value in self.bytes.items():
            lines.append(f"  {role:<12}{format_bytes(value):>12}")
        if self.kv_cache_bytes:
            lines.append(f"  {'(KV cache)':<12}{format_bytes(self.kv_cache_bytes):>12}  (included in other)")
        lines.append(f"  {'peak':<12}{format_bytes(self.peak_bytes):>12}")
        return "\n".join(lines)


def _moment(parameters: int = 0, gradients: int = 0, optimizer: int = 0, activations: int = 0, other: int = 0) -> dict[str, int]:
    return {"parameters": int(parameters), "gradients": int(gradients), "optimizer": int(optimizer),
            "activations": int(activations), "other": int(other)}


def estimate(
    model: str | ArchConfig,
    batch: int = 1,
    seq: int = 1024,
    recipe: str = "fp32",
    optimizer: str = "adamw",
    checkpointing: bool = False,
    inference: bool = False,
    attention: str = "sdpa",
) -> Estimate:
    """Estimate the peak memory of one training step (forward, backward, optimizer step) or,
    with ``inference=True``, of a prefill of ``seq`` tokens that builds the KV cache."""
    arch = get_arch(model)
    check_positive(batch=batch, seq=seq)
    rec = get_recipe(recipe)
    optimizer = check_optimizer(optimizer)
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}; use one of {ATTENTIONS}")
    if inference and attention == "eager":
        raise ValueError("the inference estimate models fused (SDPA) attention only; for eager attention "
                         "measure the prefill with `vramlab dryrun --inference --attention eager`")
    setup = dict(batch=batch, seq=seq, recipe=rec.name, optimizer=optimizer,
                 checkpointing=checkpointing, inference=inference, attention=attention)
    moments = (_inference_moments if inference else _training_moments)(arch, batch, seq, rec, optimizer, checkpointing, attention)
    name = max(moments, key=lambda k: sum(moments[k].values()))
    kv = kv_cache_bytes(arch, batch, seq, rec.name) if inference else 0
    return Estimate(arch.name, param_count(arch), setup, moments[name], sum(moments[name].values()), name,
                    {k: sum(v.values()) for k, v in moments.items()}, kv)


def _training_moments(arch: ArchConfig, batch: int, seq: int, rec: Recipe, optimizer: str, checkpointing: bool, attention: str) -> dict[str, dict[str, int]]:
    tokens, v, h = batch * seq, arch.vocab_size, arch.hidden_size
    p, c, amp = _param_bytes(rec), _compute_bytes(rec), rec.compute_dtype is not None
    params = param_count(arch)
    weights = grads = params * p
    copies = 2 * matmul_param_count(arch) if amp else 0
    head_params = v * h
    head_copy = 2 * head_params if amp else 0
    acts = activation_bytes(arch, batch, seq, rec.name, attention, checkpointing)
    logits = (4 * v if c == 4 else (c + 4) * v) * tokens  # logits, and their fp32 upcast
    if amp:  # the final norm's fp32 output, held by the model's forward (autograd saved its copy)
        logits += 4 * h * tokens
    layer = sum(t.bytes_per_token for t in layer_terms(arch, rec.name, attention, seq)) * tokens
    saved_copies = head_copy if checkpointing else copies  # autocast's cache dies with autocast
    head_bwd = max(
        4 * v * tokens + (c * v * tokens if amp else 0),            # loss gradient and its cast
        c * v * tokens + c * h * tokens + c * head_params,           # LM head matmul backward
        (c + 4) * head_params + c * h * tokens if amp else 0,        # 16-bit weight gradient cast up
    )
    moments = {
        "end of forward": _moment(weights, activations=acts, other=copies + logits),
        "start of backward": _moment(weights, activations=acts, other=saved_copies + 8 * v * tokens),
        "LM head backward": _moment(weights, activations=acts - 4 * v * tokens, other=saved_copies + head_bwd),
        "end of backward": _moment(weights, grads, other=_embedding_backward(arch, rec, tokens)),
        "optimizer step": _moment(weights, grads, optimizer_state_bytes(arch, optimizer, rec.name),
                                  other=optimizer_temp_bytes(arch, optimizer, rec.name)),
    }
    moments.update(_block_backward_moments(arch, batch, seq, rec, checkpointing, attention, acts, layer, weights, grads))
    return moments


def _block_backward_moments(arch: ArchConfig, batch: int, seq: int, rec: Recipe, checkpointing: bool,
                            attention: str, acts: int, layer: float, weights: int, grads: int) -> dict[str, dict[str, int]]:
    """Backward through one block: what the block saved (recomputed first under checkpointing)
    plus the largest working set of its backward, at the last block (processed first, with
    most activations still saved) and at the first block (processed last, with nearly all
    gradients present)."""
    tokens, v, h, i = batch * seq, arch.vocab_size, arch.hidden_size, arch.intermediate_size
    p, c, amp = _param_bytes(rec), _compute_bytes(rec), rec.compute_dtype is not None
    groups = param_groups(arch)
    block_params = (groups["attention"] + groups["mlp"]) // arch.num_layers
    head_grad = p * v * h if not arch.tie_embeddings else 0
    embedding_grad = p * groups["embedding"] if not arch.tie_embeddings else 0
    residual_grad = (2 if rec.name == "bf16" else 4) * h
    working = residual_grad + max(
        2 * c * i,                                                    # MLP: gradients of two of its activations
        6 * 4 * h if (arch.family != "gpt2" and rec.name == "bf16") else 0,  # RMSNorm backward upcast to fp32
        2 * 4 * arch.num_heads * seq if attention == "eager" else 0,  # softmax backward: two seq x seq gradients
    )
    weight_copies = 2 * block_params if amp else 0  # this block's 16-bit weight copies (recomputed under checkpointing)
    weight_grad_cast = 2 * h * i if amp else 0      # a 16-bit weight gradient before its fp32 cast
    head_saved = sum(t.bytes_per_token for t in head_terms(arch, rec.name)) * tokens
    recomputed = layer if checkpointing else 0
    last = _moment(weights, head_grad, activations=acts - head_saved + recomputed,
                   other=weight_copies * (1 if checkpointing else arch.num_layers) + weight_grad_cast + working * tokens)
    saved_first = (checkpoint_input_bytes(arch, rec.name) * tokens if checkpointing else 0) + layer
    first = _moment(weights, grads - embedding_grad - p * block_params, activations=saved_first,
                    other=weight_copies + weight_grad_cast + working * tokens)
    return {"backward through the last block": last, "backward through the first block": first}


def _embedding_backward(arch: ArchConfig, rec: Recipe, tokens: int) -> int:
    """Transient bytes of the embedding's backward, the last op of backward: the gradient of
    its output; a tied matrix also has its lookup gradient summed out of place into the
    LM head's gradient (new gradient and sum alive together)."""
    p = _param_bytes(rec)
    output_grad = (2 if rec.name == "bf16" else 4) * arch.hidden_size * tokens
    table = p * arch.vocab_size * arch.hidden_size
    return max(2 * table, table + output_grad) if arch.tie_embeddings else output_grad


def kv_cache_bytes(model: str | ArchConfig, batch: int, seq: int, recipe: str = "bf16") -> int:
    """Bytes the KV cache of ``seq`` tokens per sequence holds after a transformers prefill.

    The textbook count is 2 · layers · kv_heads · head_dim · seq · batch · bytes
    (:func:`kv_cache_bytes_classic`). transformers stores keys and values in the keys'
    dtype; under autocast a Llama-family model's keys come out of the rotary multiply in
    fp32, so its cache is fp32 even though the projections ran in 16 bit.
    """
    arch = get_arch(model)
    check_positive(batch=batch, seq=seq)
    rec = get_recipe(recipe)
    key_bytes = 4 if (rec.compute_dtype is not None and arch.family != "gpt2") else _compute_bytes(rec)
    return kv_cache_bytes_classic(arch.num_layers, arch.num_kv_heads, arch.head_dim, seq, batch, key_bytes)


def kv_cache_bytes_classic(layers: int, kv_heads: int, head_dim: int, seq: int, batch: int, bytes_per_value: float) -> int:
    """The textbook KV-cache size: 2 · layers · kv_heads · head_dim · seq · batch · bytes."""
    check_positive(layers=layers, kv_heads=kv_heads, head_dim=head_dim, seq=seq, batch=batch)
    return int(2 * layers * kv_heads * head_dim * seq * batch * bytes_per_value)


def _inference_moments(arch: ArchConfig, batch: int, seq: int, rec: Recipe, optimizer: str, checkpointing: bool, attention: str) -> dict[str, dict[str, int]]:
    """The prefill's peak is in the last block's MLP, when the KV cache is complete.

    Alive there besides weights and cache (bytes per token): the embedding output, the
    block's input, the residual after attention and the norm output (GPT-2 also keeps the
    position embedding and two more hidden states), plus the MLP's temporaries; under
    autocast, one 16-bit copy of an MLP weight at a time.
    """
    tokens, h, i = batch * seq, arch.hidden_size, arch.intermediate_size
    p, c, amp = _param_bytes(rec), _compute_bytes(rec), rec.compute_dtype is not None
    weights = param_count(arch) * p
    kv = kv_cache_bytes(arch, batch, seq, rec.name) + rotary_bytes(arch, rec.name, seq)
    r = 2 if rec.name == "bf16" else 4  # residual stream dtype
    per_position = 0
    if arch.family == "gpt2":
        # token embedding, block input, residual, LayerNorm output, the (16-bit under autocast)
        # dropout copy of the embeddings; the position embedding is one per position
        base, mlp, per_position = (4 * r + c) * h, 4 * c * i, r * h * seq
    else:
        base = 4 * r * h - (r * h if arch.num_layers == 1 else 0)  # embedding, block input, residual, norm output
        mlp = 3 * c * i  # silu(gate), up, product
    moments = {"last block's MLP": _moment(weights, activations=(base + mlp) * tokens + per_position, other=kv)}
    if amp:
        copy = 2 * h * i  # the 16-bit copy of one MLP weight, made for one matmul
        into_mlp = (base + c * h + (2 if arch.gated_mlp else 1) * c * i) * tokens + per_position
        moments["MLP projection under autocast"] = _moment(weights, activations=into_mlp, other=kv + copy)
    return moments
