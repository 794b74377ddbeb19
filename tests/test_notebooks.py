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
def test_every_cell_has_a_unique_id(path):
    """nbformat 4.5 requires cell ids (a cell without one is a validation warning, soon an error)."""
    cell_ids = [c.get("id") for c in load(path)["cells"]]
    assert all(cell_ids) and len(set(cell_ids)) == len(cell_ids), f"{path.name}: give every cell a unique id"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_first_code_cell_is_the_shared_setup_cell(path):
    code = [c for c in load(path)["cells"] if c["cell_type"] == "code"]
    assert code and source(code[0]) == SETUP_CELL, (
        f"{path.name}: the first code cell must be vramlab.notebooks.SETUP_CELL"
    )
    assert sum(source(c) == SETUP_CELL for c in code) == 1


@pytest.mark.parametrize("path", CHAPTERS, ids=ids(CHAPTERS))
def test_every_predict_step_asks_for_the_learners_guess_and_reveals_it(path):
    """A "**Predict**" is followed by a cell that sets my_guess before anything is measured,
    and a later cell shows the guess next to the measurement (vramlab.guess.reveal)."""
    cells = load(path)["cells"]
    steps = [i for i, c in enumerate(cells) if c["cell_type"] == "markdown" and "**Predict" in source(c)]
    assert steps, f"{path.name} has no predict step"
    for i in steps:
        guess = next((j for j in range(i + 1, min(i + 3, len(cells))) if "my_guess" in source(cells[j])), None)
        assert guess is not None, f"{path.name}, cell {i}: a predict step without a my_guess cell after it"
        assert any("reveal(" in source(c) and "my_guess" in source(c) for c in cells[guess:]), (
            f"{path.name}, cell {i}: my_guess is never revealed next to a measurement"
        )


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
    boxes = [source(c) for c in cells if source(c).startswith("### The source articles, checked")]
    assert len(boxes) == 1, f"{path.name} needs one 'The source articles, checked' box"
    rows = [line for line in boxes[0].splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0] == "| The article says | What this chapter measured | When the article is right |"
    assert len(rows) > 1 and all(line.count(" | ") == 2 for line in rows), "each claim: said, measured, when right"
    assert markdown.index("### The source articles, checked") < markdown.index("## Summary")


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
    tables = [block for block in bench.split("\n\n") if block.startswith("|")]
    assert len(tables) == 3, "the accuracy table, the peer table and the families without a formula"
    for table in tables:
        assert table.strip() in README, "README's tables differ from bench/estimate_accuracy.md: run `make bench`"
    assert "(target 3%: met)" in bench and "(target 2%: met)" in bench


def test_readme_names_the_test_command_ci_runs():
    assert "make test" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids(NOTEBOOKS))
def test_badges_follow_the_published_repository(path):
    from vramlab.notebooks import REPO_URL, colab_prefix

    first = source(load(path)["cells"][0])
    kind = "labs" if path.parent.name in ("labs", "solutions") else path.parent.name
    assert f"{colab_prefix(REPO_URL)}{kind}/{path.name}" in first, "run `python -m vramlab.notebooks publish`"


def test_publish_points_setup_cell_and_badge_elsewhere():
    from vramlab.notebooks import publish, setup_cell

    nb = publish(load(CHAPTERS[0]), "https://github.com/someone/fork", published=True)
    assert "colab.research.google.com/github/someone/fork/blob/main/chapters/" in source(nb["cells"][0])
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert source(code[0]) == setup_cell("https://github.com/someone/fork") != SETUP_CELL
    with pytest.raises(ValueError, match="not a github.com repository URL"):
        publish(load(CHAPTERS[0]), "https://gitlab.com/a/b/c")


def _fresh_runtime(tmp_path, monkeypatch, pip_fails: bool = False) -> list[list[str]]:
    """A runtime without vramlab: records what the setup cell asks ``python -m`` to run."""
    import importlib.util
    import subprocess
    from types import SimpleNamespace

    calls: list[list[str]] = []
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vramlab" else real_find_spec(name)
    )
    real_run = subprocess.run

    def run(args, **kwargs):  # record `python -m ...`; let anything else (platform's uname) run
        if args[1:2] != ["-m"]:
            return real_run(args, **kwargs)
        calls.append(args[2:])
        return SimpleNamespace(returncode=1 if pip_fails else 0)

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.chdir(tmp_path)  # a fresh runtime: no clone here
    monkeypatch.delenv("VRAMLAB_INSTALL", raising=False)
    return calls


@pytest.mark.parametrize("where", ["env", "wheel", "repository"])
def test_setup_cell_installs_from_the_instructors_choice(where, tmp_path, monkeypatch):
    """vramlab without its dependencies, then the tested versions (python -m vramlab.colab), never torch."""
    from vramlab.notebooks import REPO_URL, setup_cell

    calls = _fresh_runtime(tmp_path, monkeypatch)
    wheel = tmp_path / "vramlab-0.1.0-py3-none-any.whl"
    if where == "env":
        monkeypatch.setenv("VRAMLAB_INSTALL", "https://example.org/vramlab-0.2.0-py3-none-any.whl")
    if where in ("env", "wheel"):
        wheel.write_bytes(b"")
    exec(setup_cell(REPO_URL) if where == "repository" else SETUP_CELL, {})  # a published repository
    want = {
        "env": "https://example.org/vramlab-0.2.0-py3-none-any.whl",
        "wheel": wheel.resolve().as_uri(),
        "repository": f"git+{REPO_URL}",
    }[where]
    assert calls == [["pip", "install", "-q", "--no-deps", want], ["vramlab.colab"]]


def test_an_unpublished_repository_is_never_installed_from_and_the_cell_says_what_to_do(tmp_path, monkeypatch):
    from vramlab.notebooks import is_published

    calls = _fresh_runtime(tmp_path, monkeypatch)
    assert not is_published()  # pyproject.toml: [tool.vramlab] published = false
    with pytest.raises(SystemExit, match=r"^vramlab is not installed: upload the wheel `make dist` builds"):
        exec(SETUP_CELL, {})
    assert calls == [] and "git+" not in SETUP_CELL


def test_a_failing_pip_stops_the_cell_in_one_line(tmp_path, monkeypatch):
    calls = _fresh_runtime(tmp_path, monkeypatch, pip_fails=True)
    monkeypatch.setenv("VRAMLAB_INSTALL", "https://example.org/vramlab-0.2.0-py3-none-any.whl")
    with pytest.raises(SystemExit, match="set os.environ\\['VRAMLAB_INSTALL'\\]"):
        exec(SETUP_CELL, {})
    assert len(calls) == 1  # pip failed: the tested versions are not attempted


def test_the_newest_uploaded_wheel_wins_not_the_last_in_string_order(tmp_path, monkeypatch):
    import os

    calls = _fresh_runtime(tmp_path, monkeypatch)
    newer, older = tmp_path / "vramlab-0.10.0-py3-none-any.whl", tmp_path / "vramlab-0.9.0-py3-none-any.whl"
    older.write_bytes(b"")
    newer.write_bytes(b"")
    os.utime(older, (1, 1))
    exec(SETUP_CELL, {})
    assert calls[0][-1] == newer.resolve().as_uri()


def test_the_tested_versions_are_cis_and_never_torch():
    from vramlab.colab import tested_requirements

    ci = {}
    for line in (ROOT / "requirements" / "ci-constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            ci[name.strip().lower()] = version.strip()
    pins = dict(pin.lower().split("==") for pin in tested_requirements())
    assert "torch" not in pins and pins and all(ci[name] == version for name, version in pins.items())
