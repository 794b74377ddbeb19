"""Checks of Lab 3, *Make it fit* (the capstone).

The learner supplies ``configure(model) -> optimizer`` (it may also switch on activation
checkpointing) and ``step(model, optimizer, ids) -> float`` (one optimizer step over the
whole batch, gradients zeroed first, the loss returned as a number). The checks:

- ``check_fit``: the 4-block model, which naive fp32 AdamW cannot train in the budget,
  trains for ``STEPS`` steps inside it with the loss going down, and the first step's
  gradients equal the naive full-batch gradients (same effective batch).
- ``check_scaling``: the largest depth that trains inside the budget, naive vs the
  learner's recipe, found by search; the learner's must hold at least 4x the parameters.
  A step fits exactly when its measured peak is within the budget, so the search compares
  measured peaks (faster than running each trial under the budget).
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from ..budget import budget
from ..gpt import GPTConfig, TinyGPT, pattern_batch
from ..measure import measure
from ..oom import headline
from ..search import largest_batch
from ..units import MiB, format_bytes
from . import FAILED, NOT_ATTEMPTED, PASSED, CheckResult, give_verdict

LIMIT = 40 * MiB
BATCH = 16
LAYERS = 4
STEPS = 8
TARGET_RATIO = 4.0
GRAD_RTOL = 1e-3


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


def train_in_budget(configure: Callable, step: Callable, layers: int = LAYERS) -> tuple[list[float], str]:
    """Run ``STEPS`` steps inside the budget; the losses, and the OOM message if it ran out."""
    model, batches = _setup(layers)
    opt = configure(model)
    losses: list[float] = []
    try:
        with budget(LIMIT, model, opt, batches):
            for ids in batches:
                losses.append(float(step(model, opt, ids)))
    except torch.OutOfMemoryError as err:
        return losses, str(err)
    finally:
        gc.collect()
    return losses, ""


def _first_grads(configure: Callable, step: Callable) -> list[torch.Tensor | None]:
    model, batches = _setup(LAYERS)
    configure(model)  # e.g. switches on checkpointing; its optimizer is replaced below
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)
    step(model, frozen, batches[0])
    return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def check_fit(configure: Callable, step: Callable) -> CheckResult:
    """The 4-block model trains inside the budget, learns, and keeps the full-batch gradients."""
    name = f"train the {LAYERS}-block model in {format_bytes(LIMIT)}"
    try:
        losses, error = train_in_budget(configure, step)
    except NotImplementedError:
        return give_verdict(name, NOT_ATTEMPTED, "replace the `raise NotImplementedError` in configure and step")
    if error:
        return give_verdict(
            name,
            FAILED,
            f"out of memory at step {len(losses) + 1} of {STEPS}: "
            f"{headline(error)}. "
            "Hint: combine checkpointing, micro-batches and a lighter optimizer step.",
        )
    if not losses[-1] < losses[0]:
        return give_verdict(
            name,
            FAILED,
            f"the loss did not go down ({losses[0]:.3f} -> {losses[-1]:.3f}); check the learning rate and the update",
        )
    got = _first_grads(configure, step)
    if any(g is None for g in got):
        return give_verdict(
            name, FAILED, "no gradients after your first step: zero them at the start of `step`, not after the update"
        )
    want = _first_grads(naive_configure, lambda m, o, ids: naive_step(m, o, ids))
    errors = [((g - w).norm() / w.norm()).item() for g, w in zip(got, want)]
    worst = max(errors)
    if not all(e <= GRAD_RTOL for e in errors):  # `not <=` also catches NaN, which max() can hide
        return give_verdict(
            name,
            FAILED,
            f"your gradients differ from the full-batch gradients by up to {worst:.2%}. Hint: divide each "
            "micro-batch loss by the number of micro-batches and use all 16 sequences.",
        )
    return give_verdict(
        name, PASSED, f"{STEPS} steps inside the budget, loss {losses[0]:.3f} -> {losses[-1]:.3f}, full-batch gradients"
    )


def step_peak(configure: Callable, step: Callable, layers: int) -> int:
    """Peak bytes of two training steps of the ``layers``-block model (measured, no budget)."""
    model, batches = _setup(layers)
    opt = configure(model)
    with measure(model, opt, batches[:2]) as m:
        for ids in batches[:2]:
            step(model, opt, ids)
    return m.peak_bytes


def largest_depth(configure: Callable, step: Callable) -> int:
    """The most blocks whose training step peaks inside the budget (0 if none)."""

    def within_budget(layers: int) -> None:
        if step_peak(configure, step, layers) > LIMIT:
            raise torch.OutOfMemoryError(f"{layers} blocks exceed the budget")

    return largest_batch(within_budget, limit=128).largest


def check_scaling(configure: Callable, step: Callable) -> CheckResult:
    """The learner's recipe trains a model with at least 4x the parameters of naive's, in the same budget."""
    name = f"at least {TARGET_RATIO:.0f}x the parameters in the same budget"
    try:
        mine = largest_depth(configure, step)
    except NotImplementedError:
        return give_verdict(name, NOT_ATTEMPTED, "replace the `raise NotImplementedError` in configure and step")
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
