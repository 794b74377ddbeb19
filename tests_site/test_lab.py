"""`make lab` in a real browser (issue 16): the server starts, chapter 00 opens, and the memory
calculator of chapter 02 renders and recomputes when its batch slider moves. A screenshot is
kept as a test artefact (build/test-artifacts/lab-calculator.png), not committed."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "build" / "test-artifacts"  # screenshots: test artefacts, not committed
URL = re.compile(r"(http://127\.0\.0\.1:\d+/lab[^\s]*\?token=\w+)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start `make lab` on a free port and yield the URL it prints (with its token)."""
    isolated = tmp_path_factory.mktemp("jupyter")  # no user settings or saved workspaces
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(isolated / "config"),
        "JUPYTERLAB_WORKSPACES_DIR": str(isolated / "workspaces"),
        "JUPYTERLAB_SETTINGS_DIR": str(isolated / "settings"),
    }
    proc = subprocess.Popen(
        ["make", "--no-print-directory", "lab", f"PORT={_free_port()}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    assert proc.stdout is not None
    seen, deadline, url = [], time.time() + 120, None
    while time.time() < deadline and url is None:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        match = URL.search(line)
        url = match.group(1) if match else None
    if url is None:
        os.killpg(proc.pid, signal.SIGTERM)
        pytest.fail("make lab printed no URL within 120 s:\n" + "".join(seen[-30:]))
    try:
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _run_cell(page, cell) -> None:
    cell.scroll_into_view_if_needed()
    cell.locator(".jp-InputArea-prompt").click()
    page.keyboard.press("Escape")
    page.keyboard.press("Control+Enter")


def test_make_lab_opens_chapter_00(page, lab_url):
    assert "00_start_here.ipynb" in lab_url
    page.goto(lab_url)
    page.wait_for_selector(".jp-NotebookPanel", timeout=60_000)
    heading = page.locator(".jp-NotebookPanel:visible .jp-MarkdownOutput h1").first
    heading.wait_for(timeout=30_000)
    assert heading.inner_text().startswith("00")


def test_calculator_renders_and_follows_its_slider(page, lab_url):
    base = lab_url.split("/lab", 1)[0]
    token = lab_url.rsplit("token=", 1)[1]
    page.goto(f"{base}/lab/tree/chapters/02_training_memory_anatomy.ipynb?reset&token={token}")  # fresh workspace
    panel = page.locator(".jp-NotebookPanel:visible")
    panel.locator(".jp-CodeCell").first.wait_for(timeout=60_000)
    panel.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(timeout=90_000)
    _run_cell(page, panel.locator(".jp-CodeCell").first)  # the setup cell
    calculator = panel.locator(".jp-CodeCell", has_text="memory_calculator(model=")
    _run_cell(page, calculator)
    slider = calculator.locator(".widget-slider", has_text="batch")
    slider.wait_for(timeout=120_000)
    output = calculator.locator(".widget-output")
    output.locator("img").first.wait_for(timeout=60_000)
    before = output.inner_text()
    assert "peak" in before and "verdict" in before
    handle = slider.locator(".noUi-handle")
    handle.focus()
    for _ in range(3):
        page.keyboard.press("ArrowRight")
    readout = slider.locator(".widget-readout")
    page.wait_for_function("el => el.innerText.trim() === '4'", arg=readout.element_handle(), timeout=30_000)
    page.wait_for_function(
        "([el, old]) => el.innerText !== old && el.innerText.includes('verdict')",
        arg=[output.element_handle(), before],
        timeout=60_000,
    )
    after = output.inner_text()
    from vramlab import estimate
    from vramlab.units import format_bytes

    setup = dict(batch=4, seq=2048, recipe="amp-bf16", optimizer="adamw")
    peak = format_bytes(estimate("llama-2-7b", **setup).peak_bytes)
    assert peak in after and peak not in before  # the panel now shows batch 4's peak
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    calculator.screenshot(path=str(ARTIFACTS / "lab-calculator.png"))
