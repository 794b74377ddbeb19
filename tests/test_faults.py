"""The fault suite (issue 24): each case of the reliability report
(shared/reviews/2026-12-07-fuzz.md) that gave a wrong number, a traceback or a leak, as a test.
IDs are the report's (H = silent wrong number, M = traceback or leak, L = minor)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch

import vramlab
from vramlab import budget, measure
from vramlab.cli import main as cli
from vramlab.units import format_bytes, parse_bytes

ROOT = Path(__file__).resolve().parents[1]
GEMMA = {
    "model_type": "gemma",
    "vocab_size": 128,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "max_position_embeddings": 256,
}
GPT2 = {"model_type": "gpt2", "vocab_size": 128, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 1024}


def config_file(tmp_path: Path, data: dict, name: str = "config.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def one_line_error(capsys, *argv: str) -> str:
    """Run the CLI in this process; it must fail with exit 2 and one line on stderr."""
    assert cli(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vramlab: error: "), err
    return err


# ---- high: silent wrong numbers -----------------------------------------------------------


def test_h1_another_threads_optimizer_step_is_not_this_blocks():
    keep = []

    def other():
        model = torch.nn.Linear(512, 512)
        opt = torch.optim.Adam(model.parameters())
        model(torch.randn(4, 512)).sum().backward()
        opt.step()
        keep.append((model, opt))

    with measure() as m:
        t = threading.Thread(target=other)
        t.start()
        t.join()
        torch.zeros(1)
    assert m.peak_bytes == 4
    with budget("64 KiB"):
        t = threading.Thread(target=other)
        t.start()
        t.join()
        torch.zeros(10)  # 40 bytes: refused before the fix


@pytest.mark.parametrize("how", ["resize_", "out="])
def test_h2_growth_in_place_is_refused_by_a_budget(how):
    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate"), budget("1 MiB"):
        if how == "resize_":
            torch.empty(0).resize_(10 * 2**20)
        else:
            a = torch.empty(10)
            torch.add(torch.ones(10**6), 1, out=a)  # `a` grows to 4 MB


def test_h3_from_numpy_inside_a_block_is_not_an_allocation():
    arr = np.zeros((1024, 1024), dtype=np.float32)
    with measure() as m:
        x = torch.from_numpy(arr)[:2, :2] + 1
    assert m.peak_bytes == 16
    with budget("1 KiB"):
        x = torch.as_tensor(arr)[:2, :2] + 1
    with measure() as m:
        y = torch.tensor([1.0, 2.0])  # made from Python numbers: a real allocation
    assert m.end_bytes == 8
    del x, y


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--batch", "1099511627776", "--seq", "4096"], "2**63"),
        (["--attention", "eager"], "drop --attention"),
        (["--keep-outputs"], "drop --attention, --keep-outputs"),
    ],
)
def test_h4_qlora_guards_overflow_and_refuses_flags_it_ignores(capsys, argv, says):
    assert says in one_line_error(capsys, "estimate", "llama-2-7b", "--qlora", "16", "--checkpointing", *argv)


def test_h4_qlora_rank_and_text(capsys):
    assert "not low-rank" in one_line_error(capsys, "estimate", "llama-2-7b", "--qlora", "100000000", "--checkpointing")
    assert cli(["estimate", "llama-2-7b", "--qlora", "16", "--checkpointing"]) == 0
    assert "adamw is foreach" not in capsys.readouterr().out


def test_h5_the_static_calculator_sizes_its_own_config_not_a_registry_name(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from vramlab.widgets import calculate, static_html

    est = calculate(config_path=config_file(tmp_path, {**GPT2, "_name_or_path": "gpt2"}), seq=512)
    assert f"<tr><th>batch 1</th><td>{format_bytes(est.peak_bytes)}<br>" in static_html(est)
    other = calculate(config_path=config_file(tmp_path, {**GPT2, "_name_or_path": "my-tiny"}, "b.json"), seq=512)
    assert format_bytes(other.peak_bytes) in static_html(other)  # no KeyError


def test_h6_a_dry_run_leaves_other_threads_default_dtype_alone():
    seen, stop = set(), threading.Event()

    def watch():
        while not stop.is_set():
            seen.add(torch.zeros(1).dtype)

    t = threading.Thread(target=watch)
    t.start()
    try:
        vramlab.dryrun("llama-2-7b", seq=16, recipe="bf16")
    finally:
        stop.set()
        t.join()
    assert seen == {torch.float32} and torch.get_default_dtype() == torch.float32


# ---- medium: tracebacks and leaks ----------------------------------------------------------


@pytest.mark.parametrize("field, value", [("tie_word_embeddings", "false"), ("hidden_size", "64")])
def test_m1_string_values_in_other_model_types_end_in_one_line(capsys, tmp_path, field, value):
    path = config_file(tmp_path, {**GEMMA, field: value})
    assert "could not read this config.json" in one_line_error(capsys, "dryrun", "--config", path, "--seq", "32")


@pytest.mark.parametrize("command", ["estimate", "dryrun", "fit"])
def test_m2_deeply_nested_json_ends_in_one_line(capsys, tmp_path, command):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100000 + "]" * 100000)
    extra = ["--gpu", "24GiB"] if command == "fit" else []
    assert "nested too deeply" in one_line_error(capsys, command, "--config", str(path), *extra)


def test_m2_the_calculator_says_so_too(tmp_path):
    from vramlab.widgets import calculate

    path = tmp_path / "deep.json"
    path.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match="nested too deeply"):
        calculate(config_path=str(path))


@pytest.mark.parametrize("size", ["1e400 GiB", 10**400, "1e400GB", 2**63])
def test_m3_huge_sizes_are_refused_not_overflowed(capsys, size):
    with pytest.raises(ValueError, match="2\\*\\*63 bytes"):
        parse_bytes(size)
    with pytest.raises(ValueError, match="2\\*\\*63 bytes"):
        budget(size)
    assert "2**63" in one_line_error(capsys, "fit", "llama-2-7b", "--gpu", str(size))


def test_m3_formatting_huge_and_non_finite_numbers():
    assert format_bytes(2**1100).endswith(" TiB")
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="finite"):
            format_bytes(bad)


def _vramlab(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("vramlab")
    return subprocess.run([str(exe), *argv], capture_output=True, text=True, **kwargs)


def test_m4_models_into_a_closed_pipe_and_a_full_disk():
    done = subprocess.run(
        f"{Path(sys.executable).with_name('vramlab')} models | head -c 10", shell=True, capture_output=True, text=True
    )
    assert done.stderr == "" and len(done.stdout) == 10
    with open("/dev/full", "w") as full:
        for argv in (["models"], ["estimate", "gpt2", "--json"], ["fit", "gpt2", "--gpu", "24GiB"]):
            done = subprocess.run(
                [str(Path(sys.executable).with_name("vramlab")), *argv], stdout=full, stderr=subprocess.PIPE, text=True
            )
            assert (
                done.returncode == 2
                and done.stderr == "vramlab: error: cannot write the output: No space left on device\n"
            )


@pytest.mark.parametrize("delay", [0.1, 0.3, 0.5, 0.8])
def test_m5_ctrl_c_during_start_up_is_one_line(delay):
    exe = str(Path(sys.executable).with_name("vramlab"))
    process = subprocess.Popen([exe, "dryrun", "gpt2", "--seq", "64"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert (process.returncode, err) == (130, b"vramlab: interrupted\n")


def test_m6_an_overflowing_dry_run_prints_only_its_own_line():
    done = _vramlab("dryrun", "gpt2", "--batch", "1099511627776")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "2**63" in done.stderr


def test_m7_a_model_without_a_kv_cache_is_refused_for_inference(capsys, tmp_path):
    path = config_file(
        tmp_path, {"model_type": "mamba", "vocab_size": 128, "hidden_size": 64, "state_size": 8, "num_hidden_layers": 2}
    )
    assert "returns no KV cache" in one_line_error(capsys, "dryrun", "--config", path, "--seq", "32", "--inference")


def test_m9_a_dry_run_leaves_the_environment_as_it_was():
    code = (
        "import os, vramlab; before = dict(os.environ); vramlab.dryrun('gpt2', seq=16); "
        "import huggingface_hub.constants as c; "
        "print(dict(os.environ) == before, c.HF_HUB_OFFLINE)"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.stdout.split() == ["True", "False"], done.stderr[-500:]


def test_m10_predict_refuses_threads_started_from_its_own_thread_only():
    from vramlab.checks import Measured, predict

    started, stop = [], threading.Event()

    def spawner():
        while not stop.is_set():
            t = threading.Thread(target=lambda: None)
            t.start()
            t.join()
            started.append(1)

    t = threading.Thread(target=spawner)
    t.start()
    try:
        assert predict(lambda: 42) == (True, 42)

        def cheats():
            threading.Thread(target=lambda: None).start()

        with pytest.raises(Measured):
            predict(cheats)
    finally:
        stop.set()
        t.join()
    assert started  # the other thread kept starting its threads


@pytest.mark.parametrize(
    "data, says",
    [
        ({**GEMMA, "num_hidden_layers": -3}, "num_hidden_layers must be 1 or more"),
        ({**GEMMA, "num_hidden_layers": 0}, "num_hidden_layers must be 1 or more"),
        (
            {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
            | {"intermediate_size": 128, "vocab_size": 100},
            "is an encoder",
        ),
        ({**GEMMA, "rope_scaling": {"type": "bogus", "factor": -1}}, "rope_scaling type 'bogus'"),
        ({**GPT2, "rope_scaling": {"type": "linear", "factor": -1}}, "factor must be a positive number"),
    ],
)
def test_m11_invalid_configs_are_refused_on_the_dry_run_path_too(capsys, tmp_path, data, says):
    path = config_file(tmp_path, data)
    assert says in one_line_error(capsys, "dryrun", "--config", path, "--seq", "32")


# ---- low -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["1.5", "0.5", "1.5 B"])
def test_l1_a_fraction_of_a_byte_is_refused(capsys, size):
    with pytest.raises(ValueError, match="not a whole number of bytes"):
        parse_bytes(size)
    assert "whole number of bytes" in one_line_error(capsys, "fit", "gpt2", "--gpu", size)


def test_l3_inference_refuses_training_only_flags(capsys):
    assert "no backward" in one_line_error(capsys, "estimate", "gpt2", "--inference", "--checkpointing")
    assert "no optimizer" in one_line_error(capsys, "estimate", "gpt2", "--inference", "--optimizer", "sgd")
    with pytest.raises(ValueError, match="no backward"):
        vramlab.Setup(checkpointing=True, inference=True)


def test_l4_a_configs_name_cannot_inject_terminal_escapes(capsys, tmp_path):
    path = config_file(tmp_path, {**GPT2, "_name_or_path": "\x1b[31mRED\x1b[0m\nsecond line"})
    assert cli(["estimate", "--config", path, "--seq", "64"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "second line" in out and "RED?" in out


def test_l5_models_as_json_and_quiet_dry_runs(capsys, tmp_path):
    assert cli(["models", "--json"]) == 0
    models = json.loads(capsys.readouterr().out)
    assert {m["name"] for m in models} >= {"gpt2", "llama-2-7b"} and all(m["params"] > 0 for m in models)
    mamba = {"model_type": "mamba", "vocab_size": 128, "hidden_size": 64, "state_size": 8, "num_hidden_layers": 2}
    for data in ({**GEMMA, "vocab_size": 1}, mamba):  # transformers' notes: token ids past the vocabulary, kernels
        done = _vramlab("dryrun", "--config", config_file(tmp_path, data), "--seq", "8")
        assert done.returncode == 0 and done.stderr == "", done.stderr


def test_l5_a_model_without_a_causal_lm_class_is_one_sentence(capsys, tmp_path):
    path = config_file(
        tmp_path, {"model_type": "t5", "d_model": 64, "num_layers": 2, "num_heads": 2, "vocab_size": 100}
    )
    err = one_line_error(capsys, "dryrun", "--config", path, "--seq", "16")
    assert "t5 has no causal-LM class in transformers" in err and len(err) < 200


@pytest.mark.parametrize("round_to", [0, -512, 1.9, True])
def test_l6_round_to_is_checked(round_to):
    with pytest.raises(ValueError, match="round_to"):
        measure(round_to=round_to)


def test_l7_helpers_check_their_inputs():
    from vramlab.estimate import kv_cache_bytes, sharded_states_per_gpu
    from vramlab.fit import largest_batch
    from vramlab.search import largest_passing
    from vramlab.widgets import calculate, fit_report

    with pytest.raises(ValueError, match="positions"):
        kv_cache_bytes("gpt2", 1, 4096)
    with pytest.raises(ValueError, match="2\\*\\*63"):
        kv_cache_bytes("llama-2-7b", 2**50, 4096)
    with pytest.raises(ValueError, match="ZeRO stage"):
        sharded_states_per_gpu("gpt2", "fp32", "adamw", 8, True)
    with pytest.raises(ValueError, match="finite"):
        largest_batch("gpt2", float("nan"))
    assert largest_batch("gpt2", "80GiB").batch == largest_batch("gpt2", 80 * 2**30).batch
    with pytest.raises(ValueError, match="start must be a positive integer"):
        largest_passing(lambda b: True, start=True)
    with pytest.raises(TypeError, match="fit_report needs the Estimate"):
        fit_report(None)
    with pytest.raises(ValueError, match="cannot read the size 'big'"):
        fit_report(calculate(model="gpt2"), gpus={"x": "big"})
    assert calculate(model="gpt2").setup.seq == 1024  # the default 2048 is more than GPT-2's positions


def test_l9_reasonable_inputs_are_accepted(tmp_path):
    assert vramlab.Setup(batch=np.int64(4)).batch == 4 and type(vramlab.Setup(batch=np.int64(4)).batch) is int
    queue = deque([torch.zeros(4)])
    with measure(queue) as m:
        pass
    assert m.baseline_bytes == 16
    assert measure(device="cuda:0").device == "cuda" if vramlab.has_cuda() else measure(device="cpu").device == "cpu"
    bom = tmp_path / "bom.json"
    bom.write_text("\ufeff" + json.dumps({**GPT2, "tie_word_embeddings": 1}), encoding="utf-8")
    from vramlab.models import load_config

    assert load_config(str(bom)).tie_embeddings is True
