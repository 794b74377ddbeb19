"""Plots the course reuses. Every plot has a title, axis labels with units, and a legend.

matplotlib is imported inside each function, so importing vramlab stays light.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .hardware import GPUS
from .results import ROLES
from .units import GiB, MiB

if TYPE_CHECKING:
    from .dryrun import DryRunResult
    from .measure import Measurement

PHASE_COLORS = {"before": "#999999", "forward": "#1f77b4", "backward": "#d62728", "optimizer": "#2ca02c"}
ROLE_COLORS = dict(zip(ROLES, ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3")))


LINE_STYLES = ("--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2, 1, 2)))
"""One dash pattern per GPU of :data:`vramlab.hardware.GPUS`, so no two GPU lines look alike."""


def _reached(gpus: Mapping[str, int], tallest: int) -> dict[str, int]:
    """The GPUs (smallest first) up to and including the first that holds ``tallest`` bytes:
    the lines a bar of that height is read against. All of them when none holds it."""
    out: dict[str, int] = {}
    for name, size in sorted(gpus.items(), key=lambda kv: kv[1]):
        out[name] = size
        if size >= tallest:
            break
    return out


def _unit(max_bytes: float) -> tuple[str, float]:
    return ("GiB", GiB) if max_bytes >= GiB else ("MiB", MiB)


def plot_timeline(
    m: Measurement | DryRunResult, title: str = "Live tensor memory during the step", ax: Any = None
) -> Any:
    """Live bytes after every op, coloured by phase (forward, backward, optimizer), of a
    measurement or a dry run recorded with ``timeline=True``."""
    import matplotlib.pyplot as plt

    if not m.timeline:
        raise ValueError("this measurement has no timeline: measure it with measure(..., timeline=True)")
    ax = ax or plt.subplots(figsize=(8, 3.5))[1]
    unit, div = _unit(max(p.live_bytes for p in m.timeline))
    for phase, color in PHASE_COLORS.items():
        points = [p for p in m.timeline if p.phase == phase]
        if points:
            ax.plot(
                [p.index for p in points], [p.live_bytes / div for p in points], ".", ms=3, color=color, label=phase
            )
    ax.axhline(m.peak_bytes / div, color="k", ls="--", lw=1, label=f"peak {m.peak_bytes / div:.2f} {unit}")
    ax.set(title=f"{title} ({m.source})", xlabel="op number", ylabel=f"live tensors ({unit})")
    ax.legend(loc="best", fontsize=8)
    return ax


def plot_breakdown(
    bars: Mapping[str, Mapping[str, int]],
    title: str = "Memory at the peak, by role",
    gpus: Mapping[str, int] | None = None,
    ax: Any = None,
) -> Any:
    """Stacked bars of parameters / gradients / optimizer / activations / other per set-up,
    with horizontal lines for GPU sizes: by default every GPU of :data:`vramlab.hardware.GPUS`
    smaller than the tallest bar and the first that holds it (pass ``gpus={}`` for none)."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(8, 4))[1]
    totals = [sum(b.values()) for b in bars.values()]
    lines = _reached(GPUS, max(totals)) if gpus is None else gpus
    unit, div = _unit(max(totals + list(lines.values())))
    names = list(bars)
    bottom = [0.0] * len(names)
    for role in ROLES:
        values = [bars[n].get(role, 0) / div for n in names]
        ax.bar(names, values, bottom=bottom, color=ROLE_COLORS[role], label=role)
        bottom = [b + v for b, v in zip(bottom, values)]
    styles = itertools.cycle(LINE_STYLES)  # one line per GPU, none dropped
    for (gpu, size), style in zip(lines.items(), styles):
        ax.axhline(size / div, color="k", ls=style, lw=1, label=gpu)
    ax.set(title=title, ylabel=f"memory ({unit})")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return ax


def plot_lines(
    x: Sequence[float],
    series: Mapping[str, Sequence[float]],
    title: str,
    xlabel: str,
    ylabel: str,
    ax: Any = None,
    **style: Any,
) -> Any:
    """A labelled line plot of several series against one x axis."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(7, 3.5))[1]
    for name, ys in series.items():
        ax.plot(list(x), list(ys), marker="o", label=name, **style)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.legend(fontsize=8)
    return ax


def plot_segments(segments: list[dict], title: str, ax: Any = None) -> Any:
    """Draw allocator segments (``torch.cuda.memory._snapshot()["segments"]`` or
    :meth:`vramlab.allocator_model.CachingAllocatorModel.snapshot`): one bar per segment,
    live blocks filled, cached (free) blocks hatched."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ax = ax or plt.subplots(figsize=(8, 0.35 * max(len(segments), 4) + 1))[1]
    for row, seg in enumerate(segments):
        start = 0
        for block in seg["blocks"]:
            live = block["state"].startswith("active")
            ax.barh(
                row,
                block["size"] / MiB,
                left=start / MiB,
                color="#c44e52" if live else "white",
                edgecolor="k",
                hatch=None if live else "//",
                height=0.7,
            )
            start += block["size"]
    ax.set(title=title, xlabel="offset in segment (MiB)", ylabel="segment", yticks=range(len(segments)))
    ax.invert_yaxis()
    ax.legend(
        handles=[
            Patch(facecolor="#c44e52", edgecolor="k", label="live block"),
            Patch(facecolor="white", edgecolor="k", hatch="//", label="cached (reserved, free)"),
        ],
        fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
    )
    return ax
