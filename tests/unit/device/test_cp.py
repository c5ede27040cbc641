"""The command processor: ring protocol, every opcode, every CP error, IBs, WAIT_MEM, RESUME."""

from __future__ import annotations

import struct
import zlib

import pytest

from gemu.device.abi import packets as pk
from gemu.device.abi import regs
from gemu.device.abi.enums import CpError, CpState, Irq, Opcode, PacketFlags, WaitFunc
from gemu.device.abi.protocol import MAX_DMA
from gemu.device.abi.regs import IB_MAX_DEPTH
from tests.support.device_rig import DATA, RING_BASE, RING_SIZE, Rig

VA = 0x4000_0000
PA = DATA
IB_VA = 0x5000_0000
IB_PA = DATA + 0x100000
FENCE = 0x8000


@pytest.fixture
def pt(rig):
    t = rig.address_space(1)
    t.map(VA, PA, 0x20000, write=True)
    t.map(IB_VA, IB_PA, 0x10000, exec=True)
    rig.submit(pk.set_as(1))
    rig.drain()
    return t


def raw(op, flags, body_dwords):
    return struct.pack("<BBH", op, flags, len(body_dwords)) + struct.pack(
        f"<{len(body_dwords)}I", *body_dwords
    )


def ib(rig, *packets, at=0):
    """Place packets at IB_VA + at; return the INDIRECT_BUFFER packet that runs them."""
    data = b"".join(packets)
    rig.mem.write(IB_PA + at, data)
    return pk.indirect_buffer(IB_VA + at, len(data) // 4)


def expect_error(rig, code, opcode, addr, *, in_ib=False, as_index=None):
    assert rig.gpu.cp_state() is CpState.ERROR
    err = rig.cp_error()
    assert err[0] is code
    assert err[1] == opcode
    assert err[3] == int(in_ib)
    if as_index is not None:
        assert err[2] == as_index
    assert rig.cp_error_addr() == addr
    assert rig.irq_raw() & Irq.CP_ERROR
    assert regs.STATUS.field("CP_ERROR").ex(rig.r(regs.STATUS))


# --- ring protocol -------------------------------------------------------------------------


def test_doorbell_starts_execution_tail_alone_does_not(rig):
    """Writing RING_TAIL starts nothing; the doorbell latches it and the CP runs to it."""
    rig.put(pk.fence(FENCE, 1, phys=True))
    assert not rig.gpu.has_work()
    assert rig.gpu.cp_state() is CpState.IDLE
    rig.w(regs.RING_DOORBELL, 1)
    assert rig.gpu.has_work() and rig.gpu.cp_state() is CpState.RUNNING
    assert rig.drain() == 1
    assert rig.mem.read_u64(FENCE) == 1
    assert rig.r(regs.RING_HEAD) == rig.r(regs.RING_TAIL) == 20


def test_ring_drain_raises_cp_idle(rig):
    """When the head catches up with the tail the CP is IDLE and Irq.CP_IDLE is raised."""
    rig.run(pk.nop(), pk.nop(2))
    assert rig.gpu.cp_state() is CpState.IDLE
    assert rig.irq_raw() == Irq.CP_IDLE
    assert rig.r(regs.CP_PACKETS) == 2


def test_packets_wrap_around_the_ring(rig):
    """A packet that straddles the end of the ring is read modulo the ring size."""
    rig.submit(pk.nop((RING_SIZE - 12) // 4 - 1))  # head ends 12 bytes before the end
    rig.drain()
    assert rig.r(regs.RING_HEAD) == RING_SIZE - 12
    rig.run(pk.write_data(0x9000, [1, 2, 3], phys=True), pk.fence(FENCE, 9, phys=True))
    assert rig.mem.read(0x9000, 12) == struct.pack("<3I", 1, 2, 3)
    assert rig.mem.read_u64(FENCE) == 9
    assert rig.r(regs.RING_HEAD) == (RING_SIZE - 12 + 24 + 20) % RING_SIZE


def test_cp_pc_and_status_fields(rig, pt):
    """CP_PC is the next packet (ring: physical); CP_STATUS shows STATE, IB_DEPTH and AS."""
    rig.put(pk.nop())
    assert rig.r(regs.CP_PC_LO) == RING_BASE + rig.r(regs.RING_HEAD)
    status = rig.r(regs.CP_STATUS)
    assert regs.CP_STATUS.field("AS").ex(status) == 1
    assert regs.CP_STATUS.field("STATE").ex(status) == CpState.IDLE


def test_enable_validates_ring_config(rig):
    """ENABLE with a misaligned base or a bad size stops with RING_CONFIG; fixed config works."""
    rig.w(regs.CP_CONTROL, 0)
    assert rig.gpu.cp_state() is CpState.STOPPED
    rig.w(regs.RING_SIZE, 5000)
    rig.w(regs.CP_CONTROL, 1)
    expect_error(rig, CpError.RING_CONFIG, 0, RING_BASE)
    rig.w(regs.RING_SIZE, RING_SIZE)
    rig.w(regs.RING_BASE_LO, RING_BASE + 0x800)
    rig.resume()
    rig.w(regs.CP_CONTROL, 1)
    assert rig.cp_error()[0] is CpError.RING_CONFIG
    rig.w(regs.RING_BASE_LO, RING_BASE)
    rig.w(regs.CP_CONTROL, 2)  # RESUME without ENABLE
    assert rig.gpu.cp_state() is CpState.STOPPED
    assert rig.r(regs.CP_ERROR) == 0
    rig.w(regs.CP_CONTROL, 1)
    assert rig.gpu.cp_state() is CpState.IDLE


@pytest.mark.parametrize("size", [2048, 32 << 20, 3 * 4096])
def test_enable_rejects_sizes(rig, size):
    """RING_SIZE must be a power of two in [4 KiB, 16 MiB]."""
    rig.w(regs.CP_CONTROL, 0)
    rig.w(regs.RING_SIZE, size)
    rig.w(regs.CP_CONTROL, 1)
    assert rig.cp_error()[0] is CpError.RING_CONFIG


@pytest.mark.parametrize("tail", [6, RING_SIZE, RING_SIZE + 8])
def test_bad_tail_is_ring_config(rig, tail):
    """A doorbell with RING_TAIL unaligned or not below RING_SIZE stops with RING_CONFIG."""
    rig.w(regs.RING_TAIL, tail)
    rig.w(regs.RING_DOORBELL, 1)
    expect_error(rig, CpError.RING_CONFIG, 0, RING_BASE)


def test_reset_head_only_while_disabled(rig, caplog):
    """RESET_HEAD zeroes head and tail when disabled; while enabled it is a guest error."""
    rig.run(pk.nop())
    rig.w(regs.CP_CONTROL, 1 | 4)
    assert rig.r(regs.RING_HEAD) == 4
    assert "RESET_HEAD ignored" in caplog.text
    rig.w(regs.CP_CONTROL, 4)
    assert rig.r(regs.RING_HEAD) == 0 and rig.r(regs.RING_TAIL) == 0


def test_disable_stops_and_keeps_head(rig):
    """Clearing ENABLE stops the CP: the doorbell is ignored and nothing runs."""
    rig.w(regs.CP_CONTROL, 0)
    rig.submit(pk.nop())
    assert rig.gpu.run(10) == 0
    assert rig.gpu.cp_state() is CpState.STOPPED


# --- opcodes ---------------------------------------------------------------------------------


def test_nop_and_set_as(rig):
    """NOP skips its body; SET_AS selects the AS shown in CP_STATUS.AS."""
    rig.run(pk.nop(3), pk.set_as(5))
    assert regs.CP_STATUS.field("AS").ex(rig.r(regs.CP_STATUS)) == 5


def test_write_data_virtual(rig, pt):
    """WRITE_DATA writes its dwords at a GPU VA, across a page boundary."""
    rig.run(pk.write_data(VA + 0xFFC, [0x11, 0x22, 0x33]))
    assert rig.mem.read(PA + 0xFFC, 12) == struct.pack("<3I", 0x11, 0x22, 0x33)


def test_copy_and_fill(rig, pt):
    """FILL repeats its 32-bit value (phase kept for odd sizes); COPY moves SIZE bytes."""
    rig.run(pk.fill(VA + 2, 7, 0x44332211), pk.copy(VA, VA + 0x3000, 16))
    assert rig.mem.read(PA, 12) == b"\0\0\x11\x22\x33\x44\x11\x22\x33\0\0\0"
    assert rig.mem.read(PA + 0x3000, 16) == rig.mem.read(PA, 16)


def test_copy_phys(rig):
    """COPY with PHYS moves guest-physical bytes."""
    rig.mem.write(0x20000, b"hello")
    rig.run(pk.copy(0x20000, 0x21000, 5, phys=True))
    assert rig.mem.read(0x21000, 5) == b"hello"


def test_crc32(rig, pt):
    """CRC32 writes zlib.crc32 of the source range at the destination."""
    data = bytes(range(256)) * 40
    rig.mem.write(PA + 0x100, data)
    rig.run(pk.crc32(VA + 0x100, len(data), VA + 0x8000))
    assert rig.mem.read_u32(PA + 0x8000) == zlib.crc32(data)


def test_atomic_add_wraps(rig, pt):
    """ATOMIC adds to a 64-bit value, wrapping at 2**64."""
    rig.mem.write_u64(PA + 0x10, (1 << 64) - 2)
    rig.run(pk.atomic_add(VA + 0x10, 5))
    assert rig.mem.read_u64(PA + 0x10) == 3


def test_fence_with_and_without_irq(rig, pt):
    """FENCE writes and latches the seqno; only the IRQ flag raises Irq.FENCE."""
    rig.run(pk.fence(VA + 0x40, 0x1_0000_0002))
    assert rig.mem.read_u64(PA + 0x40) == 0x1_0000_0002
    assert rig.r(regs.FENCE_SEQNO_LO) == 2 and rig.r(regs.FENCE_SEQNO_HI) == 1
    assert not rig.irq_raw() & Irq.FENCE
    rig.run(pk.fence(VA + 0x40, 3, irq=True))
    assert rig.irq_raw() & Irq.FENCE


def test_tlb_invalidate_is_counted(rig, pt):
    """TLB_INVALIDATE empties the AS's TLB (TLB_ENTRIES = 0)."""
    rig.run(pk.write_data(VA, [1]))
    assert rig.ras(1, "TLB_ENTRIES") == 1
    rig.run(pk.tlb_invalidate(1))
    assert rig.ras(1, "TLB_ENTRIES") == 0


# --- CP errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "packet, code, opcode",
    [
        (raw(0x55, 0, []), CpError.UNKNOWN_OPCODE, 0x55),
        (raw(Opcode.SET_AS, 0, [1, 2]), CpError.BAD_LENGTH, Opcode.SET_AS),
        (raw(Opcode.WRITE_DATA, 0, [0, 0]), CpError.BAD_LENGTH, Opcode.WRITE_DATA),
        (raw(Opcode.NOP, PacketFlags.PHYS, []), CpError.BAD_FLAGS, Opcode.NOP),
        (raw(Opcode.COPY, PacketFlags.IRQ, [0] * 5), CpError.BAD_FLAGS, Opcode.COPY),
        (raw(Opcode.FILL, 0x80, [0] * 4), CpError.BAD_FLAGS, Opcode.FILL),
        (pk.write_data(0x9002, [1], phys=True), CpError.BAD_ALIGNMENT, Opcode.WRITE_DATA),
        (pk.crc32(0, 4, 0x9001, phys=True), CpError.BAD_ALIGNMENT, Opcode.CRC32),
        (pk.atomic_add(0x9004, 1, phys=True), CpError.BAD_ALIGNMENT, Opcode.ATOMIC),
        (pk.fence(0x9004, 1, phys=True), CpError.BAD_ALIGNMENT, Opcode.FENCE),
        (pk.wait_mem(0x9002, 0, phys=True), CpError.BAD_ALIGNMENT, Opcode.WAIT_MEM),
        (pk.indirect_buffer(0x9002, 1), CpError.BAD_ALIGNMENT, Opcode.INDIRECT_BUFFER),
        (pk.set_as(8), CpError.BAD_ARGUMENT, Opcode.SET_AS),
        (pk.tlb_invalidate(9), CpError.BAD_ARGUMENT, Opcode.TLB_INVALIDATE),
        (
            raw(Opcode.WAIT_MEM, PacketFlags.PHYS, [0x9000, 0, 0, 0, 7, 0]),
            CpError.BAD_ARGUMENT,
            Opcode.WAIT_MEM,
        ),
        (pk.write_data(1 << 30, [1], phys=True), CpError.BUS_ERROR, Opcode.WRITE_DATA),
        (pk.copy(0, (16 << 20) - 2, 4, phys=True), CpError.BUS_ERROR, Opcode.COPY),
    ],
    ids=lambda v: getattr(v, "name", None) if not isinstance(v, bytes) else None,
)
def test_ring_packet_errors(rig, packet, code, opcode):
    """Each malformed ring packet stops the CP with its code, opcode and physical address;
    the job's following packets do not run, and RESUME continues with the next ring packet."""
    rig.run(pk.nop(), packet, pk.fence(FENCE, 1, phys=True))
    expect_error(rig, code, opcode, RING_BASE + 4, as_index=0)
    assert rig.mem.read_u64(FENCE) == 0
    assert rig.r(regs.RING_HEAD) == 4 + len(packet)
    rig.resume()
    assert rig.r(regs.CP_ERROR) == 0 and rig.gpu.cp_state() is CpState.RUNNING
    rig.drain()
    assert rig.mem.read_u64(FENCE) == 1


def test_packet_past_the_tail_is_bad_length(rig):
    """A packet whose body runs past RING_TAIL is BAD_LENGTH; the head moves to the tail."""
    rig.put(pk.fence(FENCE, 1, phys=True)[:12])
    rig.w(regs.RING_DOORBELL, 1)
    rig.drain()
    expect_error(rig, CpError.BAD_LENGTH, Opcode.FENCE, RING_BASE)
    assert rig.r(regs.RING_HEAD) == 12


def test_ring_outside_memory_is_bus_error():
    """A ring placed outside guest memory stops with BUS_ERROR on the first fetch."""
    rig = Rig(mem_size=1 << 20)
    rig.start_ring(base=2 << 20)
    rig.w(regs.RING_TAIL, 4)
    rig.w(regs.RING_DOORBELL, 1)
    rig.drain()
    expect_error(rig, CpError.BUS_ERROR, 0, 2 << 20)


def test_ring_packet_running_out_of_memory_is_bus_error():
    """A ring reaching past guest memory: a packet whose body lies outside is a BUS_ERROR."""
    rig = Rig(mem_size=1 << 20)
    base = (1 << 20) - 4096
    rig.start_ring(base=base, size=8192)  # the second half lies outside guest memory
    rig.submit(pk.nop(1022))  # 4092 bytes: the next header is the last dword of memory
    rig.drain()
    rig.buf[-4:] = pk.fence(FENCE, 1, phys=True)[:4]
    rig.w(regs.RING_TAIL, 4092 + 20)
    rig.w(regs.RING_DOORBELL, 1)
    rig.drain()
    expect_error(rig, CpError.BUS_ERROR, Opcode.FENCE, base + 4092)


def test_no_memory(rig):
    """With guest memory detached, pending work stops with NO_MEMORY."""
    rig.put(pk.nop())
    rig.gpu.detach_memory()
    rig.w(regs.RING_DOORBELL, 1)
    assert rig.gpu.run(5) == 0
    expect_error(rig, CpError.NO_MEMORY, 0, RING_BASE)


def test_max_packets_bounds_a_run(rig):
    """run(n) executes at most n packets; the rest wait for the next run."""
    rig.submit(*(pk.nop() for _ in range(10)))
    assert rig.gpu.run(3) == 3
    assert rig.gpu.has_work()
    assert rig.gpu.run(100) == 7
    assert not rig.gpu.has_work()


# --- indirect buffers ----------------------------------------------------------------------


def test_ib_runs_and_returns(rig, pt):
    """An IB's packets run in the current AS, then the ring continues."""
    call = ib(rig, pk.write_data(VA, [0x77]), pk.fill(VA + 0x100, 8, 0xFFFFFFFF))
    rig.run(call, pk.fence(FENCE, 4, phys=True))
    assert rig.mem.read_u32(PA) == 0x77
    assert rig.mem.read(PA + 0x100, 8) == b"\xff" * 8
    assert rig.mem.read_u64(FENCE) == 4
    assert rig.gpu.cp_state() is CpState.IDLE


def test_ib_nesting_to_max_depth(rig, pt):
    """IBs nest up to IB_MAX_DEPTH; CP_STATUS.IB_DEPTH and CP_PC (a VA) follow the nesting."""
    inner = ib(rig, pk.write_data(VA, [IB_MAX_DEPTH]), at=0x1000 * IB_MAX_DEPTH)
    for depth in range(IB_MAX_DEPTH - 1, 0, -1):
        inner = ib(rig, inner, at=0x1000 * depth)
    rig.submit(inner)
    for _ in range(IB_MAX_DEPTH):
        assert rig.gpu.single_step() == 1
    status = rig.r(regs.CP_STATUS)
    assert regs.CP_STATUS.field("IB_DEPTH").ex(status) == IB_MAX_DEPTH
    assert rig.gpu.cp_pc() == IB_VA + 0x1000 * IB_MAX_DEPTH
    rig.drain()
    assert rig.mem.read_u32(PA) == IB_MAX_DEPTH


def test_ib_too_deep(rig, pt):
    """One more level than IB_MAX_DEPTH stops with IB_TOO_DEEP at the innermost IB packet."""
    inner = pk.write_data(VA, [1])
    for depth in range(IB_MAX_DEPTH + 1, 0, -1):
        inner = ib(rig, inner, at=0x1000 * depth)
    rig.run(inner)
    expect_error(
        rig,
        CpError.IB_TOO_DEEP,
        Opcode.INDIRECT_BUFFER,
        IB_VA + 0x1000 * IB_MAX_DEPTH,
        in_ib=True,
        as_index=1,
    )
    assert rig.mem.read_u32(PA) == 0


@pytest.mark.parametrize(
    "packet, code",
    [
        (pk.set_as(0), CpError.PRIVILEGED),
        (pk.tlb_invalidate(1), CpError.PRIVILEGED),
        (pk.fence(FENCE, 1, phys=True), CpError.PRIVILEGED),
        (pk.write_data(VA, [1, 2, 3])[:-4], CpError.BAD_LENGTH),
        (raw(0xEE, 0, [1]), CpError.UNKNOWN_OPCODE),
    ],
    ids=["SET_AS", "TLB_INVALIDATE", "PHYS", "past-IB-end", "unknown"],
)
def test_ib_errors(rig, pt, packet, code):
    """Privileged packets, a packet past the IB end and unknown opcodes stop in the IB, with
    the VA and IN_IB latched; RESUME skips the rest of the IB and runs the job's FENCE."""
    rest = () if code is CpError.BAD_LENGTH else (pk.write_data(VA, [5]),)
    rig.run(ib(rig, pk.nop(), packet, *rest), pk.fence(FENCE, 8, phys=True))
    expect_error(rig, code, packet[0], IB_VA + 4, in_ib=True, as_index=1)
    assert rig.mem.read_u64(FENCE) == 0
    rig.resume()
    rig.drain()
    assert rig.mem.read_u32(PA) == 0
    assert rig.mem.read_u64(FENCE) == 8


def test_ib_fetch_needs_exec(rig, pt):
    """An IB in a page without EXEC faults on fetch: SOURCE and OPCODE are INDIRECT_BUFFER."""
    pt.map(IB_VA + 0x8000, IB_PA + 0x8000, 0x1000, exec=False)
    rig.run(ib(rig, pk.nop(), at=0x8000))
    expect_error(rig, CpError.MMU_FAULT, Opcode.INDIRECT_BUFFER, IB_VA + 0x8000, in_ib=True)
    assert rig.fault(1)[1:] == (1, Opcode.INDIRECT_BUFFER, IB_VA + 0x8000)


def test_ib_spanning_pages(rig, pt):
    """IB packets are fetched across a page boundary."""
    call = ib(rig, pk.write_data(VA, list(range(8))), at=0x1000 - 12)
    rig.run(call)
    assert rig.mem.read(PA, 32) == struct.pack("<8I", *range(8))


def test_empty_ib_is_nothing(rig, pt):
    """An INDIRECT_BUFFER of 0 dwords does nothing."""
    rig.run(pk.indirect_buffer(IB_VA, 0), pk.fence(FENCE, 1, phys=True))
    assert rig.mem.read_u64(FENCE) == 1


# --- WAIT_MEM --------------------------------------------------------------------------------


def test_wait_satisfied_immediately(rig, pt):
    """A WAIT_MEM whose condition already holds completes like any packet."""
    rig.mem.write_u32(PA, 0x1234)
    rig.run(pk.wait_mem(VA, 0x34, mask=0xFF), pk.fence(FENCE, 1, phys=True))
    assert rig.mem.read_u64(FENCE) == 1


def test_wait_blocks_until_memory_changes(rig, pt):
    """A blocked WAIT_MEM keeps the CP WAITING (CP_PC on it) until memory satisfies it."""
    start = RING_BASE + rig.r(regs.RING_HEAD)
    rig.submit(pk.wait_mem(VA, 5, function=WaitFunc.GE), pk.fence(FENCE, 1, phys=True))
    assert rig.gpu.run(10) == 0
    assert rig.gpu.cp_state() is CpState.WAITING
    assert not rig.gpu.has_work()
    assert rig.gpu.wait_deadline_ns() is None
    assert rig.gpu.cp_pc() == start
    assert rig.r(regs.RING_HEAD) == start - RING_BASE + 28
    assert rig.gpu.step(10, 10**12)[:2] == (0, CpState.WAITING)  # waits forever
    rig.mem.write_u32(PA, 5)
    assert rig.gpu.step(10, 0)[:2] == (2, CpState.IDLE)
    assert rig.mem.read_u64(FENCE) == 1


def test_wait_timeout_on_device_clock(rig, pt):
    """A WAIT_MEM times out exactly when the stepped clock passes TIMEOUT_US."""
    start = RING_BASE + rig.r(regs.RING_HEAD)
    rig.submit(pk.wait_mem(VA, 1, timeout_us=100), pk.fence(FENCE, 1, phys=True))
    rig.gpu.run(10)
    assert rig.gpu.wait_deadline_ns() == 100_000
    assert rig.gpu.step(10, 99_999)[1] is CpState.WAITING
    executed, state, now = rig.gpu.step(10, 1)
    assert (executed, state, now) == (0, CpState.ERROR, 100_000)
    expect_error(rig, CpError.WAIT_TIMEOUT, Opcode.WAIT_MEM, start, as_index=1)
    rig.resume()
    rig.drain()
    assert rig.mem.read_u64(FENCE) == 1


@pytest.mark.parametrize(
    "func, value, ref, holds",
    [
        (WaitFunc.ALWAYS, 0, 9, True),
        (WaitFunc.LT, 1, 2, True),
        (WaitFunc.LT, 2, 2, False),
        (WaitFunc.LE, 2, 2, True),
        (WaitFunc.EQ, 2, 3, False),
        (WaitFunc.NE, 2, 3, True),
        (WaitFunc.GE, 3, 3, True),
        (WaitFunc.GT, 3, 3, False),
    ],
)
def test_wait_functions(rig, func, value, ref, holds):
    """Each WAIT_MEM function compares (memory & mask) with the reference."""
    rig.mem.write_u32(0x9000, value | 0xF00)
    rig.submit(pk.wait_mem(0x9000, ref, mask=0xFF, function=func, phys=True))
    rig.gpu.run(1)
    assert (rig.gpu.cp_state() is CpState.IDLE) == holds


def test_jobs_over_in_band_memory():
    """The same jobs run when guest memory is reached through DMA messages (no mapping)."""
    from gemu.device.gpu import Gpu
    from gemu.device.memory import InBandMemory
    from tests.support.pagetable import PageTable

    ram = bytearray(8 << 20)
    dma = []

    def read(pa, n):
        dma.append(n)
        return bytes(ram[pa : pa + n])

    def write(pa, data):
        ram[pa : pa + len(data)] = data

    mem = InBandMemory(len(ram), read, write)
    gpu = Gpu(stepped=True)
    gpu.attach_memory(mem)
    t = PageTable(mem, 0x100000, 0x200000)
    t.map(VA, 0x400000, 0x3000, write=True)
    t.map(IB_VA, 0x500000, 0x1000, exec=True)
    for name, value in (("TRANSTAB_LO", t.root), ("TRANSCFG", 1), ("COMMAND", 1)):
        gpu.mmio_write(regs.as_reg(1, name).offset, value)
    body = pk.fill(VA, 0x2000, 0x01020304) + pk.crc32(VA, 0x2000, VA + 0x2000)
    mem.write(0x500000, body)
    for reg, value in ((regs.RING_BASE_LO, RING_BASE), (regs.RING_SIZE, RING_SIZE)):
        gpu.mmio_write(reg.offset, value)
    gpu.mmio_write(regs.CP_CONTROL.offset, 1)

    def submit(at, data):
        for i in range(len(data)):
            ram[RING_BASE + (at + i) % RING_SIZE] = data[i]
        gpu.mmio_write(regs.RING_TAIL.offset, (at + len(data)) % RING_SIZE)
        gpu.mmio_write(regs.RING_DOORBELL.offset, 1)
        while gpu.has_work():
            gpu.run(100)

    submit(0, pk.nop((RING_SIZE - 12) // 4 - 1))  # the next job wraps around the end
    job = pk.set_as(1) + pk.indirect_buffer(IB_VA, len(body) // 4)
    submit(RING_SIZE - 12, job + pk.fence(FENCE, 5, irq=True, phys=True))
    assert gpu.cp_state() is CpState.IDLE, gpu.debug_read(regs.CP_ERROR.offset)
    assert mem.read_u32(0x400000 + 0x2000) == zlib.crc32(bytes([4, 3, 2, 1]) * 0x800)
    assert mem.read_u64(FENCE) == 5
    assert dma and max(dma) <= MAX_DMA
