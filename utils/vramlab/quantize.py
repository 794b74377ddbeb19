"""Quantize a model's layers with the maintained libraries: torchao and bitsandbytes.

Thin, explicit wrappers so a notebook cell reads as what it does. Each works in place on a
CPU model and returns it; sizes are measured afterwards with :func:`vramlab.storage_bytes`.
Both libraries are optional: a missing one raises an ImportError that says what to install.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

TORCHAO_HINT = "torchao is not installed: run `pip install torchao` (or `pip install -e '.[compress]'`)."
BNB_HINT = "bitsandbytes is not installed: run `pip install bitsandbytes` (or `pip install -e '.[optim]'`)."
Filter = Callable[[nn.Module, str], bool]


@contextlib.contextmanager
def quiet_imports() -> Iterator[None]:
    """Silence the import-time chatter of torchao/bitsandbytes (missing GPU kernels on a
    CPU machine, deprecation notes); real errors still raise."""
    names = ["torchao", "bitsandbytes", "torch.utils._pytree", "transformers"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _quiet_import(name: str, hint: str) -> Any:
    with quiet_imports():
        try:
            return importlib.import_module(name)
        except ImportError as err:
            raise ImportError(hint) from err


def torchao() -> Any:
    """Import torchao's quantization API quietly, or say how to install it."""
    return _quiet_import("torchao.quantization", TORCHAO_HINT)


def bitsandbytes() -> Any:
    """Import bitsandbytes quietly, or say how to install it."""
    return _quiet_import("bitsandbytes", BNB_HINT)


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}.")


def linears(module: nn.Module, fqn: str) -> bool:
    """Filter: every plain ``nn.Linear``."""
    return type(module) is nn.Linear


def linears_and_embeddings(module: nn.Module, fqn: str) -> bool:
    """Filter: every plain ``nn.Linear`` and ``nn.Embedding`` (the token table included)."""
    return type(module) in (nn.Linear, nn.Embedding)


def feed_forward(module: nn.Module, fqn: str) -> bool:
    """Filter for BERT-style encoders: the two linears of each feed-forward block."""
    return type(module) is nn.Linear and (
        fqn.endswith("intermediate.dense") or (fqn.endswith("output.dense") and "attention" not in fqn)
    )


def torchao_int8(model: nn.Module, *, dynamic: bool = False, filter_fn: Filter = linears) -> nn.Module:
    """torchao ``quantize_``: int8 weights with, per output row, an fp32 scale and an int8
    zero point (always 0: the scheme is symmetric, but the tensor stores it).

    ``dynamic=False``: weight-only (activations stay float; ``Int8WeightOnlyConfig``).
    ``dynamic=True``: activations are quantized to int8 on the fly too
    (``Int8DynamicActivationInt8WeightConfig``). ``filter_fn(module, name)`` picks the layers.
    """
    _check_model(model)
    tq = torchao()
    config = tq.Int8DynamicActivationInt8WeightConfig() if dynamic else tq.Int8WeightOnlyConfig()
    with quiet_imports():
        tq.quantize_(model, config, filter_fn=filter_fn)
    return model


def torchao_int4_unpacked(model: nn.Module, group: int = 32, filter_fn: Filter = linears) -> nn.Module:
    """torchao ``IntxWeightOnlyConfig(int4, PerGroup(group))``: 4-bit values, one scale per
    ``group``. On the CPU this stores each 4-bit value in a whole int8 byte (its tensor
    subclass is ``IntxUnpackedToInt8Tensor``): fewer levels, no fewer bytes."""
    _check_model(model)
    tq = torchao()
    from torchao.quantization.granularity import PerGroup

    with quiet_imports():
        tq.quantize_(
            model, tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group)), filter_fn=filter_fn
        )
    return model


INT4_PACKED_GROUPS = (32, 64, 128, 256)  # the group sizes CUDA's tinygemm int4 kernel takes


def _check_int4_group(group: int) -> None:
    if group not in INT4_PACKED_GROUPS:
        raise ValueError(f"the packed int4 kernel takes group sizes {INT4_PACKED_GROUPS}, got {group!r}")


def int4_packed_bytes(out_features: int, in_features: int, group: int = 32) -> int:
    """Bytes of one ``out_features × in_features`` weight in torchao's packed int4 layout
    (``Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d")``, CUDA's tinygemm
    kernel): the input features are padded to a multiple of 1024 and the output features to
    8, two 4-bit codes share a byte, and each row keeps a bf16 scale and a bf16 zero point
    per ``group`` inputs."""
    _check_int4_group(group)
    if out_features <= 0 or in_features <= 0:
        raise ValueError("a weight needs at least one output and one input feature")
    rows = -(-out_features // 8) * 8
    cols = -(-in_features // 1024) * 1024
    return rows * cols // 2 + (cols // group) * rows * 2 * 2


def int4_packed_unavailable() -> str:
    """Why torchao's packed int4 layout cannot run here, or "" when it can (a CUDA GPU of
    compute capability 8.0 or more: A100, L4, H100; not a T4)."""
    if not torch.cuda.is_available():
        return "it runs only on CUDA (the tinygemm kernel), and this machine has no GPU"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"it needs compute capability 8.0 or more (A100, L4, H100); this GPU has {major}.{minor}"
    return ""


def torchao_int4_packed(model: nn.Module, group: int = 32, filter_fn: Filter = linears) -> nn.Module:
    """torchao ``Int4WeightOnlyConfig`` in the packed layout of CUDA's tinygemm kernel: two
    4-bit codes per byte (see :func:`int4_packed_bytes`). The model must be bf16 and on a
    CUDA GPU of compute capability 8.0 or more; elsewhere this raises a clear error."""
    _check_model(model)
    reason = int4_packed_unavailable()
    if reason:
        raise RuntimeError(
            f"torchao's packed int4 layout is not available: {reason}. For packed 4-bit weights on any "
            "device use bnb_linears(model, bits=4) (bitsandbytes NF4)."
        )
    _check_int4_group(group)
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    if any(w.dtype != torch.bfloat16 or w.device.type != "cuda" for w in weights):
        raise ValueError("the packed int4 kernel needs a bf16 model on the GPU: call model.to('cuda', torch.bfloat16)")
    tq = torchao()
    with quiet_imports():
        config = tq.Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d")
        tq.quantize_(model, config, filter_fn=filter_fn)
    return model


def bnb_linears(model: nn.Module, bits: int, filter_fn: Filter = linears, blocksize: int = 64) -> nn.Module:
    """Replace the chosen ``nn.Linear`` layers by bitsandbytes layers.

    ``bits=8``: ``Linear8bitLt`` (LLM.int8(): int8 weights, one scale per row).
    ``bits=4``: ``Linear4bit`` with NF4 codes and one absmax per ``blocksize`` weights
    (no double quantization, so the absmax stays fp32); computation in fp32.
    The weights are quantized when the model is moved back to its device: each new layer
    starts with a CPU copy of the weight, because ``Int8Params`` quantizes only on a move
    *from* the CPU (a CUDA weight moved to CUDA would stay full precision).
    """
    _check_model(model)
    if bits not in (4, 8):
        raise ValueError(f"bitsandbytes layers are 8-bit or 4-bit; got bits={bits!r}.")
    bnb = bitsandbytes()
    device = _device(model)  # before the swap: the new layers' weights start on the CPU
    for name, module in list(model.named_modules()):
        if filter_fn(module, name):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, _bnb_layer(bnb, module, bits, blocksize))
    with quiet_imports():
        return model.to(device)


def _bnb_layer(bnb: Any, linear: nn.Linear, bits: int, blocksize: int) -> nn.Module:
    weight = linear.weight.data.detach().to("cpu", copy=True)  # quantized by the move to the device
    with quiet_imports():
        if bits == 8:
            layer = bnb.nn.Linear8bitLt(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                has_fp16_weights=False,
                threshold=6.0,
            )
            layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                compute_dtype=torch.float32,
                quant_type="nf4",
                compress_statistics=False,
            )
            layer.weight = bnb.nn.Params4bit(
                weight, requires_grad=False, quant_type="nf4", blocksize=blocksize, compress_statistics=False
            )
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return layer


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")
