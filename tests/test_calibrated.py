"""Calibrated weight quantization (vramlab.calibrated): GPTQ and AWQ against round-to-nearest."""

import pytest
import torch

from vramlab import calibrated as C


def _layer(seed: int = 0, out: int = 64, inp: int = 128, tokens: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and correlated inputs with a few large channels, as real activations have."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen)
    mix = torch.randn(inp, inp, generator=gen) / inp**0.5 + torch.eye(inp)
    x = torch.randn(tokens, inp, generator=gen) @ mix
    x[:, :4] *= 10
    return w, x


def _values_per_group(q: torch.Tensor, group: int) -> int:
    rows = q.reshape(q.shape[0], -1, group).sort(dim=-1).values
    return int(((rows.diff(dim=-1) != 0).sum(dim=-1) + 1).max())


def test_the_stored_format_and_its_bytes():
    assert C.group_bytes(1536, 384, 4, 128) == 1536 * 384 // 2 + 2 * 4608 + 4608 // 2
    assert C.group_bytes(8, 8, 3, 8) == 24 + 16 + 3
    w, x = _layer()
    for bits in (3, 4):
        for q in (C.rtn(w, bits, 32), C.gptq(w, x, bits, 32)):
            assert _values_per_group(q, 32) <= 2**bits
    grid = torch.arange(16.0).repeat(4, 2) - 5  # already on a 4-bit grid per group of 32: RTN is exact
    assert torch.allclose(C.rtn(grid, 4, 32), grid, atol=1e-5)


def test_gptq_without_correlations_is_round_to_nearest():
    """With H proportional to I there is no later column to absorb an error: GPTQ = RTN."""
    w, _ = _layer()
    x = torch.eye(128).repeat(4, 1) * 3
    assert torch.allclose(C.gptq(w, x, 4, 32, damp=0.0), C.rtn(w, 4, 32))


def test_calibration_lowers_the_error_on_inputs_it_did_not_see():
    w, x = _layer(tokens=1024)
    calib, held = x[:512], x[512:]
    for bits in (3, 4):
        rtn = C.output_error(w, C.rtn(w, bits, 32), held)
        assert C.output_error(w, C.gptq(w, calib, bits, 32), held) < 0.9 * rtn
        eff, alpha = C.awq(w, calib, bits, 32)
        assert C.output_error(w, eff, held) < rtn and 0 < alpha < 1


def test_awq_never_does_worse_than_rtn_on_its_calibration_data():
    """alpha = 0 is a candidate and is exactly round-to-nearest."""
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    x = torch.randn(200, 64, generator=torch.Generator().manual_seed(4))
    eff, _ = C.awq(w, x, 4, 16)
    assert C.output_error(w, eff, x) <= C.output_error(w, C.rtn(w, 4, 16), x) + 1e-9


def test_bad_input_is_refused_with_what_to_do():
    w, x = _layer()
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
        C.rtn(w, 1)
    with pytest.raises(ValueError, match="bits must be"):
        C.rtn(w, True)
    with pytest.raises(ValueError, match="positive divisor of the 128 input columns"):
        C.rtn(w, 4, 48)
    with pytest.raises(ValueError, match="2-D floating weight"):
        C.rtn(torch.ones(4, dtype=torch.int64), 4, 2)
    with pytest.raises(ValueError, match=r"calibration inputs, got shape \(512, 64\)"):
        C.gptq(w, x[:, :64])
