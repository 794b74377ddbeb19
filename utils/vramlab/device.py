"""What machine this is, with every ``torch.cuda`` call guarded (a CPU build raises on some)."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import torch

from .units import format_bytes


class NoGPUError(RuntimeError):
    """Raised by a function that needs a CUDA GPU when there is none."""


def has_cuda() -> bool:
    """True when a CUDA GPU is usable from this process."""
    try:
        return bool(torch.cuda.is_available()) and torch.cuda.device_count() > 0
    except Exception:  # a broken driver install must not crash a notebook
        return False


def require_cuda(what: str) -> None:
    """Raise :class:`NoGPUError` saying what needed the GPU and what to do instead."""
    if not has_cuda():
        raise NoGPUError(
            f"{what} needs a CUDA GPU and this machine has none (torch {torch.__version__}). "
            "Run this part on a GPU runtime (Colab: Runtime > Change runtime type > T4 GPU), "
            "or use the CPU path of this section."
        )


@dataclass(frozen=True)
class DeviceInfo:
    """A description of the compute device. Bytes are plain ints; ``None`` where unknown."""

    kind: str  # "cuda" or "cpu"
    name: str
    total_bytes: int | None
    capability: tuple[int, int] | None
    bf16_fast: bool
    torch_version: str

    def describe(self) -> str:
        """One line for a notebook."""
        total = format_bytes(self.total_bytes) if self.total_bytes else "unknown"
        if self.kind == "cuda":
            return (
                f"GPU: {self.name}, {total}, compute capability {self.capability}, "
                f"fast bf16: {self.bf16_fast}, torch {self.torch_version}"
            )
        return f"CPU only: {self.name}, torch {self.torch_version} (no GPU: memory is measured by the CPU tracker)"


def device_info() -> DeviceInfo:
    """Describe the GPU if there is one, else the CPU."""
    if has_cuda():
        props = torch.cuda.get_device_properties(0)
        capability = (props.major, props.minor)
        return DeviceInfo(
            "cuda", props.name, int(props.total_memory), capability, capability >= (8, 0), torch.__version__
        )
    return DeviceInfo("cpu", platform.processor() or platform.machine(), None, None, False, torch.__version__)


def autocast_dtype(device: str | torch.device = "cuda") -> torch.dtype:
    """The 16-bit dtype for mixed precision on ``device``: bf16 where it runs natively (CUDA
    compute capability 8.0 and up: A100, H100, L4), fp16 with a GradScaler below that (a
    Colab T4 is 7.5: ``torch.cuda.is_bf16_supported()`` says True there, but only by
    emulation, which is slow). On a CPU, bf16 (CPU autocast's dtype)."""
    if torch.device(device).type != "cuda":
        return torch.bfloat16
    require_cuda("choosing a CUDA autocast dtype")
    return torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16


def cuda_memory_stats(device: int | None = None) -> dict[str, int]:
    """The three numbers people confuse, in bytes, for one GPU.

    ``allocated``: bytes of live tensors (rounded to 512-byte blocks);
    ``reserved``: what PyTorch's caching allocator holds from the driver (allocated + cache);
    ``device_used``: what the driver reports in use on the whole device (``total - free``):
    reserved + the CUDA context + every other process. This is what nvidia-smi shows.
    """
    require_cuda("reading CUDA memory statistics")
    free, total = torch.cuda.mem_get_info(device)
    return {
        "allocated": int(torch.cuda.memory_allocated(device)),
        "reserved": int(torch.cuda.memory_reserved(device)),
        "device_used": int(total - free),
        "device_total": int(total),
    }


def gpu_processes(listing: str) -> list[str] | None:
    """The process lines of ``torch.cuda.list_gpu_processes()``'s text, or None when it could not
    list them (no NVML bindings). Its header and "no processes are running" are not processes."""
    if "pynvml" in listing:
        return None
    return [line.strip() for line in listing.splitlines()[1:] if line.strip().startswith("process")]


def host_rss_bytes() -> int:
    """This process's resident host memory now (RSS), in bytes: ``/proc/self/statm`` on Linux
    (Colab, CI), else psutil. Counts the pages the process has touched, including pages of
    memory-mapped files it has read; not what it has mapped but never read."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        raise RuntimeError("reading this process's host memory needs Linux or psutil: pip install psutil") from None
    return int(psutil.Process().memory_info().rss)


_CONTEXT_PROBE = """
import json, os, sys
import pynvml
import torch
visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
pynvml.nvmlInit()
handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible) if visible.isdigit() else 0)
before = pynvml.nvmlDeviceGetMemoryInfo(handle).used
torch.zeros(1, device="cuda")
torch.cuda.synchronize()
after = pynvml.nvmlDeviceGetMemoryInfo(handle).used
print(json.dumps({"grew": after - before, "reserved": torch.cuda.memory_reserved()}))
"""


def cuda_context_bytes(lazy: bool = True, timeout_s: float = 120.0) -> int:
    """Bytes of GPU memory a fresh process's CUDA context takes, with ``CUDA_MODULE_LOADING``
    ``LAZY`` (PyTorch's default: kernels load when first used) or ``EAGER`` (every kernel at
    start-up). Measured in a child process: the device's used memory by NVML before and after
    the first CUDA tensor, less what PyTorch's allocator reserved for that tensor. Needs a GPU
    and NVML (``pip install nvidia-ml-py``); other processes must not allocate meanwhile."""
    require_cuda("measuring the CUDA context")
    row = _probe(_CONTEXT_PROBE, {"CUDA_MODULE_LOADING": "LAZY" if lazy else "EAGER"}, [], timeout_s, "context")
    return int(row["grew"]) - int(row["reserved"])


def _probe(code: str, env: dict[str, str | None], args: list[str], timeout_s: float, what: str) -> dict[str, int]:
    """Run ``code`` in a fresh Python process with this one's environment changed by ``env``
    (a None value removes the variable) and return the JSON object of its last line (a fresh
    process: CUDA settings are read once, when CUDA initialises)."""
    import json
    import subprocess
    import sys

    command = [sys.executable, "-c", code, *args]
    child = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    done = subprocess.run(command, capture_output=True, text=True, env=child, timeout=timeout_s)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no error output"])[-1]
        if "pynvml" in last:
            raise RuntimeError(f"measuring the CUDA {what} needs NVML: pip install nvidia-ml-py") from None
        raise RuntimeError(f"the {what} probe failed: {last}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


_ALLOCATION_PROBE = """
import json, sys
import torch
kept = [torch.empty(n, dtype=torch.uint8, device="cuda") for n in json.loads(sys.argv[1])]
torch.cuda.synchronize()
s = torch.cuda.memory_stats()
print(json.dumps({"requested": s["requested_bytes.all.current"], "allocated": s["allocated_bytes.all.current"],
                  "reserved": s["reserved_bytes.all.current"]}))
"""


def allocator_probe(sizes: list[int], alloc_conf: str = "", timeout_s: float = 120.0) -> dict[str, int]:
    """Allocate one tensor of each of ``sizes`` bytes in a fresh process whose
    ``PYTORCH_CUDA_ALLOC_CONF`` is ``alloc_conf`` (the allocator reads it once, when CUDA
    initialises, so each setting needs its own process; ``PYTORCH_ALLOC_CONF``, the newer name,
    is set to the same). Returns the allocator's bytes with all
    of them alive: ``requested`` (what the tensors asked for), ``allocated`` (the blocks given
    to them, after rounding) and ``reserved`` (the segments obtained from CUDA). Needs a GPU."""
    if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in sizes):
        raise ValueError(f"sizes must be a non-empty list of positive byte counts, got {sizes!r}")
    require_cuda("probing the CUDA allocator")
    import json

    env: dict[str, str | None] = {"PYTORCH_CUDA_ALLOC_CONF": alloc_conf, "PYTORCH_ALLOC_CONF": alloc_conf}
    return _probe(_ALLOCATION_PROBE, env, [json.dumps(sizes)], timeout_s, "allocator")


_WORKSPACE_PROBE = """
import json
import torch
a, b = torch.ones(256, 256, device="cuda"), torch.ones(256, 256, device="cuda")
torch.cuda.synchronize()
before = torch.cuda.memory_allocated()
c = a @ b
torch.cuda.synchronize()
print(json.dumps({"grew": torch.cuda.memory_allocated() - before, "output": c.untyped_storage().nbytes()}))
"""


def cublas_workspace_bytes(workspace_config: str | None = None, timeout_s: float = 120.0) -> int:
    """Bytes a fresh process's first matrix product leaves allocated beyond its output: the
    cuBLAS workspace, which PyTorch's allocator provides (so ``memory_allocated`` and
    ``reserved`` count it, unlike the context) and keeps for the process's lifetime.
    ``workspace_config`` sets ``CUBLAS_WORKSPACE_CONFIG`` (``":SIZE_KiB:COUNT"`` pairs, e.g.
    ``":16:8"``); None unsets it, for PyTorch's default. Needs a GPU."""
    require_cuda("measuring the cuBLAS workspace")
    env: dict[str, str | None] = {"CUBLAS_WORKSPACE_CONFIG": workspace_config}  # None: PyTorch's default
    row = _probe(_WORKSPACE_PROBE, env, [], timeout_s, "workspace")
    return int(row["grew"]) - int(row["output"])
