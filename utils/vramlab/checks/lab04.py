"""Checks of Lab 4, *Shrink a real model*.

The learner writes ``int8_bytes(model) -> int`` (a prediction of MiniLM's bytes once every
``nn.Linear`` and ``nn.Embedding`` is int8 with torchao) and ``shrink(model) -> nn.Module``
(any compression of a fresh fp32 all-MiniLM-L6-v2 encoder). The checks:

- ``check_int8_prediction``: the prediction equals the measured bytes, to the byte, for two
  different models (the full encoder and one with a quarter of its FFN neurons removed).
- ``check_size``: the returned model's measured bytes are at most ``TARGET_BYTES``.
- ``check_quality``: its sentence embeddings of the *held-out* sentences have a mean cosine
  similarity of at least ``MIN_COSINE`` to the fp32 model's.

Both checks run the learner's ``shrink`` once, in a sandbox process
(:mod:`vramlab.checks.isolation`), and measure size and quality of that one model the same way,
so a ``shrink`` cannot tell which check calls it; the reference embeddings are computed in the
judge process, out of the learner's reach. Its bytes are everything
reachable from it (:func:`vramlab.reach.reachable`: parameters and buffers with tensor
subclasses flattened, bitsandbytes' constants, pruning masks, tensors in plain attributes and
closures, NumPy arrays, Python buffers such as ``bytes``, ``torch.ao`` packed weights); a forward
pass that reads tensors the model does not hold (a global fp32 encoder, weights rebuilt from
bytes) or opens a file fails both checks, on the tuning and on the held-out sentences. The
held-out sentences are read only here, not through :func:`vramlab.minilm.sentences`.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import minilm
from ..prune import module_bytes, prune_ffn_neurons
from ..quantize import linears_and_embeddings, torchao_int8
from ..reach import UnmeasurableObject, reachable, read_by
from ..units import KiB, MiB, format_bytes
from . import (
    FAILED,
    MEASURED_HINT,
    NOT_ATTEMPTED,
    PASSED,
    CheckResult,
    Described,
    _sandbox_predict,
    give_verdict,
    judge_bytes,
    strict,
)
from .isolation import Learner, run_check

TARGET_BYTES = 20 * MiB
MIN_COSINE = 0.98
HIDDEN_READS = 64 * KiB  # what a forward may read beyond the model (none expected; a margin for constants)


@functools.lru_cache(maxsize=1)
def _loaded() -> minilm.MiniLM:
    return minilm.load()


def fresh_model() -> nn.Module:
    """A new fp32 all-MiniLM-L6-v2 encoder (a copy: changing it changes nothing else)."""
    return copy.deepcopy(_loaded().model)


def tokenizer():  # noqa: ANN201 - a transformers tokenizer
    """The MiniLM tokenizer the checks embed with."""
    return _loaded().tokenizer


def _heldout() -> list[str]:
    return minilm._read_sentences("heldout")


@functools.lru_cache(maxsize=1)
def _reference() -> torch.Tensor:
    """The fp32 embeddings of the held-out sentences, from a model loaded for this alone (the
    shared one that ``fresh_model`` copies is reachable from the learner's code)."""
    private = minilm.load()
    return minilm.embed(private.model, private.tokenizer, _heldout())


def measured_int8_bytes(model: nn.Module) -> int:
    """Bytes of ``model`` after torchao int8 on every Linear and Embedding (measured on a copy)."""
    return module_bytes(torchao_int8(copy.deepcopy(model), filter_fn=linears_and_embeddings))


def _int8_case(case: int) -> nn.Module:
    """The models of the int8 prediction: the full encoder, and one with a quarter of its FFN neurons removed."""
    return fresh_model() if case == 0 else prune_ffn_neurons(fresh_model(), 0.25)


INT8_CASES = ("the full encoder", "the encoder with 25 % of its FFN neurons removed")


def _sandbox_int8(fns: tuple, case: int) -> dict[str, Any]:
    """In the check's sandbox: the learner's ``int8_bytes`` of an int8 case, under :func:`predict`."""
    return _sandbox_predict(fns, 0, (_int8_case(case),), {})


def check_int8_prediction(int8_bytes: Callable[[nn.Module], int]) -> CheckResult:
    """``int8_bytes(model)`` equals the measured bytes for the full and a pruned encoder."""
    return run_check("predict the bytes of int8 MiniLM", "vramlab.checks.lab04:_check_int8_prediction", int8_bytes)


def _check_int8_prediction(learner: Learner) -> CheckResult:
    name = "predict the bytes of int8 MiniLM"
    hint = (
        "every Linear and Embedding weight becomes one int8 byte per value plus, per row, an fp32 scale "
        "and an int8 zero point; everything else (biases, LayerNorm) stays fp32"
    )
    for case, setup in enumerate(INT8_CASES):
        try:
            reply = learner.call("vramlab.checks.lab04:_sandbox_int8", case)
        except NotImplementedError:
            return give_verdict(name, NOT_ATTEMPTED, "replace the `raise NotImplementedError` in int8_bytes")
        if reply.get("measured"):
            return give_verdict(name, FAILED, MEASURED_HINT + " Here: do not quantize the model to count its bytes.")
        got = Described(reply["described"]) if reply["described"] else reply["plain"]
        failed = judge_bytes(name, got, measured_int8_bytes(_int8_case(case)), 0.0, setup, hint)
        if failed:
            return failed
    return give_verdict(name, PASSED, f"exact to the byte on {len(INT8_CASES)} models")


def measured_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes the model holds, bytes its forward reads that it does not hold), measured."""
    held = reachable(model)
    hidden = read_by(lambda: minilm.embed(model, tokenizer(), minilm.sentences("tune")[:4])).minus(held)
    return held.nbytes, hidden.nbytes


def _sandbox_shrink(fns: tuple) -> dict[str, Any]:
    """In the check's sandbox: one call of the learner's ``shrink`` on a fresh encoder, and what both
    checks judge of that one model: the bytes it holds, the bytes its forward passes read that it
    does not hold (on 4 tuning sentences and on the held-out ones, no file opened meanwhile), and its
    held-out embeddings."""
    model = fns[0](fresh_model())
    if not isinstance(model, nn.Module):
        return {"problem": f"shrink must return the compressed encoder (an nn.Module), got {type(model).__name__}"}
    embedded: dict[str, torch.Tensor] = {}
    tune, heldout_sentences = minilm.sentences("tune")[:4], _heldout()  # read before files are watched
    try:
        held = reachable(model)
        with strict.no_files():
            probe = read_by(lambda: minilm.embed(model, tokenizer(), tune)).minus(held)
            reads = read_by(lambda: embedded.update(out=minilm.embed(model, tokenizer(), heldout_sentences)))
        heldout = reads.minus(reachable(model))
    except UnmeasurableObject as err:
        return {"problem": f"{err}; return a model whose memory the check can count"}
    except Exception as err:  # noqa: BLE001 - a model that cannot embed sentences fails with its own message
        return {"problem": f"embedding sentences with your model raised {type(err).__name__}: {err}"}
    return {"held": held.nbytes, "hidden": max(probe.nbytes, heldout.nbytes), "embeddings": embedded["out"]}


def _judged_shrink(learner: Learner, name: str) -> tuple[dict[str, Any] | None, CheckResult | None]:
    """What :func:`_sandbox_shrink` measured, or the verdict that ends the check."""
    try:
        run = learner.call("vramlab.checks.lab04:_sandbox_shrink")
    except NotImplementedError:
        return None, give_verdict(name, NOT_ATTEMPTED, "replace the `raise NotImplementedError` in shrink")
    if "problem" in run:
        return None, give_verdict(name, FAILED, run["problem"])
    if run["hidden"] > HIDDEN_READS:
        return None, give_verdict(
            name,
            FAILED,
            f"your model's forward pass reads {format_bytes(run['hidden'])} of tensors that the returned model "
            "does not hold (a global, an object outside it, or weights rebuilt from bytes or a file): those "
            "weights are memory too. Return one module that holds everything it computes with, as tensors.",
        )
    return run, None


def check_size(shrink: Callable[[nn.Module], nn.Module]) -> CheckResult:
    """The model ``shrink`` returns measures at most ``TARGET_BYTES``."""
    return run_check("measured size", "vramlab.checks.lab04:_check_size", shrink)


def _check_size(learner: Learner) -> CheckResult:
    name = f"measured size at most {format_bytes(TARGET_BYTES)}"
    run, verdict = _judged_shrink(learner, name)
    if verdict:
        return verdict
    got = run["held"]  # type: ignore[index]
    text = f"measured {format_bytes(got)} ({got:,} B) against {format_bytes(TARGET_BYTES)}"
    if got > TARGET_BYTES:
        return give_verdict(
            name, FAILED, text + ". Hint: the token embedding is half of MiniLM; what else can go below 8 bits?"
        )
    return give_verdict(name, PASSED, text)


def held_out_cosine(model: nn.Module) -> float:
    """Mean cosine similarity of ``model``'s held-out sentence embeddings to the fp32 model's."""
    return minilm.mean_cosine(minilm.embed(model, tokenizer(), _heldout()), _reference())


def check_quality(shrink: Callable[[nn.Module], nn.Module]) -> CheckResult:
    """The model ``shrink`` returns keeps a held-out mean cosine of at least ``MIN_COSINE``."""
    return run_check("held-out quality", "vramlab.checks.lab04:_check_quality", shrink)


def _check_quality(learner: Learner) -> CheckResult:
    name = f"held-out mean cosine at least {MIN_COSINE}"
    reference = _reference()  # in the judge, before the learner's code runs
    run, verdict = _judged_shrink(learner, name)
    if verdict:
        return verdict
    try:
        cos = minilm.mean_cosine(run["embeddings"], reference)  # type: ignore[index]
    except ValueError as err:
        return give_verdict(name, FAILED, f"{err} Hint: run your model on a few sentences before returning it")
    text = f"mean cosine {cos:.4f} on {len(_heldout())} held-out sentences"
    if not cos >= MIN_COSINE:
        return give_verdict(
            name,
            FAILED,
            text + ". Hint: 4-bit codes everywhere cost too much; keep the most sensitive layers at 8 bits",
        )
    return give_verdict(name, PASSED, text)


__all__ = [
    "MIN_COSINE",
    "PASSED",
    "FAILED",
    "TARGET_BYTES",
    "check_int8_prediction",
    "check_quality",
    "check_size",
    "fresh_model",
    "held_out_cosine",
    "measured_bytes",
    "measured_int8_bytes",
    "tokenizer",
]
