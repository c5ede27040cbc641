"""gdb stub: a step over a packet larger than one CP slice leaves the device answering."""

from __future__ import annotations

from gemu.device.abi import packets as pk
from gemu.device.abi import regs
from gemu.device.abi.enums import TransCfgMode
from tests.support.hostile import alias_tables
from tests.unit.device.test_gdbstub import RING, rig  # noqa: F401 (the fixture)

ALIAS_VA = 1 << 40
ALIAS_TABLES = 0xD0000  # five pages above the rig's tables
SIZE = 256 << 20  # 65,536 pages, all the same one


def test_step_over_a_huge_aliased_fill_runs_in_slices(rig):  # noqa: F811
    """AS2 maps 512 GiB onto one page; after the rig's job, SET_AS 2 and a 256 MiB FILL
    there: `s` over the FILL is answered only once it completed (pc on the NOP after it),
    and the device ran it in many loop iterations (answering in between), not inside the
    step; a step after it runs one packet."""
    gpu, stub, g = rig
    root = alias_tables(gpu.mem, ALIAS_TABLES)
    gpu.mmio_write(regs.as_reg(2, "TRANSTAB_LO").offset, root)
    gpu.mmio_write(regs.as_reg(2, "TRANSCFG").offset, int(TransCfgMode.PT_4LEVEL))
    gpu.mmio_write(regs.as_reg(2, "COMMAND").offset, 1)
    tail = gpu.debug_read(regs.RING_TAIL.offset)
    extra = pk.set_as(2) + pk.fill(ALIAS_VA, SIZE, 0x01020304) + pk.nop()
    gpu.mem.write(RING + tail, extra)
    gpu.mmio_write(regs.RING_TAIL.offset, tail + len(extra))
    gpu.mmio_write(regs.RING_DOORBELL.offset, 1)
    for _ in range(4):  # SET_AS 1, WRITE_DATA, FENCE, SET_AS 2
        assert g.call(b"s") == b"T05thread:01;"
    fill_at = RING + tail + len(pk.set_as(2))
    assert stub.core_values()["pc"] == fill_at
    batches = stub.server.counters["batches"]
    packets = gpu.cp.packets
    assert g.call(b"s") == b"T05thread:01;"
    assert stub.server.counters["batches"] - batches > 10, "the FILL ran in slices"
    assert gpu.cp.packets == packets + 1 and gpu.cp.bulk is None and gpu.cp.halted
    assert stub.core_values()["pc"] == fill_at + len(pk.fill(0, 0, 0))
    assert gpu.mem.read(ALIAS_TABLES + 4 * 4096, 8) == bytes([4, 3, 2, 1]) * 2
    assert g.call(b"s") == b"T05thread:01;"
    assert gpu.cp.packets == packets + 2
