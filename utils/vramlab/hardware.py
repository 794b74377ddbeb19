"""Memory of common GPUs, in bytes, as ``nvidia-smi`` reports their totals.

Datasheets sell memory in decimal gigabytes (a T4's "16 GB"); the driver reports MiB, and
part of that goes to ECC and the driver itself. These are the totals seen on the usual
machines (Colab's T4, cloud A100/H100/H200/B200 nodes); ``torch.cuda.mem_get_info()`` tells yours.
"""

from __future__ import annotations

from .units import MiB

GPUS: dict[str, int] = {
    "T4 (16 GB)": 15360 * MiB,  # also V100-16GB
    "L4 (24 GB)": 23028 * MiB,  # also A10G; RTX 4090 reports 24564 MiB
    "A100 40GB": 40960 * MiB,
    "A100 80GB": 81920 * MiB,
    "H100 80GB": 81559 * MiB,
    "H200 141GB": 143771 * MiB,
    "B200 192GB": 183359 * MiB,  # AMD's MI300X also sells 192 GB
}

SIZE_CLASSES: dict[str, int] = {  # cards sold as this many GB, by the first card of the class above
    "16 GB": GPUS["T4 (16 GB)"],
    "24 GB": GPUS["L4 (24 GB)"],
    "40 GB": GPUS["A100 40GB"],
    "80 GB": GPUS["A100 80GB"],
    "141 GB": GPUS["H200 141GB"],
}
"""The decision guide's columns (:mod:`vramlab.planner`): one nvidia-smi total per size class."""

CONTEXT_HEADROOM = 512 * MiB
"""Bytes a fit verdict leaves free for the CUDA context and allocator slack. Contexts take
a few hundred MiB; chapter 04 measures yours. Pass another value where it matters."""


def fits(peak_bytes: int, gpu_bytes: int, headroom: int = CONTEXT_HEADROOM) -> bool:
    """Whether a peak of ``peak_bytes`` fits a GPU of ``gpu_bytes`` with ``headroom`` spare."""
    if peak_bytes < 0 or gpu_bytes <= 0 or headroom < 0:
        raise ValueError("peak and headroom must be >= 0 bytes and the GPU size > 0 bytes")
    return peak_bytes + headroom <= gpu_bytes
