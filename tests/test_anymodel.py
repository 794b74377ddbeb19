"""Dry runs of transformers configs that vramlab's formula does not model (issue 12)."""

import json
from pathlib import Path

import pytest
import torch

from vramlab import estimate
from vramlab.cli import main
from vramlab.dryrun import dryrun, realrun
from vramlab.fit import largest_batch
from vramlab.models import HFModel, load_config

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
DENSE = ["gemma2", "phi3", "qwen3", "olmo2", "stablelm", "gpt_neox", "falcon"]


@pytest.mark.parametrize("name", DENSE)
def test_dry_run_of_the_configs_own_class_equals_a_real_cpu_run(name):
    model = load_config(CONFIGS / f"{name}.json")
    assert isinstance(model, HFModel) and model.name == name and model.model_type == name
    fake, real = dryrun(model, batch=2, seq=64), realrun(model, batch=2, seq=64)
    assert fake.details["formula"].startswith("none") and fake.details["model_type"] == name
    assert fake.params == real.params
    assert fake.peak_bytes == pytest.approx(real.peak_bytes, rel=0.01)
    assert fake.first_step_peak_bytes <= fake.peak_bytes


def test_gemma2_is_traced_with_the_eager_attention_transformers_picks_for_it():
    model = load_config(CONFIGS / "gemma2.json")
    assert dryrun(model, seq=64).details["attention"] == "eager"
    assert dryrun(load_config(CONFIGS / "qwen3.json"), seq=64).details["attention"].endswith("no mask)")
    # Falcon keeps its own attention code: the label says so instead of claiming the mask-free call
    assert "own attention code" in dryrun(load_config(CONFIGS / "falcon.json"), seq=64).details["attention"]


def test_mixture_of_experts_reports_total_and_active_parameters():
    model = load_config(CONFIGS / "mixtral.json")
    result = dryrun(model, seq=64, recipe="bf16")
    cfg = json.loads((CONFIGS / "mixtral.json").read_text())
    hidden, inner, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    experts = layers * cfg["num_local_experts"] * 3 * hidden * inner  # gate, up and down per expert
    assert result.details["experts"] == 4 and result.details["experts_per_token"] == 2
    assert result.details["active_params"] == result.params - experts + experts * 2 // 4
    assert result.breakdown["parameters"] == 2 * result.params  # weights follow the total, in bf16
    with pytest.raises(ValueError, match="bf16 only"):
        dryrun(model, seq=64, recipe="fp32")


def test_what_cannot_be_answered_is_refused_in_one_line(tmp_path, capsys):
    gemma = load_config(CONFIGS / "gemma2.json")
    with pytest.raises(ValueError, match="no formula for model_type 'gemma2'.*dryrun"):
        estimate(gemma)
    with pytest.raises(ValueError, match="no formula"):
        largest_batch(gemma, 16 * 2**30)
    with pytest.raises(ValueError, match="256 positions"):
        dryrun(gemma, seq=300)
    broken = dict(json.loads((CONFIGS / "stablelm.json").read_text()), num_key_value_heads=32)  # more than heads
    (tmp_path / "config.json").write_text(json.dumps(broken))
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"model_type": "no-such-model", "vocab_size": 8}))
    for path in (tmp_path / "config.json", unknown):
        assert main(["dryrun", "--config", str(path), "--seq", "16"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vramlab: error:") and len(err.strip().splitlines()) == 1


def test_cli_labels_the_dry_run_without_a_formula(capsys):
    assert main(["dryrun", "--config", str(CONFIGS / "mixtral.json"), "--seq", "32", "--recipe", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "dry run; no formula: model_type mixtral" in out and "active parameters per token" in out
    assert main(["dryrun", "--config", str(CONFIGS / "phi3.json"), "--seq", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["details"]["model_type"] == "phi3"
    assert torch.get_default_dtype() == torch.float32  # the build restored the default dtype
