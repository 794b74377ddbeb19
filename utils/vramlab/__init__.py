"""vramlab: measure where the memory of a model goes, on a GPU, on a CPU, or by dry run.

The names below are the course's toolbox; each lives in a module named for what it does.
Importing vramlab has no side effects (transformers is imported only by a dry run).
"""

from .budget import budget
from .device import DeviceInfo, NoGPUError, device_info, has_cuda, require_cuda
from .dryrun import DryRunResult, dryrun
from .estimate import Estimate, activation_bytes, estimate, kv_cache_bytes, param_count, weight_bytes
from .measure import Measurement, live_bytes, measure
from .models import REGISTRY, ArchConfig, from_hf_config, get_arch
from .search import largest_batch
from .sizes import SIZES, pick
from .storages import real_storages, storage_bytes
from .units import GiB, KiB, MiB, format_bytes, parse_bytes

__version__ = "0.1.0"

__all__ = [
    "ArchConfig", "DeviceInfo", "DryRunResult", "Estimate", "GiB", "KiB", "Measurement", "MiB",
    "NoGPUError", "REGISTRY", "SIZES", "activation_bytes", "budget", "device_info", "dryrun",
    "estimate", "format_bytes", "from_hf_config", "get_arch", "has_cuda", "kv_cache_bytes",
    "largest_batch", "live_bytes", "measure", "param_count", "parse_bytes", "pick",
    "real_storages", "require_cuda", "storage_bytes", "weight_bytes",
]
