"""The Gpu as a whole: IRQ derivation, reset, execution API, debugger hooks, statistics."""

from __future__ import annotations

import pytest

from gemu.device.abi import packets as pk
from gemu.device.abi import regs
from gemu.device.abi.enums import CpState, Irq, MmuCommand
from gemu.device.abi.protocol import SPACE_PHYS
from gemu.device.gpu import Gpu
from tests.support.device_rig import DATA, RING_BASE

VA = 0x4000_0000
FENCE = 0x8000


# --- interrupts ----------------------------------------------------------------------------


def test_irq_status_is_rawstat_and_mask(rig):
    """IRQ_STATUS = RAWSTAT & MASK; the line follows IRQ_STATUS; on_irq reports each change."""
    rig.w(regs.IRQ_MASK, 0)
    rig.irq_calls.clear()
    rig.gpu.raise_irq(Irq.FENCE)
    assert rig.r(regs.IRQ_STATUS) == 0 and not rig.gpu.irq_level
    assert rig.irq_calls == []
    rig.w(regs.IRQ_MASK, Irq.FENCE)
    assert rig.r(regs.IRQ_STATUS) == Irq.FENCE
    assert rig.irq_calls == [(True, Irq.FENCE, 0)]
    rig.gpu.raise_irq(Irq.FENCE)  # no change: no call
    assert len(rig.irq_calls) == 1
    rig.w(regs.IRQ_CLEAR, Irq.FENCE)
    assert rig.irq_calls[-1] == (False, 0, 0)


def test_mmu_summary_bit(rig):
    """IRQ_RAWSTAT.MMU mirrors MMU_INT_STAT != 0 and is not cleared through IRQ_CLEAR."""
    rig.address_space(1)
    rig.submit(pk.set_as(1), pk.write_data(VA, [1]))
    rig.drain()
    assert rig.r(regs.MMU_INT_STAT) == 0b10
    assert rig.irq_raw() & Irq.MMU
    rig.w(regs.IRQ_CLEAR, Irq.MMU)
    assert rig.irq_raw() & Irq.MMU
    rig.w(regs.MMU_INT_MASK, 0)
    assert rig.r(regs.MMU_INT_STAT) == 0 and not rig.irq_raw() & Irq.MMU
    assert rig.r(regs.MMU_INT_RAWSTAT) == 0b10
    rig.w(regs.MMU_INT_MASK, 0xFF)
    assert rig.irq_calls[-1] == (True, int(Irq.MMU | Irq.CP_ERROR), 0b10)
    rig.w(regs.MMU_INT_CLEAR, 0b10)
    rig.w(regs.IRQ_CLEAR, 0x1F)
    assert rig.irq_calls[-1] == (False, 0, 0)


# --- reset ---------------------------------------------------------------------------------


def test_soft_reset(rig):
    """SOFT_RESET: registers to reset values, TLBs empty, CP stopped, memory kept, RESET_DONE."""
    t = rig.address_space(1)
    t.map(VA, DATA, 0x1000, write=True)
    rig.submit(pk.set_as(1), pk.write_data(VA, [9]))
    rig.drain()
    rig.w(regs.SCRATCH[0], 0x55)
    rig.w(regs.CONTROL, 1)
    assert rig.r(regs.SCRATCH[0]) == 0
    assert rig.ras(1, "TLB_ENTRIES") == 0
    assert rig.gpu.cp_state() is CpState.STOPPED
    assert rig.r(regs.RING_HEAD) == 0 and rig.r(regs.RING_SIZE) == 0
    assert rig.r(regs.IRQ_RAWSTAT) == Irq.RESET_DONE
    assert rig.r(regs.IRQ_MASK) == 0 and not rig.gpu.irq_level
    assert rig.mem.read_u32(DATA) == 9
    assert rig.r(regs.MEM_PAGES) == rig.mem.size // 4096
    rig.gpu.reset()
    assert rig.gpu.stats()["resets"] == 2


def test_reset_then_new_ring_runs(rig):
    """After a reset the driver can program the ring again and run jobs."""
    rig.w(regs.CONTROL, 1)
    rig.start_ring()
    rig.submit(pk.fence(FENCE, 3, phys=True))
    rig.drain()
    assert rig.mem.read_u64(FENCE) == 3


# --- execution API -------------------------------------------------------------------------


def test_step_needs_stepped_clock_for_ticks():
    """step() with ticks on the free clock is refused; with 0 ticks it just runs."""
    gpu = Gpu()
    with pytest.raises(ValueError, match="stepped clock"):
        gpu.step(1, 5)
    assert gpu.step(1, 0)[:2] == (0, CpState.STOPPED)


def test_set_stepped_keeps_time_monotonic():
    """Switching to the stepped clock starts it at the current device time."""
    gpu = Gpu()
    gpu.set_stepped(True)
    t0 = gpu.clock.now_ns()
    gpu.step(0, 10)
    assert gpu.clock.now_ns() == t0 + 10
    gpu.set_stepped(False)
    assert not gpu.clock.stepped


def test_stats(rig):
    """stats() counts packets per opcode, TLB traffic, faults, errors and copied bytes."""
    t = rig.address_space(1)
    t.map(VA, DATA, 0x2000, write=True)
    rig.submit(pk.set_as(1), pk.copy(VA, VA + 0x1000, 64), pk.nop(), pk.write_data(0x10, [1]))
    rig.drain()
    s = rig.gpu.stats()
    assert s["packets"] == 3
    assert s["per_opcode"] == {"SET_AS": 1, "COPY": 1, "NOP": 1}
    assert s["tlb_misses"] == 3 and s["tlb_flushes"] == 1  # src, dst, the fault
    assert s["mmu_faults"] == 1 and s["cp_errors"] == 1 and s["bytes_copied"] == 64
    assert s["cp_state"] == "ERROR"


# --- debugger hooks ------------------------------------------------------------------------


def test_packet_hook_halts_before_packet_and_resume_runs_it(rig):
    """packet_hook returning True halts before that packet; resume() runs it without asking
    again, and later packets are offered to the hook as usual."""
    seen = []

    def hook(addr, in_ib):
        seen.append(addr)
        return addr == RING_BASE + 20  # break on the second packet

    rig.gpu.packet_hook = hook
    rig.submit(pk.fence(FENCE, 1, phys=True), pk.fence(FENCE + 8, 2, phys=True), pk.nop())
    assert rig.gpu.run(10) == 1
    assert rig.gpu.cp_state() is CpState.HALTED
    assert rig.gpu.cp_pc() == RING_BASE + 20
    assert rig.mem.read_u64(FENCE + 8) == 0
    assert not rig.gpu.has_work() and rig.gpu.run(10) == 0
    assert regs.STATUS.field("HALTED").ex(rig.r(regs.STATUS))
    rig.gpu.resume()
    assert rig.gpu.run(10) == 2
    assert rig.mem.read_u64(FENCE + 8) == 2
    assert seen == [RING_BASE, RING_BASE + 20, RING_BASE + 40]


def test_single_step_while_halted(rig):
    """single_step() executes exactly one packet while halted and stays halted."""
    rig.gpu.halt()
    rig.submit(pk.fence(FENCE, 1, phys=True), pk.fence(FENCE, 2, phys=True))
    assert rig.gpu.run(10) == 0
    assert rig.gpu.single_step() == 1
    assert rig.mem.read_u64(FENCE) == 1
    assert rig.gpu.cp_state() is CpState.HALTED
    assert rig.gpu.cp_pc() == RING_BASE + 20
    assert rig.gpu.single_step() == 1
    assert rig.mem.read_u64(FENCE) == 2
    assert rig.gpu.single_step() == 0
    rig.gpu.resume()
    assert rig.gpu.cp_state() is CpState.IDLE


def test_packet_hook_sees_ib_packets(rig):
    """packet_hook is called for IB packets with their VA and in_ib=True."""
    t = rig.address_space(1)
    t.map(VA, DATA, 0x1000, exec=True)
    rig.mem.write(DATA, pk.nop() + pk.nop())
    seen = []
    rig.gpu.packet_hook = lambda addr, in_ib: seen.append((addr, in_ib)) and False
    rig.submit(pk.set_as(1), pk.indirect_buffer(VA, 2))
    rig.drain()
    assert seen == [(RING_BASE, False), (RING_BASE + 8, False), (VA, True), (VA + 4, True)]


def test_access_hook_sees_dma(rig):
    """access_hook reports each data access (address, size, write, space), not fetches or walks;
    halt() from the hook stops the CP after the current packet."""
    t = rig.address_space(2)
    t.map(VA, DATA, 0x2000, write=True)
    seen = []

    def hook(addr, size, write, space):
        seen.append((addr, size, write, space))
        if addr == VA + 0x1000:
            rig.gpu.halt()

    rig.gpu.access_hook = hook
    rig.submit(
        pk.set_as(2),
        pk.copy(VA, VA + 0x1000, 16),
        pk.fence(FENCE, 1, phys=True),
    )
    rig.drain()
    assert seen == [(VA, 16, False, 2), (VA + 0x1000, 16, True, 2)]
    assert rig.gpu.cp_state() is CpState.HALTED
    rig.gpu.resume()
    rig.drain()
    assert seen[-1] == (FENCE, 8, True, SPACE_PHYS)


def test_halt_while_stopped_holds_after_enable(rig):
    """A CP halted before it is enabled (gdb -S) does not run once enabled."""
    rig.w(regs.CP_CONTROL, 0)
    rig.gpu.halt()
    rig.w(regs.CP_CONTROL, 1)
    rig.submit(pk.nop())
    assert rig.gpu.cp_state() is CpState.HALTED
    assert rig.gpu.run(5) == 0


def test_mmu_commands_do_not_need_memory():
    """AS commands and register access work with no memory attached."""
    gpu = Gpu(stepped=True)
    gpu.mmio_write(regs.as_reg(0, "COMMAND").offset, MmuCommand.UPDATE)
    gpu.mmio_write(regs.as_reg(0, "COMMAND").offset, MmuCommand.FLUSH_PT)
    assert gpu.stats()["internal_errors"] == 0
