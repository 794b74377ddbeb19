"""The one shape of every memory result: a measurement, a dry run or a formula estimate.

Each has ``peak_bytes`` (int, bytes), ``breakdown`` (bytes by role at the peak), ``source``
(``cuda``, ``cpu-tracked``, ``dry-run`` or ``formula``), ``setup`` (the :class:`Setup` it
models, or None for a plain measured block) and ``to_json()``.
"""

from __future__ import annotations

from typing import Any, Protocol

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
