"""DOC: the shmem shrinker: reclaim that purges, then evicts, idle GEM shmem objects.

:func:`drmm_gem_shmem_init` gives a device three LRUs and registers a shrinker with the
device's page allocator:

- ``lru_evictable``: objects whose pages may go (evictable or purgeable), least recently
  used first. The shrinker counts and walks only this list.
- ``lru_evicted``: objects whose contents are in swap.
- ``lru_pinned``: objects with pages that may not go (pinned, or not reclaimable).

:func:`gemu.guest.drm.gem_shmem.update_lru_locked` moves an object between them after every
change of state. Under memory pressure the shrinker walks ``lru_evictable`` twice: first it
*purges* objects userspace marked as not needed, then, if that was not enough, it *evicts*
objects to swap (only when swap has room for the whole object). Either way the object goes
through :func:`gemu.guest.drm.gem.evict_locked`, which skips busy objects (fences up to the
device's idle usage not signalled) and calls the driver's ``evict`` callback. Pinned objects are
never on the walked list, and objects whose lock is contended are skipped (trylock only).

A driver supplies ``evict``: it must tear down every other mapping of the frames (GPU page
tables, TLB) *before* the helper frees them, then call :func:`default_evict`::

    def gemu_bo_evict(obj):
        gpu_vm_unmap_all(obj)          # PTEs cleared and TLB flushed first
        gem_shmem_shrinker.default_evict(obj)

    funcs = gem_shmem.FUNCS.replace(evict=gemu_bo_evict)
    gem_shmem_shrinker.drmm_gem_shmem_init(dev)
    bo = gem_shmem.create(dev, size, funcs)
    gem_shmem.get_pages(bo)            # reclaimable once idle
"""

from __future__ import annotations

from gemu.guest.drm import gem, gem_lru, gem_shmem
from gemu.guest.drm.gem import DrmDevice, DrmGemObject
from gemu.guest.drm.gem_lru import DrmGemLru
from gemu.guest.errors import Ebusy, KernelError
from gemu.guest.kernel import trace
from gemu.guest.locking.mutex import Mutex
from gemu.guest.mm.shrinker import (
    SHRINK_EMPTY,
    SHRINK_STOP,
    ShrinkControl,
    Shrinker,
    register_shrinker,
    unregister_shrinker,
)

__all__ = [
    "DrmGemShmem",
    "ShmemShrinkerStats",
    "default_evict",
    "drmm_gem_shmem_init",
    "drmm_gem_shmem_release",
]


class ShmemShrinkerStats:
    """What the shrinker did, in objects. ``scans``: scan_objects calls; ``purged``/``evicted``:
    objects reclaimed; ``swapped_in``: evicted objects brought back; ``skipped_busy``: fences
    pending; ``skipped_pinned``: pinned when looked at; ``skipped_locked``: reservation lock
    contended; ``skipped_no_swap``: not enough swap for the whole object; ``evict_errors``:
    the driver's evict failed (e.g. swap I/O)."""

    __slots__ = (
        "evict_errors",
        "evicted",
        "purged",
        "scans",
        "skipped_busy",
        "skipped_locked",
        "skipped_no_swap",
        "skipped_pinned",
        "swapped_in",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __repr__(self) -> str:
        return f"<ShmemShrinkerStats {self.as_dict()}>"


class DrmGemShmem:
    """A device's shmem reclaim state. Kernel: struct drm_gem_shmem with its
    struct drm_gem_shmem_shrinker (v19, ``dev->shmem_mm``)

    ``lock`` guards the three LRUs (objects move between them, so they share it).
    """

    __slots__ = (
        "blocking_lock",
        "dev",
        "lock",
        "lru_evictable",
        "lru_evicted",
        "lru_pinned",
        "madvise_list_add",
        "mmap_errant_put",
        "scan_ticket",
        "shrinker",
        "skip_busy_test",
        "stats",
        "vunmap_clears_vaddr",
    )

    def __init__(self, dev: DrmDevice) -> None:
        self.dev = dev
        self.lock = Mutex(f"{dev.unique}:shmem_mm")
        self.lru_pinned = DrmGemLru(self.lock, "pinned")
        self.lru_evictable = DrmGemLru(self.lock, "evictable")
        self.lru_evicted = DrmGemLru(self.lock, "evicted")
        self.stats = ShmemShrinkerStats()
        # A deliberately wrong shrinker for gemu explore's mutants: evict without the busy
        # test. Never set in normal use.
        self.skip_busy_test = False
        # Another: lock each object with a blocking lock instead of the trylock.
        self.blocking_lock = False
        # Another: madvise(DONTNEED) links without unlinking first (gem_shmem.madvise_locked).
        self.madvise_list_add = False
        # Historical bugs (host/explore/bugs.py): the walk starts a ww ticket per object
        # (msm before 3392291fc509), vunmap clears vaddr while mapped (before dd7177627618),
        # mmap's error path puts a reference it does not own (before 24013314be6e).
        self.scan_ticket = False
        self.vunmap_clears_vaddr = False
        self.mmap_errant_put = False
        self.shrinker = Shrinker(
            dev.unique, self.count_objects, self.scan_objects, private_data=self
        )

    def __repr__(self) -> str:
        return (
            f"<DrmGemShmem pinned={self.lru_pinned.count} evictable={self.lru_evictable.count} "
            f"evicted={self.lru_evicted.count} pages>"
        )

    def count_objects(self, sc: ShrinkControl) -> int:
        """Pages the shrinker could free now: those on ``lru_evictable``.

        Kernel: drm_gem_shmem_shrinker_count_objects() (v19)
        """
        count = self.lru_evictable.count
        return min(count, SHRINK_EMPTY - 1) if count else SHRINK_EMPTY

    def scan_objects(self, sc: ShrinkControl) -> int:
        """Purge, then evict, up to ``sc.nr_to_scan`` pages of idle objects.

        Kernel: drm_gem_shmem_shrinker_scan_objects() (v19)

        Returns the pages freed if some were freed *and* some objects were skipped because
        their lock was contended; otherwise :data:`SHRINK_STOP`, as the v19 series does (so
        a pass that freed everything it found also reports STOP).
        """
        nr_to_scan = sc.nr_to_scan
        remaining = gem_lru.Remaining()
        failed_before = self.lru_evictable.trylock_failed
        self.stats.scans += 1
        blocking = self.blocking_lock
        ticket = self.scan_ticket or None
        freed = gem_lru.scan(
            self.lru_evictable, nr_to_scan, remaining, self._purge, ticket, blocking=blocking
        )
        if freed < nr_to_scan:
            freed += gem_lru.scan(
                self.lru_evictable,
                nr_to_scan - freed,
                remaining,
                self._evict,
                ticket,
                blocking=blocking,
            )
        self.stats.skipped_locked += self.lru_evictable.trylock_failed - failed_before
        if trace.enabled:
            trace.instant(
                "shrinker", "scan", nr_to_scan=nr_to_scan, freed=freed, left=remaining.pages
            )
            trace.counter(
                "shrinker",
                "lru_pages",
                evictable=self.lru_evictable.count,
                evicted=self.lru_evicted.count,
            )
        return freed if freed > 0 and remaining.pages > 0 else SHRINK_STOP

    def _try_evict(self, obj: DrmGemObject) -> bool:
        if obj.pages_pin_count:
            self.stats.skipped_pinned += 1
            return False
        try:
            if self.skip_busy_test:
                obj.funcs.evict(obj)
            else:
                gem.evict_locked(obj)
        except Ebusy:
            self.stats.skipped_busy += 1
            return False
        except KernelError:
            self.stats.evict_errors += 1
            return False
        return True

    def _purge(self, obj: DrmGemObject, ticket: object) -> bool:
        """Kernel: drm_gem_shmem_shrinker_purge() (v19)"""
        if not gem_shmem.is_purgeable(obj):
            return False
        if not self._try_evict(obj):
            return False
        self.stats.purged += 1
        return True

    def _evict(self, obj: DrmGemObject, ticket: object) -> bool:
        """Kernel: drm_gem_shmem_shrinker_evict() (v19)"""
        if not gem_shmem.is_evictable(obj):
            return False
        swap = self.dev.swap
        if swap is None or swap.get_nr_swap_pages() < obj.size >> gem.PAGE_SHIFT:
            self.stats.skipped_no_swap += 1
            return False
        if not self._try_evict(obj):
            return False
        self.stats.evicted += 1
        return True


def drmm_gem_shmem_init(dev: DrmDevice) -> DrmGemShmem:
    """Set up the device's LRUs and register its shrinker with the device's allocator.

    Kernel: drmm_gem_shmem_init() (v19)

    In mainline mode nothing is ever evictable, so the shrinker only purges (as driver-private
    shrinkers such as panfrost's do).

    Raises:
        Ebusy: the device already has a shmem shrinker.
    """
    if dev.shmem_mm is not None:
        raise Ebusy(msg=f"{dev.unique} already has a shmem shrinker")
    mm = DrmGemShmem(dev)
    dev.shmem_mm = mm
    register_shrinker(dev.allocator, mm.shrinker)
    return mm


def drmm_gem_shmem_release(dev: DrmDevice) -> None:
    """Unregister the shrinker and forget the LRUs (the drmm release action).

    Kernel: drm_gem_shmem_release() (v19, run by drmm at device teardown)
    """
    mm = dev.shmem_mm
    if mm is None:
        return
    unregister_shrinker(dev.allocator, mm.shrinker)
    dev.shmem_mm = None


def default_evict(obj: DrmGemObject) -> None:
    """The ``evict`` callback the helper offers: purge what userspace does not need, else
    write the pages to swap.

    Modelled on virtio-gpu's ``evict`` callback in the v19 series. Runs with ``obj.resv``
    held (from :func:`gemu.guest.drm.gem.evict_locked`). A driver wraps it to unmap the
    object from its GPU VMs and flush TLBs first.

    Raises:
        Ebusy: neither purgeable nor evictable.
        Enospc, Eio: writing to swap failed (the object stays resident).
    """
    if gem_shmem.is_purgeable(obj):
        gem_shmem.purge_locked(obj)
        return
    obj.pages_mark_dirty_on_put = True
    gem_shmem.evict_locked(obj)
