"""The peak of a training step or prefill: the total at each candidate moment, the largest wins."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..models import ArchConfig, check_positions, get_arch
from ..recipes import Recipe, check_positive, get_recipe
from ..results import MAX_BYTES, result_json, too_large
from ..setups import Setup
from ..units import format_bytes
from .activations import activation_bytes, checkpoint_input_bytes, head_terms, layer_terms, rotary_bytes
from .params import matmul_param_count, param_count, param_counts_by_part
from .states import offload_bytes, optimizer_state_bytes, optimizer_temp_bytes


@dataclass
class Estimate:
    """A formula estimate of one training step or prefill. All sizes in bytes.

    ``breakdown`` splits the peak into parameters, gradients, optimizer, activations and
    other (16-bit weight copies, loss and optimizer temporaries, the KV cache in inference);
    ``moments`` is the total at each candidate moment of the step; the peak is the largest.
    Training reports the *steady state*: every step after the first, when the optimizer
    state is alive through forward and backward too. ``first_step_peak_bytes`` and
    ``first_step_moment`` are the first step's (no state until its optimizer step).
    ``details`` holds what a special method adds to the :class:`Setup` (QLoRA's rank).
    ``host_bytes``: with ``offload``, what the offloaded optimizer keeps in host memory.
    """

    model: str
    params: int
    setup: Setup
    breakdown: dict[str, int]
    peak_bytes: int
    peak_moment: str
    moments: dict[str, int] = field(default_factory=dict)
    kv_cache_bytes: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    source: str = "formula"
    first_step_peak_bytes: int = 0
    first_step_moment: str = ""
    host_bytes: int = 0
    arch: ArchConfig | None = field(default=None, repr=False, compare=False)  # the model it sized

    def to_json(self) -> dict[str, Any]:
        """The object the CLI prints with --json (see :mod:`vramlab.results`)."""
        return result_json(
            self,
            model=self.model,
            params=self.params,
            peak_moment=self.peak_moment,
            moments=dict(self.moments),
            kv_cache_bytes=self.kv_cache_bytes,
            details=dict(self.details),
            **({"host_bytes": self.host_bytes} if self.setup.offload else {}),
            **(
                dict(first_step_peak_bytes=self.first_step_peak_bytes, first_step_moment=self.first_step_moment)
                if self.first_step_moment
                else {}
            ),
        )

    def __str__(self) -> str:
        when = "steady-state peak (every step after the first)" if self.first_step_moment else "peak"
        lines = [f"{self.model}: {self.params:,} parameters, {self.source} estimate, {when} at {self.peak_moment}"]
        for role, value in self.breakdown.items():
            lines.append(f"  {role:<12}{format_bytes(value):>12}")
        if self.kv_cache_bytes:
            lines.append(f"  {'(KV cache)':<12}{format_bytes(self.kv_cache_bytes):>12}  (included in other)")
        lines.append(f"  {'peak':<12}{format_bytes(self.peak_bytes):>12}")
        if self.setup.offload:
            lines.append(f"  (host memory: {format_bytes(self.host_bytes)} for the offloaded AdamW)")
        if self.first_step_moment:
            lines.append(
                f"  (first step: {format_bytes(self.first_step_peak_bytes)} at {self.first_step_moment}; "
                "its forward and backward run before any optimizer state exists)"
            )
        return "\n".join(lines)


def _moment(
    parameters: int = 0, gradients: int = 0, optimizer: int = 0, activations: int = 0, other: int = 0
) -> dict[str, int]:
    return {
        "parameters": int(parameters),
        "gradients": int(gradients),
        "optimizer": int(optimizer),
        "activations": int(activations),
        "other": int(other),
    }


def estimate(model: str | ArchConfig, setup: Setup | None = None, **changes: Any) -> Estimate:
    """Estimate the peak memory of one training step (forward, backward, optimizer step) or,
    with ``inference=True``, of a prefill of ``seq`` tokens that builds the KV cache.

    ``setup`` is a :class:`Setup`; keyword arguments (``batch=4, recipe="amp-bf16"``, ...)
    change its fields (or the defaults')."""
    arch = get_arch(model)
    setup = Setup.of(setup, **changes)
    check_positions(arch, setup.seq)
    rec = get_recipe(setup.recipe)
    if setup.lora_rank:
        raise ValueError(
            "LoRA fine-tuning is measured by dry run only (`vramlab dryrun --lora RANK`); for QLoRA's "
            "formula see vramlab.estimate.qlora_estimate (`vramlab estimate --qlora RANK --checkpointing`)"
        )
    if setup.keep_outputs or setup.full_logits:
        raise ValueError(
            "the formula models `loss = model(...).loss` in training and generate's last-position prefill in "
            "inference; keep_outputs and full_logits are measured by dry run only (`vramlab dryrun "
            "--keep-outputs` / `--full-logits`)"
        )
    if setup.inference and setup.attention == "eager":
        raise ValueError(
            "the inference estimate models fused (SDPA) attention only; for eager attention "
            "measure the prefill with `vramlab dryrun --inference --attention eager`"
        )
    batch, seq = setup.batch, setup.seq
    moments = (_inference_moments if setup.inference else _training_moments)(
        arch, batch, seq, rec, setup.optimizer, setup.checkpointing, setup.attention
    )
    first: dict[str, Any] = {}
    host = 0
    state = 0 if setup.inference else optimizer_state_bytes(arch, setup.optimizer, rec.name)
    if setup.offload:
        split = offload_bytes(arch, rec.name)
        state, host = split["device_state"], split["host"]
        moments["optimizer step"] = {**moments["optimizer step"], "optimizer": state, "other": 0}  # fused: no temp
    if not setup.inference:
        first_name = _largest(moments)
        first = dict(first_step_peak_bytes=sum(moments[first_name].values()), first_step_moment=first_name)
        moments = steady_state(moments, state)
    name = _largest(moments)
    if sum(moments[name].values()) > MAX_BYTES:
        raise too_large(f"{arch.name} with {setup.describe()}")
    kv = kv_cache_bytes(arch, batch, seq, rec.name) if setup.inference else 0
    return Estimate(
        model=arch.name,
        params=param_count(arch),
        setup=setup,
        breakdown=moments[name],
        peak_bytes=sum(moments[name].values()),
        peak_moment=name,
        moments={k: sum(v.values()) for k, v in moments.items()},
        kv_cache_bytes=kv,
        host_bytes=host,
        arch=arch,
        **first,
    )


def _largest(moments: dict[str, dict[str, int]]) -> str:
    return max(moments, key=lambda k: sum(moments[k].values()))


def steady_state(moments: dict[str, dict[str, int]], state_bytes: int) -> dict[str, dict[str, int]]:
    """The moments of every step after the first: the optimizer state (``state_bytes``)
    created by the first optimizer step is alive through forward and backward as well.
    (Gradients are not: ``zero_grad(set_to_none=True)`` frees them before the forward.)"""
    return {k: v if v["optimizer"] else {**v, "optimizer": state_bytes} for k, v in moments.items()}


def _training_moments(
    arch: ArchConfig, batch: int, seq: int, rec: Recipe, optimizer: str, checkpointing: bool, attention: str
) -> dict[str, dict[str, int]]:
    tokens, v, h = batch * seq, arch.vocab_size, arch.hidden_size
    p, c, amp = rec.param_bytes, rec.compute_bytes, rec.autocast
    params = param_count(arch)
    weights = grads = params * p
    copies = 2 * matmul_param_count(arch) if amp else 0
    head_params = v * h
    head_copy = 2 * head_params if amp else 0
    acts = activation_bytes(arch, batch, seq, rec.name, attention, checkpointing)
    logits = (4 * v if c == 4 else (c + 4) * v) * tokens  # logits, and their fp32 upcast
    if amp:  # the final norm's fp32 output, held by the model's forward (autograd saved its copy)
        logits += 4 * h * tokens
    layer = sum(t.bytes_per_token for t in layer_terms(arch, rec.name, attention, seq)) * tokens
    saved_copies = head_copy if checkpointing else copies  # autocast's cache dies with autocast
    head_bwd = max(
        4 * v * tokens + (c * v * tokens if amp else 0),  # loss gradient and its cast
        c * v * tokens + c * h * tokens + c * head_params,  # LM head matmul backward
        (c + 4) * head_params + c * h * tokens if amp else 0,  # 16-bit weight gradient cast up
    )
    moments = {
        "end of forward": _moment(weights, activations=acts, other=copies + logits),
        "start of backward": _moment(weights, activations=acts, other=saved_copies + 8 * v * tokens),
        "LM head backward": _moment(weights, activations=acts - 4 * v * tokens, other=saved_copies + head_bwd),
        "end of backward": _moment(weights, grads, other=_embedding_backward(arch, rec, tokens)),
        "optimizer step": _moment(
            weights,
            grads,
            optimizer_state_bytes(arch, optimizer, rec.name),
            other=optimizer_temp_bytes(arch, optimizer, rec.name),
        ),
    }
    moments.update(
        _block_backward_moments(arch, batch, seq, rec, checkpointing, attention, acts, layer, weights, grads)
    )
    return moments


def _block_backward_moments(
    arch: ArchConfig,
    batch: int,
    seq: int,
    rec: Recipe,
    checkpointing: bool,
    attention: str,
    acts: int,
    layer: float,
    weights: int,
    grads: int,
) -> dict[str, dict[str, int]]:
    """Backward through one block: what the block saved (recomputed first under checkpointing)
    plus the largest working set of its backward, at the last block (processed first, with
    most activations still saved) and at the first block (processed last, with nearly all
    gradients present)."""
    tokens, v, h, i = batch * seq, arch.vocab_size, arch.hidden_size, arch.intermediate_size
    p, c, amp = rec.param_bytes, rec.compute_bytes, rec.autocast
    groups = param_counts_by_part(arch)
    block_params = (groups["attention"] + groups["mlp"]) // arch.num_layers
    head_grad = p * v * h if not arch.tie_embeddings else 0
    embedding_grad = p * groups["embedding"] if not arch.tie_embeddings else 0
    residual_grad = rec.param_bytes * h
    working = residual_grad + max(
        2 * c * i,  # MLP: gradients of two of its activations
        6 * 4 * h if (arch.family != "gpt2" and rec.name == "bf16") else 0,  # RMSNorm backward upcast to fp32
        2 * 4 * arch.num_heads * seq if attention == "eager" else 0,  # softmax backward: two seq x seq gradients
    )
    weight_copies = 2 * block_params if amp else 0  # this block's 16-bit weight copies (recomputed under checkpointing)
    weight_grad_cast = 2 * h * i if amp else 0  # a 16-bit weight gradient before its fp32 cast
    head_saved = sum(t.bytes_per_token for t in head_terms(arch, rec.name)) * tokens
    recomputed = layer if checkpointing else 0
    last = _moment(
        weights,
        head_grad,
        activations=acts - head_saved + recomputed,
        other=weight_copies * (1 if checkpointing else arch.num_layers) + weight_grad_cast + working * tokens,
    )
    saved_first = (checkpoint_input_bytes(arch, rec.name) * tokens if checkpointing else 0) + layer
    first = _moment(
        weights,
        grads - embedding_grad - p * block_params,
        activations=saved_first,
        other=weight_copies + weight_grad_cast + working * tokens,
    )
    return {"backward through the last block": last, "backward through the first block": first}


def _embedding_backward(arch: ArchConfig, rec: Recipe, tokens: int) -> int:
    """Transient bytes of the embedding's backward, the last op of backward: the gradient of
    its output; a tied matrix also has its lookup gradient summed out of place into the
    LM head's gradient (new gradient and sum alive together)."""
    p = rec.param_bytes
    output_grad = rec.param_bytes * arch.hidden_size * tokens
    table = p * arch.vocab_size * arch.hidden_size
    return max(2 * table, table + output_grad) if arch.tie_embeddings else output_grad


def kv_cache_bytes(model: str | ArchConfig, batch: int, seq: int, recipe: str = "bf16") -> int:
    """Bytes the KV cache of ``seq`` tokens per sequence holds after a transformers prefill.

    The textbook count is 2 · layers · kv_heads · head_dim · seq · batch · bytes
    (:func:`kv_cache_bytes_classic`). transformers stores keys and values in the keys'
    dtype; under autocast a Llama-family model's keys come out of the rotary multiply in
    fp32, so its cache is fp32 even though the projections ran in 16 bit.
    """
    arch = get_arch(model)
    check_positive(batch=batch, seq=seq)
    check_positions(arch, seq)
    rec = get_recipe(recipe)
    key_bytes = 4 if (rec.autocast and arch.family != "gpt2") else rec.compute_bytes
    nbytes = kv_cache_bytes_classic(arch.num_layers, arch.num_kv_heads, arch.head_dim, seq, batch, key_bytes)
    if nbytes >= MAX_BYTES:
        raise too_large(f"the KV cache of {arch.name} at batch {batch}, seq {seq}")
    return nbytes


def kv_cache_bytes_classic(
    layers: int, kv_heads: int, head_dim: int, seq: int, batch: int, bytes_per_value: float
) -> int:
    """The textbook KV-cache size: 2 · layers · kv_heads · head_dim · seq · batch · bytes."""
    check_positive(layers=layers, kv_heads=kv_heads, head_dim=head_dim, seq=seq, batch=batch)
    return int(2 * layers * kv_heads * head_dim * seq * batch * bytes_per_value)


def _inference_moments(
    arch: ArchConfig, batch: int, seq: int, rec: Recipe, optimizer: str, checkpointing: bool, attention: str
) -> dict[str, dict[str, int]]:
    """The prefill's peak is in the last block's MLP, when the KV cache is complete.

    Alive there besides weights and cache (bytes per token): the embedding output, the
    block's input, the residual after attention and the norm output (GPT-2 also keeps the
    position embedding and two more hidden states), plus the MLP's temporaries; under
    autocast, one 16-bit copy of an MLP weight at a time.
    """
    tokens, h, i = batch * seq, arch.hidden_size, arch.intermediate_size
    p, c, amp = rec.param_bytes, rec.compute_bytes, rec.autocast
    weights = param_count(arch) * p
    kv = kv_cache_bytes(arch, batch, seq, rec.name) + rotary_bytes(arch, rec.name, seq)
    r = rec.param_bytes  # residual stream dtype
    per_position = 0
    if arch.family == "gpt2":
        # token embedding, block input, residual, LayerNorm output, the (16-bit under autocast)
        # dropout copy of the embeddings; the position embedding is one per position. gelu_new's
        # last multiply holds its input x, 1 + tanh, 0.5·x and the product: under autocast CUDA's
        # rule runs pow in fp32, so 1 + tanh and the product are fp32
        base, per_position = (4 * r + c) * h, r * h * seq
        mlp = (2 * c + 8) * i if amp else 4 * c * i
    else:
        base = 4 * r * h - (r * h if arch.num_layers == 1 else 0)  # embedding, block input, residual, norm output
        mlp = 3 * c * i  # silu(gate), up, product
    moments = {"last block's MLP": _moment(weights, activations=(base + mlp) * tokens + per_position, other=kv)}
    if amp:
        copy = 2 * h * i  # the 16-bit copy of one MLP weight, made for one matmul
        into_mlp = (base + c * h + (2 if arch.gated_mlp else 1) * c * i) * tokens + per_position
        moments["MLP projection under autocast"] = _moment(weights, activations=into_mlp, other=kv + copy)
        if arch.family == "gpt2":  # c_proj: gelu_new's fp32 product (CUDA's rule), its 16-bit copy and the output
            into_proj = (base + (4 + c) * i + c * h) * tokens + per_position
            moments["c_proj under autocast"] = _moment(weights, activations=into_proj, other=kv + copy)
    return moments
