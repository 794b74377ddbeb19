"""Lab 5's check: the shipped plan passes, the stub is 'not attempted', plans that overflow
a rank's budget, change the batch, or are malformed fail."""

from pathlib import Path

import pytest

import lab05_learners
from notebook_code import defined_in
from vramlab.checks import CheckFailed, lab05
from vramlab.labs import make_lab
from vramlab.notebooks import load

SOLUTION = Path(__file__).resolve().parent.parent / "solutions" / "lab05_shard_it.ipynb"


def learner(nb):
    scope = defined_in(nb, "def predict_state_bytes(", "lab05", "from vramlab.checks import lab05")
    scope.update(defined_in(nb, "def shard(", "lab05", "from vramlab.checks import lab05"))
    return scope["shard"], scope["predict_state_bytes"]


def right_prediction(params, world):
    return 16 * params // world


def test_solution_passes():
    shard, predict_state_bytes = learner(load(SOLUTION))
    assert lab05.check_sharding(shard, predict_state_bytes).passed


def test_stub_is_not_attempted():
    shard, predict_state_bytes = learner(make_lab(load(SOLUTION)))
    assert lab05.check_sharding(shard, predict_state_bytes).status == "not attempted yet"
    solution_shard, _ = learner(load(SOLUTION))
    assert lab05.check_sharding(shard, right_prediction).status == "not attempted yet"  # shard still a stub


@pytest.mark.parametrize(
    "shard, words",
    [
        (lab05_learners.ddp, "rank 0 failed: .*out of memory"),
        (lab05_learners.zero1, "rank 0 failed: .*out of memory"),
        (lab05_learners.no_sync, "differ from one process"),
        (lab05_learners.full_copy_on_the_side, "out of memory"),
        (lab05_learners.returns_nothing, "must return \\(model, optimizer\\)"),
    ],
)
def test_wrong_sharding_fails(shard, words):
    with pytest.raises(CheckFailed, match=words):
        lab05.check_sharding(shard, right_prediction)


def test_predictions_are_judged_on_two_models():
    solution_shard, _ = learner(load(SOLUTION))
    with pytest.raises(CheckFailed, match="the lab's model"):
        lab05.check_sharding(solution_shard, lambda params, world: 16 * params)  # forgot to shard
    lab_answer = right_prediction(lab05.params(), lab05.WORLD)
    with pytest.raises(CheckFailed, match="a second model"):
        lab05.check_sharding(solution_shard, lambda params, world: lab_answer)  # a number read off a run


def test_a_prediction_that_runs_the_ranks_is_refused():
    solution_shard, _ = learner(load(SOLUTION))
    source = lab05.PL.source_of(solution_shard)  # the prediction runs in a sandbox, without the notebook's source

    def measuring(params, world):
        return lab05.state_bytes(lab05.run(source)[0])

    with pytest.raises(CheckFailed, match="started a thread or process"):
        lab05.check_sharding(solution_shard, measuring)


def test_a_shard_that_fails_on_the_second_model_fails_there():
    with pytest.raises(CheckFailed, match="on a second model .*rank 0 failed: ValueError: this shard only knows"):
        lab05.check_sharding(lab05_learners.only_the_lab_model, right_prediction)
