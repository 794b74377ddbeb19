"""Rank functions for chapters 14-15 and Lab 5: each runs on every rank under
:func:`vramlab.distributed.launch` and measures that rank's own memory with vramlab.

- :func:`train` - a TinyGPT training run under one strategy: "single" (no parallelism),
  "ddp", "zero1" (DDP + ``ZeroRedundancyOptimizer``), "zero2" (FSDP2 ``fully_shard`` with
  ``reshard_after_forward=False``: gradients and optimizer state sharded, parameters kept
  gathered between forward and backward) or "fsdp" (``fully_shard``: parameters too, ZeRO-3).
- :func:`tensor_parallel_mlp` - a column-parallel then row-parallel MLP (Megatron-style), written
  out with two autograd functions; :func:`dtensor_mlp` - the same split by PyTorch's
  ``parallelize_module`` (DTensor), with or without sequence parallelism.
- :func:`pipeline` - a 2-stage pipeline over micro-batches (GPipe or 1F1B, written out), with the
  bubble measured from each stage's busy time; :func:`torch_pipeline` - the same stages on
  ``torch.distributed.pipelining`` (``ScheduleGPipe``, ``Schedule1F1B``).
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .budget import budget
from .distributed import CommCounter, Rank
from .gpt import GPTConfig, TinyGPT, pattern_batch
from .measure import measure
from .oom import headline
from .storages import real_storages, storage_bytes
from .timing import now

STRATEGIES = ("single", "ddp", "zero1", "zero2", "fsdp")


class LossModel(nn.Module):
    """Wraps TinyGPT so that ``forward(ids)`` returns the loss (DDP and FSDP hook forward)."""

    def __init__(self, gpt: TinyGPT) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.gpt.loss(ids)


def check_strategy(strategy: str) -> str:
    """Return ``strategy`` or raise a ValueError listing the known ones."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    return strategy


def wrap(model: LossModel, strategy: str, lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Apply ``strategy`` to ``model`` (on this rank) and build its AdamW optimizer."""
    check_strategy(strategy)
    if strategy in ("ddp", "zero1"):
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model)
    if strategy in ("zero2", "fsdp"):
        from torch.distributed.fsdp import fully_shard

        reshard = strategy == "fsdp"
        for block in model.gpt.blocks:
            fully_shard(block, reshard_after_forward=reshard)
        fully_shard(model, reshard_after_forward=reshard)
    if strategy == "zero1":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return model, ZeroRedundancyOptimizer(
            model.parameters(), optimizer_class=torch.optim.AdamW, lr=lr, foreach=True
        )
    return model, torch.optim.AdamW(model.parameters(), lr=lr, foreach=True)


def source_of(fn: Callable[..., Any]) -> tuple[str, str]:
    """(source, name) of a function defined in a notebook cell or a file, to send to the
    ranks (see :func:`learner_function`)."""
    try:
        return textwrap.dedent(inspect.getsource(fn)), fn.__name__
    except (OSError, TypeError) as err:
        raise ValueError(f"{fn!r} must be a function defined with `def` in a notebook cell or a file") from err


def learner_function(source: str, name: str) -> Callable[..., Any]:
    """The function ``name`` defined by ``source`` (a notebook cell's function, sent to the
    ranks as text because spawned processes cannot import a notebook). Its globals hold
    torch, nn, dist, fully_shard, MixedPrecisionPolicy, CPUOffloadPolicy,
    DistributedDataParallel and ZeroRedundancyOptimizer."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    namespace: dict[str, Any] = {
        "torch": torch,
        "nn": nn,
        "dist": dist,
        "fully_shard": fully_shard,
        "MixedPrecisionPolicy": MixedPrecisionPolicy,
        "CPUOffloadPolicy": CPUOffloadPolicy,
        "DistributedDataParallel": DistributedDataParallel,
        "ZeroRedundancyOptimizer": ZeroRedundancyOptimizer,
    }
    exec(compile(source, f"<learner's {name}>", "exec"), namespace)  # noqa: S102 - the learner's own code
    if not callable(namespace.get(name)):
        raise ValueError(f"the code sent to the ranks does not define a function {name!r}")
    return namespace[name]


def _learner_wrap(shard: Callable[..., Any], model: LossModel) -> tuple[nn.Module, torch.optim.Optimizer]:
    result = shard(model)
    if (
        not isinstance(result, tuple)
        or len(result) != 2
        or not isinstance(result[0], nn.Module)
        or not isinstance(result[1], torch.optim.Optimizer)
    ):
        raise TypeError("shard(model) must return (model, optimizer): the module to train and a torch.optim optimizer")
    return result


def rank_batches(cfg: GPTConfig, batch: int, steps: int, rank: int, world: int) -> list[torch.Tensor]:
    """This rank's slice of each step's global batch of ``batch * world`` sequences (the
    same global batches for every world size, so runs are comparable)."""
    return [pattern_batch(cfg, batch * world, seed=1000 + s)[rank * batch : (rank + 1) * batch] for s in range(steps)]


def train(
    rank: Rank,
    strategy: str,
    cfg: dict[str, Any],
    batch: int,
    steps: int = 2,
    lr: float = 3e-3,
    limit: int | None = None,
    checkpointing: bool = False,
    timeline: bool = False,
    shard: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Train TinyGPT(cfg) for ``steps`` steps of ``batch`` sequences per rank; measure this rank.

    ``shard``: (source, name) of a learner's ``shard(model) -> (model, optimizer)`` to use
    instead of ``strategy`` (pass strategy "custom"); it runs inside the measured block, so
    whatever it allocates and keeps counts toward this rank's peak and budget.

    "single" ignores the other ranks (each runs the whole model on its own slice; use world
    size 1 for a true single-process reference). ``limit`` (bytes) runs the steps under
    :func:`vramlab.budget`; an out-of-memory error is returned, not raised, so every rank
    reports. Returns peak and breakdown (bytes), local parameter/gradient/optimizer bytes,
    collective payload bytes per step, mean global loss per step, seconds per step.
    """
    torch.manual_seed(0)  # the same initial weights on every rank
    gpt = TinyGPT(GPTConfig(**cfg)).to(rank.device)
    if checkpointing:
        gpt.set_checkpointing(every=1)
    custom = shard is not None
    if custom:  # a learner's code runs here: it may not switch the measuring off (vramlab.checks.strict)
        from .checks import strict

        strict.install()
    model, opt = (LossModel(gpt), None) if custom else wrap(LossModel(gpt), strategy, lr)
    world = 1 if strategy == "single" else rank.world_size
    batches = [
        b.to(rank.device) for b in rank_batches(gpt.cfg, batch, steps, 0 if strategy == "single" else rank.rank, world)
    ]
    losses: list[float] = []
    counter = CommCounter()
    tracked = [model, batches] if custom else [model, opt, batches]  # a learner's shard runs inside the block
    guard = budget(limit, *tracked, timeline=timeline) if limit else measure(*tracked, timeline=timeline)
    error = ""
    start = now(rank.device)
    try:
        with guard, counter:
            if custom:
                model, opt = _learner_wrap(learner_function(*shard), model)
            for ids in batches:
                opt.zero_grad(set_to_none=True)
                loss = model(ids)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
    except torch.OutOfMemoryError as err:  # also raised before the block when what is alive does not fit
        error = headline(err)
    except Exception as err:  # a learner's shard: report it from every rank, with its own words
        if not custom:
            raise
        error = f"{type(err).__name__}: {err}"
    m = guard.result
    assert m is not None
    seconds = (now(rank.device) - start) / steps
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if strategy != "single" and len(losses) == steps:
        mean = torch.tensor(losses, dtype=torch.float64, device=rank.device)  # NCCL reduces GPU tensors only
        dist.all_reduce(mean)
        losses = (mean / rank.world_size).tolist()
    return {
        "rank": rank.rank,
        "strategy": strategy,
        "backend": rank.backend,
        "device": str(rank.device),
        "peak_bytes": m.peak_bytes,
        "breakdown": dict(m.breakdown),
        "error": error,
        "tampering": list(strict.NOTES) if custom else [],
        "end_bytes": m.end_bytes,
        "param_bytes": storage_bytes(list(model.parameters())),
        "grad_bytes": storage_bytes(grads),
        "optimizer_bytes": storage_bytes(getattr(opt, "optim", opt)),  # ZeroRedundancyOptimizer wraps one
        "comm_bytes_per_step": {k: v // steps for k, v in counter.bytes.items()},
        "comm_calls_per_step": {k: v // steps for k, v in counter.calls.items()},
        "losses": losses,
        "seconds_per_step": seconds,
        "timeline": [(p.live_bytes, p.phase) for p in m.timeline] if timeline and m.timeline else [],
    }


def compare(
    rank: Rank,
    strategies: list[str | tuple[str, str]],
    cfg: dict[str, Any],
    batch: int,
    steps: int = 2,
    timeline: bool = False,
) -> list[dict[str, Any]]:
    """:func:`train` under each strategy in turn, in one set of processes (spawning costs
    seconds). A strategy is a name from :data:`STRATEGIES` or the ``(source, name)`` of a
    ``shard(model) -> (model, optimizer)`` function (:func:`source_of`)."""
    return [
        train(rank, "custom", cfg, batch, steps, timeline=timeline, shard=s)
        if isinstance(s, tuple)
        else train(rank, s, cfg, batch, steps, timeline=timeline)
        for s in strategies
    ]


# ------------------------------------------------------------------ tensor parallelism
class ShardedMLP(nn.Module):
    """x -> gelu(x W1_r^T + b1_r) W2_r^T, summed over ranks, + b2. Rank r holds rows r of W1
    (column parallel) and the matching columns of W2 (row parallel). Megatron's two operators
    make it correct in both directions: :class:`CopyToRanks` ("f") sums the input's gradient
    over the ranks in backward, :class:`SumAcrossRanks` ("g") sums the output in forward. One
    all-reduce of ``tokens x hidden`` each way; without "f" each rank would send a partial input
    gradient to the layers before it, and stacked layers would silently diverge."""

    def __init__(self, full: nn.Sequential, rank: int, world: int) -> None:
        super().__init__()
        up, down = full[0], full[2]
        rows = up.out_features // world
        part = slice(rank * rows, (rank + 1) * rows)
        self.up = nn.Linear(up.in_features, rows)
        self.down = nn.Linear(rows, down.out_features, bias=False)
        with torch.no_grad():
            self.up.weight.copy_(up.weight[part])
            self.up.bias.copy_(up.bias[part])
            self.down.weight.copy_(down.weight[:, part])
        self.bias = nn.Parameter(down.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = CopyToRanks.apply(x)
        return SumAcrossRanks.apply(self.down(torch.nn.functional.gelu(self.up(x)))) + self.bias


class CopyToRanks(torch.autograd.Function):
    """Megatron's "f": forward passes the (replicated) input through; backward sums the ranks'
    partial input gradients (all-reduce), since each rank's shard saw the whole input."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        total = grad.clone()
        dist.all_reduce(total)
        return total


class SumAcrossRanks(torch.autograd.Function):
    """Megatron's "g": forward sums the ranks' partial outputs (all-reduce); backward passes
    the gradient through unchanged, because each partial contributes to the sum with weight 1."""

    @staticmethod
    def forward(ctx: Any, partial: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        total = partial.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        return grad


def mlp(hidden: int, ffn: int) -> nn.Sequential:
    """The full (unsharded) MLP, seeded so every rank builds the same one."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden))


def tensor_parallel_mlp(rank: Rank, hidden: int, ffn: int, tokens: int, sharded: bool = True) -> dict[str, Any]:
    """One forward+backward of the MLP on ``tokens`` tokens: sharded across the ranks (or the
    whole MLP on every rank, ``sharded=False``). Returns this rank's weight bytes, peak,
    activation bytes (saved for backward), and the output's largest difference from the full MLP."""
    full = mlp(hidden, ffn).to(rank.device)
    model = ShardedMLP(full, rank.rank, rank.world_size).to(rank.device) if sharded else full
    torch.manual_seed(1)
    x = torch.randn(tokens, hidden, device=rank.device, requires_grad=True)  # as inside a model: layers before it
    counter = CommCounter()
    with measure(model, x) as m, counter:
        y, saved = saved_for_backward(list(model.parameters()), lambda: model(x))
        y.square().mean().backward()
    reference = x.detach().clone().requires_grad_(True)
    full(reference).square().mean().backward()
    with torch.no_grad():
        diff = float((y.detach() - full(x)).abs().max())
    return {
        "rank": rank.rank,
        "weight_bytes": storage_bytes(list(model.parameters())),
        "peak_bytes": m.peak_bytes,
        "activation_bytes": saved,
        "max_abs_diff": diff,
        "input_grad_diff": float((x.grad - reference.grad).abs().max()),  # what the layers before it receive
        "comm_bytes": dict(counter.bytes),
    }


def dtensor_mlp(rank: Rank, hidden: int, ffn: int, tokens: int, sequence_parallel: bool = False) -> dict[str, Any]:
    """The same MLP and step as :func:`tensor_parallel_mlp`, split by PyTorch's own tensor
    parallelism: ``parallelize_module`` with ``ColwiseParallel`` on the first linear and
    ``RowwiseParallel`` on the second, over a 1-D device mesh of all ranks. With
    ``sequence_parallel`` each rank holds only its ``tokens / world`` rows of the input and the
    output (``Shard(0)`` layouts): the first linear all-gathers them, the second reduce-scatters.
    Returns the same fields as :func:`tensor_parallel_mlp`, the differences against this rank's
    rows of the whole MLP's output and input gradient, and ``boundary_bytes``: the input and
    output this rank holds, what sequence parallelism divides by the number of ranks."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if sequence_parallel and tokens % rank.world_size:
        raise ValueError(f"sequence parallelism splits the {tokens} tokens {rank.world_size} ways: pick a multiple")
    mesh = init_device_mesh(rank.device.type, (rank.world_size,))
    full = mlp(hidden, ffn).to(rank.device)
    plan = (
        {"0": ColwiseParallel(input_layouts=Shard(0)), "2": RowwiseParallel(output_layouts=Shard(0))}
        if sequence_parallel
        else {"0": ColwiseParallel(), "2": RowwiseParallel()}
    )
    model = parallelize_module(copy.deepcopy(full), mesh, plan)
    torch.manual_seed(1)
    whole = torch.randn(tokens, hidden, device=rank.device)
    rows = whole.chunk(rank.world_size)[rank.rank] if sequence_parallel else whole
    x = rows.clone().requires_grad_(True)
    counter = CommCounter()
    with measure(model, x) as m, counter:
        y, saved = saved_for_backward(list(model.parameters()), lambda: model(x))
        (y.square().sum() / whole.numel()).backward()  # this rank's share of the whole output's mean square
    reference = whole.clone().requires_grad_(True)
    out = full(reference)
    out.square().mean().backward()
    mine = (lambda t: t.chunk(rank.world_size)[rank.rank]) if sequence_parallel else (lambda t: t)
    return {
        "rank": rank.rank,
        "weight_bytes": storage_bytes(list(model.parameters())),
        "peak_bytes": m.peak_bytes,
        "activation_bytes": saved,
        "max_abs_diff": float((y.detach() - mine(out.detach())).abs().max()),
        "input_grad_diff": float((x.grad - mine(reference.grad)).abs().max()),
        "comm_bytes": dict(counter.bytes),
        "boundary_bytes": storage_bytes([x.detach(), y.detach()]),  # what the rank holds between TP regions
    }


def dtensor_mlps(rank: Rank, hidden: int, ffn: int, tokens: int) -> dict[bool, dict[str, Any]]:
    """:func:`dtensor_mlp` without and with sequence parallelism, in one set of processes."""
    return {sp: dtensor_mlp(rank, hidden, ffn, tokens, sp) for sp in (False, True)}


def saved_for_backward(params: list[torch.Tensor], forward: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Run ``forward()``; return its output and the bytes of the distinct storages autograd
    saved for backward, parameters excluded: the activations, by definition. (Counting live
    tensors instead would also catch buffers whose release a collective may delay.)"""
    weights = {s.data_ptr() for p in params for s in real_storages(p)}  # a DTensor's local shard too
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        for storage in real_storages(t):
            if storage.data_ptr() not in weights:
                saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return out, sum(saved.values())


# ------------------------------------------------------------------ pipeline parallelism
def stage(layers: int, hidden: int, seed: int) -> nn.Sequential:
    """``layers`` residual MLP blocks (Linear-GELU-Linear), seeded per stage."""
    torch.manual_seed(seed)
    return nn.Sequential(
        *(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
            for _ in range(layers)
        )
    )


def _run_stage(blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = x + block(x)
    return x


SCHEDULES = ("gpipe", "1f1b")


def pipeline(
    rank: Rank, layers: int, hidden: int, batch: int, micro_batches: int, repeats: int = 3, schedule: str = "gpipe"
) -> dict[str, Any]:
    """A 2-stage pipeline: rank 0 runs the first ``layers // 2`` blocks, rank 1 the rest and the
    loss; activations go 0 -> 1, gradients 1 -> 0. ``schedule`` "gpipe": every micro-batch
    forward, then every one backward, so all their activations are alive at once. "1f1b"
    (PipeDream-Flush): after a warm-up of one micro-batch on rank 0, each forward is followed
    by the oldest backward, so a rank holds at most 2 micro-batches' activations. Returns this
    rank's weight bytes, peak, busy and total seconds per step (median of ``repeats``), and the
    measured bubble fraction 1 - busy / total."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    if rank.world_size != 2:
        raise ValueError("this pipeline has exactly 2 stages: launch it with world_size=2")
    if batch % micro_batches:
        raise ValueError(f"batch ({batch}) must split into {micro_batches} equal micro-batches")
    blocks = stage(layers // 2, hidden, seed=rank.rank).to(rank.device)
    torch.manual_seed(2)
    data = torch.randn(batch, hidden, device=rank.device)
    size = batch // micro_batches
    timings = []
    for _ in range(repeats + 1):  # the first step warms up
        dist.barrier()
        start = now(rank.device)
        with measure(blocks) as m:
            busy = _pipeline_step(rank, blocks, data, size, micro_batches, hidden, schedule)
            dist.barrier()  # the step ends when the last stage is done: idle tails count as bubble
        timings.append((busy, now(rank.device) - start, m.peak_bytes))
    busy, total, peak = sorted(timings[1:], key=lambda t: t[1])[len(timings[1:]) // 2]
    return {
        "rank": rank.rank,
        "schedule": schedule,
        "weight_bytes": storage_bytes(list(blocks.parameters())),
        "peak_bytes": peak,
        "busy_s": busy,
        "total_s": total,
        "bubble": 1 - busy / total,
    }


def _pipeline_step(
    rank: Rank, blocks: nn.Sequential, data: torch.Tensor, size: int, micro: int, hidden: int, schedule: str
) -> float:
    """One step of the schedule on this rank; returns the seconds spent computing."""
    busy, sends = 0.0, []  # sends: (request, tensor) pairs, waited for at the end of the step
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}

    def forward(i: int) -> None:
        nonlocal busy
        if rank.rank == 0:
            x = data[i * size : (i + 1) * size]
        else:
            x = torch.empty(size, hidden, device=rank.device)
            dist.recv(x, src=0)
            x.requires_grad_(True)
        t = now(rank.device)
        y = _run_stage(blocks, x)
        if rank.rank == 1:
            y = y.square().mean() / micro
        busy += now(rank.device) - t
        if rank.rank == 0:
            out = y.detach()
            sends.append((dist.isend(out, dst=1), out))  # non-blocking: 1F1B's next receive must not wait on it
        inputs[i], outputs[i] = x, y

    def backward(i: int) -> None:
        nonlocal busy
        x, y = inputs.pop(i), outputs.pop(i)  # this micro-batch's activations die with its backward
        if rank.rank == 1:
            t = now(rank.device)
            y.backward()
            busy += now(rank.device) - t
            sends.append((dist.isend(x.grad, dst=0), x.grad))  # the tensor stays referenced until sent
        else:
            grad = torch.empty_like(y)
            dist.recv(grad, src=1)
            t = now(rank.device)
            y.backward(grad)
            busy += now(rank.device) - t

    if schedule == "gpipe":
        for i in range(micro):
            forward(i)
        for i in reversed(range(micro)):
            backward(i)
    else:
        warmup = min(rank.world_size - rank.rank - 1, micro)
        for i in range(warmup):
            forward(i)
        for i in range(micro - warmup):
            forward(i + warmup)
            backward(i)
        for i in range(micro - warmup, micro):
            backward(i)
    for request, _ in sends:
        request.wait()
    return busy


class StageModule(nn.Module):
    """A stage of :func:`stage` blocks as a module (residual connections included): what
    ``torch.distributed.pipelining.PipelineStage`` wraps."""

    def __init__(self, blocks: nn.Sequential) -> None:
        super().__init__()
        self.blocks = blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _run_stage(self.blocks, x)


def torch_pipeline(
    rank: Rank, layers: int, hidden: int, batch: int, micro_batches: int, schedule: str = "gpipe"
) -> dict[str, Any]:
    """The 2-stage pipeline of :func:`pipeline` on PyTorch's own API: a
    ``torch.distributed.pipelining.PipelineStage`` per rank, driven by ``ScheduleGPipe`` or
    ``Schedule1F1B`` with the loss ``y.square().mean()`` per micro-batch (the schedules scale the
    gradients by 1 / ``micro_batches``). Runs two steps and returns this rank's weight bytes, the
    second (steady-state) step's peak, and the largest difference of its gradients from the
    unsplit model's on the whole batch."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    if micro_batches < rank.world_size or batch % micro_batches:
        raise ValueError(
            f"this comparison needs at least {rank.world_size} micro-batches (Schedule1F1B refuses fewer than one "
            f"per stage) that split the batch of {batch} evenly; got {micro_batches}"
        )
    mine = StageModule(stage(layers // 2, hidden, seed=rank.rank)).to(rank.device)
    torch.manual_seed(2)
    data = torch.randn(batch, hidden, device=rank.device)
    runner = (ScheduleGPipe if schedule == "gpipe" else Schedule1F1B)(
        PipelineStage(mine, rank.rank, rank.world_size, rank.device),
        micro_batches,
        loss_fn=lambda y, _target: y.square().mean(),
    )
    peaks = []
    for _ in range(2):  # the first step also creates the stages' buffers
        mine.zero_grad(set_to_none=True)
        with measure(mine) as m:
            if rank.rank == 0:
                runner.step(data)
            else:
                runner.step(target=torch.zeros(batch, hidden, device=rank.device))
        peaks.append(m.peak_bytes)
    whole = [StageModule(stage(layers // 2, hidden, seed=s)).to(rank.device) for s in range(rank.world_size)]
    whole[1](whole[0](data)).square().mean().backward()
    grads = zip(mine.parameters(), whole[rank.rank].parameters(), strict=True)
    return {
        "rank": rank.rank,
        "schedule": schedule,
        "weight_bytes": storage_bytes(list(mine.parameters())),
        "peak_bytes": peaks[-1],
        "grad_diff": max(float((a.grad - b.grad).abs().max()) for a, b in grads),
    }


def torch_pipelines(rank: Rank, layers: int, hidden: int, batch: int, micro_batches: int) -> dict[str, dict[str, Any]]:
    """:func:`torch_pipeline` under each of :data:`SCHEDULES`, in one set of processes."""
    return {s: torch_pipeline(rank, layers, hidden, batch, micro_batches, s) for s in SCHEDULES}


def pipelines(
    rank: Rank,
    layers: int,
    hidden: int,
    batch: int,
    micro_batch_counts: list[int],
    repeats: int = 3,
    schedule: str = "gpipe",
) -> list[dict[str, Any]]:
    """:func:`pipeline` for each number of micro-batches, in one set of processes."""
    return [pipeline(rank, layers, hidden, batch, m, repeats, schedule) for m in micro_batch_counts]


def ring_attention(rank: Rank, seq: int, heads: int, head_dim: int, seed: int = 0) -> dict[str, Any]:
    """Causal attention over ``seq`` tokens split into one contiguous chunk per rank, computed
    as ring attention (context parallelism) does it: each rank keeps its chunk's queries and
    passes keys and values around the ring, one chunk per step, merging each chunk's partial
    result into its output with a running log-sum-exp. No rank ever holds more than a
    (seq/world)² score matrix per head. Forward only. Every rank draws the same full q, k, v
    (``seed``) and keeps its slice; ``Rank.in_process()`` gives the one-device computation.

    Returns this rank's peak bytes during the attention, the elements of the largest score
    matrix it held (all heads), the bytes it sent, and the largest difference of its output from
    PyTorch's unsplit causal attention (``F.scaled_dot_product_attention``)."""
    world, r = rank.world_size, rank.rank
    if seq % world:
        raise ValueError(f"seq ({seq}) must divide evenly into {world} chunks, one per rank")
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(heads, seq, head_dim, generator=gen) for _ in range(3))
    chunk = seq // world
    mine = slice(r * chunk, (r + 1) * chunk)
    reference = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)[:, mine]
    q_mine = q[:, mine].clone().to(rank.device)
    kv = torch.stack([k[:, mine], v[:, mine]]).to(rank.device)  # the chunk that travels around the ring
    del q, k, v
    largest, sent = 0, 0
    with measure(q_mine, kv) as m:
        out = torch.zeros_like(q_mine)
        lse = torch.full((heads, chunk, 1), float("-inf"), device=rank.device)
        causal = torch.ones(chunk, chunk, dtype=torch.bool, device=rank.device).triu(1)
        for step in range(world):
            src = (r - step) % world  # whose keys and values this rank holds now
            if src <= r:  # later chunks are masked out entirely by causality
                scores = q_mine @ kv[0].transpose(-1, -2) * head_dim**-0.5
                if src == r:
                    scores = scores.masked_fill(causal, float("-inf"))
                largest = max(largest, scores.numel())
                block_lse = scores.logsumexp(-1, keepdim=True)
                block_out = torch.softmax(scores, -1) @ kv[1]
                del scores
                merged = torch.logaddexp(lse, block_lse)
                out = out * (lse - merged).exp() + block_out * (block_lse - merged).exp()
                lse = merged
            if step < world - 1:
                incoming = torch.empty_like(kv)
                pair = [dist.P2POp(dist.isend, kv, (r + 1) % world), dist.P2POp(dist.irecv, incoming, (r - 1) % world)]
                for op in dist.batch_isend_irecv(pair):  # grouped: NCCL may block a lone send until its recv is posted
                    op.wait()
                sent += kv.numel() * kv.element_size()
                kv = incoming
    return {
        "rank": r,
        "peak_bytes": m.peak_bytes,
        "largest_scores": largest,
        "sent_bytes": sent,
        "max_abs_diff": float((out.cpu() - reference).abs().max()),
    }
