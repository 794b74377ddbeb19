"""Low-bit number formats written out by hand: absmax, zero-point, blockwise and NF4.

Each quantizer returns a :class:`Quantized`: the integer codes and the constants needed to
rebuild the values, all as real tensors, so its size is *measured* (``nbytes`` counts their
storages) rather than computed from "numel x bits". 4-bit codes are packed two per byte.

These are teaching implementations: short, exact and checked against bitsandbytes (NF4) in
the tests. Use torchao or bitsandbytes to quantize a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .storages import storage_bytes


@dataclass
class Quantized:
    """Integer codes plus what it takes to turn them back into floats.

    ``codes`` holds ``bits``-bit integers (packed two per uint8 byte when ``bits == 4``);
    ``scales`` (and ``zero_points``) hold one value per block; ``code`` is a lookup table for
    non-uniform formats (NF4); ``offset`` is subtracted from unsigned packed codes.
    ``shape`` and ``numel`` describe the original tensor.
    """

    name: str
    bits: int
    block: int
    shape: tuple[int, ...]
    numel: int
    codes: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None = None
    code: torch.Tensor | None = None
    offset: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor needed to rebuild the values (measured storages)."""
        parts = [self.codes, self.scales, self.zero_points, self.code]
        return storage_bytes([t for t in parts if t is not None])

    @property
    def bytes_per_value(self) -> float:
        """Measured bytes per original value, constants included."""
        return self.nbytes / self.numel

    def dequantize(self) -> torch.Tensor:
        """The float32 tensor these codes stand for, in the original shape."""
        stored = self.scales.numel() * self.block  # the original values plus block padding
        q = unpack_int4(self.codes, stored) if self.bits == 4 else self.codes
        q = q.reshape(-1, self.block).to(torch.float32) - self.offset
        if self.code is not None:
            values = self.code[q.long()]
        elif self.zero_points is not None:
            values = q - self.zero_points.to(torch.float32)[:, None]
        else:
            values = q
        return (values * self.scales[:, None]).reshape(-1)[: self.numel].reshape(self.shape)


def _check_input(x: torch.Tensor, block: int | None) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(
            "quantize a floating-point torch.Tensor (got "
            f"{type(x).__name__}{'' if not isinstance(x, torch.Tensor) else ' of ' + str(x.dtype)})."
        )
    if x.numel() == 0:
        raise ValueError("cannot quantize an empty tensor.")
    if block is not None and (not isinstance(block, int) or block <= 0):
        raise ValueError(f"block must be a positive int (values per scale), got {block!r}.")


def _blocks(x: torch.Tensor, block: int | None) -> tuple[torch.Tensor, int]:
    """Flatten ``x`` to rows of ``block`` values (zero-padded); block None = one block."""
    flat = x.detach().reshape(-1).to(torch.float32)
    size = flat.numel() if block is None else block
    pad = (-flat.numel()) % size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.reshape(-1, size), size


def absmax_quantize(x: torch.Tensor, bits: int = 8, block: int | None = None) -> Quantized:
    """Symmetric quantization: scale each block by its largest magnitude.

    ``q = round(x / s)`` with ``s = max|x| / (2**(bits-1) - 1)``; ``block=None`` uses one
    scale for the whole tensor (per-tensor), an int uses one fp32 scale per ``block`` values.
    Codes are int8 for 5-8 bits and packed two per byte for 4 bits.
    """
    _check_input(x, block)
    if bits not in range(2, 9):
        raise ValueError(f"bits must be between 2 and 8, got {bits!r}.")
    rows, size = _blocks(x, block)
    qmax = 2 ** (bits - 1) - 1
    scales = rows.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / qmax
    q = torch.round(rows / scales[:, None]).clamp(-qmax, qmax).to(torch.int8)
    codes = pack_int4(q.reshape(-1) + 8) if bits == 4 else q
    name = f"absmax int{bits}" + ("" if block is None else f" (block {size})")
    return Quantized(name, bits, size, tuple(x.shape), x.numel(), codes, scales, offset=8 if bits == 4 else 0)


def zeropoint_quantize(x: torch.Tensor, bits: int = 8) -> Quantized:
    """Asymmetric (affine) quantization of the whole tensor: map [min, max] onto the full
    unsigned range with a scale and an integer zero point. Wins over absmax when the values
    are not centred on zero (activations after ReLU, for example)."""
    _check_input(x, None)
    if bits not in range(2, 9):
        raise ValueError(f"bits must be between 2 and 8, got {bits!r}.")
    rows, size = _blocks(x, None)
    levels = 2**bits - 1
    lo, hi = rows.amin(dim=1).clamp(max=0), rows.amax(dim=1).clamp(min=0)
    scales = ((hi - lo) / levels).clamp(min=torch.finfo(torch.float32).tiny)
    zero = torch.round(-lo / scales).clamp(0, levels)
    q = (torch.round(rows / scales[:, None]) + zero[:, None]).clamp(0, levels).to(torch.uint8)
    return Quantized(
        f"zero-point uint{bits}", bits, size, tuple(x.shape), x.numel(), q, scales, zero_points=zero.to(torch.uint8)
    )


def nf4_code() -> torch.Tensor:
    """The 16 values of 4-bit NormalFloat (Dettmers et al., 2023), built from normal quantiles.

    Eight positive and seven negative quantiles of N(0, 1), plus an exact zero, scaled into
    [-1, 1]: equal probability mass per code for normally distributed weights. The tests check
    this against bitsandbytes' table.
    """
    offset = 0.9677083
    ndtri = torch.special.ndtri
    positive = ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (values / values.abs().max()).to(torch.float32)


def nf4_quantize(x: torch.Tensor, block: int = 64) -> Quantized:
    """4-bit NormalFloat: per block, divide by absmax and store the index of the nearest of
    the 16 NF4 values. Codes are packed two per byte; one fp32 absmax per block."""
    _check_input(x, block)
    rows, size = _blocks(x, block)
    code = nf4_code()
    scales = rows.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
    normalized = rows / scales[:, None]
    index = (normalized.unsqueeze(-1) - code).abs().argmin(dim=-1).to(torch.uint8)
    return Quantized(
        f"NF4 (block {size})", 4, size, tuple(x.shape), x.numel(), pack_int4(index.reshape(-1)), scales, code=code
    )


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Pack integers in [0, 15] two per byte (first value in the high nibble)."""
    v = values.reshape(-1).to(torch.uint8)
    if v.numel() % 2:
        v = torch.cat([v, v.new_zeros(1)])
    return (v[0::2] << 4) | v[1::2]


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``numel`` values in [0, 15] as uint8."""
    pairs = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)
    return pairs[:numel]


def relative_error(x: torch.Tensor, q: Quantized) -> float:
    """Root-mean-square reconstruction error divided by the RMS of ``x`` (0 = exact)."""
    ref = x.detach().to(torch.float32)
    err = (q.dequantize() - ref).pow(2).mean().sqrt()
    return float(err / ref.pow(2).mean().sqrt().clamp(min=torch.finfo(torch.float32).tiny))
