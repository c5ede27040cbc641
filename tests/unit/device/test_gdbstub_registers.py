"""gdb stub register writes: ``G`` (all registers) and ``pc`` (moving the CP)."""

from __future__ import annotations

from gemu.device.abi import regs
from gemu.device.gdb_target import BY_NAME, PC_REGNUM, REGISTERS
from tests.unit.device.test_gdbstub import DATA_VA, RING, rig  # noqa: F401 (the fixture)


def _offset(name: str) -> int:
    return sum(r.size for r in REGISTERS[: BY_NAME[name].regnum])


def test_g_packet_writes_only_the_registers_that_changed(rig):  # noqa: F811
    """`G` with what `g` returned is accepted and writes nothing; with SCRATCH0 and pc
    changed it writes that MMIO register and moves the CP; with x0 changed it is refused
    (E16) and nothing after it is written; a wrong length is refused."""
    gpu, stub, g = rig
    current = bytes.fromhex(g.call(b"g").decode())
    assert g.call(b"G" + current.hex().encode()) == b"OK"
    raw = bytearray(current)
    scratch = _offset("scratch0")
    raw[scratch : scratch + 4] = (0x1234).to_bytes(4, "little")
    pc = _offset("pc")
    raw[pc : pc + 8] = (RING + 8).to_bytes(8, "little")
    assert g.call(b"G" + bytes(raw).hex().encode()) == b"OK"
    assert gpu.debug_read(regs.SCRATCH[0].offset) == 0x1234
    assert stub.core_values()["pc"] == RING + 8 and gpu.cp.head == 8
    raw[0] = 9  # x0, the CP state: read-only
    assert g.call(b"G" + bytes(raw).hex().encode()) == b"E16"
    assert g.call(b"G00") == b"E16"


def test_pc_write_moves_the_cp_and_refuses_addresses_outside_the_ring(rig):  # noqa: F811
    """After SET_AS, `P` of pc to the FENCE makes it RING_HEAD: the step runs the FENCE and
    the skipped WRITE_DATA never stores; an unaligned pc or one outside the ring is refused
    with E16, naming why in `monitor status`."""
    gpu, _stub, g = rig
    assert g.call(b"s") == b"T05thread:01;"  # SET_AS 1
    fence = RING + 8 + 16
    assert g.call(b"P%x=%s" % (PC_REGNUM, fence.to_bytes(8, "little").hex().encode())) == b"OK"
    assert gpu.debug_read(regs.RING_HEAD.offset) == fence - RING
    assert g.call(b"s") == b"T05thread:01;"
    assert gpu.mem_read(1, DATA_VA, 16) == bytes(8) + (5).to_bytes(8, "little")
    for bad in (RING + 2, 0x90_0000):
        assert g.call(b"P%x=%s" % (PC_REGNUM, bad.to_bytes(8, "little").hex().encode())) == (b"E16")
    assert "pc not moved to 0x900000" in g.monitor("status")
