"""Checks of Lab 5, *Shard it*.

The model (TinyGPT, fp32 AdamW) does not fit the per-rank budget when one process trains it.
The learner writes two functions:

- ``predict_state_bytes(params, world) -> int``: the bytes of parameters, gradients and
  optimizer state that each rank holds after a step with their sharding, from the numbers
  alone (it runs under :func:`vramlab.checks.predict`: no tensors, no threads);
- ``shard(model) -> (model, optimizer)``: the wrapping code (``fully_shard`` per block and
  at the root, DDP, ZeroRedundancyOptimizer...), run on every rank. Its source is sent to
  the ranks (a spawned process cannot import a notebook) and runs *inside* the measured,
  budgeted block, so whatever it allocates and keeps counts.

:func:`check_sharding` starts 2 ranks (CPU processes on gloo, so the budget means the same on
every machine), trains ``STEPS`` steps of the global batch under the budget, and passes when
no rank runs out of memory or fails, every rank's peak is within the budget, the mean loss of
every step equals one process on the whole batch within ``LOSS_RTOL``, and the prediction is
within ``STATE_RTOL`` of the state bytes measured on every rank, for the lab's model and for
a second model the learner does not see in advance.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from .. import parallel as PL
from ..distributed import Rank, RankFailed, launch
from ..gpt import GPTConfig
from ..units import MiB, format_bytes
from . import FAILED, MEASURED_HINT, NOT_ATTEMPTED, PASSED, CheckResult, Measured, give_verdict, judge_bytes, predict_in
from .isolation import Learner, run_check

CFG = dict(vocab_size=256, seq_len=33, hidden=256, layers=4, heads=4)
UNSEEN_CFG = dict(vocab_size=256, seq_len=33, hidden=192, layers=3, heads=4)  # the prediction's second model
WORLD = 2
GLOBAL_BATCH = 4
BATCH_PER_RANK = GLOBAL_BATCH // WORLD
STEPS = 3
BUDGET = 40 * MiB  # the honest FSDP2 peak is 35.5 MiB; a full fp32 copy kept on the side reaches 47.9
LOSS_RTOL = 1e-4
STATE_RTOL = 0.01


def params(cfg: dict[str, int] | None = None) -> int:
    """Parameters of the lab's model (or of ``cfg``)."""
    return GPTConfig(**(cfg or CFG)).params


@functools.lru_cache(maxsize=1)
def _reference() -> dict[str, Any]:
    return PL.train(Rank.in_process(), "single", CFG, GLOBAL_BATCH, STEPS)


def reference_losses() -> tuple[float, ...]:
    """Losses of one process training the whole global batch each step (no budget)."""
    return tuple(_reference()["losses"])


def single_process_peak() -> int:
    """Measured peak of that same single-process run (what does not fit the budget)."""
    return _reference()["peak_bytes"]


def run(
    shard: Callable[..., Any] | tuple[str, str], cfg: dict[str, int] | None = None, limit: int | None = BUDGET
) -> list[dict]:
    """Train ``STEPS`` steps on ``WORLD`` ranks with the learner's ``shard`` (a function, or its
    ``(source, name)``); each rank's report (peak_bytes, param_bytes, grad_bytes,
    optimizer_bytes, losses, error, tampering...)."""
    source = shard if isinstance(shard, tuple) else PL.source_of(shard)
    args = ("custom", cfg or CFG, BATCH_PER_RANK, STEPS, 3e-3, limit, False, False, source)
    return launch(PL.train, WORLD, args=args, timeout_s=240, backend="gloo")


def state_bytes(report: dict[str, Any]) -> int:
    """Parameters + gradients + optimizer state a rank held after its last step."""
    return report["param_bytes"] + report["grad_bytes"] + report["optimizer_bytes"]


def _failure(ranks: list[dict[str, Any]]) -> str:
    """Why the run failed, or ""."""
    for r in ranks:
        if r.get("tampering"):
            return (
                f"rank {r['rank']}: the check's measurement was switched off while your code ran: "
                f"{'; '.join(r['tampering'])}. This is reported as tampering; let the check measure your code."
            )
        if r["error"].startswith("NotImplementedError"):
            return "not attempted"
        if r["error"]:
            oom = "out of memory" in r["error"].lower() or "tried to allocate" in r["error"]
            hint = " Hint: which states does your sharding still replicate on every rank?" if oom else ""
            return f"rank {r['rank']} failed: {r['error']}.{hint}"
        if r["peak_bytes"] > BUDGET:
            return f"rank {r['rank']} peaked at {format_bytes(r['peak_bytes'])}, over {format_bytes(BUDGET)}"
    want, got = reference_losses(), ranks[0]["losses"]
    if len(got) != len(want) or not all(abs(g - w) <= LOSS_RTOL * abs(w) for g, w in zip(got, want)):
        return (
            f"losses {[round(x, 5) for x in got]} differ from one process on the whole batch "
            f"{[round(x, 5) for x in want]}. Hint: the ranks must keep the same weights (synchronise the "
            "gradients, as DDP and FSDP do) and train every parameter."
        )
    return ""


NAME = f"train on {WORLD} ranks within {format_bytes(BUDGET)} each, same losses, state bytes predicted"


def check_sharding(shard: Callable[..., Any], predict_state_bytes: Callable[[int, int], Any]) -> CheckResult:
    """Every rank within the budget, the losses of one process, and the state bytes predicted.
    The prediction runs in the check's sandbox, ``shard``'s source on the ranks (both in strict
    mode: :mod:`vramlab.checks.strict`), the verdict in the judge."""
    try:
        source = PL.source_of(shard)
    except ValueError as err:
        return give_verdict(NAME, FAILED, str(err))
    return run_check(NAME, "vramlab.checks.lab05:_check_sharding", predict_state_bytes, data=(source,))


def _check_sharding(learner: Learner, shard: tuple[str, str]) -> CheckResult:
    name = NAME
    hint = "what each rank keeps of the weights (4 B), gradients (4 B) and AdamW state (8 B) per parameter"
    try:
        attempted, predicted = predict_in(learner, 0, params(), WORLD)
    except Measured:
        return give_verdict(name, FAILED, MEASURED_HINT)
    if not attempted:
        return give_verdict(name, NOT_ATTEMPTED, "predict first: replace the `raise NotImplementedError`")
    try:
        ranks = run(shard)
    except (RankFailed, ValueError) as err:
        return give_verdict(name, FAILED, str(err).splitlines()[0])
    problem = _failure(ranks)
    if problem == "not attempted":
        return give_verdict(name, NOT_ATTEMPTED, "replace the `raise NotImplementedError` in shard")
    if problem:
        return give_verdict(name, FAILED, problem)
    measured = max(state_bytes(r) for r in ranks)
    failed = judge_bytes(name, predicted, measured, STATE_RTOL, f"the lab's model ({params():,} parameters)", hint)
    if failed:
        return failed
    _, unseen_prediction = predict_in(learner, 0, params(UNSEEN_CFG), WORLD)
    setup = f"a second model ({params(UNSEEN_CFG):,} parameters)"
    unseen_ranks = run(shard, UNSEEN_CFG, limit=None)
    broken = next((r for r in unseen_ranks if r["error"]), None)
    if broken is not None:  # its bytes would be those of a half-finished run
        return give_verdict(name, FAILED, f"on {setup}, rank {broken['rank']} failed: {broken['error']}")
    unseen = max(state_bytes(r) for r in unseen_ranks)
    failed = judge_bytes(name, unseen_prediction, unseen, STATE_RTOL, setup, hint)
    if failed:
        return failed
    peaks = ", ".join(f"rank {r['rank']} {format_bytes(r['peak_bytes'])}" for r in ranks)
    return give_verdict(
        name,
        PASSED,
        f"peaks {peaks}; losses match one process to {LOSS_RTOL:.0e}; state bytes {format_bytes(measured)} per rank "
        f"as predicted, on two models. The rest of the peak is transient: gathered weights, gradient buffers, "
        "activations and the optimizer step's temporaries.",
    )
