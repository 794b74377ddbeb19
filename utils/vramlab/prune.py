"""Pruning that really saves bytes: sparse storage and structured removal of whole units.

Zeroing weights leaves every tensor the same size. Memory falls only when (a) the tensor is
stored in a sparse layout whose index overhead is below the bytes of the zeros it drops, or
(b) whole rows/columns are removed so the dense tensors themselves shrink. The structured
functions here do (b) for BERT-style encoders (``encoder.layer[i].attention`` /
``intermediate`` / ``output``), choosing what to remove by weight magnitude.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from .storages import storage_bytes


def zero_fraction(tensors: Iterable[torch.Tensor]) -> float:
    """Fraction of exactly-zero values across ``tensors`` (dense views, 0..1)."""
    zeros = total = 0
    for t in tensors:
        zeros += int((t == 0).sum())
        total += t.numel()
    if total == 0:
        raise ValueError("no values to count.")
    return zeros / total


def to_csr(dense: torch.Tensor, index_dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A compact CSR copy of a 2-D tensor: values plus row pointers and column indices in
    ``index_dtype``, each in its own storage (``Tensor.to_sparse_csr`` alone leaves
    ``col_indices`` a view of a COO index tensor twice its size)."""
    if dense.dim() != 2:
        raise ValueError(f"CSR needs a 2-D tensor, got shape {tuple(dense.shape)}.")
    if index_dtype not in (torch.int32, torch.int64):
        raise ValueError("index_dtype must be torch.int32 or torch.int64.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        s = dense.detach().to_sparse_csr()
        return torch.sparse_csr_tensor(
            s.crow_indices().to(index_dtype).clone(),
            s.col_indices().to(index_dtype).clone(),
            s.values().clone(),
            s.shape,
            check_invariants=True,
        )


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask keeping the ``1 - sparsity`` largest-magnitude entries of ``weight``."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}.")
    k = int(round(weight.numel() * sparsity))
    if k == 0:
        return torch.ones_like(weight, dtype=torch.bool)
    threshold = weight.detach().abs().reshape(-1).kthvalue(k).values
    return weight.detach().abs() > threshold


def _layers(model: nn.Module) -> list[nn.Module]:
    encoder = getattr(model, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if layers is None:
        raise TypeError(
            "structured pruning here expects a BERT-style encoder (model.encoder.layer[i]); "
            f"got {type(model).__name__}."
        )
    return list(layers)


def _check_fraction(fraction: float, what: str) -> None:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"{what} must be in [0, 1): the fraction to remove; got {fraction!r}.")


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer


def prune_ffn_neurons(model: nn.Module, fraction: float) -> nn.Module:
    """Remove ``fraction`` of each feed-forward block's hidden neurons (in place).

    A neuron is row ``j`` of ``intermediate.dense`` and column ``j`` of ``output.dense``; its
    importance is the product of their L2 norms. Both matrices really shrink.
    """
    _check_fraction(fraction, "fraction")
    for layer in _layers(model):
        up, down = layer.intermediate.dense, layer.output.dense
        score = up.weight.detach().norm(dim=1) * down.weight.detach().norm(dim=0)
        keep = score.topk(max(1, round(score.numel() * (1 - fraction)))).indices.sort().values
        layer.intermediate.dense = _linear(up.weight[keep], None if up.bias is None else up.bias[keep])
        layer.output.dense = _linear(down.weight[:, keep], down.bias)
    return model


def prune_attention_heads(model: nn.Module, fraction: float) -> nn.Module:
    """Remove ``fraction`` of the attention heads of every layer (in place).

    A head owns ``head_dim`` rows of the query, key and value projections and the same
    columns of the attention output projection; its importance is the L2 norm of those
    output columns. The attention code infers the head count from the shapes, so the
    model still runs with fewer, unchanged heads.
    """
    _check_fraction(fraction, "fraction")
    for layer in _layers(model):
        attn, out = layer.attention.self, layer.attention.output.dense
        head_dim = attn.attention_head_size
        heads = attn.query.out_features // head_dim
        score = out.weight.detach().reshape(out.out_features, heads, head_dim).norm(dim=(0, 2))
        keep_heads = score.topk(max(1, round(heads * (1 - fraction)))).indices.sort().values
        rows = (keep_heads[:, None] * head_dim + torch.arange(head_dim, device=keep_heads.device)).reshape(-1)
        for name in ("query", "key", "value"):
            proj = getattr(attn, name)
            setattr(attn, name, _linear(proj.weight[rows], None if proj.bias is None else proj.bias[rows]))
        layer.attention.output.dense = _linear(out.weight[:, rows], out.bias)
        if hasattr(attn, "num_attention_heads"):
            attn.num_attention_heads = len(keep_heads)
        if hasattr(attn, "all_head_size"):
            attn.all_head_size = len(keep_heads) * head_dim
    return model


def module_bytes(model: nn.Module) -> int:
    """Bytes of a module's parameters, buffers and (for ``torch.nn.utils.prune``) the
    recomputed ``weight`` attributes that pruning keeps beside ``weight_orig`` and the mask."""
    extra = [
        v
        for m in model.modules()
        for k, v in vars(m).items()
        if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter) and hasattr(m, k + "_orig")
    ]
    return storage_bytes([model, *extra])
