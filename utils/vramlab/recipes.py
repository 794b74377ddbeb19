"""Training set-ups by name: precision recipes and optimizers, shared by estimate and dryrun."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

RECIPES = ("fp32", "amp-bf16", "amp-fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw-fused", "adam", "sgd", "sgd-momentum", "adafactor", "adamw-8bit")
"""adamw and adam are the foreach implementations (the default on CUDA: one parameter-sized
temporary at the step); adamw-fused is ``AdamW(fused=True)``, same state, no temporary."""


@dataclass(frozen=True)
class Recipe:
    """How a training step handles precision.

    ``param_dtype``: the dtype the weights (and so gradients and optimizer states) are
    stored in; ``compute_dtype``: the dtype autocast runs matmuls in (None: no autocast).
    Dtypes are kept by name, so the formulas run without importing torch; the properties
    return torch dtypes for the code that builds tensors.
    """

    name: str
    param_name: str
    compute_name: str | None
    grad_scaler: bool

    @property
    def param_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.param_name)

    @property
    def compute_dtype(self) -> torch.dtype | None:
        import torch

        return getattr(torch, self.compute_name) if self.compute_name else None

    @property
    def autocast(self) -> bool:
        """Whether the step runs under autocast (fp32 weights, 16-bit matrix products)."""
        return self.compute_name is not None

    @property
    def activation_dtype(self) -> torch.dtype:
        """The dtype activations are computed in: the autocast dtype, else the weights'."""
        return self.compute_dtype or self.param_dtype

    @property
    def param_bytes(self) -> int:
        """Bytes per weight, gradient and optimizer-state value (also the residual stream's)."""
        return _ITEMSIZE[self.param_name]

    @property
    def compute_bytes(self) -> int:
        """Bytes per activation value of the matrix products."""
        return _ITEMSIZE[self.compute_name or self.param_name]


_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
_RECIPES = {
    "fp32": Recipe("fp32", "float32", None, False),
    "amp-bf16": Recipe("amp-bf16", "float32", "bfloat16", False),
    "amp-fp16": Recipe("amp-fp16", "float32", "float16", True),
    "bf16": Recipe("bf16", "bfloat16", None, False),
}


def get_recipe(name: str) -> Recipe:
    """Look up a precision recipe: fp32, amp-bf16, amp-fp16 (with GradScaler) or bf16 (pure)."""
    try:
        return _RECIPES[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; use one of {', '.join(RECIPES)}") from None


def check_optimizer(name: str) -> str:
    """Return the optimizer name, or raise a ValueError listing the known ones."""
    key = str(name).lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")
    return key


def check_positive(**values: int) -> None:
    """Raise a ValueError naming any value that is not a positive integer (batch, seq...)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
