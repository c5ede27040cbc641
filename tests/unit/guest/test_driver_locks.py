"""The gemu driver's own locks are lockdep classes: the GPU VM's page-table lock is never held
while allocating (its table frames are preallocated), taking it twice is reported, and the
old shape (allocating a table frame under the lock that the shrinker's evict path takes inside
reclaim) is a lockdep inversion, found by ``gemu explore --mutant pt-alloc-under-lock``."""

from __future__ import annotations

import pytest

from gemu.device.abi import regs
from gemu.guest.gemu_drv.uapi import AllocatorFrames
from gemu.guest.gemu_drv.vm import PAGE_SIZE, VA_START, GpuMmu, GpuVm, Prot
from gemu.guest.kernel import runtime
from gemu.guest.kernel.runtime import Deterministic
from gemu.guest.locking import lockdep
from gemu.guest.locking.lockdep import LockdepError
from gemu.guest.mm import gfp
from gemu.guest.mm.page_alloc import PageAllocator, PhysMem
from gemu.host.explore.scenario import ExploreConfig, run_schedule

_L3_SPAN = 2 << 20


class Bus:
    def readl(self, offset: int) -> int:
        return 0

    def writel(self, offset: int, value: int) -> None:
        assert regs.REGISTER_MAP.by_offset[offset]


class WatchedFrames(AllocatorFrames):
    """The driver's frame source, noting whether the VM's page-table lock was held at each
    table-frame allocation."""

    def __init__(self, allocator: PageAllocator) -> None:
        super().__init__(allocator)
        self.vm: GpuVm | None = None
        self.under_lock: list[bool] = []

    def alloc_table_frame(self) -> int:
        if self.vm is not None:
            self.under_lock.append(self.vm.lock.owner is runtime.current())
        return super().alloc_table_frame()


def machine(alloc_under_lock: bool = False):
    alloc = PageAllocator(PhysMem(bytearray(256 * PAGE_SIZE)), watermarks=(2, 4, 8))
    frames = WatchedFrames(alloc)
    mmu = GpuMmu(Bus(), frames, as_count=1)
    mmu.alloc_tables_under_lock = alloc_under_lock
    vm = GpuVm(mmu, "file0")
    frames.vm = vm
    return alloc, frames, vm


def evict_in_reclaim(vm: GpuVm, va: int, npages: int) -> None:
    """What the shrinker's evict callback does to a mapped BO: unmap it from the VM, inside
    reclaim (fs_reclaim held, PF_MEMALLOC), as kswapd or a direct reclaimer runs it."""
    lockdep.fs_reclaim_map_acquire()
    flags = gfp.memalloc_noreclaim_save()
    try:
        vm.unmap_pages(va, npages)
    finally:
        gfp.memalloc_noreclaim_restore(flags)
        lockdep.fs_reclaim_map_release()


def test_map_pages_allocates_table_frames_before_taking_the_page_table_lock():
    """Mapping a range that needs new level-1..3 tables allocates them with the page-table
    lock not held, hands back the ones it did not use, and maps correctly; the shrinker's
    unmap inside reclaim after it is no lockdep report."""

    def main():
        alloc, frames, vm = machine()
        data = alloc.alloc_pages(3)
        va = 2 * _L3_SPAN - PAGE_SIZE  # straddles two level-3 tables
        vm.map_pages(va, [pfn << 12 for pfn in data], Prot.READ)
        assert frames.under_lock == [False] * 4  # L1, L2 and two L3 tables
        assert frames.frames == 5  # with the root
        vm.map_pages(va, [pfn << 12 for pfn in data], Prot.READ)  # tables exist: none more
        assert frames.frames == 5 and len(frames.under_lock) == 4
        evict_in_reclaim(vm, va, 3)
        assert lockdep.reports() == []
        vm.fini()
        alloc.free_pages(data)
        alloc.assert_no_leaks()

    Deterministic(0, strict=True).run(main)


def test_allocating_under_the_page_table_lock_is_an_inversion_against_reclaim():
    """The old shape: a table frame allocated (GFP_KERNEL) under the page-table lock records
    pgtable_lock -> fs_reclaim; the evict path then takes the lock inside reclaim, and lockdep
    reports the inversion (in the kernel: reclaim waiting for a lock whose holder waits for
    memory)."""

    def main():
        alloc, frames, vm = machine(alloc_under_lock=True)
        data = alloc.alloc_pages(1)
        vm.map_pages(VA_START, [data[0] << 12], Prot.READ)
        assert frames.under_lock == [True] * 3
        evict_in_reclaim(vm, VA_START, 1)

    with pytest.raises(LockdepError, match=r"fs_reclaim -> gemu_vm\.pgtable_lock") as info:
        Deterministic(0, strict=True).run(main)
    assert info.value.report.kind == "inversion"
    assert "gemu_vm.pgtable_lock -> fs_reclaim" in str(info.value)


def test_taking_a_driver_lock_twice_is_reported():
    """The driver's locks are not recursive: the second acquisition by the holder is
    lockdep's recursive-locking report."""

    def main():
        _alloc, _frames, vm = machine()
        with vm.lock, vm.lock:
            pass

    with pytest.raises(LockdepError, match=r"gemu_vm\.pgtable_lock") as info:
        Deterministic(0, strict=True).run(main)
    assert info.value.report.kind == "recursive"


def test_explore_finds_the_page_table_allocation_under_the_lock():
    """``gemu explore --mutant pt-alloc-under-lock``: the first schedule of the standard
    scenario already reports the inversion (every VM builds its tables under the lock, and
    memory pressure evicts mapped BOs); the correct driver's schedule is clean."""
    bad = run_schedule(ExploreConfig(mutant="pt-alloc-under-lock"), 1000)
    assert bad.kind == "lockdep"
    assert "gemu_vm.pgtable_lock" in bad.violations[0].message
    good = run_schedule(ExploreConfig(), 1000)
    assert good.ok, good.violations
