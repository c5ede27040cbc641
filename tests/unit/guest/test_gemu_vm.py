"""The gemu driver's GPU VM: VA allocator, page-table writer, AS slots and TLB flushes."""

from __future__ import annotations

import pytest

from gemu.device.abi import pte, regs
from gemu.device.abi.enums import MmuCommand, TransCfgMode
from gemu.guest.errors import Ebusy, Einval, Enospc
from gemu.guest.gemu_drv.vm import (
    PAGE_SIZE,
    VA_START,
    GpuMmu,
    GpuVm,
    Prot,
    VaAllocator,
    lock_region,
    walk,
)


class Frames:
    """Guest RAM of ``n`` frames and a trivial frame allocator for page tables."""

    def __init__(self, n: int = 64) -> None:
        self.ram = bytearray(n * PAGE_SIZE)
        self.mem = memoryview(self.ram)
        self.free = list(range((n - 1) * PAGE_SIZE, 0, -PAGE_SIZE))  # frame 0 never used
        self.used: set[int] = set()

    def alloc_table_frame(self) -> int:
        pa = self.free.pop()
        self.mem[pa : pa + PAGE_SIZE] = bytes(PAGE_SIZE)
        self.used.add(pa)
        return pa

    def free_table_frame(self, pa: int) -> None:
        self.used.remove(pa)
        self.free.append(pa)


class Bus:
    """Records register writes by name."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, int]] = []

    def readl(self, offset: int) -> int:
        return 0

    def writel(self, offset: int, value: int) -> None:
        self.writes.append((regs.REGISTER_MAP.by_offset[offset].name, value))

    def commands(self, as_nr: int) -> list[MmuCommand]:
        return [MmuCommand(v) for n, v in self.writes if n == f"AS{as_nr}_COMMAND"]


@pytest.fixture
def frames():
    return Frames()


@pytest.fixture
def bus():
    return Bus()


@pytest.fixture
def mmu(bus, frames):
    return GpuMmu(bus, frames, as_count=2)


def test_va_allocator_first_fit_coalesces_on_free():
    """Ranges come out first-fit and page-rounded; freeing merges neighbouring holes so the
    whole range is one hole again."""
    va = VaAllocator(0x10000, 0x20000)
    a = va.alloc(1)
    b = va.alloc(2 * PAGE_SIZE)
    c = va.alloc(PAGE_SIZE)
    assert (a, b, c) == (0x10000, 0x11000, 0x13000)
    va.free(b, 2 * PAGE_SIZE)
    assert va.alloc(PAGE_SIZE) == 0x11000
    va.free(a, 1)
    va.free(0x11000, PAGE_SIZE)
    va.free(c, PAGE_SIZE)
    assert va.free_bytes == 0x10000 and va._starts == [0x10000]


def test_va_allocator_errors_name_the_problem():
    """Exhaustion is -ENOSPC, overlap on a fixed reservation -EBUSY, freeing what is not
    allocated (a double free) -EINVAL."""
    va = VaAllocator(0x10000, 0x12000)
    va.reserve(0x11000, PAGE_SIZE)
    with pytest.raises(Ebusy, match="overlaps"):
        va.reserve(0x11000, PAGE_SIZE)
    with pytest.raises(Enospc, match="no free GPU VA"):
        va.alloc(2 * PAGE_SIZE)
    with pytest.raises(Einval, match="is not allocated"):
        va.free(0x10000, PAGE_SIZE)
    va.free(0x11000, PAGE_SIZE)
    with pytest.raises(Einval, match="is not allocated"):
        va.free(0x11000, PAGE_SIZE)


def test_lock_region_is_the_smallest_aligned_power_of_two():
    """Like panfrost's lock_region(): a 4 KiB minimum, and a range that straddles a boundary
    grows until one aligned region covers it."""
    assert lock_region(0x5000, 0x1000) == (0x5000, 12)
    assert lock_region(0x5000, 0x2000) == (0x4000, 14)
    assert lock_region(0x1FF000, 0x2000) == (0, 22)


def test_map_pages_builds_four_levels_the_gpu_can_walk(mmu, frames):
    """Mapping a range that crosses a level-3 table boundary writes PAGE entries with the
    requested rights, reachable by the hardware walk from the root table."""
    vm = GpuVm(mmu, "t")
    va = 0x20_0000 - 2 * PAGE_SIZE  # crosses the 2 MiB boundary
    pas = [0x30000 + i * PAGE_SIZE for i in range(4)]
    vm.map_pages(va, pas, Prot.READ | Prot.WRITE)
    for i, pa in enumerate(pas):
        e = walk(frames.mem, vm.root_pa, va + i * PAGE_SIZE)
        assert pte.address(e) == pa
        assert pte.entry_type(e) is pte.PteType.PAGE
        assert e & pte.READ and e & pte.WRITE and not e & pte.EXEC
    assert walk(frames.mem, vm.root_pa, va + 4 * PAGE_SIZE) == 0
    # root + L1 + L2 + two L3 tables
    assert len(frames.used) == 5


def test_unmap_clears_entries(mmu, frames):
    """After unmap the walk finds nothing, and the page-table frames stay with the VM."""
    vm = GpuVm(mmu, "t")
    vm.map_pages(VA_START, [0x40000, 0x41000], Prot.READ)
    vm.unmap_pages(VA_START, 2)
    assert walk(frames.mem, vm.root_pa, VA_START) == 0
    assert vm.mapped_pages == 0


def test_as_get_programs_the_slot_and_flushes_follow_changes(mmu, bus):
    """Binding writes TRANSTAB/TRANSCFG and UPDATE; every later map or unmap of the bound VM
    is followed by LOCK + FLUSH_PT with a lock region covering the range."""
    vm = GpuVm(mmu, "t")
    vm.map_pages(VA_START, [0x40000], Prot.READ)  # not bound: no flush needed
    assert bus.writes == []
    as_nr = mmu.as_get(vm)
    assert ("AS0_TRANSTAB_LO", vm.root_pa) in bus.writes
    assert ("AS0_TRANSCFG", TransCfgMode.PT_4LEVEL) in bus.writes
    assert bus.commands(as_nr) == [MmuCommand.UPDATE]
    bus.writes.clear()
    vm.map_pages(VA_START + PAGE_SIZE, [0x41000], Prot.READ)
    lo = regs.as_reg(0, "LOCKADDR_LO")
    (value,) = [v for n, v in bus.writes if n == "AS0_LOCKADDR_LO"]
    assert lo.field("BASE").ex(value) << 12 == VA_START + PAGE_SIZE
    assert lo.field("SIZE").ex(value) == 11
    assert bus.commands(0) == [MmuCommand.LOCK, MmuCommand.FLUSH_PT]
    bus.writes.clear()
    vm.unmap_pages(VA_START, 2)
    assert bus.commands(0) == [MmuCommand.LOCK, MmuCommand.FLUSH_PT]
    assert mmu.stats.flushes == 2


def test_skip_flush_is_the_deliberately_wrong_mode(mmu, bus):
    """With skip_flush set the page table changes and no flush command reaches the GPU."""
    vm = GpuVm(mmu, "t")
    mmu.as_get(vm)
    bus.writes.clear()
    mmu.skip_flush = True
    vm.map_pages(VA_START, [0x40000], Prot.READ)
    assert bus.commands(0) == [] and mmu.stats.flushes_skipped == 1


def test_as_slots_are_stolen_only_from_idle_vms(mmu, bus):
    """With two slots, a third VM takes the least recently used idle slot; when every slot
    has a job on the GPU, as_get fails with -EBUSY."""
    a, b, c = GpuVm(mmu, "a"), GpuVm(mmu, "b"), GpuVm(mmu, "c")
    assert mmu.as_get(a) == 0 and mmu.as_get(b) == 1
    with pytest.raises(Ebusy, match="in use by a running job"):
        mmu.as_get(c)
    mmu.as_put(a)
    assert mmu.as_get(c) == 0 and a.as_nr is None
    assert mmu.stats.as_steals == 1
    mmu.as_put(b)
    assert mmu.as_get(a) == 1


def test_fini_frees_every_table_and_disables_the_slot(mmu, frames, bus):
    """Destroying a VM gives back all page-table frames and turns its AS off."""
    vm = GpuVm(mmu, "t")
    vm.map_pages(VA_START, [0x40000] * 3, Prot.READ)
    mmu.as_get(vm)
    mmu.as_put(vm)
    vm.fini()
    assert frames.used == set()
    assert ("AS0_TRANSCFG", TransCfgMode.DISABLED) in bus.writes
    assert mmu.slots == [None, None]


def test_reset_forgets_bindings(mmu):
    """After a GPU reset every VM is unbound and gets programmed again on its next use."""
    vm = GpuVm(mmu, "t")
    mmu.as_get(vm)
    mmu.reset()
    assert vm.as_nr is None and vm.as_users == 0
    assert mmu.as_get(vm) == 0


def test_ring_slot_matches_the_packet_builders():
    """The driver's hand-packed 64-byte job slot is exactly what the construct-declared
    builders of gemu.device.abi.packets produce (SET_AS, INDIRECT_BUFFER, FENCE, NOP)."""
    from gemu.device.abi import packets as pk
    from gemu.guest.gemu_drv import gpu

    g = gpu.GemuGpu.__new__(gpu.GemuGpu)
    g.pending, g.ring_slots, g.tail, g.ring_size = [], 64, 0, 4096
    g.ring_pa, g.fence_pa = 0, 0x3000
    g.mem = memoryview(bytearray(4096))
    g._write_slot(5, 0x1_2345_6000, 7, (1 << 32) + 9)
    want = (
        pk.set_as(5)
        + pk.indirect_buffer(0x1_2345_6000, 7)
        + pk.fence(0x3000, (1 << 32) + 9, irq=True, phys=True)
    )
    want += pk.nop((gpu.JOB_SLOT_BYTES - len(want)) // 4 - 1)
    assert bytes(g.mem[: gpu.JOB_SLOT_BYTES]) == want
    assert g.tail == gpu.JOB_SLOT_BYTES


def test_page_tables_live_in_frames_of_the_guest_page_allocator():
    """With the real page allocator (as the driver uses it), table frames are counted as
    used while the VM lives, the walk reads them through guest RAM, and fini gives every
    frame back."""
    from gemu.guest.gemu_drv.uapi import AllocatorFrames
    from gemu.guest.mm.page_alloc import PageAllocator, PhysMem

    ram = PhysMem(bytearray(64 * PAGE_SIZE))
    alloc = PageAllocator(ram, watermarks=(1, 2, 3))
    frames = AllocatorFrames(alloc)
    mmu = GpuMmu(Bus(), frames, as_count=1)
    vm = GpuVm(mmu, "t")
    data = alloc.alloc_pages(3)
    vm.map_pages(VA_START, [pfn << 12 for pfn in data], Prot.READ)
    assert alloc.nr_used == 3 + 4 and frames.frames == 4
    assert [pte.address(vm.lookup(VA_START + i * PAGE_SIZE)) >> 12 for i in range(3)] == data
    vm.unmap_pages(VA_START, 3)
    vm.fini()
    alloc.free_pages(data)
    alloc.assert_no_leaks()
