"""The memory calculator: an ipywidgets panel over :func:`vramlab.estimate`.

``memory_calculator()`` prints a text report of its starting set-up (so the numbers show
where widgets cannot render: nbval, nbconvert, a terminal) and returns the interactive
panel: model or config.json, batch, sequence, recipe, optimizer, checkpointing, training or
inference, drawn as a stacked bar against GPU sizes with a fits / does-not-fit verdict.
"""

from __future__ import annotations

from typing import Any

from .estimate import Estimate, estimate
from .hardware import CONTEXT_HEADROOM, GPUS, fits
from .models import REGISTRY, from_hf_config, get_arch
from .recipes import OPTIMIZERS, RECIPES
from .setups import Setup
from .units import format_bytes

START = Setup(batch=1, seq=2048, recipe="amp-bf16")


def calculate(model: str = "llama-2-7b", config_path: str = "", **setup: Any) -> Estimate:
    """The estimate behind the calculator; ``config_path`` (a config.json) overrides ``model``;
    keyword arguments are :class:`Setup` fields (default: batch 1, seq 2048, amp-bf16)."""
    arch = from_hf_config(config_path) if config_path.strip() else get_arch(model)
    return estimate(arch, Setup.of(START, **setup))


def fit_report(est: Estimate, gpus: dict[str, int] | None = None, headroom: int = CONTEXT_HEADROOM) -> str:
    """The estimate and a verdict for each GPU, as text."""
    lines = [str(est), f"verdict (keeping {format_bytes(headroom)} for the CUDA context):"]
    for name, size in (gpus or GPUS).items():
        verdict = "fits" if fits(est.peak_bytes, size, headroom) else "does NOT fit"
        lines.append(f"  {name:<12} {format_bytes(size):>10}: {verdict}")
    return "\n".join(lines)


def memory_calculator(**start: Any) -> Any:
    """Print the report for ``start`` (keyword arguments of :func:`calculate`) and return
    the interactive panel (display it as a cell's last expression)."""
    import ipywidgets as w
    import matplotlib.pyplot as plt

    from .plots import plot_breakdown

    first = calculate(**start)
    print(fit_report(first))
    s = {"model": "llama-2-7b", "config_path": "", **first.setup.to_json(), **start}
    controls = {
        "model": w.Dropdown(options=list(REGISTRY), value=s["model"], description="model"),
        "config_path": w.Text(value=s["config_path"], description="config.json", placeholder="optional path"),
        "batch": w.BoundedIntText(value=s["batch"], min=1, max=1 << 20, description="batch"),
        "seq": w.BoundedIntText(value=s["seq"], min=1, max=1 << 22, description="sequence"),
        "recipe": w.Dropdown(options=RECIPES, value=s["recipe"], description="recipe"),
        "optimizer": w.Dropdown(options=OPTIMIZERS, value=s["optimizer"], description="optimizer"),
        "checkpointing": w.Checkbox(value=s["checkpointing"], description="activation checkpointing"),
        "inference": w.ToggleButtons(options=[("training step", False), ("inference", True)], value=s["inference"]),
    }
    out = w.Output()

    def redraw(*_: Any) -> None:
        with out:
            out.clear_output(wait=True)
            try:
                est = calculate(**{k: c.value for k, c in controls.items()})
            except (ValueError, KeyError, FileNotFoundError) as err:
                print(f"cannot estimate: {err}")
                return
            fig, ax = plt.subplots(figsize=(7, 4))
            when = "steady-state peak" if est.first_step_moment else "peak"
            plot_breakdown({est.model: est.breakdown}, title=f"{est.model}: {when} at {est.peak_moment}", ax=ax)
            plt.show()
            print(fit_report(est))

    for control in controls.values():
        control.observe(redraw, names="value")
    redraw()
    return w.VBox(
        [
            w.HBox([controls["model"], controls["config_path"]]),
            w.HBox([controls["batch"], controls["seq"]]),
            w.HBox([controls["recipe"], controls["optimizer"]]),
            w.HBox([controls["checkpointing"], controls["inference"]]),
            out,
        ]
    )
