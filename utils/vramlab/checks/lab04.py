"""Checks of Lab 4, *Shrink a real model*.

The learner writes ``int8_bytes(model) -> int`` (a prediction of MiniLM's bytes once every
``nn.Linear`` and ``nn.Embedding`` is int8 with torchao) and ``shrink(model) -> nn.Module``
(any compression of a fresh fp32 all-MiniLM-L6-v2 encoder). The checks:

- ``check_int8_prediction``: the prediction equals the measured bytes, to the byte, for two
  different models (the full encoder and one with a quarter of its FFN neurons removed).
- ``check_size``: the returned model's measured bytes are at most ``TARGET_BYTES``.
- ``check_quality``: its sentence embeddings of the *held-out* sentences have a mean cosine
  similarity of at least ``MIN_COSINE`` to the fp32 model's.

Both numbers are measured on one model: ``shrink`` is called once for the pair of checks
(the second of ``check_size`` and ``check_quality`` judges the model the first one got), so a
``shrink`` that returns a small model to one check and the fp32 one to the other fails. Its bytes are everything
reachable from it (:func:`vramlab.reach.reachable`: parameters and buffers with tensor
subclasses flattened, bitsandbytes' constants, pruning masks, tensors in plain attributes and
closures, NumPy arrays, ``torch.ao`` packed weights); a forward pass that reads tensors the
model does not hold (a global fp32 encoder, say) fails the size check, and so does one
while the quality check embeds the held-out sentences (a model cannot use a hidden fp32
encoder for those only). The held-out sentences are read only here, not through
:func:`vramlab.minilm.sentences`.
"""

from __future__ import annotations

import copy
import functools
import weakref
from collections.abc import Callable

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
    Measured,
    attempt,
    give_verdict,
    judge_bytes,
    predict,
)

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


def check_int8_prediction(int8_bytes: Callable[[nn.Module], int]) -> CheckResult:
    """``int8_bytes(model)`` equals the measured bytes for the full and a pruned encoder."""
    name = "predict the bytes of int8 MiniLM"
    hint = (
        "every Linear and Embedding weight becomes one int8 byte per value plus, per row, an fp32 scale "
        "and an int8 zero point; everything else (biases, LayerNorm) stays fp32"
    )
    cases = {
        "the full encoder": fresh_model(),
        "the encoder with 25 % of its FFN neurons removed": prune_ffn_neurons(fresh_model(), 0.25),
    }
    for setup, model in cases.items():
        try:
            attempted, got = predict(int8_bytes, copy.deepcopy(model))
        except Measured:
            return give_verdict(name, FAILED, MEASURED_HINT + " Here: do not quantize the model to count its bytes.")
        if not attempted:
            return give_verdict(name, NOT_ATTEMPTED, "replace the `raise NotImplementedError` in int8_bytes")
        failed = judge_bytes(name, got, measured_int8_bytes(model), 0.0, setup, hint)
        if failed:
            return failed
    return give_verdict(name, PASSED, f"exact to the byte on {len(cases)} models")


_PENDING: weakref.WeakKeyDictionary[Callable[..., nn.Module], nn.Module] = weakref.WeakKeyDictionary()
"""The model a ``shrink`` returned to the first check of a size/quality pair, for the second."""


def _shrunk(shrink: Callable[[nn.Module], nn.Module], name: str) -> tuple[nn.Module | None, CheckResult | None]:
    """The model to judge: the one ``shrink`` returned to the other check of the pair if that
    check ran last (taken once), else a new call of ``shrink`` on a fresh encoder (kept for it)."""
    try:
        return _PENDING.pop(shrink), None
    except (KeyError, TypeError):
        pass
    attempted, model = attempt(shrink, fresh_model())
    if isinstance(model, nn.Module):
        try:
            _PENDING[shrink] = model
        except TypeError:  # not weakly referenceable (a functools.partial, say): judged per call
            pass
    if not attempted:
        return None, give_verdict(name, NOT_ATTEMPTED, "replace the `raise NotImplementedError` in shrink")
    if not isinstance(model, nn.Module):
        return None, give_verdict(
            name, FAILED, f"shrink must return the compressed encoder (an nn.Module), got {type(model).__name__}"
        )
    return model, None


def measured_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes the model holds, bytes its forward reads that it does not hold), measured."""
    held = reachable(model)
    hidden = read_by(lambda: minilm.embed(model, tokenizer(), minilm.sentences("tune")[:4])).minus(held)
    return held.nbytes, hidden.nbytes


def check_size(shrink: Callable[[nn.Module], nn.Module]) -> CheckResult:
    """The model ``shrink`` returns measures at most ``TARGET_BYTES``."""
    name = f"measured size at most {format_bytes(TARGET_BYTES)}"
    model, verdict = _shrunk(shrink, name)
    if verdict:
        return verdict
    try:
        got, hidden = measured_bytes(model)
    except UnmeasurableObject as err:
        return give_verdict(name, FAILED, f"{err}; return a model whose memory the check can count")
    except Exception as err:  # a model that cannot embed sentences fails with its own message
        return give_verdict(name, FAILED, f"embedding sentences with your model raised {type(err).__name__}: {err}")
    if hidden > HIDDEN_READS:
        return give_verdict(
            name,
            FAILED,
            f"your model's forward pass reads {format_bytes(hidden)} of tensors that the returned model does not "
            "hold (a global, or an object outside it): those weights are memory too. Return one module that "
            "holds everything it computes with.",
        )
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
    name = f"held-out mean cosine at least {MIN_COSINE}"
    _reference()  # computed before the learner's code runs
    model, verdict = _shrunk(shrink, name)
    if verdict:
        return verdict
    embedded: dict[str, torch.Tensor] = {}
    try:
        reads = read_by(lambda: embedded.update(out=minilm.embed(model, tokenizer(), _heldout())))
        hidden = reads.minus(reachable(model)).nbytes
        if hidden > HIDDEN_READS:
            return give_verdict(
                name,
                FAILED,
                f"while embedding the held-out sentences your model read {format_bytes(hidden)} of tensors that "
                "it does not hold (a global, or an object outside it). Return one module that holds everything "
                "it computes with.",
            )
        cos = minilm.mean_cosine(embedded["out"], _reference())
    except UnmeasurableObject as err:
        return give_verdict(name, FAILED, f"{err}; return a model whose memory the check can count")
    except ValueError as err:
        return give_verdict(name, FAILED, f"{err} Hint: run your model on a few sentences before returning it")
    except Exception as err:  # a model that cannot embed sentences fails with its own message
        return give_verdict(name, FAILED, f"embedding the held-out sentences raised {type(err).__name__}: {err}")
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
