"""Low-bit weights and adapters: bitsandbytes NF4 tensor bytes, LoRA parameter counts and a
QLoRA fine-tuning estimate (Dettmers et al., 2023)."""

from __future__ import annotations

import math

from ..models import ArchConfig, check_positions, get_arch
from ..recipes import check_positive
from ..results import MAX_BYTES, too_large
from ..setups import Setup
from .activations import activation_bytes, block_backward_bytes
from .params import linear_shapes, param_count
from .peaks import Estimate, _moment

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


def qlora_estimate(
    model: str | ArchConfig,
    rank: int = 16,
    batch: int = 1,
    seq: int = 1024,
    checkpointing: bool = True,
    double_quant: bool = True,
) -> Estimate:
    """QLoRA-style fine-tuning (Dettmers et al., 2023): frozen NF4 block linears, the
    embedding, norms and head frozen in bf16; LoRA adapters on every block linear trained in
    fp32 with AdamW (weights, gradients and two states: 16 bytes per adapter parameter).
    Activations are the bf16 training activations of :func:`activation_bytes` (the adapters'
    own rank-``r`` activations are smaller than the rounding and are left out).

    Two moments of a step after the first: what stays resident (weights, adapter gradients
    and optimizer states, the activations saved by the forward) and backward through one
    block, which adds :func:`block_backward_bytes` (the recomputed block under checkpointing,
    and the gradients of its tensors) and one dequantized bf16 copy of the block's largest
    weight. The peak is the larger (backward, for any sizes)."""
    arch = get_arch(model)
    check_positive(rank=rank, batch=batch, seq=seq)
    check_positions(arch, seq)
    layer_linears = list(linear_shapes(arch).values())
    narrowest = min(min(o, i) for o, i in layer_linears)
    if rank > narrowest:
        raise ValueError(
            f"rank {rank} is more than the narrowest adapted linear of {arch.name} ({narrowest}): "
            "such an adapter is not low-rank; use a rank of at most that (typically 8 to 64)"
        )
    nf4 = arch.num_layers * sum(nf4_tensor_bytes(o * i, double_quant=double_quant) for o, i in layer_linears)
    quantized = arch.num_layers * sum(o * i for o, i in layer_linears)
    frozen_bf16 = 2 * (param_count(arch) - quantized)
    adapters = lora_param_count(arch, rank)
    resident = dict(
        parameters=nf4 + frozen_bf16 + 4 * adapters,
        gradients=4 * adapters,
        optimizer=8 * adapters,
        activations=activation_bytes(arch, batch, seq, "bf16", checkpointing=checkpointing),
    )
    block = block_backward_bytes(arch, batch, seq, "bf16", checkpointing)
    dequantized = 2 * max(o * i for o, i in layer_linears)
    moments = {
        "resident (weights, adapter state, saved activations)": _moment(**resident),
        "backward through one block": _moment(
            **{**resident, "activations": resident["activations"] + block}, other=dequantized
        ),
    }
    moment = max(moments, key=lambda k: sum(moments[k].values()))
    parts = moments[moment]
    if sum(parts.values()) >= MAX_BYTES:
        raise too_large(f"QLoRA rank {rank} on {arch.name} at batch {batch}, seq {seq}")
    return Estimate(
        model=arch.name,
        params=param_count(arch),
        breakdown=parts,
        peak_bytes=sum(parts.values()),
        setup=Setup(batch=batch, seq=seq, recipe="bf16", optimizer="adamw", checkpointing=checkpointing),
        peak_moment=moment,
        moments={k: sum(v.values()) for k, v in moments.items()},
        details=dict(method="qlora-nf4", rank=rank, double_quant=double_quant),
        arch=arch,
    )
