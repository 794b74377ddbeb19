"""Time a piece of work the same way everywhere: synchronise the GPU, take a median."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from .device import has_cuda


def now(device: str | torch.device = "cpu") -> float:
    """``time.perf_counter()`` after ``device``'s queued kernels have finished (CUDA runs them
    asynchronously, so an unsynchronised clock read times the launch, not the work)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def median_seconds(fn: Callable[[], object], repeats: int = 3, warmup: int = 0) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs, after ``warmup`` untimed runs.

    On a GPU each run ends with ``torch.cuda.synchronize()``, so queued kernels are counted.
    Timings vary between runs and machines: report them, do not assert exact values.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be at least 1 and warmup at least 0")
    sync = torch.cuda.synchronize if has_cuda() else (lambda: None)
    for _ in range(warmup):
        fn()
        sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
