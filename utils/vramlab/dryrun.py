"""Dry runs: the exact tensor allocations of a real model's step, without the memory.

The model (a transformers ``*ForCausalLM`` built from an :class:`ArchConfig`) is created
under ``FakeTensorMode`` on device "cpu": every op runs its shape logic and returns a fake
tensor with a real size but no data, so a 7B-parameter training step takes seconds and a
few hundred MiB of RAM. The storage tracker (:mod:`vramlab.tracker`) records what a GPU's
allocator would have held at each op.

How it differs from a GPU run, stated here once: fake tensors live on the CPU device, so
ops pick their CPU kernels (attention is the CPU flash kernel, not cuDNN/FlashAttention);
autocast is CPU autocast with CUDA's float32 rules applied (:mod:`vramlab.autocast_rules`), so
ops such as GPT-2's ``pow`` save the float32 copies a GPU saves; kernels' private workspaces are not seen; the CUDA
allocator's 512-byte rounding and cache are not modelled. The optimizer uses the foreach
implementation, the default on CUDA (the CPU default is a per-tensor loop).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import anymodel
from .autocast_rules import checkpoint_contexts, cuda_fp32_ops
from .measure import Measurement, measure
from .models import ArchConfig, HFModel, check_positions, get_arch
from .offload import OffloadedAdamW
from .recipes import Recipe, check_optimizer, check_positive, get_recipe
from .results import result_json, too_large
from .setups import ATTENTIONS, Setup
from .storages import storage_bytes
from .tracker import TimelinePoint
from .units import format_bytes


@dataclass
class DryRunResult:
    """A dry-run measurement with the set-up that produced it. Sizes in bytes."""

    arch: ArchConfig | HFModel
    params: int
    measurement: Measurement
    setup: Setup
    kv_cache_bytes: int = 0  # inference: bytes of the cache's storages after the prefill
    first_step: Measurement | None = None  # training: the first step (``measurement`` is the second)
    details: dict[str, Any] | None = None  # a config without a formula: its model type, attention, experts
    host_bytes: int = 0  # offload: what the offloaded optimizer holds in host memory after the step

    @property
    def model(self) -> str:
        return self.arch.name

    @property
    def peak_bytes(self) -> int:
        return self.measurement.peak_bytes

    @property
    def breakdown(self) -> dict[str, int]:
        return self.measurement.breakdown

    @property
    def source(self) -> str:
        return self.measurement.source

    @property
    def timeline(self) -> list[TimelinePoint] | None:
        return self.measurement.timeline

    @property
    def end_breakdown(self) -> dict[str, int]:
        return self.measurement.end_breakdown

    @property
    def first_step_peak_bytes(self) -> int:
        """Training: the first step's peak (its forward and backward run before any optimizer
        state exists); ``peak_bytes`` is the second step's, which every later step repeats."""
        return self.first_step.peak_bytes if self.first_step is not None else self.peak_bytes

    def to_json(self) -> dict[str, Any]:
        """The object the CLI prints with --json (see :mod:`vramlab.results`)."""
        extra: dict[str, Any] = {"first_step_peak_bytes": self.first_step_peak_bytes} if self.first_step else {}
        if self.details:
            extra["details"] = dict(self.details)
        if self.setup.offload:
            extra["host_bytes"] = self.host_bytes
        return result_json(self, model=self.model, params=self.params, kv_cache_bytes=self.kv_cache_bytes, **extra)

    def __str__(self) -> str:
        text = f"{self.model}: {self.params:,} parameters; {self.setup.describe()}\n{self.measurement}"
        if self.details:
            text += "\n  " + anymodel.describe(self.details)
        if self.first_step is not None:
            text += (
                "\n  (the second step, which every later step repeats; the first step peaked at "
                f"{format_bytes(self.first_step_peak_bytes)}, before the optimizer state existed)"
            )
        if self.setup.offload:
            text += f"\n  (host memory: {format_bytes(self.host_bytes)} for the offloaded AdamW)"
        return text


ATTENTION = "vramlab_causal_sdpa"


def _register_causal_sdpa() -> None:
    """Register an attention implementation that is transformers' SDPA with no mask.

    With real tensors transformers sees an unpadded batch and calls SDPA with
    ``is_causal=True`` and no mask. Fake tensors cannot be read, so transformers would
    materialise a (batch, 1, seq, seq) mask that a real run never has; this registration
    (through its public ``AttentionInterface``) restores the real run's behaviour.
    """
    from .quantize import quiet_imports

    with quiet_imports():
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def no_mask(*args: Any, **kwargs: Any) -> None:
        return None

    AttentionInterface.register(ATTENTION, sdpa_attention_forward)
    AttentionMaskInterface.register(ATTENTION, no_mask)


class default_dtype(TorchDispatchMode):
    """``torch.set_default_dtype(dtype)`` for this thread only, while the block runs.

    A tensor made in the block by a factory (``empty``, ``zeros``, ``randn``...) without a
    ``dtype``, or by ``torch.tensor`` from Python floats, comes out in ``dtype`` where the
    process default (fp32) would have given fp32: what transformers' own loading in bf16 does
    with the process-wide setting, without other threads seeing bf16 meanwhile.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        lifted = func.overloadpacket in (torch.ops.aten.lift_fresh, torch.ops.aten.lift_fresh_copy)
        factory = kwargs.get("dtype") is None and not any(
            isinstance(t, torch.Tensor) for t in tree_flatten((args, kwargs))[0]
        )
        if (lifted or factory) and isinstance(out, torch.Tensor) and out.dtype == torch.get_default_dtype():
            return out.to(self.dtype)
        return out


def build_hf_model(arch: ArchConfig, dtype: torch.dtype = torch.float32, attention: str = "sdpa") -> torch.nn.Module:
    """Build the transformers causal-LM module for ``arch`` (call it under a fake mode
    unless the model is tiny: the weights are randomly initialised, never downloaded).

    Dropout is off (as in modern LLM pre-training; GPT-2's published configs use 0.1) and
    attention is causal SDPA over unpadded sequences (or ``attention="eager"``: scores
    materialised, as transformers' eager path does), with no sliding window.
    """
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}; use one of {', '.join(ATTENTIONS)}")
    from .quantize import quiet_imports

    with quiet_imports():  # transformers pulls in torchao, whose missing GPU kernels print on a CPU machine
        import transformers
        from transformers import AttentionInterface  # noqa: F401 - the lazy module's imports, silenced here

    _register_causal_sdpa()
    common = dict(vocab_size=arch.vocab_size, tie_word_embeddings=arch.tie_embeddings)
    if arch.family == "gpt2":
        config = transformers.GPT2Config(
            n_embd=arch.hidden_size,
            n_layer=arch.num_layers,
            n_head=arch.num_heads,
            n_inner=arch.intermediate_size,
            n_positions=arch.max_position,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=None,
            eos_token_id=None,
            **common,
        )
        cls = transformers.GPT2LMHeadModel
    else:
        config_cls, cls = {
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        }[arch.family]
        config = config_cls(
            hidden_size=arch.hidden_size,
            num_hidden_layers=arch.num_layers,
            num_attention_heads=arch.num_heads,
            num_key_value_heads=arch.num_kv_heads,
            intermediate_size=arch.intermediate_size,
            max_position_embeddings=arch.max_position,
            **({"sliding_window": None} if arch.family != "llama" else {}),
            **common,
        )
    config._attn_implementation = ATTENTION if attention == "sdpa" else "eager"
    with default_dtype(dtype):  # build in the target dtype: .to() cannot swap fake params
        model = cls(config)
    model.loss_type = "ForCausalLM"  # the loss transformers uses by default, named to silence its warning
    return model


def make_optimizer(name: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``params``, configured as on a GPU (foreach where it exists)."""
    name = check_optimizer(name)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, foreach=True)
    if name == "adamw-fused":
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-4, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3, foreach=True)
    if name == "sgd-momentum":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=True)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=1e-3, foreach=True)
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # quiet its notice about optional kernels
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ImportError("adamw-8bit needs bitsandbytes: pip install bitsandbytes") from None
    return bnb.optim.AdamW8bit(params, lr=1e-4)


AUTOCAST_RULES = ("cuda", "cpu")
"""Whose autocast op lists a dry run follows: CUDA's (what a GPU saves, the default) or the
CPU's own (what a CPU run saves; they differ for ops such as ``pow`` and ``layer_norm``)."""


@contextlib.contextmanager
def _autocast(recipe: Recipe, rules: str = "cuda") -> Iterator[None]:
    """The recipe's autocast, following ``rules`` (see :data:`AUTOCAST_RULES`). Backward may run
    inside too: activation checkpointing recomputes under the same rules."""
    if rules not in AUTOCAST_RULES:
        raise ValueError(f"unknown autocast rules {rules!r}; use one of {AUTOCAST_RULES}")
    if recipe.compute_dtype is None:
        yield
        return
    rule = cuda_fp32_ops() if rules == "cuda" else contextlib.nullcontext()
    with rule, torch.autocast("cpu", dtype=recipe.compute_dtype):
        yield


def dryrun(
    model: str | ArchConfig | HFModel,
    setup: Setup | None = None,
    *,
    timeline: bool = False,
    _fake: bool = True,
    **changes: Any,
) -> DryRunResult:
    """Measure one step of ``model`` by dry run (fake tensors: no memory, exact sizes).

    ``setup`` is a :class:`Setup`; keyword arguments (``batch=4, recipe="amp-bf16"``, ...)
    change its fields. Training (default): two steps of forward with labels (the loss in
    fp32, as transformers computes it), backward and an optimizer step; the result is the
    second step (the steady state: the optimizer state is alive from its start), with the
    first step's peak in ``first_step_peak_bytes``. ``inference=True``: a
    prefill of ``seq`` tokens per sequence under ``torch.inference_mode`` that builds the KV
    cache and computes the logits of the last position (what ``generate`` does).
    ``timeline`` records live bytes after every op.
    """
    setup = Setup.of(setup, **changes)
    rec = get_recipe(setup.recipe)
    if _fake and not setup.inference and setup.optimizer in ("adafactor", "adamw-8bit"):
        raise ValueError(
            f"{setup.optimizer} has no dry-run path (its step reads values with .item() or runs kernels "
            "that fake tensors cannot run). Use `vramlab estimate`, or measure a small model for "
            "real with vramlab.dryrun.realrun."
        )
    if isinstance(model, HFModel):
        target: ArchConfig | HFModel = model
        vocab = anymodel.check_setup(model, setup)
    else:
        target = arch = get_arch(model)
        check_positions(arch, setup.seq)
        vocab = arch.vocab_size
    details = None
    fake = FakeTensorMode(allow_non_fake_inputs=False) if _fake else contextlib.nullcontext()
    with fake, _quiet_fake_tensor_log():
        if isinstance(target, HFModel):
            _register_causal_sdpa()
            net, details = anymodel.build(target, rec.param_dtype, setup.attention, ATTENTION)
        else:
            net = build_hf_model(target, rec.param_dtype, setup.attention)
        params = sum(p.numel() for p in net.parameters())
        cache = host = 0
        try:
            ids = torch.randint(0, vocab, (setup.batch, setup.seq))
            first = None
            if setup.inference:
                result, cache = _prefill(net, ids, rec, timeline, setup.full_logits)
            else:
                first, result, host = _train_step(net, ids, rec, setup, timeline)
        except RuntimeError as err:
            if "overflow" in str(err):
                raise too_large(f"{target.name} with {setup.describe()}") from None
            if isinstance(target, HFModel):  # the config's own class failed: say so in one line
                first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                what = f"{target.name}: transformers' {target.model_type} model fails on it"
                raise ValueError(f"{what}: {first_line}") from None
            raise
    result.setup = setup
    return DryRunResult(target, params, result, setup, cache, first, details, host)


@contextlib.contextmanager
def _quiet_fake_tensor_log() -> Iterator[None]:
    """Keep torch's logged traceback of a failing fake op (a storage size past 2**63) off stderr
    (the dry run turns that error into one line of its own), and transformers' notes on kernels
    it falls back from: a dry run runs no kernel."""
    logs = [logging.getLogger(name) for name in ("torch._subclasses.fake_tensor", "transformers")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)


def realrun(model: str | ArchConfig, seed: int = 0, **setup: Any) -> DryRunResult:
    """The same step as :func:`dryrun` (same keyword arguments) on real tensors on the CPU,
    measured by the tracker. For small models only (it allocates for real): the
    cross-check of the dry run."""
    torch.manual_seed(seed)
    return dryrun(model, **setup, _fake=False)


def _prefill(
    net: torch.nn.Module, ids: torch.Tensor, rec: Recipe, timeline: bool, full_logits: bool = False
) -> tuple[Measurement, int]:
    """A prefill that builds the KV cache: the last position's logits (what ``generate``
    computes), or every position's with ``full_logits`` (a plain ``model(input_ids)``)."""
    net.eval()
    meter = measure(net, ids, timeline=timeline)
    with meter as m, torch.inference_mode(), _autocast(rec):
        out = net(input_ids=ids, use_cache=True, logits_to_keep=0 if full_logits else 1)
        if getattr(out, "past_key_values", None) is None:
            raise ValueError(
                f"{type(net).__name__} returns no KV cache (past_key_values): an inference dry run measures "
                "a prefill that builds one, which this model (a state-space model?) does not; dry-run training instead"
            )
        cache = list(cache_tensors(out.past_key_values))
        meter.tracker.register(cache, role="other")
        cache_bytes = storage_bytes(cache)
        del out, cache
    return m, cache_bytes


def cache_tensors(cache: Any) -> Iterator[torch.Tensor]:
    """The key and value tensors of a transformers cache (``DynamicCache`` and kin)."""
    for layer in getattr(cache, "layers", []) or []:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                yield tensor


def _train_step(
    net: torch.nn.Module, ids: torch.Tensor, rec: Recipe, setup: Setup, timeline: bool
) -> tuple[Measurement, Measurement, int]:
    """Two training steps, each measured (and, with ``setup.offload``, the bytes the
    optimizer holds in host memory): the first (no optimizer state until its step) and
    the second, which every later step repeats (the state is alive throughout). With
    ``setup.keep_outputs`` the loop holds ``outputs = model(...)``: the previous step's
    outputs live until the new forward returns, the new ones through backward and the step."""
    net.train()
    if setup.lora_rank:
        from .lora import add_adapters

        add_adapters(net, setup.lora_rank)
    if setup.checkpointing:
        _enable_checkpointing(net)
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt: Any = OffloadedAdamW(trainable) if setup.offload else make_optimizer(setup.optimizer, trainable)
    device_opt = opt.device_optimizer if setup.offload else opt  # an offloaded state is not the device's
    on_device = [device_opt] if device_opt is not None else []
    steps, outputs = [], None
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        kept = [] if outputs is None else [outputs.logits]
        with measure(net, *on_device, ids, *kept, timeline=timeline) as m:
            del kept
            with _autocast(rec):
                if setup.keep_outputs:
                    outputs = net(input_ids=ids, labels=ids, use_cache=False)  # the old outputs die here
                    loss = outputs.loss
                else:
                    loss = net(input_ids=ids, labels=ids, use_cache=False).loss
            if rec.grad_scaler:
                _scaled_backward_and_step(loss, net, opt)
            else:
                loss.backward()
                opt.step()
            del loss
        steps.append(m)
    return steps[0], steps[1], opt.host_bytes() if setup.offload else 0


def _enable_checkpointing(net: torch.nn.Module, rules: str = "cuda") -> None:
    """One non-reentrant checkpoint per decoder block, recomputing under the same autocast
    ``rules`` as the forward."""
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if rules == "cuda":
        kwargs["context_fn"] = checkpoint_contexts
    if hasattr(net, "activation_checkpointing_enable"):  # transformers >= 5
        net.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _scaled_backward_and_step(loss: torch.Tensor, net: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """GradScaler's memory behaviour on fake tensors: scale the loss, unscale the gradients
    in place (one fused op, no copies), then step. (GradScaler itself reads ``found_inf``
    with ``.item()``, which a fake tensor cannot answer.)"""
    scale = torch.full((), 2.0**16)
    (loss * scale).backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    found_inf = torch.zeros(())
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, scale.reciprocal())
    opt.step()


def saved_activations(
    model: str | ArchConfig,
    batch: int = 1,
    seq: int = 1024,
    recipe: str = "fp32",
    attention: str = "sdpa",
    checkpointing: bool = False,
    autocast_rules: str = "cuda",
) -> int:
    """Bytes autograd holds at the end of the forward pass (loss computed), by dry run.

    These are the tensors saved for backward ("activations"); autocast's 16-bit weight
    copies are not included (they are weights, not activations). ``autocast_rules``: "cuda"
    (what a GPU saves) or "cpu" (what CPU autocast saves); see :data:`AUTOCAST_RULES`.
    """
    if autocast_rules not in AUTOCAST_RULES:
        raise ValueError(f"unknown autocast_rules {autocast_rules!r}; use one of {AUTOCAST_RULES}")
    arch = get_arch(model)
    check_positive(batch=batch, seq=seq)
    rec = get_recipe(recipe)
    with FakeTensorMode():
        net = build_hf_model(arch, rec.param_dtype, attention)
        net.train()
        if checkpointing:
            _enable_checkpointing(net, autocast_rules)
        ids = torch.randint(0, arch.vocab_size, (batch, seq))
        with measure(net, ids) as m, _autocast(rec, autocast_rules):
            loss = net(input_ids=ids, labels=ids, use_cache=False).loss
        del loss
    return m.end_breakdown["activations"]
