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


def _setup_fill(gpu, g, size: int = SIZE) -> int:
    """After the rig's job: SET_AS 2, a FILL of ``size`` over AS2 (512 GiB aliased onto one
    page) and a NOP; steps up to the FILL and returns its ring address."""
    root = alias_tables(gpu.mem, ALIAS_TABLES)
    gpu.mmio_write(regs.as_reg(2, "TRANSTAB_LO").offset, root)
    gpu.mmio_write(regs.as_reg(2, "TRANSCFG").offset, int(TransCfgMode.PT_4LEVEL))
    gpu.mmio_write(regs.as_reg(2, "COMMAND").offset, 1)
    tail = gpu.debug_read(regs.RING_TAIL.offset)
    extra = pk.set_as(2) + pk.fill(ALIAS_VA, size, 0x01020304) + pk.nop()
    gpu.mem.write(RING + tail, extra)
    gpu.mmio_write(regs.RING_TAIL.offset, tail + len(extra))
    gpu.mmio_write(regs.RING_DOORBELL.offset, 1)
    for _ in range(4):  # SET_AS 1, WRITE_DATA, FENCE, SET_AS 2
        assert g.call(b"s") == b"T05thread:01;"
    return RING + tail + len(pk.set_as(2))


def test_step_over_a_huge_aliased_fill_runs_in_slices(rig):  # noqa: F811
    """AS2 maps 512 GiB onto one page; after the rig's job, SET_AS 2 and a 256 MiB FILL
    there: `s` over the FILL is answered only once it completed (pc on the NOP after it),
    and the device ran it in many loop iterations (answering in between), not inside the
    step; a step after it runs one packet."""
    gpu, stub, g = rig
    fill_at = _setup_fill(gpu, g)
    batches = stub.server.counters["batches"]
    packets = gpu.cp.packets
    assert g.call(b"s") == b"T05thread:01;"
    assert stub.server.counters["batches"] - batches > 10, "the FILL ran in slices"
    assert gpu.cp.packets == packets + 1 and gpu.cp.bulk is None and gpu.cp.halted
    assert stub.core_values()["pc"] == fill_at + len(pk.fill(0, 0, 0))
    assert gpu.mem.read(ALIAS_TABLES + 4 * 4096, 8) == bytes([4, 3, 2, 1]) * 2
    assert g.call(b"s") == b"T05thread:01;"
    assert gpu.cp.packets == packets + 2


def test_ctrl_c_during_a_long_step_stops_it_and_the_next_step_finishes_the_packet(rig):  # noqa: F811
    """Ctrl-C while the step of a 1 GiB FILL runs (about a second of slices) halts it
    mid-packet (SIGINT, pc still on the FILL); the next step finishes that packet and stops
    before the NOP."""
    gpu, stub, g = rig
    fill_at = _setup_fill(gpu, g, 1 << 30)
    g.send_raw(b"$s#73")
    assert g.read_byte() == b"+"
    g.send_raw(b"\x03")
    assert g.read_packet() == b"T02thread:01;"
    assert gpu.cp.bulk is not None and stub.core_values()["pc"] == fill_at
    assert g.call(b"s") == b"T05thread:01;"
    assert gpu.cp.bulk is None and stub.core_values()["pc"] == fill_at + len(pk.fill(0, 0, 0))
