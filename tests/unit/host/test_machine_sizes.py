"""QEMU-style sizes for -m and --swap."""

from __future__ import annotations

import pytest

from gemu.host.machine import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("256M", 256 << 20),
        ("1G", 1 << 30),
        ("512k", 512 << 10),
        ("64", 64 << 20),
        ("16MiB", 16 << 20),
        ("2GB", 2 << 30),
    ],
)
def test_sizes_with_suffixes(text, value):
    """K/M/G suffixes (any case, optional B/iB); a plain number is MiB, as QEMU's -m."""
    assert parse_size(text) == value


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("12X", "unknown suffix 'X' (use K, M or G)"),
        ("1MBs", "unknown suffix 'MBs'"),
        ("lots", "not a number"),
        ("", "not a number"),
        ("-1M", "not a number"),
    ],
)
def test_bad_sizes_say_why(text, message):
    """A bad suffix or no number is a ValueError quoting the text and the problem."""
    with pytest.raises(
        ValueError,
        match=f"invalid size {text!r}: {message}".replace("(", r"\(").replace(")", r"\)"),
    ):
        parse_size(text)


def test_format_size():
    """Sizes in boot logs read naturally."""
    assert [format_size(n) for n in (4096, 16 << 20, 3 << 29, 100)] == [
        "4 KiB",
        "16 MiB",
        "1.5 GiB",
        "100 B",
    ]


def test_large_swap_is_a_sparse_file_small_swap_is_memory():
    """A swap above 256 MiB lives in a sparse file in the machine's directory (booting
    `-m 1G` does not zero 4 GiB of memory); a small one is a buffer."""
    from gemu.host.machine import Machine

    with Machine(ram_size=4 << 20, swap_size=512 << 20, device="inproc") as m:
        assert str(m.swap.backing).endswith("/swap")
    with Machine(ram_size=4 << 20, swap_size=8 << 20, device="inproc") as m:
        assert m.swap.backing == "memory"
