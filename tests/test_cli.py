import json
import subprocess
import sys

import pytest

from vramlab.cli import main

KEYS = {"parameters", "gradients", "optimizer", "activations", "other"}


def run_json(capsys, *args):
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_estimate_json_shape(capsys):
    obj = run_json(capsys, "estimate", "gpt2", "--batch", "2", "--seq", "512")
    assert obj["model"] == "gpt2" and obj["params"] == 124_439_808 and obj["source"] == "formula"
    assert set(obj["breakdown"]) == KEYS
    assert obj["peak_bytes"] == sum(obj["breakdown"].values())


def test_estimate_and_dryrun_agree_on_llama_7b(capsys):
    args = ["llama-2-7b", "--batch", "1", "--seq", "4096", "--recipe", "amp-bf16"]
    est = run_json(capsys, "estimate", *args)
    dry = run_json(capsys, "dryrun", *args)
    assert dry["source"] == "dry-run" and set(dry["breakdown"]) == KEYS
    assert est["params"] == dry["params"] == 6_738_415_616
    assert abs(est["peak_bytes"] - dry["peak_bytes"]) / dry["peak_bytes"] < 0.05


def test_inference_json(capsys):
    obj = run_json(capsys, "estimate", "llama-3-8b", "--seq", "8192", "--recipe", "bf16", "--inference")
    assert obj["breakdown"]["gradients"] == obj["breakdown"]["optimizer"] == 0
    assert obj["kv_cache_bytes"] == 2 * 32 * 8 * 128 * 8192 * 2


def test_config_json(tmp_path, capsys):
    cfg = {
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    obj = run_json(capsys, "estimate", "--config", str(path))
    assert obj["params"] == 6_738_415_616


def test_human_table(capsys):
    assert main(["estimate", "gpt2"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808 parameters" in out and "GiB" in out and "peak" in out


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "llama-2-70b" in out and "68,976,648,192" in out


@pytest.mark.parametrize(
    "args, words",
    [
        (["estimate", "gpt5"], "unknown model"),
        (["estimate", "gpt2", "--batch", "-2"], "batch must be a positive integer"),
        (["estimate", "gpt2", "--recipe", "fp8"], "invalid choice"),
        (["estimate", "gpt2", "--batch", "two"], "invalid int value"),
        (["estimate"], "name a model"),
        (["estimate", "--config", "/nonexistent/config.json"], "no config file"),
        (["dryrun", "gpt2", "--optimizer", "adafactor"], "no dry-run path"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_one_line_exit_2(args, words, capsys):
    with pytest.raises(SystemExit) as info:
        code = main(args)
        raise SystemExit(code)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err and "Traceback" not in err


def test_console_script_is_installed():
    out = subprocess.run(
        [sys.executable, "-m", "vramlab.cli", "estimate", "gpt2", "--json"], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out)["params"] == 124_439_808


@pytest.mark.parametrize(
    "args, words",
    [
        (["estimate", "lama-2-7b"], "did you mean 'llama-2-7b'?"),
        (["estimate", "gpt2", "--batch", str(10**20)], "needs more than 2**63 bytes"),
        (["dryrun", "llama-2-7b", "--batch", str(10**10), "--seq", str(10**8)], "needs more than 2**63 bytes"),
    ],
)
def test_typos_and_impossible_sizes_are_one_line(args, words, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err and "Traceback" not in err


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    import vramlab.cli as C

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(C, "_run", interrupted)
    assert main(["estimate", "gpt2"]) == 130
    assert capsys.readouterr().err.strip() == "vramlab: interrupted"


def test_estimate_runs_without_importing_torch():
    """The formulas need no tensors: `vramlab estimate` answers in a fraction of a second
    because neither it nor `import vramlab` loads torch (issue 12)."""
    code = (
        "import sys, vramlab; from vramlab.cli import main; "
        "main(['estimate', 'llama-2-7b', '--seq', '4096', '--json']); "
        "assert 'torch' not in sys.modules, 'torch was imported'; "
        "assert callable(vramlab.dryrun) and callable(vramlab.measure) and callable(vramlab.estimate)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["peak_bytes"] > 0


def test_package_attributes_stay_functions_after_their_modules_are_imported():
    import vramlab
    import vramlab.budget
    import vramlab.dryrun
    import vramlab.estimate
    import vramlab.measure

    assert vramlab.dryrun.__name__ == "dryrun" and vramlab.estimate.__name__ == "estimate"
    assert vramlab.measure.__name__ == "measure" and vramlab.budget.__name__ == "budget"
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        vramlab.nonsense  # noqa: B018


def test_dryrun_prints_no_warnings_on_stderr():
    """Importing transformers pulls in torchao, whose missing GPU kernels and deprecations
    print on a CPU machine; a dry run silences its imports (issue 12)."""
    out = subprocess.run(
        [sys.executable, "-c", "from vramlab.cli import main; main(['dryrun', 'llama-2-7b', '--seq', '64'])"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and "steady state" in out.stdout
    assert out.stderr == ""


@pytest.mark.parametrize(
    ("model", "gpu", "extra"),
    [
        ("gpt2", "16GB", []),
        ("qwen2.5-0.5b", "24GiB", ["--recipe", "amp-bf16", "--seq", "2048"]),
        ("llama-2-7b", "80GiB", ["--inference", "--recipe", "bf16", "--seq", "4096"]),
    ],
)
def test_fit_answers_the_largest_batch_whose_steady_state_fits(model, gpu, extra, capsys):
    from vramlab import estimate
    from vramlab.hardware import CONTEXT_HEADROOM
    from vramlab.units import parse_bytes

    assert main(["fit", model, "--gpu", gpu, "--json", *extra]) == 0
    out = json.loads(capsys.readouterr().out)
    setup = {k: v for k, v in out["setup"].items() if k != "batch"}
    batch, room = out["largest_batch"], parse_bytes(gpu) - CONTEXT_HEADROOM
    assert batch >= 1 and out["gpu_bytes"] == parse_bytes(gpu)
    fits, too_big = (estimate(model, batch=b, **setup).peak_bytes for b in (batch, batch + 1))
    assert fits <= room < too_big


def test_fit_names_the_first_recipe_when_batch_1_does_not_fit(capsys):
    from vramlab.hardware import CONTEXT_HEADROOM
    from vramlab.planner import first_fit

    assert main(["fit", "llama-2-7b", "--gpu", "24GiB", "--seq", "2048", "--recipe", "amp-bf16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    plan = first_fit("llama-2-7b", 24 * 2**30, seq=2048, headroom=CONTEXT_HEADROOM)
    assert out["largest_batch"] == 0 and out["plan"]["devices"] == plan.devices == 8
    assert out["plan"]["source"] == plan.source == "dry-run"  # the guide's table holds 7B at 2048
    assert main(["fit", "llama-2-7b", "--gpu", "24GiB", "--seq", "2048"]) == 0
    assert "FSDP2 + ckpt x8" in capsys.readouterr().out
    assert main(["fit", "llama-2-7b", "--gpu", "24GiB", "--seq", "1024", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["source"] == "formula"  # not in the table: no dry run


@pytest.mark.parametrize(("gpu", "words"), [("16G", "ambiguous"), ("0GiB", "more than 0 bytes"), ("lots", "")])
def test_fit_refuses_unclear_gpu_sizes_in_one_line(gpu, words, capsys):
    assert main(["fit", "gpt2", "--gpu", gpu]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vramlab: error:") and words in err and len(err.strip().splitlines()) == 1


def test_per_gpu_states_under_zero_in_both_conventions(capsys):
    from vramlab.estimate import param_count

    args = ["estimate", "llama-2-7b", "--recipe", "amp-bf16", "--seq", "2048", "--json"]
    assert main([*args, "--gpus", "8", "--zero", "3"]) == 0
    shard = json.loads(capsys.readouterr().out)["per_gpu"]
    p = param_count("llama-2-7b")
    for convention in ("pytorch", "deepspeed"):  # 4+4+8 and 2+2+12: both 16 bytes per parameter, over 8
        assert abs(sum(shard["states"][convention].values()) - 16 * p / 8) < 64
    assert shard["states"]["pytorch"]["parameters"] == 2 * shard["states"]["deepspeed"]["parameters"]
    assert shard["activations_bytes"] > 0
    assert main([*args, "--gpus", "8", "--zero", "1"]) == 0
    one = json.loads(capsys.readouterr().out)["per_gpu"]["states"]
    assert sum(one["pytorch"].values()) > 1.5 * sum(one["deepspeed"].values())  # fp32 weights stay whole
    assert main(["estimate", "llama-2-7b", "--recipe", "amp-bf16", "--gpus", "8", "--zero", "3"]) == 0
    assert "DeepSpeed (bf16 2+2, fp32 masters)" in capsys.readouterr().out


def test_qlora_from_the_command_line_is_the_library_estimate(capsys):
    from vramlab.estimate import qlora_estimate

    assert main(["estimate", "llama-2-7b", "--qlora", "16", "--checkpointing", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["peak_bytes"] == qlora_estimate("llama-2-7b", rank=16, checkpointing=True).peak_bytes
    assert out["details"]["rank"] == 16


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["dryrun", "gpt2", "--gpus", "2", "--zero", "1"], "belong to `vramlab estimate`"),
        (["estimate", "gpt2", "--gpus", "2"], "together"),
        (["estimate", "gpt2", "--gpus", "2", "--zero", "3", "--inference"], "full training step"),
        (["estimate", "gpt2", "--qlora", "8", "--recipe", "bf16"], "fixes the recipe"),
        (["estimate", "gpt2", "--qlora", "0"], "1 or more"),
        (["estimate", "gpt2", "--qlora", "8"], "--checkpointing"),
    ],
)
def test_sharding_and_qlora_flags_refuse_what_they_do_not_model(args, words, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


def test_lora_is_a_dry_run_flag(capsys):
    assert main(["dryrun", "llama-2-7b", "--recipe", "bf16", "--seq", "256", "--lora", "16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["setup"]["lora_rank"] == 16 and out["breakdown"]["gradients"] < out["breakdown"]["parameters"] / 50
    assert main(["estimate", "llama-2-7b", "--lora", "16"]) == 2
    assert "dry run only" in capsys.readouterr().err
