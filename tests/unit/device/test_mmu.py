"""The GPU MMU through packets and AS registers: walks, faults, TLB coherence, debug access."""

from __future__ import annotations

import pytest

from gemu.device.abi import packets as pk
from gemu.device.abi import pte, regs
from gemu.device.abi.enums import (
    AccessType,
    CpError,
    CpState,
    Irq,
    MmuCommand,
    MmuFault,
    Opcode,
    PteType,
    TransCfgMode,
)
from gemu.device.abi.protocol import SPACE_PHYS
from gemu.device.mmu import MemFault
from tests.support.device_rig import DATA, Rig

VA = 0x4000_0000
PA = DATA
FENCE = 0x8000  # physical fence slot


@pytest.fixture
def pt(rig):
    t = rig.address_space(1)
    t.map(VA, PA, 0x10000, write=True)
    rig.submit(pk.set_as(1))
    rig.drain()
    return t


def fault_bits(rig):
    return rig.r(regs.MMU_INT_RAWSTAT)


def test_write_through_mapping(rig, pt):
    """A GPU VA write lands at the physical page the PTE names."""
    rig.run(pk.write_data(VA + 0x1004, [0xCAFE]))
    assert rig.mem.read_u32(PA + 0x1004) == 0xCAFE
    assert rig.gpu.cp_state() is CpState.IDLE


def _expect_fault(rig, as_index, code, access, source, addr, *, bus=False):
    assert rig.gpu.cp_state() is CpState.ERROR
    assert rig.cp_error()[0] is CpError.MMU_FAULT
    assert rig.fault(as_index) == (code, access, source, addr)
    bit = as_index + (16 if bus else 0)
    assert fault_bits(rig) == 1 << bit
    assert rig.r(regs.MMU_INT_STAT) == 1 << bit
    assert rig.irq_raw() & Irq.MMU
    assert rig.gpu.irq_level


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_translation_fault_per_level(rig, pt, level):
    """An invalid entry at level n faults TRANSLATION_Ln with the access VA and opcode."""
    va = VA + 0x3000
    if level == 3:
        pt.set_entry(va, 0)
    else:
        # Corrupt the level-`level` entry on the path (set TYPE to PAGE: wrong type).
        table = pt.root
        for lv in range(level):
            table = pte.address(rig.mem.read_u64(table + 8 * pte.index(va, lv)))
        slot = table + 8 * pte.index(va, level)
        rig.mem.write_u64(slot, pte.make(pte.address(rig.mem.read_u64(slot)), PteType.PAGE))
    rig.run(pk.write_data(va + 8, [1]))
    _expect_fault(
        rig, 1, MmuFault.TRANSLATION_L0 + level, AccessType.WRITE, Opcode.WRITE_DATA, va + 8
    )


@pytest.mark.parametrize(
    "perms, packet, access, opcode",
    [
        (dict(read=False, write=True), pk.crc32(VA, 16, VA + 0x100), AccessType.READ, Opcode.CRC32),
        (dict(read=True, write=False), pk.fill(VA, 16, 0), AccessType.WRITE, Opcode.FILL),
        (dict(read=True, write=False), pk.atomic_add(VA, 1), AccessType.ATOMIC, Opcode.ATOMIC),
        (dict(read=False, write=True), pk.atomic_add(VA, 1), AccessType.ATOMIC, Opcode.ATOMIC),
        (dict(read=True, write=False), pk.fence(VA, 1), AccessType.WRITE, Opcode.FENCE),
        (dict(read=False, write=True), pk.wait_mem(VA, 0), AccessType.READ, Opcode.WAIT_MEM),
        (
            dict(read=True, write=True),
            pk.indirect_buffer(VA, 2),
            AccessType.EXECUTE,
            Opcode.INDIRECT_BUFFER,
        ),
    ],
)
def test_permission_faults(rig, perms, packet, access, opcode):
    """Each access type needs its permission: R reads, W writes, R+W atomics, X IB fetch."""
    t = rig.address_space(1)
    t.map(VA, PA, 0x1000, **perms)
    rig.run(pk.set_as(1), packet)
    _expect_fault(rig, 1, MmuFault.PERMISSION, access, opcode, VA)


def test_copy_destination_fault_is_first_faulting_byte(rig, pt):
    """COPY into a range whose second page is read-only faults at that page, moving nothing."""
    pt.map(VA + 0x2000, PA + 0x2000, 0x1000, write=False)
    rig.mem.write(PA + 0x8000, b"\x11" * 0x1800)
    rig.run(pk.copy(VA + 0x8000, VA + 0x1800, 0x1000))
    _expect_fault(rig, 1, MmuFault.PERMISSION, AccessType.WRITE, Opcode.COPY, VA + 0x2000)
    assert rig.mem.read(PA + 0x1800, 0x800) == bytes(0x800)


def test_transtab_bus_fault(rig):
    """A table address outside guest memory is a TRANSTAB_BUS fault (bus bit n+16)."""
    rig.was(2, "TRANSTAB_LO", 0)
    rig.was(2, "TRANSTAB_HI", 1)  # 4 GiB: far outside 16 MiB
    rig.was(2, "TRANSCFG", TransCfgMode.PT_4LEVEL)
    rig.mmu(2, MmuCommand.UPDATE)
    rig.run(pk.set_as(2), pk.write_data(VA, [1]))
    _expect_fault(rig, 2, MmuFault.TRANSTAB_BUS, AccessType.WRITE, Opcode.WRITE_DATA, VA, bus=True)


def test_leaf_bus_fault(rig, pt):
    """A leaf pointing outside guest memory is a BUS fault at the access VA."""
    pt.set_entry(VA + 0x5000, pte.make(1 << 40, read=True, write=True))
    rig.run(pk.fence(VA + 0x5008, 3))
    _expect_fault(rig, 1, MmuFault.BUS, AccessType.WRITE, Opcode.FENCE, VA + 0x5008, bus=True)


def test_address_size_fault(rig, pt):
    """A VA range reaching past 2**48 is an ADDRESS_SIZE fault at the first bad byte."""
    rig.run(pk.fill((1 << 48) - 8, 16, 0))
    _expect_fault(rig, 1, MmuFault.ADDRESS_SIZE, AccessType.WRITE, Opcode.FILL, 1 << 48)


def test_disabled_as_faults(rig):
    """An AS never UPDATEd (or with MODE DISABLED) faults AS_DISABLED; TRANSTAB needs UPDATE."""
    t = rig.address_space(3)
    t.map(VA, PA, 0x1000, write=True)
    rig.was(3, "TRANSCFG", TransCfgMode.DISABLED)  # not latched until UPDATE
    rig.run(pk.set_as(3), pk.write_data(VA, [5]))
    assert rig.mem.read_u32(PA) == 5
    rig.mmu(3, MmuCommand.UPDATE)
    rig.run(pk.write_data(VA, [6]))
    _expect_fault(rig, 3, MmuFault.AS_DISABLED, AccessType.WRITE, Opcode.WRITE_DATA, VA)


def test_first_fault_is_kept_until_cleared(rig, pt):
    """A second fault in an AS with a latched fault keeps the first; MMU_INT_CLEAR frees it."""
    rig.run(pk.write_data(VA + 0x20000, [1]))
    first = rig.fault(1)
    rig.resume()
    rig.run(pk.fence(VA + 0x30000, 1))
    assert rig.cp_error()[1] == Opcode.FENCE
    assert rig.fault(1) == first
    assert rig.gpu.stats()["mmu_faults"] == 2
    assert regs.as_reg(1, "STATUS").field("FAULTED").ex(rig.ras(1, "STATUS")) == 1
    rig.w(regs.MMU_INT_CLEAR, 1 << 1)
    assert rig.fault(1) == (0, 0, 0, 0)
    assert fault_bits(rig) == 0
    assert not rig.irq_raw() & Irq.MMU
    assert rig.ras(1, "STATUS") == 0


def test_clearing_the_other_kind_of_bit_keeps_the_fault(rig, pt):
    """Clearing the bus-fault bit does not clear a latched page fault of the same AS."""
    rig.run(pk.write_data(VA + 0x20000, [1]))
    rig.w(regs.MMU_INT_CLEAR, 1 << 17)
    assert rig.fault(1)[0] == MmuFault.TRANSLATION_L3
    assert fault_bits(rig) == 1 << 1


def test_job_after_fault_runs_after_resume(rig, pt):
    """A faulting job stops the CP; after RESUME the next job runs normally."""
    rig.run(pk.write_data(VA + 0x20000, [1]), pk.fence(FENCE, 1, phys=True))
    assert rig.mem.read_u64(FENCE) == 0
    rig.w(regs.MMU_INT_CLEAR, 0xFF00FF)
    rig.resume()
    rig.run(pk.write_data(VA, [7]), pk.fence(FENCE, 2, phys=True))
    assert rig.mem.read_u32(PA) == 7
    assert rig.mem.read_u64(FENCE) == 2
    assert rig.gpu.cp_state() is CpState.IDLE


# --- TLB coherence -------------------------------------------------------------------------


def _stale_setup(rig, pt):
    """Use VA page 0 (filling the TLB), then remap it to another physical page."""
    rig.mem.write_u32(PA, 0xAAAA)
    rig.mem.write_u32(PA + 0x8000, 0xBBBB)
    rig.run(pk.copy(VA, VA + 0x100, 4))
    assert rig.mem.read_u32(PA + 0x100) == 0xAAAA
    pt.map(VA, PA + 0x8000, 0x1000, write=True)


def _reads(rig):
    rig.run(pk.copy(VA, VA + 0x200, 4))
    return rig.mem.read_u32(rig.gpu.translate(1, VA + 0x200))


def test_stale_tlb_until_flush(rig, pt):
    """A rewritten PTE is not seen until the TLB is invalidated (stale TLB is observable)."""
    _stale_setup(rig, pt)
    assert _reads(rig) == 0xAAAA
    assert rig.ras(1, "TLB_ENTRIES") >= 1


@pytest.mark.parametrize(
    "invalidate",
    [
        lambda rig: rig.mmu(1, MmuCommand.UPDATE),
        lambda rig: rig.mmu(1, MmuCommand.FLUSH_PT),
        lambda rig: rig.mmu(1, MmuCommand.FLUSH_MEM),
        lambda rig: rig.run(pk.tlb_invalidate(1)),
        lambda rig: rig.run(pk.tlb_invalidate(1, VA, 0x1000)),
    ],
    ids=["UPDATE", "FLUSH_PT", "FLUSH_MEM", "TLB_INVALIDATE-all", "TLB_INVALIDATE-range"],
)
def test_each_invalidation_path_makes_new_pte_visible(rig, pt, invalidate):
    """UPDATE, FLUSH_PT/FLUSH_MEM (no lock: whole AS) and TLB_INVALIDATE drop the stale entry."""
    _stale_setup(rig, pt)
    invalidate(rig)
    assert _reads(rig) == 0xBBBB


def test_unlock_does_not_flush(rig, pt):
    """LOCK then UNLOCK leaves the stale entry in place."""
    _stale_setup(rig, pt)
    rig.was(1, "LOCKADDR_LO", (VA & 0xFFFFF000) | 11)
    rig.mmu(1, MmuCommand.LOCK)
    assert regs.as_reg(1, "STATUS").field("LOCKED").ex(rig.ras(1, "STATUS")) == 1
    rig.mmu(1, MmuCommand.UNLOCK)
    assert rig.ras(1, "STATUS") == 0
    assert _reads(rig) == 0xAAAA


def test_tlb_invalidate_range_elsewhere_keeps_entry(rig, pt):
    """TLB_INVALIDATE of another range, or another AS, keeps the stale entry."""
    _stale_setup(rig, pt)
    rig.run(pk.tlb_invalidate(1, VA + 0x1000, 0x1000), pk.tlb_invalidate(2))
    assert _reads(rig) == 0xAAAA


def test_lock_region_flush_only_drops_the_region(rig, pt):
    """FLUSH_PT with a 8 KiB lock drops exactly the pages in the region, then unlocks."""
    for page in range(4):
        rig.mem.write_u32(PA + page * 0x1000, 0xA0 + page)
        rig.mem.write_u32(PA + 0x8000 + page * 0x1000, 0xB0 + page)
    rig.run(*(pk.copy(VA + p * 0x1000, VA + 0x6000 + 4 * p, 4) for p in range(4)))
    pt.map(VA, PA + 0x8000, 0x4000, write=True)
    rig.was(1, "LOCKADDR_LO", ((VA + 0x2000) & 0xFFFFF000) | 12)  # 2**13 bytes at VA+0x2000
    rig.mmu(1, MmuCommand.LOCK)
    rig.mmu(1, MmuCommand.FLUSH_PT)
    assert rig.ras(1, "STATUS") == 0
    rig.run(*(pk.copy(VA + p * 0x1000, VA + 0x7000 + 4 * p, 4) for p in range(4)))
    got = [rig.mem.read_u32(PA + 0x7000 + 4 * p) for p in range(4)]
    assert got == [0xA0, 0xA1, 0xB2, 0xB3]


def test_lock_size_below_minimum_is_4k(rig, pt, caplog):
    """LOCKADDR.SIZE below 4 KiB locks one page and logs a guest error."""
    _stale_setup(rig, pt)
    rig.was(1, "LOCKADDR_LO", VA & 0xFFFFF000)
    rig.mmu(1, MmuCommand.LOCK)
    rig.mmu(1, MmuCommand.FLUSH_MEM)
    assert "below the 4 KiB minimum" in caplog.text
    assert _reads(rig) == 0xBBBB


def test_unknown_mmu_command_is_a_guest_error(rig, caplog):
    """An unknown AS_COMMAND is logged and ignored."""
    rig.mmu(0, 0x77)
    assert "unknown command 0x77" in caplog.text


def test_tlb_capacity_is_fifo(pt):
    """A full TLB drops its oldest entries first; TLB_ENTRIES never exceeds the capacity."""
    rig = Rig(tlb_capacity=2)
    rig.start_ring()
    t = rig.address_space(1)
    t.map(VA, PA, 0x4000, write=True)
    rig.run(pk.set_as(1), *(pk.write_data(VA + p * 0x1000, [p]) for p in range(3)))
    assert rig.ras(1, "TLB_ENTRIES") == 2
    t.map(VA, PA + 0x8000, 0x4000, write=True)  # remap all pages; only page 0 was evicted
    rig.run(pk.write_data(VA, [0x10]), pk.write_data(VA + 0x2000, [0x12]))
    assert rig.mem.read_u32(PA + 0x8000) == 0x10  # page 0 re-walked: new mapping
    assert rig.mem.read_u32(PA + 0x2000) == 0x12  # page 2 still cached: old mapping


def test_large_copy_counts_and_coalesces(rig, pt):
    """A multi-page COPY is served from the TLB the second time (hits, no new misses)."""
    pt.map(VA, PA, 0x40000, read=True, write=True)
    rig.mem.write(PA, bytes(range(256)) * 64)
    rig.run(pk.copy(VA, VA + 0x20000, 0x4000))
    s1 = rig.gpu.stats()
    rig.run(pk.copy(VA, VA + 0x20000, 0x4000))
    s2 = rig.gpu.stats()
    assert s2["tlb_misses"] == s1["tlb_misses"]
    assert s2["tlb_hits"] - s1["tlb_hits"] == 8
    assert rig.mem.read(PA + 0x20000, 0x4000) == bytes(range(256)) * 64
    assert s2["bytes_copied"] == 0x8000


def test_scattered_pages_copy(rig, pt):
    """A COPY over physically scattered pages (reversed order) moves every byte right."""
    for p in range(8):
        pt.map(VA + 0x10000 + p * 0x1000, PA + 0x40000 + (7 - p) * 0x1000, 0x1000, write=True)
    src = bytes((i * 7) & 0xFF for i in range(0x8000))
    rig.mem.write(PA + 0x30000, src)
    pt.map(VA + 0x30000, PA + 0x30000, 0x8000)
    rig.run(pk.copy(VA + 0x30000 + 0x10, VA + 0x10000 + 0x10, 0x7FE0))
    got = rig.gpu.mem_read(1, VA + 0x10010, 0x7FE0)
    assert got == src[0x10:0x7FF0]


def test_fault_in_middle_of_scattered_range_reports_that_page(rig, pt):
    """A hole in a multi-page range faults TRANSLATION_L3 at the first byte of the hole."""
    pt.map(VA, PA, 0x8000, write=True)
    pt.unmap(VA + 0x5000, 0x1000)
    rig.run(pk.fill(VA + 0x10, 0x7000, 0))
    _expect_fault(rig, 1, MmuFault.TRANSLATION_L3, AccessType.WRITE, Opcode.FILL, VA + 0x5000)


# --- debug access --------------------------------------------------------------------------


def test_debug_access_has_no_side_effects(rig, pt):
    """mem_read/mem_write/translate/walk/mappings fill no TLB, count nothing, latch nothing."""
    before = rig.gpu.stats()
    entries = rig.ras(1, "TLB_ENTRIES")
    rig.gpu.mem_write(1, VA + 0x10, b"dbg!")
    assert rig.gpu.mem_read(1, VA + 0x10, 4) == b"dbg!"
    assert rig.gpu.translate(1, VA + 0x10, AccessType.WRITE) == PA + 0x10
    assert rig.gpu.walk(1, VA)[-1][3] == pte.make(PA, read=True, write=True)
    with pytest.raises(MemFault) as info:
        rig.gpu.mem_read(1, VA + 0x200000, 4)
    assert info.value.code is MmuFault.TRANSLATION_L2
    assert rig.gpu.stats() == before
    assert rig.ras(1, "TLB_ENTRIES") == entries
    assert fault_bits(rig) == 0 and rig.fault(1) == (0, 0, 0, 0)


def test_debug_read_uses_cached_translation(rig, pt):
    """A debug read sees what the GPU would: the stale TLB entry while one is cached."""
    _stale_setup(rig, pt)
    assert rig.gpu.mem_read(1, VA, 4) == (0xAAAA).to_bytes(4, "little")
    assert rig.gpu.walk(1, VA)[-1][3] == pte.make(PA + 0x8000, read=True, write=True)


def test_debug_faults(rig, pt):
    """Debug accesses raise MemFault with the fault code, or None for non-MMU problems."""
    with pytest.raises(MemFault) as info:
        rig.gpu.translate(1, VA, AccessType.EXECUTE)
    assert info.value.code is MmuFault.PERMISSION
    with pytest.raises(MemFault) as info:
        rig.gpu.mem_read(SPACE_PHYS, rig.mem.size - 2, 4)
    assert info.value.code is None
    with pytest.raises(MemFault, match="no address space 9"):
        rig.gpu.mem_read(9, 0, 4)
    with pytest.raises(MemFault) as info:
        rig.gpu.mem_read(5, 0, 4)
    assert info.value.code is MmuFault.AS_DISABLED
    with pytest.raises(MemFault) as info:
        rig.gpu.mem_read(1, (1 << 48) - 2, 4)
    assert info.value.code is MmuFault.ADDRESS_SIZE
    rig.gpu.detach_memory()
    with pytest.raises(MemFault, match="no guest memory"):
        rig.gpu.mem_read(SPACE_PHYS, 0, 4)


def test_physical_debug_access(rig):
    """SPACE_PHYS debug accesses address guest memory directly."""
    rig.gpu.mem_write(SPACE_PHYS, 0x7000, b"phys")
    assert rig.mem.read(0x7000, 4) == b"phys"
    assert rig.gpu.mem_read(SPACE_PHYS, 0x7000, 4) == b"phys"


def test_walk_rows_and_mappings(rig, pt):
    """walk() lists each level's table, index and entry; mappings() coalesces runs by perms."""
    pt.map(VA + 0x10000, PA + 0x10000, 0x2000, write=False, exec=True)
    rows = rig.gpu.walk(1, VA + 0x10123)
    assert [r[0] for r in rows] == [0, 1, 2, 3]
    assert rows[0][1] == pt.root
    assert rows[3][2] == pte.index(VA + 0x10123, 3)
    assert rig.gpu.mappings(1) == [
        (VA, PA, 0x10000, "rw-"),
        (VA + 0x10000, PA + 0x10000, 0x2000, "r-x"),
    ]
    assert rig.gpu.walk(1, 0x7000_0000_0000)[-1][3] == 0  # stops at the invalid entry
    assert rig.gpu.mappings(4) == [] and rig.gpu.walk(4, VA) == []
