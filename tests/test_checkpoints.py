"""Stored bytes from checkpoint headers (vramlab.checkpoints): small real checkpoints written
here in the layouts of GPTQ, AWQ, FP8 and bitsandbytes 4-bit, and a GGUF file, sized exactly
from a local file, a folder, an index, and a Hub id served by a stand-in on 127.0.0.1."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from hub_server import serve
from vramlab.checkpoints import StoredWeights, stored_weights
from vramlab.cli import main

HIDDEN, VOCAB, GROUP = 64, 128, 32


def _plain() -> dict[str, torch.Tensor]:
    """What stays in bf16 in quantized checkpoints: embeddings, LM head, norms."""
    return {
        "model.embed_tokens.weight": torch.zeros(VOCAB, HIDDEN, dtype=torch.bfloat16),
        "lm_head.weight": torch.zeros(VOCAB, HIDDEN, dtype=torch.bfloat16),
        "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
    }


LAYOUTS = {
    "gptq": (
        {
            "q_proj.qweight": torch.zeros(HIDDEN // 8, HIDDEN, dtype=torch.int32),
            "q_proj.qzeros": torch.zeros(HIDDEN // GROUP, HIDDEN // 8, dtype=torch.int32),
            "q_proj.scales": torch.ones(HIDDEN // GROUP, HIDDEN, dtype=torch.float16),
            "q_proj.g_idx": torch.zeros(HIDDEN, dtype=torch.int32),
        },
        {"quant_method": "gptq", "bits": 4, "group_size": GROUP},
        "gptq 4-bit, group size 32",
    ),
    "awq": (
        {
            "q_proj.qweight": torch.zeros(HIDDEN, HIDDEN // 8, dtype=torch.int32),
            "q_proj.qzeros": torch.zeros(HIDDEN // GROUP, HIDDEN // 8, dtype=torch.int32),
            "q_proj.scales": torch.ones(HIDDEN // GROUP, HIDDEN, dtype=torch.float16),
        },
        {"quant_method": "awq", "bits": 4, "group_size": GROUP},
        "awq 4-bit, group size 32",
    ),
    "fp8": (
        {
            "q_proj.weight": torch.zeros(HIDDEN, HIDDEN, dtype=torch.float8_e4m3fn),
            "q_proj.weight_scale_inv": torch.ones(1, 1, dtype=torch.float32),
        },
        {"quant_method": "fp8", "weight_block_size": [128, 128]},
        "fp8, weight blocks 128x128",
    ),
    "bnb-4bit": (
        {
            "q_proj.weight": torch.zeros(HIDDEN * HIDDEN // 2, 1, dtype=torch.uint8),
            "q_proj.weight.absmax": torch.ones(HIDDEN * HIDDEN // 64, dtype=torch.float32),
            "q_proj.weight.quant_map": torch.ones(16, dtype=torch.float32),
            "q_proj.weight.quant_state.bitsandbytes__nf4": torch.tensor(list(b'{"type": "nf4"}'), dtype=torch.uint8),
        },
        {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
        "bitsandbytes 4-bit (nf4)",
    ),
}
NAMES = {torch.int32: "I32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
         torch.uint8: "U8", torch.float8_e4m3fn: "F8_E4M3"}  # fmt: skip


def _write(folder, tensors, quant, shards=1):
    """A checkpoint folder (config.json and safetensors, one file or an index of shards);
    returns the bytes stored by dtype, summed from the tensors themselves."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "hidden_size": HIDDEN, "vocab_size": VOCAB}
    if quant:
        config["quantization_config"] = quant
    (folder / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
    else:
        weight_map = {}
        for i in range(shards):
            part = names[i::shards]
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in part}, str(folder / file))
            weight_map.update(dict.fromkeys(part, file))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    want: dict[str, int] = {}
    for t in tensors.values():
        want[NAMES[t.dtype]] = want.get(NAMES[t.dtype], 0) + t.numel() * t.element_size()
    return want


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_quantized_checkpoints_size_to_their_stored_bytes(layout, tmp_path):
    tensors, quant, words = LAYOUTS[layout]
    want = _write(tmp_path / "one", {**tensors, **_plain()}, quant)
    for source in (tmp_path / "one", tmp_path / "one" / "model.safetensors"):
        got = stored_weights(source)
        assert got.by_dtype == want and got.total_bytes == sum(want.values()) and got.quantization == words
    _write(tmp_path / "sharded", {**tensors, **_plain()}, quant, shards=3)
    for source in (tmp_path / "sharded", tmp_path / "sharded" / "model.safetensors.index.json"):
        assert stored_weights(source).by_dtype == want
    assert "BF16" in want and stored_weights(tmp_path / "one").tensors == len(tensors) + 3


def test_a_hub_id_sizes_from_headers_only_through_hf_endpoint(tmp_path, monkeypatch):
    tensors, quant, words = LAYOUTS["gptq"]
    want = _write(tmp_path / "hub" / "org" / "gptq" / "main", {**tensors, **_plain()}, quant)
    _write(tmp_path / "hub" / "org" / "sharded" / "v1", {**tensors, **_plain()}, quant, shards=2)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    with serve(tmp_path / "hub") as (endpoint, hub):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        got = stored_weights("org/gptq")
        assert got.by_dtype == want and got.quantization == words and got.source == "org/gptq"
        ranged = [r for m, p, r in hub.requests if m == "GET" and p.endswith("model.safetensors")]
        assert ranged == ["bytes=0-100000"]  # the header only: one range request
        assert stored_weights("org/sharded@v1").by_dtype == want


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("org/missing", "no such repo"),
        ("org/gated", "is gated"),
        ("org/gptq@nope", "no such revision"),
        ("org/slow", "did not answer within 1 s"),
        ("org/truncated", "header"),
        ("not a source", "neither a file or folder here nor a Hub id"),
    ],
)
def test_hub_failures_are_one_line(source, words, tmp_path, monkeypatch):
    tensors, quant, _ = LAYOUTS["gptq"]
    for repo in ("gptq", "gated", "slow"):
        _write(tmp_path / "hub" / "org" / repo / "main", dict(tensors), quant)
    bad = tmp_path / "hub" / "org" / "truncated" / "main"
    bad.mkdir(parents=True)
    (bad / "config.json").write_text("{}")
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", 200_000) + b"{" * 1000)  # a header cut short
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    with serve(tmp_path / "hub") as (endpoint, hub):
        hub.gated.add("org/gated")
        hub.slow["model.safetensors"] = 3.0 if source == "org/slow" else 0.0
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        with pytest.raises(ValueError, match=words) as err:
            stored_weights(source, timeout=1.0)
    assert len(str(err.value).splitlines()) == 1


def test_a_truncated_local_header_is_one_line(tmp_path):
    (tmp_path / "cut.safetensors").write_bytes(struct.pack("<Q", 5000) + b'{"a": ')
    with pytest.raises(ValueError, match="truncated safetensors header"):
        stored_weights(tmp_path / "cut.safetensors")


def test_a_gguf_file_sizes_from_its_header(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    weights = np.ones((HIDDEN, HIDDEN), dtype=np.float32)
    packed = gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_q.weight", packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    got = stored_weights(path)
    assert got.format == "gguf" and got.quantization == "GGUF Q8_0"
    assert got.by_dtype == {"Q8_0": HIDDEN * HIDDEN // 32 * 34, "F32": HIDDEN * 4}  # 34 bytes per 32 weights


def test_the_cli_prints_stored_bytes(tmp_path, capsys):
    tensors, quant, words = LAYOUTS["awq"]
    want = _write(tmp_path / "ckpt", {**tensors, **_plain()}, quant)
    assert main(["weights", str(tmp_path / "ckpt"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total_bytes"] == sum(want.values()) and out["quantization"] == words
    assert main(["weights", str(tmp_path / "nothing-here")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vramlab: error:") and len(err.strip().splitlines()) == 1
    assert isinstance(stored_weights(tmp_path / "ckpt"), StoredWeights)


def _llama_checkpoint(folder, quantized: bool):
    """A 2-block Llama checkpoint: bf16, or GPTQ-shaped (4-bit, group 32) with bf16 embeddings,
    head and norms; returns its stored bytes."""
    from vramlab.estimate import param_count
    from vramlab.models import from_hf_config

    config = {"model_type": "llama", "hidden_size": HIDDEN, "vocab_size": VOCAB, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
              "max_position_embeddings": 256, "tie_word_embeddings": False}  # fmt: skip
    if quantized:
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": GROUP}
    arch = from_hf_config(config)
    tensors = dict(_plain())
    from vramlab.estimate import linear_shapes

    for layer in range(2):
        for name, (out, inp) in linear_shapes(arch).items():
            key = f"model.layers.{layer}.{name}"
            if quantized:
                tensors[f"{key}.qweight"] = torch.zeros(inp // 8, out, dtype=torch.int32)
                tensors[f"{key}.scales"] = torch.ones(inp // GROUP, out, dtype=torch.float16)
            else:
                tensors[f"{key}.weight"] = torch.zeros(out, inp, dtype=torch.bfloat16)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{layer}.{norm}.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "model.safetensors"))
    assert quantized or sum(t.numel() for t in tensors.values()) == param_count(arch)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_estimate_sizes_a_quantized_checkpoint_by_its_stored_bytes(tmp_path, capsys):
    from vramlab import estimate
    from vramlab.models import from_hf_config

    stored = _llama_checkpoint(tmp_path / "gptq", quantized=True)
    assert main(["estimate", str(tmp_path / "gptq"), "--inference", "--seq", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    plain = estimate(from_hf_config(tmp_path / "gptq" / "config.json"), inference=True, seq=64, recipe="bf16")
    assert out["breakdown"]["parameters"] == stored < plain.breakdown["parameters"]
    assert out["peak_bytes"] - stored == plain.peak_bytes - plain.breakdown["parameters"]  # same activations, cache
    assert out["details"]["quantization"] == "gptq 4-bit, group size 32"
    assert main(["estimate", str(tmp_path / "gptq"), "--seq", "64"]) == 2
    assert "--inference" in capsys.readouterr().err
    assert main(["fit", str(tmp_path / "gptq"), "--gpu", "16GiB"]) == 2
    assert "quantized" in capsys.readouterr().err


def test_an_unquantized_checkpoint_is_its_config_and_stores_its_parameters(tmp_path, capsys):
    stored = _llama_checkpoint(tmp_path / "bf16", quantized=False)
    assert main(["estimate", str(tmp_path / "bf16"), "--inference", "--seq", "64", "--recipe", "bf16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["details"]["stored_bytes"] == stored == out["breakdown"]["parameters"]  # bf16 as stored


def test_an_unreachable_hub_is_not_called_offline_mode(tmp_path, monkeypatch):
    """Nothing listens on the endpoint: the line says the Hub could not be reached, not that
    HF_HUB_OFFLINE is set (it is not)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ValueError) as err:
        stored_weights("org/anything", timeout=1.0)
    assert "HF_HUB_OFFLINE" not in str(err.value) and len(str(err.value).splitlines()) == 1
