"""Executed copies of the course's notebooks, for the website: one execution serves both
the test run and the site.

The repository keeps its notebooks without outputs. When ``make test`` runs them (nbval),
the root ``conftest.py`` saves each notebook whose every cell passed, with its outputs, under
``build/executed/`` (same relative path), stamped with :func:`cache_key` and :func:`machine`.
``book/build_site.py`` reuses a saved copy when its key still matches, and executes the notebook
itself (nbclient) otherwise. The key covers the notebook's own bytes and every file of the
``vramlab`` package it imports, so a changed notebook or library is never served stale.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "build" / "executed"
PACKAGE = ROOT / "utils" / "vramlab"
META = "vramlab_executed"


def library_digest() -> str:
    """SHA-256 over the vramlab package's files (paths and bytes), in a stable order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(PACKAGE)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_key(notebook: Path, library: str | None = None) -> str:
    """The key an executed copy of ``notebook`` must carry to be reused: the notebook's bytes
    and the library's digest (pass ``library`` to hash the package once for many notebooks)."""
    digest = hashlib.sha256(Path(notebook).read_bytes())
    digest.update((library or library_digest()).encode())
    return digest.hexdigest()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def _commit() -> str:
    try:
        out = subprocess.run(  # "-dirty" when the tree has uncommitted changes
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
        )
        return out.stdout.strip()
    except OSError:
        return ""


def machine() -> dict[str, Any]:
    """What produced the outputs: CPU model and cores, RAM (GiB), the GPU if any, torch and
    Python versions, the commit and the date (UTC)."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    ram = _ram_gib()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": None if ram is None else round(ram, 1),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": _commit(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
    }


def describe_machine(stamp: dict[str, Any]) -> str:
    """The machine of a stamp, e.g. ``CPU: AMD EPYC, 2 cores, 23.5 GiB RAM, no GPU; torch
    2.13.0+cpu, Python 3.11.7``."""
    ram = f", {stamp['ram_gib']} GiB RAM" if stamp.get("ram_gib") else ""
    gpu = f"GPU: {stamp['gpu']}" if stamp.get("gpu") else "no GPU"
    return f"CPU: {stamp['cpu']}, {stamp['cores']} cores{ram}, {gpu}; torch {stamp['torch']}, Python {stamp['python']}"


def describe(stamp: dict[str, Any]) -> str:
    """The machine of a stamp, then the commit and date of the run."""
    commit = f"commit {stamp['commit']}, " if stamp.get("commit") else ""
    return f"{describe_machine(stamp)}; {commit}{stamp['date']}"


def cached_path(relative: str | Path) -> Path:
    """Where the executed copy of the notebook at ``relative`` (to the repository) lives."""
    return CACHE / Path(relative)


def save(nb: Any, relative: str | Path, key: str, stamp: dict[str, Any], seconds: float) -> Path:
    """Write the executed notebook ``nb`` (an nbformat node) to the cache with its stamp."""
    import nbformat

    nb.metadata[META] = {"key": key, "seconds": round(seconds, 1), **stamp}
    path = cached_path(relative)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


def load_if_current(relative: str | Path, key: str) -> Any | None:
    """The cached executed copy of ``relative`` if its key is ``key``, else None."""
    import nbformat

    path = cached_path(relative)
    if not path.is_file():
        return None
    nb = nbformat.read(str(path), as_version=4)
    return nb if nb.metadata.get(META, {}).get("key") == key else None
