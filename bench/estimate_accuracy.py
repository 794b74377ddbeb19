"""How close is the closed-form estimate to the dry run? And what does a 7B dry run cost?

    python bench/estimate_accuracy.py            # prints a Markdown table
    python bench/estimate_accuracy.py --write    # also writes bench/estimate_accuracy.md and the README's copy
                                                 # (between <!-- bench --> and <!-- /bench -->); `make bench`

For each configuration it prints the formula's peak, the dry run's peak and the relative
error; training peaks are the steady state (the second step, with the optimizer state alive
throughout), and the first step's peaks follow in two more columns. Then the worst training
and inference errors, checked against the targets (training within 3 %, inference within
2 %, first steps included). It ends with the time and peak RSS of a Llama-2-7B dry run (two
steps) in a fresh process (target: under 10 s and 1 GiB). Exits 1 if a target is missed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from vramlab import dryrun, estimate, get_arch
from vramlab.estimate import linear_shapes, param_count
from vramlab.models import load_config
from vramlab.units import format_bytes

LLAMA7 = get_arch("llama-2-7b")
GRID: list[tuple[object, dict]] = [
    ("llama-2-7b", dict(batch=1, seq=4096, recipe="amp-bf16", optimizer="adamw")),
    ("llama-2-7b", dict(batch=4, seq=4096, recipe="amp-bf16", optimizer="adamw")),
    ("llama-2-7b", dict(batch=4, seq=4096, recipe="amp-bf16", optimizer="adamw-fused")),
    ("llama-3-8b", dict(batch=1, seq=16384, recipe="amp-bf16", optimizer="adamw-fused", checkpointing=True)),
    ("llama-2-7b", dict(batch=4, seq=4096, recipe="amp-bf16", optimizer="adamw", offload=True)),
    ("llama-2-7b", dict(batch=1, seq=2048, recipe="bf16", optimizer="adamw", offload=True)),
    ("llama-2-7b", dict(batch=1, seq=2048, recipe="bf16", optimizer="adamw")),
    (LLAMA7.with_(name="llama-2-7b/4 layers", num_layers=4), dict(batch=4, seq=2048, recipe="bf16", optimizer="sgd")),
    (
        LLAMA7.with_(name="llama-2-7b/4 layers", num_layers=4),
        dict(batch=8, seq=2048, recipe="amp-bf16", optimizer="sgd", checkpointing=True),
    ),
    (
        LLAMA7.with_(name="llama-2-7b/2 layers", num_layers=2),
        dict(batch=2, seq=1024, recipe="fp32", optimizer="sgd", attention="eager"),
    ),
    ("llama-3-8b", dict(batch=1, seq=8192, recipe="amp-bf16", optimizer="adamw", checkpointing=True)),
    (
        get_arch("llama-3-8b").with_(name="llama-3-8b/2 layers", num_layers=2),
        dict(batch=2, seq=4096, recipe="amp-fp16", optimizer="sgd-momentum"),
    ),
    ("mistral-7b", dict(batch=2, seq=4096, recipe="bf16", optimizer="sgd", checkpointing=True)),
    ("qwen2.5-0.5b", dict(batch=4, seq=2048, recipe="amp-bf16", optimizer="adamw")),
    ("qwen2.5-0.5b", dict(batch=1, seq=256, recipe="amp-bf16", optimizer="sgd")),
    ("qwen2.5-1.5b", dict(batch=2, seq=2048, recipe="bf16", optimizer="adam", checkpointing=True)),
    ("gpt2", dict(batch=8, seq=1024, recipe="fp32", optimizer="adamw")),
    ("gpt2", dict(batch=16, seq=1024, recipe="amp-bf16", optimizer="adamw", checkpointing=True)),
    ("gpt2", dict(batch=8, seq=1024, recipe="fp32", optimizer="adamw", offload=True)),
    ("gpt2-medium", dict(batch=4, seq=1024, recipe="amp-fp16", optimizer="sgd-momentum", attention="eager")),
    ("gpt2-large", dict(batch=2, seq=512, recipe="fp32", optimizer="sgd")),
    ("gpt2-xl", dict(batch=1, seq=1024, recipe="bf16", optimizer="adamw")),
    ("llama-2-7b", dict(batch=1, seq=4096, recipe="bf16", inference=True)),
    ("llama-2-7b", dict(batch=8, seq=4096, recipe="fp32", inference=True)),
    ("llama-2-13b", dict(batch=4, seq=4096, recipe="amp-bf16", inference=True)),
    ("llama-3-8b", dict(batch=16, seq=8192, recipe="bf16", inference=True)),
    ("llama-3-8b", dict(batch=1, seq=32768, recipe="bf16", inference=True)),
    ("mistral-7b", dict(batch=32, seq=4096, recipe="bf16", inference=True)),
    ("qwen2.5-0.5b", dict(batch=8, seq=4096, recipe="bf16", inference=True)),
    ("gpt2", dict(batch=32, seq=1024, recipe="amp-bf16", inference=True)),
    ("gpt2-xl", dict(batch=8, seq=1024, recipe="fp32", inference=True)),
]
TARGETS = {"training": 0.03, "inference": 0.02}


def describe(setup: dict) -> str:
    parts = [f"b={setup['batch']}", f"s={setup['seq']}", setup["recipe"]]
    if not setup.get("inference"):
        parts.append(setup["optimizer"])
    if setup.get("checkpointing"):
        parts.append("ckpt")
    if setup.get("attention") == "eager":
        parts.append("eager")
    if setup.get("offload"):
        parts.append("offload")
    return " ".join(parts)


def cost_of_7b_dry_run() -> tuple[float, float]:
    """Seconds and peak RSS (MiB) of a Llama-2-7B training-step dry run in a fresh process."""
    code = (
        "import json, resource, time; t = time.time(); import vramlab; "
        "vramlab.dryrun('llama-2-7b', batch=1, seq=4096, recipe='amp-bf16'); "
        "print(json.dumps([time.time() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    seconds, rss_mib = json.loads(out.strip().splitlines()[-1])
    return seconds, rss_mib


def main() -> int:
    out("| model | set-up | kind | formula | dry run | error | first step: formula | dry run | error |")
    out("|---|---|---|---:|---:|---:|---:|---:|---:|")
    worst = {"training": 0.0, "inference": 0.0}
    for model, setup in GRID:
        kind = "inference" if setup.get("inference") else "training"
        est, dry = estimate(model, **setup), dryrun(model, **setup)
        DRY[(str(model), describe(setup))] = dry.peak_bytes
        err = abs(est.peak_bytes - dry.peak_bytes) / dry.peak_bytes
        first = "| – | – | – |"
        if kind == "training":
            first_err = abs(est.first_step_peak_bytes - dry.first_step_peak_bytes) / dry.first_step_peak_bytes
            worst[kind] = max(worst[kind], first_err)
            first = (
                f"| {format_bytes(est.first_step_peak_bytes)} | {format_bytes(dry.first_step_peak_bytes)} "
                f"| {first_err:.2%} |"
            )
        worst[kind] = max(worst[kind], err)
        name = model if isinstance(model, str) else model.name
        out(
            f"| {name} | {describe(setup)} | {kind} | {format_bytes(est.peak_bytes)} "
            f"| {format_bytes(dry.peak_bytes)} | {err:.2%} {first}"
        )
    out()
    peers()
    out()
    ok = families()
    out()
    out(f"families without a formula: every dry run under 20 s ({'met' if ok else 'MISSED'})")
    for kind, target in TARGETS.items():
        met = worst[kind] <= target
        ok &= met
        out(f"worst {kind} error: {worst[kind]:.2%} (target {target:.0%}: {'met' if met else 'MISSED'})")
    seconds, rss = cost_of_7b_dry_run()
    met = seconds < 10 and rss < 1024
    ok &= met
    out(
        f"Llama-2-7B training-step dry run: {seconds:.1f} s, peak RSS {rss:.0f} MiB, imports included "
        f"(target under 10 s and 1 GiB: {'met' if met else 'MISSED'})"
    )
    return 0 if ok else 1


def peer_bytes(model: object, setup: dict) -> dict[str, int | None]:
    """What other estimators answer for one GPU, from their published formulas: accelerate's
    memory utility (training with Adam: the largest of model, gradients, optimizer and step,
    16 B/param in fp32 and 8 in mixed precision), DeepSpeed's model-state estimators (ZeRO-2:
    4·P + 16·P/GPUs, or 2·P with the optimizer offloaded; ZeRO-3: 4·largest layer + 18·P/GPUs,
    or + 2·P/GPUs offloaded), and the 16/18/20 bytes-per-parameter rules. None counts
    activations; None (shown "–") where an estimator has no answer for offloading."""
    arch = get_arch(model)
    p = param_count(arch)
    largest = max([arch.vocab_size * arch.hidden_size] + [o * i for o, i in linear_shapes(arch).values()])
    offload = bool(setup.get("offload"))
    return {
        "accelerate": None if offload else (16 if setup["recipe"] == "fp32" else 8) * p,
        "DeepSpeed ZeRO-2": 2 * p if offload else 4 * p + 16 * p,
        "DeepSpeed ZeRO-3": 4 * largest + (2 if offload else 18) * p,
        "16 B/param": None if offload else 16 * p,
        "18 B/param": None if offload else 18 * p,
        "20 B/param": None if offload else 20 * p,
    }


def families() -> bool:
    """Model types without a formula, at their published sizes (bench/configs: the shape fields
    of each repository's config.json), by dry run of transformers' own class: training at
    batch 1 x 2048 (amp-bf16; pure bf16 for the mixture of experts), each under 20 s."""
    out("| model | model_type | parameters (active) | set-up | dry run | first step | attention | seconds |")
    out("|---|---|---:|---|---:|---:|---|---:|")
    ok = True
    for path in sorted((ROOT / "bench" / "configs").glob("*.json")):
        model = load_config(path)
        setup = dict(batch=1, seq=2048, recipe="bf16" if "mixtral" in path.stem else "amp-bf16", optimizer="adamw")
        start = time.time()
        result = dryrun(model, **setup)
        seconds = time.time() - start
        ok &= seconds < 20
        active = result.details.get("active_params")
        count = f"{result.params / 1e9:.2f}B" + (f" ({active / 1e9:.2f}B)" if active else "")
        note = result.details["attention"]
        attention = note.split(" (")[0] + (
            ", no mask" if "no mask" in note else ", own code" if "own attention code" in note else ""
        )
        out(
            f"| {model.name} | {model.model_type} | {count} | {describe(setup)} | {format_bytes(result.peak_bytes)} "
            f"| {format_bytes(result.first_step_peak_bytes)} | {attention} | {seconds:.1f} |"
        )
    return ok


def signed(error: float) -> str:
    """A relative error as a signed whole percentage ("0 %" when it rounds to nothing)."""
    return "0%" if abs(error) < 0.005 else f"{error:+.0%}"


def peers() -> None:
    """The same training set-ups (Adam-family optimizers), one GPU: the dry run, vramlab's
    formula and the peers' answers, each with its error against the dry run."""
    rows = [(m, s) for m, s in GRID if not s.get("inference") and s["optimizer"].startswith("adam")]
    names = ["vramlab estimate", *peer_bytes(*rows[0])]
    out("| model | set-up | dry run | " + " | ".join(names) + " |")
    out("|---|---|---:|" + "---:|" * len(names))
    for model, setup in rows:
        dry = DRY[(str(model), describe(setup))]
        answers = {"vramlab estimate": estimate(model, **setup).peak_bytes, **peer_bytes(model, setup)}
        cells = " | ".join(
            "–" if v is None else f"{format_bytes(v)} ({signed((v - dry) / dry)})" for v in answers.values()
        )
        name = model if isinstance(model, str) else model.name
        out(f"| {name} | {describe(setup)} | {format_bytes(dry)} | {cells} |")


LINES: list[str] = []
DRY: dict[tuple[str, str], int] = {}  # steady-state dry-run peaks of the accuracy table, for the peer table
ROOT = Path(__file__).resolve().parents[1]


def out(line: str = "") -> None:
    """Print a line of the report and keep it for --write."""
    print(line)
    LINES.append(line)


def write() -> None:
    """The report to bench/estimate_accuracy.md; its table and summary into the README."""
    (ROOT / "bench" / "estimate_accuracy.md").write_text("\n".join(LINES) + "\n")
    body = [line if line.startswith("|") or not line else "- " + line for line in LINES[:-1]]  # not the run time
    block = "\n".join(["<!-- bench -->", *body, "<!-- /bench -->"])
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index("<!-- bench -->"), readme.index("<!-- /bench -->") + len("<!-- /bench -->")
    (ROOT / "README.md").write_text(readme[:start] + block + readme[end:])


if __name__ == "__main__":
    start = time.time()
    code = main()
    out(f"(bench ran in {time.time() - start:.0f} s)")
    if "--write" in sys.argv[1:]:
        write()
    raise SystemExit(code)
