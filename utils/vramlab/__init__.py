"""vramlab: measure where the memory of a model goes, on a GPU, on a CPU, or by dry run.

The names below are the course's vocabulary; each lives in a module named for what it does
(measure, budget, dryrun, estimate, gpt, timing, plots, ...), where the rest of the toolbox is.
Importing vramlab has no side effects and does not import torch: the formulas (``estimate``)
are loaded at once, everything that needs torch on first use (transformers only by a dry run,
matplotlib only by a plot).
"""

import importlib
import sys
import types
from typing import Any

from .estimate import Estimate, estimate, kv_cache_bytes, param_count, weight_bytes
from .models import REGISTRY, get_arch
from .setups import Setup
from .units import GiB, KiB, MiB, format_bytes, parse_bytes

# Loaded on first use, so that `vramlab estimate` and the formulas run without importing
# torch: name -> the submodule that defines it.
_LAZY = {
    "budget": "budget",
    "NoGPUError": "device",
    "device_info": "device",
    "has_cuda": "device",
    "require_cuda": "device",
    "DryRunResult": "dryrun",
    "dryrun": "dryrun",
    "GPTConfig": "gpt",
    "TinyGPT": "gpt",
    "pattern_batch": "gpt",
    "random_batch": "gpt",
    "tiny_training": "gpt",
    "Measurement": "measure",
    "live_bytes": "measure",
    "measure": "measure",
    "largest_batch": "search",
    "pick": "sizes",
    "storage_bytes": "storages",
    "median_seconds": "timing",
    "plot_breakdown": "plots",  # matplotlib is slow to import
    "plot_lines": "plots",
    "plot_timeline": "plots",
}
# Functions named like the submodule that defines them: the package attribute stays the function.
_SHADOWED = {"budget", "dryrun", "estimate", "measure"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'vramlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """When the import system binds a submodule such as ``vramlab.dryrun`` to the package, keep
    the function of the same name there instead (``vramlab.dryrun(...)`` stays callable)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__version__ = "0.1.0"

__all__ = [
    "DryRunResult",
    "Estimate",
    "GPTConfig",
    "GiB",
    "KiB",
    "Measurement",
    "MiB",
    "NoGPUError",
    "REGISTRY",
    "Setup",
    "TinyGPT",
    "budget",
    "device_info",
    "dryrun",
    "estimate",
    "format_bytes",
    "get_arch",
    "has_cuda",
    "kv_cache_bytes",
    "largest_batch",
    "live_bytes",
    "measure",
    "median_seconds",
    "param_count",
    "parse_bytes",
    "pattern_batch",
    "pick",
    "random_batch",
    "require_cuda",
    "storage_bytes",
    "tiny_training",
    "weight_bytes",
]
