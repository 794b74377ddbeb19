"""pytest hooks for the whole repository.

1. A per-notebook timing report at the end of a run: nbval turns each notebook cell into a
   test item; this adds the cells' times up per notebook and prints them last, flagging any
   notebook over the course's 60-second budget (a report, not a failing test: timings vary
   between machines).
2. The website's executed notebooks: each notebook whose every cell passed is saved with its
   outputs under ``build/executed/`` (``book/executed_notebooks.py``), so ``make book`` publishes the
   outputs of this run instead of executing every notebook a second time.
"""

from __future__ import annotations

import importlib.util
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

NOTEBOOK_BUDGET_S = 60.0
ROOT = Path(__file__).resolve().parent
_durations: dict[str, float] = defaultdict(float)
_notebooks: dict[str, dict[str, Any]] = {}  # path -> {"file": its IPyNbFile, "passed": cells passed}


def _executed_module() -> Any:
    spec = importlib.util.spec_from_file_location("book_executed", ROOT / "book" / "executed_notebooks.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_runtest_logreport(report):  # type: ignore[no-untyped-def]
    path = report.nodeid.split("::")[0]
    if path.endswith(".ipynb"):
        _durations[path] += report.duration


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    cell, outputs = getattr(item, "cell", None), getattr(item, "test_outputs", None)
    if report.when != "call" or cell is None or not str(item.fspath).endswith(".ipynb"):
        return
    entry = _notebooks.setdefault(str(item.fspath), {"file": item.parent, "passed": 0})
    if report.passed and outputs is not None:
        entry["passed"] += 1
        cell.outputs = outputs
        cell.execution_count = entry["passed"]


def pytest_sessionfinish(session):  # type: ignore[no-untyped-def]
    done = {
        path: entry
        for path, entry in _notebooks.items()
        if entry["passed"] == sum(c.cell_type == "code" for c in entry["file"].nb.cells)
    }
    if not done:
        return
    executed = _executed_module()
    library, stamp = executed.library_digest(), executed.machine()
    for path, entry in done.items():
        relative = Path(path).resolve().relative_to(ROOT)
        key = executed.cache_key(ROOT / relative, library)
        executed.save(entry["file"].nb, relative, key, stamp, _durations.get(str(relative), 0.0))


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):  # type: ignore[no-untyped-def]
    if not _durations:
        return
    terminalreporter.section("notebook durations")
    for path, seconds in sorted(_durations.items()):
        flag = "  OVER THE 60 s BUDGET" if seconds > NOTEBOOK_BUDGET_S else ""
        terminalreporter.write_line(f"{seconds:7.1f} s  {path}{flag}")
