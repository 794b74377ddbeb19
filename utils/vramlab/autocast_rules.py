"""CUDA autocast's float32 rule, applied on a CPU: how a dry run counts what a GPU saves.

``torch.autocast`` keeps one op list per device. CUDA's runs a set of elementwise and
normalisation ops in float32 (``AT_FORALL_FP32`` in ``aten/src/ATen/autocast_mode.h``: ``exp``,
``log``, ``pow``, ``rsqrt``, ``reciprocal``, ``softplus``, ``layer_norm``, ``group_norm``, ...): their
16-bit inputs are cast to float32 first, and the float32 copy is what autograd saves. CPU
autocast's float32 list holds losses, ``cdist`` and linear algebra, not these ops, so they run
in 16 bits there. For a model whose Python
code calls one of these ops on a 16-bit tensor (GPT-2's ``gelu_new`` calls ``torch.pow``), a CPU
run saves fewer bytes than the GPU will.

:func:`cuda_fp32_ops` applies CUDA's rule to the ops listed in :data:`CUDA_FP32_OPS` while CPU
autocast is on. CUDA's second list (``softmax``, ``log_softmax``, ``sum``, ``cumsum``, ``prod``
get ``dtype=float32`` when none is given: no copy of the input is saved) is not applied.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_NAMES = ("exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "pow", "acos", "asin", "cosh")
_NAMES += ("sinh", "tan", "erfinv")

CUDA_FP32_OPS: frozenset[Callable[..., Any]] = frozenset(
    [getattr(torch, n) for n in _NAMES]
    + [getattr(torch.Tensor, n) for n in _NAMES]
    + [torch.Tensor.__pow__, torch.Tensor.__rpow__, F.softplus, F.layer_norm, F.group_norm, F.rms_norm]
)
"""The functions :func:`cuda_fp32_ops` runs in float32: CUDA autocast's float32 list, as
Python calls them (``torch.pow``, ``Tensor.pow``, ``x ** 3``, ``F.layer_norm``, ...)."""


def _to_fp32(value: Any, low: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype == low:
        return value.float()
    if isinstance(value, list | tuple):
        return type(value)(_to_fp32(v, low) for v in value)
    return value


class _CudaFp32Rule(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in CUDA_FP32_OPS and torch.is_autocast_enabled("cpu"):
            low = torch.get_autocast_dtype("cpu")
            args, kwargs = _to_fp32(args, low), {k: _to_fp32(v, low) for k, v in kwargs.items()}
        return func(*args, **kwargs)


@contextmanager
def cuda_fp32_ops() -> Iterator[None]:
    """While CPU autocast is on inside this block, run the ops of :data:`CUDA_FP32_OPS` in
    float32 as CUDA autocast does: each 16-bit tensor argument is cast to float32 first (the
    cast is recorded by autograd, so the float32 copy is what backward keeps)."""
    with _CudaFp32Rule():
        yield
