"""The ``vramlab`` command: quick answers outside notebooks.

    vramlab models
    vramlab weights  org/model[@revision]   # a checkpoint's stored bytes by dtype (also a file or folder)
    vramlab estimate llama-2-7b --batch 1 --seq 4096 --recipe amp-bf16 [--json]
    vramlab dryrun   llama-2-7b --batch 1 --seq 4096 --recipe amp-bf16 [--json]
    vramlab fit      llama-2-7b --gpu 80GiB --seq 2048 --recipe amp-bf16 [--json]
    vramlab estimate llama-2-7b --recipe amp-bf16 --gpus 8 --zero 3    # + states per GPU
    vramlab dryrun   llama-2-70b --gpus 64 --fsdp --mixed-precision bf16 --checkpointing --seq 2048
    vramlab dryrun   llama-2-70b --gpus 64 --fsdp --tp 8 --reshard-after-forward false
    vramlab estimate llama-2-7b --qlora 16 --checkpointing             # QLoRA fine-tuning
    vramlab dryrun   --config any/config.json                          # any transformers causal LM
    vramlab dryrun   llama-2-7b --recipe bf16 --lora 16                # LoRA fine-tuning
    vramlab estimate llama-2-7b --recipe amp-bf16 --offload            # AdamW state in host memory
    vramlab serve    llama-3-8b --gpu H100 --max-model-len 8192          # vLLM's KV cache and concurrency

``--inference`` means a prefill of ``--seq`` tokens per sequence that builds the KV cache,
under ``torch.inference_mode``; without it, a training step (forward, backward, optimizer
step) in its steady state: the second step, which every later one repeats, with the first
step's peak beside it. Bad arguments print one line and exit with code 2. ``estimate`` and
``fit`` import no torch.
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
    sub.add_parser("models", help="list the architectures in the registry").add_argument(
        "--json", action="store_true", help="print one JSON list"
    )
    weights = sub.add_parser("weights", help="the bytes a checkpoint stores, by dtype, from its headers")
    weights.add_argument("source", help="a .safetensors, .gguf or index file, a folder, or a Hub id org/model[@rev]")
    weights.add_argument("--timeout", type=float, default=10.0, help="seconds per Hub request (default 10)")
    weights.add_argument("--json", action="store_true", help="print one JSON object")
    _serve_parser(sub)
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
        cmd.add_argument("--recipe", choices=RECIPES, help="precision recipe (default fp32)")
        cmd.add_argument("--optimizer", choices=OPTIMIZERS, help="optimizer (default adamw)")
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
        cmd.add_argument("--gpus", type=int, help="GPUs to shard over (estimate: with --zero; dryrun: with --fsdp)")
        cmd.add_argument(
            "--zero", type=int, choices=(0, 1, 2, 3), help="estimate: ZeRO stage (0 = DDP, 3 = FSDP) over --gpus"
        )
        cmd.add_argument(
            "--dry-run-peak",
            action="store_true",
            help="estimate --zero 3: also the per-GPU peak of the FSDP2 step, by dry run (seconds to a minute)",
        )
        cmd.add_argument(
            "--fsdp",
            action="store_true",
            help="dryrun: FSDP2 over --gpus ranks: one rank's peak, on a fake process group",
        )
        cmd.add_argument("--tp", type=int, help="dryrun --fsdp: tensor-parallel group size (divides --gpus)")
        cmd.add_argument(
            "--reshard-after-forward",
            choices=("true", "false"),
            help="dryrun --fsdp: free each block's gathered parameters after its forward (default true)",
        )
        cmd.add_argument(
            "--mixed-precision",
            choices=("bf16",),
            help="dryrun --fsdp: FSDP2's MixedPrecisionPolicy, bf16 compute on fp32 shards, fp32 gradient reduction",
        )
        cmd.add_argument("--cpu-offload", action="store_true", help="dryrun --fsdp: FSDP2's CPUOffloadPolicy")
        cmd.add_argument(
            "--qlora", type=int, metavar="RANK", help="estimate: QLoRA fine-tuning with rank-RANK adapters (NF4 base)"
        )
        cmd.add_argument(
            "--lora", type=int, metavar="RANK", help="dryrun: LoRA, rank-RANK fp32 adapters on a frozen base"
        )
        cmd.add_argument(
            "--offload",
            action="store_true",
            help="AdamW state and step in host memory (torchao CPUOffloadOptimizer's defaults)",
        )
        cmd.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _serve_parser(sub: Any) -> None:
    serve = sub.add_parser("serve", help="vLLM's start-up plan: KV cache size in tokens, maximum concurrency")
    serve.add_argument("model", help="a registry name, a checkpoint folder or file, or a Hub id org/model[@rev]")
    serve.add_argument("--gpu", required=True, help="a card (H100, 'A100 80GB', T4) or its total memory (79.22GiB)")
    serve.add_argument("--tp", type=int, default=1, help="--tensor-parallel-size (default 1)")
    serve.add_argument("--gpus", type=int, help="GPUs in all; must equal --tp (pipeline parallelism is not modelled)")
    serve.add_argument("--max-model-len", type=int, help="tokens per request (default: the model's context)")
    serve.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vLLM's fraction (default 0.9)")
    serve.add_argument("--kv-cache-dtype", default="auto", help="auto (the model's dtype) or fp8")
    serve.add_argument("--max-num-seqs", type=int, help="default: vLLM's for the card")
    serve.add_argument("--max-num-batched-tokens", type=int, help="default: vLLM's for the card")
    serve.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    serve.add_argument("--dtype", default="bf16", help="the model's dtype (default bf16)")
    serve.add_argument(
        "--sampler", choices=("flashinfer", "native"), default="flashinfer", help="the sampler of the profile run"
    )
    for flag, what in (
        ("--profile-peak", "'torch peak memory increase' from your vLLM log, e.g. 0.52GiB"),
        ("--non-torch", "'non-torch forward increase memory' from your vLLM log (default 128MiB)"),
        ("--weights", "'Model loading took' from your vLLM log"),
        ("--cuda-graph-memory", "vLLM 0.21+: its 'Estimated CUDA graph memory'"),
    ):
        serve.add_argument(flag, help=what)
    serve.add_argument("--requests", type=int, help="also: the --kv-cache-memory that holds this many requests")
    serve.add_argument("--json", action="store_true", help="print one JSON object")


def _serve(args: argparse.Namespace) -> dict[str, Any]:
    """``vramlab serve``: the plan, with the inverse answers beside it."""
    from .hardware import CUDA_TOTALS, gpu_size
    from .serving import ServeConfig, serve_plan
    from .units import parse_bytes

    if args.gpus is not None and args.gpus != args.tp:
        raise ValueError(
            f"--gpus {args.gpus} with --tp {args.tp}: pipeline parallelism is not modelled; give --gpus equal to --tp"
        )
    total, name = gpu_size(args.gpu)
    total = CUDA_TOTALS.get(name, total)
    sizes = {}
    for key in ("profile_peak", "non_torch", "weights", "cuda_graph_memory"):
        value = getattr(args, key)
        sizes[key] = None if value is None else parse_bytes(value)
    stored = _checkpoint(args)
    arch = _arch_of(args.model, stored)
    if stored is not None and sizes["weights"] is None:
        if args.tp > 1 and stored.quantization:
            raise ValueError(
                f"{stored.source} is quantized ({stored.quantization}): how vLLM splits its packed weights over "
                "--tp is not modelled; give --weights from your vLLM log ('Model loading took')"
            )
        if args.tp == 1:
            sizes["weights"] = stored.total_bytes
    config = ServeConfig(
        gpu_bytes=total,
        tp=args.tp,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_dtype=args.kv_cache_dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        dtype=args.dtype,
        gpu_name=name,
        sampler=args.sampler,
        profile_peak_bytes=sizes["profile_peak"],
        non_torch_bytes=sizes["non_torch"],
        weights_bytes=sizes["weights"],
        cuda_graph_bytes=sizes["cuda_graph_memory"] or 0,
    )
    plan = serve_plan(arch, config, name=args.model)
    if stored is not None and args.tp == 1 and args.weights is None:
        plan.sources["weights"] = "stored bytes of the checkpoint"
    obj = plan.to_json()
    text = str(plan)
    if args.requests is not None:
        obj["kv_cache_memory_bytes"] = memory = plan.kv_cache_memory_for(args.requests)
        text += f"\n  --kv-cache-memory={memory} holds {args.requests} requests of {plan.max_model_len:,} tokens"
    return {"text": text, **obj}


def _checkpoint(args: argparse.Namespace) -> Any:
    """The checkpoint ``args.model`` names (a path here or a Hub id, not a registry name), or None."""
    from pathlib import Path

    from .checkpoints import HUB_ID

    name = args.model
    if not name or name.strip().lower() in REGISTRY or not (Path(name).exists() or HUB_ID.match(name)):
        return None
    from .checkpoints import stored_weights

    return stored_weights(name)


def _arch_of(model: str, stored: Any) -> Any:
    """The shapes of a registry name or of a checkpoint's config.json."""
    if stored is None:
        return get_arch(model)
    if stored.config is None:
        raise ValueError(f"{stored.source}: no config.json beside the weights, so its shapes are unknown")
    from .models import from_hf_config

    return from_hf_config(stored.config, name=stored.source)


def _arch(args: argparse.Namespace, stored: Any = None) -> Any:
    if args.config and args.model:
        raise ValueError("give a model name or --config, not both")
    if args.config:
        return load_config(args.config)
    if not args.model:
        raise ValueError("name a model (see 'vramlab models') or pass --config config.json")
    if stored is not None:
        if stored.quantization and args.command != "estimate":
            raise ValueError(
                f"{stored.source} is quantized ({stored.quantization}): `vramlab estimate --inference` sizes it; "
                f"`{args.command}` builds the unquantized model"
            )
        return _arch_of(args.model, stored)
    return get_arch(args.model)


SHARDING_FLAGS = ("tp", "reshard_after_forward", "mixed_precision")


def _sharded_flags(args: argparse.Namespace) -> None:
    """Refuse the sharding flags where they do not belong, in one line each."""
    given = [f"--{n.replace('_', '-')}" for n in SHARDING_FLAGS if getattr(args, n) is not None]
    given += ["--cpu-offload"] * args.cpu_offload
    if args.command != "dryrun" and (args.fsdp or given):
        flags = ", ".join(["--fsdp"] * args.fsdp + given)
        raise ValueError(
            f"`vramlab {args.command}` does not take {flags}: a sharded dry run does (`vramlab dryrun --fsdp`)"
        )
    if given and not args.fsdp:
        raise ValueError(f"add --fsdp and --gpus N to use {', '.join(given)}, which shape an FSDP2 run")
    if args.fsdp and args.gpus is None:
        raise ValueError("--fsdp needs --gpus N, the number of ranks to shard over")
    if args.dry_run_peak and (args.command != "estimate" or args.zero != 3):
        raise ValueError("--dry-run-peak goes with `vramlab estimate --gpus N --zero 3` (FSDP2 is ZeRO-3)")


def _estimate_only(args: argparse.Namespace) -> None:
    _sharded_flags(args)
    if args.command == "dryrun" and args.fsdp:
        if args.zero is not None or args.qlora is not None:
            raise ValueError("a sharded dry run is FSDP2 (ZeRO-3) by construction; drop --zero and --qlora")
        return
    used = [f"--{name}" for name in ("gpus", "zero", "qlora") if getattr(args, name) is not None]
    if used and args.command != "estimate":
        flags = ", ".join(used)
        raise ValueError(f"{flags} belong to `vramlab estimate` (formulas); `{args.command}` does not take them")
    if (args.gpus is None) != (args.zero is None):
        raise ValueError("give --gpus N and --zero STAGE together (stage 0 is DDP, 3 is FSDP / ZeRO-3)")
    if args.gpus is not None and (args.gpus < 1 or args.inference or args.qlora is not None or args.offload):
        raise ValueError(
            "--gpus must be 1 or more, for a full training step (not --inference, --qlora or --offload: "
            "the offload modelled is torchao's single-GPU CPUOffloadOptimizer)"
        )
    if args.qlora is not None and args.offload:
        raise ValueError("--qlora and --offload together are not modelled; QLoRA's AdamW state is the adapters' only")
    if args.qlora is not None and (args.recipe or args.optimizer or args.inference or args.qlora < 1):
        raise ValueError(
            "--qlora RANK (1 or more) fixes the recipe: NF4 weights, bf16 compute, fp32 AdamW adapters; "
            "drop --recipe, --optimizer and --inference"
        )
    if args.qlora is not None and (
        args.attention != "sdpa" or args.keep_outputs or args.full_logits or args.lora is not None
    ):
        raise ValueError(
            "--qlora models SDPA attention and the plain training loop; drop --attention, --keep-outputs, "
            "--full-logits and --lora"
        )
    if args.inference and args.optimizer is not None:
        raise ValueError("--inference measures a prefill, which has no optimizer; drop --optimizer")
    if args.qlora is not None and not args.checkpointing:
        raise ValueError(
            "--qlora models QLoRA with activation checkpointing (--checkpointing), as its recipes train; without "
            "it each adapted linear also keeps an fp32 copy of its input, which the formula does not count"
        )


def _sharded(arch: Any, setup: Setup, gpus: int, stage: int) -> dict[str, Any]:
    from .estimate import activation_bytes, sharded_states_per_gpu

    saved = activation_bytes(arch, setup.batch, setup.seq, setup.recipe, setup.attention, setup.checkpointing)
    return {
        "gpus": gpus,
        "zero": stage,
        "states": sharded_states_per_gpu(arch, setup.recipe, setup.optimizer, gpus, stage),
        "activations_bytes": saved,
    }


def _dry_run_peak(arch: Any, setup: Setup, gpus: int) -> dict[str, Any]:
    """The FSDP2 dry run beside ``estimate --zero 3``: amp-bf16 becomes FSDP2's bf16 policy."""
    from .sharded import sharded_dryrun

    precision = "bf16" if setup.recipe == "amp-bf16" else None
    step = Setup(**{**setup.to_json(), "recipe": "fp32" if precision else setup.recipe})
    return sharded_dryrun(arch, step, gpus=gpus, mixed_precision=precision).to_json()


def _sharded_run(args: argparse.Namespace, arch: Any, setup: Setup) -> dict[str, Any]:
    from .sharded import sharded_dryrun

    result = sharded_dryrun(
        arch,
        setup,
        gpus=args.gpus,
        tp=args.tp or 1,
        reshard_after_forward=args.reshard_after_forward != "false",
        mixed_precision=args.mixed_precision,
        cpu_offload=args.cpu_offload,
    )
    return {"text": str(result), **result.to_json()}


def _run(args: argparse.Namespace) -> dict[str, Any]:
    _estimate_only(args)
    stored = _checkpoint(args)
    arch = _arch(args, stored)
    if args.qlora is not None:
        from .estimate import qlora_estimate

        return qlora_estimate(
            arch, rank=args.qlora, batch=args.batch, seq=args.seq, checkpointing=args.checkpointing
        ).to_json()
    setup = Setup(
        batch=args.batch,
        seq=args.seq,
        recipe=args.recipe or "fp32",
        optimizer=args.optimizer or "adamw",
        checkpointing=args.checkpointing,
        inference=args.inference,
        attention=args.attention,
        keep_outputs=args.keep_outputs,
        full_logits=args.full_logits,
        lora_rank=args.lora or 0,
        offload=args.offload,
    )
    if args.command == "estimate":
        from .estimate import estimate

        if stored is not None:
            from .checkpoints import checkpoint_estimate

            est = checkpoint_estimate(stored, setup)
        else:
            est = estimate(arch, setup)
        out = est.to_json()
        if args.gpus is not None:
            out["per_gpu"] = _sharded(arch, setup, args.gpus, args.zero)
            if args.dry_run_peak:
                out["per_gpu"]["dry_run"] = _dry_run_peak(arch, setup, args.gpus)
        return out
    if args.command == "fit":
        from .fit import largest_batch
        from .units import parse_bytes

        return {"text": str(fit := largest_batch(arch, parse_bytes(args.gpu), setup)), **fit.to_json()}
    if args.fsdp:
        return _sharded_run(args, arch, setup)
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
    if obj.get("details", {}).get("method") == "qlora-nf4":
        rank = obj["details"]["rank"]
        lines.insert(2, f"  QLoRA: NF4 base weights, rank-{rank} LoRA adapters trained in fp32 with AdamW")
        lines.insert(3, "  the 'peak' is what stays resident across a step; the backward's working set comes on top")
    if "stored_bytes" in obj.get("details", {}):
        info = obj["details"]
        lines.insert(
            2, f"  checkpoint: {format_bytes(info['stored_bytes'])} stored; quantization: {info['quantization']}"
        )
        if info["quantization"] != "none":
            lines.insert(3, "  parameters = the stored bytes; activations and KV cache in 16-bit compute")
            if "dequantized_copy_bytes" in info:
                lines.insert(
                    4,
                    f"  other includes the {format_bytes(info['dequantized_copy_bytes'])} bf16 weight "
                    "bitsandbytes dequantizes for a prefill's matmul",
                )
            else:
                lines.insert(4, "  not counted: workspaces of the quantized matmul kernels")
    if obj.get("details", {}).get("model_type"):
        from .anymodel import describe

        lines.insert(2, "  " + describe(obj["details"]))
    if "per_gpu" in obj:
        shard = obj["per_gpu"]
        lines.append(
            f"  per GPU under ZeRO-{shard['zero']} over {shard['gpus']} GPUs (weights + gradients + optimizer state; "
            "activations, gathered blocks and communication buffers not included):"
        )
        names = {
            "pytorch": "PyTorch (ZeroRedundancyOptimizer, FSDP2)",
            "deepspeed": "DeepSpeed (bf16 2+2, fp32 masters)",
        }
        for convention, parts in shard["states"].items():
            total = format_bytes(sum(parts.values()))
            each = ", ".join(f"{k} {format_bytes(v)}" for k, v in parts.items())
            lines.append(f"    {names[convention]:<42}{total:>12}  ({each})")
        lines.append(
            f"    plus the activations this GPU saves at batch {setup.batch}: "
            f"{format_bytes(shard['activations_bytes'])} (ZeRO does not shard them)"
        )
        if "dry_run" in shard:
            run = shard["dry_run"]
            precision = " with bf16 mixed precision" if run["sharding"]["mixed_precision"] else ""
            lines.append(
                f"    the step's peak per GPU, FSDP2{precision} by dry run (gathered blocks and gradient buffers "
                f"included; NCCL's buffers not): {format_bytes(run['peak_bytes'])}, at {run['peak_moment']}"
            )
    if obj.get("first_step_peak_bytes") and setup.offload:
        lines.append(
            "  steady state: every step after the first; the optimizer state is in host memory but for tensors "
            "under 4096 elements, stepped on the GPU; the first step peaks at "
            f"{format_bytes(obj['first_step_peak_bytes'])}"
        )
    elif obj.get("first_step_peak_bytes"):
        lines.append(
            f"  steady state: every step after the first, with the optimizer state alive throughout; "
            f"the first step peaks at {format_bytes(obj['first_step_peak_bytes'])}"
        )
    if setup.offload:
        lines.append(
            f"  host memory: {format_bytes(obj['host_bytes'])} (parameter copies, gradient buffers and AdamW "
            "state of the parameters offloaded; not on the GPU)"
        )
    elif setup.optimizer == "adamw" and not setup.inference and obj.get("details", {}).get("method") != "qlora-nf4":
        lines.append(
            "  adamw is foreach, what torch.optim.AdamW runs on CUDA by default; the Hugging Face Trainer "
            "uses the fused step: --optimizer adamw-fused"
        )
    return "\n".join(lines)


def _models_json() -> list[dict[str, Any]]:
    from .estimate import param_count

    keys = ("name", "family", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "vocab_size", "source")
    return [{**{k: getattr(arch, k) for k in keys}, "params": param_count(arch)} for arch in REGISTRY.values()]


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
            return _write(json.dumps(_models_json(), indent=2) if args.json else _models())
        if args.command == "weights":
            from .checkpoints import stored_weights

            stored = stored_weights(args.source, timeout=args.timeout)
            return _write(json.dumps(stored.to_json(), indent=2) if args.json else str(stored))
        obj = _serve(args) if args.command == "serve" else _run(args)
    except (ValueError, KeyError, FileNotFoundError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"vramlab: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vramlab: interrupted", file=sys.stderr)
        return 130
    text = obj.pop("text", None)
    return _write(json.dumps(obj, indent=2) if args.json else text or _table(obj))


def _write(text: str) -> int:
    """Print ``text``; a reader that left (``| head``) ends quietly, a full disk in one line."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `vramlab ... | head`: the reader left, nothing to report
        sys.stdout = None  # type: ignore[assignment]  # no flush of the closed pipe at exit
    except OSError as err:  # a full disk, a closed terminal
        sys.stdout = None  # type: ignore[assignment]
        print(f"vramlab: error: cannot write the output: {err.strerror or err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
