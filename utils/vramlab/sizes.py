"""One switch for problem sizes: small on a CPU (and in CI), as large as the card allows on a GPU.

Notebooks ask ``pick(cpu=..., gpu15=..., gpu24=..., gpu80=...)`` for each size they use. The
profile follows the card's real capacity, the total that ``torch.cuda.mem_get_info()``
reports (a Colab T4 reports 14.74 GiB, an L4 or A10G about 22 GiB, an H100 about 79 GiB):

========  ======================  =========================================
profile   card capacity at least   typical card
========  ======================  =========================================
cpu       (no GPU, or < 14.5 GiB)  laptop, CI; the small sizes, seconds per cell
gpu15     14.5 GiB                 T4 (Colab), V100-16GB
gpu24     21.5 GiB                 L4, A10G, RTX 3090/4090, A100-40GB
gpu80     78 GiB                   A100-80GB, H100, H200
========  ======================  =========================================

``tests/test_gpu_profiles.py`` dry-runs every size each chapter picks at each GPU profile and
checks that its peak, plus :data:`CONTEXT_ALLOWANCE` and :data:`ROUNDING_ALLOWANCE`, fits the
profile's capacity. The environment variable ``VRAMLAB_SIZE`` (one of :data:`PROFILES`)
overrides the choice, e.g. to run the small sizes on a GPU.
"""

from __future__ import annotations

import math
import os
from typing import TypeVar

import torch

from .device import has_cuda
from .hardware import fits
from .units import GiB, MiB

T = TypeVar("T")

GPU_PROFILES: dict[str, int] = {
    "gpu15": int(14.5 * GiB),
    "gpu24": int(21.5 * GiB),
    "gpu80": 78 * GiB,
}
"""Smallest card capacity (bytes, as ``mem_get_info`` reports the total) for each GPU profile."""

PROFILES = ("cpu", *GPU_PROFILES)

CONTEXT_ALLOWANCE = 1 * GiB
"""Bytes a profile leaves for what PyTorch's allocator does not hold: the CUDA context (a few
hundred MiB), cuBLAS/cuDNN workspaces and other processes' memory (chapter 04 measures yours)."""

ROUNDING_ALLOWANCE = 0.10
"""Fraction of a peak a profile adds for the caching allocator: 512-byte rounding, 2/20 MiB
segments and the fragmentation between them (chapter 05)."""

PINNED_HOST_LIMIT = 4 * GiB
"""Pinned host memory (``save_on_cpu(pin_memory=True)``) a GPU profile may use: a Colab host has
12.7 GB (11.8 GiB) and also holds the Python process, torch and the notebook's CPU copies."""


def fits_profile(peak_bytes: int, profile_name: str) -> bool:
    """Whether a peak of ``peak_bytes`` (live tensors) fits a card of ``profile_name``'s
    smallest capacity once the context and the allocator's rounding are added."""
    return fits(math.ceil(peak_bytes * (1 + ROUNDING_ALLOWANCE)), GPU_PROFILES[profile_name], CONTEXT_ALLOWANCE)


def card_capacity() -> int | None:
    """The GPU's total memory in bytes (``torch.cuda.mem_get_info``), or None without one."""
    if not has_cuda():
        return None
    return int(torch.cuda.mem_get_info()[1])


def profile_for(capacity: int | None) -> str:
    """The largest profile whose minimum capacity a card of ``capacity`` bytes meets."""
    if capacity is not None and capacity < 0:
        raise ValueError(f"a card's capacity is a number of bytes >= 0, got {capacity}")
    best = "cpu"
    for name, need in GPU_PROFILES.items():
        if capacity is not None and capacity >= need:
            best = name
    return best


def profile() -> str:
    """The active size profile, one of :data:`PROFILES`; ``VRAMLAB_SIZE`` overrides it."""
    forced = os.environ.get("VRAMLAB_SIZE", "").strip().lower()
    if forced:
        if forced not in PROFILES:
            raise ValueError(f"VRAMLAB_SIZE={forced!r} is not a size profile; use one of {', '.join(PROFILES)}")
        return forced
    return profile_for(card_capacity())


def describe_profile() -> str:
    """One line for a notebook: the profile and why it was chosen."""
    name, capacity = profile(), card_capacity()
    if os.environ.get("VRAMLAB_SIZE", "").strip():
        return f"size profile {name} (set by VRAMLAB_SIZE)"
    if capacity is None:
        return "size profile cpu (no GPU): small sizes, every cell runs in seconds"
    have = f"{capacity / GiB:.2f} GiB" if capacity >= GiB else f"{capacity // MiB} MiB"
    if name == "cpu":
        smallest = GPU_PROFILES["gpu15"] / GiB
        return f"size profile cpu: this GPU has {have}, less than the {smallest:.1f} GiB of the smallest GPU profile"
    return f"size profile {name}: this GPU has {have}"


def pick(cpu: T, gpu15: T, gpu24: T | None = None, gpu80: T | None = None) -> T:
    """The value for the active profile. ``gpu24`` defaults to ``gpu15`` and ``gpu80`` to
    ``gpu24``: a larger card runs at least the sizes of a smaller one."""
    values = {"cpu": cpu, "gpu15": gpu15}
    values["gpu24"] = gpu15 if gpu24 is None else gpu24
    values["gpu80"] = values["gpu24"] if gpu80 is None else gpu80
    return values[profile()]
