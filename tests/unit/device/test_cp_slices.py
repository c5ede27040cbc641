"""Large COPY, FILL and CRC32 packets run in resumable slices under a work budget.

One ``run()`` translates and moves at most ``cp.BUDGET`` work units (pages translated plus
extents moved, give or take one window); a packet larger than a window stays in progress
(RUNNING, CP_PC on it, RING_HEAD past it) and the next ``run()`` continues it. A fault in the
translation pass leaves memory untouched; a reset or CP disable aborts the packet; the
debugger's single step still executes one whole packet; memory use does not grow with the size
of a packet.
"""

from __future__ import annotations

import tracemalloc
import zlib

import pytest

from gemu.device import cp
from gemu.device.abi import packets as pk
from gemu.device.abi import regs
from gemu.device.abi.enums import CpError, CpState, Irq, MmuFault, TransCfgMode
from gemu.device.abi.regs import PAGE_SIZE
from gemu.device.coredump import CoreDumper
from gemu.device.gdbstub import next_pc, pc_in_ib
from gemu.device.memory import InBandMemory
from tests.support.device_rig import DATA, RING_BASE, Rig
from tests.support.hostile import GiB4, alias_tables

ALIAS_VA = 1 << 40
ALIAS_TABLES = 0x800000  # above the rig's table area and its data pages
ALIAS_PAGE = ALIAS_TABLES + 4 * PAGE_SIZE
VA = 0x4000_0000
MIB = 1 << 20


def alias_as(rig: Rig, as_index: int = 0) -> None:
    root = alias_tables(rig.mem, ALIAS_TABLES)
    rig.was(as_index, "TRANSTAB_LO", root)
    rig.was(as_index, "TRANSCFG", TransCfgMode.PT_4LEVEL)
    rig.was(as_index, "COMMAND", 1)  # UPDATE


def translated(rig: Rig) -> int:
    return rig.gpu.mmu.hits + rig.gpu.mmu.misses


def test_an_aliased_1gib_fill_is_sliced_within_the_budget(rig):
    """One run() translates about BUDGET pages, not 262,144: the FILL stays RUNNING with
    CP_PC on it, then completes over many runs, raising CP_IDLE once and counting one packet."""
    alias_as(rig)
    rig.clear_irq()
    rig.submit(pk.fill(ALIAS_VA, 1 << 30, 0x01020304))
    before = translated(rig)
    assert rig.gpu.run(256) == 0
    assert translated(rig) - before <= cp.BUDGET + 2 * (cp._WINDOW // PAGE_SIZE)
    assert rig.gpu.cp_state() is CpState.RUNNING and rig.gpu.has_work()
    assert rig.field(regs.STATUS, "CP_BUSY") == 1
    pc = rig.r(regs.CP_PC_LO) | (rig.r(regs.CP_PC_HI) << 32)
    assert pc == RING_BASE
    assert rig.r(regs.RING_HEAD) == len(pk.fill(0, 0, 0))
    assert not rig.irq_raw() & Irq.CP_IDLE
    runs = 1
    while rig.gpu.has_work():
        rig.gpu.run(256)
        runs += 1
    assert runs > 100
    assert rig.gpu.cp_state() is CpState.IDLE
    assert rig.irq_raw() & Irq.CP_IDLE
    assert rig.r(regs.CP_PACKETS) == 1
    assert rig.mem.read(ALIAS_PAGE, PAGE_SIZE) == bytes([4, 3, 2, 1]) * (PAGE_SIZE // 4)


def test_sliced_packets_compute_what_whole_ones_do(rig):
    """COPY, FILL (at an odd address, so the pattern phase crosses windows) and CRC32 of 3 MiB,
    run with a budget that forces dozens of slices, give the bytes and checksum a single pass
    would."""
    pt = rig.address_space(1)
    size = 3 * MIB
    src_pa, dst_pa = DATA, DATA + 4 * MIB
    pt.map(VA, src_pa, size)
    pt.map(VA + 8 * MIB, dst_pa, size + PAGE_SIZE, write=True)
    data = bytes((i * 7 + (i >> 12)) & 0xFF for i in range(size))
    rig.mem.write(src_pa, data)
    rig.submit(
        pk.set_as(1),
        pk.copy(VA, VA + 8 * MIB, size),
        pk.crc32(VA, size, VA + 8 * MIB + size),
        pk.fill(VA + 8 * MIB + 1, size - 2, 0xAABBCCDD),
    )
    runs = 0
    while rig.gpu.has_work():
        rig.gpu.run(256, budget=64)
        runs += 1
    assert rig.gpu.cp_state() is CpState.IDLE, rig.cp_error()
    assert runs > 15
    assert rig.mem.read_u32(dst_pa + size) == zlib.crc32(data)
    expected = bytearray(data)
    pattern = bytes.fromhex("ddccbbaa") * (size // 4 + 1)
    expected[1 : size - 1] = pattern[: size - 2]
    assert rig.mem.read(dst_pa, size) == bytes(expected)
    assert rig.r(regs.CP_PACKETS) == 4


def test_a_fault_in_the_last_page_leaves_memory_untouched(rig):
    """A 4 MiB FILL whose last page is unmapped faults there, in the translation pass, before
    any byte moved; FAULTADDRESS is that page."""
    pt = rig.address_space(1)
    size = 4 * MIB
    pt.map(VA, DATA, size - PAGE_SIZE, write=True)
    rig.submit(pk.set_as(1), pk.fill(VA, size, 0xFFFFFFFF))
    while rig.gpu.has_work():
        rig.gpu.run(256)
    assert rig.cp_error()[0] is CpError.MMU_FAULT
    code, _access, _source, addr = rig.fault(1)
    assert code == MmuFault.TRANSLATION_L3 and addr == VA + size - PAGE_SIZE
    assert rig.mem.read(DATA, size - PAGE_SIZE) == bytes(size - PAGE_SIZE)


@pytest.mark.parametrize("how", ["reset", "disable"])
def test_reset_or_disable_aborts_a_sliced_packet(rig, how):
    """A soft reset or clearing CP_CONTROL.ENABLE in the middle of a sliced FILL drops it: the
    CP is STOPPED with no work, and the FENCE after it never runs."""
    alias_as(rig)
    rig.submit(pk.fill(ALIAS_VA, GiB4, 7), pk.fence(0x8000, 9, phys=True))
    rig.gpu.run(256)
    assert rig.gpu.cp.bulk is not None
    if how == "reset":
        rig.w(regs.CONTROL, regs.CONTROL.field("SOFT_RESET").mask)
    else:
        rig.w(regs.CP_CONTROL, 0)
    assert rig.gpu.cp.bulk is None
    assert rig.gpu.cp_state() is CpState.STOPPED and not rig.gpu.has_work()
    assert rig.gpu.run(256) == 0
    assert rig.mem.read_u64(0x8000) == 0


def test_single_step_executes_one_whole_large_packet(rig):
    """The debugger's single step runs a sliced packet to its end, even half done."""
    pt = rig.address_space(1)
    pt.map(VA, DATA, 4 * MIB, write=True)
    rig.submit(pk.set_as(1), pk.fill(VA, 4 * MIB, 0x11111111), pk.nop())
    rig.gpu.run(1)  # SET_AS
    rig.gpu.run(256, budget=8)  # the FILL starts
    assert rig.gpu.cp.bulk is not None
    rig.gpu.halt()
    assert rig.gpu.run(256) == 0
    assert rig.gpu.single_step() == 1
    assert rig.gpu.cp.bulk is None
    assert rig.mem.read(DATA, 4 * MIB) == b"\x11" * (4 * MIB)
    assert rig.gpu.cp_pc() == RING_BASE + len(pk.set_as(1)) + len(pk.fill(0, 0, 0))


def test_memory_does_not_grow_with_the_packet_size():
    """Twenty slices of a 4 GiB aliased COPY allocate a bounded amount (a small TLB here, so
    what is measured is the CP's own working set)."""
    rig = Rig(tlb_capacity=1024)
    rig.start_ring()
    alias_as(rig)
    rig.submit(pk.copy(ALIAS_VA, ALIAS_VA + (1 << 33), GiB4))
    rig.gpu.run(256)
    tracemalloc.start()
    try:
        for _ in range(20):
            rig.gpu.run(256)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rig.gpu.cp.bulk is not None
    assert peak < 2 * MIB, f"{peak} bytes allocated"


def test_phys_packets_are_sliced_too(rig):
    """A physical FILL of 8 MiB runs in several slices and fills exactly its range."""
    rig.submit(pk.fill(DATA, 8 * MIB, 0x5A5A5A5A, phys=True))
    runs = 0
    while rig.gpu.has_work():
        rig.gpu.run(256, budget=512)
        runs += 1
    assert runs > 2
    assert rig.mem.read(DATA, 8 * MIB) == b"\x5a" * (8 * MIB)
    assert rig.mem.read_u32(DATA + 8 * MIB) == 0


def test_in_band_memory_gets_the_smaller_budget():
    """Over in-band memory every extent is a DMA round trip: one run() does at most
    BUDGET_IN_BAND units (give or take a window) of an aliased FILL."""
    rig = Rig()
    buf = rig.buf

    def read(pa: int, n: int) -> bytes:
        return bytes(buf[pa : pa + n])

    def write(pa: int, data: bytes) -> None:
        buf[pa : pa + len(data)] = data

    rig.gpu.attach_memory(InBandMemory(len(buf), read, write))
    rig.start_ring()
    alias_as(rig)
    rig.submit(pk.fill(ALIAS_VA, 64 * MIB, 0x01020304))
    before = translated(rig)
    assert rig.gpu.run(256) == 0
    assert translated(rig) - before <= cp.BUDGET_IN_BAND + 2 * (cp._WINDOW // PAGE_SIZE)
    while rig.gpu.has_work():
        rig.gpu.run(256)
    assert rig.gpu.cp_state() is CpState.IDLE
    assert rig.mem.read(ALIAS_PAGE, 8) == bytes([4, 3, 2, 1]) * 2


def test_debugger_and_core_files_see_the_packet_in_progress(rig, tmp_path):
    """While a sliced FILL runs, the gdb stub's pc is that packet (not RING_HEAD past it), and a
    reset then is a recovered hang: the core dumper writes a HANG_RESET core, bounded."""
    alias_as(rig)
    rig.submit(pk.fill(ALIAS_VA, GiB4, 3))  # the last packet: RING_HEAD is at the tail
    rig.gpu.run(256)
    assert next_pc(rig.gpu) == RING_BASE and not pc_in_ib(rig.gpu)
    dumper = CoreDumper(rig.gpu, tmp_path)
    rig.gpu.reset_hook = dumper.before_reset
    rig.w(regs.CONTROL, regs.CONTROL.field("SOFT_RESET").mask)
    (core,) = dumper.written
    assert "HANG_RESET" in core.name
    assert core.stat().st_size < 16 * MIB


def test_contiguous_ranges_are_translated_once():
    """An 8 MiB COPY between buffers mapped contiguously: the data pass moves over the runs
    the translation pass found, so each page is translated once, as before slicing."""
    rig = Rig(mem_size=32 << 20)
    rig.start_ring()
    pt = rig.address_space(1)
    size = 8 * MIB
    pt.map(VA, DATA, size)
    pt.map(VA + size, DATA + size, size, write=True)
    rig.mem.write(DATA, bytes(range(256)) * (size // 256))
    rig.submit(pk.set_as(1), pk.copy(VA, VA + size, size))
    before = translated(rig)
    while rig.gpu.has_work():
        rig.gpu.run(256)
    assert rig.gpu.cp_state() is CpState.IDLE
    assert translated(rig) - before == 2 * size // PAGE_SIZE
    assert rig.mem.read(DATA + size, size) == rig.mem.read(DATA, size)


def test_an_overlapping_sliced_copy_behaves_like_memmove(rig):
    """A physical COPY of 3 MiB onto itself shifted up by 4 KiB + 4 moves the tail first, so
    the destination holds the source as it was (as a whole-packet copy always did)."""
    size = 3 * MIB
    data = bytes((i * 13 + (i >> 10)) & 0xFF for i in range(size))
    rig.mem.write(DATA, data)
    rig.submit(pk.copy(DATA, DATA + PAGE_SIZE + 4, size, phys=True))
    runs = 0
    while rig.gpu.has_work():
        rig.gpu.run(256, budget=300)
        runs += 1
    assert runs > 2
    assert rig.mem.read(DATA + PAGE_SIZE + 4, size) == data
