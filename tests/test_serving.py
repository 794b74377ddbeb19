"""vramlab serve: vLLM's start-up KV-cache plan (issue 27)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from vramlab.cli import main
from vramlab.estimate import param_count
from vramlab.models import get_arch
from vramlab.serving import (
    ServeConfig,
    blocks_from_available,
    kv_bytes_per_token,
    serve_plan,
    weights_per_rank,
)
from vramlab.units import GiB, KiB

CASES = json.loads((Path(__file__).resolve().parents[1] / "bench" / "vllm" / "cases.json").read_text())["cases"]
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "vllm"))
from validate import LLAMA31_8B, QWEN2_7B  # noqa: E402  the bench's shapes of the logged models


def _case(text: str) -> dict:
    return next(c for c in CASES if text in c["citation"])


def test_kv_bytes_per_token_split_and_replicate_heads_as_vllm_does():
    llama = get_arch("llama-3-8b")  # 32 layers, 8 KV heads of 128
    assert kv_bytes_per_token(llama) == 2 * 32 * 8 * 128 * 2 == 128 * KiB
    assert kv_bytes_per_token(llama, tp=8) == 16 * KiB
    assert kv_bytes_per_token(llama, tp=16) == 16 * KiB  # more ranks than KV heads: one head each, replicated
    assert kv_bytes_per_token(llama, kv_cache_dtype="fp8") == 64 * KiB
    with pytest.raises(ValueError, match="does not divide its 32 attention heads"):
        kv_bytes_per_token(llama, tp=3)
    with pytest.raises(ValueError, match="neither divides nor is a multiple of its 2 KV heads"):
        kv_bytes_per_token(get_arch("qwen2.5-1.5b"), tp=3)


@pytest.mark.parametrize("name", ["llama-3-8b", "qwen2.5-1.5b", "mistral-7b", "llama-2-70b"])
def test_weights_on_one_gpu_are_the_parameters_in_bf16(name):
    arch = get_arch(name)
    assert weights_per_rank(arch) == 2 * param_count(arch)
    per_rank = weights_per_rank(arch, tp=2)
    assert 2 * param_count(arch) / 2 < per_rank < 2 * param_count(arch) / 1.99  # norms stay whole


@pytest.mark.parametrize("citation", ["0.25GRAM", "0.5GRAM", "ilseokoh", "53128951888", "57428438798"])
def test_the_logged_block_counts_follow_from_the_logged_available_memory(citation):
    """vLLM's arithmetic alone: its logged available GiB (2 decimals) gives its logged blocks."""
    case = _case(citation)
    arch = {"Qwen": QWEN2_7B, "meta-llama": LLAMA31_8B}[case["model"].split("/")[0]]
    gib = case["logged"]["available_kv_cache_gib"]
    want = case["logged"]["gpu_blocks"] or case["logged"]["kv_cache_tokens"] // 16
    lo, hi = (blocks_from_available(int((gib + d) * GiB), arch) for d in (-0.005, 0.005))
    assert lo <= want <= hi and hi - lo < 0.003 * want


@pytest.mark.parametrize(
    ("citation", "sampler"), [("0.25GRAM", "flashinfer"), ("0.5GRAM", "flashinfer"), ("57428438798", "native")]
)
def test_the_prediction_is_within_3_percent_of_vllms_logged_cache(citation, sampler):
    """Issue 27's bar, on every V1 case whose card total and flags are logged. The sampler is the
    one the log's set-up uses (FlashInfer on the A100; the WSL2 card falls back to PyTorch's)."""
    case = _case(citation)
    quantized = case["quantization"] is not None
    config = ServeConfig(
        gpu_bytes=int(case["gpu_total_gib"] * GiB),
        max_model_len=case["max_model_len"],
        gpu_memory_utilization=case["gpu_memory_utilization"],
        max_num_seqs=256,
        max_num_batched_tokens=case["max_num_batched_tokens"] or 2048,
        sampler=sampler,
        weights_bytes=int(case["logged"]["model_loading_gib"] * GiB) if quantized else None,
    )
    plan = serve_plan(QWEN2_7B, config)
    logged = case["logged"]["kv_cache_tokens"]
    assert abs(plan.kv_cache_tokens - logged) <= 0.03 * logged
    assert plan.max_concurrency() == pytest.approx(case["logged"]["max_concurrency"], rel=0.03)


def test_given_terms_are_vllms_arithmetic_exactly():
    """With the log's own terms the plan is vLLM's subtraction and floor divisions."""
    config = ServeConfig(gpu_bytes=80 * GiB, gpu_name="H100 80GB", max_model_len=8192,
                         weights_bytes=15 * GiB, profile_peak_bytes=GiB, non_torch_bytes=GiB // 4)  # fmt: skip
    plan = serve_plan("llama-3-8b", config)
    assert plan.requested_bytes == int(80 * GiB * 0.9)
    assert plan.available_kv_bytes == plan.requested_bytes - 15 * GiB - GiB - GiB // 4
    page = 16 * 2 * 8 * 128 * 2  # one layer's block
    assert plan.num_blocks == plan.available_kv_bytes // page // 32
    assert plan.kv_cache_tokens == 16 * plan.num_blocks
    assert plan.max_concurrency() == plan.num_blocks / (8192 // 16)
    assert plan.max_concurrency(1000) == plan.num_blocks / math.ceil(1000 / 16)
    memory = plan.kv_cache_memory_for(10)  # the inverse: --kv-cache-memory for 10 full requests
    assert blocks_from_available(memory, get_arch("llama-3-8b")) == 10 * 512
    assert blocks_from_available(memory - 1, get_arch("llama-3-8b")) == 10 * 512 - 1
    assert plan.max_num_seqs == 1024 and plan.max_num_batched_tokens == 8192  # vLLM's defaults on an H100


def test_a_cache_too_small_for_one_request_says_vllm_would_not_start():
    plan = serve_plan("llama-2-7b", ServeConfig(gpu_bytes=16 * GiB, max_model_len=4096, profile_peak_bytes=0))
    assert not plan.fits and plan.largest_max_model_len == plan.kv_cache_tokens < 4096
    assert "would refuse to start" in str(plan)
    cut = serve_plan("llama-2-7b", ServeConfig(gpu_bytes=16 * GiB, max_model_len=plan.largest_max_model_len,
                                               profile_peak_bytes=0))  # fmt: skip
    assert cut.fits and cut.max_concurrency() == 1


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        (dict(gpu_memory_utilization=1.5), "in (0, 1]"),
        (dict(gpu_memory_utilization=0), "in (0, 1]"),
        (dict(gpu_bytes=80 * GiB), "name the GPU"),
        (dict(max_num_batched_tokens=128, max_num_seqs=256), "at least max_num_seqs"),
        (dict(kv_cache_dtype="int4"), "kv_cache_dtype"),
        (dict(tp=0), "tp must be a positive"),
        (dict(max_model_len=-5), "max_model_len must be a positive"),
        (dict(max_model_len=10**6), "exceeds"),
        (dict(tp=2), "--profile-peak"),
        (dict(sampler="gumbel"), "sampler"),
        (dict(weights_bytes=-1), "weights_bytes"),
    ],
)
def test_bad_configs_are_one_clear_sentence(changes, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace("]", r"\]")):
        serve_plan("llama-3-8b", ServeConfig(**{"gpu_bytes": 40 * GiB, **changes}))


def test_a_sliding_window_model_is_refused():
    with pytest.raises(ValueError, match="sliding window of 4096 tokens"):
        serve_plan("mistral-7b", ServeConfig(gpu_bytes=40 * GiB))


def test_the_cli_serves_a_plan_and_refuses_in_one_line(capsys):
    assert main(["serve", "qwen2.5-0.5b", "--gpu", "T4", "--max-model-len", "4096", "--requests", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kv_cache_tokens"] == 16 * out["num_blocks"] and out["starts"]
    assert out["kv_cache_memory_bytes"] == 4 * 4096 * out["kv_bytes_per_token"]
    assert out["config"]["gpu_bytes"] == round(14.56 * 1024) * 2**20  # a T4 as CUDA reports it
    assert out["sources"] == {"weights": "formula", "profile": "dry run, flashinfer sampler", "non_torch": "assumed"}
    for argv, words in (
        (["serve", "qwen2.5-0.5b", "--gpu", "A100"], "ambiguous"),
        (["serve", "qwen2.5-0.5b", "--gpu", "16G"], "unknown GPU"),
        (["serve", "qwen2.5-0.5b", "--gpu", "T4", "--tp", "2", "--gpus", "4"], "pipeline"),
        (["serve", "qwen2.5-0.5b", "--gpu", "T4", "--profile-peak", "1.5"], "whole number of bytes"),
        (["serve", "qwen2.5-0.5b", "--gpu", "T4", "--requests", "0"], "requests must be a positive"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1


def test_a_quantized_checkpoint_serves_its_stored_bytes_and_refuses_a_split_it_cannot_model(tmp_path, capsys):
    from test_checkpoints import _llama_checkpoint

    stored = _llama_checkpoint(tmp_path / "gptq", quantized=True)
    argv = ["serve", str(tmp_path / "gptq"), "--gpu", "T4", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["weights_bytes"] == stored and out["sources"]["weights"] == "stored bytes of the checkpoint"
    assert main([*argv, "--tp", "2", "--profile-peak", "1GiB"]) == 2
    assert "give --weights" in capsys.readouterr().err
