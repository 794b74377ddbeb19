"""A small *model* of PyTorch's CUDA caching allocator, to show fragmentation on a CPU.

This is a simulation, not a measurement: on a GPU, use the real allocator's
``torch.cuda.memory._snapshot()``. It follows the rules of the real one
(c10/cuda/CUDACachingAllocator.cpp; PyTorch docs, *CUDA semantics, memory management*) in
simplified form: one device, one stream, no events, no CUDA-graph pools, no
``max_split_size_mb`` or garbage-collection threshold.

Default segments:

- requests are rounded up to a multiple of 512 bytes;
- requests of at most 1 MiB come from 2 MiB segments (the small pool); larger ones from
  20 MiB segments if under 10 MiB, else from a segment of their own size rounded up to 2 MiB;
- the smallest free block that fits is used and split when the remainder is worth keeping
  (more than 512 bytes in the small pool, more than 1 MiB in the large);
- a freed block stays reserved (cached) and merges with free neighbours in its segment;
- when a new segment would exceed the device, fully free cached segments are released and
  the request retried, then it fails with an out-of-memory error.

Expandable segments (``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``): each pool is one
long range of virtual addresses, backed by physical memory in *granules*: 20 MiB in the
large pool, 2 MiB in the small one. Blocks are packed one after another; a request that no
mapped free block takes maps more granules, starting at the lowest free address with room
(reusing mapped free bytes just before it). Freed blocks stay mapped (cached). When mapping
would exceed the device, every granule that lies wholly inside free blocks is unmapped and
the request retried: a hole smaller than a granule, or one that shares a granule with a
live block, is never given back.
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
GRANULE = {"small": SMALL_SEGMENT, "large": LARGE_SEGMENT}  # expandable segments map memory in these


@dataclass
class AllocatorBlock:
    """A range of a segment: ``size`` bytes at ``offset``, live (allocated) or cached (free)."""

    offset: int
    size: int
    allocated: bool = False
    handle: int | None = None

    @property
    def end(self) -> int:
        """The first byte after the block."""
        return self.offset + self.size


@dataclass
class Segment:
    """A range of addresses split into blocks: one cudaMalloc'd segment, or one pool's
    expandable address range (``mapped`` holds the indices of its backed granules)."""

    size: int
    pool: str
    blocks: list[AllocatorBlock] = field(default_factory=list)
    mapped: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not self.blocks:
            self.blocks = [AllocatorBlock(0, self.size)]


def round_request(nbytes: int) -> int:
    """Round a request up to the allocator's 512-byte granularity."""
    if nbytes < 0:
        raise ValueError("a request must be 0 or more bytes")
    return max(ROUND, -(-nbytes // ROUND) * ROUND)


def fresh_block_bytes(nbytes: int) -> int:
    """Bytes CUDA's ``memory_allocated`` counts for one request of ``nbytes`` served from an empty
    cache, by the rules above, not the 512-byte rounding alone: 4 B takes 512 B; 5 MiB is split
    from a 20 MiB segment; 125 MiB gets a 126 MiB segment whose 1 MiB remainder is not split, so
    it counts as 126 MiB. A request that reuses a cached block can count up to 1 MiB more."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes must be a whole number of bytes >= 0, got {nbytes!r}")
    model = CachingAllocatorModel(capacity=1 << 62)
    model.malloc(nbytes)
    return model.allocated_bytes


def _granules(start: int, end: int, granule: int) -> range:
    """Indices of the granules that the bytes ``[start, end)`` touch."""
    return range(start // granule, -(-end // granule)) if end > start else range(0)


class CachingAllocatorModel:
    """Simulate allocations and frees against a device of ``capacity`` bytes."""

    def __init__(self, capacity: int, expandable_segments: bool = False) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be more than 0 bytes")
        self.capacity = capacity
        self.expandable = expandable_segments
        self.segments: list[Segment] = []
        if expandable_segments:  # one address range per pool, 9/8 of the device as in PyTorch
            for pool, granule in GRANULE.items():
                span = -(-(capacity + capacity // 8) // granule) * granule
                self.segments.append(Segment(span, pool))
        self._handles = itertools.count(1)
        self._where: dict[int, tuple[Segment, AllocatorBlock]] = {}

    # -- statistics ---------------------------------------------------------------------
    @property
    def allocated_bytes(self) -> int:
        """Bytes of live blocks (what ``memory_allocated`` reports)."""
        return sum(b.size for s in self.segments for b in s.blocks if b.allocated)

    @property
    def reserved_bytes(self) -> int:
        """Bytes held from the device (``memory_reserved``): whole segments, or mapped
        granules with expandable segments."""
        if self.expandable:
            return sum(len(s.mapped) * GRANULE[s.pool] for s in self.segments)
        return sum(s.size for s in self.segments)

    # -- allocation ---------------------------------------------------------------------
    def malloc(self, nbytes: int) -> int:
        """Allocate ``nbytes``; return a handle for :meth:`free`. Raises ``torch.OutOfMemoryError``."""
        size = round_request(nbytes)
        pool = "small" if size <= SMALL_REQUEST else "large"
        found = self._best_fit(size, pool) or self._grow(size, pool)
        if found is None:
            self.empty_cache()  # the real allocator releases cached memory and retries
            found = self._best_fit(size, pool) or self._grow(size, pool)
        if found is None:
            raise torch.OutOfMemoryError(self._oom_text(size))
        segment, start = found
        return self._take(segment, start, size, pool)

    def _free_ranges(self, segment: Segment) -> list[tuple[int, int]]:
        """Free ``(start, end)`` ranges of a segment that are backed by memory: whole free
        blocks, or with expandable segments the mapped runs inside them."""
        free = [(b.offset, b.end) for b in segment.blocks if not b.allocated]
        if not self.expandable:
            return free
        granule, runs = GRANULE[segment.pool], []
        for start, end in free:
            run_start = None
            for g in _granules(start, end, granule):
                lo, hi = max(start, g * granule), min(end, (g + 1) * granule)
                if g in segment.mapped:
                    run_start = lo if run_start is None else run_start
                    run_end = hi
                elif run_start is not None:
                    runs.append((run_start, run_end))
                    run_start = None
            if run_start is not None:
                runs.append((run_start, run_end))
        return runs

    def _best_fit(self, size: int, pool: str) -> tuple[Segment, int] | None:
        """The smallest backed free range that holds ``size`` bytes (first segment, lowest
        address on a tie)."""
        candidates = [
            (end - start, i, start, s)
            for i, s in enumerate(self.segments)
            if s.pool == pool
            for start, end in self._free_ranges(s)
            if end - start >= size
        ]
        if not candidates:
            return None
        _, _, start, segment = min(candidates, key=lambda c: c[:3])
        return segment, start

    def _grow(self, size: int, pool: str) -> tuple[Segment, int] | None:
        """Get new memory for ``size`` bytes, or ``None`` if the device has no room."""
        return self._map(size, pool) if self.expandable else self._new_segment(size, pool)

    def _segment_size(self, size: int, pool: str) -> int:
        if pool == "small":
            return SMALL_SEGMENT
        return LARGE_SEGMENT if size < LARGE_CUTOFF else -(-size // SMALL_SEGMENT) * SMALL_SEGMENT

    def _new_segment(self, size: int, pool: str) -> tuple[Segment, int] | None:
        seg_size = self._segment_size(size, pool)
        if self.reserved_bytes + seg_size > self.capacity:
            return None
        self.segments.append(Segment(seg_size, pool))
        return self.segments[-1], 0

    def _map(self, size: int, pool: str) -> tuple[Segment, int] | None:
        """Expandable segments: at the lowest free address whose free run holds ``size``
        bytes and is not wholly mapped, map the missing granules."""
        segment = next(s for s in self.segments if s.pool == pool)
        granule = GRANULE[pool]
        for block in segment.blocks:
            if block.allocated or block.size < size:
                continue
            missing = [g for g in _granules(block.offset, block.offset + size, granule) if g not in segment.mapped]
            if not missing:
                continue  # wholly mapped: _best_fit has already declined it
            if self.reserved_bytes + len(missing) * granule > self.capacity:
                return None  # the real allocator does not try a later address either
            segment.mapped.update(missing)
            return segment, block.offset
        return None

    def _take(self, segment: Segment, start: int, size: int, pool: str) -> int:
        """Carve ``size`` bytes at ``start`` out of the free block that holds them; a backed
        remainder too small to keep (at most 512 bytes small, 1 MiB large) goes with them."""
        index, block = next((i, b) for i, b in enumerate(segment.blocks) if b.offset <= start < b.end)
        backed_end = next(end for lo, end in self._free_ranges(segment) if lo <= start < end)
        remainder = backed_end - start - size
        taken_size = size + (remainder if remainder <= (ROUND if pool == "small" else SMALL_REQUEST) else 0)
        taken = AllocatorBlock(start, taken_size, True, next(self._handles))
        pieces = [AllocatorBlock(block.offset, start - block.offset)] if start > block.offset else []
        pieces.append(taken)
        if taken.end < block.end:
            pieces.append(AllocatorBlock(taken.end, block.end - taken.end))
        segment.blocks[index : index + 1] = pieces
        self._where[taken.handle] = (segment, taken)
        return taken.handle

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
        """Give cached memory back (``torch.cuda.empty_cache``): every segment that holds no
        live block, or with expandable segments every granule wholly inside free blocks."""
        if not self.expandable:
            self.segments = [s for s in self.segments if any(b.allocated for b in s.blocks)]
            return
        for s in self.segments:
            live = {g for b in s.blocks if b.allocated for g in _granules(b.offset, b.end, GRANULE[s.pool])}
            s.mapped &= live

    def _oom_text(self, size: int) -> str:
        allocated, reserved = self.allocated_bytes, self.reserved_bytes
        return (
            f"allocator model: out of memory. Tried to allocate {format_bytes(size)}. The device has a total "
            f"capacity of {format_bytes(self.capacity)} of which {format_bytes(self.capacity - reserved)} is free. "
            f"Of the allocated memory {format_bytes(allocated)} is allocated by PyTorch, and "
            f"{format_bytes(reserved - allocated)} is reserved by PyTorch but unallocated."
        )

    def snapshot(self) -> list[dict[str, Any]]:
        """Segments in the shape of ``torch.cuda.memory._snapshot()["segments"]``; with
        expandable segments, one per run of mapped granules, as PyTorch reports them."""
        if not self.expandable:
            return [self._segment_info(s.size, s.pool, s.blocks) for s in self.segments]
        out = []
        for s in self.segments:
            granule = GRANULE[s.pool]
            for first, last in _runs(sorted(s.mapped)):
                lo, hi = first * granule, (last + 1) * granule
                clipped = [
                    AllocatorBlock(max(b.offset, lo), min(b.end, hi) - max(b.offset, lo), b.allocated)
                    for b in s.blocks
                    if b.offset < hi and b.end > lo
                ]
                out.append(self._segment_info(hi - lo, s.pool, clipped))
        return out

    @staticmethod
    def _segment_info(size: int, pool: str, blocks: list[AllocatorBlock]) -> dict[str, Any]:
        return {
            "total_size": size,
            "segment_type": pool,
            "blocks": [{"size": b.size, "state": "active_allocated" if b.allocated else "inactive"} for b in blocks],
        }


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs ``(first, last)`` in a sorted list of integers."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs
