"""The ``vramlab`` command: quick answers outside notebooks.

    vramlab models
    vramlab estimate llama-2-7b --batch 1 --seq 4096 --recipe amp-bf16 [--json]
    vramlab dryrun   llama-2-7b --batch 1 --seq 4096 --recipe amp-bf16 [--json]
    vramlab fit      llama-2-7b --gpu 80GiB --seq 2048 --recipe amp-bf16 [--json]

``--inference`` means a prefill of ``--seq`` tokens per sequence that builds the KV cache,
under ``torch.inference_mode``; without it, one full training step (forward, backward,
optimizer step). Bad arguments print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, NoReturn

from .models import REGISTRY, get_arch, load_config
from .recipes import OPTIMIZERS, RECIPES
from .results import ROLES
from .setups import ATTENTIONS, Setup
from .units import format_bytes


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"vramlab: error: {message} (see 'vramlab --help')\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vramlab", description="Estimate and measure the memory of LLM training and inference.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("models", help="list the architectures in the registry")
    for name, text in (
        ("estimate", "closed-form estimate (instant)"),
        ("dryrun", "exact allocation trace on fake tensors"),
        ("fit", "the largest batch that fits a GPU (formula), or the first recipe that does"),
    ):
        cmd = sub.add_parser(name, help=text)
        if name == "fit":
            cmd.add_argument("--gpu", required=True, help="the card's memory, e.g. 24GiB or 80GB (1 GB = 10^9 bytes)")
        cmd.add_argument("model", nargs="?", help=f"a registry name: {', '.join(REGISTRY)}")
        cmd.add_argument("--config", help="a Hugging Face config.json instead of a registry name")
        cmd.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
        cmd.add_argument("--seq", type=int, default=1024, help="tokens per sequence (default 1024)")
        cmd.add_argument("--recipe", choices=RECIPES, default="fp32", help="precision recipe (default fp32)")
        cmd.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="optimizer (default adamw)")
        cmd.add_argument("--attention", choices=ATTENTIONS, default="sdpa", help="attention implementation")
        cmd.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
        cmd.add_argument(
            "--inference", action="store_true", help="a prefill that builds the KV cache, not a training step"
        )
        cmd.add_argument(
            "--keep-outputs",
            action="store_true",
            help="training: the loop keeps `outputs = model(...)` (its logits) until the next step",
        )
        cmd.add_argument(
            "--full-logits", action="store_true", help="inference: logits at every position (a plain forward)"
        )
        cmd.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _arch(args: argparse.Namespace) -> Any:
    if args.config and args.model:
        raise ValueError("give a model name or --config, not both")
    if args.config:
        return load_config(args.config)
    if not args.model:
        raise ValueError("name a model (see 'vramlab models') or pass --config config.json")
    return get_arch(args.model)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    arch = _arch(args)
    setup = Setup(
        batch=args.batch,
        seq=args.seq,
        recipe=args.recipe,
        optimizer=args.optimizer,
        checkpointing=args.checkpointing,
        inference=args.inference,
        attention=args.attention,
        keep_outputs=args.keep_outputs,
        full_logits=args.full_logits,
    )
    if args.command == "estimate":
        from .estimate import estimate

        return estimate(arch, setup).to_json()
    if args.command == "fit":
        from .fit import largest_batch
        from .units import parse_bytes

        return {"text": str(fit := largest_batch(arch, parse_bytes(args.gpu), setup)), **fit.to_json()}
    from .dryrun import dryrun

    return dryrun(arch, setup).to_json()


def _table(obj: dict[str, Any]) -> str:
    setup = Setup(**obj["setup"])
    lines = [
        f"{obj['model']}: {obj['params']:,} parameters; {setup.describe()}",
        f"source: {obj['source']}" + (f" (peak at: {obj['peak_moment']})" if "peak_moment" in obj else ""),
    ]
    for role in ROLES:
        lines.append(f"  {role:<12}{format_bytes(obj['breakdown'][role]):>14}")
    lines.append(
        f"  {'peak':<12}{format_bytes(obj['peak_bytes']):>14}   ({obj['peak_bytes']:,} bytes; 1 GiB = 1024^3 bytes)"
    )
    if obj.get("details", {}).get("model_type"):
        from .anymodel import describe

        lines.insert(2, "  " + describe(obj["details"]))
    if obj.get("first_step_peak_bytes"):
        lines.append(
            f"  steady state: every step after the first, with the optimizer state alive throughout; "
            f"the first step peaks at {format_bytes(obj['first_step_peak_bytes'])}"
        )
    if setup.optimizer == "adamw" and not setup.inference:
        lines.append(
            "  adamw is foreach, what torch.optim.AdamW runs on CUDA by default; the Hugging Face Trainer "
            "uses the fused step: --optimizer adamw-fused"
        )
    return "\n".join(lines)


def _models() -> str:
    from .estimate import param_count

    lines = [f"{'name':<14}{'family':<9}{'params':>16}  {'layers':>6} {'hidden':>6} {'heads':>5} {'kv':>3}  source"]
    for arch in REGISTRY.values():
        lines.append(
            f"{arch.name:<14}{arch.family:<9}{param_count(arch):>16,}  {arch.num_layers:>6} {arch.hidden_size:>6} "
            f"{arch.num_heads:>5} {arch.num_kv_heads:>3}  {arch.source}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vramlab`` command; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "models":
            print(_models())
            return 0
        obj = _run(args)
    except (ValueError, KeyError, FileNotFoundError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"vramlab: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vramlab: interrupted", file=sys.stderr)
        return 130
    text = obj.pop("text", None)
    print(json.dumps(obj, indent=2) if args.json else text or _table(obj))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
