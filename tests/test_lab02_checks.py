"""Lab 2's check: the shipped solution passes, the stub is 'not attempted', wrong fixes fail."""

import re
from pathlib import Path

import pytest
import torch.nn.functional as F

from notebook_code import defined_in
from vramlab.checks import CheckFailed, gradient_hint, lab02
from vramlab.labs import make_lab
from vramlab.notebooks import load

SOLUTION = Path(__file__).resolve().parent.parent / "solutions" / "lab02_debug_the_oom.ipynb"


def train_from(nb):
    return defined_in(nb, "def train(", "lab02", "import torch\nimport torch.nn.functional as F")["train"]


def make_loop(micro=4, divide=True, keep="float", use=1.0, step_every_chunk=False, step=True):
    def train(model, opt, batches):
        history = []
        for ids in batches:
            opt.zero_grad(set_to_none=True)
            ids = ids[: int(len(ids) * use)]
            total = 0.0
            for chunk in ids.chunk(micro):
                logits = model(chunk[:, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten()) / (micro if divide else 1)
                loss.backward()
                if step_every_chunk:
                    opt.step()
                if keep != "float":
                    history.append({"tensor": loss, "logits": logits}[keep])
                total += loss.item()
            if step and not step_every_chunk:
                opt.step()
            if keep == "float":
                history.append(total)
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


def test_zeroing_after_the_step_passes():
    """The gradients are judged at the judged run's own first opt.step() (review B4: the old
    single-batch probe could be recognised), so where the loop zeroes them no longer matters."""

    def zero_late(model, opt, batches):
        history = []
        for ids in batches:
            total = 0.0
            for chunk in ids.chunk(4):
                loss = model.loss(chunk) / 4
                loss.backward()
                total += loss.item()
            opt.step()
            opt.zero_grad(set_to_none=True)
            history.append(total)
        return history

    assert lab02.check_train(zero_late).passed


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


@pytest.mark.parametrize(
    "exploit, words",
    [
        (make_loop(step=False), "no optimizer step"),  # never steps: memory is even lower
        (make_loop(step_every_chunk=True), "80 optimizer steps"),  # steps after every micro-batch
    ],
)
def test_loops_that_do_not_train_fail(exploit, words):
    with pytest.raises(CheckFailed, match=words):
        lab02.check_train(exploit)


def _with_history(history_of):
    loop = make_loop()

    def train(model, opt, batches):
        real = loop(model, opt, batches)
        return history_of(real)

    return train


def test_a_made_up_falling_history_fails():
    with pytest.raises(CheckFailed, match="recomputed by the check"):
        lab02.check_train(_with_history(lambda real: [10.0 - i * 0.35 for i in range(len(real))]))


@pytest.fixture(scope="module")
def correct_run():
    return lab02._sandbox_run((make_loop(),))  # what the judge gets from the sandbox, run here


def _judged(run, history):
    """The sandbox's data of ``run`` with another history, converted as the sandbox converts it."""
    from vramlab.checks import plain

    kept = list(history) if type(history) in (list, tuple) else None
    plain_history = None if kept is None else [plain(h) for h in kept]
    return {**run, "history": plain_history, "history_described": lab02._describe(history)}


@pytest.mark.parametrize(
    "history_of, words",
    [
        (lambda real: [float("nan")] * len(real), "list of 20 Python numbers"),
        (lambda real: real[:5], "list of 20 Python numbers"),
        (lambda real: None, "got NoneType"),
        (lambda real: [x / 4 for x in real], "recomputed by the check"),  # one micro-batch's share
    ],
)
def test_histories_that_are_not_the_losses_fail(correct_run, history_of, words):
    assert lab02._training_problem(correct_run) == ""
    run = _judged(correct_run, history_of(correct_run["history"]))
    assert re.search(words, lab02._training_problem(run))


@pytest.mark.parametrize("kind", ["numpy", "tensor"])
def test_a_history_of_numpy_or_tensor_numbers_passes(correct_run, kind):
    import numpy as np
    import torch

    convert = np.float32 if kind == "numpy" else torch.tensor
    run = _judged(correct_run, [convert(x) for x in correct_run["history"]])
    assert lab02._training_problem(run) == ""


def test_faking_the_step_counter_does_not_pass():
    def fake_steps(model, opt, batches):
        history = make_loop(step=False)(model, opt, batches)
        import torch

        for p in model.parameters():
            opt.state[p]["step"] = torch.tensor(20.0)
        return history

    with pytest.raises(CheckFailed, match="no optimizer step"):  # the check counts steps with a hook, not the state
        lab02.check_train(fake_steps)


def test_training_on_the_wrong_batches_does_not_pass():
    """Right first step, right number of steps, but every step trains on the first batch again."""

    def first_batch_only(model, opt, batches):
        loop, first = make_loop(), []

        def replay():
            for ids in batches:
                first[:1] = first[:1] or [ids]
                yield first[0]

        return loop(model, opt, replay())

    with pytest.raises(CheckFailed, match="away from a correct loop"):
        lab02.check_train(first_batch_only)


def test_survivors_measure_the_leak():
    rows = lab02.survivors(lab02.train_original, iterations=4)
    op, phase, nbytes, count = rows[0]
    cfg = lab02.CONFIG
    assert (nbytes, count, phase) == (lab02.BATCH * (cfg.seq_len - 1) * cfg.vocab_size * 4, 4, "forward")
    assert lab02.survivors(make_loop(), iterations=4) == []


def test_a_leak_is_seen_however_the_loop_walks_the_batches():
    """Review (labs) B5b: `batches = list(batches)` first had blinded the leak check (memory was
    read when the loop asked for the next batch); it is now read after each optimizer step."""
    leaky = make_loop(keep="tensor")

    def listed_first(model, opt, batches):
        return leaky(model, opt, list(batches))

    with pytest.raises(CheckFailed, match="leaks per iteration"):
        lab02.check_train(listed_first)


def test_an_honest_loop_that_indexes_the_batches_passes():
    """Review (labs), confusing messages 3: `batches[i]` crashed with '_Recorder' object is not subscriptable."""
    loop = make_loop()

    def indexed(model, opt, batches):
        return loop(model, opt, [batches[i] for i in range(len(batches))])

    assert lab02.check_train(indexed).passed


def test_a_precision_error_is_named_as_precision_and_the_check_runs_on_one_thread(capsys):
    """Review (labs), confusing messages 1: a bf16-autocast loop (B7) was told to divide
    micro-batch losses. And the check runs on one torch thread, restored afterwards (under load
    two threads per process made the lab checks ten times slower)."""
    import torch

    inner = make_loop()  # micro-batched and divided, as it should be: only the precision is wrong

    def autocast_micro_batches(model, opt, batches):
        print(f"torch threads: {torch.get_num_threads()}")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return inner(model, opt, batches)

    before = torch.get_num_threads()
    with pytest.raises(CheckFailed) as failed:
        lab02.check_train(make_loop(divide=False))
    assert "divided by k" in str(failed.value) and "precision" not in str(failed.value)
    result = gradient_hint(0.0078, lab02.GRAD_RTOL, lab02.BATCH)
    assert "precision" in result and "0.0001" in result
    with pytest.raises(CheckFailed, match="usually comes from precision"):
        lab02.check_train(autocast_micro_batches)
    assert "torch threads: 1\n" in capsys.readouterr().out  # printed by the learner's code in the sandbox
    assert torch.get_num_threads() == before
