"""Bytes of weights, optimizer states and optimizer-step temporaries, per parameter tensor."""

from __future__ import annotations

import math

from ..models import ArchConfig
from ..recipes import check_optimizer, get_recipe
from ..setups import MINIMAL_SIZE
from .params import param_count, param_tensor_shapes

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1, "int4": 0.5}
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps 32-bit state for tensors smaller than this
BNB_BLOCK = 256  # bitsandbytes blockwise quantisation: one fp32 absmax per 256 values


def weight_bytes(params: int, dtype: str = "fp32") -> int:
    """Bytes to hold ``params`` weights in ``dtype`` (fp32, fp16, bf16, fp8, int8, int4)."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_BYTES)}")
    return int(math.ceil(params * DTYPE_BYTES[dtype]))


def optimizer_state_bytes(arch: ArchConfig, optimizer: str, recipe: str = "fp32") -> int:
    """Bytes of optimizer state after the first step (states live in the parameters' dtype)."""
    optimizer = check_optimizer(optimizer)
    p = get_recipe(recipe).param_bytes
    shapes = param_tensor_shapes(arch)
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        if optimizer in ("adam", "adamw", "adamw-fused"):
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
    """Bytes of temporaries alive at the peak of ``optimizer.step()`` (foreach versions; the
    fused AdamW kernel updates in place and keeps none)."""
    optimizer = check_optimizer(optimizer)
    p = get_recipe(recipe).param_bytes
    params = param_count(arch)
    if optimizer in ("adam", "adamw"):
        return params * p  # exp_avg_sq_sqrt for every parameter at once
    if optimizer == "adafactor":
        return sum(math.prod(s) for s in param_tensor_shapes(arch) if len(s) >= 2) * p  # var_estimates
    return 0


def offload_split(arch: ArchConfig) -> tuple[int, int]:
    """Parameters that torchao's ``CPUOffloadOptimizer`` steps on the host (tensors of
    4096 elements or more) and on the device: ``(host, device)`` element counts."""
    sizes = [math.prod(shape) for shape in param_tensor_shapes(arch)]
    host = sum(n for n in sizes if n >= MINIMAL_SIZE)
    return host, sum(sizes) - host


def offload_bytes(arch: ArchConfig, recipe: str = "fp32") -> dict[str, int]:
    """AdamW offloaded as torchao's ``CPUOffloadOptimizer`` does by default (bytes):
    ``device_state``, the AdamW state of the small parameters stepped on the device, and
    ``host``, what host memory holds for the others: a copy of each parameter, a gradient
    buffer and two AdamW moments, all in the parameters' dtype (4 x its bytes per element),
    plus one fp32 step counter per tensor."""
    p = get_recipe(recipe).param_bytes
    host, device = offload_split(arch)
    tensors = sum(1 for shape in param_tensor_shapes(arch) if math.prod(shape) >= MINIMAL_SIZE)
    return {"device_state": 2 * p * device, "host": 4 * p * host + 4 * tensors}
