"""DOC: sizes as people write them: ``256M``, ``1G``, ``64K`` (QEMU's ``-m``), and back.

Kept apart from :mod:`gemu.host.machine` so the command line can check ``-m`` without
importing the guest kernel model::

    parse_size("256M")      # 268435456
    format_size(3 << 29)    # '1.5 GiB'
"""

from __future__ import annotations

import re

_SUFFIXES = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, *, default_unit: str = "M") -> int:
    """A size like QEMU's ``-m``: ``256M``, ``1G``, ``512K``, ``64`` (MiB unless
    ``default_unit`` says otherwise), optionally with ``B``/``iB`` (``16MiB``). Raises
    ValueError naming the problem (``unknown suffix 'X'``)."""
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if m is None:
        raise ValueError(f"invalid size {text!r}: not a number with an optional K/M/G suffix")
    number, suffix = int(m.group(1)), m.group(2).upper()
    unit = suffix[:1]
    rest = suffix[1:]
    if suffix and (unit not in "KMGT" or rest not in ("", "B", "IB")):
        raise ValueError(f"invalid size {text!r}: unknown suffix {m.group(2)!r} (use K, M or G)")
    return number * (_SUFFIXES[unit] if suffix else _SUFFIXES[default_unit])


def flag_names(flags) -> str:
    names = [f.name.lower() for f in type(flags) if f.name and f in flags]
    return "+".join(names) or "none"


def format_size(n: int) -> str:
    """``16 MiB``, ``4 KiB``, ``1.5 GiB``: sizes in boot logs and summaries."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"
