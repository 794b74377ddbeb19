"""The language-model head and its loss, with and without materialising every logit.

A causal LM's last step multiplies each token's hidden state by the vocabulary matrix and
takes the cross-entropy: ``tokens x vocab`` logits. With Llama-3's 128,256-token vocabulary
that tensor is larger than a block's activations, and Hugging Face's loss upcasts it to fp32
(``ForCausalLMLoss``: ``logits.float()``) before ``cross_entropy``, whose backward adds a
gradient of the same size. :func:`chunked_cross_entropy` computes the same loss a chunk of
tokens at a time and recomputes each chunk's logits in backward, so only one chunk's logits
(and their gradient) are ever alive. Liger Kernel's fused linear cross-entropy and Cut
Cross-Entropy also avoid materialising every logit, each in its own kernels; this is the plain
PyTorch version, written with ``torch.utils.checkpoint``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def full_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hugging Face's way: all logits (in the compute dtype), upcast to fp32, mean cross-entropy
    over the labels that are not -100. ``hidden``: (..., h); ``weight``: (vocab, h); ``labels``: (...)."""
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """The same value and gradients as :func:`full_cross_entropy`, computed ``chunk`` tokens at a
    time: each chunk's logits are made, upcast, reduced to a summed loss and freed; backward
    recomputes them (``torch.utils.checkpoint``), so at most one chunk's logits are alive."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk!r}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} needs one label per token, got labels {tuple(labels.shape)}")
    flat, targets = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk):
        part = slice(start, start + chunk)
        total = total + checkpoint(_summed_loss, flat[part], weight, targets[part], use_reentrant=False)
    return total / (targets != -100).sum()


def _summed_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
