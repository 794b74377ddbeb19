"""Lab 3's checks: the shipped solution passes, the stub is 'not attempted', wrong recipes fail."""

from pathlib import Path

import pytest
import torch

from notebook_code import defined_in
from vramlab.checks import CheckFailed, lab03
from vramlab.labs import make_lab
from vramlab.notebooks import load

SOLUTION = Path(__file__).resolve().parent.parent / "solutions" / "lab03_make_it_fit.ipynb"


def recipe(nb):
    scope = defined_in(nb, "def configure(", "lab03", "import torch\nfrom vramlab.gpt import TinyGPT")
    return scope["configure"], scope["step"]


def micro_step(k=4, divide=True, use=1.0):
    def step(model, opt, ids):
        opt.zero_grad(set_to_none=True)
        ids = ids[: int(len(ids) * use)]
        total = 0.0
        for chunk in ids.chunk(k):
            loss = model.loss(chunk) / (k if divide else 1)
            loss.backward()
            total += loss.item()
        opt.step()
        return total

    return step


def checkpointed(model):
    model.set_checkpointing(every=1)
    return torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)


def plain(model):
    return torch.optim.AdamW(model.parameters(), lr=3e-3, foreach=True)


def test_solution_passes_both():
    configure, step = recipe(load(SOLUTION))
    assert lab03.check_fit(configure, step).passed
    assert lab03.check_scaling(configure, step).passed


def test_stub_is_not_attempted():
    configure, step = recipe(make_lab(load(SOLUTION)))
    assert lab03.check_fit(configure, step).status == "not attempted yet"
    assert lab03.check_scaling(configure, step).status == "not attempted yet"


@pytest.mark.parametrize(
    "configure, step, words",
    [
        (lab03.naive_configure, lab03.naive_step, "out of memory at step 1"),
        (checkpointed, micro_step(divide=False), "differ from the full-batch gradients"),
        (checkpointed, micro_step(use=0.5, k=2), "differ from the full-batch gradients"),
    ],
)
def test_wrong_recipes_fail_the_fit(configure, step, words):
    with pytest.raises(CheckFailed, match=words):
        lab03.check_fit(configure, step)


@pytest.mark.parametrize(
    "configure, step",
    [(plain, micro_step()), (checkpointed, lab03.naive_step)],
    ids=["micro-batches only", "checkpointing only"],
)
def test_one_technique_alone_misses_the_4x_target(configure, step):
    with pytest.raises(CheckFailed, match="activations dominate"):
        lab03.check_scaling(configure, step)
