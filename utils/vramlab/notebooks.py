"""Notebook hygiene: the shared setup cell, output stripping, and the course map.

python -m vramlab.notebooks strip chapters labs solutions   # remove outputs in place
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO_URL = "https://github.com/vram-lab/vram-lab"

# The one setup cell, identical in every notebook (tests/test_notebooks.py enforces it).
SETUP_CELL = f"""\
# Setup: identical in every notebook. Uses vramlab from this clone, or installs it on a fresh
# runtime (Colab) without touching the runtime's torch.
import importlib.util, subprocess, sys
from pathlib import Path
for _root in (Path.cwd(), Path.cwd().parent):
    if importlib.util.find_spec("vramlab") is None and (_root / "utils" / "vramlab").is_dir():
        sys.path.insert(0, str(_root / "utils"))
if importlib.util.find_spec("vramlab") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "vramlab[optim,compress] @ git+{REPO_URL}"], check=True)
import vramlab
print(vramlab.device_info().describe())"""


def load(path: str | Path) -> dict[str, Any]:
    """Read a notebook as plain JSON (nbformat 4)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def dump(nb: dict[str, Any], path: str | Path) -> None:
    """Write a notebook with the formatting Jupyter uses (indent 1, trailing newline)."""
    Path(path).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def source(cell: dict[str, Any]) -> str:
    """A cell's source as one string."""
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def strip(nb: dict[str, Any]) -> dict[str, Any]:
    """Remove outputs, execution counts and per-run metadata from code cells."""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        cell.get("metadata", {}).pop("execution", None)
    return nb


def is_stripped(nb: dict[str, Any]) -> bool:
    """True when no code cell carries outputs or an execution count."""
    return all(
        not cell.get("outputs") and cell.get("execution_count") is None
        for cell in nb.get("cells", [])
        if cell.get("cell_type") == "code"
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "strip":
        print("usage: python -m vramlab.notebooks strip DIR_OR_NOTEBOOK [...]", file=sys.stderr)
        return 2
    paths = [p for arg in args[1:] for p in (sorted(Path(arg).glob("*.ipynb")) if Path(arg).is_dir() else [Path(arg)])]
    for path in paths:
        dump(strip(load(path)), path)
        print(f"stripped {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
