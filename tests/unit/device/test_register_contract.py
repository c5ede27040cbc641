"""The register contract as docs/hardware.md states it, checked on the device model.

- an aligned offset inside the MMIO window with no register reads 0, ignores writes and counts
  a guest error (unaligned and out-of-window offsets are refused by the protocol server:
  tests/hil/test_device_register_contract.py);
- clearing CP_CONTROL.ENABLE leaves ERROR, also after a failed enable (RING_CONFIG), and
  CP_CONTROL.ENABLE reads back whether the CP is enabled;
- CP_PACKETS counts since reset; MEM_PAGES follows the attached memory, which a reset keeps;
- a RESUME that leaves ERROR with nothing left to run raises CP_IDLE;
- an indirect-buffer fetch fault is reported as hardware.md says, field by field.
"""

from __future__ import annotations

from gemu.device.abi import packets as pk
from gemu.device.abi import regs
from gemu.device.abi.docgen import render
from gemu.device.abi.enums import AccessType, CpError, CpState, Irq, MmuFault, Opcode
from tests.support.device_rig import DATA, Rig

ENABLE = regs.CP_CONTROL.field("ENABLE").mask
RESUME = regs.CP_CONTROL.field("RESUME").mask
IB_VA = 0x5000_0000


def hole() -> int:
    """An aligned offset inside the MMIO window with no register."""
    used = {r.offset for r in regs.REGISTER_MAP}
    return next(o for o in range(0, regs.MMIO_SIZE, 4) if o not in used)


def test_an_unassigned_aligned_offset_reads_0_ignores_writes_and_counts(rig):
    off = hole()
    before = rig.gpu.stats()["guest_errors"]
    rig.gpu.mmio_write(off, 0x1234)
    assert rig.gpu.mmio_read(off) == 0
    assert rig.gpu.stats()["guest_errors"] == before + 2


def test_clearing_enable_after_a_ring_config_error_leaves_error():
    """A failed enable (RING_SIZE not a power of two) puts the CP in ERROR without enabling it:
    CP_CONTROL.ENABLE reads 0; writing 0 to CP_CONTROL then leaves ERROR (STOPPED)."""
    rig = Rig()
    rig.w(regs.RING_BASE_LO, 0x10000)
    rig.w(regs.RING_SIZE, 0x3000)
    rig.w(regs.CP_CONTROL, ENABLE)
    assert rig.gpu.cp_state() is CpState.ERROR
    assert rig.cp_error()[0] is CpError.RING_CONFIG
    assert rig.r(regs.CP_CONTROL) & ENABLE == 0
    rig.w(regs.CP_CONTROL, 0)
    assert rig.gpu.cp_state() is CpState.STOPPED
    assert rig.cp_error()[0] is CpError.RING_CONFIG  # CP_ERROR stays until RESUME or reset
    rig.w(regs.RING_SIZE, 0x4000)
    rig.w(regs.CP_CONTROL, ENABLE)
    assert rig.gpu.cp_state() is CpState.IDLE
    assert rig.r(regs.CP_CONTROL) & ENABLE == ENABLE


def test_cp_packets_counts_since_reset_and_mem_pages_follows_memory(rig):
    rig.run(pk.nop(), pk.nop(), pk.nop())
    assert rig.r(regs.CP_PACKETS) == 3
    rig.w(regs.CONTROL, regs.CONTROL.field("SOFT_RESET").mask)
    assert rig.r(regs.CP_PACKETS) == 0
    assert rig.gpu.stats()["packets"] == 3  # the device's lifetime statistics keep counting
    assert rig.r(regs.MEM_PAGES) == rig.mem.size // regs.PAGE_SIZE
    rig.start_ring()
    rig.run(pk.nop())
    assert rig.r(regs.CP_PACKETS) == 1


def test_resume_on_an_empty_ring_raises_cp_idle(rig):
    """The last packet faults; RESUME finds nothing left: the CP goes IDLE and says so."""
    rig.run(pk.fill(rig.mem.size, 4, 0, phys=True))
    assert rig.gpu.cp_state() is CpState.ERROR
    rig.clear_irq()
    rig.resume()
    assert rig.gpu.cp_state() is CpState.IDLE
    assert rig.irq_raw() & Irq.CP_IDLE


def test_an_ib_fetch_fault_is_reported_as_documented(rig):
    """The second page of an IB is unmapped: MMU_FAULT with OPCODE = INDIRECT_BUFFER, IN_IB = 1,
    CP_ERROR_ADDR = the VA of the packet being fetched; the AS latches a TRANSLATION_L3 fault
    with ACCESS_TYPE = EXECUTE, SOURCE = INDIRECT_BUFFER and FAULTADDRESS = the first unmapped
    byte; RING_HEAD is past the INDIRECT_BUFFER packet. hardware.md says all of it."""
    pt = rig.address_space(1)
    pt.map(IB_VA, DATA, 0x1000, exec=True)
    nops = pk.nop(0x3FE) + pk.nop(0x3FE)  # 4 KiB + 4 KiB: the second one's body is unmapped
    rig.mem.write(DATA, nops[:0x1000])
    ring = pk.set_as(1) + pk.indirect_buffer(IB_VA, len(nops) // 4)
    rig.run(ring)
    code, opcode, as_index, in_ib = rig.cp_error()
    assert (code, opcode, as_index, in_ib) == (CpError.MMU_FAULT, Opcode.INDIRECT_BUFFER, 1, 1)
    assert rig.cp_error_addr() == IB_VA + 0xFFC
    exc, access, source, addr = rig.fault(1)
    assert exc == MmuFault.TRANSLATION_L3 and access == AccessType.EXECUTE
    assert source == Opcode.INDIRECT_BUFFER and addr == IB_VA + 0x1000
    assert rig.r(regs.RING_HEAD) == len(ring)
    doc = " ".join(render().split())
    assert "the GPU VA of the packet being fetched" in doc
    assert "`ACCESS_TYPE` = `EXECUTE`" in doc


def test_hardware_md_states_the_register_rules():
    doc = " ".join(render().split())
    assert "an aligned offset inside the window where no register is declared reads 0" in doc
    assert "an unaligned offset, or one outside the MMIO window, gets an `EINVAL`" in doc
    assert "`CP_PACKETS` counts packets since the last reset" in doc
    assert "A `RESUME` that leaves `ERROR` with nothing left to execute raises" in doc
