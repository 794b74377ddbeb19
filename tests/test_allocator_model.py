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


def test_expandable_segments_pack_blocks_and_map_20_mib_granules():
    a = CachingAllocatorModel(400 * MiB, expandable_segments=True)
    a.malloc(9 * MiB)
    assert a.reserved_bytes == 20 * MiB  # one large-pool granule, not 9 MiB of 2 MiB pages
    a.malloc(9 * MiB)
    a.malloc(9 * MiB)  # packed after the first two: the second granule is mapped
    assert a.reserved_bytes == 40 * MiB and a.allocated_bytes == 27 * MiB
    a.malloc(1000)
    assert a.reserved_bytes == 42 * MiB  # the small pool maps 2 MiB granules


def test_expandable_segments_cannot_give_back_holes_inside_granules():
    """Holes that share a granule with a live block stay mapped (the old 2 MiB-page model
    released them and let this request fit)."""
    a = CachingAllocatorModel(210 * MiB, expandable_segments=True)
    fragment(a)
    held = a.reserved_bytes
    a.empty_cache()
    assert a.reserved_bytes == held == 200 * MiB  # 181 MiB of packed blocks: ten granules
    with pytest.raises(torch.OutOfMemoryError):
        a.malloc(40 * MiB)


def test_expandable_segments_unmap_whole_granule_holes_and_map_at_the_end():
    a = CachingAllocatorModel(210 * MiB, expandable_segments=True)
    a.free(a.malloc(120 * MiB))
    parts = [a.malloc(20 * MiB) for _ in range(6)]
    assert a.reserved_bytes == 120 * MiB  # carved from the cached 120 MiB, nothing new mapped
    for h in parts[::2]:
        a.free(h)
    a.malloc(80 * MiB)
    assert a.reserved_bytes == 200 * MiB
    a.malloc(40 * MiB)  # 240 > 210: the three free granules are unmapped, then 40 MiB mapped
    assert a.reserved_bytes == 180 * MiB and a.allocated_bytes == 180 * MiB
    assert [s["total_size"] for s in a.snapshot()] == [20 * MiB, 20 * MiB, 140 * MiB]


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


def test_fragmentation_scenarios_on_the_model():
    from vramlab import fragmentation

    whole = [fragmentation.run_model("20 MiB holes", expandable=e) for e in (False, True)]
    assert [r.request_fit for r in whole] == [False, True]
    assert whole[0].reserved - whole[0].allocated == 60 * MiB  # free, in three 20 MiB holes
    assert whole[1].reserved_after == 180 * MiB < whole[1].reserved  # the holes were given back
    inside = [fragmentation.run_model("9 MiB holes", expandable=e) for e in (False, True)]
    assert [r.request_fit for r in inside] == [False, False]
    assert min(r.reserved - r.allocated for r in inside) > inside[0].request  # free, but unusable
    with pytest.raises(ValueError, match="choose one of"):
        fragmentation.run_model("no such scenario")


def test_real_allocator_run_needs_a_gpu_and_a_known_scenario(monkeypatch):
    from vramlab import fragmentation
    from vramlab.device import NoGPUError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(NoGPUError, match="needs a CUDA GPU"):
        fragmentation.run_cuda("20 MiB holes")


def test_cuda_main_replays_the_steps_with_tensors():
    """The GPU path frees a tensor by dropping it: replay the steps with CPU tensors and count."""
    from vramlab import fragmentation

    alive: list[int] = []
    live = fragmentation.replay(
        fragmentation.SCENARIOS["20 MiB holes"].steps,
        lambda n: alive.append(n) or torch.empty(0),
        lambda t: None,
    )
    assert sorted(live) == ["filler", "p1", "p3", "p5"] and sum(alive) == 120 * MiB + 6 * 20 * MiB + 80 * MiB
