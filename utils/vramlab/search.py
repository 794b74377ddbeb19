"""Find the largest batch that fits: double until it does not, then bisect.

:func:`largest_passing` is the search on any yes/no test (the formula's ``vramlab fit`` uses
it, without torch); :func:`largest_batch` runs it on real steps that may run out of memory.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class BatchSearch:
    """The result of :func:`largest_batch`: the largest batch that ran, and every try."""

    largest: int
    tried: dict[int, bool] = field(default_factory=dict)  # batch -> ran without OOM

    def __str__(self) -> str:
        tries = ", ".join(f"{b}:{'ok' if ok else 'OOM'}" for b, ok in sorted(self.tried.items()))
        return f"largest batch that fits: {self.largest} (tried {tries})"


def _runs(step: Callable[[int], object], batch: int) -> bool:
    import torch

    try:
        step(batch)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def largest_passing(ok: Callable[[int], bool], start: int = 1, limit: int = 1 << 16) -> BatchSearch:
    """The largest batch from ``start`` to ``limit`` for which ``ok(batch)`` is true, assuming
    that once a batch fails every larger one does: double from ``start`` until a batch fails
    (or ``limit`` is passed), then bisect between the last success and the first failure.
    ``largest`` is 0 when even ``start`` fails."""
    if isinstance(start, bool) or not isinstance(start, int) or start < 1:
        raise ValueError(f"start must be a positive integer batch size, got {start!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < start:
        raise ValueError(f"limit must be an integer >= start ({start}), got {limit!r}")
    tried: dict[int, bool] = {}
    good, bad, batch = 0, None, start
    while batch <= limit:
        tried[batch] = ok(batch)
        if not tried[batch]:
            bad = batch
            break
        good, batch = batch, batch * 2
    if bad is None:
        return BatchSearch(good, tried)
    low, high = good, bad  # low fits (or is 0), high does not
    while high - low > 1:
        middle = (low + high) // 2
        tried[middle] = ok(middle)
        low, high = (middle, high) if tried[middle] else (low, middle)
    return BatchSearch(low, tried)


def largest_batch(step: Callable[[int], object], start: int = 1, limit: int = 1 << 16) -> BatchSearch:
    """Largest batch size for which ``step(batch)`` raises no ``torch.OutOfMemoryError``.

    ``step`` must run one full step at that batch size inside a memory budget (a real GPU,
    or :func:`vramlab.budget` on a CPU) and keep no reference to what it allocated. The
    search is :func:`largest_passing`: doubling from ``start`` until a batch fails (or
    ``limit`` is reached), then bisecting. Returns 0 in ``largest`` when even ``start`` does
    not fit.
    """
    return largest_passing(lambda batch: _runs(step, batch), start, limit)
