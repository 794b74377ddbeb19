"""CUDA's accounting, emulated on a CPU, for tests of what ``measure`` reports on a GPU.

:class:`EmulatedCudaAllocator` is a dispatch mode pushed beneath everything a test runs: every
new CPU tensor storage is allocated in :class:`vramlab.allocator_model.CachingAllocatorModel`
(512-byte rounding, 2/20 MiB segments, large blocks not split when the remainder is 1 MiB or
less) and freed there when the storage dies; the first matrix product takes a cuBLAS-sized
workspace that stays, as on a GPU. Its counts are process-wide, like ``memory_allocated()``:
what earlier cells left alive counts, whether or not a block was given it.

:func:`emulate_cuda` installs it and makes :func:`vramlab.allocator_stats.allocator_view`
return a view of it for CPU measurements, so a ``Measurement`` gets ``allocated_*`` and
``requested_*`` numbers as CUDA would give. :func:`as_before` reads a measurement the way
vramlab reported it on CUDA before issue 22 (``peak_bytes = max_memory_allocated()``, absolute).
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from vramlab.allocator_model import CachingAllocatorModel
from vramlab.storages import real_storages
from vramlab.units import MiB

MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_scaled_dot_product_flash_attention_for_cpu"}
WORKSPACE = 8 * MiB  # cuBLAS's workspace on a T4 (32 MiB on an H100)
CONTEXT = 300 * MiB  # what device_used adds beyond reserved: the CUDA context


class EmulatedCudaAllocator(TorchDispatchMode):
    """Process-wide (this thread's) allocator accounting for CPU storages; see the module."""

    def __init__(self, count_fake: bool = False) -> None:
        super().__init__()
        self.count_fake = count_fake  # fake tensors too: a dry run of the GPU sizes (enter it inside FakeTensorMode)
        self.model = CachingAllocatorModel(capacity=1 << 50)
        self.requested = 0
        self.peak_allocated = 0
        self.peak_requested = 0
        self._handles: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._workspace: int | None = None

    def _malloc(self, nbytes: int) -> int:
        handle = self.model.malloc(max(nbytes, 1))
        self.requested += nbytes
        self.peak_allocated = max(self.peak_allocated, self.model.allocated_bytes)
        self.peak_requested = max(self.peak_requested, self.requested)
        return handle

    def _free(self, handle: int, nbytes: int) -> None:
        self.model.free(handle)
        self.requested -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self._workspace is None and func.overloadpacket.__name__ in MATMULS:
            self._workspace = self._malloc(WORKSPACE)
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
                continue
            if isinstance(tensor, FakeTensor) and not self.count_fake:
                continue
            for storage in real_storages(tensor):
                if storage in self._handles:
                    continue
                nbytes = storage.nbytes()
                handle = self._malloc(nbytes)
                self._handles[storage] = handle
                weakref.finalize(storage, self._free, handle, nbytes)
        return out

    def reset_peak(self) -> None:
        self.peak_allocated, self.peak_requested = self.model.allocated_bytes, self.requested


class EmulatedView:
    """An :class:`vramlab.allocator_stats.AllocatorView` over an :class:`EmulatedCudaAllocator`."""

    def __init__(self, allocator: EmulatedCudaAllocator) -> None:
        self.allocator = allocator

    def begin(self) -> dict[str, int]:
        self.allocator.reset_peak()
        return {
            "allocated_baseline_bytes": self.allocator.model.allocated_bytes,
            "requested_baseline_bytes": self.allocator.requested,
        }

    def end(self) -> dict[str, int]:
        a = self.allocator
        return {
            "allocated_peak_bytes": a.peak_allocated,
            "allocated_end_bytes": a.model.allocated_bytes,
            "requested_peak_bytes": a.peak_requested,
            "requested_end_bytes": a.requested,
            "reserved_bytes": a.model.reserved_bytes,
            "peak_reserved_bytes": a.model.reserved_bytes,
            "device_used_bytes": a.model.reserved_bytes + CONTEXT,
        }

    def allocated_now(self) -> int:
        return self.allocator.model.allocated_bytes


@contextlib.contextmanager
def emulate_cuda(
    monkeypatch: Any, recorded: list | None = None, count_fake: bool = False
) -> Iterator[EmulatedCudaAllocator]:
    """Run the body with CUDA's accounting emulated; append every finished Measurement to ``recorded``."""
    allocator = EmulatedCudaAllocator(count_fake)
    module = sys.modules["vramlab.measure"]  # the package's ``vramlab.measure`` is the class
    monkeypatch.setattr(module, "allocator_view", lambda device: EmulatedView(allocator))
    if recorded is not None:
        original = module.measure.__exit__

        def exit_and_record(self: Any, *exc: Any) -> None:
            original(self, *exc)
            recorded.append(self.result)

        monkeypatch.setattr(module.measure, "__exit__", exit_and_record)
    with allocator:
        yield allocator


def as_before(m: Any) -> SimpleNamespace:
    """``m`` as vramlab reported it on CUDA before issue 22: the allocator's absolute numbers."""
    return SimpleNamespace(
        peak_bytes=m.allocated_peak_bytes,
        end_bytes=m.allocated_end_bytes,
        baseline_bytes=m.allocated_baseline_bytes,
        peak_delta_bytes=m.allocated_peak_bytes - m.allocated_baseline_bytes,
        end_delta_bytes=m.allocated_end_bytes - m.allocated_baseline_bytes,
    )
