"""Notebook hygiene: what a reader notices first, enforced."""

import re
from pathlib import Path

import pytest

from vramlab.labs import generate
from vramlab.notebooks import SETUP_CELL, is_stripped, load, source

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p for d in ("chapters", "labs", "solutions") for p in (ROOT / d).glob("*.ipynb"))
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))
README = (ROOT / "README.md").read_text()


def ids(paths):
    return [str(p.relative_to(ROOT)) for p in paths]


def test_there_are_notebooks():
    assert CHAPTERS, "no chapters found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_stored_without_outputs(path):
    assert is_stripped(load(path)), f"{path.name} has outputs or execution counts: run `make strip`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_first_code_cell_is_the_shared_setup_cell(path):
    code = [c for c in load(path)["cells"] if c["cell_type"] == "code"]
    assert code and source(code[0]) == SETUP_CELL, (
        f"{path.name}: the first code cell must be vramlab.notebooks.SETUP_CELL"
    )
    assert sum(source(c) == SETUP_CELL for c in code) == 1


@pytest.mark.parametrize("path", CHAPTERS, ids=ids(CHAPTERS))
def test_chapter_template(path):
    cells = load(path)["cells"]
    first = source(cells[0])
    assert first.startswith("# "), "a chapter opens with its title"
    assert "colab.research.google.com" in first and path.name in first, (
        "the first cell has an Open in Colab badge for this file"
    )
    markdown = "\n".join(source(c) for c in cells if c["cell_type"] == "markdown")
    for heading in ("## Learning objectives", "## Check your understanding", "## Summary", "## Further reading"):
        assert heading in markdown, f"{path.name} lacks '{heading}'"
    order = [markdown.index(h) for h in ("## Learning objectives", "## Summary", "## Further reading")]
    assert order == sorted(order), "objectives first, summary and further reading last"
    code = "\n".join(source(c) for c in cells if c["cell_type"] == "code")
    assert "assert " in code, "a chapter compares prediction and measurement with asserts"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_nothing_downloads_at_run_time(path):
    code = "\n".join(source(c) for c in load(path)["cells"] if c["cell_type"] == "code" and source(c) != SETUP_CELL)
    for pattern in ("from_pretrained(", "load_dataset(", "urlopen(", "requests.get(", "wget ", "hf_hub_download("):
        if pattern == "from_pretrained(" and "HF_HUB_OFFLINE" in code:
            continue
        assert pattern not in code, f"{path.name} downloads at run time ({pattern})"


def test_labs_are_generated_from_solutions():
    stale = generate(ROOT / "solutions", ROOT / "labs", check=True)
    assert not stale, f"stale labs, run `make labs`: {stale}"
    assert {p.name for p in (ROOT / "labs").glob("*.ipynb")} == {p.name for p in (ROOT / "solutions").glob("*.ipynb")}


def course_map_rows():
    section = README.split("## Course map", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"L?\d+", cells[0]):
            name = re.search(r"`([^`]+)`", cells[1]).group(1)
            link = re.search(r"\]\(([^)]+)\)", cells[1])
            rows.append((name, link.group(1) if link else None, cells[3]))
    return rows


def test_course_map_matches_the_files():
    rows = course_map_rows()
    assert rows, "README has no course map"
    ready = {name for name, _, status in rows if status == "ready"}
    for name, link, status in rows:
        assert status in ("ready", "planned"), f"{name}: unknown status {status!r}"
        if status == "ready":
            assert link and (ROOT / link).is_file(), f"{name} is marked ready but {link} does not exist"
            if name.startswith("lab"):
                assert (ROOT / "solutions" / f"{name}.ipynb").is_file() and (ROOT / "labs" / f"{name}.ipynb").is_file()
        else:
            assert link is None, f"{name} is planned but linked"
    on_disk = {p.stem for p in CHAPTERS} | {p.stem for p in (ROOT / "solutions").glob("*.ipynb")}
    assert on_disk == ready, (
        f"notebooks missing from the map: {on_disk - ready}; ready rows without files: {ready - on_disk}"
    )


def test_readme_accuracy_table_is_the_bench_output():
    bench = (ROOT / "bench" / "estimate_accuracy.md").read_text()
    table = [line for line in bench.splitlines() if line.startswith("|")]
    assert "\n".join(table) in README, "README's accuracy table differs from bench/estimate_accuracy.md"
    assert "(target 5%: met)" in bench and "(target 2%: met)" in bench


def test_readme_names_the_test_command_ci_runs():
    assert "make test" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()
