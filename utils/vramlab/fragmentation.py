"""Fragmentation experiments, run on the allocator model or on a real GPU.

Two scenarios, each a list of steps in a device capped at ``CAPACITY`` bytes, then one
last request (see :data:`SCENARIOS`):

- ``"20 MiB holes"``: a 120 MiB tensor is freed and its cached segment is carved
  into six 20 MiB tensors; every other one is freed, an 80 MiB tensor fills the rest, then
  40 MiB is requested. 60 MiB is free, in three 20 MiB holes. The default allocator cannot
  use them (no hole is big enough, and their segment still holds live blocks); expandable
  segments unmap the three holes (each a whole 20 MiB granule) and map 40 MiB at the end.
- ``"9 MiB holes"``: ten pairs of 9 MiB tensors, the first of each freed, then
  40 MiB requested. 90 MiB is free, but every hole shares a granule with a live tensor, so
  expandable segments cannot give any of it back either: both settings run out of memory.

On CUDA a scenario runs in a fresh Python process, because ``PYTORCH_CUDA_ALLOC_CONF`` is
read once, when CUDA initialises:

    python -m vramlab.fragmentation --scenario NAME [--expandable]   # prints a JSON result
    python -m vramlab.fragmentation --record docs/gpu-runs/fragmentation-<gpu>.json
                                    # every scenario under both settings, with device and
                                    # torch version, for chapter 05 on CPU-only machines
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

CAPACITY = 210 * MiB  # 10 MiB above what the steps reserve, so a rounding byte cannot decide

Step = tuple[str, str, int]  # ("alloc", name, bytes) or ("free", name, 0)


@dataclass(frozen=True)
class Scenario:
    """Steps to run, then one ``request`` of bytes that may or may not fit."""

    steps: tuple[Step, ...]
    request: int


def _pairs(n: int, size: int) -> tuple[Step, ...]:
    allocs = tuple(s for i in range(n) for s in (("alloc", f"a{i}", size), ("alloc", f"b{i}", size)))
    return allocs + tuple(("free", f"a{i}", 0) for i in range(n))


SCENARIOS: dict[str, Scenario] = {
    "20 MiB holes": Scenario(
        (("alloc", "big", 120 * MiB), ("free", "big", 0))
        + tuple(("alloc", f"p{i}", 20 * MiB) for i in range(6))
        + tuple(("free", f"p{i}", 0) for i in (0, 2, 4))
        + (("alloc", "filler", 80 * MiB),),
        40 * MiB,
    ),
    "9 MiB holes": Scenario(_pairs(10, 9 * MiB), 40 * MiB),
}


@dataclass
class FragmentationResult:
    """Bytes allocated and reserved after the steps, and whether the last request fit."""

    source: str  # "allocator model" or "cuda"
    scenario: str
    expandable: bool
    allocated: int
    reserved: int
    request: int
    request_fit: bool
    reserved_after: int = 0  # after the request (and any release it caused)
    error: str = ""
    segments: list[dict[str, Any]] = field(default_factory=list)


def scenario(name: str) -> Scenario:
    """The scenario called ``name``; a clear error names the known ones."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown fragmentation scenario {name!r}; choose one of {sorted(SCENARIOS)}")
    return SCENARIOS[name]


def replay(steps: tuple[Step, ...], alloc: Callable[[int], Any], free: Callable[[Any], None]) -> dict[str, Any]:
    """Run the steps with ``alloc``/``free``; return what stays alive, by name."""
    live: dict[str, Any] = {}
    for kind, name, nbytes in steps:
        if kind == "alloc":
            live[name] = alloc(nbytes)
        else:
            free(live.pop(name))
    return live


def run_model(name: str, expandable: bool = False, capacity: int = CAPACITY) -> FragmentationResult:
    """A scenario on :class:`CachingAllocatorModel` (a simulation, not a measurement)."""
    import torch

    sc = scenario(name)
    model = CachingAllocatorModel(capacity, expandable_segments=expandable)
    replay(sc.steps, model.malloc, model.free)
    allocated, reserved, segments = model.allocated_bytes, model.reserved_bytes, model.snapshot()
    try:
        model.malloc(sc.request)
        fit, error = True, ""
    except torch.OutOfMemoryError as err:
        fit, error = False, str(err)
    return FragmentationResult(
        "allocator model", name, expandable, allocated, reserved, sc.request, fit, model.reserved_bytes, error, segments
    )


def run_cuda(
    name: str, expandable: bool = False, capacity: int = CAPACITY, timeout: float = 120
) -> FragmentationResult:
    """A scenario on the real CUDA allocator, in a subprocess with the allocator setting."""
    require_cuda("the fragmentation experiment on a real allocator")
    scenario(name)
    env = dict(os.environ)
    env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True" if expandable else "expandable_segments:False"
    package_root = str(Path(__file__).resolve().parents[1])  # vramlab importable even when not pip-installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    args = [sys.executable, "-m", "vramlab.fragmentation", "--scenario", name, "--capacity", str(capacity)]
    out = subprocess.run(
        args + (["--expandable"] if expandable else []), env=env, capture_output=True, text=True, timeout=timeout
    )
    if out.returncode != 0:
        raise RuntimeError(f"the CUDA fragmentation run failed:\n{out.stderr[-2000:]}")
    return FragmentationResult(**json.loads(out.stdout.strip().splitlines()[-1]))


def _cuda_main(name: str, expandable: bool, capacity: int) -> dict[str, Any]:
    import torch

    sc = scenario(name)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(capacity / total)
    # replay drops a tensor from its dict at each "free" step, which frees it: `free` has nothing to do
    live = replay(sc.steps, lambda n: torch.empty(n, dtype=torch.uint8, device="cuda"), lambda t: None)
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
        extra = torch.empty(sc.request, dtype=torch.uint8, device="cuda")
        fit, error = True, ""
        del extra
    except torch.OutOfMemoryError as err:
        fit, error = False, str(err)
    del live
    return dict(
        source="cuda",
        scenario=name,
        expandable=expandable,
        allocated=allocated,
        reserved=reserved,
        request=sc.request,
        request_fit=fit,
        reserved_after=torch.cuda.memory_reserved(),
        error=error,
        segments=segments,
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run a fragmentation scenario on this process's GPU.")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="20 MiB holes")
    parser.add_argument("--expandable", action="store_true")
    parser.add_argument("--capacity", type=int, default=CAPACITY)
    parser.add_argument("--record", metavar="PATH", help="run every scenario, both settings; write to PATH")
    ns = parser.parse_args()
    if ns.record:
        import datetime

        import torch

        runs = [run_cuda(n, expandable=e, capacity=ns.capacity).__dict__ for n in SCENARIOS for e in (False, True)]
        meta = {
            "notebook": "chapters/05_anatomy_of_an_oom.ipynb",  # the website shows the record on that page
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "date": datetime.date.today().isoformat(),
            "capacity": ns.capacity,
        }
        with open(ns.record, "w") as fh:
            json.dump({**meta, "runs": runs}, fh, indent=1)
        print(f"wrote {ns.record}")
    else:
        print(json.dumps(_cuda_main(ns.scenario, ns.expandable, ns.capacity)))
