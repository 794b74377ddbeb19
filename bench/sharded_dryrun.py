"""Benchmark and validation of the sharded dry run (vramlab.sharded), written to sharded_dryrun.md.

1. Speed: Llama-2-70B, one rank of 64 (FSDP2, bf16 policy, checkpointing, batch 1 x 2048), in a
   fresh process: wall time and peak host memory (the bar: under 60 s and 2 GiB).
2. Validation at small size: the fake rank against real gloo ranks of the same step, measured by
   the same tracker (the bar: within 1 %).
3. At full size: PyTorch's FSDPMemTracker around the same fake step, and the difference.

    python bench/sharded_dryrun.py [--write]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPEED = """
import json, resource, sys, time
start = time.perf_counter()
from vramlab.sharded import sharded_dryrun
run = sharded_dryrun("llama-2-70b", gpus=64, batch=1, seq=2048, checkpointing=True, mixed_precision="bf16")
print(json.dumps({"seconds": time.perf_counter() - start, "dry_run_seconds": run.seconds,
                  "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "peak_bytes": run.peak_bytes, "parts": run.parts, "moment": run.peak_moment}))
"""


def speed() -> dict:
    """The 70B / 64-rank dry run in a fresh interpreter (imports included in the time)."""
    out = subprocess.run([sys.executable, "-c", SPEED], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def validation() -> list[dict]:
    """Fake rank against real gloo ranks, for the configurations issue 26 names."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from tiny_archs import SMALL_LLAMA as arch
    from vramlab.distributed import launch
    from vramlab.setups import Setup
    from vramlab.sharded import real_rank, sharded_dryrun

    rows = []
    for sharding in (
        dict(gpus=2),
        dict(gpus=2, reshard_after_forward=False),
        dict(gpus=2, mixed_precision="bf16"),
        dict(gpus=2, tp=2),
        dict(gpus=4, tp=2, mixed_precision="bf16"),
    ):
        for checkpointing in (False, True):
            setup = Setup(batch=2, seq=64, checkpointing=checkpointing)
            fake = sharded_dryrun(arch, setup, **sharding)
            real = launch(real_rank, sharding["gpus"], args=(arch, setup, sharding), timeout_s=600)
            worst = max(r["peak_bytes"] for r in real)
            rows.append(
                {
                    "sharding": sharding,
                    "checkpointing": checkpointing,
                    "fake": fake.peak_bytes,
                    "real": [r["peak_bytes"] for r in real],
                    "error": (fake.peak_bytes - worst) / worst,
                }
            )
    return rows


def against_fsdp_mem_tracker(model: str, gpus: int) -> dict:
    """PyTorch's FSDPMemTracker around the same fake steps (bf16 policy, checkpointing, batch 1
    x 2048): its peak of the second step, by its categories, beside the dry run's."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    from vramlab import sharded

    plain = sharded._step
    seen: list = []

    def step(net, opt, ids, rec, active, timeline):  # noqa: ANN001, ANN202
        mem = FSDPMemTracker(net, opt)
        mem.track_inputs((ids,))
        with mem:
            out = plain(net, opt, ids, rec, active, timeline)
        peak = next(iter(mem.get_tracker_snapshot("peak").values()))
        seen.append({str(k).split(".")[-1]: v for k, v in peak.items()})
        return out

    sharded._step = step
    try:
        ours = sharded.sharded_dryrun(model, gpus=gpus, batch=1, seq=2048, checkpointing=True, mixed_precision="bf16")
    finally:
        sharded._step = plain
    return {"model": model, "gpus": gpus, "ours": ours.peak_bytes, "moment": ours.peak_moment, "theirs": seen[1]}


def report(fast: dict, rows: list[dict], mem: list[dict]) -> str:
    gib = 2**30
    lines = [
        "# The sharded dry run: speed and validation",
        "",
        f"Made by `python bench/sharded_dryrun.py --write` on this machine's CPU ({time.strftime('%Y-%m-%d')}).",
        "",
        "## Speed: Llama-2-70B, one rank of 64",
        "",
        "FSDP2 with the bf16 policy, activation checkpointing, batch 1 x 2048, two steps (the second reported),",
        "in a fresh interpreter (imports included).",
        "",
        f"- wall time: {fast['seconds']:.1f} s (the dry run itself {fast['dry_run_seconds']:.1f} s); bar: 60 s",
        f"- peak host memory (max RSS): {fast['max_rss'] / gib:.2f} GiB; bar: 2 GiB",
        f"- the rank's steady-state peak: {fast['peak_bytes'] / gib:.2f} GiB, at {fast['moment']}",
        "- " + ", ".join(f"{k} {v / gib:.2f} GiB" for k, v in fast["parts"].items()),
        "",
        "## Validation: a fake rank against real gloo ranks",
        "",
        "A 3-block Llama (hidden 128, 1001-row vocabulary, so rank 0 holds one row more), batch 2 x 64,",
        "AdamW; the same step on real ranks over gloo, each measured by the same storage tracker.",
        "",
        "| sharding | checkpointing | fake rank 0 (bytes) | real ranks (bytes) | error vs the worst rank |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        real = ", ".join(f"{b:,}" for b in row["real"])
        lines.append(f"| {row['sharding']} | {row['checkpointing']} | {row['fake']:,} | {real} | {row['error']:+.3%} |")
    worst = max(abs(r["error"]) for r in rows)
    lines += [
        "",
        f"Largest error: {worst:.3%} (bar: 1 %).",
        "",
        "## At full size: PyTorch's FSDPMemTracker",
        "",
        "FSDPMemTracker (`torch.distributed._tools.fsdp2_mem_tracker`) wrapped around the same fake steps",
        "(bf16 policy, checkpointing, batch 1 x 2048); the second step's peak, one rank:",
        "",
        "| model | ranks | vramlab's dry run | its moment | FSDPMemTracker | difference | "
        "FSDPMemTracker's categories at its peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in mem:
        theirs = row["theirs"]
        parts = ", ".join(f"{k} {v / gib:.2f} GiB" for k, v in theirs.items() if k != "Total" and v >= 2**20)
        lines.append(
            f"| {row['model']} | {row['gpus']} | {row['ours'] / gib:.3f} GiB | {row['moment']} | "
            f"{theirs['Total'] / gib:.3f} GiB | {(theirs['Total'] - row['ours']) / row['ours']:+.3%} | {parts} |"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    import torch

    torch.set_num_threads(1)
    fast = speed()
    print(f"70B on 64 fake ranks: {fast['seconds']:.1f} s, {fast['max_rss'] / 2**30:.2f} GiB max RSS", flush=True)
    rows = validation()
    print(f"validation: largest error {max(abs(r['error']) for r in rows):.3%}", flush=True)
    mem = [against_fsdp_mem_tracker("llama-2-7b", 8), against_fsdp_mem_tracker("llama-2-70b", 64)]
    for row in mem:
        print(f"FSDPMemTracker, {row['model']}: {row['theirs']['Total']:,} against {row['ours']:,}", flush=True)
    text = report(fast, rows, mem)
    if "--write" in sys.argv:
        (HERE / "sharded_dryrun.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
