"""The website's builder (book/): which notebooks, in which order, with which outputs, and
what each page says about the machine and any GPU runs (issue 16). The site itself is
checked in a browser by tests_site/ (make test-site)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "book"))
import build_site as build  # noqa: E402
import executed_notebooks as executed  # noqa: E402

STAMP = {
    "cpu": "Test CPU",
    "cores": 2,
    "ram_gib": 24.0,
    "gpu": None,
    "torch": "2.13.0+cpu",
    "python": "3.11.7",
    "commit": "abc1234",
    "date": "2026-11-30",
}


def test_course_map_is_every_notebook_in_the_readme_order():
    order = [p for _, p, _ in build.course_map()]
    on_disk = sorted(str(p.relative_to(ROOT)) for d in ("chapters", "labs") for p in (ROOT / d).glob("*.ipynb"))
    assert sorted(order) == on_disk
    assert order[:5] == [
        "chapters/00_start_here.ipynb",
        "chapters/01_bytes_and_parameters.ipynb",
        "chapters/02_training_memory_anatomy.ipynb",
        "chapters/03_activations_and_attention.ipynb",
        "chapters/04_inference_and_kv_cache.ipynb",
    ]
    assert order[5] == "labs/lab01_predict_then_measure.ipynb"
    assert build.solutions() == sorted(str(p.relative_to(ROOT)) for p in (ROOT / "solutions").glob("*.ipynb"))


def test_cache_key_follows_the_notebook_and_the_library(tmp_path):
    nb = tmp_path / "a.ipynb"
    nb.write_text("{}")
    key = executed.cache_key(nb, "lib1")
    assert executed.cache_key(nb, "lib1") == key
    assert executed.cache_key(nb, "lib2") != key
    nb.write_text("{ }")
    assert executed.cache_key(nb, "lib1") != key
    assert len(executed.library_digest()) == 64


def _executed_nb() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell(
            "# 05 · Title\n\n[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            "(https://colab.research.google.com/github/o/r/blob/main/chapters/05.ipynb)"
        ),
        nbformat.v4.new_code_cell("1 + 1"),
    ]
    nb.metadata[executed.META] = {"key": "k", "seconds": 3.2, **STAMP}
    return nb


def test_page_names_the_machine_and_says_when_no_gpu_run_exists():
    out = build.page(_executed_nb(), "chapters/05.ipynb", [])
    box = out.cells[1].source
    assert "CPU: Test CPU, 2 cores, 24.0 GiB RAM, no GPU; torch 2.13.0+cpu" in box
    assert "No GPU run of `chapters/05.ipynb` is recorded" in box
    assert "colab-badge.svg" not in out.cells[0].source  # no image from another host
    assert (
        "[Open in Colab](https://colab.research.google.com/github/o/r/blob/main/chapters/05.ipynb)"
        in out.cells[0].source
    )


def test_gpu_records_appear_on_their_notebooks_page(tmp_path, monkeypatch):
    record = {
        "notebook": "chapters/05.ipynb",
        "device": "NVIDIA H100 80GB HBM3",
        "torch": "2.9.1+cu128",
        "date": "2026-12-01",
        "capacity": 220200960,
        "runs": [{"scenario": "20 MiB holes", "expandable": False, "request_fit": False, "segments": []}],
    }
    (tmp_path / "fragmentation-h100.json").write_text(json.dumps(record))
    (tmp_path / "unlabelled.json").write_text(json.dumps({"device": "x"}))
    monkeypatch.setattr(build, "GPU_RUNS", tmp_path)
    records = build.gpu_records()
    assert list(records) == ["chapters/05.ipynb"]
    box = build.page(_executed_nb(), "chapters/05.ipynb", records["chapters/05.ipynb"]).cells[1].source
    assert "**GPU run** `docs/gpu-runs/fragmentation-h100.json` (device NVIDIA H100 80GB HBM3" in box
    assert "| scenario | expandable | request_fit |" in box and "| 20 MiB holes | False | False |" in box
    assert "- capacity: 220200960" in box and "No GPU run" not in box


def test_reuse_only_refuses_to_execute(tmp_path, monkeypatch):
    monkeypatch.setattr(executed, "CACHE", tmp_path)
    with pytest.raises(SystemExit, match="run `make test` first"):
        build.executed_notebook("chapters/00_start_here.ipynb", "lib", True, STAMP)


def test_saved_copy_is_reused_only_under_its_key(tmp_path, monkeypatch):
    monkeypatch.setattr(executed, "CACHE", tmp_path)
    executed.save(_executed_nb(), "chapters/05.ipynb", "key-1", STAMP, 1.0)
    assert executed.load_if_current("chapters/05.ipynb", "key-1") is not None
    assert executed.load_if_current("chapters/05.ipynb", "key-2") is None


def test_a_broken_gpu_record_is_named(tmp_path, monkeypatch):
    (tmp_path / "bad.json").write_text("{not json")
    monkeypatch.setattr(build, "GPU_RUNS", tmp_path)
    monkeypatch.setattr(build, "ROOT", tmp_path.parent)
    with pytest.raises(SystemExit, match="bad.json is not valid JSON"):
        build.gpu_records()
