"""Lab 2's check: the shipped solution passes, the stub is 'not attempted', wrong fixes fail."""

from pathlib import Path

import pytest
import torch.nn.functional as F

from notebook_code import defined_in
from vramlab.checks import CheckFailed, lab02
from vramlab.labs import make_lab
from vramlab.notebooks import load

SOLUTION = Path(__file__).resolve().parent.parent / "solutions" / "lab02_debug_the_oom.ipynb"


def train_from(nb):
    return defined_in(nb, "def train(", "lab02", "import torch\nimport torch.nn.functional as F")["train"]


def make_loop(micro=4, divide=True, keep="float", use=1.0):
    def train(model, opt, batches):
        history = []
        for ids in batches:
            opt.zero_grad(set_to_none=True)
            ids = ids[: int(len(ids) * use)]
            for chunk in ids.chunk(micro):
                logits = model(chunk[:, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten()) / (micro if divide else 1)
                loss.backward()
                history.append({"float": loss.item(), "tensor": loss, "logits": logits}[keep])
            opt.step()
        return history

    return train


def test_solution_passes():
    assert lab02.check_train(train_from(load(SOLUTION))).passed


def test_stub_is_not_attempted():
    assert lab02.check_train(train_from(make_lab(load(SOLUTION)))).status == "not attempted yet"


@pytest.mark.parametrize(
    "wrong, words",
    [
        (lab02.train_original, "out of memory at iteration 1"),
        (make_loop(micro=1), "out of memory at iteration 1"),  # leak fixed, batch still too big
        (make_loop(keep="logits"), "out of memory at iteration"),  # micro-batched, still keeps the logits
        (make_loop(keep="tensor"), "leaks per iteration"),  # keeps loss tensors: a small leak
        (make_loop(divide=False), "differ from the full-batch gradients"),  # forgot to divide by k
        (make_loop(use=0.25, micro=1), "differ from the full-batch gradients"),  # smaller effective batch
    ],
)
def test_wrong_fixes_fail(wrong, words):
    with pytest.raises(CheckFailed, match=words):
        lab02.check_train(wrong)


def test_zeroing_after_the_step_is_explained():
    def zero_late(model, opt, batches):
        for ids in batches:
            for chunk in ids.chunk(4):
                (model.loss(chunk) / 4).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return []

    with pytest.raises(CheckFailed, match="start of each iteration"):
        lab02.check_train(zero_late)


def test_nan_gradients_fail():
    def nan_grads(model, opt, batches):
        for ids in batches:
            opt.zero_grad(set_to_none=True)
            for chunk in ids.chunk(4):
                (model.loss(chunk) / 4).backward()
            for p in model.parameters():
                p.grad.fill_(float("nan"))
            opt.step()
        return []

    with pytest.raises(CheckFailed, match="differ from the full-batch gradients"):
        lab02.check_train(nan_grads)
