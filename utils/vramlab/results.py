"""The one shape of every memory result: a measurement, a dry run or a formula estimate.

Each has ``peak_bytes`` (int, bytes), ``breakdown`` (bytes by role at the peak), ``source``
(``cuda``, ``cpu-tracked``, ``dry-run`` or ``formula``), ``setup`` (the :class:`Setup` it
models, or None for a plain measured block) and ``to_json()``.
"""

from __future__ import annotations

from typing import Any, Protocol

MAX_BYTES = 2**63 - 1
"""No tensor, and no device, holds more bytes than a signed 64-bit size can say (8 EiB)."""


class TooLarge(ValueError):
    """A set-up whose tensors could not exist (sizes past 2**63 bytes)."""


def too_large(what: str) -> TooLarge:
    """The error for a set-up whose tensors could not exist (sizes past 2**63 bytes)."""
    return TooLarge(
        f"{what} needs more than 2**63 bytes (8 EiB): no tensor that large can exist. Use a smaller batch or seq."
    )


ROLES: tuple[str, ...] = ("parameters", "gradients", "optimizer", "activations", "other")
SOURCES = ("cuda", "cpu-tracked", "dry-run", "formula")


class MemoryResult(Protocol):
    """What :class:`Measurement`, :class:`DryRunResult` and :class:`Estimate` share."""

    @property
    def peak_bytes(self) -> int: ...
    @property
    def breakdown(self) -> dict[str, int]: ...
    @property
    def source(self) -> str: ...
    @property
    def setup(self) -> Any: ...
    def to_json(self) -> dict[str, Any]: ...


def result_json(result: MemoryResult, **extra: Any) -> dict[str, Any]:
    """The common JSON fields of ``result``, then ``extra`` (plain ints and strings only)."""
    setup = result.setup
    return {
        "source": result.source,
        "setup": None if setup is None else setup.to_json(),
        "breakdown": {role: int(result.breakdown.get(role, 0)) for role in ROLES},
        "peak_bytes": int(result.peak_bytes),
        **extra,
    }
