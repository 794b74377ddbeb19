"""The largest batch that fits a GPU, by formula, and the first recipe that fits when none does.

``vramlab fit llama-2-7b --gpu 80GiB --seq 2048 --recipe amp-bf16`` answers with the largest
batch whose steady-state peak (:func:`vramlab.estimate`, every step after the first) leaves
``CONTEXT_HEADROOM`` free on the card. When batch 1 does not fit, it answers with the first
rung of the decision guide (:func:`vramlab.planner.first_fit`) that does: by the guide's
table of dry runs where it holds the set-up (the Llama-2 models at the sequence the guide
uses), else by formula; the plan says which. ``fit`` never starts a dry run, nor imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .estimate import estimate
from .hardware import CONTEXT_HEADROOM, fits
from .models import ArchConfig, get_arch
from .planner import Plan, first_fit, tabulated
from .results import TooLarge
from .search import largest_passing
from .setups import Setup
from .units import format_bytes, parse_bytes

MAX_BATCH = 2**20  # the search stops here: a model this small fits any batch worth running


@dataclass(frozen=True)
class Fit:
    """The answer for one model, set-up and card. Sizes in bytes; ``batch`` 0 means that even
    batch 1 does not fit, and ``plan`` then holds the first recipe that does."""

    model: str
    gpu_bytes: int
    setup: Setup
    batch: int
    peak_bytes: int
    headroom: int
    plan: Plan | None = None

    def to_json(self) -> dict[str, Any]:
        """The object ``vramlab fit --json`` prints."""
        out: dict[str, Any] = {
            "source": "formula",
            "model": self.model,
            "gpu_bytes": self.gpu_bytes,
            "headroom_bytes": self.headroom,
            "setup": self.setup.to_json(),
            "largest_batch": self.batch,
            "peak_bytes": self.peak_bytes,
        }
        if self.plan is not None:
            out["plan"] = {
                "recipe": self.plan.recipe,
                "devices": self.plan.devices,
                "bytes_per_device": self.plan.bytes_per_device,
                "source": self.plan.source,
            }
        return out

    def __str__(self) -> str:
        card = f"a GPU of {format_bytes(self.gpu_bytes)} ({format_bytes(self.headroom)} kept for the CUDA context)"
        head = f"{self.model} on {card}; {self.setup.describe()}"
        peak = "peak" if self.setup.inference else "steady-state peak"
        if self.batch:
            more = " or more" if self.batch >= MAX_BATCH else ""
            return (
                f"{head}\nlargest batch that fits: {self.batch}{more} "
                f"({peak} {format_bytes(self.peak_bytes)}; formula estimate)"
            )
        plan = self.plan
        rung = "nothing on the guide's ladder fits" if plan is None or not plan.devices else str(plan)
        return (
            f"{head}\nbatch 1 does not fit ({peak} {format_bytes(self.peak_bytes)}); "
            f"the decision guide's first rung that fits (amp-bf16, batch 1, seq {self.setup.seq}): {rung}"
            + (
                f", {format_bytes(plan.bytes_per_device)} per device ({plan.source})"
                if plan is not None and plan.devices
                else ""
            )
        )


def _peak(arch: ArchConfig, setup: Setup, batch: int) -> int | None:
    """The steady-state peak at ``batch``, or None past what any tensor can hold."""
    try:
        return estimate(arch, Setup.of(setup, batch=batch)).peak_bytes
    except TooLarge:
        return None


def largest_batch(
    model: str | ArchConfig, gpu_bytes: int, setup: Setup | None = None, headroom: int = CONTEXT_HEADROOM
) -> Fit:
    """The largest batch of ``setup`` (its batch is ignored) whose steady-state peak fits
    ``gpu_bytes`` with ``headroom`` spare: :func:`vramlab.search.largest_passing` on the
    formula (the peak grows with the batch). Training and inference (a prefill) both work."""
    arch = get_arch(model)
    setup = Setup.of(setup, batch=1)
    gpu_bytes = parse_bytes(gpu_bytes)  # bytes, or "80GiB" / "80GB"; NaN and fractions say what to write
    if gpu_bytes <= 0:
        raise ValueError("the GPU size must be more than 0 bytes, e.g. '24GiB' or '80GB'")

    def ok(batch: int) -> bool:
        peak = _peak(arch, setup, batch)
        return peak is not None and fits(peak, gpu_bytes, headroom)

    low = largest_passing(ok, 1, MAX_BATCH).largest  # doubling, then bisection
    if not low:
        peaks = "dry-run" if tabulated(arch, 1, setup.seq) else "formula"  # no dry run on the spot: fit is instant
        plan = None if setup.inference else first_fit(arch, gpu_bytes, 1, setup.seq, headroom, peaks)
        return Fit(arch.name, gpu_bytes, setup, 0, _peak(arch, setup, 1) or 0, headroom, plan)
    return Fit(arch.name, gpu_bytes, Setup.of(setup, batch=low), low, _peak(arch, setup, low) or 0, headroom)
