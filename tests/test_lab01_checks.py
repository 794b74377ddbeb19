"""Lab 1's checks: the shipped solution passes, the stub is 'not attempted', wrong answers fail."""

from pathlib import Path

import pytest

from notebook_code import defined_in
from vramlab.checks import CheckFailed, lab01
from vramlab.checks.isolation import LearnerError
from vramlab.labs import make_lab
from vramlab.notebooks import load

SOLUTION = Path(__file__).resolve().parent.parent / "solutions" / "lab01_predict_then_measure.ipynb"


def functions(nb):
    """The predict_* functions defined in a notebook (check calls left out)."""
    return defined_in(nb, "def predict_", "lab01", "from vramlab.gpt import GPTConfig")


@pytest.fixture(autouse=True)
def fixed_seed(monkeypatch):
    """The checks draw their configurations at random per run; the tests pin one seed, and
    test_the_solution_passes_whatever_the_seed tries several."""
    monkeypatch.setenv("VRAMLAB_CHECK_SEED", "0")


@pytest.fixture(scope="module")
def right():
    return functions(load(SOLUTION))


@pytest.fixture(scope="module")
def stub():
    return functions(make_lab(load(SOLUTION)))


CHECKS = [
    ("check_param_bytes", "predict_param_bytes"),
    ("check_grad_bytes", "predict_grad_bytes"),
    ("check_optimizer_bytes", "predict_optimizer_bytes"),
    ("check_activation_bytes", "predict_activation_bytes"),
    ("check_fits", "predict_fits"),
]


@pytest.mark.parametrize("check, fn", CHECKS)
def test_solution_passes(right, check, fn):
    assert getattr(lab01, check)(right[fn]).passed


@pytest.mark.parametrize("check, fn", CHECKS)
def test_stub_is_not_attempted(stub, check, fn, capsys):
    assert getattr(lab01, check)(stub[fn]).status == "not attempted yet"


def test_params_wrong_answers(right):
    P = right["predict_param_bytes"]
    wrong = {
        "2 bytes per parameter": lambda c: P(c) // 2,
        "untied head counted": lambda c: P(c) + 4 * c.vocab_size * c.hidden,
        "no position embedding": lambda c: P(c) - 4 * c.seq_len * c.hidden,
        "LayerNorms forgotten": lambda c: P(c) - 4 * (4 * c.hidden * c.layers + 2 * c.hidden),
        "MLP ratio fixed at 4": lambda c: P(c) + 4 * c.layers * (2 * c.hidden + 1) * (4 - c.mlp_ratio) * c.hidden,
    }
    for fn in wrong.values():  # the keys say what each wrong model gets wrong
        with pytest.raises(CheckFailed):
            lab01.check_param_bytes(fn)


def test_params_failure_says_which_part(right):
    P = right["predict_param_bytes"]
    with pytest.raises(CheckFailed, match="each transformer block is off by -"):
        lab01.check_param_bytes(lambda c: P(c) - 4 * 2 * 2 * c.hidden * c.layers)  # LayerNorms of the blocks forgotten
    with pytest.raises(CheckFailed, match="vocabulary entries change your count"):
        lab01.check_param_bytes(lambda c: P(c) + 4 * c.vocab_size * c.hidden)  # head counted as untied


def test_grads_ignoring_frozen_fails(right):
    with pytest.raises(CheckFailed, match="frozen embedding=True"):
        lab01.check_grad_bytes(lambda c, frozen_embedding=False: right["predict_param_bytes"](c))


@pytest.mark.parametrize(
    "rule",
    [
        {"sgd": 0, "sgd-momentum": 1, "adamw": 3},  # counts the gradients as optimizer state
        {"sgd": 0, "sgd-momentum": 0, "adamw": 2},  # forgets the momentum buffer
        {"sgd": 1, "sgd-momentum": 1, "adamw": 2},  # thinks SGD keeps a copy
    ],
)
def test_optimizer_wrong_rules(right, rule):
    P = right["predict_param_bytes"]
    with pytest.raises(CheckFailed):
        lab01.check_optimizer_bytes(lambda c, optimizer: rule[optimizer] * P(c))


def test_activations_wrong_answers(right):
    A = right["predict_activation_bytes"]
    with pytest.raises(CheckFailed, match="vocabulary"):
        lab01.check_activation_bytes(lambda c, batch: A(c, batch) - 4 * batch * (c.seq_len - 1) * c.vocab_size)
    with pytest.raises(CheckFailed, match="each transformer block is off"):
        lab01.check_activation_bytes(
            lambda c, batch: A(c, batch) - batch * (c.seq_len - 1) * c.layers * 4 * 2 * c.mlp_ratio * c.hidden
        )
    with pytest.raises(CheckFailed):
        lab01.check_activation_bytes(lambda c, batch: A(c, batch) * c.seq_len // (c.seq_len - 1) * 105 // 100)


def test_fits_wrong_models(right):
    P, A = right["predict_param_bytes"], right["predict_activation_bytes"]
    wrong = {
        "always fits": lambda c, b, budget: True,
        "never fits": lambda c, b, budget: False,
        "16 bytes per parameter, activations ignored": lambda c, b, budget: 4 * P(c) <= budget,
        "activations only, optimizer step ignored": lambda c, b, budget: P(c) + A(c, b) <= budget,
    }
    for fn in wrong.values():  # the keys say what each wrong model gets wrong
        with pytest.raises(CheckFailed):
            lab01.check_fits(fn)
    with pytest.raises(CheckFailed, match="expected True or False"):
        lab01.check_fits(lambda c, b, budget: 1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None, "1 MiB"])
def test_non_numbers_fail_every_count_check(bad):
    with pytest.raises(CheckFailed, match="expected a number"):
        lab01.check_param_bytes(lambda c: bad)
    with pytest.raises(CheckFailed, match="expected a number"):
        lab01.check_activation_bytes(lambda c, batch: bad)


# -- learners who want the tick without the work (issue 14) -------------------------------
MEASURING = {  # each returns the measured value instead of predicting it
    "check_param_bytes": lambda c: lab01.measure_step(c, optimizer="sgd")["parameters"],
    "check_grad_bytes": lambda c, frozen_embedding=False: lab01.measure_step(
        c, optimizer="sgd", frozen_embedding=frozen_embedding
    )["gradients"],
    "check_optimizer_bytes": lambda c, optimizer: lab01.measure_step(c, optimizer=optimizer)["optimizer"],
    "check_activation_bytes": lambda c, batch: lab01.measure_step(c, batch=batch, optimizer="sgd")["saved"],
    "check_fits": lambda c, batch, budget_bytes: lab01._runs_within(c, batch, budget_bytes),
}


@pytest.mark.parametrize("check", list(MEASURING))
def test_a_prediction_that_measures_is_refused(check):
    with pytest.raises(CheckFailed, match="your prediction allocated tensors"):
        getattr(lab01, check)(MEASURING[check])


def _in_a_thread(fn):
    """Runs the measurement in another thread, where a thread-local budget does not look."""

    def prediction(*args, **kwargs):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(fn, *args, **kwargs).result()

    return prediction


@pytest.mark.parametrize("check", ["check_param_bytes", "check_fits"])
def test_a_prediction_that_measures_in_another_thread_is_refused(check):
    with pytest.raises(CheckFailed, match="or started a thread or process"):
        getattr(lab01, check)(_in_a_thread(MEASURING[check]))
    import threading

    assert threading.Thread.start.__name__ == "start"  # restored afterwards


def test_numpy_answers_count_and_fractional_bytes_are_shown(right):
    import numpy as np

    P, fits = right["predict_param_bytes"], right["predict_fits"]
    assert lab01.check_param_bytes(lambda c: np.int64(P(c))).passed
    assert lab01.check_fits(lambda c, b, budget: np.bool_(fits(c, b, budget))).passed
    with pytest.raises(CheckFailed, match=r"\.40 B\) .* off by 0\.4 B"):
        lab01.check_param_bytes(lambda c: P(c) + 0.4)
    with pytest.raises(CheckFailed, match="expected a number of bytes, got None"):
        lab01.check_param_bytes(lambda c: None)


def test_answers_that_are_subclasses_are_refused_before_their_code_runs(right):
    """Review (labs) A4, A5, A11: a float subclass whose __float__ measures (after the budget) or
    reads the check's expected value from its frame, and a bool tensor subclass whose item()
    runs the budget run, had passed. Answers are now matched by exact type, and a refused
    answer's own code (its __float__, item() or __repr__) never runs."""
    import sys

    import torch

    ran = []

    class Lazy(float):
        def __float__(self):
            ran.append("__float__")
            return float(right["predict_param_bytes"](self.cfg))

        def __repr__(self):
            ran.append("__repr__")
            return "0"

    def lazy(cfg):
        answer = Lazy(0.0)
        answer.cfg = cfg
        return answer

    class Peek(float):
        def __float__(self):
            frame = sys._getframe(1)
            while "want" not in frame.f_locals:
                frame = frame.f_back
            return float(frame.f_locals["want"])

    class Yes(torch.Tensor):
        def item(self):
            ran.append("item")
            return True

    with pytest.raises(CheckFailed, match="a Lazy \\(a subclass of float: answer with a plain float instead\\)"):
        lab01.check_param_bytes(lazy)
    with pytest.raises(CheckFailed, match="a Peek"):
        lab01.check_param_bytes(lambda c: Peek(0.0))
    yes = torch.tensor(True).as_subclass(Yes)  # made before the check: returning it allocates nothing
    with pytest.raises(CheckFailed, match="a Yes \\(a subclass of Tensor"):
        lab01.check_fits(lambda c, b, budget: yes)
    assert ran == []
    from vramlab.checks import plain

    assert plain(torch.tensor(3)) == 3 and type(plain(torch.tensor(2.5))) is float and plain(True) is True
    assert plain(torch.ones(2)) is None and plain(torch.tensor(1j)) is None and plain("3") is None
    assert plain(torch.ones(1, device="meta")) is None  # no value to read


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_solution_passes_whatever_the_seed(right, seed, monkeypatch):
    """Review (labs) A6: the judged configurations were public module constants (a table
    measured in an earlier cell passed). They are drawn per run now, and the learner's function
    gets a LabConfig without the library's `params` count (A0)."""
    monkeypatch.setenv("VRAMLAB_CHECK_SEED", str(seed))
    for check, fn in CHECKS:
        assert getattr(lab01, check)(right[fn]).passed
    configs = lab01.draw_configs(seed)
    assert sorted(c.layers for c in configs) == [1, 2, 3] and {c.mlp_ratio for c in configs} == {2, 4}
    assert lab01.draw_configs(seed) == configs != lab01.draw_configs(seed + 100)
    assert not hasattr(configs[0], "params")
    with pytest.raises(LearnerError, match="'LabConfig' object has no attribute 'params'"):
        lab01.check_param_bytes(lambda c: 4 * c.params)  # no tick from the library's own count
