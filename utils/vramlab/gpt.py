"""A small GPT in plain PyTorch, for measurements that run in seconds on a CPU.

Every tensor it creates is visible to the storage tracker, and its shapes follow the usual
decoder-only layout (token + position embeddings, pre-norm blocks of attention and a GELU
MLP, a tied LM head), so what the course measures on it carries over to real LLMs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

from .recipes import check_positive


@dataclass(frozen=True)
class GPTConfig:
    """Shape of :class:`TinyGPT`. ``attention``: "sdpa" (fused) or "eager" (scores kept)."""

    vocab_size: int = 256
    seq_len: int = 128
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        check_positive(
            vocab_size=self.vocab_size,
            seq_len=self.seq_len,
            hidden=self.hidden,
            layers=self.layers,
            heads=self.heads,
            mlp_ratio=self.mlp_ratio,
        )
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.attention not in ("sdpa", "eager"):
            raise ValueError(f"attention must be 'sdpa' or 'eager', got {self.attention!r}")

    @property
    def params(self) -> int:
        """Parameter count by formula (tied head, biases in linears and LayerNorms)."""
        h, i = self.hidden, self.mlp_ratio * self.hidden
        block = (4 * h * h + 4 * h) + (2 * h * i + i + h) + 2 * 2 * h
        return self.vocab_size * h + self.seq_len * h + self.layers * block + 2 * h


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.ln1, self.ln2 = nn.LayerNorm(cfg.hidden), nn.LayerNorm(cfg.hidden)
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.fc = nn.Linear(cfg.hidden, cfg.mlp_ratio * cfg.hidden)
        self.out = nn.Linear(cfg.mlp_ratio * cfg.hidden, cfg.hidden)

    def attend(self, x: torch.Tensor, cache: list[torch.Tensor] | None = None) -> torch.Tensor:
        b, s, h = x.shape
        heads = self.cfg.heads
        q, k, v = self.qkv(x).view(b, s, 3, heads, h // heads).permute(2, 0, 3, 1, 4)
        if cache is not None:  # append to this block's keys and values
            if cache:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            else:  # own storage, so the cache does not pin the whole fused q/k/v output
                k, v = k.contiguous(), v.contiguous()
            cache[:] = [k, v]
        causal = cache is None or q.shape[2] > 1
        if self.cfg.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            if causal:
                t = k.shape[2]
                mask = torch.ones(s, t, dtype=torch.bool, device=x.device).tril(t - s)
                scores = scores.masked_fill(~mask, float("-inf"))
            y = scores.softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, s, h))

    checkpoint_attention = False  # recompute attention in backward instead of saving its activations

    def forward(self, x: torch.Tensor, cache: list[torch.Tensor] | None = None) -> torch.Tensor:
        if self.checkpoint_attention and cache is None and torch.is_grad_enabled():
            x = x + checkpoint(lambda h: self.attend(self.ln1(h)), x, use_reentrant=False)
        else:
            x = x + self.attend(self.ln1(x), cache)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


SAVED_BY_SELECTIVE = (
    "aten.mm.default",
    "aten.addmm.default",
    "aten.bmm.default",
    "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "aten._scaled_dot_product_flash_attention.default",
    "aten._scaled_dot_product_efficient_attention.default",
    "aten._scaled_dot_product_cudnn_attention.default",
)
"""The ops whose outputs selective checkpointing keeps (the expensive ones); the rest is recomputed."""


def _save_expensive(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: ARG001
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if str(op) in SAVED_BY_SELECTIVE else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context() -> Any:
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_save_expensive)


class TinyGPT(nn.Module):
    """A decoder-only language model. ``forward(ids)`` returns logits (batch, seq, vocab)."""

    def __init__(self, cfg: GPTConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or GPTConfig()
        self.tok = nn.Embedding(self.cfg.vocab_size, self.cfg.hidden)
        self.pos = nn.Embedding(self.cfg.seq_len, self.cfg.hidden)
        self.blocks = nn.ModuleList(Block(self.cfg) for _ in range(self.cfg.layers))
        self.ln = nn.LayerNorm(self.cfg.hidden)
        self.checkpoint_every = 0
        self.checkpoint_segments = 0
        self.checkpoint_context: Callable[[], Any] | None = None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """GPT-2's initialisation: N(0, 0.02) weights, zero biases (so the first loss is near ln V)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def set_checkpointing(
        self, every: int = 0, attention_only: bool = False, segments: int = 0, save_matmuls: bool = False
    ) -> TinyGPT:
        """Activation checkpointing: every ``every``-th block whole, or only the attention of
        every block, or ``segments`` equal runs of blocks (``checkpoint_sequential``). 0 / False: off.
        ``save_matmuls`` (with ``every``): selective checkpointing, PyTorch's
        ``create_selective_checkpoint_contexts`` with a policy that keeps the outputs of matrix
        products and attention (:data:`SAVED_BY_SELECTIVE`) and recomputes the cheap rest."""
        if every < 0 or segments < 0 or (segments and self.cfg.layers % segments):
            raise ValueError(
                f"every >= 0 and segments must divide the {self.cfg.layers} layers; "
                f"got every={every}, segments={segments}"
            )
        if save_matmuls and not every:
            raise ValueError("save_matmuls selects what a checkpointed block keeps: set every=1 (or more) too")
        self.checkpoint_every, self.checkpoint_segments = every, segments
        self.checkpoint_context = _selective_context if save_matmuls else None
        for block in self.blocks:
            block.checkpoint_attention = attention_only
        return self

    def forward(
        self, ids: torch.Tensor, caches: list[list[torch.Tensor]] | None = None, start: int = 0
    ) -> torch.Tensor:
        if ids.dim() != 2:
            raise ValueError(f"ids must be (batch, seq) token ids, got shape {tuple(ids.shape)}")
        if start + ids.shape[1] > self.cfg.seq_len:
            raise ValueError(f"{start + ids.shape[1]} positions exceed seq_len={self.cfg.seq_len}")
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)
        x = self.tok(ids) + self.pos(positions)
        training = caches is None and torch.is_grad_enabled()
        if training and self.checkpoint_segments:
            x = checkpoint_sequential(self.blocks, self.checkpoint_segments, x, use_reentrant=False)
        else:
            for i, block in enumerate(self.blocks):
                if training and self.checkpoint_every and i % self.checkpoint_every == 0:
                    extra = {"context_fn": self.checkpoint_context} if self.checkpoint_context else {}
                    x = checkpoint(block, x, use_reentrant=False, **extra)
                else:
                    x = block(x, None if caches is None else caches[i])
        return self.ln(x) @ self.tok.weight.t()  # tied LM head

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy of a batch of sequences."""
        logits = self(ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    def new_cache(self) -> list[list[torch.Tensor]]:
        """An empty KV cache: one [keys, values] list per block, filled by ``forward``."""
        return [[] for _ in self.blocks]

    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy generation with a KV cache: one prefill, then one token per step."""
        check_positive(new_tokens=new_tokens)
        caches = self.new_cache()
        logits = self(ids, caches)
        out = [ids]
        for step in range(new_tokens):
            nxt = logits[:, -1:].argmax(-1)
            out.append(nxt)
            if step + 1 < new_tokens:
                logits = self(nxt, caches, start=ids.shape[1] + step)
        return torch.cat(out, dim=1)


class Training(NamedTuple):
    """A model, its optimizer and a batch: what a training-step measurement starts from."""

    model: TinyGPT
    opt: torch.optim.Optimizer
    ids: torch.Tensor


def tiny_training(
    cfg: GPTConfig,
    batch: int,
    device: str | torch.device = "cpu",
    *,
    lr: float = 1e-3,
    seed: int = 0,
    foreach: bool = True,
) -> Training:
    """``TinyGPT(cfg)`` on ``device``, AdamW over its parameters (``foreach``, the CUDA
    default, keeps one parameter-sized temporary) and ``random_batch(cfg, batch, seed)``.

    >>> model, opt, ids = tiny_training(GPTConfig(), batch=8)
    """
    model = TinyGPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, foreach=foreach)
    return Training(model, opt, random_batch(cfg, batch, seed).to(device))


def random_batch(cfg: GPTConfig, batch: int, seed: int = 0) -> torch.Tensor:
    """Token ids (batch, seq_len) from a seeded generator: reproducible synthetic data."""
    check_positive(batch=batch)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=gen)


def pattern_batch(cfg: GPTConfig, batch: int, seed: int = 0) -> torch.Tensor:
    """Learnable synthetic token ids (batch, seq_len): each sequence counts up from a random
    start by a random stride (mod the vocabulary), so the next token follows from the last two."""
    check_positive(batch=batch)
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, cfg.vocab_size, (batch, 1), generator=gen)
    stride = torch.randint(1, 8, (batch, 1), generator=gen)
    return (start + stride * torch.arange(cfg.seq_len)) % cfg.vocab_size
