"""What machine this is, with every ``torch.cuda`` call guarded (a CPU build raises on some)."""

from __future__ import annotations

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
