"""Checks of Lab 1, *Predict, then measure*.

Each check runs real TinyGPT training steps on the CPU, measured by the storage tracker (the
bytes ``torch.cuda.memory_allocated`` would count), on configurations the lab never shows,
and compares them with the learner's prediction. The configurations are drawn at random for
each run of a check (:func:`draw_configs`; the seed is shown with the verdict), so a table of
answers measured in an earlier cell does not match them, and the learner's function gets a
:class:`LabConfig`: the same fields as :class:`~vramlab.gpt.GPTConfig` without its ``params``
property, so "predict the parameter bytes" cannot be answered by the library's own count.
When a prediction is off, the check varies one knob at a time (depth, vocabulary, batch) to
say which part of the count is wrong.
"""

from __future__ import annotations

import gc
import random
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch

from ..budget import budget
from ..gpt import GPTConfig, TinyGPT, random_batch
from ..measure import measure
from ..units import format_bytes
from . import (
    FAILED,
    MEASURED_HINT,
    NOT_ATTEMPTED,
    PASSED,
    CheckResult,
    Measured,
    as_bool,
    as_number,
    check_seed,
    describe,
    give_verdict,
    judge_bytes,
    predict_in,
)
from .isolation import Learner, run_check


@dataclass(frozen=True)
class LabConfig:
    """What a prediction is given: TinyGPT's configuration fields, and no parameter count."""

    vocab_size: int
    seq_len: int
    hidden: int
    layers: int
    heads: int
    mlp_ratio: int = 4
    attention: str = "sdpa"


def _model_config(cfg: LabConfig | GPTConfig) -> GPTConfig:
    return cfg if isinstance(cfg, GPTConfig) else GPTConfig(**asdict(cfg))


def draw_configs(seed: int) -> tuple[LabConfig, LabConfig, LabConfig]:
    """Three small TinyGPT configurations drawn from ``seed``: vocabularies of 100 to 1100
    tokens, 17 to 80 positions, 2, 4 or 8 heads of 8 to 32 values; their depths are 1, 2 and 3
    blocks and their MLP ratios include 2 and 4, in a drawn order, so every part of a count is
    exercised whatever the seed."""
    rng = random.Random(seed)
    layers, ratios = rng.sample((1, 2, 3), 3), rng.sample((2, 4, rng.choice((2, 4))), 3)
    configs = []
    for depth, ratio in zip(layers, ratios):
        heads = rng.choice((2, 4, 8))
        head_dim = rng.choice([d for d in (8, 16, 32) if heads * d <= 128])
        vocab, seq = rng.randrange(100, 1101), rng.randrange(17, 81)
        configs.append(LabConfig(vocab, seq, heads * head_dim, depth, heads, ratio))
    return configs[0], configs[1], configs[2]


def new_seed() -> int:
    """A fresh seed for one run of a check."""
    return secrets.randbelow(2**31)


TOLERANCE = {"parameters": 0.0, "gradients": 0.0, "optimizer": 1e-4, "activations": 0.02}
OPTIMIZERS = ("sgd", "sgd-momentum", "adamw")


def _optimizer(name: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.01, foreach=True)
    if name == "sgd-momentum":
        return torch.optim.SGD(params, lr=0.01, momentum=0.9, foreach=True)
    return torch.optim.AdamW(params, lr=1e-3, foreach=True)


def measure_step(
    cfg: GPTConfig, batch: int = 2, optimizer: str = "adamw", frozen_embedding: bool = False
) -> dict[str, int]:
    """One real training step of TinyGPT on the CPU: bytes by role after the step, the
    activations saved at the end of the forward pass, and the step's peak."""
    cfg = _model_config(cfg)
    torch.manual_seed(0)
    model = TinyGPT(cfg)
    if frozen_embedding:
        model.tok.weight.requires_grad_(False)
    opt = _optimizer(optimizer, [p for p in model.parameters() if p.requires_grad])
    ids = random_batch(cfg, batch)
    with measure(model, opt, ids) as step:
        with measure(model, ids) as fwd:
            loss = model.loss(ids)
        loss.backward()
        opt.step()
        del loss
    return {**step.end_breakdown, "saved": fwd.end_breakdown["activations"], "peak": step.peak_bytes}


def _diagnose(fn: Callable[..., float | None], cfg: LabConfig, truth: Callable[[LabConfig], int]) -> str:
    """Which part of a byte count is off: per block, the vocabulary-sized part, or the rest.
    ``fn`` is the learner's prediction, run in the sandbox under the prediction budget (None
    when it gave no number)."""
    deeper, wider_vocab = replace(cfg, layers=cfg.layers + 1), replace(cfg, vocab_size=cfg.vocab_size + 100)
    try:
        answers = [fn(c) for c in (cfg, deeper, wider_vocab)]
    except Exception:  # noqa: BLE001 - a diagnosis is a bonus: none if the learner's code fails here
        return ""
    if any(a is None for a in answers):
        return ""
    here, more_layers, more_vocab = answers
    block_err = (more_layers - here) - (truth(deeper) - truth(cfg))  # type: ignore[operator]
    vocab_err = (more_vocab - here) - (truth(wider_vocab) - truth(cfg))  # type: ignore[operator]
    parts = []
    if block_err:
        parts.append(f"each transformer block is off by {block_err:+,} B")
    if vocab_err:
        parts.append(f"100 more vocabulary entries change your count by {vocab_err:+,} B more than they should")
    if not parts:
        parts.append("the blocks and the vocabulary-sized parts are right; something counted once per model is off")
    return "; ".join(parts) + ". "


def _check_counts(
    name: str,
    learner: Learner,
    role: str,
    hint: str,
    kwargs_for: Callable[[LabConfig], dict],
    measured_for: Callable[[LabConfig], int],
) -> CheckResult:
    seed, pinned = check_seed(new_seed)
    configs = draw_configs(seed)

    def answer(cfg: LabConfig) -> float | None:
        return as_number(predict_in(learner, 0, cfg, **kwargs_for(cfg))[1])

    for cfg in configs:
        try:
            attempted, got = predict_in(learner, 0, cfg, **kwargs_for(cfg))
        except Measured:
            return give_verdict(name, FAILED, MEASURED_HINT)
        if not attempted:
            return give_verdict(name, NOT_ATTEMPTED, "replace the `raise NotImplementedError` with your answer")
        failed = judge_bytes(
            name,
            got,
            measured_for(cfg),
            TOLERANCE[role],
            f"{cfg} (seed {seed}{pinned})",
            hint,
            explain=lambda cfg=cfg: _diagnose(answer, cfg, measured_for),
        )
        if failed:
            return failed
    return give_verdict(
        name,
        PASSED,
        f"matches the measurement on {len(configs)} configurations drawn for this run (seed {seed}{pinned})"
        + ("" if TOLERANCE[role] == 0 else f" (within {TOLERANCE[role]:.2%})"),
    )


def check_param_bytes(fn: Callable[[GPTConfig], int]) -> CheckResult:
    """``fn(cfg)``: bytes of TinyGPT's fp32 parameters."""
    return run_check("parameter bytes", "vramlab.checks.lab01:_check_param_bytes", fn)


def _check_param_bytes(learner: Learner) -> CheckResult:
    return _check_counts(
        "parameter bytes",
        learner,
        "parameters",
        "4 bytes per parameter; count the token and position embeddings, every Linear's weight "
        "and bias, every LayerNorm's weight and bias, and remember the LM head is tied.",
        lambda cfg: {},
        lambda cfg: measure_step(cfg, optimizer="sgd")["parameters"],
    )


def check_grad_bytes(fn: Callable[..., int]) -> CheckResult:
    """``fn(cfg, frozen_embedding)``: bytes of gradients after backward."""
    return run_check("gradient bytes", "vramlab.checks.lab01:_check_grad_bytes", fn)


def _check_grad_bytes(learner: Learner) -> CheckResult:
    result = None
    for frozen in (False, True):
        result = _check_counts(
            f"gradient bytes (frozen embedding={frozen})",
            learner,
            "gradients",
            "one fp32 gradient per trainable parameter; a frozen tensor has none.",
            lambda cfg, f=frozen: {"frozen_embedding": f},
            lambda cfg, f=frozen: measure_step(cfg, optimizer="sgd", frozen_embedding=f)["gradients"],
        )
        if result.status != PASSED:
            return result
    return result  # type: ignore[return-value]


def check_optimizer_bytes(fn: Callable[..., int]) -> CheckResult:
    """``fn(cfg, optimizer)``: bytes of optimizer state after the first step."""
    return run_check("optimizer state", "vramlab.checks.lab01:_check_optimizer_bytes", fn)


def _check_optimizer_bytes(learner: Learner) -> CheckResult:
    result = None
    for name in OPTIMIZERS:
        result = _check_counts(
            f"optimizer state ({name})",
            learner,
            "optimizer",
            "SGD keeps nothing; momentum keeps one buffer per parameter; AdamW keeps two "
            "moments per parameter (and a 4-byte step counter per tensor, negligible here).",
            lambda cfg, n=name: {"optimizer": n},
            lambda cfg, n=name: measure_step(cfg, optimizer=n)["optimizer"],
        )
        if result.status != PASSED:
            return result
    return result  # type: ignore[return-value]


def check_activation_bytes(fn: Callable[..., int]) -> CheckResult:
    """``fn(cfg, batch)``: bytes autograd holds at the end of the forward pass (loss computed)."""
    return run_check("activation bytes", "vramlab.checks.lab01:_check_activation_bytes", fn)


def _check_activation_bytes(learner: Learner) -> CheckResult:
    result = None
    for batch in (1, 3):
        result = _check_counts(
            f"activation bytes (batch {batch})",
            learner,
            "activations",
            "read TinyGPT's code: per block, which outputs does backward need (LayerNorm "
            "outputs and statistics, q/k/v, attention output and log-sum-exp, the MLP's two "
            "wide tensors, the residual sums)? Outside the blocks: the embedding sum, the final "
            "LayerNorm, the log-softmax over the vocabulary, the labels. The loss uses seq_len - 1 tokens.",
            lambda cfg, b=batch: {"batch": b},
            lambda cfg, b=batch: measure_step(cfg, batch=b, optimizer="sgd")["saved"],
        )
        if result.status != PASSED:
            return result
    return result  # type: ignore[return-value]


def draw_fit_cases(seed: int) -> list[tuple[LabConfig, int, float]]:
    """Five (configuration, batch, budget factor) cases drawn from ``seed``, budgets 20 % below
    or 25 % above the real peak: a small batch (1 or 2, where the optimizer step tends to be the
    peak) and a large one (16 or 32, where activations do) each with both budgets, and a middle
    batch (4 or 8) with the tighter one."""
    rng = random.Random(seed + 1)
    a, b, c = draw_configs(seed)
    small, large, middle = rng.choice((1, 2)), rng.choice((16, 32)), rng.choice((4, 8))
    return [(a, small, 0.8), (a, small, 1.25), (b, large, 0.8), (b, large, 1.25), (c, middle, 0.8)]


def check_fits(fn: Callable[..., bool]) -> CheckResult:
    """``fn(cfg, batch, budget_bytes)``: does one AdamW training step fit the budget?

    Each case is decided by running the step under :func:`vramlab.budget`, with budgets
    20 % below or 25 % above the real peak, so a peak estimate within that margin passes.
    """
    return run_check("fits the budget", "vramlab.checks.lab01:_check_fits", fn)


def _check_fits(learner: Learner) -> CheckResult:
    name = "fits the budget"
    seed, pinned = check_seed(new_seed)
    cases = draw_fit_cases(seed)
    for cfg, batch, factor in cases:
        limit = int(measure_step(cfg, batch=batch)["peak"] * factor)
        try:
            attempted, got = predict_in(learner, 0, cfg, batch, limit)
        except Measured:
            return give_verdict(name, FAILED, MEASURED_HINT + " Here: do not run the step to see if it fits.")
        if not attempted:
            return give_verdict(name, NOT_ATTEMPTED, "replace the `raise NotImplementedError` with your answer")
        answer = as_bool(got)
        if answer is None:
            return give_verdict(name, FAILED, f"expected True or False, got {describe(got)}")
        actual = _runs_within(cfg, batch, limit)
        if answer != actual:
            return give_verdict(
                name,
                FAILED,
                f"for {cfg}, batch {batch}, budget {format_bytes(limit)} (seed {seed}{pinned}): you said "
                f"{'fits' if answer else 'does not fit'}, "
                f"the budget run {'completed' if actual else 'ran out of memory'}. "
                "Hint: the peak is the larger of the optimizer step (weights + gradients + two AdamW moments "
                "+ one temporary per parameter) and the start of backward (weights + activations + two "
                "(tokens x vocab) fp32 loss gradients).",
            )
    return give_verdict(name, PASSED, f"agrees with {len(cases)} real budget runs (seed {seed}{pinned})")


def _runs_within(cfg: LabConfig | GPTConfig, batch: int, limit: int) -> bool:
    cfg = _model_config(cfg)
    torch.manual_seed(0)
    model = TinyGPT(cfg)
    opt = _optimizer("adamw", list(model.parameters()))
    ids = random_batch(cfg, batch)
    try:
        with budget(limit, model, opt, ids):
            model.loss(ids).backward()
            opt.step()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        gc.collect()
