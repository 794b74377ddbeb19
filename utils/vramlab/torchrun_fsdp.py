"""FSDP2 training of TinyGPT as practitioners launch it: one process per rank, started by
``torchrun``, each reporting its own memory as one JSON line.

    torchrun --nproc-per-node 2 -m vramlab.torchrun_fsdp --init meta
    python -m torch.distributed.run --nproc-per-node 2 -m vramlab.torchrun_fsdp --init full

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
``init_process_group`` reads them. Each rank wraps every block and then the root in
``fully_shard`` (chapter 14) and trains two steps. ``--init`` chooses how the model is created:

- ``full``: built with real weights on every rank, then sharded. For a moment every rank holds
  the whole model: with a 70B model that is the host-RAM crash before training starts.
- ``meta``: built on the ``meta`` device (shapes, no storage), sharded, then ``to_empty`` gives
  each rank storage for its own shards only, and the weights are initialised in place. No rank
  ever holds more than its shard.

``--prefetch N`` asks FSDP2 to all-gather the next N blocks ahead in forward and backward
(``set_modules_to_forward_prefetch``/``set_modules_to_backward_prefetch``; by default it
prefetches one): more communication hidden behind compute, and N more gathered blocks alive.
``--checkpoint DIR`` saves the trained shards with PyTorch's distributed checkpoint
(``torch.distributed.checkpoint``: every rank writes only its own shards), loads them into a
second model created on the meta device, and checks that it computes the same loss.

Printed per rank (bytes): ``init_peak_bytes`` (the largest live tensor memory while the model
was created and sharded), ``param_bytes`` (its shards afterwards) and ``step_peak_bytes`` (the
second step's peak, the steady state), plus the two steps' losses, and with ``--checkpoint``
``reloaded_loss`` and ``checkpoint_peak_bytes`` (the largest live tensor memory while saving
and loading).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from .gpt import GPTConfig, TinyGPT, pattern_batch
from .measure import measure
from .storages import storage_bytes

INITS = ("full", "meta")


def build_sharded(cfg: GPTConfig, init: str, device: torch.device) -> nn.Module:
    """TinyGPT with every block and the root under ``fully_shard``, created as ``init`` says."""
    from torch.distributed.fsdp import fully_shard

    from .parallel import LossModel

    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
    with torch.device("meta" if init == "meta" else device):
        model = LossModel(TinyGPT(cfg))
    for block in model.gpt.blocks:
        fully_shard(block)
    fully_shard(model)
    if init == "meta":
        model.to_empty(device=device)  # storage for this rank's shards only
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.LayerNorm):
                    module.reset_parameters()
            model.gpt.apply(TinyGPT._init_weights)
    return model


def prefetch(model: nn.Module, ahead: int) -> None:
    """All-gather the next ``ahead`` blocks while one runs, in forward and in backward."""
    blocks = list(model.gpt.blocks)
    for i, block in enumerate(blocks):
        block.set_modules_to_forward_prefetch(blocks[i + 1 : i + 1 + ahead])
        block.set_modules_to_backward_prefetch(blocks[max(0, i - ahead) : i][::-1])


def save_and_reload(model: nn.Module, cfg: GPTConfig, device: torch.device, folder: str, batch: torch.Tensor) -> dict:
    """Save ``model``'s shards with torch.distributed.checkpoint, load them into a model created
    on the meta device, and return the reloaded model's loss and the peak while doing it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    with measure() as m:
        dcp.save(get_model_state_dict(model), checkpoint_id=folder)
        fresh = build_sharded(cfg, "meta", device)
        state = get_model_state_dict(fresh)
        dcp.load(state, checkpoint_id=folder)
        set_model_state_dict(fresh, state)
    with torch.no_grad():
        return {
            "reloaded_loss": fresh(batch).item(),
            "trained_loss": model(batch).item(),
            "checkpoint_peak_bytes": m.peak_bytes,
        }


def main(argv: list[str] | None = None) -> int:
    """Run on one rank under ``torchrun``; print this rank's JSON line; return 0."""
    parser = argparse.ArgumentParser(prog="torchrun ... -m vramlab.torchrun_fsdp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", choices=INITS, default="meta")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--prefetch", type=int, default=0, help="blocks to all-gather ahead (0: FSDP2's default)")
    parser.add_argument("--checkpoint", default=None, help="a folder for a distributed checkpoint save and load")
    args = parser.parse_args(argv)
    if args.layers < 1 or args.hidden < 4 or args.hidden % 4:
        parser.error("--layers must be at least 1 and --hidden a positive multiple of 4 (the model has 4 heads)")
    if not 0 <= args.prefetch < args.layers:
        parser.error(f"--prefetch must be between 0 and layers - 1 ({args.layers - 1})")
    if "RANK" not in os.environ:
        parser.error(
            "run me under torchrun (it sets RANK and WORLD_SIZE): torchrun --nproc-per-node 2 -m vramlab.torchrun_fsdp"
        )
    local = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= local_world  # a GPU per rank, or none
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        cfg = GPTConfig(vocab_size=256, seq_len=33, hidden=args.hidden, layers=args.layers, heads=4)
        torch.manual_seed(0)
        with measure() as created:
            model = build_sharded(cfg, args.init, device)
        if args.prefetch:
            prefetch(model, args.prefetch)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        batch = pattern_batch(cfg, 2).to(device)
        losses, peaks = [], []
        for _ in range(2):
            with measure(model, opt, batch) as step:
                loss = model(batch)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            peaks.append(step.peak_bytes)
        report = {
            "rank": dist.get_rank(),
            "world_size": dist.get_world_size(),
            "init": args.init,
            "full_param_bytes": 4 * cfg.params,
            "init_peak_bytes": created.peak_bytes,
            "param_bytes": storage_bytes(list(model.parameters())),
            "step_peak_bytes": peaks[-1],
            "losses": losses,
        }
        if args.checkpoint:
            report.update(save_and_reload(model, cfg, device, args.checkpoint, batch))
        sys.stdout.flush()  # the ranks share one pipe: the line goes out in one write, which a pipe keeps whole
        os.write(sys.stdout.fileno(), (json.dumps(report) + "\n").encode())
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
