"""Notebook hygiene: the shared setup cell, output stripping, and the course map.

python -m vramlab.notebooks strip chapters labs solutions   # remove outputs in place
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
BRANCH = "main"


def repository_url() -> str:
    """Where the course is published: ``[project.urls] Repository`` in pyproject.toml (or, in
    an installed wheel, the same field of the package's metadata)."""
    if PYPROJECT.is_file():
        match = re.search(r'^Repository\s*=\s*"([^"]+)"', PYPROJECT.read_text(encoding="utf-8"), re.M)
        if match:
            return match.group(1)
    from importlib.metadata import metadata

    for entry in metadata("vramlab").get_all("Project-URL") or []:
        label, _, url = entry.partition(",")
        if label.strip() == "Repository":
            return url.strip()
    raise LookupError("no Repository URL in pyproject.toml [project.urls] or the installed metadata")


def is_published() -> bool:
    """Whether ``[project.urls] Repository`` is really published (``[tool.vramlab] published``):
    until it is, a fresh runtime never installs from that name, which anyone could register."""
    if PYPROJECT.is_file():
        match = re.search(r"^published\s*=\s*(true|false)", PYPROJECT.read_text(encoding="utf-8"), re.M)
        return bool(match) and match.group(1) == "true"
    return False


def setup_cell(repo_url: str | None) -> str:
    """The one setup cell, identical in every notebook (tests/test_notebooks.py enforces it).

    It uses vramlab from this clone; on a fresh runtime (Colab) it installs vramlab without its
    dependencies, from the first of: ``$VRAMLAB_INSTALL`` (a wheel's path or URL, or a
    ``git+https://`` URL), the newest ``vramlab-*.whl`` uploaded next to the notebook (``make
    dist`` builds one), or the published repository (``None``: not published yet); then the
    dependency versions CI tested (``python -m vramlab.colab``), never torch. When none is
    available or pip fails, it stops with one line that says what to do."""
    fallback = f"git+{repo_url}" if repo_url else None
    return f"""\
# Setup: identical in every notebook. Uses vramlab from this clone, or installs it on a fresh
# runtime (Colab) without touching the runtime's torch: $VRAMLAB_INSTALL (a wheel's path or
# URL), else a vramlab-*.whl uploaded beside the notebook, else the published repository;
# then the versions of its dependencies the course was tested with (python -m vramlab.colab).
import importlib.util, os, subprocess, sys
from pathlib import Path
for _root in (Path.cwd(), Path.cwd().parent):
    if importlib.util.find_spec("vramlab") is None and (_root / "utils" / "vramlab").is_dir():
        sys.path.insert(0, str(_root / "utils"))
if importlib.util.find_spec("vramlab") is None:
    _wheels = sorted(Path.cwd().glob("vramlab-*.whl"), key=os.path.getmtime)
    _source = os.environ.get("VRAMLAB_INSTALL") or (str(_wheels[-1]) if _wheels else {fallback!r})
    _pip = lambda *args: subprocess.run([sys.executable, "-m", *args]).returncode
    if not _source or _pip("pip", "install", "-q", "--no-deps", Path(_source).resolve().as_uri()
                           if Path(_source).is_file() else _source) or _pip("vramlab.colab"):
        raise SystemExit("vramlab is not installed: upload the wheel `make dist` builds beside this notebook, "
                         "or set os.environ['VRAMLAB_INSTALL'] to a wheel's path or URL, then run this cell again.")
import vramlab
print(vramlab.device_info().describe())"""


def colab_prefix(repo_url: str, branch: str = BRANCH) -> str:
    """The start of an "Open in Colab" link to a notebook of ``repo_url`` (a GitHub URL)."""
    match = re.fullmatch(r"https://github\.com/([^/]+)/([^/]+?)(?:\.git)?/?", repo_url)
    if not match:
        raise ValueError(f"Colab opens notebooks from GitHub; {repo_url!r} is not a github.com repository URL")
    return f"https://colab.research.google.com/github/{match.group(1)}/{match.group(2)}/blob/{branch}/"


REPO_URL = repository_url()
SETUP_CELL = setup_cell(REPO_URL if is_published() else None)
COLAB_LINK = re.compile(r"https://colab\.research\.google\.com/github/[^/\s)]+/[^/\s)]+/blob/[^/\s)]+/")


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


def publish(nb: dict[str, Any], repo_url: str, published: bool | None = None) -> dict[str, Any]:
    """Point ``nb``'s setup cell and Colab badge at ``repo_url``; the setup cell installs from it
    only when ``published`` (default: ``[tool.vramlab] published`` in pyproject.toml)."""
    published = is_published() if published is None else published
    code = [cell for cell in nb.get("cells", []) if cell.get("cell_type") == "code"]
    if code:
        code[0]["source"] = setup_cell(repo_url if published else None).splitlines(keepends=True)
    prefix = colab_prefix(repo_url)
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "markdown":
            cell["source"] = COLAB_LINK.sub(prefix, source(cell)).splitlines(keepends=True)
    return nb


USAGE = """usage: python -m vramlab.notebooks strip DIR_OR_NOTEBOOK [...]
       python -m vramlab.notebooks publish DIR_OR_NOTEBOOK [...]   (setup cells and badges from pyproject.toml)"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in ("strip", "publish"):
        print(USAGE, file=sys.stderr)
        return 2
    paths = [p for arg in args[1:] for p in (sorted(Path(arg).glob("*.ipynb")) if Path(arg).is_dir() else [Path(arg)])]
    for path in paths:
        nb = load(path)
        dump(strip(nb) if args[0] == "strip" else publish(nb, REPO_URL), path)
        print(f"{'stripped' if args[0] == 'strip' else 'published'} {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
