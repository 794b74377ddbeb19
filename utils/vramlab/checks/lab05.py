"""Checks of Lab 5, *Shard it*.

The model (TinyGPT, fp32 AdamW) does not fit the per-rank budget when one process trains it.
The learner's ``plan()`` returns how to train it on 2 ranks: a dict with ``strategy`` (one of
:data:`vramlab.parallel.STRATEGIES`), ``batch_per_rank`` (sequences per rank per step) and
``checkpointing`` (bool). :func:`check_sharding` starts the 2 ranks, trains ``STEPS`` steps
under the budget on every rank, and passes when no rank runs out of memory, every rank's
measured peak is within the budget, and the mean loss of every step equals the
single-process reference (the whole global batch of ``GLOBAL_BATCH`` sequences per step)
within ``LOSS_RTOL``. The ranks always run as CPU processes (gloo), so the budget is enforced
by the storage tracker and means the same on every machine.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from .. import parallel as PL
from ..distributed import Rank, RankFailed, launch
from ..units import MiB, format_bytes
from . import FAILED, NOT_ATTEMPTED, PASSED, CheckResult, attempt, give_verdict

CFG = dict(vocab_size=256, seq_len=33, hidden=256, layers=4, heads=4)
WORLD = 2
GLOBAL_BATCH = 4
STEPS = 3
BUDGET = 50 * MiB
LOSS_RTOL = 1e-4
KEYS = {"strategy", "batch_per_rank", "checkpointing"}


@functools.lru_cache(maxsize=1)
def _reference() -> dict[str, Any]:
    return PL.train(Rank.in_process(), "single", CFG, GLOBAL_BATCH, STEPS)


def reference_losses() -> tuple[float, ...]:
    """Losses of one process training the whole global batch each step (no budget)."""
    return tuple(_reference()["losses"])


def single_process_peak() -> int:
    """Measured peak of that same single-process run (what does not fit the budget)."""
    return _reference()["peak_bytes"]


def validate(plan: Any) -> str:
    """'' if ``plan`` is well formed, else what is wrong with it."""
    if not isinstance(plan, dict):
        return f"plan() must return a dict with keys {sorted(KEYS)}, got {type(plan).__name__}"
    if set(plan) != KEYS:
        return f"plan() must return exactly the keys {sorted(KEYS)}, got {sorted(plan)}"
    if plan["strategy"] not in PL.STRATEGIES:
        return f"unknown strategy {plan['strategy']!r}; choose one of {PL.STRATEGIES}"
    if (
        isinstance(plan["batch_per_rank"], bool)
        or not isinstance(plan["batch_per_rank"], int)
        or plan["batch_per_rank"] < 1
    ):
        return f"batch_per_rank must be a positive int, got {plan['batch_per_rank']!r}"
    if not isinstance(plan["checkpointing"], bool):
        return f"checkpointing must be True or False, got {plan['checkpointing']!r}"
    return ""


def run(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Train ``STEPS`` steps on ``WORLD`` ranks under the budget with ``plan``; each rank's report."""
    return launch(
        PL.train,
        WORLD,
        args=(plan["strategy"], CFG, plan["batch_per_rank"], STEPS, 3e-3, BUDGET, plan["checkpointing"]),
        timeout_s=240,
        backend="gloo",
    )


def check_sharding(plan_fn: Callable[[], dict[str, Any]]) -> CheckResult:
    """Every rank stays within the budget and the losses equal the single-process reference."""
    name = f"train on {WORLD} ranks within {format_bytes(BUDGET)} each, same losses as one process"
    attempted, plan = attempt(plan_fn)
    if not attempted:
        return give_verdict(name, NOT_ATTEMPTED, "replace the `raise NotImplementedError` in plan")
    problem = validate(plan)
    if problem:
        return give_verdict(name, FAILED, problem)
    try:
        ranks = run(plan)
    except RankFailed as err:
        return give_verdict(name, FAILED, str(err).splitlines()[0])
    for r in ranks:
        if r["error"]:
            return give_verdict(
                name,
                FAILED,
                f"rank {r['rank']} ran out of memory: {r['error']}. "
                "Hint: which states does your strategy still replicate on every rank?",
            )
        if r["peak_bytes"] > BUDGET:
            return give_verdict(
                name, FAILED, f"rank {r['rank']} peaked at {format_bytes(r['peak_bytes'])}, over {format_bytes(BUDGET)}"
            )
    want, got = reference_losses(), ranks[0]["losses"]
    if len(got) != len(want) or not all(abs(g - w) <= LOSS_RTOL * abs(w) for g, w in zip(got, want)):
        return give_verdict(
            name,
            FAILED,
            f"losses {[round(x, 5) for x in got]} differ from one process on the whole batch "
            f"{[round(x, 5) for x in want]}. Hint: {WORLD} ranks x batch_per_rank must be the global batch "
            f"of {GLOBAL_BATCH}, and 'single' does not synchronise the ranks.",
        )
    peaks = ", ".join(f"rank {r['rank']} {format_bytes(r['peak_bytes'])}" for r in ranks)
    return give_verdict(name, PASSED, f"peaks {peaks}; losses match one process to {LOSS_RTOL:.0e}")
