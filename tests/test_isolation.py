"""How a lab check runs the learner's code (vramlab.checks.isolation, vramlab.checks.strict), and
what the walk and the read recorder count that a learner could hide weights in (vramlab.reach)."""

import array
import io
import mmap
import threading
import time

import numpy as np
import pytest
import torch

from vramlab.checks import CheckFailed, isolation, lab01, strict
from vramlab.checks.isolation import LearnerError
from vramlab.reach import BIG_STRING, reachable, read_by


@pytest.fixture(autouse=True)
def fixed_seed(monkeypatch):
    monkeypatch.setenv("VRAMLAB_CHECK_SEED", "0")


def param_bytes(cfg):
    h, v, s, r = cfg.hidden, cfg.vocab_size, cfg.seq_len, cfg.mlp_ratio
    block = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + 2 * r * h * h + r * h + h
    return 4 * (v * h + s * h + cfg.layers * block + 2 * h)


@pytest.mark.parametrize("forks", [True, False], ids=["zygote", "fresh interpreters"])
def test_a_check_runs_the_same_way_forked_or_in_fresh_interpreters(monkeypatch, forks, capsys):
    """Linux forks judges from a zygote; elsewhere each check starts fresh interpreters."""
    monkeypatch.setattr(isolation, "_forks", lambda: forks)

    def loud(cfg):
        print("predicting", cfg.layers)
        return param_bytes(cfg)

    assert lab01.check_param_bytes(loud).passed
    out = capsys.readouterr().out
    assert out.count("predicting") >= 3 and "✅ parameter bytes: passed" in out  # the learner's prints come back

    def stub(cfg):
        raise NotImplementedError

    assert lab01.check_param_bytes(stub).status == "not attempted yet"


def test_the_learners_exception_comes_back_with_its_traceback():
    def broken(cfg):
        widths = {}
        return widths[cfg.hidden]  # the line the traceback shows

    with pytest.raises(LearnerError, match=r"(?s)in broken\n.*KeyError"):
        lab01.check_param_bytes(broken)


def test_what_cannot_be_sent_gets_a_hint():
    lock = threading.Lock()

    def locked(cfg):
        with lock:
            return param_bytes(cfg)

    with pytest.raises(CheckFailed, match="could not send it there .*not a running thread, pool, open file or lock"):
        lab01.check_param_bytes(locked)


def test_a_sandbox_that_exits_is_a_failed_check():
    import os

    def leaves(cfg):
        os._exit(3)

    with pytest.raises(CheckFailed, match=r"ended \(exit code 3\) before your function returned"):
        lab01.check_param_bytes(leaves)


def test_the_watch_sees_cpu_time_of_other_threads():
    """The operating system's view: a thread the learner's code started (by any means) used CPU."""
    if not hasattr(__import__("resource"), "RUSAGE_THREAD"):
        pytest.skip("RUSAGE_THREAD is Linux only")

    def busy():
        end = time.process_time() + 0.3
        while time.process_time() < end:
            sum(range(1000))

    with strict.Watch():
        worker = threading.Thread(target=busy)
        worker.start()
        worker.join()
    assert any("another thread" in note for note in strict.NOTES)
    with strict.Watch():
        busy()
    assert strict.NOTES == []


def test_files_opened_in_a_judged_forward_are_noted(tmp_path):
    import linecache

    path = tmp_path / "w.bin"
    path.write_bytes(b"\0" * 16)
    strict.NOTES.clear()
    with strict.no_files():
        linecache.checkcache()
        linecache.getline(__file__, 1)  # Python's own source lookups are allowed
    assert strict.NOTES == []
    with strict.no_files():
        torch.load(io.BytesIO(_saved()), weights_only=True)  # bytes in memory: not a file
        assert strict.NOTES == []
        with open(path, "rb") as f:
            f.read()
    assert strict.NOTES and "read a file" in strict.NOTES[0]
    import builtins

    assert builtins.open is io.open  # restored
    strict.NOTES.clear()


def _saved() -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(4, 4)}, buffer)
    return buffer.getvalue()


def test_python_bytes_in_a_pack_hooks_result_are_counted():
    assert strict._python_bytes(("raw", torch.float32, (4,), b"\0" * 4096)) == 4096
    assert strict._python_bytes(np.zeros(10, dtype=np.float32)) == 40
    assert strict._python_bytes(torch.ones(1000)) == 0  # a tensor is what the budget counts


def test_reach_counts_python_buffers_held_by_an_object():
    raw = b"\1" * 10_000
    holder = torch.nn.Module()
    holder.a, holder.b, holder.c = raw, bytearray(5_000), array.array("f", [0.0] * 1_000)
    holder.d = memoryview(np.zeros(2_000, dtype=np.uint8))  # counted as the array it views
    holder.e = memoryview(raw)  # the same bytes as .a: counted once
    with mmap.mmap(-1, 8192) as mapped:
        holder.f = mapped
        holder.g = "x" * BIG_STRING
        holder.name = "a short string"  # names are not memory the model holds
        held = reachable(holder)
        assert held.nbytes == 10_000 + 5_000 + 4_000 + 2_000 + 8192 + __import__("sys").getsizeof(holder.g)


def test_read_by_counts_storages_deserialised_from_bytes():
    raw = _saved()
    reads = read_by(lambda: torch.load(io.BytesIO(raw), weights_only=True)["w"].sum())
    assert reads.nbytes == 64  # the 4x4 fp32 tensor torch.load rebuilt with set_: no op made it

    def from_buffer():
        return torch.frombuffer(bytearray(raw[:64]), dtype=torch.float32).sum()

    assert read_by(from_buffer).nbytes == 64
