"""The learner's own prediction, compared with the measurement that follows it.

A chapter's "Predict" step ends in a cell such as ``my_guess = None  # bytes, e.g. "256 MiB"``;
after the measurement, ``reveal(my_guess, measured)`` prints the guess, the measurement and
the gap. ``None`` (no guess written) prints the measurement and a reminder, so a notebook run
top to bottom, as CI runs it, still works.
"""

from __future__ import annotations

from typing import Any

from .checks import as_number, relative_gap
from .units import format_bytes, parse_bytes

UNITS = ("bytes", "ratio", "fraction", "count", "choice")


def _as_bytes(guess: Any) -> float:
    if isinstance(guess, str):
        return float(parse_bytes(guess))
    number = as_number(guess)
    if number is None:
        raise ValueError(f"my_guess should be a number of bytes or a string like '256 MiB', got {guess!r}")
    return number


def _show(value: Any, unit: str) -> str:
    if unit == "bytes":
        return format_bytes(value)
    if unit == "ratio":
        return f"{value:.3g}x"
    if unit == "fraction":
        return f"{value:.1%}"
    if unit == "count":
        return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.3g}"
    return repr(value)


def reveal(guess: Any, measured: Any, *, unit: str = "bytes", what: str = "") -> str:
    """Print and return one line: the guess, the measurement and how far apart they are.

    ``unit``: "bytes" (a guess may be a string such as "16 GiB"), "ratio", "fraction" (0 to 1,
    shown as a percentage), "count", or "choice" (any value compared for equality, e.g. a set
    of names).
    """
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    label = f"{what}: " if what else ""
    if guess is None:
        line = f"{label}measured {_show(measured, unit)}. (Write your prediction in my_guess first, then run again.)"
    elif unit == "choice":
        verdict = "right" if guess == measured else "not what happened"
        line = f"{label}you predicted {guess!r}, measured {measured!r}: {verdict}"
    else:
        number = _as_bytes(guess) if unit == "bytes" else as_number(guess)
        if number is None:
            raise ValueError(f"my_guess should be a number for a {unit}, got {guess!r}")
        want = float(measured)
        gap = relative_gap(number, want)
        line = f"{label}you predicted {_show(number, unit)}, measured {_show(want, unit)}: off by {gap:.1%}"
    print(line)
    return line
