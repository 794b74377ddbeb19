"""vramlab: measure where the memory of a model goes, on a GPU, on a CPU, or by dry run.

The names below are the course's vocabulary; each lives in a module named for what it does
(measure, budget, dryrun, estimate, gpt, timing, plots, ...), where the rest of the toolbox is.
Importing vramlab has no side effects (transformers is imported only by a dry run, matplotlib
only by a plot).
"""

from .budget import budget
from .device import NoGPUError, device_info, has_cuda, require_cuda
from .dryrun import DryRunResult, dryrun
from .estimate import Estimate, estimate, kv_cache_bytes, param_count, weight_bytes
from .gpt import GPTConfig, TinyGPT, pattern_batch, random_batch, tiny_training
from .measure import Measurement, live_bytes, measure
from .models import REGISTRY, get_arch
from .search import largest_batch
from .setups import Setup
from .sizes import pick
from .storages import storage_bytes
from .timing import median_seconds
from .units import GiB, KiB, MiB, format_bytes, parse_bytes

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


def __getattr__(name: str) -> object:
    """The plotting helpers, imported on first use (matplotlib is slow to import)."""
    if name in ("plot_breakdown", "plot_lines", "plot_timeline"):
        from . import plots

        return getattr(plots, name)
    raise AttributeError(f"module 'vramlab' has no attribute {name!r}")
