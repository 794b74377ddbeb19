"""Make a block of code behave like a GPU with a fixed amount of memory.

>>> with budget("2 GiB", model, optimizer) as m:
...     train_step()          # raises torch.OutOfMemoryError past 2 GiB

The budget means the same on every device: it hooks the storage tracker's allocations and
refuses, before it allocates, any op whose new tensors would take the tracked live total (what
the block was given plus what it made: ``Measurement.peak_bytes``) past the budget, raising a
real ``torch.OutOfMemoryError`` whose message has CUDA's fields (tried to allocate, total
capacity, free, in use; see :mod:`vramlab.oom`). So a budget of a block's measured peak fits,
and one byte less does not, on a CPU and on a GPU alike.

``allocator_cap=True`` (CUDA only) caps the real caching allocator instead, with
``torch.cuda.set_per_process_memory_fraction``: that cap counts what the whole process
*reserves*, cache, block rounding and fragmentation included, as a smaller GPU would, and the
error is CUDA's own message.

The tracked budget sees only the thread that runs the block (a dispatch mode is thread-local):
tensors made by other threads, a DataLoader's pin-memory thread for one, are not refused, and
another thread's ``optimizer.step()`` does not count. A tensor that grows in place (``resize_``,
an ``out=`` that resizes) is refused just after it grew: its new size is known only then.
"""

from __future__ import annotations

import gc
from typing import Any

import torch

from .measure import Measurement, measure
from .oom import format_oom_message
from .units import format_bytes, parse_bytes


class budget:
    """Context manager: run the block as if the device had only ``size`` of memory.

    Args:
        size: the budget, e.g. ``"2 GiB"``, ``"16GB"`` (decimal) or a whole number of bytes.
        *track: objects alive before the block that count against the budget (model,
            optimizer, inputs): they and what the block creates count, on every device.
        device: "cpu" or "cuda" (default: as :class:`vramlab.measure` chooses).
        allocator_cap: CUDA only: cap the caching allocator's reserved bytes for the whole
            process at ``size`` instead (everything alive on the GPU counts, cache included).

    Only the thread that runs the block is seen (a dispatch mode is thread-local): tensors
    made by other threads are not counted and not refused (``allocator_cap`` sees them).

    Yields the :class:`Measurement` of the block (also ``self.result``, which exists even
    when the budget refuses what is alive before the block starts). On exit, also after an
    out-of-memory error, the previous allocator cap is restored and the garbage collector runs.
    """

    def __init__(
        self,
        size: int | str,
        *track: Any,
        device: str | None = None,
        timeline: bool = False,
        allocator_cap: bool = False,
    ) -> None:
        self.limit = parse_bytes(size)
        if self.limit <= 0:
            raise ValueError(f"a budget must be more than 0 bytes, got {size!r}")
        self._measure = measure(*track, device=device, timeline=timeline)
        self.device = self._measure.device
        self.allocator_cap = bool(allocator_cap)
        if self.allocator_cap and self.device != "cuda":
            raise ValueError(
                f"allocator_cap=True caps the CUDA caching allocator; this budget measures {self.device!r}. "
                "Leave it out: the tracked budget means the same on every device."
            )
        if not self.allocator_cap:
            self._measure.add_alloc_hook(self._refuse)
        self._old_fraction: float | None = None

    @property
    def result(self) -> Measurement | None:
        """The latest block's measurement (None before the first block)."""
        return self._measure.result

    def _refuse(self, in_use: int, request: int) -> None:
        """The allocation hook: raise a CUDA-style OOM when ``request`` bytes do not fit."""
        if in_use + request > self.limit:
            raise torch.OutOfMemoryError(format_oom_message(request, self.limit, in_use))

    def __enter__(self) -> Measurement:
        if self.allocator_cap:
            self._cap_cuda()
        try:
            result = self._measure.__enter__()
        except BaseException:
            self._restore()
            raise
        if not self.allocator_cap and result.baseline_bytes > self.limit:
            self.__exit__(None, None, None)
            raise torch.OutOfMemoryError(
                f"vramlab budget: what is already alive ({format_bytes(result.baseline_bytes)}) exceeds the "
                f"budget of {format_bytes(self.limit)} before the block starts; "
                "free tensors first or use a larger budget."
            )
        return result

    def __exit__(self, *exc: Any) -> None:
        try:
            self._measure.__exit__(*exc)
        finally:
            self._restore()

    def _cap_cuda(self) -> None:
        total = torch.cuda.get_device_properties(0).total_memory
        if self.limit > total:
            raise ValueError(
                f"a budget of {format_bytes(self.limit)} is more than this GPU has "
                f"({format_bytes(total)}); choose a smaller budget"
            )
        getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        self._old_fraction = float(getter()) if getter else 1.0
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(self.limit / total)

    def _restore(self) -> None:
        gc.collect()
        if self.allocator_cap and self._old_fraction is not None:
            torch.cuda.set_per_process_memory_fraction(self._old_fraction)
            torch.cuda.empty_cache()
            self._old_fraction = None
