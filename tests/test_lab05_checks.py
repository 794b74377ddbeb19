"""Lab 5's check: the shipped plan passes, the stub is 'not attempted', plans that overflow
a rank's budget, change the batch, or are malformed fail."""

from pathlib import Path

import pytest

from notebook_code import defined_in
from vramlab.checks import CheckFailed, lab05
from vramlab.labs import make_lab
from vramlab.notebooks import load

SOLUTION = Path(__file__).resolve().parent.parent / "solutions" / "lab05_shard_it.ipynb"


def learner_plan(nb):
    return defined_in(nb, "def plan(", "lab05", "from vramlab.checks import lab05")["plan"]


def test_solution_passes():
    assert lab05.check_sharding(learner_plan(load(SOLUTION))).passed


def test_stub_is_not_attempted():
    assert lab05.check_sharding(learner_plan(make_lab(load(SOLUTION)))).status == "not attempted yet"


@pytest.mark.parametrize(
    "plan, words",
    [
        ({"strategy": "ddp", "batch_per_rank": 2, "checkpointing": True}, "ran out of memory"),
        ({"strategy": "zero1", "batch_per_rank": 2, "checkpointing": True}, "ran out of memory"),
        ({"strategy": "fsdp", "batch_per_rank": 1, "checkpointing": False}, "differ from one process"),
        ({"strategy": "fsdp", "batch_per_rank": 2}, "exactly the keys"),
        ({"strategy": "zero3", "batch_per_rank": 2, "checkpointing": False}, "unknown strategy"),
        ({"strategy": "fsdp", "batch_per_rank": 0, "checkpointing": False}, "positive int"),
        ("fsdp", "must return a dict"),
    ],
)
def test_wrong_plans_fail(plan, words):
    with pytest.raises(CheckFailed, match=words):
        lab05.check_sharding(lambda: plan)
