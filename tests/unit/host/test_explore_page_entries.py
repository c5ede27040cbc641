"""explore's mapped-free check reads a mapping's PTEs with one walk per leaf table
(:func:`gemu.host.explore.scenario.page_entries`); it must find what the GPU's walk finds for
every page."""

from __future__ import annotations

import struct

from gemu.device.abi import pte
from gemu.device.abi.enums import PteType
from gemu.guest.gemu_drv.vm import walk
from gemu.host.explore.scenario import PAGE, page_entries

_U64 = struct.Struct("<Q")


def _tables() -> tuple[memoryview, int]:
    """A 4-level table in 16 frames: VA 0x1f_e000.. maps 4 pages across the boundary of two
    leaf tables (the second page's entry is not valid), and the level-2 entry for VA
    0x40_0000.. is missing."""
    mem = memoryview(bytearray(16 * PAGE))
    root, l1, l2, leaf_a, leaf_b = (f * PAGE for f in (1, 2, 3, 4, 7))  # leaf_b not after leaf_a

    def put(table: int, index: int, entry: int) -> None:
        _U64.pack_into(mem, table + 8 * index, entry)

    put(root, 0, pte.make(l1, PteType.TABLE))
    put(l1, 0, pte.make(l2, PteType.TABLE))
    put(l2, 0, pte.make(leaf_a, PteType.TABLE))
    put(l2, 1, pte.make(leaf_b, PteType.TABLE))
    put(leaf_a, 510, pte.make(10 * PAGE, read=True))
    put(leaf_a, 511, pte.make(11 * PAGE, read=True) & ~pte.VALID)  # stale, not valid
    put(leaf_b, 0, pte.make(12 * PAGE, read=True, write=True))
    put(leaf_b, 1, pte.make(13 * PAGE, write=True))
    return mem, root


def test_page_entries_match_the_gpu_walk_page_by_page():
    """Across a leaf-table boundary, through an invalid entry and under a missing level-2
    entry, each page's entry is the one :func:`walk` returns (0 where it faults)."""
    mem, root = _tables()
    leaves: dict = {}  # shared by the calls, as the mapped-free check shares it
    for va, n in ((0x1F_E000, 4), (0x1F_F000, 1), (0x20_0000, 2), (0x3F_F000, 3), (0, 600)):
        want = [walk(mem, root, va + i * PAGE) for i in range(n)]
        assert page_entries(mem, root, va, n) == want, hex(va)
        assert page_entries(mem, root, va, n, leaves) == want, hex(va)
    assert page_entries(mem, root, 0x1F_E000, 4)[0] >> 12 == 10  # not all zero
