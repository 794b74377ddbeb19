"""Checks of Lab 2, *Debug the OOM*.

The learner's ``train(model, opt, batches) -> list[float]`` must (1) run 20 iterations
inside the lab's budget, (2) hold the same memory after iteration 20 as after iteration 2,
and (3) produce the gradients of the original full-batch loop (same effective batch).
Memory "after iteration i" is read when the loop asks for batch i + 1, so the learner's
code needs no instrumentation.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from ..budget import budget
from ..gpt import GPTConfig, TinyGPT, random_batch
from ..measure import measure
from ..oom import headline
from ..units import MiB, format_bytes
from . import FAILED, NOT_ATTEMPTED, PASSED, CheckResult, give_verdict

CONFIG = GPTConfig(vocab_size=512, seq_len=65, hidden=64, layers=2, heads=2)
BATCH = 32
ITERATIONS = 20
LIMIT = 24 * MiB
GRAD_RTOL = 1e-4


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
        history.append((loss, logits))  # kept for a report at the end
    return history


class _Recorder:
    """Iterates over batches and records live bytes each time the next batch is asked for."""

    def __init__(self, batches: list[torch.Tensor], live: Callable[[], int]) -> None:
        self.batches, self.live, self.after = batches, live, []

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i, ids in enumerate(self.batches):
            if i:
                self.after.append(self.live())
            yield ids
        self.after.append(self.live())

    def __len__(self) -> int:
        return len(self.batches)


def reference_grads(seed: int = 0) -> list[torch.Tensor]:
    """Gradients of the original loop's first step (the full batch, no budget)."""
    model, _, batches = make_setup(seed)
    model.loss(batches[0]).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def _grads_of(train: Callable, seed: int = 0) -> list[torch.Tensor | None]:
    model, _, batches = make_setup(seed)
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)  # the step changes nothing: gradients stay readable
    train(model, frozen, batches[:1])
    return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def run_under_budget(train: Callable, seed: int = 0) -> tuple[list[int], str]:
    """Live bytes after each iteration, and the OOM message if the loop ran out."""
    model, opt, batches = make_setup(seed)
    gc.collect()
    with measure(model, opt, batches) as watch:
        recorder = _Recorder(batches, watch.current_bytes)
        try:
            with budget(LIMIT, model, opt, batches):
                train(model, opt, recorder)
        except torch.OutOfMemoryError as err:
            return recorder.after, str(err)
    return recorder.after, ""


def check_train(train: Callable) -> CheckResult:
    """The three requirements of Lab 2, in order."""
    name = "fixed training loop"
    try:
        after, error = run_under_budget(train)
    except NotImplementedError:
        return give_verdict(name, NOT_ATTEMPTED, "replace the `raise NotImplementedError` with your loop")
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
        return give_verdict(
            name, FAILED, f"the loop ran {len(after)} iterations; it must consume all {ITERATIONS} batches"
        )
    if after[-1] != after[1]:
        return give_verdict(
            name,
            FAILED,
            f"memory after iteration {ITERATIONS} is {format_bytes(after[-1])} but "
            f"{format_bytes(after[1])} after iteration 2: {format_bytes((after[-1] - after[1]) / (ITERATIONS - 2))} "
            "leaks per iteration. Hint: keep Python numbers (loss.item()), not tensors, in the history.",
        )
    got, want = _grads_of(train), reference_grads()
    if any(g is None for g in got):
        return give_verdict(
            name,
            FAILED,
            "some parameters have no gradient after your loop's first iteration. Hint: zero the "
            "gradients at the start of each iteration, as the original does, not after the step.",
        )
    errors = [((g - w).norm() / w.norm()).item() for g, w in zip(got, want)]
    worst = max(errors)
    if not all(e <= GRAD_RTOL for e in errors):  # `not <=` also catches NaN, which max() can hide
        return give_verdict(
            name,
            FAILED,
            f"your first step's gradients differ from the full-batch gradients by up to {worst:.2%}. "
            "Hint: with k micro-batches, each micro-batch loss must be divided by k, and every sequence of the "
            "batch must be used (the effective batch stays 32).",
        )
    return give_verdict(
        name,
        PASSED,
        f"{ITERATIONS} iterations within {format_bytes(LIMIT)}, flat memory, and full-batch gradients "
        f"(within {GRAD_RTOL:.0e})",
    )


def profile(train: Callable, iterations: int = 5, seed: int = 0) -> tuple[list[int], int]:
    """Without a budget: live bytes after each of ``iterations`` iterations, and the first step's peak."""
    model, opt, batches = make_setup(seed)
    gc.collect()
    with measure(model, opt, batches) as watch:
        recorder = _Recorder(batches[:iterations], watch.current_bytes)
        train(model, opt, recorder)
        del model, opt
    model, opt, batches = make_setup(seed)
    with measure(model, opt, batches[:1]) as first:
        train(model, opt, batches[:1])
    return recorder.after, first.peak_bytes
