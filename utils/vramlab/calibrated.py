"""Weight quantization with calibration data: GPTQ (Frantar et al., 2022) and AWQ (Lin et al.,
2023), next to plain round-to-nearest (RTN), all to the same stored format.

The format: per row of a linear's weight, groups of ``group`` consecutive input columns, each
with an asymmetric ``bits``-bit code per value, one fp16 scale and one ``bits``-bit zero point
(:func:`group_bytes`). The three methods store exactly the same bytes; they differ only in
which codes they choose, so they differ in accuracy, not in memory. GPTQ rounds one column at a
time and pushes each column's rounding error onto the columns not yet rounded, weighted by the
inverse Hessian ``H = 2·XᵀX`` of the layer's calibration inputs. AWQ scales input channels by
``s = mean|x|^α`` before rounding (the channels with large activations lose less) and divides
the inputs by ``s``, which a real model folds into the op before the linear.

Functions return *dequantized* float32 weights (simulated quantization): what the stored codes
mean, for measuring error; the stored bytes are :func:`group_bytes`. ``w`` is (out, in), ``x``
is (tokens, in), as ``nn.Linear`` sees them.
"""

from __future__ import annotations

import math

import torch


def _check(w: torch.Tensor, bits: int, group: int, x: torch.Tensor | None = None) -> None:
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w must be a 2-D floating weight (out, in), got shape {tuple(w.shape)} of {w.dtype}")
    if isinstance(bits, bool) or bits not in range(2, 9):
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")
    if isinstance(group, bool) or not isinstance(group, int) or group <= 0 or w.shape[1] % group:
        raise ValueError(f"group must be a positive divisor of the {w.shape[1]} input columns, got {group!r}")
    if x is not None and (x.dim() != 2 or x.shape[1] != w.shape[1] or x.shape[0] == 0):
        raise ValueError(f"x must be (tokens, {w.shape[1]}) calibration inputs, got shape {tuple(x.shape)}")


def group_bytes(out_features: int, in_features: int, bits: int = 4, group: int = 128) -> int:
    """Bytes the format stores for an (out, in) weight: ``bits`` per code, and per group of
    ``group`` columns of a row an fp16 scale and a ``bits``-bit zero point."""
    groups = out_features * (in_features // group)
    return math.ceil(out_features * in_features * bits / 8) + 2 * groups + math.ceil(groups * bits / 8)


def _grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point mapping each row of ``w`` (out, columns) onto [0, 2^bits - 1]."""
    top = 2**bits - 1
    lo, hi = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
    scale = ((hi - lo) / top).clamp(min=1e-8)
    return scale, torch.round(-lo / scale).clamp(0, top)


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    codes = torch.clamp(torch.round(w / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, 2**bits - 1)
    return (codes - zero.unsqueeze(-1)) * scale.unsqueeze(-1)


def rtn(w: torch.Tensor, bits: int = 4, group: int = 128) -> torch.Tensor:
    """Round-to-nearest: each group's min and max set its grid; every value takes the nearest code."""
    _check(w, bits, group)
    rows = w.float().reshape(-1, group)
    return _round(rows, *_grid(rows, bits), bits).reshape(w.shape)


def gptq(w: torch.Tensor, x: torch.Tensor, bits: int = 4, group: int = 128, damp: float = 0.01) -> torch.Tensor:
    """GPTQ: round column by column, each column's error spread over the later columns through
    the upper Cholesky factor of the inverse Hessian ``(2·XᵀX + λI)⁻¹`` (λ = ``damp`` times the
    mean diagonal). A group's grid is set when its first column is reached, from the weights as
    updated so far. Holds an (in, in) float32 Hessian while it works."""
    _check(w, bits, group, x)
    work = w.detach().float().clone()
    xf = x.detach().float()
    hessian = 2 * xf.T @ xf / xf.shape[0]
    dead = hessian.diagonal() == 0  # inputs that are always zero: their weights do not matter
    hessian[dead, dead] = 1
    work[:, dead] = 0
    hessian += damp * hessian.diagonal().mean() * torch.eye(hessian.shape[0])
    factor = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    out = torch.empty_like(work)
    for col in range(work.shape[1]):
        if col % group == 0:
            scale, zero = _grid(work[:, col : col + group], bits)
        out[:, col] = _round(work[:, col : col + 1], scale, zero, bits)[:, 0]
        err = (work[:, col] - out[:, col]) / factor[col, col]
        work[:, col:] -= err.unsqueeze(1) * factor[col, col:].unsqueeze(0)
    return out


def awq(
    w: torch.Tensor, x: torch.Tensor, bits: int = 4, group: int = 128, grid: int = 20
) -> tuple[torch.Tensor, float]:
    """AWQ's scale search: for α in 0, 1/grid, ..., (grid-1)/grid, scale input channel j by
    ``s_j = mean|x_j|^α`` (normalised), round ``W·diag(s)`` to nearest and keep the α whose
    outputs on ``x`` are closest. Returns the effective weight ``RTN(W·diag(s))·diag(1/s)``
    (what the layer computes once the inputs are divided by ``s``) and the chosen α."""
    _check(w, bits, group, x)
    wf, xf = w.detach().float(), x.detach().float()
    target = xf @ wf.T
    mean_abs = xf.abs().mean(dim=0).clamp(min=1e-8)
    best: tuple[float, torch.Tensor, float] | None = None
    for step in range(grid):
        alpha = step / grid
        s = mean_abs**alpha
        s = s / (s.max() * s.min()).sqrt()
        eff = rtn(wf * s, bits, group) / s
        err = (xf @ eff.T - target).pow(2).mean().item()
        if best is None or err < best[0]:
            best = (err, eff, alpha)
    assert best is not None
    return best[1], best[2]


def output_error(w: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    """Relative error of the layer's outputs on ``x``: ‖x·approxᵀ − x·wᵀ‖ / ‖x·wᵀ‖."""
    ref = x.float() @ w.float().T
    return ((x.float() @ approx.float().T - ref).norm() / ref.norm()).item()


def _pack4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (..., 8k) along the last dimension into int32 words (..., k), code j of
    a word in bits 4j to 4j + 3."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (codes.to(torch.int64).reshape(*codes.shape[:-1], -1, 8) << shifts).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def gptq_tensors(w: torch.Tensor, group: int = 128) -> dict[str, torch.Tensor]:
    """``w`` (out, in) as a 4-bit GPTQ checkpoint stores a linear, with round-to-nearest codes
    (any method's codes take the same bytes): ``qweight`` int32 (in/8, out), eight codes per
    word along the input; ``qzeros`` int32 (in/group, out/8); ``scales`` fp16 (in/group, out);
    ``g_idx`` int32 (in,), each input column's group. The zero points are stored as they are
    (GPTQ's "v2" convention; v1 stores zero - 1: the same bytes)."""
    _check(w, 4, group)
    out, inp = w.shape
    if out % 8:
        raise ValueError(f"GPTQ packs eight zero points per word along the outputs; {out} is not a multiple of 8")
    rows = w.float().reshape(-1, group)
    scale, zero = _grid(rows, 4)
    codes = torch.clamp(torch.round(rows / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, 15).reshape(out, inp)
    return {
        "qweight": _pack4(codes.t().reshape(inp // 8, 8, out).transpose(1, 2)).squeeze(-1),
        "qzeros": _pack4(zero.reshape(out, inp // group).t()),
        "scales": scale.reshape(out, inp // group).t().to(torch.float16).contiguous(),
        "g_idx": (torch.arange(inp) // group).to(torch.int32),
    }
