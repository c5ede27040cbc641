"""Allocation flags and scopes as lockdep and the page allocator see them: fs_reclaim only for
__GFP_FS allocations, memalloc_nofs/noio/noreclaim scopes per task, GFP_NOWAIT/GFP_ATOMIC that
never reclaim, __GFP_NORETRY's single pass and __GFP_NOWARN's silence."""

from __future__ import annotations

import logging

import pytest

from gemu.guest.errors import Enomem
from gemu.guest.kernel import runtime
from gemu.guest.kernel.runtime import Deterministic
from gemu.guest.locking import lockdep
from gemu.guest.locking.lockdep import LockClass, LockdepError
from gemu.guest.locking.mutex import Mutex
from gemu.guest.mm import gfp
from gemu.guest.mm.gfp import (
    GFP_ATOMIC,
    GFP_KERNEL,
    GFP_NOFS,
    GFP_NOIO,
    GFP_NOWAIT,
    Gfp,
    current_gfp_context,
)
from gemu.guest.mm.page_alloc import PAGE_SIZE, PageAllocator, PhysMem
from gemu.guest.mm.shrinker import SHRINK_EMPTY, SHRINK_STOP, Shrinker

FS_LOCK = LockClass("fs_transaction")
"""A lock a shrinker takes (as a filesystem's shrinker takes its transaction lock)."""


def run(fn, *args, strict: bool = True):
    return Deterministic(0, strict=strict).run(fn, *args)


class LockingPool:
    """A shrinker that takes ``lock`` to free its frames, and records each call's gfp_mask."""

    def __init__(self, alloc: PageAllocator, lock: Mutex) -> None:
        self.alloc = alloc
        self.lock = lock
        self.held: list[int] = []
        self.masks: list[Gfp] = []
        alloc.register_shrinker(Shrinker("locking-pool", self.count, self.scan))

    def count(self, sc) -> int:
        return len(self.held) or SHRINK_EMPTY

    def scan(self, sc) -> int:
        self.masks.append(Gfp(sc.gfp_mask))
        if not sc.gfp_mask & Gfp.FS:
            return SHRINK_STOP  # as super_cache_scan(): no fs locks from a NOFS reclaim
        with self.lock:
            n = min(sc.nr_to_scan, len(self.held))
            victims, self.held = self.held[:n], self.held[n:]
            self.alloc.free_pages(victims)
        return n


def tight_machine() -> tuple[PageAllocator, LockingPool, Mutex]:
    """32 frames, every free one but the min reserve held by the pool: the next allocation
    reclaims, and the reclaim takes the pool's lock inside fs_reclaim (kswapd style)."""
    alloc = PageAllocator(PhysMem(bytearray(32 * PAGE_SIZE)), watermarks=(4, 8, 12))
    lock = Mutex("pool.lock", FS_LOCK)
    pool = LockingPool(alloc, lock)
    pool.held = alloc.alloc_pages(alloc.nr_free - 4, GFP_NOWAIT | Gfp.HIGH)
    return alloc, pool, lock


def record_reclaim_order(alloc: PageAllocator) -> None:
    """A GFP_KERNEL allocation that reclaims: records fs_reclaim -> fs_transaction."""
    pfn = alloc.alloc_page(GFP_KERNEL)
    alloc.free_pages([pfn])


def test_gfp_nofs_under_a_lock_reclaim_takes_is_not_an_inversion():
    """GFP_NOFS while holding a lock that reclaim takes inside fs_reclaim records no
    fs_transaction -> fs_reclaim order (fs_reclaim_acquire takes the map only for __GFP_FS),
    so lockdep reports nothing; the same allocation with GFP_KERNEL is the inversion."""

    def nofs():
        alloc, _pool, lock = tight_machine()
        record_reclaim_order(alloc)
        with lock:
            pfn = alloc.alloc_page(GFP_NOFS)
        alloc.free_pages([pfn])
        assert lockdep.reports() == []

    run(nofs)

    def kernel():
        alloc, _pool, lock = tight_machine()
        record_reclaim_order(alloc)
        with lock:
            alloc.alloc_page(GFP_KERNEL)

    with pytest.raises(LockdepError, match="fs_reclaim -> fs_transaction") as info:
        run(kernel)
    assert info.value.report.kind == "inversion"


def test_memalloc_nofs_scope_narrows_every_allocation_of_the_task():
    """Inside memalloc_nofs_save() a GFP_KERNEL allocation is GFP_NOFS: no fs_reclaim order
    under the lock, and the shrinkers it runs are told the mask has no __GFP_FS (the pool's
    shrinker then refuses, and the allocation fails instead of deadlocking). The scope
    is the task's own: another task's GFP_KERNEL allocation is unchanged, and after
    memalloc_nofs_restore() the task's is too."""

    def main():
        alloc, pool, lock = tight_machine()
        record_reclaim_order(alloc)
        seen = {}

        def other():
            seen["other"] = current_gfp_context(GFP_KERNEL)

        flags = gfp.memalloc_nofs_save()
        try:
            runtime.spawn(other, name="other").join()
            assert current_gfp_context(GFP_KERNEL) == GFP_NOFS
            pool.held += alloc.alloc_pages(1, GFP_NOWAIT | Gfp.HIGH)
            pool.masks.clear()
            with lock, pytest.raises(Enomem, match="reclaim did not free enough"):
                alloc.alloc_page(GFP_KERNEL | Gfp.NORETRY)
        finally:
            gfp.memalloc_nofs_restore(flags)
        assert seen["other"] == GFP_KERNEL
        assert pool.masks == [GFP_NOFS | Gfp.NORETRY]
        assert current_gfp_context(GFP_KERNEL) == GFP_KERNEL

    run(main)


def test_nested_scopes_restore_only_what_they_added():
    """A nested nofs scope's restore keeps the outer scope; noio drops __GFP_IO too."""

    def main():
        outer = gfp.memalloc_nofs_save()
        inner = gfp.memalloc_nofs_save()
        gfp.memalloc_nofs_restore(inner)
        assert current_gfp_context(GFP_KERNEL) == GFP_NOFS
        gfp.memalloc_nofs_restore(outer)
        assert current_gfp_context(GFP_KERNEL) == GFP_KERNEL
        io = gfp.memalloc_noio_save()
        assert current_gfp_context(GFP_KERNEL) == GFP_NOIO
        gfp.memalloc_noio_restore(io)
        assert current_gfp_context(GFP_KERNEL) == GFP_KERNEL

    run(main)


def test_gfp_nofs_in_a_signalling_section_is_still_reported():
    """GFP_NOFS still enters direct reclaim, and reclaim runs mmu notifiers, which may wait
    for fences: inside a dma_fence signalling section it is reported (the kernel's
    fs_reclaim_acquire takes the mmu-notifier map for every reclaiming mask). GFP_NOWAIT
    and GFP_ATOMIC record nothing there."""

    def main():
        cookie = lockdep.dma_fence_begin_signalling()
        try:
            lockdep.might_alloc(GFP_NOWAIT)
            lockdep.might_alloc(GFP_ATOMIC)
            lockdep.might_alloc(GFP_NOFS)
        finally:
            lockdep.dma_fence_end_signalling(cookie)

    with pytest.raises(LockdepError, match="mmu_notifier") as info:
        run(main)
    assert info.value.report.kind == "signalling"


def test_nowait_and_atomic_fail_fast_without_reclaim(caplog):
    """Below the min watermark GFP_NOWAIT and GFP_ATOMIC fail at once with -ENOMEM: no direct
    reclaim pass runs (the shrinker is never called); GFP_ATOMIC logs the allocation failure,
    GFP_NOWAIT (which carries __GFP_NOWARN) does not."""

    def main():
        alloc, pool, _lock = tight_machine()
        pool.held += alloc.alloc_pages(alloc.nr_free - 2, GFP_NOWAIT | Gfp.HIGH)
        with caplog.at_level(logging.WARNING, logger="gemu.guest.mm.page_alloc"):
            with pytest.raises(Enomem, match="no reclaim allowed"):
                alloc.alloc_page(GFP_NOWAIT)
            assert "page allocation failure" not in caplog.text
            with pytest.raises(Enomem, match="no reclaim allowed"):
                alloc.alloc_page(GFP_ATOMIC)
            assert "page allocation failure" in caplog.text
        assert alloc.statistics().direct_reclaims == 0
        assert pool.masks == []

    run(main)


def test_noreclaim_scope_never_recurses_into_reclaim():
    """Inside memalloc_noreclaim_save() (PF_MEMALLOC, as msm's reset path wraps its crash
    dump) a GFP_KERNEL allocation records no fs_reclaim order even inside a signalling
    section, runs no reclaim, and may use the min reserve."""

    def main():
        alloc, pool, _lock = tight_machine()
        cookie = lockdep.dma_fence_begin_signalling()
        flags = gfp.memalloc_noreclaim_save()
        try:
            pfn = alloc.alloc_page(GFP_KERNEL)
        finally:
            gfp.memalloc_noreclaim_restore(flags)
            lockdep.dma_fence_end_signalling(cookie)
        assert pool.masks == []
        assert alloc.statistics().direct_reclaims == 0
        alloc.free_pages([pfn])
        assert not gfp.current_is_memalloc()

    run(main)
