import time

import pytest

from vramlab.timing import median_seconds


def test_median_of_repeats_and_warmup_not_timed():
    calls = []

    def work():
        calls.append(1)
        time.sleep(0.01 if len(calls) > 1 else 0.2)  # a slow first call, as a warm-up would be

    seconds = median_seconds(work, repeats=3, warmup=1)
    assert len(calls) == 4 and 0.009 < seconds < 0.1


def test_bad_arguments():
    with pytest.raises(ValueError):
        median_seconds(lambda: None, repeats=0)
