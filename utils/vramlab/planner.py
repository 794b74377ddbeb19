"""Which recipe first fits a training job on a given GPU, and on how many: a decision guide.

The ladder, cheapest first (each rung adds to the one before), all with torch's AdamW:

1. bf16 mixed precision (amp-bf16) on one device;
2. + activation checkpointing;
3. FSDP2 over 2, 4, ... 64 devices, with activation checkpointing and FSDP2's bf16
   ``MixedPrecisionPolicy`` (fp32 shards, bf16 compute, fp32 gradient reduction);
4. the same with 8-way tensor parallelism inside each node of 8, over 8, 16, ... 512 devices.

8-bit AdamW is not a rung: bitsandbytes' step cannot run on fake tensors, and the guide calls a
plan a fit only when a dry run of that exact step says so (chapter 15 shows what 8-bit state
would change, by formula, beside the plans).

Each rung's per-device peak comes from ``peaks``:

- ``"dry-run"`` (the default): dry runs of the real step (:func:`vramlab.dryrun.dryrun` on one
  device, :func:`vramlab.sharded.sharded_dryrun` for one rank of the sharded rungs: steady
  state, gathered blocks and gradient buffers included). The guide's own set-ups (batch
  1, sequence 2048, the Llama-2 models) are read from a table the dry runs wrote
  (``data/plan_peaks.json``, rewritten by ``python -m vramlab.planner --write``); any other
  set-up is dry-run on the spot (seconds to a minute per rung).
- ``"formula"``: every rung from vramlab's formulas (:func:`zero3_terms` for the sharded
  ones), instant and torch-free.

A :class:`Plan` says which source gave its number.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from importlib import resources
from typing import Any

from .estimate import (
    activation_bytes,
    block_backward_bytes,
    estimate,
    linear_shapes,
    optimizer_state_bytes,
    param_count,
    zero_bytes_per_rank,
)
from .hardware import CONTEXT_HEADROOM, SIZE_CLASSES, fits
from .models import ArchConfig, get_arch

DEVICE_SIZES = SIZE_CLASSES  # the guide's columns, from the one table of GPUs (vramlab.hardware)
MAX_DEVICES = 64
TENSOR_PARALLEL = 8  # one node of 8 GPUs: tensor parallelism needs NVLink-class links
MAX_DEVICES_WITH_TP = 512


PEAKS = ("dry-run", "formula")
GUIDE_MODELS = ("llama-2-7b", "llama-2-13b", "llama-2-70b")
TABLE = "plan_peaks.json"


@dataclass(frozen=True)
class Plan:
    """The first recipe that fits: its name, how many devices, bytes per device, and the
    source of that number ("dry-run" or "formula")."""

    recipe: str
    devices: int
    bytes_per_device: int
    source: str = "formula"

    def __str__(self) -> str:
        if not self.devices:
            return f"> {MAX_DEVICES_WITH_TP} devices"
        return self.recipe if self.devices == 1 else f"{self.recipe} x{self.devices}"


def rung_key(model: str, devices: int, tensor_parallel: int, batch: int, seq: int, checkpointing: bool) -> str:
    """The table's name for one rung's dry run (``devices`` = 1: the one-device amp-bf16 step)."""
    return f"{model}|devices={devices}|tp={tensor_parallel}|batch={batch}|seq={seq}|checkpointing={int(checkpointing)}"


_table_cache: dict[str, dict[str, Any]] | None = None
_computed: dict[str, dict[str, Any]] = {}


def peak_table() -> dict[str, dict[str, Any]]:
    """The dry-run peaks shipped with vramlab: rung key -> {"peak_bytes", "parts", "moment"}."""
    global _table_cache
    if _table_cache is None:
        text = resources.files("vramlab").joinpath("data", TABLE).read_text()
        _table_cache = json.loads(text)["peaks"]
    return _table_cache


def dry_run_rung(
    model: str, devices: int, batch: int = 1, seq: int = 2048, tensor_parallel: int = 1, checkpointing: bool = True
) -> dict[str, Any]:
    """One rung's dry run, from the table or run now: ``devices`` = 1 is the one-device
    amp-bf16 step; more is one rank of FSDP2 (bf16 policy, AdamW), with ``tensor_parallel``."""
    key = rung_key(model, devices, tensor_parallel, batch, seq, checkpointing)
    found = peak_table().get(key) or _computed.get(key)
    if found is None:
        found = _computed[key] = _run_rung(model, devices, batch, seq, tensor_parallel, checkpointing)
    return found


def _run_rung(model: str, devices: int, batch: int, seq: int, tensor_parallel: int, checkpointing: bool) -> dict:
    if devices == 1:
        from .dryrun import dryrun

        one = dryrun(model, batch=batch, seq=seq, recipe="amp-bf16", checkpointing=checkpointing)
        return {"peak_bytes": one.peak_bytes, "parts": dict(one.breakdown), "moment": "one device"}
    from .sharded import sharded_dryrun

    run = sharded_dryrun(
        model,
        batch=batch,
        seq=seq,
        checkpointing=checkpointing,
        gpus=devices,
        tp=tensor_parallel,
        mixed_precision="bf16",
    )
    return {"peak_bytes": run.peak_bytes, "parts": dict(run.parts), "moment": run.peak_moment}


def zero3_bytes_per_device(
    model: str, devices: int, batch: int, seq: int, tensor_parallel: int = 1, optimizer: str = "adamw"
) -> int:
    """Formula bytes per device of the guide's sharded rungs: the sum of :func:`zero3_terms`
    (see there for what each term holds), an upper bound on the dry run's peak."""
    return sum(zero3_terms(model, devices, batch, seq, tensor_parallel, optimizer).values())


def zero3_terms(
    model: str, devices: int, batch: int, seq: int, tensor_parallel: int = 1, optimizer: str = "adamw"
) -> dict[str, int]:
    """Formula bytes per device of the guide's sharded rungs (FSDP2 with
    ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``, chapter 14's policy:
    fp32 sharded weights, gradients and state; forward and backward on gathered bf16 weights,
    so activations are those of the "bf16" recipe; activation checkpointing per block), by term:

    - ``"sharded states"``: fp32 weights and gradients and the optimizer's state ("adamw": 8
      bytes plus the foreach step's 4 per parameter; "adamw-8bit": about 2, no temporary);
    - ``"checkpointed inputs"``: every block's bf16 input, kept for the backward;
    - ``"one block's activations"``: rebuilt in backward, counted twice for their gradients;
    - ``"gathered weights"``: two blocks' bf16 weights (the current one and the prefetched
      next) plus the prefetched block's all-gather output while it is copied out, and the
      root's (embeddings, LM head, norms) in bf16, which FSDP2 keeps gathered through the step
      (the root's ``reshard_after_forward`` is False);
    - ``"gradient buffers"``: FSDP2's gradient path, the unsharded bf16 gradients and the fp32
      reduce-scatter input they are copied into, for one block (kept alive into the next
      block's backward, ``_fsdp_collectives.foreach_reduce``) and for the root.

    With ``tensor_parallel`` = T, the plan :mod:`vramlab.sharded` runs: each block's linears are
    split T ways (no sequence parallelism), so the blocks' weights are sharded over all
    ``devices`` and their gathered weights and gradient buffers are split T ways, while the
    embeddings, LM head and norms are whole in a TP group and sharded over ``devices / T``, and
    the checkpointed inputs and a block's activations are not split (counted whole).

    Every term is counted at once, an upper bound on the peak, which the tests check against
    the dry run of every rung of the guide; NCCL's own buffers are not counted."""
    arch = get_arch(model)
    kept = activation_bytes(arch, batch, seq, "bf16", checkpointing=True)  # bf16 weights, as the policy runs
    block = sum(o * i for o, i in linear_shapes(arch).values())  # one block's matmul parameters
    params = param_count(arch)
    rest = params - arch.num_layers * block  # embeddings, LM head, norms: whole in a TP group
    state = optimizer_state_bytes(arch, optimizer, "amp-bf16") / params + (4 if optimizer == "adamw" else 0)
    sharded = zero_bytes_per_rank(arch.num_layers * block, devices, 3, 4, 4, state)
    whole = zero_bytes_per_rank(rest, devices // tensor_parallel, 3, 4, 4, state)
    return {
        "sharded states": sum(sharded.values()) + sum(whole.values()),
        "checkpointed inputs": kept,
        "one block's activations": block_backward_bytes(arch, batch, seq, "bf16"),
        "gathered weights": (2 * 2 + 2) * block // tensor_parallel + 2 * rest,
        "gradient buffers": (2 + 4) * block // tensor_parallel + (2 + 4) * rest,
    }


def _model_name(model: str | ArchConfig) -> str:
    return model.name if isinstance(model, ArchConfig) else get_arch(model).name


def first_fit(
    model: str | ArchConfig,
    device_bytes: int,
    batch: int = 1,
    seq: int = 2048,
    headroom: int = CONTEXT_HEADROOM,
    peaks: str = "dry-run",
) -> Plan:
    """Walk the ladder (see the module) and return the first :class:`Plan` whose per-device
    peak fits ``device_bytes`` with ``headroom`` spare; ``peaks`` is "dry-run" or "formula"."""
    if peaks not in PEAKS:
        raise ValueError(f"unknown peaks {peaks!r}; use one of {PEAKS}")
    name = _model_name(model)
    if peaks == "dry-run" and isinstance(model, ArchConfig) and get_arch(name) != model:
        raise ValueError(f"{name} is not the registry's {name}: dry-run plans take registry models")
    for recipe, checkpointing in (("bf16 mixed precision", False), ("+ checkpointing", True)):
        peak = _single(name, batch, seq, checkpointing, peaks)
        if fits(peak, device_bytes, headroom):
            return Plan(recipe, 1, peak, peaks)
    for tp, devices, last, recipe in (
        (1, 2, MAX_DEVICES, "FSDP2 + ckpt"),
        (TENSOR_PARALLEL, TENSOR_PARALLEL, MAX_DEVICES_WITH_TP, f"FSDP2 + {TENSOR_PARALLEL}-way TP + ckpt"),
    ):
        while devices <= last:
            peak = _sharded(name, devices, batch, seq, tp, peaks)
            if fits(peak, device_bytes, headroom):
                return Plan(recipe, devices, peak, peaks)
            devices *= 2
    return Plan("none", 0, 0, peaks)


def _single(model: str, batch: int, seq: int, checkpointing: bool, peaks: str) -> int:
    if peaks == "formula":
        return estimate(model, batch=batch, seq=seq, recipe="amp-bf16", checkpointing=checkpointing).peak_bytes
    return int(dry_run_rung(model, 1, batch, seq, 1, checkpointing)["peak_bytes"])


def _sharded(model: str, devices: int, batch: int, seq: int, tp: int, peaks: str) -> int:
    if peaks == "formula":
        return zero3_bytes_per_device(model, devices, batch, seq, tp)
    return int(dry_run_rung(model, devices, batch, seq, tp)["peak_bytes"])


def tabulated(model: str | ArchConfig, batch: int, seq: int) -> bool:
    """Whether the shipped table holds every dry-run rung of ``model`` at this batch and
    sequence (then a dry-run plan costs no dry run)."""
    if isinstance(model, ArchConfig) and (model.name not in GUIDE_MODELS or get_arch(model.name) != model):
        return False
    name = _model_name(model)
    keys = [rung_key(name, d, tp, batch, seq, True) for m, d, tp in guide_rungs() if m == name]
    keys += [rung_key(name, 1, 1, batch, seq, False)]
    return len(keys) > 1 and all(key in peak_table() for key in keys)


def guide_rungs() -> list[tuple[str, int, int]]:
    """Every (model, devices, tensor_parallel) of the ladder for the guide's models."""
    rungs = []
    for model in GUIDE_MODELS:
        rungs += [(model, 1, 1)]
        rungs += [(model, 2**k, 1) for k in range(1, MAX_DEVICES.bit_length())]
        rungs += [(model, TENSOR_PARALLEL * 2**k, TENSOR_PARALLEL) for k in range(MAX_DEVICES_WITH_TP.bit_length() - 3)]
    return rungs


def write_table(path: str) -> None:
    """Dry-run every rung of the guide (batch 1, sequence 2048) and write the table to ``path``."""
    import time

    import torch
    import transformers

    peaks: dict[str, dict[str, Any]] = {}
    for model, devices, tp in guide_rungs():
        for checkpointing in (False, True) if devices == 1 else (True,):
            start = time.perf_counter()
            key = rung_key(model, devices, tp, 1, 2048, checkpointing)
            peaks[key] = _run_rung(model, devices, 1, 2048, tp, checkpointing)
            print(f"{key}: {peaks[key]['peak_bytes']:,} bytes ({time.perf_counter() - start:.0f} s)", flush=True)
    made = {"torch": torch.__version__, "transformers": transformers.__version__}
    with open(path, "w") as out:
        json.dump({"made_with": made, "peaks": peaks}, out, indent=1, sort_keys=True)
        out.write("\n")


if __name__ == "__main__":
    if sys.argv[1:2] != ["--write"] or len(sys.argv) != 3:
        raise SystemExit("usage: python -m vramlab.planner --write PATH")
    write_table(sys.argv[2])
