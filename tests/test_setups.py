"""One Setup validated once, one result shape for every source, one table of GPUs."""

import json

import pytest
import torch

import vramlab
from vramlab import Setup, dryrun, estimate, measure
from vramlab.cli import main
from vramlab.hardware import GPUS, SIZE_CLASSES
from vramlab.recipes import get_recipe
from vramlab.results import ROLES
from vramlab.widgets import calculate


def test_setup_normalises_and_refuses_with_what_to_do():
    s = Setup(batch=2, recipe="AMP-BF16", optimizer="AdamW", attention="SDPA")
    assert (s.recipe, s.optimizer, s.attention) == ("amp-bf16", "adamw", "sdpa")
    for bad, words in [
        (dict(batch=0), "batch must be a positive integer"),
        (dict(seq=-1), "seq must be a positive integer"),
        (dict(batch=2.5), "batch must be a positive integer"),
        (dict(recipe="fp8"), "unknown recipe 'fp8'; use one of fp32, amp-bf16"),
        (dict(optimizer="lion"), "unknown optimizer 'lion'"),
        (dict(attention="flash"), "unknown attention 'flash'; use one of sdpa, eager"),
        (dict(checkpointing="yes"), "checkpointing must be True or False"),
    ]:
        with pytest.raises(ValueError, match=words):
            Setup(**bad)
    with pytest.raises(TypeError, match="unknown setup field"):
        Setup.of(batchsize=4)
    with pytest.raises(dataclasses_frozen()):
        s.batch = 3


def dataclasses_frozen():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_estimate_and_dryrun_take_a_setup_or_its_fields():
    setup = Setup(batch=2, seq=64, recipe="amp-bf16")
    assert estimate("gpt2", setup) == estimate("gpt2", batch=2, seq=64, recipe="amp-bf16")
    assert estimate("gpt2", setup, batch=4).setup == Setup(batch=4, seq=64, recipe="amp-bf16")
    assert dryrun("gpt2", setup).setup == setup
    assert calculate("gpt2", batch=2, seq=64).setup == Setup(batch=2, seq=64, recipe="amp-bf16")


def test_every_result_has_one_shape_and_the_cli_prints_to_json(capsys):
    est = estimate("gpt2", Setup(seq=64))
    dry = dryrun("gpt2", Setup(seq=64))
    with measure() as m:
        torch.zeros(10)
    common = {"source", "setup", "breakdown", "peak_bytes"}
    for result, source in ((est, "formula"), (dry, "dry-run"), (m, "cpu-tracked")):
        obj = result.to_json()
        assert common <= set(obj) and obj["source"] == result.source == source
        assert set(obj["breakdown"]) == set(ROLES) and obj["peak_bytes"] == result.peak_bytes
        json.dumps(obj)  # plain JSON types only
    assert m.to_json()["setup"] is None and m.to_json()["peak_bytes"] == 40
    assert main(["estimate", "gpt2", "--seq", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == est.to_json()


def test_recipe_bytes_per_value():
    assert [(get_recipe(r).param_bytes, get_recipe(r).compute_bytes) for r in ("fp32", "amp-bf16", "bf16")] == [
        (4, 4),
        (4, 2),
        (2, 2),
    ]


def test_one_table_of_gpus():
    assert set(SIZE_CLASSES.values()) <= set(GPUS.values())
    from vramlab.planner import DEVICE_SIZES

    assert DEVICE_SIZES is SIZE_CLASSES


def test_the_top_level_namespace_is_the_course_vocabulary():
    for name in vramlab.__all__:
        assert getattr(vramlab, name) is not None
    model, opt, ids = vramlab.tiny_training(vramlab.GPTConfig(), batch=3)
    assert ids.shape == (3, 128) and opt.param_groups[0]["params"] == list(model.parameters())
    assert vramlab.plot_timeline.__module__ == "vramlab.plots"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        vramlab.nothing  # noqa: B018
