"""Build the course website: ``python book/build_site.py`` (``make book``).

1. Takes every notebook in the README's course map (chapters and labs as handed out, in map
   order) and every lab solution, with outputs: the copy ``make test`` saved under
   ``build/executed`` when its key still matches (book/executed_notebooks.py), else it executes the
   notebook now with nbclient on this machine (``--reuse-only`` refuses to).
2. Writes the site's sources to ``build/book-src``: each notebook with a box saying which
   machine produced its outputs and, where ``docs/gpu-runs`` has records for it, the GPU
   runs beside them; the Colab badge as a plain link (no image from another host); and a
   home page with the course map.
3. Runs Sphinx (book/conf.py) into ``build/site``: static HTML to open or publish.

The repository's notebooks are never written: they stay without outputs.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calculator  # noqa: E402 - beside this script
import executed_notebooks as executed  # noqa: E402 - beside this script

ROOT = executed.ROOT
BOOK = Path(__file__).resolve().parent
SRC = ROOT / "build" / "book-src"
SITE = ROOT / "build" / "site"
GPU_RUNS = ROOT / "docs" / "gpu-runs"
MAP_ROW = re.compile(r"^\| *(\w+) *\| *\[`([^`]+)`\]\(((?:chapters|labs)/[^)]+\.ipynb)\) *\| *([^|]+?) *\|", re.M)
BADGE = re.compile(r"\[!\[Open In Colab\]\([^)]*\)\]\(([^)]+)\)")


def course_map() -> list[tuple[str, str, str]]:
    """``(number, path, what you measure)`` of each notebook, in the README's course map order."""
    rows = MAP_ROW.findall((ROOT / "README.md").read_text(encoding="utf-8"))
    if not rows:
        raise SystemExit("book: no course map rows found in README.md")
    return [(number, path, what) for number, _, path, what in rows]


def solutions() -> list[str]:
    """The lab solutions, by path, in lab order."""
    return [f"solutions/{Path(path).name}" for _, path, _ in course_map() if path.startswith("labs/")]


def execute(relative: str) -> Any:
    """Run the notebook at ``relative`` top to bottom in a fresh kernel (its folder as the
    working directory, as nbval runs it) and return it with outputs."""
    import nbclient
    import nbformat

    nb = nbformat.read(str(ROOT / relative), as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str((ROOT / relative).parent)}}
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        raise SystemExit(f"book: {relative} failed while executing:\n{err}") from None
    return nb


def executed_notebook(relative: str, library: str, reuse_only: bool, stamp: dict[str, Any]) -> tuple[Any, bool]:
    """The executed notebook and whether it came from the test run's cache."""
    key = executed.cache_key(ROOT / relative, library)
    nb = executed.load_if_current(relative, key)
    if nb is not None:
        return nb, True
    if reuse_only:
        raise SystemExit(
            f"book: no current executed copy of {relative} in build/executed (run `make test` first, "
            "or drop --reuse-only to execute it here)"
        )
    started = time.time()
    nb = execute(relative)
    executed.save(nb, relative, key, stamp, time.time() - started)
    return nb, False


def gpu_records() -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Records in docs/gpu-runs that name their notebook, by notebook path."""
    found: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for path in sorted(GPU_RUNS.glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise SystemExit(f"book: {path.relative_to(ROOT)} is not valid JSON ({err}); fix or remove it") from None
        if isinstance(record, dict) and isinstance(record.get("notebook"), str):
            found.setdefault(record["notebook"], []).append((path.name, record))
    return found


def _record_markdown(name: str, record: dict[str, Any]) -> str:
    head = ", ".join(f"{k} {record[k]}" for k in ("device", "torch", "date") if record.get(k))
    lines = [f"**GPU run** `docs/gpu-runs/{name}` ({head}):", ""]
    scalars = {k: v for k, v in record.items() if k not in ("notebook", "device", "torch", "date")}
    tables = {k: v for k, v in scalars.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)}
    for key, value in scalars.items():
        if key not in tables and not isinstance(value, dict | list):
            lines.append(f"- {key}: {value}")
    for rows in tables.values():
        columns = [c for c in rows[0] if not isinstance(rows[0][c], dict | list)]
        lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def machine_box(nb: Any, relative: str, records: list[tuple[str, dict[str, Any]]]) -> str:
    """The markdown box that says what produced a page's numbers, with any GPU records."""
    stamp = nb.metadata[executed.META]
    body = [
        ":::{admonition} Where the numbers on this page come from",
        ":class: note",
        f"The outputs below were produced by running this notebook on **{executed.describe(stamp)}** "
        f"({stamp.get('seconds', 0)} s). Where a GPU measures something different (the CUDA allocator's cache, "
        "the context, GPU kernels), the notebook says so next to the number. Run it yourself: "
        "*launch in Colab* or *download* (buttons above), or `make lab` in a clone.",
        "",
    ]
    if records:
        body += [_record_markdown(name, record) + "\n" for name, record in records]
    else:
        body.append(f"No GPU run of `{relative}` is recorded in `docs/gpu-runs/` yet.")
    return "\n".join(body + [":::"])


def page(nb: Any, relative: str, records: list[tuple[str, dict[str, Any]]]) -> Any:
    """The site's copy of an executed notebook: the machine box after the title cell, the
    Colab badge as a text link."""
    import nbformat

    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source = BADGE.sub(r"[Open in Colab](\1)", cell.source)
    nb.cells.insert(1, nbformat.v4.new_markdown_cell(machine_box(nb, relative, records)))
    if relative == "chapters/02_training_memory_anatomy.ipynb" and not calculator.embed(nb, wheel().name, _version()):
        raise SystemExit("book: chapter 02 shows no memory calculator to make live")
    return nb


def title(nb: Any) -> str:
    """A notebook's title: the first line of its first cell, without the heading marks."""
    return nb.cells[0].source.splitlines()[0].lstrip("# ").strip()


def home(stamps: dict[str, dict[str, Any]], titles: dict[str, str]) -> str:
    """The home page: what the course is, how these pages were made, the course map."""
    machines = sorted({executed.describe_machine(s) for s in stamps.values()})
    rows = [f"| {n} | [{titles[p]}]({p}) | {what} |" for n, p, what in course_map()]
    sols = [f"- [{titles[p]}]({p})" for p in solutions()]
    toc_course = "\n".join(p.removesuffix(".ipynb") for _, p, _ in course_map())
    toc_solutions = "\n".join(p.removesuffix(".ipynb") for p in solutions())
    return "\n".join(
        [
            "# VRAM Lab",
            "",
            "**Why did my model run out of memory, and how do I make it fit?** A hands-on course that answers "
            "with measurements: where the GPU memory of a large model goes, what running out looks like, and "
            "every strategy that makes a model fit, each measured before and after.",
            "",
            "Every page is a notebook of the course, shown with the outputs of a real run. The machine that "
            "produced them is named at the top of each page: "
            + "; ".join(f"**{m}**" for m in machines)
            + ". Read first, then run: each page has a *launch in Colab* and a *download* button.",
            "",
            "A [live memory calculator](calculator) runs the course's estimator in your browser.",
            "",
            "## Course map",
            "",
            "| # | Notebook | What you measure |",
            "|---|---|---|",
            *rows,
            "",
            "## Lab solutions",
            "",
            "The labs above are shown as handed out, with their exercises open. Worked solutions:",
            "",
            *sols,
            "",
            "```{toctree}\n:hidden:\n:caption: Course\n\ncalculator\n" + toc_course + "\n```",
            "",
            "```{toctree}\n:hidden:\n:caption: Lab solutions\n\n" + toc_solutions + "\n```",
            "",
        ]
    )


def assemble(reuse_only: bool) -> tuple[int, int]:
    """Write the site's sources to build/book-src; return (reused, executed) counts."""
    import shutil

    import nbformat

    library, stamp = executed.library_digest(), executed.machine()
    records = gpu_records()
    shutil.rmtree(SRC, ignore_errors=True)
    reused = ran = 0
    stamps, titles = {}, {}
    for relative in [p for _, p, _ in course_map()] + solutions():
        nb, was_cached = executed_notebook(relative, library, reuse_only, stamp)
        reused, ran = reused + was_cached, ran + (not was_cached)
        stamps[relative], titles[relative] = nb.metadata[executed.META], title(nb)
        target = SRC / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(page(nb, relative, records.get(relative, [])), str(target))
    (SRC / "index.md").write_text(home(stamps, titles), encoding="utf-8")
    (SRC / "calculator.md").write_text(calculator.page(wheel().name, _version()), encoding="utf-8")
    return reused, ran


def wheel() -> Path:
    """The vramlab wheel ``make book`` built into build/wheel (as ``make dist`` builds it)."""
    found = sorted((ROOT / "build" / "wheel").glob("vramlab-*.whl"))
    if not found:
        raise SystemExit("book: no wheel in build/wheel: run `make book`, which builds it")
    return found[-1]


def _version() -> str:
    return wheel().name.split("-")[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the course website into build/site.")
    parser.add_argument("--reuse-only", action="store_true", help="fail instead of executing a notebook")
    args = parser.parse_args(argv)
    reused, ran = assemble(args.reuse_only)
    print(f"book: {reused} notebooks reused from build/executed (a test run or an earlier build), {ran} executed now")
    from sphinx.cmd.build import build_main

    code = build_main(["-b", "html", "-q", "-W", "--keep-going", "-c", str(BOOK), str(SRC), str(SITE)])
    if code == 0:
        calculator.install(SITE, calculator.runtime(ROOT / "build" / "pyodide"), wheel())
        print(f"book: built {SITE / 'index.html'}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
