"""Every byte an object holds, found by walking it, and every byte a computation reads.

:func:`vramlab.storage_bytes` counts the tensors a module *declares* (parameters, buffers,
optimizer state). An object can hold more: tensors in plain attributes, in closures of its
hooks or methods, NumPy arrays, Python buffers (``bytes``, ``bytearray``, ``array.array``,
``memoryview``, ``mmap``: weights can be kept there and rebuilt in a forward pass), and the
packed weights of ``torch.ao`` dynamic quantization, which live in TorchScript objects rather
than tensors. :func:`reachable` walks all of that; :func:`read_by` runs a function and lists
what its ops read that existed before it or that no op made (weights held anywhere, including
a module-level global that no walk from the object can find, or storages deserialised from
bytes by ``torch.load`` or ``torch.frombuffer``).
"""

from __future__ import annotations

import array
import functools
import mmap
import sys
import types
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .storages import OpaqueTensor, counted_storages

MAX_OBJECTS = 500_000
_LEAVES = (str, int, float, complex, bool, type(None), type, types.ModuleType)
_BUFFERS = (bytes, bytearray, array.array, memoryview, mmap.mmap)
BIG_STRING = 65_536
"""Characters from which a ``str`` counts as held memory (weights can be kept as text, base64
say); a model's names and docstrings are far shorter, and are not counted."""


def _big_string(item: Any) -> bool:
    return isinstance(item, str) and len(item) >= BIG_STRING


_LEAVES += (types.BuiltinFunctionType, torch.dtype, torch.device, torch.Size)


class UnmeasurableObject(ValueError):
    """An object holds memory this module cannot count (say, an unknown TorchScript object)."""


@dataclass
class Holdings:
    """Distinct storages, NumPy arrays, Python buffers and packed weights, each counted once. Bytes."""

    storages: dict[int, torch.UntypedStorage] = field(default_factory=dict)
    arrays: dict[int, np.ndarray] = field(default_factory=dict)
    packed: dict[int, tuple[Any, int]] = field(default_factory=dict)  # C++ object -> (object, bytes)
    buffers: dict[int, tuple[Any, int]] = field(default_factory=dict)  # bytes, bytearray, ... -> (object, bytes)

    @property
    def nbytes(self) -> int:
        tensors = sum(s.nbytes() for s in self.storages.values())
        others = sum(b for _, b in self.packed.values()) + sum(b for _, b in self.buffers.values())
        return tensors + sum(a.nbytes for a in self.arrays.values()) + others

    def add_buffer(self, buffer: Any) -> None:
        """A Python buffer (``bytes``, ``bytearray``, ``array.array``, ``memoryview``, ``mmap``, or
        a ``str`` of :data:`BIG_STRING` characters or more, at ``sys.getsizeof``), counted once by
        the object that owns the memory (a memoryview by what it views)."""
        if isinstance(buffer, memoryview):
            owner = buffer.obj
            if isinstance(owner, np.ndarray):
                self.add_array(owner)
            elif isinstance(owner, _BUFFERS) and not isinstance(owner, memoryview):
                self.add_buffer(owner)
            else:
                self.buffers.setdefault(id(buffer), (buffer, buffer.nbytes))
            return
        if isinstance(buffer, str):
            self.buffers.setdefault(id(buffer), (buffer, sys.getsizeof(buffer)))
            return
        if isinstance(buffer, array.array):
            size = buffer.buffer_info()[1] * buffer.itemsize
        elif isinstance(buffer, mmap.mmap):
            size = 0 if buffer.closed else len(buffer)
        else:
            size = len(buffer)
        self.buffers.setdefault(id(buffer), (buffer, size))

    def add_tensor(self, tensor: torch.Tensor) -> None:
        try:
            found = counted_storages(tensor)
        except OpaqueTensor as err:  # counting 0 B would be wrong
            raise UnmeasurableObject(str(err)) from None
        for storage in found:
            self.storages.setdefault(id(storage), storage)
        if tensor.is_quantized and tensor.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            for side in (tensor.q_per_channel_scales(), tensor.q_per_channel_zero_points()):
                self.add_tensor(side)

    def add_array(self, array: np.ndarray) -> None:
        base = array
        while isinstance(base.base, np.ndarray):
            base = base.base
        self.arrays.setdefault(id(base), base)

    def add_script_object(self, obj: torch.ScriptObject) -> None:
        key, nbytes = packed_weight(obj)  # two Python wrappers of one TorchScript object share the key
        self.packed.setdefault(key, (obj, nbytes))

    def minus(self, other: Holdings) -> Holdings:
        """What this holds that ``other`` does not."""
        return Holdings(
            {k: v for k, v in self.storages.items() if k not in other.storages},
            {k: v for k, v in self.arrays.items() if k not in other.arrays},
            {k: v for k, v in self.packed.items() if k not in other.packed},
            {k: v for k, v in self.buffers.items() if k not in other.buffers},
        )


def packed_weight(obj: torch.ScriptObject) -> tuple[int, int]:
    """(an identity, bytes) of a packed quantized Linear (``torch.ao`` dynamic quantization):
    the identity of the C++ object, and the bytes of the weight, scales and bias it unpacks
    to. Other TorchScript objects are refused."""
    name = obj._type().qualified_name() if hasattr(obj, "_type") else type(obj).__name__
    if not name.endswith("LinearPackedParamsBase"):
        raise UnmeasurableObject(f"cannot count the bytes of a TorchScript object of type {name}")
    weight, bias = torch.ops.quantized.linear_unpack(obj)
    inner = Holdings()
    for tensor in (weight, bias):
        if isinstance(tensor, torch.Tensor):
            inner.add_tensor(tensor)
    return hash(obj), inner.nbytes  # a ScriptObject hashes by the C++ object it wraps


def _children(obj: Any) -> list[Any]:
    """What the walk follows from ``obj``; module globals are never followed."""
    if isinstance(obj, dict):
        return [*obj.keys(), *obj.values()]
    if isinstance(obj, (list, tuple, set, frozenset, deque)):
        return list(obj)
    if isinstance(obj, types.FunctionType):
        cells = [c.cell_contents for c in obj.__closure__ or () if _cell_filled(c)]
        return [*cells, obj.__defaults__, obj.__kwdefaults__, obj.__dict__]
    if isinstance(obj, types.MethodType):
        return [obj.__self__, obj.__func__]
    if isinstance(obj, functools.partial):
        return [obj.func, obj.args, obj.keywords]
    found = list(vars(obj).values()) if hasattr(obj, "__dict__") else []
    for cls in type(obj).__mro__:
        for slot in getattr(cls, "__slots__", ()):
            if isinstance(slot, str) and hasattr(obj, slot):
                found.append(getattr(obj, slot))
    return found


def _cell_filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def reachable(obj: Any) -> Holdings:
    """Everything ``obj`` holds: tensors (subclasses flattened, per-channel scales), NumPy
    arrays and packed quantized weights reachable through attributes, containers, closures,
    bound methods and partials. Raises :class:`UnmeasurableObject` for what it cannot count."""
    held, seen, todo = Holdings(), set(), deque([obj])
    while todo:
        item = todo.popleft()
        if (isinstance(item, _LEAVES) and not _big_string(item)) or id(item) in seen:
            continue
        seen.add(id(item))
        if len(seen) > MAX_OBJECTS:
            raise UnmeasurableObject(f"more than {MAX_OBJECTS:,} objects reachable: not a model")
        if isinstance(item, torch.Tensor):
            held.add_tensor(item)
            todo.extend(vars(item).values())  # side tensors bitsandbytes attaches to parameters
        elif isinstance(item, np.ndarray):
            held.add_array(item)
        elif isinstance(item, torch.ScriptObject):
            held.add_script_object(item)
        elif isinstance(item, _BUFFERS) or _big_string(item):
            held.add_buffer(item)
        else:
            todo.extend(_children(item))
    return held


class _ReadRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.read, self.made = Holdings(), Holdings()

    def __torch_dispatch__(self, func: Any, types_: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        inputs = Holdings()
        for leaf in tree_flatten((args, kwargs))[0]:
            if isinstance(leaf, torch.Tensor):
                inputs.add_tensor(leaf)
            elif isinstance(leaf, torch.ScriptObject):
                inputs.add_script_object(leaf)
            elif isinstance(leaf, torch.TypedStorage):  # set_(storage): made outside any op (torch.load)
                inputs.storages.setdefault(id(leaf._untyped_storage), leaf._untyped_storage)
            elif isinstance(leaf, torch.UntypedStorage):
                inputs.storages.setdefault(id(leaf), leaf)
        self.read.storages.update(inputs.storages)
        self.read.packed.update(inputs.packed)
        out = func(*args, **kwargs)
        lifted = func.__name__.startswith("lift_fresh")  # torch.tensor(...) made its input just now
        for leaf in tree_flatten(out)[0]:
            if isinstance(leaf, torch.Tensor):
                fresh = Holdings()
                fresh.add_tensor(leaf)
                # a view's storage is its input's: not made here (unless torch.tensor just made it)
                self.made.storages.update(fresh.storages if lifted else fresh.minus(inputs).storages)
        return out


def read_by(fn: Callable[[], Any]) -> Holdings:
    """What the ops of ``fn()`` read that ``fn`` did not create: storages (held until this
    returns, so each is counted once) and packed quantized weights."""
    with _ReadRecorder() as recorder:
        fn()
    return recorder.read.minus(recorder.made)
