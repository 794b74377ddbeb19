"""CUDA autocast's float32 rules, applied on a CPU: how a dry run counts what a GPU saves.

``torch.autocast`` keeps one op list per device. CUDA's runs a set of elementwise and
normalisation ops in float32 (``AT_FORALL_FP32`` in ``aten/src/ATen/autocast_mode.h``: ``exp``,
``log``, ``pow``, ``rsqrt``, ``reciprocal``, ``softplus``, ``layer_norm``, ``group_norm``, ...): their
16-bit inputs are cast to float32 first, and the float32 copy is what autograd saves. CPU
autocast's float32 list holds losses, ``cdist`` and linear algebra, not these ops, so they run
in 16 bits there. For a model whose Python
code calls one of these ops on a 16-bit tensor (GPT-2's ``gelu_new`` calls ``torch.pow``), a CPU
run saves fewer bytes than the GPU will.

:func:`cuda_fp32_ops` applies both of CUDA's float32 rules while CPU autocast is on: the ops of
:data:`CUDA_FP32_OPS` get float32 copies of their 16-bit inputs, and those of
:data:`CUDA_FP32_DTYPE_OPS` (``softmax``, ``log_softmax``, ``sum``, ``cumsum``, ``prod``, ...) get
``dtype=torch.float32`` when the caller gives none: no copy of the input, a float32 output.
The dry runs of :mod:`vramlab.dryrun` run under it, so they count what a GPU saves.

Two limits. The lists hold the part of CUDA's that transformer language models call from Python
(not ``norm``, ``logsumexp``, ``cosine_similarity``, ``dist``, ``renorm`` or ``upsample_*``). And the
rule acts on the outermost call only: an op called inside another function (``F.normalize``
calling ``norm``, ``cross_entropy`` calling ``log_softmax`` in C++) is not cast, where CUDA
autocast, which stays on inside ops it does not list, would cast it. Neither changes GPT-2 or
Llama-family models, whose losses upcast the logits to fp32 themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
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

_DTYPE_NAMES = ("softmax", "log_softmax", "sum", "cumsum", "prod", "cumprod")
CUDA_FP32_DTYPE_OPS: frozenset[Callable[..., Any]] = frozenset(
    [getattr(torch, n) for n in _DTYPE_NAMES]
    + [getattr(torch.Tensor, n) for n in _DTYPE_NAMES]
    + [F.softmax, F.log_softmax, torch.linalg.vector_norm, torch.linalg.matrix_norm]
)
"""The functions CUDA autocast gives ``dtype=torch.float32`` when the call names no dtype
(``AT_FORALL_FP32_SET_OPT_DTYPE``): the output is float32, the input is not copied."""

_LOW = (torch.float16, torch.bfloat16)
_DTYPE_POSITION = {F.softmax: 3, F.log_softmax: 3, torch.softmax: 2, torch.log_softmax: 2}
_DTYPE_POSITION |= {torch.Tensor.softmax: 2, torch.Tensor.log_softmax: 2}
"""How many positional arguments come before ``dtype`` (self included for methods): a call with
more names its dtype by position, and the rule leaves it alone."""


def _to_fp32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype in _LOW:
        return value.float()
    if isinstance(value, list | tuple):
        return type(value)(_to_fp32(v) for v in value)
    return value


def _eligible(args: tuple[Any, ...]) -> bool:
    """CUDA's test for the dtype rule: the first argument is a floating tensor, not float64."""
    first = args[0] if args else None
    return isinstance(first, torch.Tensor) and first.is_floating_point() and first.dtype != torch.float64


class _CudaFp32Rule(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if torch.is_autocast_enabled("cpu"):
            if func in CUDA_FP32_OPS:
                args, kwargs = _to_fp32(args), {k: _to_fp32(v) for k, v in kwargs.items()}
            elif func in CUDA_FP32_DTYPE_OPS and kwargs.get("dtype") is None and _eligible(args):
                if len(args) <= _DTYPE_POSITION.get(func, len(args)):  # no dtype given by position
                    kwargs = {**kwargs, "dtype": torch.float32}
        return func(*args, **kwargs)


@contextmanager
def cuda_fp32_ops() -> Iterator[None]:
    """While CPU autocast is on inside this block, apply CUDA autocast's float32 rules: the ops
    of :data:`CUDA_FP32_OPS` get each 16-bit tensor argument cast to float32 first (the cast is
    recorded by autograd, so the float32 copy is what backward keeps); those of
    :data:`CUDA_FP32_DTYPE_OPS` get ``dtype=torch.float32`` unless the call names a dtype.
    Activation checkpointing recomputes outside it: see :func:`checkpoint_contexts`."""
    with _CudaFp32Rule():
        yield


def checkpoint_contexts() -> tuple[AbstractContextManager[None], AbstractContextManager[None]]:
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: the
    rule around the recompute. Checkpointing restores autocast for the recompute but not a
    function mode, so without this a checkpointed block would recompute under CPU rules and
    fail checkpointing's dtype check (forward: nothing, the caller's block already applies it)."""
    return nullcontext(), cuda_fp32_ops()
