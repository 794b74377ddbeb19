"""A small *model* of PyTorch's CUDA caching allocator, to show fragmentation on a CPU.

This is a simulation, not a measurement: on a GPU, use the real allocator's
``torch.cuda.memory._snapshot()``. It follows the documented rules of the real one in
simplified form (c10/cuda/CUDACachingAllocator.cpp; PyTorch docs, *CUDA semantics, memory
management*):

- requests are rounded up to a multiple of 512 bytes;
- requests of at most 1 MiB come from 2 MiB segments (the small pool); larger ones from
  20 MiB segments if under 10 MiB, else from a segment of their own size rounded up to 2 MiB;
- the smallest free block that fits is used and split when the remainder is worth keeping
  (more than 512 bytes in the small pool, more than 1 MiB in the large);
- a freed block stays reserved (cached) and merges with free neighbours in its segment;
- when a new segment would exceed the device, fully free cached segments are released and
  the request retried, then it fails with an out-of-memory error.

With ``expandable_segments=True`` physical memory is counted in 2 MiB pages: free pages in
the middle of a segment can be remapped, so only pages touched by live blocks are held.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from .units import MiB, format_bytes

ROUND = 512
SMALL_REQUEST = 1 * MiB
SMALL_SEGMENT = 2 * MiB
LARGE_SEGMENT = 20 * MiB
LARGE_CUTOFF = 10 * MiB
PAGE = 2 * MiB


@dataclass
class AllocatorBlock:
    """A range of a segment: ``size`` bytes at ``offset``, live (allocated) or cached (free)."""

    offset: int
    size: int
    allocated: bool = False
    handle: int | None = None


@dataclass
class Segment:
    """One block of device memory reserved from the driver, split into blocks."""

    size: int
    pool: str
    blocks: list[AllocatorBlock] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.blocks:
            self.blocks = [AllocatorBlock(0, self.size)]


def round_request(nbytes: int) -> int:
    """Round a request up to the allocator's 512-byte granularity."""
    if nbytes < 0:
        raise ValueError("a request must be 0 or more bytes")
    return max(ROUND, -(-nbytes // ROUND) * ROUND)


class CachingAllocatorModel:
    """Simulate allocations and frees against a device of ``capacity`` bytes."""

    def __init__(self, capacity: int, expandable_segments: bool = False) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be more than 0 bytes")
        self.capacity = capacity
        self.expandable = expandable_segments
        self.segments: list[Segment] = []
        self._handles = itertools.count(1)
        self._where: dict[int, tuple[Segment, AllocatorBlock]] = {}

    # -- statistics ---------------------------------------------------------------------
    @property
    def allocated_bytes(self) -> int:
        """Bytes of live blocks (what ``memory_allocated`` reports)."""
        return sum(b.size for s in self.segments for b in s.blocks if b.allocated)

    @property
    def reserved_bytes(self) -> int:
        """Bytes held from the device (``memory_reserved``): whole segments, or touched
        pages with expandable segments."""
        if self.expandable:
            return self._touched_pages() * PAGE
        return sum(s.size for s in self.segments)

    def _touched_pages(self) -> int:
        pages = set()
        for index, seg in enumerate(self.segments):
            for b in seg.blocks:
                if b.allocated:
                    pages.update((index, p) for p in range(b.offset // PAGE, -(-(b.offset + b.size) // PAGE)))
        return len(pages)

    # -- allocation ---------------------------------------------------------------------
    def malloc(self, nbytes: int) -> int:
        """Allocate ``nbytes``; return a handle for :meth:`free`. Raises ``torch.OutOfMemoryError``."""
        size = round_request(nbytes)
        pool = "small" if size <= SMALL_REQUEST else "large"
        found = self._best_fit(size, pool)
        if found is None:
            found = self._new_segment(size, pool)
        segment, block = found
        handle = next(self._handles)
        self._split(segment, block, size, pool)
        block.allocated, block.handle = True, handle
        self._where[handle] = (segment, block)
        return handle

    def _best_fit(self, size: int, pool: str) -> tuple[Segment, AllocatorBlock] | None:
        candidates = [
            (b.size, i, s, b)
            for i, s in enumerate(self.segments)
            if s.pool == pool
            for b in s.blocks
            if not b.allocated and b.size >= size
        ]
        if not candidates:
            return None
        _, _, segment, block = min(candidates, key=lambda c: (c[0], c[1]))
        return segment, block

    def _segment_size(self, size: int, pool: str) -> int:
        if pool == "small":
            return SMALL_SEGMENT
        return LARGE_SEGMENT if size < LARGE_CUTOFF else -(-size // PAGE) * PAGE

    def _new_segment(self, size: int, pool: str) -> tuple[Segment, AllocatorBlock]:
        seg_size = self._segment_size(size, pool)
        if not self._room_for(seg_size, size):
            self.empty_cache()  # the real allocator frees cached segments and retries
            if not self._room_for(seg_size, size):
                raise torch.OutOfMemoryError(self._oom_text(size))
        segment = Segment(seg_size, pool)
        self.segments.append(segment)
        return segment, segment.blocks[0]

    def _room_for(self, seg_size: int, size: int) -> bool:
        if self.expandable:
            return self._touched_pages() * PAGE + -(-size // PAGE) * PAGE <= self.capacity
        return self.reserved_bytes + seg_size <= self.capacity

    def _split(self, segment: Segment, block: AllocatorBlock, size: int, pool: str) -> None:
        remainder = block.size - size
        keep = remainder > (ROUND if pool == "small" else SMALL_REQUEST)
        if keep:
            index = segment.blocks.index(block)
            segment.blocks.insert(index + 1, AllocatorBlock(block.offset + size, remainder))
            block.size = size

    def free(self, handle: int) -> None:
        """Free a live block: it stays reserved and merges with free neighbours."""
        if handle not in self._where:
            raise KeyError(f"no live allocation with handle {handle}")
        segment, block = self._where.pop(handle)
        block.allocated, block.handle = False, None
        merged: list[AllocatorBlock] = []
        for b in segment.blocks:
            if merged and not merged[-1].allocated and not b.allocated:
                merged[-1].size += b.size
            else:
                merged.append(b)
        segment.blocks = merged

    def empty_cache(self) -> None:
        """Release every segment that holds no live block (``torch.cuda.empty_cache``)."""
        self.segments = [s for s in self.segments if any(b.allocated for b in s.blocks)]

    def _oom_text(self, size: int) -> str:
        allocated, reserved = self.allocated_bytes, self.reserved_bytes
        return (
            f"allocator model: out of memory. Tried to allocate {format_bytes(size)}. The device has a total "
            f"capacity of {format_bytes(self.capacity)} of which {format_bytes(self.capacity - reserved)} is free. "
            f"Of the allocated memory {format_bytes(allocated)} is allocated by PyTorch, and "
            f"{format_bytes(reserved - allocated)} is reserved by PyTorch but unallocated."
        )

    def snapshot(self) -> list[dict[str, Any]]:
        """Segments in the shape of ``torch.cuda.memory._snapshot()["segments"]``."""
        return [
            {
                "total_size": s.size,
                "segment_type": s.pool,
                "blocks": [
                    {"size": b.size, "state": "active_allocated" if b.allocated else "inactive"} for b in s.blocks
                ],
            }
            for s in self.segments
        ]
