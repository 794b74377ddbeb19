"""One switch for problem sizes: small on a CPU (and in CI), real on a GPU.

Notebooks ask ``pick(cpu=..., gpu=...)`` for each size they use. The profile is "gpu" when a
CUDA device is present, else "cpu"; the environment variable ``VRAMLAB_SIZE`` (cpu or gpu)
overrides it, e.g. to try the small sizes on a GPU.
"""

from __future__ import annotations

import os
from typing import TypeVar

from .device import has_cuda

T = TypeVar("T")
SIZES = ("cpu", "gpu")


def profile() -> str:
    """The active size profile: "cpu" or "gpu"."""
    forced = os.environ.get("VRAMLAB_SIZE", "").strip().lower()
    if forced:
        if forced not in SIZES:
            raise ValueError(f"VRAMLAB_SIZE={forced!r} is not a size profile; use 'cpu' or 'gpu'")
        return forced
    return "gpu" if has_cuda() else "cpu"


def pick(cpu: T, gpu: T) -> T:
    """The value for the active profile: ``cpu`` on a CPU-only machine, ``gpu`` on a GPU."""
    return gpu if profile() == "gpu" else cpu
