"""Helpers shared by the GEM and shmem-helper tests: a device with its shrinker, the clean-up
check every test ends with, and small reservation-object idioms."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from gemu.guest.dma_buf import dma_fence, dma_resv
from gemu.guest.dma_buf.dma_fence import DmaFence
from gemu.guest.dma_buf.dma_resv import DmaResvUsage
from gemu.guest.drm import gem
from gemu.guest.drm.gem_shmem_shrinker import drmm_gem_shmem_init, drmm_gem_shmem_release
from gemu.guest.kernel import runtime
from gemu.guest.locking import lockdep
from gemu.guest.mm.page_alloc import PAGE_SIZE, PageAllocator, PhysMem
from gemu.guest.mm.swap import SwapDevice


def shmem_device(
    frames: int = 64, slots: int = 32, *, poison_on_free: bool = False, **dev_kw
) -> gem.DrmDevice:
    """A DrmDevice over ``frames`` of RAM (no watermarks) and ``slots`` of swap, with the shmem
    shrinker registered."""
    alloc = PageAllocator(
        PhysMem(bytearray(frames * PAGE_SIZE)),
        watermarks=(0, 0, 0),
        poison_on_free=poison_on_free,
    )
    dev = gem.DrmDevice(alloc, SwapDevice(slots), **dev_kw)
    drmm_gem_shmem_init(dev)
    return dev


def release_shmem_device(dev: gem.DrmDevice) -> None:
    """Every object gone and off every LRU; then unregister the shrinker."""
    mm = dev.shmem_mm
    assert dev.object_count == 0 and not dev.leaked
    assert (mm.lru_pinned.count, mm.lru_evictable.count, mm.lru_evicted.count) == (0, 0, 0)
    drmm_gem_shmem_release(dev)


def assert_nothing_left(dev: gem.DrmDevice) -> None:
    """No frame, swap slot, held lock or lockdep report is left over."""
    dev.allocator.assert_no_leaks()
    dev.swap.assert_no_leaks()
    assert not runtime.current().held_locks
    assert not lockdep.reports()


@contextmanager
def locked(obj) -> Iterator:
    """Hold ``obj``'s reservation lock (no acquire context) for the block."""
    dma_resv.lock(obj.resv, None)
    try:
        yield obj
    finally:
        dma_resv.unlock(obj.resv)


def fence_on(obj, usage: DmaResvUsage) -> DmaFence:
    """Publish a new unsignalled fence in ``obj``'s reservation object with ``usage``."""
    fence = DmaFence(None, dma_fence.context_alloc(1), 1)
    with locked(obj):
        dma_resv.reserve_fences(obj.resv, 1)
        dma_resv.add_fence(obj.resv, fence, usage)
    return fence
