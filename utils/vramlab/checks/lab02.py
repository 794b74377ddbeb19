"""Checks of Lab 2, *Debug the OOM*.

The learner's ``train(model, opt, batches) -> list[float]`` must (1) run 20 iterations
inside the lab's budget, (2) hold the same memory after iteration 20 as after iteration 2,
(3) step with the gradients of the original full-batch loop (same effective batch: the check
takes a fingerprint of the gradients at the first ``opt.step()`` of the judged run itself), and
(4) train as the original does: one AdamW step per batch (the check counts them with the
optimizer's own step hook), weights after 20 steps equal to a correct loop's, and a history of each
iteration's loss, which the check recomputes. Memory "after iteration i" is read by the same
hook after the i-th optimizer step, so it does not depend on how the loop walks the batches
(a list, indexing, ``list(batches)`` first), and the learner's code needs no instrumentation.
The learner's loop runs in a sandbox process (:mod:`vramlab.checks.isolation`), on one torch
thread; the reference and the verdict stay in the judge.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..budget import budget
from ..gpt import GPTConfig, TinyGPT, random_batch
from ..measure import measure
from ..oom import headline
from ..units import MiB, format_bytes
from . import (
    FAILED,
    NOT_ATTEMPTED,
    PASSED,
    CheckResult,
    FirstStepGradients,
    StepCounter,
    as_number,
    first_step_problem,
    give_verdict,
    gradient_fingerprint,
    plain,
)
from .isolation import Learner, run_check

CONFIG = GPTConfig(vocab_size=512, seq_len=65, hidden=64, layers=2, heads=2)
BATCH = 32
ITERATIONS = 20
LIMIT = 24 * MiB
GRAD_RTOL = 1e-4
LOSS_RTOL = 1e-3  # a history entry vs the loss the check recomputes
WEIGHT_RTOL = 1e-2  # weights after 20 steps vs a correct loop's, relative to how far training moved them


def make_setup(seed: int = 0) -> tuple[TinyGPT, torch.optim.Optimizer, list[torch.Tensor]]:
    """The lab's model, AdamW optimizer and 20 batches of 32 sequences."""
    torch.manual_seed(seed)
    model = TinyGPT(CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    batches = [random_batch(CONFIG, BATCH, seed=seed * 1000 + i) for i in range(ITERATIONS)]
    return model, opt, batches


def train_original(model: TinyGPT, opt: torch.optim.Optimizer, batches) -> list:
    """The loop the lab hands out: one optimizer step per batch, and a history for a report."""
    history = []
    for ids in batches:
        opt.zero_grad(set_to_none=True)
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        history.append((loss, logits))
    return history


def _reference_fingerprint(seed: int = 0) -> torch.Tensor:
    model, _, batches = make_setup(seed)
    model.loss(batches[0]).backward()
    return gradient_fingerprint(list(model.parameters()))


@dataclass
class _Run:
    """One run of a learner's loop under the budget."""

    after: list[int] = field(default_factory=list)  # live bytes after each optimizer step
    error: str = ""  # the OOM message, if it ran out
    model: TinyGPT | None = None
    opt: torch.optim.Optimizer | None = None
    history: Any = None
    steps: int = 0  # optimizer steps the loop took, counted by the optimizer's hook
    first_grads: torch.Tensor | None = None  # gradient_fingerprint at the first opt.step()


def _run(train: Callable, seed: int = 0) -> _Run:
    model, opt, batches = make_setup(seed)
    run = _Run(model=model, opt=opt)
    gc.collect()
    with measure(model, opt, batches) as watch:
        try:
            with (
                StepCounter(opt, watch.current_bytes) as steps,
                FirstStepGradients(opt, list(model.parameters())) as first,
                budget(LIMIT, model, opt, batches),
            ):
                run.history = train(model, opt, list(batches))  # a list of its own: index it or iterate
        except torch.OutOfMemoryError as err:
            run.error = str(err)
    run.after, run.steps, run.first_grads = steps.readings, steps.count, first.fingerprint
    return run


def _sandbox_run(fns: tuple, seed: int = 0) -> dict[str, Any]:
    """In the check's sandbox: the learner's loop under the budget, as plain data for the judge."""
    run = _run(fns[0], seed)
    history = list(run.history) if type(run.history) in (list, tuple) else None  # exact types: no learner code
    return {
        "after": run.after,
        "error": run.error,
        "steps": run.steps,
        "history": None if history is None else [plain(h) for h in history],
        "history_described": _describe(run.history),
        "weights": [p.detach().clone() for p in run.model.parameters()],  # type: ignore[union-attr]
        "first_grads": run.first_grads,
    }


def run_under_budget(train: Callable, seed: int = 0) -> tuple[list[int], str]:
    """Live bytes after each iteration, and the OOM message if the loop ran out."""
    run = _run(train, seed)
    return run.after, run.error


@functools.cache
def _reference(seed: int = 0) -> tuple[tuple[float, ...], tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """A correct loop without a budget: (loss of each iteration, initial weights, final weights)."""
    model, opt, batches = make_setup(seed)
    start = tuple(p.detach().clone() for p in model.parameters())
    losses = []
    for ids in batches:
        opt.zero_grad(set_to_none=True)
        loss = model.loss(ids)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return tuple(losses), start, tuple(p.detach().clone() for p in model.parameters())


def _steps_problem(steps: int) -> str:
    """Why the number of optimizer steps is wrong, or "" if it is one per batch."""
    if steps == ITERATIONS:
        return ""
    taken = "no optimizer step" if steps == 0 else f"{steps} optimizer steps"
    return (
        f"your loop made {taken}; one `opt.step()` per batch of {BATCH} makes {ITERATIONS}. "
        "Hint: step once after all the micro-batches of a batch, not after each one."
    )


def _training_problem(run: dict[str, Any], seed: int = 0) -> str:
    """Why the judged run (:func:`_sandbox_run`'s data) did not train as the original loop does,
    or "" if it did."""
    if run["steps"] != ITERATIONS:
        return _steps_problem(run["steps"])
    losses, start, final = _reference(seed)
    moved = [((p - w).norm() / (w - w0).norm()).item() for p, w, w0 in zip(run["weights"], final, start)]
    if not all(m <= WEIGHT_RTOL for m in moved):
        return (
            f"after {ITERATIONS} steps your weights are {max(moved):.1%} (of the distance training moves them) away "
            "from a correct loop's. Hint: the optimizer must see each batch's full-batch gradient, once per batch."
        )
    history = run["history"]
    numbers = None if history is None else [as_number(h) for h in history]
    if numbers is None or len(numbers) != ITERATIONS or any(n is None for n in numbers):
        return (
            f"return the history as a list of {ITERATIONS} Python numbers, each iteration's loss "
            f"(e.g. the sum of loss.item() over its micro-batches); got {run['history_described']}."
        )
    off = [abs(n - want) / want for n, want in zip(numbers, losses)]
    if not all(o <= LOSS_RTOL for o in off):
        i = max(range(ITERATIONS), key=off.__getitem__)
        return (
            f"history entry {i + 1} is {numbers[i]:.4f} but that iteration's loss, recomputed by the check, is "
            f"{losses[i]:.4f}. Hint: record the mean loss over the whole batch of {BATCH}."
        )
    return ""


def _describe(history: Any) -> str:
    if not isinstance(history, (list, tuple)):
        return type(history).__name__
    kinds = sorted({type(h).__name__ for h in history})
    return f"{len(history)} entries of type {', '.join(kinds) or 'nothing'}"


def check_train(train: Callable) -> CheckResult:
    """The four requirements of Lab 2, in order."""
    return run_check("fixed training loop", "vramlab.checks.lab02:_check_train", train)


def _check_train(learner: Learner) -> CheckResult:
    name = "fixed training loop"
    want = _reference_fingerprint()
    _reference()  # computed before the learner's code runs
    try:
        run = learner.call("vramlab.checks.lab02:_sandbox_run", 0)
    except NotImplementedError:
        return give_verdict(name, NOT_ATTEMPTED, "replace the `raise NotImplementedError` with your loop")
    after, error = run["after"], run["error"]
    if error:
        where = f"at iteration {len(after) + 1}"
        growth = (
            f" Memory grew from {format_bytes(after[0])} after iteration 1 to {format_bytes(after[-1])}."
            if len(after) > 1
            else ""
        )
        return give_verdict(
            name,
            FAILED,
            f"it ran out of memory {where} of {ITERATIONS} within {format_bytes(LIMIT)}.{growth} "
            f"{headline(error)}. Hint: if it fails at once, one step of {BATCH} sequences is "
            "too big (accumulate gradients over micro-batches); "
            "if it fails later, something is kept across iterations.",
        )
    if len(after) != ITERATIONS:
        return give_verdict(name, FAILED, _steps_problem(len(after)))
    if after[-1] != after[1]:
        return give_verdict(
            name,
            FAILED,
            f"memory after step {ITERATIONS} is {format_bytes(after[-1])} but "
            f"{format_bytes(after[1])} after step 2: {format_bytes((after[-1] - after[1]) / (ITERATIONS - 2))} "
            "leaks per iteration. Hint: keep Python numbers (loss.item()), not tensors, across iterations.",
        )
    problem = first_step_problem(run["first_grads"], want, GRAD_RTOL, BATCH)
    if problem:
        return give_verdict(name, FAILED, problem)
    problem = _training_problem(run)
    if problem:
        return give_verdict(name, FAILED, problem)
    return give_verdict(
        name,
        PASSED,
        f"{ITERATIONS} iterations within {format_bytes(LIMIT)}, flat memory, full-batch gradients "
        f"(within {GRAD_RTOL:.0e}), {ITERATIONS} AdamW steps to the weights of a correct loop, and the losses "
        "the check recomputed",
    )


def survivors(train: Callable, iterations: int = 4, seed: int = 0) -> list[tuple[str, str, int, int]]:
    """What a loop leaves alive besides the model, its gradients and the optimizer state.

    Runs ``iterations`` iterations without a budget, keeps what ``train`` returns, and groups
    the storages created during the run that are still alive by (op that made it, phase, bytes):
    rows of ``(op, phase, bytes each, count)``, largest total first. A row whose count grows
    with the iterations is a leak; its size says which tensor it is.
    """
    model, opt, batches = make_setup(seed)
    gc.collect()
    watch = measure(model, opt, batches)
    with watch:
        kept = train(model, opt, batches[:iterations])
    groups: dict[tuple[str, str, int], int] = {}
    for record in watch.tracker.live_records():
        if record.phase == "before" or record.role in ("parameters", "gradients", "optimizer"):
            continue
        key = (record.op, record.phase, record.nbytes)
        groups[key] = groups.get(key, 0) + 1
    del kept
    rows = [(op, phase, nbytes, count) for (op, phase, nbytes), count in groups.items()]
    return sorted(rows, key=lambda r: -r[2] * r[3])


def profile(train: Callable, iterations: int = 5, seed: int = 0) -> tuple[list[int], int]:
    """Without a budget: live bytes after each of ``iterations`` iterations, and the first step's peak."""
    model, opt, batches = make_setup(seed)
    gc.collect()
    with measure(model, opt, batches) as watch, StepCounter(opt, watch.current_bytes) as steps:
        train(model, opt, batches[:iterations])
        del model, opt
    model, opt, batches = make_setup(seed)
    with measure(model, opt, batches[:1]) as first:
        train(model, opt, batches[:1])
    return steps.readings, first.peak_bytes
