"""The CUDA caching allocator's own numbers for a block, read beside the storage tracker.

These are the allocator's view, not the tracker's: process-wide (every live tensor on the
device, also ones a measured block was never given), counted in whole allocator blocks
(512-byte rounding; a large block is not split when the remainder is 1 MiB or less), with
library workspaces (cuBLAS, cuDNN) that no tensor op shows. ``requested`` is the sum of the
sizes callers asked for, without the rounding (``requested_bytes`` in ``memory_stats``).

:func:`allocator_view` picks the view for a device; tests replace it to emulate CUDA's
accounting on a CPU (``tests/cuda_emulation.py``).
"""

from __future__ import annotations

from typing import Protocol

import torch

FIELDS = (
    "allocated_baseline_bytes",
    "allocated_peak_bytes",
    "allocated_end_bytes",
    "requested_baseline_bytes",
    "requested_peak_bytes",
    "requested_end_bytes",
    "reserved_bytes",
    "peak_reserved_bytes",
    "device_used_bytes",
)
"""The :class:`~vramlab.measure.Measurement` fields an allocator view fills (bytes; None elsewhere)."""


class AllocatorView(Protocol):
    """What :class:`~vramlab.measure.measure` asks of an allocator."""

    def begin(self) -> dict[str, int]:
        """Reset the peak counters; return the ``*_baseline_bytes`` fields."""
        ...

    def end(self) -> dict[str, int]:
        """The peak, end, reserved and device-used fields after the block."""
        ...

    def allocated_now(self) -> int:
        """Bytes the allocator counts as allocated right now (whole blocks)."""
        ...


class CudaAllocatorView:
    """The CUDA caching allocator of the current device, through ``torch.cuda``'s statistics."""

    def begin(self) -> dict[str, int]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        stats = torch.cuda.memory_stats()
        return {
            "allocated_baseline_bytes": int(stats.get("allocated_bytes.all.current", 0)),
            "requested_baseline_bytes": int(stats.get("requested_bytes.all.current", 0)),
        }

    def end(self) -> dict[str, int]:
        torch.cuda.synchronize()
        stats = torch.cuda.memory_stats()
        free, total = torch.cuda.mem_get_info()
        return {
            "allocated_peak_bytes": int(stats.get("allocated_bytes.all.peak", 0)),
            "allocated_end_bytes": int(stats.get("allocated_bytes.all.current", 0)),
            "requested_peak_bytes": int(stats.get("requested_bytes.all.peak", 0)),
            "requested_end_bytes": int(stats.get("requested_bytes.all.current", 0)),
            "reserved_bytes": int(stats.get("reserved_bytes.all.current", 0)),
            "peak_reserved_bytes": int(stats.get("reserved_bytes.all.peak", 0)),
            "device_used_bytes": int(total - free),
        }

    def allocated_now(self) -> int:
        return int(torch.cuda.memory_allocated())


def allocator_view(device: str) -> AllocatorView | None:
    """The allocator whose numbers come beside the tracker's on ``device`` (None on a CPU)."""
    return CudaAllocatorView() if device == "cuda" else None
