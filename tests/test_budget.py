import gc
import re

import pytest
import torch
from torch import nn

from vramlab import budget, largest_batch, measure
from vramlab.units import GiB, MiB


def test_budget_raises_a_real_oom_with_cudas_fields():
    x = torch.zeros(1000)
    with pytest.raises(torch.OutOfMemoryError) as info:
        with budget("1 MiB", x):
            torch.empty(2 * 2**20 // 4)  # 2 MiB
    text = str(info.value)
    assert "Tried to allocate 2.00 MiB" in text
    assert "total capacity of 1.00 MiB" in text
    assert re.search(r"of which [\d.]+ KiB is free", text)
    assert "3.91 KiB is allocated by PyTorch" in text


def test_refused_before_it_allocates():
    # 400 GB would kill this machine if it were really allocated; the budget refuses it first.
    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate 372.53 GiB"):
        with budget("1 GiB"):
            torch.empty(10**11)


def test_memory_returns_to_baseline_after_oom():
    model = nn.Linear(256, 256)
    with measure(model) as outer:
        for _ in range(3):
            try:
                with budget("1 MiB", model):
                    model(torch.randn(512, 256))  # 512 KiB of input + 512 KiB output: too much
            except torch.OutOfMemoryError:
                pass
        gc.collect()
    assert outer.end_bytes == outer.baseline_bytes


def test_block_under_budget_runs_and_reports_peak():
    with budget("1 MiB") as m:
        a = torch.zeros(1000)
    assert m.peak_bytes == 4000
    del a


def test_already_over_budget():
    big = torch.zeros(2**20)
    with pytest.raises(torch.OutOfMemoryError, match="before the block starts"):
        with budget("1 MiB", big):
            pass


@pytest.mark.parametrize("bad", ["16G", "0", "-1 GiB", "sixteen"])
def test_bad_budget_strings(bad):
    with pytest.raises(ValueError):
        budget(bad)


def test_largest_batch_finds_the_boundary():
    row = 1000 * 4  # bytes per sample of a (batch, 1000) fp32 tensor

    def step(batch):
        with budget(f"{100 * row} B"):
            torch.zeros(batch, 1000)

    result = largest_batch(step)
    assert result.largest == 100
    assert result.tried[100] and not result.tried[101]


def test_largest_batch_zero_when_nothing_fits():
    def step(batch):
        with budget("1 KiB"):
            torch.zeros(batch, 1000)

    assert largest_batch(step).largest == 0


def test_largest_batch_validates_input():
    with pytest.raises(ValueError):
        largest_batch(lambda b: None, start=0)
    with pytest.raises(ValueError):
        largest_batch(lambda b: None, start=8, limit=4)


def test_a_fractional_number_of_bytes_is_refused_with_a_hint():
    with pytest.raises(ValueError, match="whole number of bytes.*'1.5 GiB'"):
        budget(1.5)
    assert budget(2.0).limit == 2


def test_the_budget_message_round_trips_through_the_parser():
    from vramlab.oom import format_oom_message, parse_oom_message

    message = format_oom_message(tried=32 * MiB, capacity=2 * GiB, in_use=1536 * MiB)
    assert parse_oom_message(message) == {
        "tried": 32 * MiB,
        "total": 2 * GiB,
        "free": 512 * MiB,
        "allocated": 1536 * MiB,
        "reserved_unallocated": 0,
    }
    odd = parse_oom_message(format_oom_message(tried=12_345_678, capacity=98_765_432, in_use=55_555_555))
    for name, want in (("tried", 12_345_678), ("total", 98_765_432), ("allocated", 55_555_555)):
        assert abs(odd[name] - want) <= 0.005 * MiB  # the message prints 2 decimals of MiB


def test_the_raised_message_is_the_one_oom_writes():
    from vramlab.oom import parse_oom_message

    with pytest.raises(torch.OutOfMemoryError) as err:
        with budget("1 MiB"):
            torch.empty(2 * MiB, dtype=torch.uint8)
    assert parse_oom_message(str(err.value)) == {
        "tried": 2 * MiB,
        "total": MiB,
        "free": MiB,
        "allocated": 0,
        "reserved_unallocated": 0,
    }


def test_other_threads_are_not_seen_as_the_docstring_says():
    import threading

    made = {}
    with budget("1 KiB") as m:
        worker = threading.Thread(target=lambda: made.setdefault("x", torch.zeros(10**6)))
        worker.start()
        worker.join()
    assert made["x"].nbytes == 4 * 10**6 and m.peak_bytes == 0
    assert "thread-local" in budget.__doc__ and "not refused" in budget.__doc__


def test_headline_drops_only_the_budgets_advice():
    from vramlab.oom import format_oom_message, headline

    message = format_oom_message(tried=MiB, capacity=2 * MiB, in_use=2 * MiB)
    assert headline(message).endswith("(the CPU tracker has no cache, so there is no fragmentation)")
    assert "Free tensors" not in headline(message) and headline(message) in message
    cuda = "CUDA out of memory. Tried to allocate 2.00 MiB. GPU 0 has a total capacity of 14.74 GiB"
    assert headline(cuda) == cuda  # a message from elsewhere comes back whole
