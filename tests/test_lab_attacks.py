"""The lab red team's attacks (``../shared/reviews/2026-12-07-labs.md``), each a test that its check
rejects it: what a learner who wants the tick without the work would write, after the review.

Every check runs the learner's code in a sandbox process, judges in a judge process and draws its
configurations per run (:mod:`vramlab.checks.isolation`), so these attacks fail in one of four
ways: the sandbox reports tampering (the measuring was switched off), the answer is refused as not
a plain number, the learner's code cannot find in the sandbox what it used in the notebook (a
frame, a thread, a pool, a patched module), or what was hidden is measured after all."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lab05_learners
from vramlab import quantize as Q
from vramlab.checks import CheckFailed, lab01, lab02, lab03, lab04, lab05
from vramlab.checks.isolation import LearnerError
from vramlab.gpt import TinyGPT
from vramlab.tracker import on_host

TAMPERING = "switched off while your code ran"


@pytest.fixture(autouse=True)
def fixed_seed(monkeypatch):
    monkeypatch.setenv("VRAMLAB_CHECK_SEED", "0")


# -- Lab 1 ----------------------------------------------------------------------------------


def measured_activations(cfg, batch):
    return lab01.measure_step(cfg, batch=batch, optimizer="sgd")["saved"]


def test_a1_disable_current_modes_is_tampering():
    from torch.utils._python_dispatch import _disable_current_modes

    def predict_activation_bytes(cfg, batch):
        with _disable_current_modes():
            return measured_activations(cfg, batch)

    with pytest.raises(CheckFailed, match=TAMPERING + r".*dispatch mode"):
        lab01.check_activation_bytes(predict_activation_bytes)


def test_a2_on_host_is_tampering():
    def predict_param_bytes(cfg):
        with on_host():
            return 4 * sum(p.numel() for p in TinyGPT(lab01._model_config(cfg)).parameters())

    with pytest.raises(CheckFailed, match=TAMPERING + r".*on_host"):
        lab01.check_param_bytes(predict_param_bytes)


def test_a3_a_worker_thread_or_pool_of_the_notebook_cannot_be_used():
    import multiprocessing
    import queue
    import threading

    jobs, answers = queue.Queue(), queue.Queue()
    threading.Thread(target=lambda: [answers.put(f(*a)) for f, a in iter(jobs.get, None)], daemon=True).start()

    def predict_fits(cfg, batch, budget_bytes):
        jobs.put((lab01._runs_within, (cfg, batch, budget_bytes)))
        return answers.get()

    with pytest.raises(CheckFailed, match="could not send it there"):
        lab01.check_fits(predict_fits)
    jobs.put(None)
    with multiprocessing.get_context("spawn").Pool(1) as pool:

        def predict_pooled(cfg, batch, budget_bytes):
            return pool.apply(lab01._runs_within, (cfg, batch, budget_bytes))

        with pytest.raises(CheckFailed, match="could not send it there"):
            lab01.check_fits(predict_pooled)


class Lazy(float):
    """A4: a float whose conversion measures."""

    def __new__(cls, thunk):
        self = super().__new__(cls, 0.0)
        self.thunk = thunk
        return self

    def __float__(self):
        return float(self.thunk())


class Peek(float):
    """A5: a float whose conversion reads the check's expected value from its frame."""

    def __float__(self):
        f = sys._getframe(1)
        while "want" not in f.f_locals:
            f = f.f_back
        return float(f.f_locals["want"])


@pytest.mark.parametrize(
    "answer", [lambda c, batch: Lazy(lambda: measured_activations(c, batch)), lambda c, batch: Peek(0)]
)
def test_a4_a5_float_subclasses_are_refused_unconverted(answer):
    with pytest.raises(CheckFailed, match="a subclass of float: answer with a plain float"):
        lab01.check_activation_bytes(answer)


def test_a6_a_table_measured_for_one_seed_fails_on_the_next_run(monkeypatch):
    table = {(c, b): measured_activations(c, b) for c in lab01.draw_configs(0) for b in (1, 3)}
    assert lab01.check_activation_bytes(lambda c, batch: table[(c, batch)]).passed  # the pinned seed: a test only
    monkeypatch.delenv("VRAMLAB_CHECK_SEED")
    with pytest.raises(LearnerError, match="KeyError"):  # a run as a learner gets it: configurations drawn afresh
        lab01.check_activation_bytes(lambda c, batch: table[(c, batch)])


def test_a8_counting_a_model_built_on_the_meta_device_is_measuring():
    def predict_param_bytes(cfg):
        with torch.device("meta"):
            return 4 * sum(p.numel() for p in TinyGPT(lab01._model_config(cfg)).parameters())

    with pytest.raises(CheckFailed, match="your prediction allocated tensors"):
        lab01.check_param_bytes(predict_param_bytes)


def test_a9_patching_the_check_in_the_notebook_changes_nothing(monkeypatch):
    monkeypatch.setattr(lab01, "judge_bytes", lambda *args, **kwargs: None)
    monkeypatch.setattr(lab01, "measure_step", lambda *args, **kwargs: {"parameters": 7})
    with pytest.raises(CheckFailed, match="off by"):
        lab01.check_param_bytes(lambda cfg: 7)


def test_a10_the_judge_frames_are_not_in_the_sandbox():
    def predict_fits(cfg, batch, budget_bytes):
        f = sys._getframe(1)
        while "factor" not in f.f_locals:
            f = f.f_back
        return f.f_locals["factor"] > 1

    with pytest.raises(LearnerError, match="AttributeError: 'NoneType' object has no attribute 'f_locals'"):
        lab01.check_fits(predict_fits)


def test_a13_a14_threads_and_processes_are_tampering():
    import _thread

    def in_a_thread(cfg, batch):
        box, done = [], _thread.allocate_lock()
        done.acquire()

        def work():
            box.append(measured_activations(cfg, batch))
            done.release()

        _thread.start_new_thread(work, ())
        done.acquire()
        return box[0]

    with pytest.raises(CheckFailed, match=TAMPERING + r".*started a thread"):
        lab01.check_activation_bytes(in_a_thread)

    def forked(cfg):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        return 0

    with pytest.raises(CheckFailed, match=TAMPERING + r".*started a process"):
        lab01.check_param_bytes(forked)


def test_a15_the_diagnosis_runs_under_the_budget_too():
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    cache = {}

    def predict_activation_bytes(cfg, batch):
        if (cfg, batch) not in cache and not _get_current_dispatch_mode_stack():  # never true in the sandbox
            cache[(cfg, batch)] = measured_activations(cfg, batch)
        return cache.get((cfg, batch), 0)

    for _ in range(3):
        with pytest.raises(CheckFailed, match="off by"):
            lab01.check_activation_bytes(predict_activation_bytes)


# -- Lab 2 ----------------------------------------------------------------------------------


def unfixed(model, opt, batches):
    history = []
    for ids in batches:
        opt.zero_grad(set_to_none=True)
        loss = model.loss(ids)
        loss.backward()
        opt.step()
        history.append(loss.item())
    return history


def test_b1_b2_the_unfixed_loop_with_the_measuring_switched_off_fails():
    from torch.utils._python_dispatch import _disable_current_modes

    for switch in (on_host, _disable_current_modes):

        def train(model, opt, batches, switch=switch):
            with switch():
                return unfixed(model, opt, batches)

        with pytest.raises(CheckFailed, match=TAMPERING):
            lab02.check_train(train)


def test_b4_copying_the_reference_weights_fails():
    def train(model, opt, batches):
        losses, _, final = lab02._reference()
        for _ in batches:
            opt.zero_grad(set_to_none=True)
            opt.step()
        with torch.no_grad():
            for p, w in zip(model.parameters(), final):
                p.copy_(w)
        return list(losses)

    with pytest.raises(CheckFailed, match="out of memory|no gradient"):
        lab02.check_train(train)


def test_b5b_a_leak_behind_list_batches_is_seen():
    def train(model, opt, batches):
        batches = list(batches)
        history, kept = [], []
        for ids in batches:
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for chunk in ids.chunk(4):
                logits = model(chunk[:, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten()) / 4
                loss.backward()
                total += loss.item()
                kept.append(logits[:, -1].detach().clone())  # 64 KiB per iteration
            opt.step()
            history.append(total)
        return history

    with pytest.raises(CheckFailed, match="leaks per iteration"):
        lab02.check_train(train)


def test_b9_patching_the_limit_in_the_notebook_changes_nothing(monkeypatch):
    monkeypatch.setattr(lab02, "LIMIT", 1 << 40)
    with pytest.raises(CheckFailed, match="out of memory"):
        lab02.check_train(unfixed)


# -- Lab 3 ----------------------------------------------------------------------------------


def test_c1_c4_on_host_steps_are_tampering():
    def onhost_step(m, o, ids):
        with on_host():
            return lab03.naive_step(m, o, ids)

    with pytest.raises(CheckFailed, match=TAMPERING):
        lab03.check_fit(lab03.naive_configure, onhost_step)
    with pytest.raises(CheckFailed, match=TAMPERING):
        lab03.check_scaling(lab03.naive_configure, onhost_step)

    def checkpointed(model):
        model.set_checkpointing(every=1)
        return torch.optim.AdamW(model.parameters(), lr=3e-3, foreach=True)

    def offloaded_step(model, opt, ids):
        opt.zero_grad(set_to_none=True)
        loss = model.loss(ids)
        loss.backward()
        with on_host():
            opt.step()
        return loss.item()

    with pytest.raises(CheckFailed, match=TAMPERING):
        lab03.check_fit(checkpointed, offloaded_step)


def test_c5_activations_packed_into_bytes_are_tampering():
    def pack(t):
        if t.requires_grad and t.is_leaf:
            return ("keep", t)
        d = t.detach()
        return ("raw", d.dtype, d.shape, d.contiguous().numpy().tobytes())

    def unpack(p):
        return p[1] if p[0] == "keep" else torch.frombuffer(bytearray(p[3]), dtype=p[1]).view(p[2])

    def step(model, opt, ids):
        opt.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            loss = model.loss(ids)
        loss.backward()
        opt.step()
        return loss.item()

    with pytest.raises(CheckFailed, match=TAMPERING + r".*Python bytes"):
        lab03.check_fit(lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3, fused=True), step)


def quarter_batch_unless_probed(model, opt, ids):
    opt.zero_grad(set_to_none=True)
    loss = model.loss(ids if isinstance(opt, torch.optim.SGD) else ids[:4])
    loss.backward()
    opt.step()
    return loss.item()


def test_c6_a_step_that_recognises_a_probe_has_none_to_recognise():
    def checkpointed(model):
        model.set_checkpointing(every=1)
        return torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)

    with pytest.raises(CheckFailed, match="differ from the full-batch gradients"):
        lab03.check_fit(checkpointed, quarter_batch_unless_probed)


def test_c8_patching_the_limit_in_the_notebook_changes_nothing(monkeypatch):
    monkeypatch.setattr(lab03, "LIMIT", 1 << 40)
    with pytest.raises(CheckFailed, match="out of memory"):
        lab03.check_fit(lab03.naive_configure, lab03.naive_step)


def test_c9_scaling_counts_only_depths_that_train_on_the_whole_batch():
    with pytest.raises(CheckFailed, match="blocks, your first step's gradients differ"):
        lab03.check_scaling(lab03.naive_configure, lambda m, o, ids: lab03.naive_step(m, o, ids[:1]))


# -- Lab 4 ----------------------------------------------------------------------------------


def test_d1_int8_predictions_that_measure_are_refused():
    from torch.utils._python_dispatch import _disable_current_modes

    def with_modes_off(model):
        with _disable_current_modes():
            return lab04.measured_int8_bytes(model)

    with pytest.raises(CheckFailed, match=TAMPERING):
        lab04.check_int8_prediction(with_modes_off)

    def on_the_host(model):
        with on_host():
            return lab04.measured_int8_bytes(model)

    with pytest.raises(CheckFailed, match=TAMPERING):
        lab04.check_int8_prediction(on_the_host)
    with pytest.raises(CheckFailed, match="subclass of float"):
        lab04.check_int8_prediction(lambda model: Peek(0))


class Vault(nn.Module):
    """D3: the fp32 weights kept outside tensors, the encoder rebuilt in every forward."""

    def __init__(self, enc, keep):
        super().__init__()
        import io

        buffer = io.BytesIO()
        torch.save(enc.state_dict(), buffer)
        self.config, self.keep = enc.config, keep
        self.raw = keep(buffer.getvalue())

    def forward(self, **batch):
        import io

        from transformers import BertModel

        enc = BertModel(self.config).eval()
        enc.load_state_dict(torch.load(io.BytesIO(bytes(self.raw)), weights_only=True))
        return enc(**batch)


def _array(raw):
    import array

    return array.array("B", raw)


def _numpy_view(raw):
    import numpy as np

    return memoryview(np.frombuffer(raw, dtype=np.uint8).copy())


@pytest.mark.parametrize(
    "keep", [bytes, bytearray, _array, _numpy_view], ids=["bytes", "bytearray", "array", "memoryview"]
)
def test_d3_weights_kept_in_python_buffers_are_counted(keep):
    from vramlab.reach import reachable

    vault = Vault(lab04.fresh_model(), keep)
    assert reachable(vault).nbytes >= len(bytes(vault.raw)) > 86 * 2**20  # held: counted by the walk
    with pytest.raises(CheckFailed, match="forward pass reads 86"):  # rebuilt: read from outside the model
        lab04.check_size(lambda model: Vault(model, keep))


class FileVault(nn.Module):
    """D3: the weights in a file (or an mmap of it) that every forward loads."""

    def __init__(self, enc, path, mapped):
        super().__init__()
        torch.save(enc.state_dict(), path)
        self.config, self.path, self.mapped = enc.config, path, mapped

    def forward(self, **batch):
        from transformers import BertModel

        enc = BertModel(self.config).eval()
        enc.load_state_dict(torch.load(self.path, weights_only=True, mmap=self.mapped))
        return enc(**batch)


@pytest.mark.parametrize("mapped", [False, True], ids=["file", "mmap"])
def test_d3_weights_read_from_a_file_in_forward_are_tampering(tmp_path, mapped):
    path = str(tmp_path / "weights.pt")
    with pytest.raises(CheckFailed, match=TAMPERING + r".*read a file"):
        lab04.check_size(lambda model: FileVault(model, path, mapped))


VAULT = {}


class GlobalVault(nn.Module):
    """D3: the weights as bytes in a module-level global, rebuilt in every forward."""

    def __init__(self, enc):
        super().__init__()
        import io

        buffer = io.BytesIO()
        torch.save(enc.state_dict(), buffer)
        VAULT["raw"], self.config = buffer.getvalue(), enc.config

    def forward(self, **batch):
        import io

        from transformers import BertModel

        enc = BertModel(self.config).eval()
        enc.load_state_dict(torch.load(io.BytesIO(VAULT["raw"]), weights_only=True))
        return enc(**batch)


def test_d3_weights_rebuilt_from_a_global_are_read_from_outside():
    with pytest.raises(CheckFailed, match="forward pass reads 86"):
        lab04.check_size(GlobalVault)


def test_d9_the_reference_is_out_of_reach():
    def zero(m):
        for lin in (x for x in m.modules() if type(x) is nn.Linear):
            nn.init.zeros_(lin.weight)
        return m

    def shrink(model):
        zero(lab04._loaded().model)  # the sandbox's copy: the judge computes the reference from its own
        return Q.torchao_int8(Q.bnb_linears(zero(model), 4), filter_fn=Q.linears_and_embeddings)

    with pytest.raises(CheckFailed, match="mean cosine 0\\.[0-7]"):
        lab04.check_quality(shrink)


def test_d10_patching_the_target_in_the_notebook_changes_nothing(monkeypatch):
    monkeypatch.setattr(lab04, "TARGET_BYTES", 1 << 40)
    with pytest.raises(CheckFailed, match="measured 86"):
        lab04.check_size(lambda model: model)


# -- Lab 5 ----------------------------------------------------------------------------------


def sharded_state(params, world):
    return 16 * params // world


@pytest.mark.parametrize("shard", [lab05_learners.ddp_on_host, lab05_learners.ddp_modes_swapped])
def test_e1_e2_switching_the_rank_budget_off_is_tampering(shard):
    with pytest.raises(CheckFailed, match="rank 0: the check's measurement was switched off"):
        lab05.check_sharding(shard, lambda params, world: 16 * params)


def test_e3_e4b_a_peeking_prediction_and_a_patched_check_fail(monkeypatch):
    with pytest.raises(CheckFailed, match="subclass of float"):
        lab05.check_sharding(lab05_learners.fsdp, lambda params, world: Peek(0))
    monkeypatch.setattr(lab05, "BUDGET", 1 << 40)
    monkeypatch.setattr(lab05, "run", lambda *args, **kwargs: [])
    with pytest.raises(CheckFailed, match="out of memory|peaked at"):
        lab05.check_sharding(lab05_learners.ddp, lambda params, world: 16 * params)
