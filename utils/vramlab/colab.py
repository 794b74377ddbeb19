"""Install, on a fresh runtime such as Colab's, the dependency versions CI tested the course with.

The setup cell installs vramlab itself without its dependencies, then runs
``python -m vramlab.colab``: it pip-installs the pins in ``data/tested-versions.txt`` (never
torch, which the runtime keeps), so byte-exact asserts meet the releases they were checked
with, and not whatever a floor would let a fresh runtime pull.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TESTED = Path(__file__).with_name("data") / "tested-versions.txt"


def tested_requirements() -> list[str]:
    """The pinned requirements (``name==version``), comments left out; torch is never among them."""
    pins = [line.split("#")[0].strip() for line in TESTED.read_text(encoding="utf-8").splitlines()]
    pins = [pin for pin in pins if pin]
    if any(pin.split("==")[0].strip().lower() == "torch" for pin in pins):
        raise ValueError(f"{TESTED.name} must not pin torch: a runtime keeps its own CUDA build")
    return pins


def main() -> int:
    """pip-install the tested pins; return pip's exit code (the setup cell turns a failure into one line)."""
    return subprocess.run([sys.executable, "-m", "pip", "install", "-q", *tested_requirements()]).returncode


if __name__ == "__main__":
    raise SystemExit(main())
