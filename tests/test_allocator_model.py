import pytest
import torch

from vramlab.allocator_model import CachingAllocatorModel, round_request
from vramlab.units import MiB


def test_rounding_and_pools():
    assert round_request(1) == 512 and round_request(513) == 1024
    a = CachingAllocatorModel(100 * MiB)
    a.malloc(1000)
    assert a.reserved_bytes == 2 * MiB and a.allocated_bytes == 1024  # one small segment
    a.malloc(5 * MiB)
    assert a.reserved_bytes == 22 * MiB  # plus a 20 MiB large segment
    a.malloc(30 * MiB)
    assert a.reserved_bytes == 52 * MiB  # a segment of its own, rounded to 2 MiB


def test_free_keeps_reserve_until_empty_cache():
    a = CachingAllocatorModel(100 * MiB)
    h = a.malloc(5 * MiB)
    a.free(h)
    assert a.allocated_bytes == 0 and a.reserved_bytes == 20 * MiB
    again = a.malloc(5 * MiB)  # reused from the cache, no new segment
    assert a.reserved_bytes == 20 * MiB
    a.free(again)
    a.empty_cache()
    assert a.reserved_bytes == 0


def fragment(a):
    """Two 9 MiB blocks per 20 MiB segment, then free the first of each pair."""
    first = []
    for _ in range(10):
        first.append(a.malloc(9 * MiB))
        a.malloc(9 * MiB)  # best fit: the rest of the same segment
    for h in first:
        a.free(h)


def test_fragmentation_oom_with_free_memory_reserved():
    a = CachingAllocatorModel(200 * MiB)
    fragment(a)
    assert a.allocated_bytes == 90 * MiB and a.reserved_bytes == 200 * MiB
    with pytest.raises(torch.OutOfMemoryError, match="110.00 MiB is reserved by PyTorch but unallocated"):
        a.malloc(10 * MiB)


def test_expandable_segments_avoid_it():
    a = CachingAllocatorModel(200 * MiB, expandable_segments=True)
    fragment(a)
    a.malloc(10 * MiB)
    assert a.allocated_bytes == 100 * MiB


def test_oom_releases_free_segments_then_retries():
    a = CachingAllocatorModel(40 * MiB)
    h = a.malloc(15 * MiB)  # over 10 MiB: a segment of its own, 16 MiB
    a.malloc(15 * MiB)
    a.free(h)
    assert a.reserved_bytes == 32 * MiB
    a.malloc(20 * MiB)  # no cached block fits; 32 + 20 > 40, so the free segment is released first
    assert a.reserved_bytes == 36 * MiB


def test_snapshot_shape():
    a = CachingAllocatorModel(100 * MiB)
    a.malloc(5 * MiB)
    seg = a.snapshot()[0]
    assert seg["total_size"] == 20 * MiB
    assert [b["state"] for b in seg["blocks"]] == ["active_allocated", "inactive"]


def test_bad_use():
    with pytest.raises(ValueError):
        CachingAllocatorModel(0)
    with pytest.raises(KeyError):
        CachingAllocatorModel(MiB).free(42)
