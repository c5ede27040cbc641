"""Debug walks of guest page tables are bounded whatever the guest wrote.

A table reached twice (a cycle, or entries sharing a table) is reported as an alias and not
followed; at most ``mmu.WALK_MAX_TABLES`` tables are read; the gdb monitor shows the aliases
as "cycle/alias at level L table PA".
"""

from __future__ import annotations

from gemu.device import mmu
from gemu.device.abi import pte, regs
from gemu.device.abi.enums import PteType
from gemu.device.abi.regs import PAGE_SIZE
from tests.support.device_rig import Rig
from tests.support.hostile import alias_tables, cyclic_table
from tests.unit.device.test_gdbstub import rig as gdb_rig  # noqa: F401  (fixture)

CYCLIC = 0x800000


def bind(rig: Rig, as_index: int, root: int) -> None:
    rig.was(as_index, "TRANSTAB_LO", root)
    rig.was(as_index, "TRANSCFG", 1)
    rig.was(as_index, "COMMAND", 1)


def test_a_self_referencing_table_is_read_once(rig):
    """Every entry of the root points back at the root: one table read, 512 aliases counted
    (64 listed), nothing mapped; the old walk visited 512**3 tables."""
    bind(rig, 2, cyclic_table(rig.mem, CYCLIC))
    report = rig.gpu.mappings_report(2)
    assert report.runs == [] and report.truncated is None
    assert report.aliases_total == 512
    assert len(report.aliases) == mmu.WALK_MAX_ALIASES
    assert report.aliases[0] == (1, CYCLIC, 0)
    assert report.aliases[1] == (1, CYCLIC, 1 << 39)


def test_aliasing_levels_are_walked_once():
    """The aliasing tables (every entry of a level pointing at the next level's one table):
    the 512 pages of the first path are reported, each other path is an alias."""
    rig = Rig()
    root = alias_tables(rig.mem, CYCLIC)
    bind(rig, 0, root)
    report = rig.gpu.mappings_report(0)
    assert len(report.runs) == 512 and all(r[1] == CYCLIC + 4 * PAGE_SIZE for r in report.runs)
    assert report.aliases_total == 3 * 511
    assert rig.gpu.mappings(0) == report.runs


def test_a_huge_tree_stops_at_the_table_cap():
    """More distinct tables than WALK_MAX_TABLES: the walk stops there and says so."""
    rig = Rig(mem_size=32 << 20)
    base = 0x1000000
    root = base
    l1 = [base + (1 + i) * PAGE_SIZE for i in range(512)]
    l2 = base + 513 * PAGE_SIZE
    for i, table in enumerate(l1):
        rig.mem.write_u64(root + 8 * i, pte.make(table, PteType.TABLE))
        for j in range(8):
            rig.mem.write_u64(table + 8 * j, pte.make(l2 + (8 * i + j) * PAGE_SIZE, PteType.TABLE))
    bind(rig, 0, root)
    report = rig.gpu.mappings_report(0)
    assert report.truncated == f"stopped after {mmu.WALK_MAX_TABLES} page tables"


def test_monitor_reports_cycles_in_mappings_and_walk(gdb_rig):  # noqa: F811
    """`monitor mappings` and `monitor walk` over a self-referencing table answer at once,
    naming the cycle/alias, its level and table."""
    gpu, _stub, g = gdb_rig
    table = 0xC0000
    cyclic_table(gpu.mem, table)
    gpu.mmio_write(regs.as_reg(2, "TRANSTAB_LO").offset, table)
    gpu.mmio_write(regs.as_reg(2, "TRANSCFG").offset, 1)
    gpu.mmio_write(regs.as_reg(2, "COMMAND").offset, 1)
    out = g.monitor("mappings 2")
    assert out.startswith("AS2: 0 mapped range(s)\n")
    assert f"  cycle/alias at level L1 table PA {table:#x} (from VA 0x0)\n" in out
    assert "  ... 496 more cycle/alias entries not followed\n" in out
    walk = g.monitor("walk 0x1000 2")
    assert f"cycle/alias at level L1 table PA {table:#x} (also the L0 table)" in walk
    assert "TRANSLATION_L3" in walk


def test_fan_out_to_one_shared_table_stops_at_the_entry_cap():
    """512 distinct level-1 tables whose every entry points at one level-2 table: 262,656
    entries to follow, of which the walk follows WALK_MAX_ENTRIES and says so."""
    rig = Rig(mem_size=32 << 20)
    base = 0x1000000
    shared = base + 513 * PAGE_SIZE
    l1 = [base + (1 + i) * PAGE_SIZE for i in range(512)]
    to_shared = pte.make(shared, PteType.TABLE).to_bytes(8, "little") * 512
    for i, table in enumerate(l1):
        rig.mem.write_u64(base + 8 * i, pte.make(table, PteType.TABLE))
        rig.mem.write(table, to_shared)
    bind(rig, 0, base)
    report = rig.gpu.mappings_report(0)
    assert report.truncated == f"stopped after {mmu.WALK_MAX_ENTRIES} table entries"
    assert report.aliases_total < mmu.WALK_MAX_ENTRIES
