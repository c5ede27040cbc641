"""qtest-style tests of the real ``gemu device`` process, through the wire protocol only.

One device process serves the module; each test resets it, attaches fresh shared guest memory
and drives it in STEPPED clock mode, so time moves only when the test says (``STEP``), as
QEMU's qtest owns the virtual clock. Everything is observed the way a driver would: register
reads, IRQ messages and memory written by the device.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from gemu.device.abi import packets as pk
from gemu.device.abi import protocol as p
from gemu.device.abi import pte, regs
from gemu.device.abi.client import DeviceClient, DeviceError, SharedMemory
from gemu.device.abi.enums import (
    Access,
    AccessType,
    CpError,
    CpState,
    Irq,
    MmuCommand,
    MmuFault,
    Opcode,
    PteType,
    TransCfgMode,
    WaitFunc,
)
from gemu.host.demo import Ring
from tests.support.device import spawn_device
from tests.support.pagetable import PageTable

RAM = 8 << 20
RING_PA, RING_SIZE = 0x10000, 0x10000
TABLES_PA, TABLES_END = 0x100000, 0x200000
DATA_PA = 0x400000
FENCE_PA = 0x3000
VA = 0x7000_0000
AS = 1
STATE = regs.CP_STATUS.field("STATE")
CODE = regs.CP_ERROR.field("CODE")


@dataclass
class Rig:
    dev: DeviceClient
    mem: SharedMemory
    ring: Ring
    pt: PageTable

    def run(self, packets: bytes, *, max_packets: int = 10_000, ticks_ns: int = 0):
        """Queue ``packets`` in the ring and STEP the device until it stops."""
        self.ring.submit(packets)
        return self.dev.step(max_packets, ticks_ns)

    def reg(self, register: regs.Register) -> int:
        return self.dev.readl(register.offset)

    def as_reg(self, name: str, as_index: int = AS) -> int:
        return self.dev.readl(regs.as_reg(as_index, name).offset)

    def state(self) -> CpState:
        return CpState(STATE.ex(self.reg(regs.CP_STATUS)))

    def bind(self, as_index: int = AS) -> None:
        w = self.dev.writel
        w(regs.as_reg(as_index, "TRANSTAB_LO").offset, self.pt.root & 0xFFFFFFFF)
        w(regs.as_reg(as_index, "TRANSTAB_HI").offset, self.pt.root >> 32)
        w(regs.as_reg(as_index, "TRANSCFG").offset, TransCfgMode.PT_4LEVEL)
        w(regs.as_reg(as_index, "COMMAND").offset, MmuCommand.UPDATE)

    def flush(self, as_index: int = AS) -> None:
        self.dev.writel(regs.as_reg(as_index, "COMMAND").offset, MmuCommand.FLUSH_PT)

    def resume(self) -> None:
        self.dev.writel(regs.CP_CONTROL.offset, 0b11)  # ENABLE | RESUME


@pytest.fixture(scope="module")
def device_spec() -> Iterator[str]:
    with spawn_device(log_level="error") as proc:
        yield proc.spec
        assert proc.alive()


@pytest.fixture
def rig(device_spec: str) -> Iterator[Rig]:
    dev = DeviceClient.connect(device_spec)
    mem = SharedMemory(RAM)
    try:
        dev.reset()
        dev.attach_memory(mem)
        dev.set_clock_mode(p.ClockMode.STEPPED)
        dev.writel(regs.IRQ_MASK.offset, 0x1F)
        dev.writel(regs.MMU_INT_MASK.offset, 0xFFFFFFFF)
        dev.drain_irqs()
        ring = Ring(dev, mem, RING_PA, RING_SIZE)
        pt = PageTable(mem, TABLES_PA, TABLES_END)
        r = Rig(dev, mem, ring, pt)
        r.bind()
        yield r
    finally:
        dev.close()
        mem.close()


def job(*packets: bytes) -> bytes:
    """A ring-level job in AS 1: select the AS, then the packets."""
    return pk.set_as(AS) + b"".join(packets)


# --- registers ---------------------------------------------------------------------------


def test_every_register_reads_its_reset_value_after_reset(device_spec):
    """After RESET every readable register holds its declared reset value (MEM_PAGES and
    STATUS.MEM_ATTACHED reflect the attached memory), read in one batched REG_READ per block."""
    with DeviceClient.connect(device_spec) as dev, SharedMemory(RAM) as mem:
        dev.reset()
        dev.attach_memory(mem)
        for r in regs.REGISTER_MAP:
            value = dev.readl(r.offset)
            if r is regs.MEM_PAGES:
                assert value == RAM // regs.PAGE_SIZE
            elif r is regs.STATUS:
                assert value == regs.STATUS.field("MEM_ATTACHED").mask
            elif r in (regs.TIMESTAMP_LO, regs.TIMESTAMP_HI):
                continue  # the free-running clock
            elif r is regs.IRQ_RAWSTAT or r is regs.IRQ_STATUS:
                assert value & ~int(Irq.RESET_DONE) == 0, r.name
            elif r.readable:
                assert value == r.reset, f"{r.name} = {value:#x}, reset value {r.reset:#x}"
            else:
                assert value == 0, f"write-only {r.name} must read as 0"


def test_read_only_writes_are_ignored_and_w1c_clears(rig: Rig):
    """Writes to RO registers change nothing; IRQ_CLEAR and MMU_INT_CLEAR clear exactly the bits
    written as 1; IRQ_STATUS is RAWSTAT & MASK."""
    rig.dev.writel(regs.GPU_ID.offset, 0)
    assert rig.reg(regs.GPU_ID) == regs.GPU_ID_VALUE
    rig.run(job(pk.fence(FENCE_PA, 1, irq=True, phys=True)))
    raw = rig.reg(regs.IRQ_RAWSTAT)
    assert raw & Irq.FENCE and raw & Irq.CP_IDLE
    rig.dev.writel(regs.IRQ_MASK.offset, int(Irq.FENCE))
    assert rig.reg(regs.IRQ_STATUS) == Irq.FENCE
    rig.dev.writel(regs.IRQ_CLEAR.offset, int(Irq.FENCE))
    assert rig.reg(regs.IRQ_RAWSTAT) == raw & ~Irq.FENCE
    assert rig.reg(regs.IRQ_STATUS) == 0
    assert rig.dev.readl(regs.IRQ_CLEAR.offset) == 0
    assert regs.IRQ_CLEAR.access is Access.W1C


# --- every packet ------------------------------------------------------------------------


def map_data(rig: Rig, pages: int = 4, *, write: bool = True, exec: bool = False) -> None:
    rig.pt.map(VA, DATA_PA, pages * regs.PAGE_SIZE, write=write, exec=exec)


def test_nop_and_write_data(rig: Rig):
    """NOP skips its body; WRITE_DATA stores its dwords at a GPU VA."""
    map_data(rig)
    res = rig.run(job(pk.nop(3), pk.write_data(VA + 8, [0xDEADBEEF, 0x1234])))
    assert res.executed == 3 and res.cp_state == CpState.IDLE
    assert rig.mem.read(DATA_PA + 8, 8) == struct.pack("<II", 0xDEADBEEF, 0x1234)


def test_copy_fill_crc32_and_atomic(rig: Rig):
    """FILL, COPY across pages, CRC32 (zlib) and a 64-bit ATOMIC add all land in memory."""
    map_data(rig, 8)
    src, dst, crc_at, counter = VA, VA + 0x3000, VA + 0x7000, VA + 0x7008
    rig.mem.write_u64(DATA_PA + 0x7008, (1 << 64) - 2)
    rig.run(
        job(
            pk.fill(src, 0x2800, 0xA1B2C3D4),
            pk.copy(src + 0x10, dst, 0x2000),
            pk.crc32(dst, 0x2000, crc_at),
            pk.atomic_add(counter, 5),
        )
    )
    filled = struct.pack("<I", 0xA1B2C3D4) * (0x2800 // 4)
    assert rig.mem.read(DATA_PA, 0x2800) == filled
    copied = filled[0x10 : 0x10 + 0x2000]
    assert rig.mem.read(DATA_PA + 0x3000, 0x2000) == copied
    assert rig.mem.read_u32(DATA_PA + 0x7000) == zlib.crc32(copied)
    assert rig.mem.read_u64(DATA_PA + 0x7008) == 3  # wrapped at 2**64


def test_fence_writes_its_seqno_latches_it_and_raises_the_irq(rig: Rig):
    """FENCE writes the 64-bit seqno, latches FENCE_SEQNO and, with the IRQ flag, sends an IRQ
    message whose status has FENCE set."""
    seqno = (7 << 32) | 42
    rig.run(job(pk.fence(FENCE_PA, seqno, irq=True, phys=True)))
    assert rig.mem.read_u64(FENCE_PA) == seqno
    assert rig.reg(regs.FENCE_SEQNO_LO) | rig.reg(regs.FENCE_SEQNO_HI) << 32 == seqno
    events = rig.dev.drain_irqs()
    assert any(e.level and e.irq_status & Irq.FENCE for e in events)


def test_wait_mem_satisfied_then_times_out_on_device_time(rig: Rig):
    """WAIT_MEM passes when its condition holds; otherwise the CP waits, and only when STEP has
    advanced the device clock past the timeout does it stop with WAIT_TIMEOUT."""
    rig.mem.write_u32(0x2000, 5)
    res = rig.run(job(pk.wait_mem(0x2000, 5, function=WaitFunc.GE, phys=True)))
    assert res.cp_state == CpState.IDLE
    res = rig.run(job(pk.wait_mem(0x2000, 9, timeout_us=100, phys=True)))
    assert res.cp_state == CpState.WAITING
    assert rig.dev.step(10, 50_000).cp_state == CpState.WAITING  # 50 us: not yet
    res = rig.dev.step(10, 60_000)  # 110 us
    assert res.cp_state == CpState.ERROR
    assert CODE.ex(rig.reg(regs.CP_ERROR)) == CpError.WAIT_TIMEOUT
    assert rig.reg(regs.IRQ_RAWSTAT) & Irq.CP_ERROR


def test_indirect_buffers_nest_and_chain(rig: Rig):
    """An IB in GPU memory (EXEC mapping) runs its packets, including a nested IB; nesting past
    IB_MAX_DEPTH stops the CP with IB_TOO_DEEP."""
    map_data(rig, 4, exec=True)
    inner = pk.write_data(VA + 0x3000, [0x11])
    inner_va = VA + 0x1000
    outer = pk.write_data(VA + 0x3004, [0x22]) + pk.indirect_buffer(inner_va, len(inner) // 4)
    rig.mem.write(DATA_PA + 0x1000, inner)
    rig.mem.write(DATA_PA, outer)
    rig.run(job(pk.indirect_buffer(VA, len(outer) // 4)))
    assert rig.mem.read(DATA_PA + 0x3000, 8) == struct.pack("<II", 0x11, 0x22)
    # An IB that calls itself nests without end.
    selfcall = pk.indirect_buffer(VA + 0x2000, 4)  # its own 4 dwords
    rig.mem.write(DATA_PA + 0x2000, selfcall)
    res = rig.run(job(selfcall))
    assert res.cp_state == CpState.ERROR
    assert CODE.ex(rig.reg(regs.CP_ERROR)) == CpError.IB_TOO_DEEP


def test_privileged_packets_are_refused_inside_indirect_buffers(rig: Rig):
    """SET_AS inside an IB stops the CP with PRIVILEGED; CP_ERROR says it was in an IB and
    CP_ERROR_ADDR is the packet's GPU VA."""
    map_data(rig, 2, exec=True)
    rig.mem.write(DATA_PA, pk.set_as(0))
    rig.run(job(pk.indirect_buffer(VA, 2)))
    err = rig.reg(regs.CP_ERROR)
    assert CODE.ex(err) == CpError.PRIVILEGED
    assert regs.CP_ERROR.field("IN_IB").ex(err) == 1
    assert rig.reg(regs.CP_ERROR_ADDR_LO) | rig.reg(regs.CP_ERROR_ADDR_HI) << 32 == VA


def test_unknown_opcode_and_bad_length(rig: Rig):
    """An unknown opcode and a wrong body length each stop the CP with their error code, the
    opcode and the packet's ring address; RESUME continues with the next packet."""
    bad = struct.pack("<BBH", 0x7F, 0, 0)
    res = rig.run(job(bad, pk.fence(FENCE_PA, 3, phys=True)))
    assert res.cp_state == CpState.ERROR
    err = rig.reg(regs.CP_ERROR)
    assert CODE.ex(err) == CpError.UNKNOWN_OPCODE
    assert regs.CP_ERROR.field("OPCODE").ex(err) == 0x7F
    assert rig.reg(regs.CP_ERROR_ADDR_LO) == RING_PA + len(pk.set_as(AS))
    rig.resume()
    assert rig.dev.step(100, 0).cp_state == CpState.IDLE
    assert rig.mem.read_u64(FENCE_PA) == 3
    short_fence = pk.header(Opcode.FENCE, 2) + bytes(8)
    rig.run(job(short_fence))
    assert CODE.ex(rig.reg(regs.CP_ERROR)) == CpError.BAD_LENGTH


# --- the MMU -----------------------------------------------------------------------------


def test_debug_reads_walk_the_page_tables(rig: Rig):
    """MEM_READ in an AS's space translates through its tables; an unmapped VA is an EFAULT
    error reply; the debug path latches no fault."""
    map_data(rig, 1)
    rig.mem.write(DATA_PA + 0x10, b"through the MMU")
    assert rig.dev.mem_read(AS, VA + 0x10, 15) == b"through the MMU"
    with pytest.raises(DeviceError) as err:
        rig.dev.mem_read(AS, VA + 0x10_0000, 4)
    assert err.value.errno == p.ProtoError.EFAULT
    assert rig.reg(regs.MMU_INT_RAWSTAT) == 0


FAULTS = {
    "TRANSLATION_L0": (MmuFault.TRANSLATION_L0, 1 << 47),
    "TRANSLATION_L3": (MmuFault.TRANSLATION_L3, VA + 0x8000),
    "PERMISSION": (MmuFault.PERMISSION, VA),
    "TRANSTAB_BUS": (MmuFault.TRANSTAB_BUS, 0x5000_0000_0000 >> 4),
    "BUS": (MmuFault.BUS, VA + 0x2000),
    "ADDRESS_SIZE": (MmuFault.ADDRESS_SIZE, 1 << 48),
}


@pytest.mark.parametrize("kind", [*FAULTS, "AS_DISABLED"])
def test_every_fault_kind_latches_status_address_and_irq(rig: Rig, kind: str):
    """Each MMU fault kind latches AS_FAULTSTATUS (exception type, WRITE access, FILL as the
    source) and AS_FAULTADDRESS, sets the page or bus bit of the AS in MMU_INT_RAWSTAT, raises the
    IRQ and stops the job with MMU_FAULT; after clearing and RESUME the next job runs."""
    rig.pt.map(VA, DATA_PA, regs.PAGE_SIZE, write=False)  # read-only page
    rig.pt.map(VA + 0x1000, DATA_PA + 0x1000, regs.PAGE_SIZE, write=True)
    rig.pt.set_entry(VA + 0x2000, pte.make(RAM + 0x10_0000, PteType.PAGE, read=True, write=True))
    if kind == "TRANSTAB_BUS":
        addr = 0x1_0000_0000  # VA whose level-1 table pointer we make point outside RAM
        slot = rig.pt.root + 8 * pte.index(addr, 0)
        rig.mem.write_u64(slot, pte.make(RAM * 4, PteType.TABLE))
        expected = MmuFault.TRANSTAB_BUS
    elif kind == "AS_DISABLED":
        rig.dev.writel(regs.as_reg(AS, "TRANSCFG").offset, TransCfgMode.DISABLED)
        rig.dev.writel(regs.as_reg(AS, "COMMAND").offset, MmuCommand.UPDATE)
        addr, expected = VA + 0x1000, MmuFault.AS_DISABLED
    else:
        expected, addr = FAULTS[kind]
    res = rig.run(job(pk.fill(addr, 16, 0xFF)))
    assert res.cp_state == CpState.ERROR
    assert CODE.ex(rig.reg(regs.CP_ERROR)) == CpError.MMU_FAULT
    status = rig.as_reg("FAULTSTATUS")
    fs = {f.name: f.ex(status) for f in regs.as_reg(AS, "FAULTSTATUS").fields}
    assert fs == {
        "EXCEPTION_TYPE": expected,
        "ACCESS_TYPE": AccessType.WRITE,
        "SOURCE": Opcode.FILL,
    }
    assert rig.as_reg("FAULTADDRESS_LO") | rig.as_reg("FAULTADDRESS_HI") << 32 == addr
    bit = 1 << (AS + 16 if expected.is_bus_fault else AS)
    assert rig.reg(regs.MMU_INT_RAWSTAT) == bit
    assert rig.reg(regs.IRQ_STATUS) & Irq.MMU
    assert any(e.mmu_int_stat & bit for e in rig.dev.drain_irqs())
    # Clear, resume: the device works on.
    rig.dev.writel(regs.MMU_INT_CLEAR.offset, bit)
    assert rig.reg(regs.MMU_INT_RAWSTAT) == 0
    rig.resume()
    rig.dev.step(100, 0)
    res = rig.run(pk.fence(FENCE_PA, 99, phys=True))
    assert res.cp_state == CpState.IDLE and rig.mem.read_u64(FENCE_PA) == 99


@pytest.mark.parametrize("how", ["FLUSH_PT", "LOCK+FLUSH_PT", "UPDATE", "TLB_INVALIDATE"])
def test_tlb_is_stale_until_the_driver_flushes(rig: Rig, how: str):
    """After a PTE is rewritten, jobs keep using the old translation (the TLB), so a driver that
    forgets to flush reads the old page; each invalidation path makes the new page visible."""
    old_pa, new_pa = DATA_PA, DATA_PA + 0x10000
    rig.mem.write(old_pa, b"O" * 4096)
    rig.mem.write(new_pa, b"N" * 4096)
    rig.pt.map(VA, old_pa, regs.PAGE_SIZE)
    rig.pt.map(VA + 0x8000, DATA_PA + 0x8000, regs.PAGE_SIZE, write=True)
    crc = job(pk.crc32(VA, 4096, VA + 0x8000))
    rig.run(crc)
    assert rig.mem.read_u32(DATA_PA + 0x8000) == zlib.crc32(b"O" * 4096)
    assert rig.as_reg("TLB_ENTRIES") >= 1
    rig.pt.map(VA, new_pa, regs.PAGE_SIZE)  # remap, no flush
    rig.run(crc)
    assert rig.mem.read_u32(DATA_PA + 0x8000) == zlib.crc32(b"O" * 4096), "TLB was not stale"
    if how == "FLUSH_PT":
        rig.flush()
    elif how == "LOCK+FLUSH_PT":
        rig.dev.writel(regs.as_reg(AS, "LOCKADDR_LO").offset, VA | 11)  # 4 KiB region
        rig.dev.writel(regs.as_reg(AS, "LOCKADDR_HI").offset, 0)
        rig.dev.writel(regs.as_reg(AS, "COMMAND").offset, MmuCommand.LOCK)
        rig.flush()
    elif how == "UPDATE":
        rig.bind()
    else:
        rig.run(pk.tlb_invalidate(AS, VA, regs.PAGE_SIZE))
    rig.run(crc)
    assert rig.mem.read_u32(DATA_PA + 0x8000) == zlib.crc32(b"N" * 4096)


def test_lock_region_flush_keeps_translations_outside_the_region(rig: Rig):
    """LOCK + FLUSH_PT drops only translations inside the locked region: a page outside it
    stays stale."""
    for i in range(2):
        rig.pt.map(VA + i * 0x10000, DATA_PA + i * 0x1000, regs.PAGE_SIZE)
    rig.pt.map(VA + 0x8000, DATA_PA + 0x8000, regs.PAGE_SIZE, write=True)
    rig.run(job(pk.crc32(VA, 4, VA + 0x8000), pk.crc32(VA + 0x10000, 4, VA + 0x8004)))
    entries = rig.as_reg("TLB_ENTRIES")
    rig.dev.writel(regs.as_reg(AS, "LOCKADDR_LO").offset, VA | 11)
    rig.dev.writel(regs.as_reg(AS, "COMMAND").offset, MmuCommand.LOCK)
    rig.flush()
    assert rig.as_reg("TLB_ENTRIES") == entries - 1


# --- reset -------------------------------------------------------------------------------


def test_soft_reset_recovers_a_stopped_device(rig: Rig):
    """CONTROL.SOFT_RESET after a CP error and an MMU fault restores every register, empties the
    TLBs, raises RESET_DONE; a re-initialised ring then runs jobs again."""
    rig.run(job(pk.fill(VA, 16, 1)))
    assert rig.state() == CpState.ERROR and rig.reg(regs.MMU_INT_RAWSTAT)
    rig.dev.writel(regs.CONTROL.offset, 1)
    assert rig.reg(regs.MMU_INT_RAWSTAT) == 0
    assert rig.reg(regs.CP_ERROR) == 0
    assert rig.state() == CpState.STOPPED
    assert rig.reg(regs.IRQ_RAWSTAT) & Irq.RESET_DONE
    assert rig.as_reg("TLB_ENTRIES") == 0
    rig.ring = Ring(rig.dev, rig.mem, RING_PA, RING_SIZE)
    rig.bind()
    map_data(rig)
    rig.run(job(pk.write_data(VA, [7]), pk.fence(FENCE_PA, 5, phys=True)))
    assert rig.mem.read_u32(DATA_PA) == 7 and rig.mem.read_u64(FENCE_PA) == 5
