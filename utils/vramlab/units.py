"""Parse and format memory sizes.

Sizes inside vramlab are always plain ``int`` numbers of **bytes**. Displays use binary
units (KiB = 1024 B, MiB = 1024**2 B, GiB = 1024**3 B) and say so. Parsing accepts both
binary ("16GiB") and decimal ("16GB" = 16 * 10**9 B) strings and never confuses them: a GPU
sold as "16 GB" holds 16e9 bytes, which is 14.9 GiB.
"""

from __future__ import annotations

import math
import numbers
import re
from decimal import ROUND_HALF_EVEN, Decimal

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4

_BINARY = {"kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB}
_DECIMAL = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_PATTERN = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


MAX_BYTES = 2**63
"""No tensor, device or budget can hold this many bytes (8 EiB): larger sizes are refused."""


def parse_bytes(size: int | float | str) -> int:
    """Return ``size`` as a whole number of bytes.

    Accepts a non-negative whole number of bytes, or a string such as ``"16GiB"``, ``"1.5 GiB"``,
    ``"512MiB"``, ``"16GB"`` (decimal: 16 * 10**9 bytes) or ``"4096 B"``. Unit names are
    case-insensitive. A bare prefix such as ``"16G"`` is refused because it is ambiguous, and so
    is a fraction of a byte without a unit (``"1.5"``). Sizes of 2**63 bytes or more are refused.

    Raises:
        ValueError: with a message that says how to write the size.
    """
    if isinstance(size, bool):
        raise TypeError("a size must be a number of bytes or a string like '16GiB', not a bool")
    if isinstance(size, numbers.Integral):
        nbytes = Decimal(int(size))
    elif isinstance(size, float):
        if math.isnan(size) or math.isinf(size):
            raise ValueError(f"size {size!r} is not a finite number of bytes")
        if not size.is_integer():
            raise ValueError(
                f"size {size!r} is not a whole number of bytes; a bare number means bytes. "
                f"Did you mean '{size} GiB'? Write the unit in a string."
            )
        nbytes = Decimal(size)
    elif isinstance(size, str):
        match = _PATTERN.match(size)
        if not match:
            raise ValueError(
                f"cannot read the size {size!r}: write a number and a unit, e.g. '16GiB' "
                "(binary, 16 * 1024**3 bytes) or '16GB' (decimal, 16 * 10**9 bytes)"
            )
        number, unit = match.group(1), match.group(2).lower()
        factor = _unit_factor(unit, size)
        nbytes = Decimal(number) * factor
        if factor == 1 and nbytes != nbytes.to_integral_value():
            raise ValueError(
                f"size {size!r} is not a whole number of bytes; a number without a unit means bytes. "
                f"Did you mean '{number} GiB'?"
            )
    else:
        raise TypeError(f"a size must be an int number of bytes or a string like '16GiB', got {type(size).__name__}")
    if nbytes < 0:
        raise ValueError(f"size {size!r} is negative: a memory size must be 0 or more bytes")
    if nbytes >= MAX_BYTES:
        raise ValueError(f"size {str(size)[:40]!r} is 2**63 bytes (8 EiB) or more: no memory that large exists")
    return int(nbytes.to_integral_value(ROUND_HALF_EVEN))


def _unit_factor(unit: str, original: str) -> int:
    if unit in ("", "b", "byte", "bytes"):
        return 1
    if unit in _BINARY:
        return _BINARY[unit]
    if unit in _DECIMAL:
        return _DECIMAL[unit]
    if unit in ("k", "m", "g", "t", "ki", "mi", "gi", "ti"):
        raise ValueError(
            f"the unit in {original!r} is ambiguous: write '{unit[0].upper()}iB' for binary "
            f"(1024-based) or '{unit[0].upper()}B' for decimal (1000-based) bytes"
        )
    raise ValueError(
        f"unknown unit {unit!r} in {original!r}: use B, KiB, MiB, GiB, TiB (binary) or KB, MB, GB, TB (decimal)"
    )


def format_bytes(nbytes: int | float, precision: int = 2) -> str:
    """Format a number of bytes in binary units, e.g. ``format_bytes(3 * 2**30) == '3.00 GiB'``.

    Negative numbers (differences between two measurements) keep their sign.
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, (numbers.Integral, float)):
        raise TypeError(f"format_bytes needs a number of bytes, got {type(nbytes).__name__}")
    if isinstance(nbytes, float) and not math.isfinite(nbytes):
        raise ValueError(f"format_bytes needs a finite number of bytes, got {nbytes}")
    sign = "-" if nbytes < 0 else ""
    if abs(nbytes) >= 1024 * TiB:  # beyond a float's comfort: exact integer arithmetic, in TiB
        return f"{sign}{Decimal(abs(int(nbytes))) / TiB:.{precision}f} TiB"
    size = abs(float(nbytes))
    for unit, factor in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= factor:
            return f"{sign}{size / factor:.{precision}f} {unit}"
    return f"{sign}{int(size)} B"
