"""The memory calculator panel: sliders that recompute, and a static fallback (issue 16)."""

import re

import matplotlib
import pytest

from vramlab import estimate
from vramlab.widgets import BATCHES, SEQS, memory_calculator, static_html

matplotlib.use("Agg")


@pytest.fixture
def panel(capsys):
    p = memory_calculator(model="gpt2", batch=1, seq=512, recipe="fp32", optimizer="adamw")
    capsys.readouterr()
    return p


def _control(panel, description):
    for row in panel.children[:-1]:
        for control in row.children:
            if getattr(control, "description", None) == description:
                return control
    raise LookupError(description)


def test_moving_the_sliders_recomputes_the_estimate(panel):
    _control(panel, "batch").value = 8
    _control(panel, "sequence").value = 1024
    assert panel.estimate.setup.batch == 8 and panel.estimate.setup.seq == 1024
    assert panel.estimate.peak_bytes == estimate("gpt2", batch=8, seq=1024, recipe="fp32").peak_bytes


def test_the_static_fallback_is_the_html_of_the_panel(panel):
    bundle = panel._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    html = bundle["text/html"]
    assert html == panel.fallback and 'src="data:image/png;base64,' in html
    cells = re.findall(r"<td>([^<]+)<br>", html)
    assert len(cells) + html.count("<td>–</td>") == len(BATCHES) * len(SEQS)
    # the first cell is the starting model at batch 1, seq 512: the same number estimate gives
    from vramlab.units import format_bytes

    assert cells[0] == format_bytes(estimate("gpt2", batch=1, seq=512, recipe="fp32").peak_bytes)


def test_the_fallback_marks_set_ups_the_model_cannot_take():
    est = estimate("gpt2", batch=1, seq=1024)
    html = static_html(est)
    assert html.count("<td>–</td>") == len(BATCHES) * sum(q > 1024 for q in SEQS)  # GPT-2 has 1024 positions


def test_breakdown_plot_draws_the_gpus_its_bars_reach():
    """Every GPU below the tallest bar and the first that holds it get a line and a legend
    entry, each with its own dash pattern (the fifth, H100, used to be dropped)."""
    from vramlab.hardware import GPUS
    from vramlab.plots import LINE_STYLES, plot_breakdown

    assert len(set(map(str, LINE_STYLES))) == len(LINE_STYLES) >= len(GPUS)

    def drawn(total: int) -> list[str]:
        ax = plot_breakdown({"x": {"parameters": total}})
        return [text.get_text() for text in ax.get_legend().get_texts() if text.get_text() in GPUS]

    assert drawn(2**30) == ["T4 (16 GB)"]
    assert drawn(30 * 2**30) == ["T4 (16 GB)", "L4 (24 GB)", "A100 40GB"]
    assert sorted(drawn(10**13)) == sorted(GPUS) and len(GPUS) >= 7  # none holds it: every line


def test_on_colab_the_calculator_turns_on_colabs_widget_manager(monkeypatch):
    import sys
    import types

    from vramlab import widgets

    assert widgets.enable_colab_widgets() is False  # not Colab: nothing to do
    turned_on = []
    output = types.SimpleNamespace(enable_custom_widget_manager=lambda: turned_on.append(True))
    colab = types.ModuleType("google.colab")
    colab.output = output
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.output", output)
    widgets.memory_calculator(model="gpt2", batch=1, seq=128)
    assert turned_on == [True]
