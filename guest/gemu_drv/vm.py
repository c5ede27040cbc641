"""DOC: GPU virtual memory of the gemu driver: address-space slots, VA ranges, page tables.

A :class:`GpuVm` is one GPU address space as a program sees it (one per open file, like a
panfrost_file_priv's ``panfrost_mmu``): a VA allocator, a 4-level page table built in guest RAM
frames in the format of :mod:`gemu.device.abi.pte`, and the mappings of BOs into it. The GPU has
only ``AS_COUNT`` hardware address-space slots; :class:`GpuMmu` lends them to VMs that have work
on the GPU and takes them back from idle ones (panfrost_mmu_as_get/put).

Every change of a live page table is followed by a TLB flush of the changed range through the
AS's LOCK and FLUSH_PT commands, so the GPU never uses a translation the driver has removed::

    mmu = GpuMmu(bus, frames)                # bus: readl/writel; frames: page-table frames
    vm = GpuVm(mmu, "file0")
    va = vm.alloc_va(3 * PAGE_SIZE)
    vm.map_pages(va, [pa0, pa1, pa2], Prot.READ | Prot.WRITE)   # PTEs, then flush
    slot = mmu.as_get(vm)                    # TRANSTAB/TRANSCFG + UPDATE
    ...
    vm.unmap_pages(va, 3)                    # clear PTEs, then flush, before pa0..pa2 are freed

Invariants:

- a PTE of a VM bound to a slot is only cleared or changed together with a flush of its range
  (:attr:`GpuMmu.skip_flush` turns the flush off to show the stale-TLB failure; never set it in
  normal use);
- page-table frames belong to the VM until :meth:`GpuVm.fini`; intermediate tables are not
  freed while the VM lives (a table is at most one frame per 2 MiB of mapped VA);
- nothing allocates under a VM's page-table lock: :meth:`GpuVm.map_pages` allocates the table
  frames the range still lacks (``GFP_KERNEL``, may enter reclaim) *before* taking the lock and
  hands back what it did not use, as panthor_vm_prepare_map_op_ctx() preallocates
  ``rsvd_page_tables`` for io-pgtable. The shrinker's evict path takes the same lock inside
  reclaim to unmap, so allocating under it would be a lock-order inversion against fs_reclaim
  (:attr:`GpuMmu.alloc_tables_under_lock` restores that shape for the ``pt-alloc-under-lock``
  mutant; never set it in normal use).
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntFlag
from typing import Protocol

from gemu.device.abi import pte, regs
from gemu.device.abi.enums import MmuCommand, TransCfgMode
from gemu.guest.errors import Ebusy, Einval, Enospc, warn_on
from gemu.guest.gemu_drv.sync import SpinLock
from gemu.guest.locking.lockdep import LockClass

PAGE_SIZE = regs.PAGE_SIZE
PAGE_SHIFT = regs.PAGE_SHIFT
VA_START = 0x10_0000
"""Lowest VA handed out: the first MiB stays unmapped so a null-ish pointer faults."""
VA_END = 1 << (regs.VA_BITS - 1)
"""End of the VA range handed out (the upper half is left for kernel use)."""

AS_LOCK_CLASS = LockClass("gemu_mmu.as_lock")
"""The lockdep class of the AS-slot lock (panfrost's ``as_lock``)."""
PGTABLE_LOCK_CLASS = LockClass("gemu_vm.pgtable_lock")
"""The lockdep class every VM's page-table lock shares."""

_U64 = struct.Struct("<Q")
_L3_SPAN = PAGE_SIZE * pte.ENTRIES_PER_TABLE  # VA covered by one level-3 table (2 MiB)


class Prot(IntFlag):
    """Access rights of a mapping (the R/W/X bits of a PAGE entry)."""

    READ = 1
    WRITE = 2
    EXEC = 4


class Bus(Protocol):
    """Register access the MMU code needs (a DeviceClient or a test double)."""

    def readl(self, offset: int) -> int: ...

    def writel(self, offset: int, value: int) -> None: ...


class FrameSource(Protocol):
    """Where page-table frames come from: guest RAM and a frame allocator.

    ``alloc_table_frame`` returns the guest-physical address of a zeroed 4 KiB frame;
    ``free_table_frame`` gives one back; ``mem`` is guest RAM (offset = physical address).
    """

    mem: memoryview

    def alloc_table_frame(self) -> int: ...

    def free_table_frame(self, pa: int) -> None: ...


class VaAllocator:
    """First-fit allocator of page-aligned VA ranges. Kernel: struct drm_mm (drm_mm_insert_node).

    Only the holes are stored (sorted by start, coalesced on free), so an allocation costs no
    memory: the caller keeps its range, as a drm_mm_node is embedded in its owner. Invariant:
    holes never overlap and no two holes touch.
    """

    def __init__(self, start: int = VA_START, end: int = VA_END) -> None:
        self.start, self.end = start, end
        self._starts: list[int] = [start]
        self._sizes: list[int] = [end - start]

    def alloc(self, size: int, align: int = PAGE_SIZE) -> int:
        """Reserve ``size`` bytes (rounded up to pages); raise Enospc when no hole fits."""
        size = _page_round(size)
        if size <= 0:
            raise Einval(msg=f"VA range size must be positive, not {size}")
        for i, (hs, hl) in enumerate(zip(self._starts, self._sizes)):
            va = -(-hs // align) * align
            if va + size <= hs + hl:
                self._take(i, va, size)
                return va
        raise Enospc(msg=f"no free GPU VA range of {size} bytes")

    def reserve(self, va: int, size: int) -> None:
        """Reserve exactly [va, va+size); raise Ebusy if any of it is taken."""
        size = self._check(va, size)
        i = bisect.bisect_right(self._starts, va) - 1
        if i < 0 or va + size > self._starts[i] + self._sizes[i]:
            raise Ebusy(msg=f"GPU VA range {va:#x}+{size:#x} overlaps an existing mapping")
        self._take(i, va, size)

    def _check(self, va: int, size: int) -> int:
        size = _page_round(size)
        if va % PAGE_SIZE or size <= 0 or va < self.start or va + size > self.end:
            raise Einval(msg=f"bad VA range {va:#x}+{size:#x}")
        return size

    def _take(self, i: int, va: int, size: int) -> None:
        hs, hl = self._starts[i], self._sizes[i]
        del self._starts[i], self._sizes[i]
        if va + size < hs + hl:
            self._starts.insert(i, va + size)
            self._sizes.insert(i, hs + hl - va - size)
        if hs < va:
            self._starts.insert(i, hs)
            self._sizes.insert(i, va - hs)

    def free(self, va: int, size: int) -> None:
        """Give back [va, va+size); -EINVAL if any of it is not allocated (a double free)."""
        size = self._check(va, size)
        i = bisect.bisect_left(self._starts, va)
        prev_end = self._starts[i - 1] + self._sizes[i - 1] if i > 0 else self.start
        if prev_end > va or (i < len(self._starts) and self._starts[i] < va + size):
            raise Einval(msg=f"GPU VA range {va:#x}+{size:#x} is not allocated")
        self._starts.insert(i, va)
        self._sizes.insert(i, size)
        if i + 1 < len(self._starts) and va + size == self._starts[i + 1]:
            self._sizes[i] += self._sizes.pop(i + 1)
            del self._starts[i + 1]
        if i > 0 and self._starts[i - 1] + self._sizes[i - 1] == va:
            self._sizes[i - 1] += self._sizes.pop(i)
            del self._starts[i]

    @property
    def free_bytes(self) -> int:
        return sum(self._sizes)


def _page_round(size: int) -> int:
    return (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


def lock_region(va: int, size: int) -> tuple[int, int]:
    """The smallest naturally aligned power-of-two region covering [va, va+size).

    Kernel: lock_region() [drivers/gpu/drm/panfrost/panfrost_mmu.c]. Returns (base, log2 size).
    """
    size = max(size, PAGE_SIZE)
    end = va + size - 1
    log2 = max(PAGE_SHIFT, (va ^ end).bit_length())
    base = va & ~((1 << log2) - 1)
    return base, log2


@dataclass
class MmuStats:
    flushes: int = 0
    flushes_skipped: int = 0
    as_updates: int = 0
    as_steals: int = 0
    ptes_written: int = 0
    tables: int = 0


class GpuMmu:
    """The device's address-space slots and their commands. Kernel: panfrost_mmu (device side).

    ``as_get`` gives a VM a hardware slot (reusing its slot, taking a free one, or stealing the
    least recently used slot of a VM with no job on the GPU); ``flush_range`` invalidates the
    TLB of a slot for a VA range. ``skip_flush`` is a deliberately wrong mode for the
    validation-order tests ("no TLB flush after remap"); it is never set by default.
    """

    def __init__(
        self, bus: Bus, frames: FrameSource, as_count: int = regs.AS_COUNT, *, first_as: int = 0
    ) -> None:
        self.bus = bus
        self.frames = frames
        self.slots: list[GpuVm | None] = [None] * as_count
        self.first_as = first_as
        self.lru: list[int] = []
        self.lock = SpinLock("gpu_mmu.as_lock", AS_LOCK_CLASS)
        self.stats = MmuStats()
        self.skip_flush = False
        self.alloc_tables_under_lock = False

    # -- register commands -----------------------------------------------------------------
    def _as_write(self, as_nr: int, name: str, value: int) -> None:
        self.bus.writel(regs.as_reg(as_nr, name).offset, value)

    def _as_command(self, as_nr: int, cmd: MmuCommand) -> None:
        """Kernel: write_cmd() + wait_ready() [panfrost_mmu.c]; commands complete
        synchronously on this GPU, so the non-posted write is the wait."""
        self._as_write(as_nr, "COMMAND", int(cmd))

    def _enable(self, as_nr: int, vm: GpuVm) -> None:
        """Kernel: panfrost_mmu_enable() — program TRANSTAB/TRANSCFG and latch them."""
        root = vm.root_pa
        self._as_write(as_nr, "TRANSTAB_LO", root & 0xFFFFFFFF)
        self._as_write(as_nr, "TRANSTAB_HI", root >> 32)
        self._as_write(as_nr, "TRANSCFG", int(TransCfgMode.PT_4LEVEL))
        self._as_command(as_nr, MmuCommand.UPDATE)
        self.stats.as_updates += 1

    def _disable(self, as_nr: int) -> None:
        """Kernel: panfrost_mmu_disable()."""
        self._as_write(as_nr, "TRANSTAB_LO", 0)
        self._as_write(as_nr, "TRANSTAB_HI", 0)
        self._as_write(as_nr, "TRANSCFG", int(TransCfgMode.DISABLED))
        self._as_command(as_nr, MmuCommand.UPDATE)

    def flush_range(self, as_nr: int, va: int, size: int) -> None:
        """Invalidate the TLB of ``as_nr`` for [va, va+size): LOCK the region, FLUSH_PT.

        Kernel: mmu_hw_do_operation_locked(pfdev, as_nr, iova, size, AS_COMMAND_FLUSH_PT).
        """
        if self.skip_flush:
            self.stats.flushes_skipped += 1
            return
        base, log2 = lock_region(va, size)
        value = _LOCK_BASE.dp(0, (base >> PAGE_SHIFT) & 0xFFFFF)
        value = _LOCK_SIZE.dp(value, log2 - 1)
        self._as_write(as_nr, "LOCKADDR_LO", value)
        self._as_write(as_nr, "LOCKADDR_HI", base >> 32)
        self._as_command(as_nr, MmuCommand.LOCK)
        self._as_command(as_nr, MmuCommand.FLUSH_PT)
        self.stats.flushes += 1

    # -- slots -------------------------------------------------------------------------------
    def as_get(self, vm: GpuVm) -> int:
        """Give ``vm`` a hardware AS slot and count one more user. Kernel: panfrost_mmu_as_get().

        Raises Ebusy when every slot belongs to a VM with work on the GPU.
        """
        with self.lock:
            if vm.as_nr is not None:
                vm.as_users += 1
                self._touch(vm.as_nr)
                return vm.as_nr
            free = [i for i in range(self.first_as, len(self.slots)) if self.slots[i] is None]
            if free:
                as_nr = free[0]
            else:
                idle = [i for i in self.lru if self.slots[i].as_users == 0]
                if not idle:
                    raise Ebusy(msg="every GPU address space is in use by a running job")
                as_nr = idle[0]
                old = self.slots[as_nr]
                old.as_nr = None
                self.lru.remove(as_nr)
                self.stats.as_steals += 1
            self.slots[as_nr] = vm
            vm.as_nr = as_nr
            vm.as_users = 1
            self._touch(as_nr)
            self._enable(as_nr, vm)
            return as_nr

    def as_put(self, vm: GpuVm) -> None:
        """One user of ``vm``'s slot is done (its job finished). Kernel: panfrost_mmu_as_put()."""
        with self.lock:
            if vm.as_nr is None or vm.as_users <= 0:  # (the message only when it fires: per job)
                warn_on(True, f"as_put on unbound VM {vm.name}")
                return
            vm.as_users -= 1

    def _touch(self, as_nr: int) -> None:
        if as_nr in self.lru:
            self.lru.remove(as_nr)
        self.lru.append(as_nr)

    def release(self, vm: GpuVm) -> None:
        """Take ``vm``'s slot away for good (the VM is being destroyed)."""
        with self.lock:
            if vm.as_nr is None:
                return
            warn_on(vm.as_users, f"VM {vm.name} destroyed with {vm.as_users} jobs on its AS")
            as_nr = vm.as_nr
            self._disable(as_nr)
            self.slots[as_nr] = None
            self.lru.remove(as_nr)
            vm.as_nr = None
            vm.as_users = 0

    def reset(self) -> None:
        """After a GPU soft reset every AS is disabled: forget the bindings, so each VM is
        programmed again by its next ``as_get``. Kernel: panfrost_mmu_reset()."""
        with self.lock:
            for vm in self.slots:
                if vm is not None:
                    vm.as_nr = None
                    vm.as_users = 0
            self.slots = [None] * len(self.slots)
            self.lru.clear()


_LOCK_BASE = regs.as_reg(0, "LOCKADDR_LO").field("BASE")  # the same fields in every AS
_LOCK_SIZE = regs.as_reg(0, "LOCKADDR_LO").field("SIZE")


def pte_bits(prot: Prot) -> int:
    """The PTE bits of a page mapped with ``prot`` (valid, page type, and the permissions)."""
    bits = _PTE_BITS.get(prot)  # an IntFlag & makes a new flag object: three per map
    if bits is None:
        bits = _PTE_BITS[prot] = _pte_bits(prot)
    return bits


_PTE_BITS: dict[int, int] = {}


def _pte_bits(prot: Prot) -> int:
    bits = pte.PAGE_BITS
    if prot & Prot.READ:
        bits |= pte.READ
    if prot & Prot.WRITE:
        bits |= pte.WRITE
    if prot & Prot.EXEC:
        bits |= pte.EXEC
    return bits


class GpuVm:
    """One GPU address space: VA allocator + 4-level page table in guest RAM.

    Kernel: struct panfrost_mmu (per file) with drm_mm for VA; the page-table writer plays the
    role of io-pgtable's ``map_pages``/``unmap_pages``.

    ``as_nr`` is the hardware slot while bound (None otherwise); ``as_users`` counts jobs on the
    GPU that use the slot (a slot is only stolen while this is 0).
    """

    def __init__(self, mmu: GpuMmu, name: str = "vm") -> None:
        self.mmu = mmu
        self.name = name
        self.mem = mmu.frames.mem
        self.va = VaAllocator()
        self.as_nr: int | None = None
        self.as_users = 0
        self.lock = SpinLock(f"{name}.pgtable", PGTABLE_LOCK_CLASS)
        self.root_pa = self._new_table()
        # (level, va >> shift of that level's span) -> table pa; level 0 is the root
        self._tables: dict[tuple[int, int], int] = {(0, 0): self.root_pa}
        self.mapped_pages = 0
        self.dead = False

    def _new_table(self, reserve: list[int] | None = None) -> int:
        """A zeroed table frame: from ``reserve`` (preallocated before the lock was taken),
        or, without one, from the frame source (which may allocate and enter reclaim)."""
        if reserve:
            pa = reserve.pop()
        else:
            pa = self.mmu.frames.alloc_table_frame()
        self.mmu.stats.tables += 1
        return pa

    def _missing_tables(self, va: int, npages: int) -> int:
        """How many table frames mapping [va, va + npages pages) would add now. Tables are
        never freed while the VM lives, so the count can only shrink until the lock is
        taken: a reserve of this size always suffices."""
        missing = 0
        end = va + npages * PAGE_SIZE - 1
        for level in (1, 2, 3):
            shift = PAGE_SHIFT + pte.BITS_PER_LEVEL * (pte.LEVELS - level)
            for index in range(va >> shift, (end >> shift) + 1):
                if (level, index) not in self._tables:
                    missing += 1
        return missing

    def _prealloc_tables(self, va: int, npages: int) -> list[int]:
        """Allocate, with no lock of this VM held, the table frames a map of the range needs.
        Kernel: panthor_vm_prepare_map_op_ctx() (kmem_cache_alloc_bulk(pt_cache, GFP_KERNEL)
        into ``rsvd_page_tables``)."""
        if self.mmu.alloc_tables_under_lock:
            return []
        reserve: list[int] = []
        try:
            for _ in range(self._missing_tables(va, npages)):
                reserve.append(self.mmu.frames.alloc_table_frame())
        except BaseException:
            self._return_tables(reserve)
            raise
        return reserve

    def _return_tables(self, reserve: list[int]) -> None:
        """Give back the preallocated frames a map did not use (another task built those
        tables meanwhile). Kernel: panthor_vm_cleanup_op_ctx()."""
        for pa in reserve:
            self.mmu.frames.free_table_frame(pa)
        reserve.clear()

    # -- VA ----------------------------------------------------------------------------------
    def alloc_va(self, size: int, va: int | None = None) -> int:
        """Reserve a VA range (at ``va`` if given). Kernel: drm_mm_insert_node/reserve_node."""
        with self.lock:
            if va is None:
                return self.va.alloc(size)
            self.va.reserve(va, size)
            return va

    def free_va(self, va: int, size: int) -> None:
        """Give a VA range back (its pages must already be unmapped). Kernel:
        drm_mm_remove_node."""
        with self.lock:
            self.va.free(va, size)

    # -- page tables -------------------------------------------------------------------------
    def _l3_table(self, va: int, create: bool, reserve: list[int] | None = None) -> int | None:
        """The level-3 table covering ``va`` (building the levels above on the way)."""
        key = (3, va >> 21)
        pa = self._tables.get(key)
        if pa is not None or not create:
            return pa
        parent = self.root_pa
        for level in (1, 2, 3):
            shift = PAGE_SHIFT + pte.BITS_PER_LEVEL * (pte.LEVELS - level)
            k = (level, va >> shift)
            table = self._tables.get(k)
            if table is None:
                table = self._new_table(reserve)
                self._tables[k] = table
                entry = pte.make(table, pte.PteType.TABLE)
                _U64.pack_into(self.mem, parent + 8 * pte.index(va, level - 1), entry)
            parent = table
        return parent

    def map_pages(self, va: int, pas: Sequence[int], prot: Prot, *, flush: bool = True) -> None:
        """Point the PTEs of [va, va + len(pas) pages) at the frames ``pas``, then flush.

        Kernel: panfrost_mmu_map() → io-pgtable map_pages() + panfrost_mmu_flush_range(),
        with the table frames preallocated before the page-table lock is taken (panthor's
        ``rsvd_page_tables``): mapping under the lock never allocates. Existing entries are
        overwritten (a remap after swap-in lands in different frames).
        """
        if va % PAGE_SIZE or not pte.va_fits(va + len(pas) * PAGE_SIZE - 1):
            raise Einval(msg=f"bad GPU VA {va:#x} for {len(pas)} pages")
        bits = pte_bits(prot)
        reserve = self._prealloc_tables(va, len(pas))
        try:
            with self.lock:
                self._write_run(va, [pa | bits for pa in pas], reserve=reserve)
                self.mapped_pages += len(pas)
                if flush:
                    self.flush(va, len(pas) * PAGE_SIZE)
        finally:
            self._return_tables(reserve)

    def unmap_pages(self, va: int, npages: int, *, flush: bool = True) -> None:
        """Clear the PTEs of [va, va + npages pages), then flush the TLB for that range.

        Kernel: panfrost_mmu_unmap() → io-pgtable unmap_pages() + panfrost_mmu_flush_range().
        The caller frees the frames only after this returns.
        """
        with self.lock:
            self._write_run(va, [0] * npages, create=False)
            self.mapped_pages -= npages
            if flush:
                self.flush(va, npages * PAGE_SIZE)

    def _write_run(
        self, va: int, entries: list[int], create: bool = True, reserve: list[int] | None = None
    ) -> None:
        mem = self.mem
        i = 0
        n = len(entries)
        while i < n:
            cur = va + i * PAGE_SIZE
            table = self._l3_table(cur, create, reserve)
            idx = pte.index(cur, 3)
            run = min(n - i, pte.ENTRIES_PER_TABLE - idx)
            if table is not None:
                struct.pack_into(f"<{run}Q", mem, table + 8 * idx, *entries[i : i + run])
            i += run
        self.mmu.stats.ptes_written += n

    def lookup(self, va: int) -> int:
        """Walk the table in guest RAM like the GPU does; the PAGE entry for ``va`` or 0."""
        return walk(self.mem, self.root_pa, va)

    def flush(self, va: int, size: int) -> None:
        """Flush the TLB for a changed range if the VM is bound to a slot.

        Kernel: panfrost_mmu_flush_range() (nothing to do when the AS is not live: binding
        it later latches the table with UPDATE, which invalidates the whole TLB of the slot).
        """
        with self.mmu.lock:
            if self.as_nr is not None:
                self.mmu.flush_range(self.as_nr, va, size)

    def fini(self) -> None:
        """Drop the AS slot and free every page-table frame. Kernel: panfrost_mmu_release_ctx."""
        with self.lock:
            if self.dead:
                return
            self.mmu.release(self)
            for pa in self._tables.values():
                self.mmu.frames.free_table_frame(pa)
                self.mmu.stats.tables -= 1
            self._tables.clear()
            self.dead = True


def walk(mem: memoryview, root_pa: int, va: int) -> int:
    """The PAGE entry the GPU would use for ``va`` under the table at ``root_pa`` (0: none)."""
    table = root_pa
    for level in range(pte.LEVELS):
        (entry,) = _U64.unpack_from(mem, table + 8 * pte.index(va, level))
        if not entry & pte.VALID:
            return 0
        if level == pte.LEVELS - 1:
            return entry
        table = pte.address(entry)
    return 0
