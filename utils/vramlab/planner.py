"""Which recipe first fits a training job on a given GPU, and on how many: a decision guide
built from vramlab's formulas (source "formula": estimates, not measurements).

The ladder, cheapest first: mixed precision (amp-bf16, AdamW) on one device; + activation
checkpointing; + 8-bit AdamW; then ZeRO-3/FSDP over 2, 4, ... 64 devices, keeping
checkpointing and 8-bit AdamW (each rung adds to the one before, never drops a saving); then
ZeRO-3 combined with 8-way tensor parallelism over 8, 16, ... 512 devices.
Per device under ZeRO-3: see :func:`zero3_bytes_per_device`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .estimate import (
    activation_bytes,
    block_backward_bytes,
    estimate,
    linear_shapes,
    optimizer_state_bytes,
    param_count,
    zero_bytes_per_rank,
)
from .hardware import CONTEXT_HEADROOM, SIZE_CLASSES, fits
from .models import get_arch

DEVICE_SIZES = SIZE_CLASSES  # the guide's columns, from the one table of GPUs (vramlab.hardware)
MAX_DEVICES = 64
TENSOR_PARALLEL = 8  # one node of 8 GPUs: tensor parallelism needs NVLink-class links
MAX_DEVICES_WITH_TP = 512


@dataclass(frozen=True)
class Plan:
    """The first recipe that fits: its name, how many devices, and bytes per device."""

    recipe: str
    devices: int
    bytes_per_device: int

    def __str__(self) -> str:
        if not self.devices:
            return f"> {MAX_DEVICES_WITH_TP} devices"
        return self.recipe if self.devices == 1 else f"{self.recipe} x{self.devices}"


def zero3_bytes_per_device(
    model: str, devices: int, batch: int, seq: int, tensor_parallel: int = 1, optimizer: str = "adamw-8bit"
) -> int:
    """Formula bytes per device of amp-bf16 training with checkpointing under ZeRO-3: the sum
    of :func:`zero3_terms` (see there for what each term holds)."""
    return sum(zero3_terms(model, devices, batch, seq, tensor_parallel, optimizer).values())


def zero3_terms(
    model: str, devices: int, batch: int, seq: int, tensor_parallel: int = 1, optimizer: str = "adamw-8bit"
) -> dict[str, int]:
    """Formula bytes per device of bf16 mixed-precision training with checkpointing under
    ZeRO-3 (FSDP2 with ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``,
    chapter 14's policy: fp32 sharded weights, gradients and state; the forward and backward
    run on gathered bf16 weights, so activations are those of the "bf16" recipe), by term:

    - ``"sharded states"``: fp32 weights and gradients and the optimizer's state, sharded over
      ``devices`` (8-bit AdamW, the default here: ~2 bytes per parameter of state and no step
      temporary, as its blockwise kernel updates one tensor at a time; "adamw": 8 bytes plus
      the foreach step's 4);
    - ``"checkpointed inputs"``: every block's bf16 input, kept for the backward;
    - ``"one block's activations"``: rebuilt in backward, counted twice for their gradients;
    - ``"gathered weights"``: two blocks' bf16 weights (the current one and the prefetched
      next) plus the prefetched block's all-gather output while it is copied out;
    - ``"gradient buffers"``: FSDP2's gradient path for one block, its unsharded bf16 gradients
      and the fp32 reduce-scatter input they are copied into (``reduce_dtype=float32``, as
      chapter 14 teaches), which FSDP2 keeps alive into the next block's backward
      (``_fsdp_collectives.foreach_reduce``).

    The transient terms are counted together, an upper bound at the peak; NCCL's own buffers
    are not counted. With ``tensor_parallel`` = T (Megatron-style, with sequence parallelism),
    every term but the sharded states is split T ways inside a group of T devices; ZeRO-3
    shards the states over all ``devices``."""
    arch = get_arch(model)
    kept = activation_bytes(arch, batch, seq, "bf16", checkpointing=True)  # bf16 weights, as the policy runs
    block = sum(o * i for o, i in linear_shapes(arch).values())  # one block's matmul parameters
    params = param_count(arch)
    state = optimizer_state_bytes(arch, optimizer, "amp-bf16") / params + (4 if optimizer == "adamw" else 0)
    return {
        "sharded states": sum(zero_bytes_per_rank(params, devices, 3, 4, 4, state).values()),
        "checkpointed inputs": kept // tensor_parallel,
        "one block's activations": block_backward_bytes(arch, batch, seq, "bf16") // tensor_parallel,
        "gathered weights": (2 * 2 + 2) * block // tensor_parallel,
        "gradient buffers": (2 + 4) * block // tensor_parallel,
    }


def first_fit(model: str, device_bytes: int, batch: int = 1, seq: int = 2048, headroom: int = CONTEXT_HEADROOM) -> Plan:
    """Walk the ladder and return the first :class:`Plan` whose per-device bytes fit."""
    ladder = [
        ("bf16 mixed precision", estimate(model, batch=batch, seq=seq, recipe="amp-bf16").peak_bytes),
        ("+ checkpointing", estimate(model, batch=batch, seq=seq, recipe="amp-bf16", checkpointing=True).peak_bytes),
        (
            "+ 8-bit AdamW",
            estimate(
                model, batch=batch, seq=seq, recipe="amp-bf16", optimizer="adamw-8bit", checkpointing=True
            ).peak_bytes,
        ),
    ]
    for name, need in ladder:
        if fits(need, device_bytes, headroom):
            return Plan(name, 1, need)
    devices = 2
    while devices <= MAX_DEVICES:
        need = zero3_bytes_per_device(model, devices, batch, seq)
        if fits(need, device_bytes, headroom):
            return Plan("ZeRO-3 + 8-bit AdamW + ckpt", devices, need)
        devices *= 2
    devices = TENSOR_PARALLEL
    while devices <= MAX_DEVICES_WITH_TP:
        need = zero3_bytes_per_device(model, devices, batch, seq, TENSOR_PARALLEL)
        if fits(need, device_bytes, headroom):
            return Plan(f"ZeRO-3 + 8-bit + {TENSOR_PARALLEL}-way TP + ckpt", devices, need)
        devices *= 2
    return Plan("none", 0, 0)
