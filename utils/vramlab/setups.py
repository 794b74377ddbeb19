"""What one step does, validated once: :class:`Setup`, taken by estimate, dryrun, the CLI
and the calculator widget alike."""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .recipes import check_optimizer, check_positive, get_recipe

ATTENTIONS = ("sdpa", "eager")
MINIMAL_SIZE = 4096  # torchao CPUOffloadOptimizer's default: smaller parameters stay on the device


@dataclass(frozen=True)
class Setup:
    """One training step (forward, backward, optimizer step) or, with ``inference``, one
    prefill of ``seq`` tokens per sequence that builds the KV cache.

    Args:
        batch: sequences per step (> 0). seq: tokens per sequence (> 0).
        recipe: precision recipe, see :mod:`vramlab.recipes` (fp32, amp-bf16, amp-fp16, bf16).
        optimizer: adamw (foreach), adamw-fused, adam, sgd, sgd-momentum, adafactor or adamw-8bit
            (training only).
        checkpointing: one activation checkpoint per block (training only).
        inference: a prefill instead of a training step.
        attention: "sdpa" (fused, no s x s scores kept) or "eager" (scores materialised).
        keep_outputs: training only. The caller keeps ``outputs = model(...)`` (so its logits)
            alive from one step to the next, as ``outputs = model(**batch); loss =
            outputs.loss`` loops do; the default models ``loss = model(...).loss``.
        full_logits: inference only. A plain forward that computes logits at every position;
            the default models ``generate``'s prefill, which computes the last position's.
        lora_rank: training only; 0 trains every weight. Otherwise the base model is frozen and
            rank-``lora_rank`` LoRA adapters in fp32 train on each attention and MLP linear
            (:mod:`vramlab.lora`; dry run only).
        offload: training with AdamW only. The optimizer state and step live in host memory,
            as ``torchao.optim.CPUOffloadOptimizer`` keeps them with its defaults (fused AdamW
            on the host, gradients kept on the device, parameters under 4096 elements stepped
            on the device; :mod:`vramlab.offload`).

    Names are normalised (``"AMP-BF16"`` becomes ``"amp-bf16"``); a bad value raises a
    ``ValueError`` that lists the valid ones.
    """

    batch: int = 1
    seq: int = 1024
    recipe: str = "fp32"
    optimizer: str = "adamw"
    checkpointing: bool = False
    inference: bool = False
    attention: str = "sdpa"
    keep_outputs: bool = False
    full_logits: bool = False
    lora_rank: int = 0
    offload: bool = False

    def __post_init__(self) -> None:
        for name in ("batch", "seq", "lora_rank"):  # NumPy integers (np.int64(4)) are whole numbers too
            value = getattr(self, name)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                object.__setattr__(self, name, int(value))
        check_positive(batch=self.batch, seq=self.seq)
        object.__setattr__(self, "recipe", get_recipe(self.recipe).name)
        object.__setattr__(self, "optimizer", check_optimizer(self.optimizer))
        for name in ("checkpointing", "inference", "keep_outputs", "full_logits", "offload"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.keep_outputs and self.inference:
            raise ValueError("keep_outputs describes a training loop; for inference use full_logits")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"lora_rank must be 0 (no adapters) or a positive whole number, got {self.lora_rank!r}")
        if self.lora_rank and self.inference:
            raise ValueError("lora_rank describes fine-tuning; an inference prefill has no adapters to train")
        if self.inference and self.checkpointing:
            raise ValueError("checkpointing recomputes activations for backward; an inference prefill has no backward")
        if self.inference and self.optimizer != "adamw":
            raise ValueError(f"an inference prefill has no optimizer; drop optimizer={self.optimizer!r}")
        if self.full_logits and not self.inference:
            raise ValueError("full_logits describes an inference forward; for training use keep_outputs")
        if self.offload:
            self._check_offload()
        attention = str(self.attention).lower()
        if attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {self.attention!r}; use one of {', '.join(ATTENTIONS)}")
        object.__setattr__(self, "attention", attention)

    def _check_offload(self) -> None:
        if self.inference:
            raise ValueError("offload moves the optimizer state to the host; an inference prefill has none")
        if self.optimizer not in ("adamw", "adamw-fused"):
            raise ValueError(
                f"offload models torchao's CPUOffloadOptimizer with AdamW (fused, on the host); "
                f"use optimizer 'adamw', not {self.optimizer!r}"
            )
        if get_recipe(self.recipe).grad_scaler:
            raise ValueError(
                "offload with amp-fp16 is not modelled (GradScaler would unscale gradients the host already "
                "copied); use amp-bf16, bf16 or fp32"
            )

    @classmethod
    def of(cls, setup: Setup | None = None, **changes: Any) -> Setup:
        """``setup`` (default: the defaults) with ``changes`` applied, validated."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown setup field(s) {unknown}; a Setup has {sorted(known)}")
        if setup is not None and not isinstance(setup, Setup):
            raise TypeError(f"setup must be a vramlab.Setup, got {type(setup).__name__}")
        return replace(setup or cls(), **changes)

    def to_json(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return asdict(self)

    def describe(self) -> str:
        """One line, e.g. ``training step, batch 4, seq 2048, amp-bf16, adamw (foreach), checkpointing``:
        the optimizer says which implementation was modelled (foreach or fused)."""
        if self.inference:
            kind = "forward with logits at every position" if self.full_logits else "prefill"
            return f"{kind} (inference), batch {self.batch}, seq {self.seq}, {self.recipe}, {self.attention} attention"
        optimizer = {"adamw": "adamw (foreach)", "adam": "adam (foreach)"}.get(self.optimizer, self.optimizer)
        if self.offload:
            optimizer = "adamw offloaded (state and fused step in host memory, torchao CPUOffloadOptimizer)"
        return (
            f"training step, batch {self.batch}, seq {self.seq}, {self.recipe}, {optimizer}, "
            f"{self.attention} attention"
            + (", checkpointing" if self.checkpointing else "")
            + (", outputs kept between steps" if self.keep_outputs else "")
            + (f", rank-{self.lora_rank} LoRA adapters on a frozen base" if self.lora_rank else "")
        )
