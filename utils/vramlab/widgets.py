"""The memory calculator: an ipywidgets panel over :func:`vramlab.estimate`.

``memory_calculator()`` prints a text report of its starting set-up and returns the
interactive panel: model or config.json, batch and sequence sliders, recipe, optimizer,
checkpointing, training or inference, drawn as a stacked bar against GPU sizes with a fits /
does-not-fit verdict. Where widgets cannot run (no kernel: the course's website, nbconvert)
the panel shows a static fallback instead, from its ``text/html`` representation: the
starting set-up's breakdown as a picture and a table of peaks over batch and sequence length.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import sys
from typing import Any

from .estimate import Estimate, estimate
from .hardware import CONTEXT_HEADROOM, GPUS, fits
from .models import REGISTRY, from_hf_config, get_arch
from .recipes import OPTIMIZERS, RECIPES
from .setups import Setup
from .units import format_bytes, parse_bytes

START = Setup(batch=1, seq=2048, recipe="amp-bf16")
BATCHES = (1, 2, 4, 8, 16, 32)  # the fallback table's rows
SEQS = (512, 1024, 2048, 4096, 8192)  # its columns
SEQ_STOPS = tuple(2**k for k in range(6, 18))  # the sequence slider: 64 ... 131072 tokens


def calculate(model: str = "llama-2-7b", config_path: str | None = "", **setup: Any) -> Estimate:
    """The estimate behind the calculator; ``config_path`` (a config.json) overrides ``model``;
    keyword arguments are :class:`Setup` fields (default: batch 1, seq 2048 or the model's
    positions if fewer, amp-bf16)."""
    if config_path is not None and not isinstance(config_path, str):
        raise ValueError(f"config_path is the path of a config.json (a string), got {type(config_path).__name__}")
    arch = from_hf_config(config_path) if config_path and config_path.strip() else get_arch(model)
    start = Setup.of(START, seq=min(START.seq, arch.max_position))  # GPT-2 has 1024 positions
    return estimate(arch, Setup.of(start, **setup))


def fit_report(est: Estimate, gpus: dict[str, int] | None = None, headroom: int = CONTEXT_HEADROOM) -> str:
    """The estimate and a verdict for each GPU, as text."""
    if not isinstance(est, Estimate):
        raise TypeError(f"fit_report needs the Estimate that calculate() returns, got {type(est).__name__}")
    lines = [str(est), f"verdict (keeping {format_bytes(headroom)} for the CUDA context):"]
    for name, size in (gpus or GPUS).items():
        size = parse_bytes(size)  # "80GB", "80GiB" or bytes; anything else says how to write it
        verdict = "fits" if fits(est.peak_bytes, size, headroom) else "does NOT fit"
        lines.append(f"  {name:<12} {format_bytes(size):>10}: {verdict}")
    return "\n".join(lines)


def enable_colab_widgets() -> bool:
    """On Colab, turn on the custom widget manager (``google.colab.output``); elsewhere do
    nothing. Returns whether it was turned on. Without it Colab shows ipywidgets 8 panels as
    blank: then run ``from google.colab import output; output.enable_custom_widget_manager()``."""
    colab = sys.modules.get("google.colab")
    if colab is None:
        return False
    from google.colab import output  # type: ignore[import-not-found]

    output.enable_custom_widget_manager()
    return True


def memory_calculator(**start: Any) -> Any:
    """Print the report for ``start`` (keyword arguments of :func:`calculate`) and return
    the interactive panel (display it as a cell's last expression). The panel's
    ``estimate`` is the :class:`Estimate` it shows now. On Colab it turns on Colab's custom
    widget manager first, which ipywidgets 8 needs to render there."""
    import ipywidgets as w

    enable_colab_widgets()
    first = calculate(**start)
    print(fit_report(first))
    s = {"model": "llama-2-7b", "config_path": "", **first.setup.to_json(), **start}
    seqs = sorted(set(SEQ_STOPS) | {s["seq"]})
    controls = {
        "model": w.Dropdown(options=list(REGISTRY), value=s["model"], description="model"),
        "config_path": w.Text(value=s["config_path"], description="config.json", placeholder="optional path"),
        "batch": w.IntSlider(value=s["batch"], min=1, max=max(256, s["batch"]), description="batch"),
        "seq": w.SelectionSlider(options=seqs, value=s["seq"], description="sequence"),
        "recipe": w.Dropdown(options=RECIPES, value=s["recipe"], description="recipe"),
        "optimizer": w.Dropdown(options=OPTIMIZERS, value=s["optimizer"], description="optimizer"),
        "checkpointing": w.Checkbox(value=s["checkpointing"], description="activation checkpointing"),
        "inference": w.ToggleButtons(options=[("training step", False), ("inference", True)], value=s["inference"]),
    }
    panel = _panel_class()(
        [
            w.HBox([controls["model"], controls["config_path"]]),
            w.HBox([controls["batch"], controls["seq"]]),
            w.HBox([controls["recipe"], controls["optimizer"]]),
            w.HBox([controls["checkpointing"], controls["inference"]]),
            out := w.Output(),
        ]
    )
    panel.estimate, panel.fallback = first, static_html(first)

    def redraw(*_: Any) -> None:
        with out:
            out.clear_output(wait=True)
            try:
                est = calculate(**{k: c.value for k, c in controls.items()})
            except (ValueError, KeyError, FileNotFoundError, TypeError) as err:
                print(f"cannot estimate: {err}")
                return
            panel.estimate = est
            _breakdown_figure(est)
            import matplotlib.pyplot as plt

            plt.show()
            print(fit_report(est))

    for control in controls.values():
        control.observe(redraw, names="value")
    redraw()
    return panel


def _breakdown_figure(est: Estimate) -> Any:
    import matplotlib.pyplot as plt

    from .plots import plot_breakdown

    fig, ax = plt.subplots(figsize=(7, 4))
    when = "steady-state peak" if est.first_step_moment else "peak"
    plot_breakdown({est.model: est.breakdown}, title=f"{est.model}: {when} at {est.peak_moment}", ax=ax)
    return fig


def static_html(est: Estimate) -> str:
    """The calculator where widgets cannot run: ``est``'s breakdown as an embedded PNG and
    a table of its set-up's peak over :data:`BATCHES` x :data:`SEQS`, each cell with the
    smallest GPU of :data:`vramlab.hardware.GPUS` that fits it."""
    import matplotlib.pyplot as plt

    arch = est.arch if est.arch is not None else get_arch(est.model)  # the config it sized, never a name look-up
    fig = _breakdown_figure(est)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    png = base64.b64encode(buffer.getvalue()).decode()
    head = "".join(f"<th>seq {q}</th>" for q in SEQS)
    rows = []
    for b in BATCHES:
        cells = []
        for q in SEQS:
            try:
                peak = estimate(arch, Setup.of(est.setup, batch=b, seq=q)).peak_bytes
            except ValueError:
                cells.append("<td>–</td>")
                continue
            gpu = next((name for name, size in GPUS.items() if fits(peak, size)), "none listed")
            cells.append(f"<td>{format_bytes(peak)}<br><small>{html.escape(gpu)}</small></td>")
        rows.append(f"<tr><th>batch {b}</th>{''.join(cells)}</tr>")
    return (
        '<div class="vramlab-calculator-fallback">'
        "<p><strong>Memory calculator, static view.</strong> The interactive panel needs a running "
        "Python kernel (open this notebook in JupyterLab or Colab). Below: the starting set-up, "
        f"{html.escape(est.setup.describe())}, and its peak over batch and sequence length, with the "
        "smallest listed GPU that fits it.</p>"
        f'<img alt="{html.escape(est.model)} memory breakdown" src="data:image/png;base64,{png}">'
        f"<table><caption>{html.escape(est.model)}: peak memory (formula estimate)</caption>"
        f"<tr><th></th>{head}</tr>{''.join(rows)}</table></div>"
    )


@functools.cache
def _panel_class() -> type:
    """The calculator's panel class (built on first use: ipywidgets is imported lazily)."""
    import ipywidgets as w

    class Panel(w.VBox):
        """A VBox whose static representation (``text/html``) is the calculator's fallback."""

        estimate: Estimate
        fallback: str = ""

        def _repr_mimebundle_(self, **kwargs: Any) -> Any:
            bundle = super()._repr_mimebundle_(**kwargs)
            if bundle is not None and self.fallback:
                bundle["text/html"] = self.fallback
            return bundle

    return Panel
