"""Dry runs of sharded training: one rank's steady-state peak under FSDP2, alone or with tensor
parallelism, for the real step of the real transformers model, without the GPUs.

This process plays one rank of a process group of ``gpus`` ranks that exists only here:
PyTorch's "fake" backend (``torch.testing._internal.distributed.fake_pg``), whose collectives
return at once without moving data. The model is built under ``FakeTensorMode`` (sizes, no
bytes), then sharded exactly as a training script shards it:

- tensor parallelism (``tp`` > 1) first, with DTensor's ``parallelize_module`` on a ``tp``-rank
  sub-mesh: in every decoder block the query, key, value, gate and up projections are
  column-parallel and the attention output and down projections row-parallel (Megatron's
  split, no sequence parallelism); embeddings, norms and the LM head stay whole in the group;
- then FSDP2's ``fully_shard`` on the data-parallel sub-mesh of ``gpus / tp`` ranks, once per
  decoder block and once at the root (chapter 14), with ``reshard_after_forward`` for the
  blocks and FSDP2's default for the root, an optional ``MixedPrecisionPolicy(param_dtype=
  bfloat16, reduce_dtype=float32)``.

Two training steps run (forward with labels, backward, optimizer step); the second is the
result, since every later step repeats it. The storage tracker (:mod:`vramlab.tracker`) counts
what the rank's GPU would hold; it sees FSDP2 free and regather parameters through
``UntypedStorage.resize_``. The rank played is rank 0: ``torch.chunk`` gives the first ranks
the largest shard of every sharded tensor (the last may get less, or nothing; ties are
possible), and FSDP2 pads the rest to one size on every rank, so rank 0 is a rank with the
highest peak.

The breakdown splits the peak into ``parts``: the sharded states (this rank's shards of
parameters, gradients and optimizer state), gathered parameters (FSDP2's all-gather buffers
and unsharded parameters), gradient buffers (unsharded gradients and the reduce-scatter
buffers), activations and other.

FSDP2's ``CPUOffloadPolicy`` is refused, not guessed: the dry run's stand-in device is the CPU,
where FSDP2's host-to-device copies of each shard (``.to(device)``) return the tensor itself,
so the transient device copies an offloaded run makes could not be seen.

What differs from a GPU, besides what :mod:`vramlab.dryrun` lists: NCCL's own buffers (larger
with tensor parallelism, which adds communicators) and the CUDA caching allocator's rounding and
cache are not counted. On a GPU FSDP2 allocates all-gather outputs on its all-gather stream and
reduce-scatter outputs on its reduce-scatter stream, and the caching allocator reuses a freed
block only for allocations on the stream it came from, so the memory it reserves can exceed what
is allocated. The dry run's peak is the allocated peak (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .models import ArchConfig, HFModel, check_positions, get_arch
from .recipes import get_recipe
from .results import result_json, too_large
from .setups import Setup
from .tracker import StorageTracker
from .units import format_bytes

PARTS: tuple[str, ...] = ("sharded states", "gathered parameters", "gradient buffers", "activations", "other")
MIXED_PRECISION = ("bf16",)
RECIPES = ("fp32", "amp-bf16", "bf16")
OPTIMIZERS = ("adamw", "adamw-fused", "adam", "sgd", "sgd-momentum")
TP_FAMILIES = ("llama", "mistral", "qwen2")
COLUMN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW = ("self_attn.o_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Sharding:
    """How the step is spread over GPUs.

    Args:
        gpus: ranks in all (1 or more), a multiple of ``tp``.
        tp: tensor-parallel group size (1: FSDP2 alone); FSDP2 shards over ``gpus // tp``.
        reshard_after_forward: FSDP2's flag for the blocks: free each block's gathered
            parameters after its forward and gather them again in backward (True, the default),
            or keep them until the backward (False: less traffic, more memory).
        mixed_precision: None (the parameters' own dtype on the wire and in compute) or
            "bf16": ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``.
        cpu_offload: FSDP2's ``CPUOffloadPolicy``; accepted here so that the flag exists and
            is refused with its reason by :func:`check` (see the module).
    """

    gpus: int
    tp: int = 1
    reshard_after_forward: bool = True
    mixed_precision: str | None = None
    cpu_offload: bool = False

    def __post_init__(self) -> None:
        for name in ("gpus", "tp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name} must be a whole number of ranks, 1 or more; got {value!r}")
        if self.gpus % self.tp:
            raise ValueError(
                f"--gpus {self.gpus} is not a multiple of --tp {self.tp}: the ranks form groups of {self.tp} "
                "for tensor parallelism and FSDP2 shards across the groups"
            )
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"unknown mixed precision {self.mixed_precision!r}; use bf16 (bf16 compute and all-gathers, "
                "fp32 gradient reduction) or leave it out"
            )
        if self.cpu_offload and self.tp > 1:
            raise ValueError(
                "--cpu-offload with --tp is not modelled: FSDP2's CPUOffloadPolicy is for FSDP2 alone; drop one"
            )

    @property
    def dp(self) -> int:
        """Ranks FSDP2 shards over."""
        return self.gpus // self.tp

    def describe(self) -> str:
        """The sharding in words."""
        text = f"FSDP2 over {self.dp}" if self.tp == 1 else f"{self.tp}-way TP x FSDP2 over {self.dp}"
        text += f" ({self.gpus} GPUs), reshard_after_forward={self.reshard_after_forward}"
        if self.mixed_precision:
            text += f", {self.mixed_precision} mixed precision (fp32 reduce)"
        if self.cpu_offload:
            text += ", CPU offload"
        return text


@dataclass
class ShardedResult:
    """One rank's steady-state step under a :class:`Sharding`. Sizes in bytes."""

    arch: ArchConfig
    params: int  # the whole model's parameters, before sharding
    setup: Setup
    sharding: Sharding
    rank: int
    peak_bytes: int
    breakdown: dict[str, int]  # by role (vramlab.results.ROLES) at the peak
    parts: dict[str, int]  # by PARTS at the peak
    peak_moment: str
    first_step_peak_bytes: int
    seconds: float = 0.0
    source: str = "dry-run"
    timeline: list[Any] | None = field(default=None, repr=False)

    @property
    def model(self) -> str:
        return self.arch.name

    def to_json(self) -> dict[str, Any]:
        """The object ``vramlab dryrun --fsdp --json`` prints (see :mod:`vramlab.results`)."""
        return result_json(
            self,
            model=self.model,
            params=self.params,
            sharding=asdict(self.sharding),
            rank=self.rank,
            parts=dict(self.parts),
            peak_moment=self.peak_moment,
            first_step_peak_bytes=self.first_step_peak_bytes,
        )

    def __str__(self) -> str:
        lines = [
            f"{self.model}: {self.params:,} parameters; {self.setup.describe()}",
            f"{self.sharding.describe()}; per GPU, rank {self.rank}"
            + (" (a worst rank: it holds the largest shard of every sharded tensor)" if self.rank == 0 else "")
            + f" (source: {self.source})",
        ]
        lines += [f"  {part:<20}{format_bytes(self.parts[part]):>14}" for part in PARTS]
        lines.append(
            f"  {'peak':<20}{format_bytes(self.peak_bytes):>14}   ({self.peak_bytes:,} bytes), at {self.peak_moment}"
        )
        lines.append(
            f"  steady state: every step after the first; the first step peaks at "
            f"{format_bytes(self.first_step_peak_bytes)}"
        )
        lines.append("  not counted: NCCL's buffers, the CUDA context and the caching allocator's rounding and cache")
        return "\n".join(lines)


def check(arch: ArchConfig, setup: Setup, sharding: Sharding) -> None:
    """Refuse, in one sentence each, what a sharded dry run does not model."""
    if setup.inference or setup.lora_rank or setup.offload or setup.keep_outputs or setup.full_logits:
        raise ValueError(
            "a sharded dry run measures a full training step of every weight; drop --inference, --lora, --offload, "
            "--keep-outputs and --full-logits"
        )
    if setup.recipe not in RECIPES:
        raise ValueError(
            f"recipe {setup.recipe!r} is not modelled under FSDP2 (fp16 needs a sharded GradScaler); use one of "
            f"{', '.join(RECIPES)}, or fp32 with --mixed-precision bf16"
        )
    if sharding.mixed_precision and setup.recipe != "fp32":
        raise ValueError(
            "--mixed-precision bf16 is FSDP2's own policy (fp32 shards, bf16 compute) and replaces --recipe: "
            "drop --recipe"
        )
    if setup.optimizer not in OPTIMIZERS:
        raise ValueError(
            f"optimizer {setup.optimizer!r} has no sharded dry-run path; use one of {', '.join(OPTIMIZERS)}"
        )
    if sharding.cpu_offload:
        raise ValueError(
            "--cpu-offload is not modelled: the dry run stands the GPU in with the CPU, where FSDP2's copies of "
            "each shard to the device return the shard itself, so their bytes cannot be counted; leave it out"
        )
    if sharding.tp > 1:
        if arch.family not in TP_FAMILIES:
            raise ValueError(
                f"--tp splits Llama-style projections (q/k/v/o, gate/up/down); {arch.name} ({arch.family}) fuses "
                "its attention projection, which it does not split: use --tp 1"
            )
        for name, size in (
            ("attention heads", arch.num_heads),
            ("key/value heads", arch.num_kv_heads),
            ("MLP width", arch.intermediate_size),
        ):
            if size % sharding.tp:
                raise ValueError(
                    f"--tp {sharding.tp} does not divide {arch.name}'s {size} {name}: each rank must hold "
                    "whole heads; pick a tp that divides it"
                )


def sharded_dryrun(
    model: str | ArchConfig | HFModel,
    setup: Setup | None = None,
    *,
    gpus: int,
    tp: int = 1,
    reshard_after_forward: bool = True,
    mixed_precision: str | None = None,
    cpu_offload: bool = False,
    timeline: bool = False,
    _fake: bool = True,
    **changes: Any,
) -> ShardedResult:
    """The per-GPU peak of one sharded training step, by dry run on a fake rank (see the module).

    ``setup`` (or keyword changes such as ``batch=1, seq=2048, checkpointing=True``) is the
    per-rank step; the sharding arguments are those of :class:`Sharding`. With ``_fake=False``
    the same step runs for real in this process, which must then be a rank of an initialised
    process group of ``gpus`` ranks (the validation on gloo ranks).
    """
    if isinstance(model, HFModel):
        raise ValueError(
            f"{model.name}: a sharded dry run takes the Llama, Mistral, Qwen2 and GPT-2 families "
            "(registry names or their config.json); this config is dry-run only on one GPU (vramlab dryrun)"
        )
    arch = get_arch(model)
    setup = Setup.of(setup, **changes)
    sharding = Sharding(gpus, tp, reshard_after_forward, mixed_precision, cpu_offload)
    check(arch, setup, sharding)
    check_positions(arch, setup.seq)
    start = time.perf_counter()
    with _process_group(sharding.gpus, _fake) as rank:
        try:
            result = _run(arch, setup, sharding, rank, _fake, timeline)
        except RuntimeError as err:
            if "overflow" in str(err):
                raise too_large(f"{arch.name} with {setup.describe()}") from None
            raise
    result.seconds = time.perf_counter() - start
    return result


@contextlib.contextmanager
def _process_group(gpus: int, fake: bool) -> Iterator[int]:
    """Yield this process's rank: of a fake group of ``gpus`` ranks made for the block (rank
    0), or of the real group already initialised (``fake=False``)."""
    if not fake:
        if not dist.is_initialized() or dist.get_world_size() != gpus:
            raise ValueError(f"a real sharded run needs an initialised process group of {gpus} ranks")
        yield dist.get_rank()
        return
    if dist.is_initialized():
        raise ValueError(
            "a sharded dry run plays a rank of a fake process group, and this process already belongs to a "
            "real one: run it outside torch.distributed ranks"
        )
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=gpus)
    try:
        yield 0
    finally:
        dist.destroy_process_group()


def _run(
    arch: ArchConfig,
    setup: Setup,
    sharding: Sharding,
    rank: int,
    fake: bool,
    timeline: bool,
    device: str = "cpu",
    around: Callable[[], Any] = contextlib.nullcontext,
) -> ShardedResult:
    """The two steps on ``device`` ("cpu", or "cuda" for :func:`cuda_rank_check`), on fake tensors
    or (``fake=False``) real ones, each inside a fresh ``around()`` context."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .dryrun import _enable_checkpointing, _quiet_fake_tensor_log, build_hf_model, make_optimizer

    rec = get_recipe(setup.recipe)
    mesh = _mesh(sharding, device)
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()  # the mesh is real
    with _real_meshes(), mode, _quiet_fake_tensor_log(), _labels() as active, torch.device(device):
        if not fake:
            torch.manual_seed(0)  # every rank builds the same weights and reads the same batch
        net = build_hf_model(arch, rec.param_dtype, setup.attention)
        params = sum(p.numel() for p in net.parameters())
        net.train()
        if setup.checkpointing:
            _enable_checkpointing(net)
        if sharding.tp > 1:
            _tensor_parallel(net, mesh["tp"])
        _fully_shard(net, mesh["dp"], sharding)
        opt = make_optimizer(setup.optimizer, list(net.parameters()))
        ids = torch.randint(0, arch.vocab_size, (setup.batch, setup.seq))
        steps = []
        for _ in range(2):
            with around():
                steps.append(_step(net, opt, ids, rec, active, timeline, device))
    tracker, moment = steps[1]
    first, _ = steps[0]
    return ShardedResult(
        arch=arch,
        params=params,
        setup=setup,
        sharding=sharding,
        rank=rank,
        peak_bytes=tracker.peak_bytes,
        breakdown=tracker.peak_breakdown(),
        parts=parts_of(tracker.peak_items()),
        peak_moment=moment,
        first_step_peak_bytes=first.peak_bytes,
        timeline=tracker.timeline,
    )


@contextlib.contextmanager
def _real_meshes() -> Iterator[None]:
    """Device meshes made while the block runs (FSDP2 joins the data- and tensor-parallel
    meshes inside ``fully_shard``) compute their rank tables on real tensors, as they must,
    even under ``FakeTensorMode``."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.device_mesh import DeviceMesh

    plain = DeviceMesh.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        with unset_fake_temporarily():
            plain(self, *args, **kwargs)

    DeviceMesh.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        DeviceMesh.__init__ = plain  # type: ignore[method-assign]


def _mesh(sharding: Sharding, device: str = "cpu") -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device, (sharding.dp, sharding.tp), mesh_dim_names=("dp", "tp"))


def _blocks(net: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks of a transformers causal LM (Llama-style or GPT-2)."""
    inner = getattr(net, "model", None) or getattr(net, "transformer", None)
    blocks = getattr(inner, "layers", None) or getattr(inner, "h", None)
    if blocks is None:
        raise ValueError(f"{type(net).__name__}: found no list of decoder blocks to shard")
    return list(blocks)


def _tensor_parallel(net: torch.nn.Module, mesh: Any) -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan: dict[str, Any] = {name: ColwiseParallel() for name in COLUMN}
    plan.update({name: RowwiseParallel() for name in ROW})
    for block in _blocks(net):
        parallelize_module(block, mesh, plan)


def _fully_shard(net: torch.nn.Module, mesh: Any, sharding: Sharding) -> None:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    kwargs: dict[str, Any] = {
        "mesh": mesh,
        "offload_policy": CPUOffloadPolicy(pin_memory=False) if sharding.cpu_offload else OffloadPolicy(),
    }
    if sharding.mixed_precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in _blocks(net):
        fully_shard(block, reshard_after_forward=sharding.reshard_after_forward, **kwargs)
    fully_shard(net, **kwargs)


def _step(
    net: torch.nn.Module,
    opt: torch.optim.Optimizer,
    ids: torch.Tensor,
    rec: Any,
    active: list[StorageTracker],
    timeline: bool,
    device: str = "cpu",
) -> tuple[StorageTracker, str]:
    """One measured training step; returns its tracker and the moment of its peak."""
    from torch.distributed._tools.mod_tracker import ModTracker

    from .dryrun import _autocast

    opt.zero_grad(set_to_none=True)
    tracker = StorageTracker(device, timeline=timeline)
    modules = ModTracker()
    tracker.moment = lambda: _moment(tracker, modules)
    with tracker, modules:
        tracker.register([net, opt, ids])
        active.append(tracker)
        try:
            with _autocast(rec):
                loss = net(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            del loss
            opt.step()
            tracker.assign_roles(net)
            tracker.assign_roles(opt)
        finally:
            active.pop()
    return tracker, tracker.peak_moment or "the start of the step"


def _moment(tracker: StorageTracker, modules: Any) -> str:
    """Where the step is, in words: the phase and the innermost module running."""
    inner = max(modules.parents, key=len)
    where = "" if inner == "Global" else " of " + inner.split(".", 1)[-1] if "." in inner else f" of {inner}"
    return f"{tracker.phase}{where}"


@contextlib.contextmanager
def _labels() -> Iterator[list[StorageTracker]]:
    """While the block runs, what FSDP2 gathers is labelled "gathered parameters" and what its
    gradient reduction holds "gradient buffers", for the innermost active tracker."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    active: list[StorageTracker] = []
    names = ("unshard", "wait_for_unshard", "post_backward")
    plain = {name: getattr(FSDPParamGroup, name) for name in names}

    def gathering(name: str) -> Callable[..., Any]:
        def run(group: Any, *args: Any, **kwargs: Any) -> Any:
            if not active:
                return plain[name](group, *args, **kwargs)
            with active[-1].labelled("parameters", "gathered parameters"):
                return plain[name](group, *args, **kwargs)

        return run

    def reducing(group: Any, *args: Any, **kwargs: Any) -> Any:
        if not active:
            return plain["post_backward"](group, *args, **kwargs)
        tracker = active[-1]
        for fsdp_param in group.fsdp_params:
            for grad in _unsharded_grads(fsdp_param):
                tracker.label(grad, "gradients", "gradient buffers")
        with tracker.labelled("gradients", "gradient buffers"):
            return plain["post_backward"](group, *args, **kwargs)

    FSDPParamGroup.unshard = gathering("unshard")  # type: ignore[method-assign]
    FSDPParamGroup.wait_for_unshard = gathering("wait_for_unshard")  # type: ignore[method-assign]
    FSDPParamGroup.post_backward = reducing  # type: ignore[method-assign]
    try:
        yield active
    finally:
        for name, method in plain.items():
            setattr(FSDPParamGroup, name, method)


def _unsharded_grads(fsdp_param: Any) -> list[torch.Tensor]:
    if not hasattr(fsdp_param, "_unsharded_param"):
        return []
    grads = [fsdp_param.unsharded_accumulated_grad, fsdp_param.unsharded_param.grad]
    return [g for g in grads if isinstance(g, torch.Tensor)]


def parts_of(items: list[tuple[Any, int]]) -> dict[str, int]:
    """Bytes by :data:`PARTS` of (tracker record, bytes) pairs: a label names its part; else
    a role the registration gave (parameters, gradients, optimizer) is a sharded state."""
    out = dict.fromkeys(PARTS, 0)
    for record, nbytes in items:
        if record.part is not None:
            key = record.part
        elif record.role in ("parameters", "gradients", "optimizer"):
            key = "sharded states"
        else:
            key = "activations" if record.resolved_role == "activations" else "other"
        out[key] += nbytes
    return out


def real_rank(rank: Any, model: ArchConfig, setup: Setup, sharding: dict[str, Any]) -> dict[str, Any]:
    """Rank function for :func:`vramlab.distributed.launch`: the same step as
    :func:`sharded_dryrun`, on real tensors over the real process group (gloo on CPUs),
    measured by the same tracker; returns this rank's ``to_json()``. The validation of the
    dry run: small models only, every rank allocates for real."""
    torch.set_num_threads(1)
    return sharded_dryrun(model, setup, _fake=False, **sharding).to_json()


def cuda_rank_check(model: str | ArchConfig, setup: Setup, **sharding: Any) -> dict[str, Any]:
    """The dry run against this machine's GPU (``make gpu-check``): rank 0 of the same fake
    process group, with real tensors on CUDA (the fake collectives move no data, so the values
    are meaningless, but every allocation is real). Returns the CPU dry run's peak, the tracked
    peak of the CUDA run (the same quantity) and the CUDA allocator's peak during its second
    step (``max_memory_allocated``: also what the tracker cannot see, such as cuBLAS's
    workspace, and 512-byte rounding), in bytes. Only recipes without autocast (fp32, bf16, or
    fp32 with ``mixed_precision="bf16"``): the dry run's autocast is the CPU's."""
    from .device import has_cuda

    if not has_cuda():
        raise ValueError("cuda_rank_check needs a CUDA GPU; on a CPU the dry run is the check")
    arch = get_arch(model)
    config = Sharding(**sharding)
    check(arch, setup, config)
    if get_recipe(setup.recipe).compute_dtype is not None:
        raise ValueError("cuda_rank_check takes fp32 or bf16 (or --mixed-precision bf16): no autocast recipe")
    dry = sharded_dryrun(arch, setup, **sharding)
    allocated: list[int] = []
    with _process_group(config.gpus, fake=True) as rank:
        real = _run(arch, setup, config, rank, fake=False, timeline=False, device="cuda", around=_cuda_peak(allocated))
    return {
        "dry_run_peak_bytes": dry.peak_bytes,
        "tracked_peak_bytes": real.peak_bytes,
        "allocated_peak_bytes": allocated[1],
    }


def _cuda_peak(peaks: list[int]) -> Callable[[], Any]:
    """A context factory for :func:`_run`: each step's ``max_memory_allocated``, appended to ``peaks``."""

    @contextlib.contextmanager
    def around() -> Iterator[None]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())

    return around
