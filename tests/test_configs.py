"""config.json import: every field that changes a shape is read, and what vramlab does not model
is refused with a sentence, never answered with a wrong number (each case answered before)."""

import json

import pytest

from vramlab import dryrun, estimate, param_count
from vramlab.cli import main
from vramlab.models import from_hf_config

NEMO = dict(  # Mistral-Nemo-12B's published shape
    model_type="mistral",
    vocab_size=131072,
    hidden_size=5120,
    num_hidden_layers=40,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    max_position_embeddings=1024000,
    tie_word_embeddings=False,
)
BERT = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)


@pytest.mark.parametrize(
    "config, words",
    [
        (BERT, "no model_type"),  # was taken for a Llama decoder: 160M "parameters"
        ({**NEMO, "head_dim": 128}, "head_dim 128 differs from hidden_size / num_attention_heads = 160"),
        ({**NEMO, "sliding_window": 4096, "max_position_embeddings": 32768}, "does not model a sliding window"),
        ({**NEMO, "model_type": "llama", "attention_bias": True}, "attention_bias"),
        ({**NEMO, "model_type": "llama", "mlp_bias": "true"}, "mlp_bias"),
        ({**NEMO, "hidden_size": "big"}, "field hidden_size must be a positive whole number"),
        ({**NEMO, "num_hidden_layers": 10**15}, "below 2\\*\\*40"),
        ({**NEMO, "tie_word_embeddings": "no"}, "tie_word_embeddings must be true or false"),
    ],
)
def test_unmodelled_or_malformed_configs_are_refused(config, words):
    with pytest.raises(ValueError, match=words):
        from_hf_config(config)


def test_fields_are_read_not_guessed():
    assert from_hf_config({**NEMO, "tie_word_embeddings": "false"}).tie_embeddings is False  # was bool("false")
    assert from_hf_config({**NEMO, "head_dim": 160}).head_dim == 160  # the default width: modelled
    qwen = from_hf_config({**NEMO, "model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False})
    assert qwen.family == "qwen2"  # a window that is switched off changes nothing
    assert param_count(from_hf_config({**NEMO, "num_hidden_layers": 40.0})) == param_count(from_hf_config(NEMO))


def test_estimate_refuses_positions_gpt2_does_not_have():
    for fn in (estimate, dryrun):
        with pytest.raises(ValueError, match="learned positions for at most 1024 tokens; got seq=2048"):
            fn("gpt2", seq=2048)


@pytest.mark.parametrize(
    "content, words",
    [("[1, 2]", "holds a JSON list"), ("{not json", "is not valid JSON"), (json.dumps(BERT), "no model_type")],
)
def test_cli_config_errors_are_one_line(tmp_path, capsys, content, words):
    path = tmp_path / "config.json"
    path.write_text(content)
    assert main(["estimate", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err and "Traceback" not in err


def test_a_config_the_formula_refuses_is_still_dry_run(tmp_path, capsys):
    """Mistral-Nemo with head_dim 128 (its real width): the formula refuses the field, the
    dry run builds transformers' own class and answers, labelled (issue 12)."""
    from vramlab.models import HFModel, load_config

    path = tmp_path / "config.json"
    path.write_text(json.dumps({**NEMO, "head_dim": 128, "num_hidden_layers": 2}))
    model = load_config(path)
    assert isinstance(model, HFModel) and "head_dim 128" in model.why_no_formula
    with pytest.raises(ValueError, match="head_dim 128 differs.*dryrun"):
        estimate(model)
    assert main(["dryrun", "--config", str(path), "--seq", "64", "--recipe", "bf16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["details"]["model_type"] == "mistral" and out["params"] > 0
