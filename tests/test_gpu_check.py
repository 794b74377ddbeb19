"""The plumbing of ``make gpu-check`` (vramlab.gpu_check), on a CPU: it runs notebooks cell by
cell in their own processes, goes on past a failing cell, writes valid records, and refuses the
T4 emulation without a GPU in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from vramlab import gpu_check

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "utils"), "OMP_NUM_THREADS": "1"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vramlab.gpu_check", *args], capture_output=True, text=True, env=ENV)


def test_a_chapter_runs_and_its_record_is_valid_json_the_site_shows(tmp_path):
    done = run("--only", "10", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    (record_file,) = tmp_path.glob("*.json")
    record = json.loads(record_file.read_text())
    code_cells = [c for c in nbformat.read(ROOT / record["notebook"], 4).cells if c.cell_type == "code"]
    assert record["notebook"] == "chapters/10_freeing_reusing_and_the_tools.ipynb"
    assert record["status"] == "ran" and record["failed"] == 0 and record["passed"] == len(code_cells)
    assert {"device", "torch", "date", "commit", "transformers", "vramlab"} <= set(record)
    assert all(isinstance(c["tracked_peak"], int) and c["seconds"] >= 0 for c in record["cells"])
    assert max(c["tracked_peak"] for c in record["cells"]) >= 64 * 2**20  # cell 6 holds a 64 MiB tensor
    assert "10_freeing_reusing_and_the_tools.ipynb: 12 passed, 0 failed" in done.stdout


def test_a_failing_cell_is_recorded_and_the_next_one_runs(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_code_cell("raise ValueError('bad | cell\\nsecond line')"),
        nbformat.v4.new_code_cell("import time\ntime.sleep(5)"),
        nbformat.v4.new_code_cell("assert x == 1"),
    ]
    path = tmp_path / "probe.ipynb"
    nbformat.write(nb, path)
    done = run("--child", str(path), "--timeout", "1")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert [c["status"] for c in result["cells"]] == ["pass", "fail", "fail", "pass"]
    assert result["cells"][1]["error"] == "ValueError: bad / cell"  # first line, no table-breaking bar
    assert result["cells"][2]["error"].startswith("TimeoutError: cell ran past 1 s")
    assert (result["passed"], result["failed"]) == (2, 2)


def test_emulating_a_t4_without_a_gpu_is_refused_in_one_line():
    done = run("--emulate", "t4")
    assert done.returncode == 2
    assert done.stdout.strip() == (
        "gpu_check: --emulate t4 caps a real GPU's allocator; this machine has none. Run without it."
    )
    assert done.stderr == ""


def test_missing_packages_are_found_from_a_notebooks_imports(monkeypatch):
    real = gpu_check.importlib.util.find_spec
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda n: None if n == "torchao" else real(n))
    assert gpu_check.missing_packages("import torchao\nfrom transformers import AutoConfig") == ["torchao"]
    assert gpu_check.missing_packages("from vramlab import minilm") == []  # the MiniLM package is installed here
    assert gpu_check.missing_packages("x = 1") == []


def test_an_unknown_notebook_prefix_says_so():
    with pytest.raises(SystemExit, match="no notebook starts with 99"):
        gpu_check.notebooks(["99"])


def test_the_cuda_tests_it_names_exist():
    for test in gpu_check.CUDA_TESTS:
        path, name = test.split("::")
        assert f"def {name}(" in (ROOT / path).read_text(), test
