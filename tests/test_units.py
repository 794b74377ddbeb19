import pytest

from vramlab.units import GiB, MiB, format_bytes, parse_bytes


@pytest.mark.parametrize(
    "text, expected",
    [
        ("16GiB", 16 * 2**30),
        ("16 GiB", 16 * 2**30),
        ("16gib", 16 * 2**30),
        ("1.5 GiB", 3 * 2**29),
        ("16GB", 16 * 10**9),
        ("512MiB", 512 * 2**20),
        ("512MB", 512 * 10**6),
        ("4096", 4096),
        ("4096 B", 4096),
        ("2 KiB", 2048),
        ("1TiB", 2**40),
        ("1e3 B", 1000),
        (0, 0),
        (1234, 1234),
    ],
)
def test_parse(text, expected):
    assert parse_bytes(text) == expected


def test_gb_and_gib_are_never_confused():
    assert parse_bytes("16GB") == 16_000_000_000
    assert parse_bytes("16GiB") == 17_179_869_184
    assert format_bytes(parse_bytes("16GB")) == "14.90 GiB"


@pytest.mark.parametrize(
    "bad, words",
    [
        ("16G", "ambiguous"),
        ("16 gigs", "unknown unit"),
        ("-1GiB", "negative"),
        ("lots", "cannot read"),
        (-5, "negative"),
        ("", "cannot read"),
        (float("nan"), "finite"),
    ],
)
def test_bad_sizes_say_what_to_do(bad, words):
    with pytest.raises(ValueError, match=words):
        parse_bytes(bad)


def test_bad_types():
    with pytest.raises(TypeError):
        parse_bytes(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        parse_bytes(True)


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (3 * MiB, "3.00 MiB"),
        (GiB + GiB // 2, "1.50 GiB"),
        (-2 * MiB, "-2.00 MiB"),
        (2**40, "1.00 TiB"),
    ],
)
def test_format(n, text):
    assert format_bytes(n) == text


def test_round_trip():
    for n in (0, 1, 1000, 2**20, 5 * 2**30 + 7):
        assert parse_bytes(f"{n} B") == n
        assert abs(parse_bytes(format_bytes(n, precision=6).replace(" ", "")) - n) <= max(n * 1e-6, 1)


def test_fresh_block_bytes_follow_the_allocators_rules_not_only_512():
    from vramlab.allocator_model import fresh_block_bytes

    small = [fresh_block_bytes(n) for n in (0, 1, 4, 512, 513, 1000, 2**20)]
    assert small == [512, 512, 512, 512, 1024, 1024, 2**20]
    assert fresh_block_bytes(5 * MiB) == 5 * MiB  # split from a 20 MiB segment
    assert fresh_block_bytes(125 * MiB) == 126 * MiB  # its own 126 MiB segment; a 1 MiB remainder is not split
    assert fresh_block_bytes(4 * 511 * 32000 * 4) == 250 * MiB  # chapter 06's kept logits at gpu15
    assert fresh_block_bytes(124 * MiB) == 124 * MiB  # a 2 MiB-aligned request fills its segment exactly
    assert fresh_block_bytes(123 * MiB) == 124 * MiB  # rounded up to 2 MiB; the 1 MiB left is not split
    with pytest.raises(ValueError, match="whole number of bytes"):
        fresh_block_bytes(1.5)
