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

CUDA_TOTALS: dict[str, int] = {  # torch.cuda.mem_get_info()'s total, which vLLM sizes from
    "H100 80GB": round(79.22 * 1024) * MiB,  # vllm-project/vllm PR #10511: "total_gpu_memory (79.22GiB)"
    "T4 (16 GB)": round(14.56 * 1024) * MiB,  # an Unsloth Colab log of vLLM 0.7.2 (bench/vllm/cases.json)
}
"""What CUDA reports as a card's total, where a vLLM log printed it (2 decimals of GiB): less
than nvidia-smi's total by what the driver keeps. Other cards: pass the size your
``torch.cuda.mem_get_info()[1]`` gives."""

CONTEXT_HEADROOM = 512 * MiB
"""Bytes a fit verdict leaves free for the CUDA context and allocator slack. Contexts take
a few hundred MiB; chapter 04 measures yours. Pass another value where it matters."""


def fits(peak_bytes: int, gpu_bytes: int, headroom: int = CONTEXT_HEADROOM) -> bool:
    """Whether a peak of ``peak_bytes`` fits a GPU of ``gpu_bytes`` with ``headroom`` spare."""
    if peak_bytes < 0 or gpu_bytes <= 0 or headroom < 0:
        raise ValueError("peak and headroom must be >= 0 bytes and the GPU size > 0 bytes")
    return peak_bytes + headroom <= gpu_bytes


def gpu_size(card: str) -> tuple[int, str]:
    """``(bytes, name)`` for a card named in :data:`GPUS` (case-insensitive, a unique part of
    the name such as ``"H100"`` or ``"a100 40gb"``) or a size such as ``"79.22GiB"`` (name "")."""
    from .units import parse_bytes

    wanted = " ".join(card.lower().split())
    named = [name for name in GPUS if wanted and wanted in name.lower()]
    if len(named) == 1:
        return GPUS[named[0]], named[0]
    if len(named) > 1:
        raise ValueError(f"GPU {card!r} is ambiguous: name one of {', '.join(named)}, or give its size (e.g. 79.25GiB)")
    try:
        return parse_bytes(card), ""
    except ValueError:
        raise ValueError(
            f"unknown GPU {card!r}: name one of {', '.join(GPUS)}, or give its total memory as "
            "torch.cuda.mem_get_info() reports it (e.g. 79.25GiB)"
        ) from None
