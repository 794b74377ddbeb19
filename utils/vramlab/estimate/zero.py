"""Per-rank bytes of weights, gradients and optimizer state under ZeRO (Rajbhandari et al., 2020)."""

from __future__ import annotations

import math

from ..models import ArchConfig, get_arch
from ..recipes import check_positive, get_recipe
from .params import param_count
from .states import optimizer_state_bytes

ZERO_STAGES = (0, 1, 2, 3)


def zero_bytes_per_rank(
    params: int, world_size: int, stage: int, weight_bytes: float = 4, grad_bytes: float = 4, optimizer_bytes: float = 8
) -> dict[str, int]:
    """Per-rank bytes of weights, gradients and optimizer state under ZeRO (Rajbhandari et al.,
    2020): stage 0 replicates everything (DDP), stage 1 shards the optimizer state, stage 2
    also the gradients, stage 3 also the weights, each over ``world_size`` ranks. Defaults
    are fp32 AdamW (4 + 4 + 8 bytes per parameter); the paper's mixed precision is 2, 2, 12.
    Activations are not sharded by ZeRO and are not included."""
    check_positive(params=params, world_size=world_size)
    if isinstance(stage, bool) or stage not in ZERO_STAGES:  # True == 1 in Python: refuse it by name
        raise ValueError(f"ZeRO stage must be one of {ZERO_STAGES}, got {stage!r}")

    def share(per_param: float, sharded: bool) -> int:
        return int(math.ceil(params / world_size) * per_param) if sharded else int(params * per_param)

    return {
        "parameters": share(weight_bytes, stage >= 3),
        "gradients": share(grad_bytes, stage >= 2),
        "optimizer": share(optimizer_bytes, stage >= 1),
    }


def sharded_states_per_gpu(
    model: str | ArchConfig, recipe: str, optimizer: str, gpus: int, stage: int
) -> dict[str, dict[str, int]]:
    """Weights, gradients and optimizer state per GPU under ZeRO ``stage`` over ``gpus``, in
    the two byte conventions people meet (bytes; activations, gathered weights and
    communication buffers are not included):

    - "pytorch": what PyTorch's ZeroRedundancyOptimizer and FSDP2 (with a
      MixedPrecisionPolicy) keep: weights and gradients in the recipe's parameter dtype (fp32
      under autocast) and the optimizer's own state;
    - "deepspeed": DeepSpeed's mixed-precision accounting, bf16 weights and gradients (2 + 2)
      and fp32 master weights beside the optimizer's state; only for autocast recipes.
    """
    arch = get_arch(model)
    params, rec = param_count(arch), get_recipe(recipe)
    state = optimizer_state_bytes(arch, optimizer, recipe) / params
    out = {"pytorch": zero_bytes_per_rank(params, gpus, stage, rec.param_bytes, rec.param_bytes, state)}
    if rec.autocast:
        out["deepspeed"] = zero_bytes_per_rank(params, gpus, stage, 2, 2, 4 + state)
    return out
