"""Checks of Lab 3, *Make it fit* (the capstone).

The learner supplies ``configure(model) -> optimizer`` (it may also switch on activation
checkpointing) and ``step(model, optimizer, ids) -> float`` (one optimizer step over the
whole batch, gradients zeroed first, the loss returned as a number). The checks:

- ``check_fit``: the 4-block model, which naive fp32 AdamW cannot train in the budget,
  trains for ``STEPS`` steps inside it, and the first step's gradients equal the naive
  full-batch gradients within 5% (same effective batch; bf16/fp16 autocast stays within it).
  "Trains" is what the check sees, not what ``step`` returns: one optimizer step per call
  (a hook counts them), every weight still a registered parameter that the optimizer
  updates, no tensors moved into NumPy, and the loss on a batch the check holds back, which
  it computes itself, lower after the steps than before.
- ``check_scaling``: the largest depth that trains inside the budget, naive vs the
  learner's recipe, found by search; the learner's must hold at least 4x the parameters.
  A step fits exactly when its measured peak is within the budget, so the search compares
  measured peaks (faster than running each trial under the budget); each measured run must
  make its optimizer steps, or the depth does not count.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..budget import budget
from ..gpt import GPTConfig, TinyGPT, pattern_batch
from ..measure import measure
from ..oom import headline
from ..reach import UnmeasurableObject, reachable
from ..search import largest_batch
from ..units import MiB, format_bytes
from . import (
    FAILED,
    NOT_ATTEMPTED,
    PASSED,
    CheckResult,
    FirstStepGradients,
    StepCounter,
    first_step_problem,
    give_verdict,
    gradient_fingerprint,
    plain,
)
from .isolation import Learner, run_check

LIMIT = 40 * MiB
BATCH = 16
LAYERS = 4
STEPS = 8
TARGET_RATIO = 4.0
GRAD_RTOL = 5e-2  # bf16 autocast's gradients are ~1% off fp32's; a wrong effective batch is off by >= 25%
HELDOUT_SEED = 10_000  # the batch the check computes the loss on; no step ever sees it


def config(layers: int = LAYERS) -> GPTConfig:
    """The lab's model shape at a given depth."""
    return GPTConfig(vocab_size=512, seq_len=129, hidden=128, layers=layers, heads=4)


def naive_configure(model: TinyGPT) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)


def naive_step(model: TinyGPT, opt: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    opt.zero_grad(set_to_none=True)
    loss = model.loss(ids)
    loss.backward()
    opt.step()
    return loss.item()


def _setup(layers: int, seed: int = 0) -> tuple[TinyGPT, list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = TinyGPT(config(layers))
    return model, [pattern_batch(model.cfg, BATCH, seed=seed * 100 + i) for i in range(STEPS)]


class NotTraining(Exception):
    """A recipe whose steps do not train the lab's model, with what the check saw."""


def _check_recipe(model: TinyGPT, opt: object, layers: int) -> None:
    """Raise :class:`NotTraining` unless ``opt`` can train every registered weight of the model."""
    if not isinstance(opt, torch.optim.Optimizer):
        kind = type(opt).__name__
        raise NotTraining(f"configure must return a torch.optim optimizer (bitsandbytes' count), got {kind}")
    want, have = config(layers).params, sum(p.numel() for p in model.parameters())
    if have != want:
        raise NotTraining(
            f"the model has {have:,} registered parameters after configure, the lab's has {want:,}: "
            "keep every weight a parameter of the model (a weight kept elsewhere is not measured)"
        )
    stepped = {id(p) for group in opt.param_groups for p in group["params"]}
    if not all(id(p) in stepped for p in model.parameters()):
        raise NotTraining("the optimizer must update every parameter of the model")


def _check_trained(model: TinyGPT, opt: torch.optim.Optimizer, counter: StepCounter, calls: int) -> None:
    """Raise :class:`NotTraining` unless ``calls`` calls of step made one optimizer step each."""
    if counter.count != calls:
        raise NotTraining(
            f"{calls} calls of your step made {counter.count} optimizer step(s); each call must make exactly one "
            "(accumulate over micro-batches, then opt.step() once)"
        )
    try:
        hidden = sum(a.nbytes for a in reachable([model, opt]).arrays.values())
    except UnmeasurableObject as err:
        raise NotTraining(f"{err}; keep the model and optimizer in torch tensors") from None
    if hidden > 1024:
        raise NotTraining(
            f"{format_bytes(hidden)} of NumPy arrays hang off the model or optimizer: on this CPU host and device "
            "are the same memory, so moving tensors into NumPy hides them from the budget instead of saving them"
        )


def heldout_loss(model: TinyGPT) -> float:
    """The fp32 loss on a batch no step sees, computed by the check."""
    ids = pattern_batch(model.cfg, BATCH, seed=HELDOUT_SEED)
    with torch.no_grad():
        return model.loss(ids).item()


@dataclass
class TrainingRun:
    """``STEPS`` steps of a recipe in the budget: what ``step`` returned and what the check measured."""

    losses: list = field(default_factory=list)
    error: str = ""
    problem: str = ""
    heldout_before: float = float("nan")
    heldout_after: float = float("nan")
    first_grads: torch.Tensor | None = None  # gradient_fingerprint at the first opt.step()
    weights: list[torch.Tensor] = field(default_factory=list)  # fp32 copies after the last step


def run_in_budget(configure: Callable, step: Callable, layers: int = LAYERS) -> TrainingRun:
    """Run ``STEPS`` steps inside the budget and verify that they trained."""
    model, batches = _setup(layers)
    run = TrainingRun(heldout_before=heldout_loss(model))
    opt = configure(model)
    try:
        _check_recipe(model, opt, layers)
        with (
            StepCounter(opt) as counter,
            FirstStepGradients(opt, list(model.parameters())) as first,
            budget(LIMIT, model, opt, batches),
        ):
            for ids in batches:
                run.losses.append(plain(step(model, opt, ids)))  # exact types: no learner code in a conversion
        run.first_grads = first.fingerprint
        _check_trained(model, opt, counter, STEPS)
        run.weights = [p.detach().float().clone() for p in model.parameters()]
        run.heldout_after = heldout_loss(model)
    except torch.OutOfMemoryError as err:
        run.error = str(err)
    except NotTraining as err:
        run.problem = str(err)
    finally:
        gc.collect()
    return run


def _sandbox_fit(fns: tuple) -> dict:
    """In the check's sandbox: :func:`run_in_budget` of the learner's recipe, as plain data."""
    run = run_in_budget(*fns)
    return {
        "losses": run.losses,
        "error": run.error,
        "problem": run.problem,
        "first_grads": run.first_grads,
        "weights": run.weights,
    }


def _heldout_of(weights: list[torch.Tensor], layers: int = LAYERS) -> float:
    """The held-out fp32 loss of a model with these weights, computed by the judge."""
    model, _ = _setup(layers)
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(w)
    return heldout_loss(model)


def _naive_fingerprint(layers: int) -> torch.Tensor:
    """The full-batch gradients of naive fp32's first step at ``layers`` blocks (no budget)."""
    model, batches = _setup(layers)
    model.loss(batches[0]).backward()
    return gradient_fingerprint(list(model.parameters()))


def train_in_budget(configure: Callable, step: Callable, layers: int = LAYERS) -> tuple[list[float], str]:
    """Run ``STEPS`` steps inside the budget; the losses, and the OOM message if it ran out."""
    run = run_in_budget(configure, step, layers)
    return run.losses, run.error


def check_fit(configure: Callable, step: Callable) -> CheckResult:
    """The 4-block model trains inside the budget, learns, and keeps the full-batch gradients."""
    return run_check(f"train the {LAYERS}-block model", "vramlab.checks.lab03:_check_fit", configure, step)


def _check_fit(learner: Learner) -> CheckResult:
    name = f"train the {LAYERS}-block model in {format_bytes(LIMIT)}"
    want = _naive_fingerprint(LAYERS)
    before = heldout_loss(_setup(LAYERS)[0])
    try:
        run = learner.call("vramlab.checks.lab03:_sandbox_fit")
    except NotImplementedError:
        return give_verdict(name, NOT_ATTEMPTED, "replace the `raise NotImplementedError` in configure and step")
    if run["error"]:
        return give_verdict(
            name,
            FAILED,
            f"out of memory at step {len(run['losses']) + 1} of {STEPS}: "
            f"{headline(run['error'])}. "
            "Hint: combine checkpointing, micro-batches and a lighter optimizer step.",
        )
    if run["problem"]:
        return give_verdict(name, FAILED, run["problem"])
    problem = first_step_problem(run["first_grads"], want, GRAD_RTOL, BATCH)
    if problem:
        return give_verdict(name, FAILED, problem)
    after = _heldout_of(run["weights"])
    if not after < 0.99 * before:
        return give_verdict(
            name,
            FAILED,
            f"the loss on a batch the check holds back did not go down ({before:.3f} -> {after:.3f}, computed by "
            "the check); check the learning rate and the update",
        )
    return give_verdict(
        name,
        PASSED,
        f"{STEPS} optimizer steps inside the budget; held-out loss {before:.3f} -> {after:.3f} (computed by the "
        f"check); gradients within {GRAD_RTOL:.0%} of the full-batch ones",
    )


def _step_run(configure: Callable, step: Callable, layers: int) -> tuple[int, torch.Tensor | None]:
    """Peak bytes of two training steps of the ``layers``-block model (measured, no budget), and
    the fingerprint of the gradients its first ``opt.step()`` used. Raises :class:`NotTraining`
    when the steps do not train it."""
    model, batches = _setup(layers)
    opt = configure(model)
    _check_recipe(model, opt, layers)
    with (
        StepCounter(opt) as counter,
        FirstStepGradients(opt, list(model.parameters())) as first,
        measure(model, opt, batches[:2]) as m,
    ):
        for ids in batches[:2]:
            step(model, opt, ids)
    _check_trained(model, opt, counter, 2)
    return m.peak_bytes, first.fingerprint


def step_peak(configure: Callable, step: Callable, layers: int) -> int:
    """Peak bytes of two training steps of the ``layers``-block model (measured, no budget).
    Raises :class:`NotTraining` when the steps do not train it."""
    return _step_run(configure, step, layers)[0]


def _sandbox_step(fns: tuple, layers: int) -> dict:
    """In the check's sandbox: :func:`_step_run` of the learner's recipe, as plain data."""
    try:
        peak, fingerprint = _step_run(*fns, layers)
    except NotTraining as err:
        return {"problem": str(err)}
    return {"peak": peak, "first_grads": fingerprint}


def largest_depth(configure: Callable, step: Callable) -> int:
    """The most blocks whose training step peaks inside the budget (0 if none)."""

    def within_budget(layers: int) -> None:
        if step_peak(configure, step, layers) > LIMIT:
            raise torch.OutOfMemoryError(f"{layers} blocks exceed the budget")

    return largest_batch(within_budget, limit=128).largest


def _largest_depth_of(learner: Learner) -> int:
    """:func:`largest_depth` of the learner's recipe, each depth run in the sandbox; a depth counts
    only if its first step used the full-batch gradients (the judged run's own, not a probe's)."""

    def within_budget(layers: int) -> None:
        run = learner.call("vramlab.checks.lab03:_sandbox_step", layers)
        if "problem" in run:
            raise NotTraining(run["problem"])
        if run["peak"] > LIMIT:
            raise torch.OutOfMemoryError(f"{layers} blocks exceed the budget")
        problem = first_step_problem(run["first_grads"], _naive_fingerprint(layers), GRAD_RTOL, BATCH)
        if problem:
            raise NotTraining(f"at {layers} blocks, {problem}")

    return largest_batch(within_budget, limit=128).largest


def check_scaling(configure: Callable, step: Callable) -> CheckResult:
    """The learner's recipe trains a model with at least 4x the parameters of naive's, in the same budget."""
    return run_check("scaling", "vramlab.checks.lab03:_check_scaling", configure, step)


def _check_scaling(learner: Learner) -> CheckResult:
    name = f"at least {TARGET_RATIO:.0f}x the parameters in the same budget"
    try:
        mine = _largest_depth_of(learner)
    except NotImplementedError:
        return give_verdict(name, NOT_ATTEMPTED, "replace the `raise NotImplementedError` in configure and step")
    except NotTraining as err:
        return give_verdict(name, FAILED, str(err))
    naive = largest_depth(naive_configure, naive_step)
    naive_params, my_params = config(naive).params if naive else 0, config(mine).params if mine else 0
    ratio = my_params / naive_params if naive_params else float("inf")
    text = (
        f"naive fp32 AdamW: {naive} block(s), {naive_params:,} parameters; your recipe: {mine} blocks, "
        f"{my_params:,} parameters: {ratio:.1f}x"
    )
    if ratio < TARGET_RATIO:
        return give_verdict(
            name, FAILED, text + f". Hint: at batch {BATCH} activations dominate; what stores the fewest per block?"
        )
    return give_verdict(name, PASSED, text)
