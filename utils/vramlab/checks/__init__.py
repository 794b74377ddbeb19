"""Lab checks: pass, fail with a hint, or say "not attempted yet".

A lab exercise is a function the learner completes; as handed out its body raises
``NotImplementedError``. A check calls it: if it raises ``NotImplementedError`` the check
prints "not attempted yet" and returns (so a fresh lab runs green); if the answer is right
it prints "passed"; if wrong it raises :class:`CheckFailed` with a hint (so a solution
notebook with a wrong answer fails under nbval).
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing.process
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..units import KiB, format_bytes

PASSED, FAILED, NOT_ATTEMPTED = "passed", "failed", "not attempted yet"


class CheckFailed(AssertionError):
    """A lab answer is wrong; the message says how and hints at why."""


@dataclass(frozen=True)
class CheckResult:
    """What a check concluded, and the message it printed."""

    name: str
    status: str
    message: str

    @property
    def passed(self) -> bool:
        return self.status == PASSED


def attempt(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[bool, Any]:
    """Call the learner's ``fn``; ``(False, None)`` if it is still the stub."""
    try:
        return True, fn(*args, **kwargs)
    except NotImplementedError:
        return False, None


PREDICTION_BUDGET = 64 * KiB
"""What a prediction may allocate: a prediction is arithmetic on the configuration. Building
the model, running its step or measuring it (the check's own job) allocates far more."""


class Measured(Exception):
    """A prediction allocated tensors: it measured instead of predicting."""


OFF_CPU_ELEMENTS = 1024
"""Elements from which a tensor made off the CPU (meta, cuda) during a prediction means it measures:
building a model on the meta device to count its parameters is measuring too (review A8)."""


class _OffCpu(TorchDispatchMode):
    """Raises :class:`Measured` for an op that makes a tensor of more than :data:`OFF_CPU_ELEMENTS`
    elements on another device than the CPU (which a CPU budget does not count)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_flatten(out)[0]:
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "cpu" and leaf.numel() > OFF_CPU_ELEMENTS:
                raise Measured()
        return out


def predict(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[bool, Any]:
    """Call the learner's prediction ``fn`` like :func:`attempt`, under a CPU budget of
    :data:`PREDICTION_BUDGET` bytes; raise :class:`Measured` if it allocates more, makes large
    tensors on another device (meta, cuda), or starts a thread or a process (the budget sees
    only the thread it runs in)."""
    from ..budget import budget

    try:
        with _no_new_threads_or_processes(), budget(PREDICTION_BUDGET, device="cpu"), _OffCpu():
            return attempt(fn, *args, **kwargs)
    except torch.OutOfMemoryError:
        raise Measured() from None


class Described:
    """An answer that is not a plain value, as the sandbox described it (see :func:`describe`)."""

    def __init__(self, text: str) -> None:
        self.text = text


def _sandbox_predict(fns: tuple, index: int, args: tuple, kwargs: dict) -> dict[str, Any]:
    """In a check's sandbox: the learner's prediction ``fns[index](*args, **kwargs)`` under
    :func:`predict`, as a plain value (or a description of what came back)."""
    try:
        attempted, got = predict(fns[index], *args, **kwargs)
    except Measured:
        return {"measured": True}
    if not attempted:
        raise NotImplementedError
    value = plain(got)
    return {"plain": value, "described": "" if value is not None or got is None else describe(got)}


def predict_in(learner: Any, index: int, *args: Any, **kwargs: Any) -> tuple[bool, Any]:
    """:func:`predict` for a check's judge: the learner's ``index``-th function runs in the sandbox
    (:class:`vramlab.checks.isolation.Learner`); the answer comes back as a plain value or a
    :class:`Described`. Raises :class:`Measured` as :func:`predict` does."""
    try:
        reply = learner.call("vramlab.checks:_sandbox_predict", index, args, kwargs)
    except NotImplementedError:
        return False, None
    if reply.get("measured"):
        raise Measured()
    return True, Described(reply["described"]) if reply["described"] else reply["plain"]


def check_seed(draw: Callable[[], int]) -> tuple[int, str]:
    """The seed of one run of a check, and a note for its verdict: ``draw()``, unless the
    environment variable ``VRAMLAB_CHECK_SEED`` pins it (tests do; a verdict says so)."""
    pinned = os.environ.get("VRAMLAB_CHECK_SEED", "")
    if pinned.isdigit():
        return int(pinned), ", pinned by VRAMLAB_CHECK_SEED"
    return draw(), ""


@contextlib.contextmanager
def _no_new_threads_or_processes() -> Iterator[None]:
    """Make ``Thread.start``, ``Process.start`` and ``Popen`` raise :class:`Measured` inside,
    when called from this thread: other threads of the process start theirs as usual."""
    owner_thread = threading.get_ident()
    targets = [(threading.Thread, "start"), (multiprocessing.process.BaseProcess, "start")]
    targets.append((subprocess.Popen, "__init__"))
    saved = [(owner, name, owner.__dict__[name]) for owner, name in targets]

    def guarded(original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() == owner_thread:
                raise Measured()
            return original(*args, **kwargs)

        return call

    try:
        for owner, name, original in saved:
            setattr(owner, name, guarded(original))
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


class StepCounter:
    """Counts an optimizer's ``step()`` calls with the optimizer's own post-step hook, so a
    check sees the steps a learner's code really took (``with StepCounter(opt) as steps:``).
    ``reading``, if given, is called after each step and its values kept in ``readings``
    (a check's own clock of iterations: it does not depend on how the loop iterates)."""

    def __init__(self, opt: torch.optim.Optimizer, reading: Callable[[], int] | None = None) -> None:
        self.count = 0
        self.readings: list[int] = []
        self._opt = opt
        self._reading = reading
        self._handle: Any = None

    def _hook(self, *_: object) -> None:
        self.count += 1
        if self._reading is not None:
            self.readings.append(self._reading())

    def __enter__(self) -> StepCounter:
        self._handle = self._opt.register_step_post_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


def gradient_fingerprint(params: list[torch.Tensor]) -> torch.Tensor:
    """Per parameter, three numbers that a gradient determines: its norm, its sum, and its dot
    product with the parameter (fp64, shape ``(len(params), 3)``; a row ``(-1, nan, nan)`` for a
    missing gradient, see :func:`missing_gradients`).
    Cheap enough to take inside a budget: each allocates one scalar, not a copy."""
    rows = []
    with torch.no_grad():
        for p in params:
            g = p.grad
            if g is None:
                rows.append([-1.0, math.nan, math.nan])  # a norm is never negative: "no gradient"
                continue
            flat, weight = g.detach().reshape(-1), p.detach().reshape(-1)
            rows.append([flat.norm().item(), flat.sum().item(), (flat @ weight.to(flat.dtype)).item()])
    return torch.tensor(rows, dtype=torch.float64)


def missing_gradients(fingerprint: torch.Tensor | None) -> bool:
    """Whether a :func:`gradient_fingerprint` was not taken, or some parameter had no gradient."""
    return fingerprint is None or bool((fingerprint[:, 0] < 0).any())


def fingerprint_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """How far the gradients behind fingerprint ``got`` are from those behind ``want``: the worst of
    the per-parameter relative errors of the norms and the relative errors of the vectors of sums
    and of dot products (inf if a gradient was missing or the shapes differ)."""
    if got.shape != want.shape or not bool(torch.isfinite(got).all()):
        return math.inf
    norms = ((got[:, 0] - want[:, 0]).abs() / want[:, 0].clamp_min(1e-30)).max().item()
    others = [((got[:, i] - want[:, i]).norm() / want[:, i].norm().clamp_min(1e-30)).item() for i in (1, 2)]
    return max(norms, *others)


def first_step_problem(got: torch.Tensor | None, want: torch.Tensor, tolerance: float, batch: int) -> str:
    """Why the gradients of a judged run's first ``opt.step()`` (fingerprint ``got``) are not the
    full-batch ones (fingerprint ``want``) within ``tolerance``, or "" when they are."""
    if missing_gradients(got):
        return (
            "some parameters had no gradient when your code called opt.step() the first time. Hint: run "
            "backward over every micro-batch of the batch before `opt.step()`."
        )
    worst = fingerprint_error(got, want)  # type: ignore[arg-type]
    return "" if worst <= tolerance else gradient_hint(worst, tolerance, batch)  # NaN is not <=: a problem


class FirstStepGradients:
    """Takes :func:`gradient_fingerprint` of ``params`` just before ``opt``'s first ``step()``,
    with the optimizer's own pre-step hook: the gradients the learner's loop really stepped with,
    in the judged run itself (``with FirstStepGradients(opt, params) as first: ...; first.fingerprint``)."""

    def __init__(self, opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
        self._opt, self._params = opt, params
        self.fingerprint: torch.Tensor | None = None
        self._handle: Any = None

    def _hook(self, *_: object) -> None:
        if self.fingerprint is None:
            self.fingerprint = gradient_fingerprint(self._params)

    def __enter__(self) -> FirstStepGradients:
        self._handle = self._opt.register_step_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


def gradient_hint(worst: float, tolerance: float, batch: int) -> str:
    """The message for gradients off the full-batch ones by ``worst`` (relative): a small error
    is precision (autocast, 16-bit weights), a large one the effective batch."""
    text = f"your first step's gradients differ from the full-batch gradients by up to {worst:.2%}. "
    if math.isfinite(worst) and worst < 0.2:  # a wrong effective batch is off by 25 % or more
        return text + (
            "Hint: an error this size usually comes from precision, not from the batch: autocast or 16-bit "
            f"weights round the gradients, and this check allows a relative error of {tolerance:g}. Use a "
            "precision the lab allows, or, if you split the batch, divide each micro-batch loss by their number."
        )
    return text + (
        f"Hint: with k micro-batches, each micro-batch loss must be divided by k, and every sequence of the "
        f"batch must be used (the effective batch stays {batch})."
    )


MEASURED_HINT = (
    "your prediction allocated tensors (or started a thread or process, where the check cannot see "
    "what it allocates): it built, ran or measured a model. Predict from the "
    "configuration alone (arithmetic on its sizes); the check does the measuring."
)


_PLAIN = (int, float, bool)


def plain(value: Any) -> int | float | bool | None:
    """An answer as a plain Python ``int``, ``float`` or ``bool``, or None when it is not one of
    those, a NumPy scalar, or a one-element ``torch.Tensor``. Types are matched exactly, not by
    ``isinstance``: a subclass could run code when it is converted (a ``__float__`` that measures,
    or reads the check's expected value), so it is refused before any of its methods run."""
    kind = type(value)
    if kind in _PLAIN:
        return value  # type: ignore[no-any-return]
    if kind.__module__ == "numpy" and isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()  # type: ignore[no-any-return]
    if kind is torch.Tensor and value.numel() == 1 and not value.is_complex() and value.device.type != "meta":
        return value.item()  # type: ignore[no-any-return]
    return None


def describe(value: Any) -> str:
    """A wrong answer, shown without running any of its own code: the repr of a plain value,
    else its type's name (a subclass's ``__repr__`` is the learner's code too)."""
    if type(value) is Described:
        return value.text
    got = plain(value)
    if got is not None or value is None:
        return repr(got)
    kind = type(value)
    if kind is str:
        return repr(value if len(value) <= 40 else value[:40] + "...")
    if kind is torch.Tensor:
        return f"a tensor of shape {tuple(value.shape)} on {value.device.type} (answer with one number)"
    subclass = next((base.__name__ for base in (*_PLAIN, torch.Tensor) if issubclass(kind, base)), None)
    if subclass:
        return f"a {kind.__name__} (a subclass of {subclass}: answer with a plain {subclass} instead)"
    return f"a {kind.__name__}"


def as_number(value: Any) -> float | None:
    """``value`` as a float if it is a finite real number (a plain Python or NumPy number, or a
    one-element integer/float tensor: see :func:`plain`), else None. Booleans are not numbers here."""
    value = plain(value)
    if value is None or isinstance(value, bool):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def as_bool(value: Any) -> bool | None:
    """``value`` as a bool if it is one (a plain Python or NumPy bool, or a one-element bool
    tensor: see :func:`plain`), else None."""
    value = plain(value)
    return value if isinstance(value, bool) else None


_QUIET: list[bool] = []


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Inside, :func:`give_verdict` only returns the verdict (a judge process sends it to the
    notebook, which prints it)."""
    _QUIET.append(True)
    try:
        yield
    finally:
        _QUIET.pop()


def give_verdict(name: str, status: str, message: str = "") -> CheckResult:
    """Print a check's verdict; raise :class:`CheckFailed` when it failed."""
    result = CheckResult(name, status, message)
    if _QUIET:
        return result
    mark = {PASSED: "✅", FAILED: "❌", NOT_ATTEMPTED: "⏳"}[status]
    text = f"{mark} {name}: {status}" + (f" — {message}" if message else "")
    if status == FAILED:
        raise CheckFailed(text)
    print(text)
    return result


def relative_gap(got: float, want: float) -> float:
    """|got - want| / |want| (0 when both are 0, inf when only ``want`` is 0)."""
    if want == 0:
        return 0.0 if got == 0 else math.inf
    return abs(got - want) / abs(want)


def judge_bytes(
    name: str, got: Any, want: int, rel_tol: float, setup: str, hint: str, explain: Callable[[], str] | None = None
) -> CheckResult | None:
    """``None`` when ``got`` is a finite number of bytes within ``rel_tol`` of ``want``;
    otherwise the failed report (which raises :class:`CheckFailed`). ``explain`` is called
    only on failure, for a diagnosis of which part is off."""
    number = as_number(got)
    if number is None:
        return give_verdict(name, FAILED, f"expected a number of bytes, got {describe(got)}. Hint: {hint}")
    err = relative_gap(number, float(want))
    if err > rel_tol:
        where = explain() if explain else ""
        exact = f"{int(number):,}" if number.is_integer() else f"{number:,.2f}"
        return give_verdict(
            name,
            FAILED,
            f"for {setup} you predicted {format_bytes(number)} ({exact} B) but vramlab measured "
            f"{format_bytes(want)} ({int(want):,} B): off by {abs(number - want):,.6g} B ({err:.2%}), more than "
            f"the {rel_tol:.2%} allowed. {where}Hint: {hint}",
        )
    return None


def check_bytes(
    name: str, fn: Callable[..., Any], cases: list[tuple[tuple, dict, int]], rel_tol: float, hint: str
) -> CheckResult:
    """Check that ``fn(*args, **kwargs)`` returns a byte count within ``rel_tol`` of the
    measured value for every case ``(args, kwargs, measured_bytes)``.

    The learner never sees the cases in advance, so an answer tuned to one set-up fails.
    """
    if not cases:
        raise ValueError("a check needs at least one case")
    for args, kwargs, measured in cases:
        attempted, got = attempt(fn, *args, **kwargs)
        if not attempted:
            return give_verdict(name, NOT_ATTEMPTED, "replace the `raise NotImplementedError` with your answer")
        setup = "(" + ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())]) + ")"
        failed = judge_bytes(name, got, measured, rel_tol, setup, hint)
        if failed:
            return failed
    return give_verdict(name, PASSED, f"within {rel_tol:.0%} of the measurement on {len(cases)} set-ups")


def check_true(
    name: str, fn: Callable[..., Any], judge: Callable[[Any], tuple[bool, str]], *args: Any, **kwargs: Any
) -> CheckResult:
    """Generic check: ``judge(answer)`` returns ``(ok, explanation)``."""
    attempted, got = attempt(fn, *args, **kwargs)
    if not attempted:
        return give_verdict(name, NOT_ATTEMPTED, "replace the `raise NotImplementedError` with your answer")
    ok, why = judge(got)
    return give_verdict(name, PASSED if ok else FAILED, why)
