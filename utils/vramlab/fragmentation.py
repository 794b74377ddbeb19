"""One fragmentation experiment, run on the allocator model or on a real GPU.

The pattern: in a device capped at ``capacity`` bytes, allocate pairs of 9 MiB blocks (each
pair shares one 20 MiB segment), free the first block of every pair, then ask for 10 MiB.
Plenty of memory is free, but in 9 MiB and 2 MiB holes: with the default allocator the
request fails; with expandable segments it succeeds.

On CUDA the experiment runs in a fresh Python process, because ``PYTORCH_CUDA_ALLOC_CONF``
is read once, when CUDA initialises:

    python -m vramlab.fragmentation [--expandable]      # prints a JSON result
    python -m vramlab.fragmentation --record docs/gpu-runs/fragmentation-<gpu>.json
                                                        # both settings, with device and torch version,
                                                        # for chapter 05 to show on CPU-only machines
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .allocator_model import CachingAllocatorModel
from .device import require_cuda
from .units import MiB

PAIRS = 10
BLOCK = 9 * MiB
REQUEST = 10 * MiB
CAPACITY = 200 * MiB


@dataclass
class FragmentationResult:
    """Bytes allocated and reserved after the frees, and whether the last request fit."""

    source: str  # "allocator model" or "cuda"
    expandable: bool
    allocated: int
    reserved: int
    request_fit: bool
    error: str = ""
    segments: list[dict[str, Any]] = field(default_factory=list)


def pattern(alloc: Callable[[int], Any], free: Callable[[Any], None]) -> list[Any]:
    """Allocate the pairs and free the first of each; return what stays alive."""
    first, kept = [], []
    for _ in range(PAIRS):
        first.append(alloc(BLOCK))
        kept.append(alloc(BLOCK))
    for handle in first:
        free(handle)
    return kept


def run_model(expandable: bool = False, capacity: int = CAPACITY) -> FragmentationResult:
    """The experiment on :class:`CachingAllocatorModel` (a simulation, not a measurement)."""
    import torch

    model = CachingAllocatorModel(capacity, expandable_segments=expandable)
    pattern(model.malloc, model.free)
    allocated, reserved, segments = model.allocated_bytes, model.reserved_bytes, model.snapshot()
    try:
        model.malloc(REQUEST)
        return FragmentationResult("allocator model", expandable, allocated, reserved, True, "", segments)
    except torch.OutOfMemoryError as err:
        return FragmentationResult("allocator model", expandable, allocated, reserved, False, str(err), segments)


def run_cuda(expandable: bool = False, capacity: int = CAPACITY, timeout: float = 120) -> FragmentationResult:
    """The experiment on the real CUDA allocator, in a subprocess with the allocator setting."""
    require_cuda("the fragmentation experiment on a real allocator")
    env = dict(os.environ)
    env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True" if expandable else "expandable_segments:False"
    package_root = str(Path(__file__).resolve().parents[1])  # vramlab importable even when not pip-installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    args = [sys.executable, "-m", "vramlab.fragmentation", "--capacity", str(capacity)] + (
        ["--expandable"] if expandable else []
    )
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"the CUDA fragmentation run failed:\n{out.stderr[-2000:]}")
    return FragmentationResult(**json.loads(out.stdout.strip().splitlines()[-1]))


def _cuda_main(expandable: bool, capacity: int) -> dict[str, Any]:
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(capacity / total)
    torch.cuda.memory._record_memory_history(max_entries=100000)
    # tensors are freed when `pattern` drops its list of first blocks, so `free` has nothing to do
    kept = pattern(lambda n: torch.empty(n, dtype=torch.uint8, device="cuda"), lambda t: None)
    torch.cuda.synchronize()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    segments = [
        {
            "total_size": s["total_size"],
            "segment_type": s.get("segment_type", ""),
            "blocks": [{"size": b["size"], "state": b["state"]} for b in s["blocks"]],
        }
        for s in torch.cuda.memory._snapshot()["segments"]
    ]
    try:
        extra = torch.empty(REQUEST, dtype=torch.uint8, device="cuda")
        fit, error = True, ""
        del extra
    except torch.OutOfMemoryError as err:
        fit, error = False, str(err)
    del kept
    return dict(
        source="cuda",
        expandable=expandable,
        allocated=allocated,
        reserved=reserved,
        request_fit=fit,
        error=error,
        segments=segments,
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the fragmentation experiment on this process's GPU.")
    parser.add_argument("--expandable", action="store_true")
    parser.add_argument("--capacity", type=int, default=CAPACITY)
    parser.add_argument("--record", metavar="PATH", help="run both settings and write them, with the device, to PATH")
    ns = parser.parse_args()
    if ns.record:
        import torch

        runs = [run_cuda(expandable=e, capacity=ns.capacity).__dict__ for e in (False, True)]
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "capacity": ns.capacity}
        with open(ns.record, "w") as fh:
            json.dump({**meta, "runs": runs}, fh, indent=1)
        print(f"wrote {ns.record}")
    else:
        print(json.dumps(_cuda_main(ns.expandable, ns.capacity)))
