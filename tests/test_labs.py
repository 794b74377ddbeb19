"""The lab generator and the checks, on a fixture notebook."""

import shutil
from pathlib import Path

import pytest

from vramlab import checks
from vramlab.labs import LabError, generate, make_lab, stub_code
from vramlab.notebooks import is_stripped, load, source

FIXTURE = Path(__file__).parent / "fixtures" / "lab99_fixture.ipynb"


def run_cells(nb):
    scope = {}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            exec(source(cell), scope)
    return scope


def test_generator_stubs_solution_regions_and_strips_outputs():
    lab = make_lab(load(FIXTURE), "fixture")
    code = source(lab["cells"][1])
    assert "return 4 * n" not in code and "raise NotImplementedError" in code
    assert "### BEGIN SOLUTION" not in code
    assert "The answer is 4 bytes" not in source(lab["cells"][0])
    assert is_stripped(lab)


def test_lab_as_handed_out_reports_not_attempted(capsys):
    run_cells(make_lab(load(FIXTURE), "fixture"))
    assert "not attempted yet" in capsys.readouterr().out


def test_solution_passes(capsys):
    run_cells(load(FIXTURE))
    assert "fp32 bytes: passed" in capsys.readouterr().out


def test_wrong_answer_fails_with_a_hint():
    def wrong(n):
        return 2 * n  # thinks fp32 is 2 bytes

    with pytest.raises(checks.CheckFailed, match="four bytes each") as info:
        checks.check_bytes("fp32 bytes", wrong, [((10,), {}, 40)], 0.0, "four bytes each")
    assert "off by 20 B (50.00%)" in str(info.value)


def test_answer_tuned_to_one_case_fails():
    def tuned(n):
        return 40

    with pytest.raises(checks.CheckFailed):
        checks.check_bytes("fp32 bytes", tuned, [((10,), {}, 40), ((7,), {}, 28)], 0.0, "four bytes each")


@pytest.mark.parametrize("bad", [None, "40", float("nan"), True])
def test_non_numbers_fail(bad):
    with pytest.raises(checks.CheckFailed, match="expected a number"):
        checks.check_bytes("x", lambda n: bad, [((1,), {}, 4)], 0.1, "h")


def test_check_true():
    result = checks.check_true("fits", lambda: True, lambda got: (got is True, "it fits"))
    assert result.passed
    with pytest.raises(checks.CheckFailed, match="does not fit"):
        checks.check_true("fits", lambda: False, lambda got: (got is True, "does not fit"))


def test_generator_rejects_broken_regions():
    with pytest.raises(LabError, match="inside a function"):
        stub_code("### BEGIN SOLUTION\nx = 1\n### END SOLUTION")
    with pytest.raises(LabError, match="never closed"):
        stub_code("def f():\n    ### BEGIN SOLUTION\n    return 1")
    with pytest.raises(LabError, match="without"):
        stub_code("def f():\n    return 1\n    ### END SOLUTION")
    with pytest.raises(LabError, match="no '### BEGIN SOLUTION' region"):
        make_lab({"cells": [{"cell_type": "code", "source": "x = 1", "outputs": [], "metadata": {}}]})


def test_generate_writes_then_reports_fresh(tmp_path):
    solutions, labs = tmp_path / "solutions", tmp_path / "labs"
    solutions.mkdir()
    shutil.copy(FIXTURE, solutions / FIXTURE.name)
    assert generate(solutions, labs, check=True) == [labs / FIXTURE.name]  # stale: missing
    assert generate(solutions, labs) == [labs / FIXTURE.name]
    assert generate(solutions, labs, check=True) == []
