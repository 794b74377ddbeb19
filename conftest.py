"""pytest hooks for the whole repository: a per-notebook timing report at the end of a run.

nbval turns each notebook cell into a test item; this adds the cells' times up per notebook
and prints them last, flagging any notebook over the course's 60-second budget (a report,
not a failing test: timings vary between machines).
"""

from __future__ import annotations

from collections import defaultdict

import pytest

NOTEBOOK_BUDGET_S = 60.0
_durations: dict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report):  # type: ignore[no-untyped-def]
    path = report.nodeid.split("::")[0]
    if path.endswith(".ipynb"):
        _durations[path] += report.duration


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):  # type: ignore[no-untyped-def]
    if not _durations:
        return
    terminalreporter.section("notebook durations")
    for path, seconds in sorted(_durations.items()):
        flag = "  OVER THE 60 s BUDGET" if seconds > NOTEBOOK_BUDGET_S else ""
        terminalreporter.write_line(f"{seconds:7.1f} s  {path}{flag}")
