"""Find the real storages behind a tensor, and count their bytes.

A plain tensor owns (or shares) one untyped storage. A view shares its base's storage, so
counting ``numel * element_size`` per tensor double-counts views and misses the bytes a
view keeps alive. Tensor subclasses (quantized weights, for example) are wrappers: their
bytes live in the inner tensors returned by ``__tensor_flatten__``. Sparse tensors have no
storage of their own; their bytes are in their index and value tensors.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Mapping, ValuesView
from typing import Any

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

_SPARSE_COMPRESSED = {torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc}


def real_storages(tensor: torch.Tensor) -> Iterator[torch.UntypedStorage]:
    """Yield every untyped storage that holds the bytes of ``tensor`` (subclasses flattened)."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            inner = getattr(tensor, name)
            if isinstance(inner, torch.Tensor):  # skip non-tensor entries (a DTensor's mesh, for one)
                yield from real_storages(inner)
        return
    if tensor.layout == torch.sparse_coo:
        yield from real_storages(tensor._indices())
        yield from real_storages(tensor._values())
        return
    if tensor.layout in _SPARSE_COMPRESSED:
        compressed, plain = _compressed_indices(tensor)
        for part in (compressed, plain, tensor.values()):
            yield from real_storages(part)
        return
    try:
        yield tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return  # e.g. a wrapper without storage that is not traceable: nothing to count


class OpaqueTensor(ValueError):
    """A tensor whose bytes are in no storage vramlab can read (an MKLDNN tensor, say)."""


def counted_storages(tensor: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages of :func:`real_storages`; raise :class:`OpaqueTensor` for a non-empty tensor
    that has none, rather than count its bytes as 0."""
    found = list(real_storages(tensor))
    if not found and tensor.numel():
        raise OpaqueTensor(
            f"a tensor of layout {tensor.layout} has no storage vramlab can read, so its bytes cannot be "
            "counted; keep weights as ordinary (strided) tensors, or convert this one with .to_dense()"
        )
    return found


def _compressed_indices(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if tensor.layout in (torch.sparse_csr, torch.sparse_bsr):
        return tensor.crow_indices(), tensor.col_indices()
    return tensor.ccol_indices(), tensor.row_indices()


def tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    """Yield the tensors found in ``obj``: a tensor, a module (parameters, gradients and
    buffers), an optimizer (its state), or a (nested) list/tuple/set/dict or iterator of
    those (``model.parameters()``). Other objects (numbers, strings, None) yield nothing."""
    if isinstance(obj, torch.Tensor):
        yield obj
        yield from _side_tensors(obj)
    elif isinstance(obj, torch.nn.Module):
        for p in obj.parameters():
            yield from tensors_in(p)
            if p.grad is not None:
                yield p.grad
        yield from obj.buffers()
        for module in obj.modules():
            yield from _side_tensors(getattr(module, "state", None))
    elif isinstance(obj, torch.optim.Optimizer):
        for state in obj.state.values():
            yield from tensors_in(state)
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from tensors_in(value)
    elif isinstance(obj, CONTAINERS):
        for value in obj:
            yield from tensors_in(value)


CONTAINERS = (list, tuple, set, frozenset, collections.deque, ValuesView, Iterator)
"""What :func:`tensors_in` opens besides dicts: sequences, sets and iterators (generators,
``model.parameters()``); an array or other iterable object is not walked element by element."""

_SIDE_ATTRS = ("CB", "SCB", "absmax", "code", "offset")


def _side_tensors(holder: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors that bitsandbytes attaches to a parameter or module state, not to its data:
    ``quant_state`` (absmax, code and, with double quantization, a nested ``state2``) and the
    row scales ``CB``/``SCB`` of 8-bit layers. Other objects yield nothing."""
    if holder is None or depth > 3:
        return
    for name in _SIDE_ATTRS:
        value = getattr(holder, name, None)
        if isinstance(value, torch.Tensor):
            yield value
    for name in ("quant_state", "state2"):
        nested = getattr(holder, name, None)
        if nested is not None and not isinstance(nested, torch.Tensor):
            yield from _side_tensors(nested, depth + 1)


def storage_bytes(objs: Iterable[Any] | Any) -> int:
    """Bytes of the distinct storages behind ``objs`` (views and shared weights counted once).

    This is what a tensor really occupies, before any allocator rounding.
    """
    seen: dict[int, torch.UntypedStorage] = {}
    for tensor in tensors_in(objs):
        for storage in counted_storages(tensor):
            seen[id(storage)] = storage  # holding it keeps its id unique while we count
    return sum(storage.nbytes() for storage in seen.values())
