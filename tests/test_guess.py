"""reveal: the learner's guess next to the measurement."""

import numpy as np
import pytest

from vramlab.guess import reveal
from vramlab.units import MiB


def test_a_byte_guess_as_a_number_or_a_string(capsys):
    assert reveal(4 * MiB, 4 * MiB) == "you predicted 4.00 MiB, measured 4.00 MiB: off by 0.0%"
    assert reveal("2 MiB", 4 * MiB, what="logits").endswith("off by 50.0%")
    assert reveal(np.int64(3 * MiB), 4 * MiB).endswith("off by 25.0%")
    assert "logits: you predicted" in capsys.readouterr().out


def test_no_guess_shows_the_measurement_and_asks_for_one():
    assert "Write your prediction in my_guess first" in reveal(None, 1024)


def test_ratios_counts_and_choices():
    assert reveal(2, 2.5, unit="ratio") == "you predicted 2x, measured 2.5x: off by 20.0%"
    assert reveal(1000, 1000, unit="count").endswith("off by 0.0%")
    assert reveal(0.5, 0.25, unit="fraction") == "you predicted 50.0%, measured 25.0%: off by 100.0%"
    assert reveal({"allocated"}, {"allocated"}, unit="choice").endswith("right")
    assert reveal({"reserved"}, {"allocated"}, unit="choice").endswith("not what happened")


@pytest.mark.parametrize(
    "guess, unit, words",
    [("16G", "bytes", "ambiguous|cannot read"), ("lots", "ratio", "should be a number"), ([1], "bytes", "number")],
)
def test_unreadable_guesses_say_what_to_write(guess, unit, words):
    with pytest.raises((ValueError, TypeError), match=words):
        reveal(guess, 10, unit=unit)


def test_unknown_unit_is_refused():
    with pytest.raises(ValueError, match="unit must be one of"):
        reveal(1, 1, unit="MiB")
