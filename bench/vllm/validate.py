"""`vramlab serve` against the start-up lines vLLM logged, written to validation.md.

Each case in cases.json (cited there: model, card, flags, version) is checked twice:

A. vLLM's arithmetic: from the logged "Available KV cache memory" (two decimals of GiB), the
   blocks, the "GPU KV cache size" in tokens and the "Maximum concurrency". The logged GiB is
   rounded, so a count within half a hundredth of a GiB either way is a match.
B. The prediction: from the card's total, the flags and the model's shapes alone (weights by
   formula, the profile run by dry run, non-torch memory assumed), the available KV memory and
   the tokens, against the log: the bar is 3 %.

    python bench/vllm/validate.py [--write]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vramlab.models import ArchConfig, get_arch
from vramlab.serving import ServeConfig, blocks_from_available, serve_plan
from vramlab.units import GiB

HERE = Path(__file__).resolve().parent

QWEN2_7B = ArchConfig(  # config.json of Qwen/Qwen2-7B-Instruct and Qwen/Qwen2.5-7B-Instruct (same shapes)
    name="qwen2-7b",
    family="qwen2",
    vocab_size=152064,
    hidden_size=3584,
    num_layers=28,
    num_heads=28,
    num_kv_heads=4,
    intermediate_size=18944,
    max_position=32768,
    tie_embeddings=False,
)
LLAMA31_8B = get_arch("llama-3-8b").with_(name="llama-3.1-8b", max_position=131072)  # same shapes, longer context
ARCHS = {
    "Qwen/Qwen2-7B-Instruct": QWEN2_7B,
    "Qwen/Qwen2.5-7B-Instruct": QWEN2_7B,
    "Qwen/Qwen2.5-7B-Instruct-AWQ": QWEN2_7B,
    "meta-llama/Llama-3.1-8B-Instruct": LLAMA31_8B,
    "Qwen/Qwen2.5-1.5B-Instruct": get_arch("qwen2.5-1.5b"),
    "meta-llama/Meta-Llama-3-8B": get_arch("llama-3-8b"),
}
WHY_NOT = {  # cases the prediction (B) does not cover, and why
    "moe": "a mixture-of-experts model: vramlab models dense decoders only",
    "v0": "vLLM's V0 engine (before 0.8): its profile run and KV formula differ; B models V1",
    "gpu": "the card's total memory is not in the log (inferred), so the requested memory is unknown",
    "util": "the card and gpu_memory_utilization are not in the log",
    "quantized": "a quantized checkpoint whose headers are not here (no network): weights taken from the log",
}


def _arch(case: dict) -> ArchConfig | None:
    return next(
        (arch for name, arch in ARCHS.items() if case["model"].startswith(name + " ") or case["model"] == name), None
    )


def arithmetic(case: dict, arch: ArchConfig) -> dict | None:
    """Check A: blocks and tokens from the logged available memory, within its rounding."""
    logged = case["logged"]
    if logged["available_kv_cache_gib"] is None or case["engine"].startswith("v0"):
        return None
    gib = logged["available_kv_cache_gib"]
    lo, hi = (blocks_from_available(int((gib + d) * GiB), arch, case["tp"]) for d in (-0.005, 0.005))
    want = logged["gpu_blocks"] or (logged["kv_cache_tokens"] // 16 if logged["kv_cache_tokens"] else None)
    concurrency = None
    if logged["max_concurrency_len"]:
        per_request = -(-logged["max_concurrency_len"] // 16)
        concurrency = (round(lo / per_request, 2), round(hi / per_request, 2))
    return {
        "blocks_range": (lo, hi),
        "logged_blocks": want,
        "match": want is None or lo <= want <= hi,
        "concurrency_range": concurrency,
        "logged_concurrency": logged["max_concurrency"],
    }


def predict(case: dict, arch: ArchConfig, sampler: str) -> dict:
    """Check B: the whole plan from the flags, against the logged available memory and tokens."""
    logged = case["logged"]
    quantized = case.get("quantization") is not None
    config = ServeConfig(
        gpu_bytes=int(case["gpu_total_gib"] * GiB),
        tp=case["tp"],
        max_model_len=case["max_model_len"],
        gpu_memory_utilization=case["gpu_memory_utilization"],
        max_num_seqs=256 if case["gpu_total_gib"] < 70 or "A100" in case["gpu"] else 1024,
        max_num_batched_tokens=case["max_num_batched_tokens"] or 2048,
        sampler=sampler,
        weights_bytes=int(logged["model_loading_gib"] * GiB) if quantized else None,
    )
    plan = serve_plan(arch, config)
    got = plan.available_kv_bytes / GiB
    want = logged["available_kv_cache_gib"]
    tokens = logged["kv_cache_tokens"] or (logged["gpu_blocks"] * 16 if logged["gpu_blocks"] else None)
    return {
        "available_gib": round(got, 3),
        "logged_available_gib": want,
        "tokens": plan.kv_cache_tokens,
        "logged_tokens": tokens,
        "error_pct": round(100 * (plan.kv_cache_tokens - tokens) / tokens, 2) if tokens else None,
        "weights_gib": round(plan.weights_bytes / GiB, 3),
        "logged_weights_gib": logged["model_loading_gib"],
        "profile_gib": round(plan.profile_peak_bytes / GiB, 3),
        "logged_rest_gib": round(
            case["gpu_total_gib"] * case["gpu_memory_utilization"] - logged["model_loading_gib"] - want, 3
        ),
    }


def why_not(case: dict) -> str | None:
    """The reason check B does not cover ``case``, or None."""
    if "MoE" in case["model"]:
        return WHY_NOT["moe"]
    if case["engine"].startswith("v0"):
        return WHY_NOT["v0"]
    if case["gpu_memory_utilization"] is None:
        return WHY_NOT["util"]
    if case["gpu_total_gib"] is None:
        return WHY_NOT["gpu"]
    return None


def run() -> list[dict]:
    cases = json.loads((HERE / "cases.json").read_text())["cases"]
    rows = []
    for case in cases:
        arch = _arch(case)
        row = {
            "case": case["citation"],
            "model": case["model"],
            "gpu": case["gpu"],
            "version": case["vllm_version"],
            "util": case["gpu_memory_utilization"],
        }
        row["A"] = arithmetic(case, arch) if arch else None
        reason = why_not(case) or (
            None if arch else WHY_NOT["moe"] if "MoE" in case["model"] else "model shapes not here"
        )
        row["B_skipped"] = reason
        if reason is None:
            row["B"] = {s: predict(case, arch, s) for s in ("flashinfer", "native")}
        rows.append(row)
    return rows


def report(rows: list[dict]) -> str:
    out = [
        "# `vramlab serve` against vLLM's logged start-up numbers",
        "",
        "Written by `python bench/vllm/validate.py --write`; the cases, with their sources, are in "
        "`cases.json`, the algorithm in `notes.md` and in `vramlab.serving`'s docstring.",
        "",
        "## A. vLLM's arithmetic, from the logged available memory",
        "",
        "| case | model | blocks from the logged GiB (±0.005) | logged blocks | match |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        a = r["A"]
        if a:
            out.append(
                f"| {r['case'][:70]} | {r['model']} | {a['blocks_range'][0]:,}-{a['blocks_range'][1]:,} | "
                f"{a['logged_blocks'] or '-'} | {'yes' if a['match'] else '**no**'} |"
            )
    out += [
        "",
        "## B. The prediction from the flags (bar: tokens within 3 %)",
        "",
        "| case | model, card, version | sampler | weights GiB (log) | profile + non-torch GiB (log: the rest) "
        "| available GiB (log) | tokens (log) | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for sampler, b in (r.get("B") or {}).items():
            rest = b["profile_gib"] + 0.125
            out.append(
                f"| {r['case'][:50]} | {r['model']}, {r['gpu']}, {r['version']} | {sampler} | "
                f"{b['weights_gib']} ({b['logged_weights_gib']}) | {rest:.3f} ({b['logged_rest_gib']}) | "
                f"{b['available_gib']} ({b['logged_available_gib']}) | {b['tokens']:,} ({b['logged_tokens'] or '-'}) "
                f"| {b['error_pct'] if b['error_pct'] is not None else '-'} % |"
            )
    out += ["", "Not predicted (B), and why:", ""]
    out += [f"- {r['case'][:90]} ({r['model']}): {r['B_skipped']}" for r in rows if r["B_skipped"]]
    return "\n".join(out) + "\n"


def readme_block(rows: list[dict]) -> str:
    """The README's serving rows: each predicted case with the sampler its set-up used."""
    used = {"A100": "flashinfer", "WSL2": "native"}  # FlashInfer on the A100 log; the WSL2 card falls back
    out = [
        "| vLLM log | card, version | utilization | sampler | available KV: ours (log) | tokens: ours (log) | error |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        for key, sampler in used.items():
            if r.get("B") and key in r["gpu"]:
                b = r["B"][sampler]
                out.append(
                    f"| {r['case'].split(' (')[0]} | {r['gpu'].split(' (')[0]}, {r['version'] or 'not logged'} | "
                    f"{r['util']} | {sampler} | "
                    f"{b['available_gib']:.2f} GiB ({b['logged_available_gib']} GiB) | "
                    f"{b['tokens']:,} ({b['logged_tokens']:,}) | {b['error_pct']:+.2f} % |"
                )
    return "\n".join(out)


if __name__ == "__main__":
    rows = run()
    text = report(rows)
    if "--write" in sys.argv:
        (HERE / "validation.md").write_text(text)
        readme = HERE.parents[1] / "README.md"
        head, rest = readme.read_text().split("<!-- vllm -->\n", 1)
        tail = rest.split("<!-- /vllm -->", 1)[1]
        readme.write_text(f"{head}<!-- vllm -->\n{readme_block(rows)}\n<!-- /vllm -->{tail}")
    print(text)
