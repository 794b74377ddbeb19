"""Generate the student labs from their solutions.

``solutions/labNN_*.ipynb`` is the only source of a lab. Code between ``### BEGIN SOLUTION``
and ``### END SOLUTION`` (inside a function body) is replaced by a TODO stub that raises
``NotImplementedError``, which the checks report as "not attempted yet". Markdown between
``<!-- BEGIN SOLUTION -->`` and ``<!-- END SOLUTION -->`` is replaced by a prompt.

    python -m vramlab.labs            # write labs/ from solutions/
    python -m vramlab.labs --check    # exit 1 if labs/ is stale
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any

from .notebooks import dump, load, source, strip

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
MD_REGION = re.compile(r"<!-- BEGIN SOLUTION -->.*?<!-- END SOLUTION -->", re.DOTALL)
MD_STUB = "*Your answer here.*"


class LabError(ValueError):
    """A solution notebook breaks the lab conventions; the message says where."""


def stub_code(text: str, where: str = "cell") -> str:
    """Replace each solution region of a code cell's text with a TODO stub."""
    out: list[str] = []
    lines = text.split("\n")
    inside, indent = False, ""
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise LabError(f"{where}, line {number}: nested '{BEGIN}'")
            inside, indent = True, line[: len(line) - len(line.lstrip())]
            if not indent:
                raise LabError(
                    f"{where}, line {number}: a solution region must sit inside a function body "
                    "(indented), so the lab can stub it with `raise NotImplementedError`"
                )
            out.append(f"{indent}# TODO: your code here (the check below tells you when it is right)")
            out.append(f"{indent}raise NotImplementedError")
        elif stripped == END:
            if not inside:
                raise LabError(f"{where}, line {number}: '{END}' without '{BEGIN}'")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise LabError(f"{where}: '{BEGIN}' is never closed by '{END}'")
    return "\n".join(out)


def make_lab(solution: dict[str, Any], name: str = "notebook") -> dict[str, Any]:
    """The student version of a solution notebook (outputs stripped)."""
    lab = strip(copy.deepcopy(solution))
    regions = 0
    for index, cell in enumerate(lab.get("cells", [])):
        text = source(cell)
        if cell.get("cell_type") == "code" and BEGIN in text:
            regions += text.count(BEGIN)
            cell["source"] = stub_code(text, f"{name}, cell {index}")
        elif cell.get("cell_type") == "markdown" and MD_REGION.search(text):
            cell["source"] = MD_REGION.sub(MD_STUB, text)
    if regions == 0:
        raise LabError(f"{name}: no '{BEGIN}' region, so the lab would hand out the answers")
    return lab


def lab_path(solution: Path, labs_dir: Path) -> Path:
    return labs_dir / solution.name


def generate(solutions_dir: Path, labs_dir: Path, check: bool = False) -> list[Path]:
    """Write (or, with ``check``, compare) every lab; return the stale or written paths."""
    changed = []
    for solution in sorted(solutions_dir.glob("lab*.ipynb")):
        lab = make_lab(load(solution), solution.name)
        target = lab_path(solution, labs_dir)
        current = load(target) if target.exists() else None
        if current != lab:
            changed.append(target)
            if not check:
                labs_dir.mkdir(parents=True, exist_ok=True)
                dump(lab, target)
    return changed


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = Path.cwd()
    check = "--check" in args
    changed = generate(root / "solutions", root / "labs", check=check)
    if check and changed:
        print("stale labs (run `python -m vramlab.labs`): " + ", ".join(map(str, changed)), file=sys.stderr)
        return 1
    for path in changed:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
