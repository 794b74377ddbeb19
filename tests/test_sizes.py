"""The size profile follows the card's real capacity; pick falls back to the next smaller profile."""

from __future__ import annotations

import pytest
import torch

from vramlab import GiB, MiB, sizes

T4, L4, A100_40, H100, H200 = 15_828_320_256, 23_661_969_408, 42_298_834_944, 85_045_280_768, 150_754_820_096


@pytest.fixture
def card(monkeypatch):
    """Pretend a CUDA card of the given total bytes is present (None: no GPU)."""
    monkeypatch.delenv("VRAMLAB_SIZE", raising=False)

    def install(total: int | None) -> None:
        monkeypatch.setattr(sizes, "has_cuda", lambda: total is not None)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (total // 2, total))

    return install


@pytest.mark.parametrize(
    ("total", "want"),
    [
        (None, "cpu"),
        (8 * GiB, "cpu"),
        (T4, "gpu15"),
        (L4, "gpu24"),
        (A100_40, "gpu24"),
        (H100, "gpu80"),
        (H200, "gpu80"),
    ],
)
def test_profile_follows_the_cards_capacity(card, total, want):
    card(total)
    assert sizes.profile() == want
    assert sizes.card_capacity() == total


def test_a_t4_reports_less_than_its_16_gb_and_still_gets_the_t4_profile():
    assert T4 / GiB == pytest.approx(14.74, abs=0.01)
    assert sizes.profile_for(T4) == "gpu15" and sizes.profile_for(sizes.GPU_PROFILES["gpu15"] - 1) == "cpu"


def test_pick_falls_back_to_the_next_smaller_profile(card):
    for total, want in [(None, "c"), (T4, "t4"), (L4, "t4"), (H100, "big")]:
        card(total)
        assert sizes.pick(cpu="c", gpu15="t4", gpu80="big") == want
    card(L4)
    assert sizes.pick(cpu=1, gpu15=2, gpu24=3) == 3
    card(H100)
    assert sizes.pick(cpu=1, gpu15=2, gpu24=3) == 3


def test_the_environment_overrides_and_bad_values_say_what_to_use(card, monkeypatch):
    card(H100)
    monkeypatch.setenv("VRAMLAB_SIZE", "CPU")
    assert sizes.profile() == "cpu" and "VRAMLAB_SIZE" in sizes.describe_profile()
    monkeypatch.setenv("VRAMLAB_SIZE", "gpu")
    with pytest.raises(ValueError, match="cpu, gpu15, gpu24, gpu80"):
        sizes.profile()


def test_describe_says_why(card):
    card(None)
    assert "no GPU" in sizes.describe_profile()
    card(8 * GiB)
    assert "8.00 GiB, less than the 14.5 GiB" in sizes.describe_profile()
    card(512 * MiB)
    assert "512 MiB" in sizes.describe_profile()
    card(T4)
    assert sizes.describe_profile() == "size profile gpu15: this GPU has 14.74 GiB"


def test_fits_profile_adds_the_allowances():
    capacity = sizes.GPU_PROFILES["gpu15"]
    edge = int((capacity - sizes.CONTEXT_ALLOWANCE) / (1 + sizes.ROUNDING_ALLOWANCE))
    assert sizes.fits_profile(edge, "gpu15") and not sizes.fits_profile(edge + 16, "gpu15")


def test_a_negative_capacity_is_refused():
    with pytest.raises(ValueError, match="bytes >= 0"):
        sizes.profile_for(-1)
