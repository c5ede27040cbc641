"""DOC: the GEM shmem helper: buffer objects backed by a shmem file, reclaimable by a shrinker.

A :class:`DrmGemShmemObject` keeps its contents in a shmem file (``filp``). Its *pages* are
the guest frames that currently hold those contents. Five words name five different things:

get pages
    Make sure the object has pages and take a *use reference* on them
    (``pages_use_count``). Pages that are only "got" may still be **evicted** by the
    shrinker once the object is idle, i.e. once every fence in its reservation object up to
    the device's idle usage has signalled. Getting pages is what keeps the object's
    *contents*; it does not keep them in the same frames.
pin
    Get pages *and* forbid reclaim (``pages_pin_count``): the frames stay where they are
    until the last unpin, whatever the fences say. Pinning an evicted object swaps it in first.
vmap
    A CPU mapping (``vaddr``, an :class:`IosysMap`) of the pinned frames, counted by
    ``vmap_use_count``; the mapping lives until the *last* vunmap.
sgt
    The scatter-gather table (:class:`SgTable`) listing the frames for device DMA, cached in
    ``sgt`` until the pages go. It is only valid while the frames cannot move: build it with
    the object pinned, or with the reservation lock held after a swap-in and before the
    lock is dropped with a fence added that keeps the object busy.
evicted / purged
    *Evicted* pages were written to swap; :func:`swapin_locked` brings the contents back,
    usually in different frames (``evicted``). *Purged* contents are gone for good
    (``madv < 0``): userspace said it did not need them (``madv > 0``) and the shrinker
    dropped them. Purging is sticky.

The validation flow of a GPU job that uses an object whose pages were got but not pinned::

    dma_resv.lock(obj.resv, ctx)                 # drm_exec in practice
    dma_resv.reserve_fences(obj.resv, 1)
    gem_shmem.swapin_locked(obj)                 # no-op (but an LRU bump) if not evicted
    sgt = gem_shmem.get_pages_sgt_locked(obj)    # frames as they are now
    ...map sgt into the GPU VM, flush the TLB, arm the job...
    dma_resv.add_fence(obj.resv, job_fence, DmaResvUsage.WRITE)   # now busy: not evictable
    dma_resv.unlock(obj.resv)

Every ``*_locked`` function must be called with ``obj.resv`` held and asserts it first. The
device's ``semantics`` selects the v19 shrinker-enabled helper (default) or the mainline one;
``docs/shmem.md`` tabulates the differences.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable, Sequence

from gemu.guest.dma_buf import dma_resv
from gemu.guest.drm import gem, gem_lru
from gemu.guest.drm.gem import PAGE_SHIFT, PAGE_SIZE, DrmDevice, DrmGemObject, DrmGemObjectFuncs
from gemu.guest.errors import Ebusy, Efault, Einval, Enodev, Enomem, KernelError, warn_on
from gemu.guest.kernel import runtime, trace
from gemu.guest.locking import lockdep
from gemu.guest.mm.page_alloc import GFP_KERNEL, frame_runs

__all__ = [
    "FUNCS",
    "DrmGemShmemObject",
    "IosysMap",
    "SgTable",
    "ShmemVma",
    "SigBus",
    "create",
    "evict_locked",
    "fault",
    "free",
    "get_pages",
    "get_pages_locked",
    "get_pages_sgt",
    "get_pages_sgt_locked",
    "get_sg_table",
    "is_evictable",
    "is_purgeable",
    "madvise",
    "madvise_locked",
    "mmap",
    "pin",
    "pin_locked",
    "prime_import_sg_table",
    "print_info",
    "purge",
    "purge_locked",
    "put_pages",
    "put_pages_locked",
    "swapin_locked",
    "unpin",
    "unpin_locked",
    "update_lru_locked",
    "vm_close",
    "vm_open",
    "vmap",
    "vmap_locked",
    "vunmap",
    "vunmap_locked",
]

# refcount_t operations are atomics in the kernel; the model serialises them on one lock.
_atomic = threading.Lock()

GFP_SHMEM = GFP_KERNEL
"""Allocation flags for an object's pages (the kernel's mapping gfp mask)."""


class SigBus(Exception):
    """A CPU access through a mapping hit no page: the kernel's VM_FAULT_SIGBUS.

    Raised for an offset past the object, a purged object, or an object without pages.
    """


class SgTable:
    """The frames of an object for device DMA. Kernel: struct sg_table, DMA-mapped.

    ``pfns`` lists the frame of each page in order; ``nents`` is the number of runs of
    consecutive frames (the entries a coalescing DMA mapping would produce). DMA addresses are
    physical addresses: the model has no IOMMU.

    A table built from a shmem object's pages (``owner``) lives exactly as long as those
    pages: eviction, purge and the last put free them, and the kernel frees (and DMA-unmaps)
    the table with them, so reading a table fetched before that is a use after free. The
    model keeps the table object but marks it stale, and every later read of its segments
    (``pfns``, ``nents``, :meth:`dma_segments`, ``len()``) is reported (:func:`warn_on`) and
    fails with ``Efault``, naming the object and the call that freed its pages. A table
    without an owner (an imported one) belongs to its exporter and never goes stale here.
    """

    __slots__ = ("_gen", "_nents", "_pfns", "owner")

    def __init__(self, pfns: Sequence[int], owner: DrmGemShmemObject | None = None) -> None:
        self._pfns = tuple(pfns)
        self._nents = -1  # counted when first asked (most tables are only walked by pfns)
        self.owner = owner
        self._gen = owner.pages_gen if owner is not None else 0

    def _count_nents(self) -> int:
        if self._nents < 0:
            self._nents = len(frame_runs(self._pfns))
        return self._nents

    @property
    def stale(self) -> str | None:
        """Why the table is no longer valid (the call that freed its pages), or None."""
        owner = self.owner
        if owner is None or owner.pages_gen == self._gen:
            return None
        return owner.pages_gone or "its pages were freed"

    def _check(self) -> None:
        why = self.stale
        if why is not None:
            msg = f"use of a stale sg table of {_label(self.owner)}: {why}"
            warn_on(True, msg)
            raise Efault(msg=msg)

    @property
    def pfns(self) -> tuple[int, ...]:
        """The frame of each page (a use of the table: checked)."""
        self._check()
        return self._pfns

    @property
    def nents(self) -> int:
        """Entries after coalescing. Kernel: sg_table.nents (a use of the table: checked)."""
        self._check()
        return self._count_nents()

    def __len__(self) -> int:
        self._check()
        return len(self._pfns)

    def __repr__(self) -> str:
        state = " STALE" if self.stale is not None else ""
        return f"<SgTable {len(self._pfns)} pages in {self._count_nents()} entries{state}>"

    def dma_segments(self) -> list[tuple[int, int]]:
        """``(dma_address, length)`` per run of consecutive frames. Kernel: for_each_sgtable_dma_sg()"""
        return [(pfn << PAGE_SHIFT, n << PAGE_SHIFT) for pfn, n in frame_runs(self.pfns)]


class IosysMap:
    """A CPU mapping of an object's frames, the ``vaddr`` of a vmap. Kernel: struct iosys_map

    Reads and writes go to the frames of guest RAM the object had when it was mapped (they
    cannot move: a vmap pins the object). After the last vunmap the mapping is dead and any
    access is reported (a use after vunmap).
    """

    __slots__ = ("pfns", "physmem", "size")

    def __init__(self, physmem, pfns: Sequence[int]) -> None:
        self.physmem = physmem
        self.pfns: tuple[int, ...] | None = tuple(pfns)
        self.size = len(self.pfns) << PAGE_SHIFT

    def __repr__(self) -> str:
        state = "dead" if self.pfns is None else f"{len(self.pfns)} pages"
        return f"<IosysMap {state}>"

    @property
    def is_null(self) -> bool:
        """Whether the mapping was torn down. Kernel: iosys_map_is_null()"""
        return self.pfns is None

    def _chunks(self, offset: int, n: int) -> Iterable[tuple[int, int, int]]:
        pfns = self.pfns
        if warn_on(pfns is None, "access through a vaddr after its last vunmap"):
            raise Efault(msg="vaddr is not mapped")
        if offset < 0 or n < 0 or offset + n > self.size:
            raise Efault(msg=f"vaddr access {offset}+{n} outside {self.size} bytes")
        while n:
            page, off = divmod(offset, PAGE_SIZE)
            step = min(n, PAGE_SIZE - off)
            yield pfns[page], off, step
            offset += step
            n -= step

    def read(self, offset: int, n: int) -> bytes:
        """Copy ``n`` bytes out of the mapping. Kernel: iosys_map_memcpy_from()"""
        return b"".join(
            self.physmem.read((pfn << PAGE_SHIFT) + off, step)
            for pfn, off, step in self._chunks(offset, n)
        )

    def write(self, offset: int, data: bytes) -> None:
        """Copy ``data`` into the mapping. Kernel: iosys_map_memcpy_to()"""
        data = memoryview(data)
        pos = 0
        for pfn, off, step in self._chunks(offset, len(data)):
            self.physmem.write((pfn << PAGE_SHIFT) + off, data[pos : pos + step])
            pos += step


class DrmGemShmemObject(DrmGemObject):
    """A GEM object backed by a shmem file. Kernel: struct drm_gem_shmem_object

    Fields and their invariants (all change with ``resv`` held, except the lock-free fast
    paths of the counters, which never move a counter to or from 0):

    ``pages``
        The frame of each page (a tuple: the helper replaces it whole, never changes it in
        place, so a table of it can share it), or None. Not None exactly when
        ``pages_use_count > 0`` and the object is neither evicted nor purged.
    ``pages_use_count``
        References on the pages (get pages, each pin period, each CPU mmap). The pages are
        dropped when it reaches 0. Eviction does not change it.
    ``pages_pin_count``
        Pins. While it is above 0 the pages are resident and never evicted or purged; one pin
        period holds one use reference.
    ``madv``
        0: in use; > 0: userspace does not need the contents (purgeable); < 0: purged, for good.
    ``sgt``
        Cached :class:`SgTable` of ``pages``; None whenever ``pages`` is None.
    ``vaddr``, ``vmap_use_count``
        The CPU mapping and its users; ``vaddr`` is not None exactly when the count is above 0,
        and a vmap holds one pin.
    ``evicted``
        The pages were written to swap by the shrinker; ``pages_use_count`` is still above 0.
    ``pages_mark_dirty_on_put``, ``pages_mark_accessed_on_put``, ``map_wc``
        Flags the driver sets; recorded, without effect on the model's memory.
    ``vmas``
        The CPU mappings made by :func:`mmap` (None when there are none); eviction and purge
        zap their page tables.
    ``pages_gen``, ``pages_gone``
        Model bookkeeping, no kernel field: ``pages_gen`` counts the times the pages were
        freed (every :class:`SgTable` records the value it was built under, and is stale once
        it differs); ``pages_gone`` says which call freed them last, for the stale-table
        report.

    ``vaddr``, ``vmap_use_count``, ``vmas`` and the three driver flags are rare fields
    (:class:`~gemu.guest.drm.gem.RareField`): an object that is never vmapped or mmapped
    does not pay for them (a machine may hold 100k small objects).
    """

    __slots__ = (
        "_gone",
        "evicted",
        "madv",
        "pages",
        "pages_gen",
        "pages_pin_count",
        "pages_use_count",
        "sgt",
    )

    vaddr: IosysMap | None = gem.RareField()
    vmap_use_count: int = gem.RareField(0)
    vmas: list[ShmemVma] | None = gem.RareField()
    pages_mark_dirty_on_put: bool = gem.RareField(False)
    pages_mark_accessed_on_put: bool = gem.RareField(False)
    map_wc: bool = gem.RareField(False)

    def __init__(self) -> None:
        super().__init__()
        self.pages: tuple[int, ...] | None = None
        self.pages_use_count = 0
        self.pages_pin_count = 0
        self.madv = 0
        self.sgt: SgTable | None = None
        self.evicted = False
        self.pages_gen = 0
        self._gone: tuple | None = None  # pages_gone's parts, formatted when read

    @property
    def pages_gone(self) -> str | None:
        """Which call freed the pages last (kernel function, task, time, callers), or None."""
        gone = self._gone
        if gone is None:
            return None
        what, task, now, callers = gone
        where = " <- ".join(
            f"{module.rsplit('.', 1)[-1]}.{name}:{line}" for module, name, line in callers
        )
        return f"its pages were freed by {what} in task {task} at {now} ns (called from {where})"

    def __repr__(self) -> str:
        label = self.resv.lock.name if self.resv is not None else "uninit"
        state = "evicted" if self.evicted else ("purged" if self.madv < 0 else "")
        return (
            f"<DrmGemShmemObject {label} {self.size >> PAGE_SHIFT}p use={self.pages_use_count} "
            f"pin={self.pages_pin_count} vmap={self.vmap_use_count} madv={self.madv} {state}>"
        )


def _v19(shmem: DrmGemShmemObject) -> bool:
    return shmem.dev.semantics == "v19"


def _inc_not_zero(shmem: DrmGemShmemObject, field: str) -> bool:
    with _atomic:
        value = getattr(shmem, field)
        if value == 0:
            return False
        setattr(shmem, field, value + 1)
        return True


def _dec_not_one(shmem: DrmGemShmemObject, field: str) -> bool:
    with _atomic:
        value = getattr(shmem, field)
        if value <= 1:
            return False
        setattr(shmem, field, value - 1)
        return True


def _dec_and_test(shmem: DrmGemShmemObject, field: str) -> bool:
    """refcount_dec_and_test(); an underflow warns and leaves the count at 0."""
    with _atomic:
        value = getattr(shmem, field)
        if value > 0:
            setattr(shmem, field, value - 1)
    if warn_on(value <= 0, "%s underflow on %r", field, shmem):
        return False
    return value == 1


# --- object life ----------------------------------------------------------------------------


def object_free(obj: DrmGemObject) -> None:
    """The ``free`` callback of plain shmem objects. Kernel: drm_gem_shmem_object_free()"""
    free(obj)


def object_print_info(obj: DrmGemObject, out: list[str]) -> None:
    """The ``print_info`` callback. Kernel: drm_gem_shmem_object_print_info()"""
    print_info(obj, out)


def object_mmap(obj: DrmGemObject) -> ShmemVma:
    """The ``mmap`` callback :func:`gem.mmap` calls. Kernel: drm_gem_shmem_object_mmap()"""
    return mmap(obj)


FUNCS = DrmGemObjectFuncs(free=object_free, print_info=object_print_info, mmap=object_mmap)
"""Callbacks of an object without a shrinker ``evict`` (the kernel's drm_gem_shmem_funcs).
A driver adds ``evict`` with ``FUNCS.replace(evict=...)``."""


def create(
    dev: DrmDevice,
    size: int,
    funcs: DrmGemObjectFuncs | None = None,
    create_object: Callable[[], DrmGemShmemObject] | None = None,
) -> DrmGemShmemObject:
    """A new object of ``size`` bytes (rounded up to pages) with one reference and no pages.

    Kernel: drm_gem_shmem_create() [drivers/gpu/drm/drm_gem_shmem_helper.c]

    ``create_object`` is the driver's ``gem_create_object`` hook: it returns the driver's
    object, a subclass of :class:`DrmGemShmemObject` (panfrost_gem_create_object() embeds
    the shmem object in its own), initialised here like a plain one.

    Raises:
        Einval: ``size`` is not positive.
    """
    if size <= 0:
        raise Einval(msg=f"shmem object of {size} bytes")
    shmem = DrmGemShmemObject() if create_object is None else create_object()
    gem.object_init(dev, shmem, gem.page_align(size))
    shmem.funcs = funcs if funcs is not None else FUNCS
    gem.create_mmap_offset(shmem)
    return shmem


def prime_import_sg_table(
    dev: DrmDevice, sgt: SgTable, attach: object = True, funcs: DrmGemObjectFuncs | None = None
) -> DrmGemShmemObject:
    """A private object wrapping another driver's frames. Kernel: drm_gem_shmem_prime_import_sg_table()

    The object has no shmem file, its ``sgt`` is the imported table and ``import_attach`` is
    ``attach``. The helper never gets, pins, evicts or purges its pages: they belong to the
    exporter.
    """
    shmem = DrmGemShmemObject()
    gem.private_object_init(dev, shmem, len(sgt) << PAGE_SHIFT)
    shmem.funcs = funcs if funcs is not None else FUNCS
    shmem.sgt = sgt
    shmem.import_attach = attach
    shmem.map_wc = False
    gem.create_mmap_offset(shmem)
    return shmem


def free(shmem: DrmGemShmemObject) -> None:
    """Release an object whose last reference is gone.

    Kernel: drm_gem_shmem_free() [drivers/gpu/drm/drm_gem_shmem_helper.c]

    v19: if ``vmap_use_count``, ``pages_use_count`` or ``pages_pin_count`` is not 0 the
    object is still in use somewhere: warn and *leak* it (it is added to ``dev.leaked``, its
    frames stay allocated). The reservation lock is not taken: no one else can reach the
    object, and the last reference may be dropped inside reclaim, where taking it would invert
    the reservation -> reclaim order. The driver's free callback drops its own page reference
    with :func:`put_pages` before calling this.

    Mainline: under the reservation lock, drop the cached sgt and the page reference it holds,
    warn about counters still set, and free the object anyway.
    """
    if shmem.import_attach is not None:
        shmem.sgt = None  # drm_prime_gem_destroy(): the exporter keeps its frames
        gem.object_release(shmem)
        return
    if _v19(shmem):
        leaked = warn_on(shmem.vmap_use_count, "freeing %r while vmapped", shmem)
        leaked |= warn_on(shmem.pages_use_count, "freeing %r with pages held", shmem)
        leaked |= warn_on(shmem.pages_pin_count, "freeing %r while pinned", shmem)
        if leaked:
            shmem.dev.leaked.append(shmem)
            return
        shmem.sgt = None
    else:
        dma_resv.lock(shmem.resv, None)
        try:
            warn_on(shmem.vmap_use_count, "freeing %r while vmapped", shmem)
            if shmem.sgt is not None:
                shmem.sgt = None
                if shmem.pages is not None:
                    put_pages_locked(shmem)
            warn_on(shmem.pages_use_count, "freeing %r with pages held", shmem)
            warn_on(shmem.pages_pin_count, "freeing %r while pinned", shmem)
            _free_pages(shmem, "drm_gem_shmem_free")
        finally:
            dma_resv.unlock(shmem.resv)
    gem.object_release(shmem)


# --- pages ----------------------------------------------------------------------------------


def _acquire_pages(shmem: DrmGemShmemObject) -> None:
    """Kernel: drm_gem_shmem_acquire_pages() (v19, static)"""
    if warn_on(shmem.import_attach is not None, "getting pages of imported %r", shmem):
        raise Einval(msg="imported object")
    if shmem.madv < 0:
        raise Enomem(msg=f"{shmem!r} was purged")
    if shmem.pages is not None:
        warn_on(not shmem.evicted, "%r already has pages", shmem)
        return
    shmem.pages = tuple(shmem.filp.get_pages(GFP_SHMEM))


def _pages_gone(shmem: DrmGemShmemObject, what: str) -> None:
    """The object's pages (and every sg table of them) are freed by ``what``: make tables
    built before stale, and remember who freed them (kernel function, task, callers)."""
    if shmem.pages is None:
        return  # nothing was there to be freed: tables already stale keep their first reason
    shmem.pages_gen += 1
    callers = []
    frame = sys._getframe(2)
    while frame is not None and len(callers) < 3:
        callers.append((frame.f_globals.get("__name__", "?"), frame.f_code.co_name, frame.f_lineno))
        frame = frame.f_back
    # the parts only: the message is made if a stale table is ever reported
    shmem._gone = (what, runtime.current().name, runtime.now_ns(), callers)


def _free_pages(shmem: DrmGemShmemObject, what: str = "drm_gem_shmem_free_pages") -> None:
    """Forget the sgt and the pages; the frames stay with the shmem file.

    Kernel: drm_gem_shmem_free_pages() (v19) / the tail of drm_gem_shmem_put_pages_locked()
    """
    _pages_gone(shmem, what)
    shmem.sgt = None
    shmem.pages = None


def _zap_vmas(shmem: DrmGemShmemObject) -> None:
    """Kernel: drm_vma_node_unmap(): CPU mappings fault again on their next access."""
    if trace.enabled:
        trace.instant("gem", "vma_node_unmap", obj=_label(shmem))
    if shmem.vmas:
        for vma in shmem.vmas:
            vma.ptes.clear()


def get_pages_locked(shmem: DrmGemShmemObject) -> None:
    """Take a use reference on the pages, allocating them (or reading them back) if needed.

    Kernel: drm_gem_shmem_get_pages_locked() (static in mainline, used by v19's public API)
    Locking: caller holds ``shmem.resv`` (asserted).

    The pages are not pinned: an idle object may still be evicted (see the module DOC).

    Raises:
        Enomem: the object was purged, or no frames could be allocated.
    """
    dma_resv.assert_held(shmem.resv)
    if shmem.madv < 0:
        raise Enomem(msg=f"{shmem!r} was purged")
    if _inc_not_zero(shmem, "pages_use_count"):
        return
    _acquire_pages(shmem)
    shmem.pages_use_count = 1
    update_lru_locked(shmem)


def put_pages_locked(shmem: DrmGemShmemObject) -> None:
    """Drop a use reference; the last one drops the pages (and the sgt).

    Kernel: drm_gem_shmem_put_pages_locked() [drivers/gpu/drm/drm_gem_shmem_helper.c]
    Locking: caller holds ``shmem.resv`` (asserted).

    The frames go back to the shmem file, which keeps the contents. An evicted object whose
    last reference goes stops being "evicted": it holds nothing, like any idle object.
    """
    dma_resv.assert_held(shmem.resv)
    if _dec_and_test(shmem, "pages_use_count"):
        _free_pages(shmem, "drm_gem_shmem_put_pages_locked")
        shmem.evicted = False
    update_lru_locked(shmem)


def get_pages(shmem: DrmGemShmemObject) -> None:
    """Take a use reference on the pages without holding the reservation lock.

    Kernel: drm_gem_shmem_get_pages() (v19; exported, unlocked)
    Locking: caller must not hold ``shmem.resv``.

    Fast path: if the pages already have users, just count one more. The pages are got, not
    pinned: once the object is idle the shrinker may evict them (contents kept, frames not).

    Raises:
        Enomem: as :func:`get_pages_locked`.
    """
    if _inc_not_zero(shmem, "pages_use_count"):
        return
    dma_resv.lock(shmem.resv, None)
    try:
        get_pages_locked(shmem)
    finally:
        dma_resv.unlock(shmem.resv)


def put_pages(shmem: DrmGemShmemObject) -> None:
    """Drop a use reference without holding the reservation lock.

    Kernel: drm_gem_shmem_put_pages() (v19; exported, unlocked)
    Locking: caller must not hold ``shmem.resv``.

    Fast path: if others still use the pages, just count one fewer. On the free path (the GEM
    reference count is already 0) the last reference is dropped without the reservation lock:
    nobody else can reach the object, and the free may run inside reclaim.
    """
    if _dec_not_one(shmem, "pages_use_count"):
        return
    if shmem.refcount == 0:
        if _dec_and_test(shmem, "pages_use_count"):
            _free_pages(shmem, "drm_gem_shmem_put_pages")
            shmem.evicted = False
            gem_lru.remove(shmem)
        return
    dma_resv.lock(shmem.resv, None)
    try:
        put_pages_locked(shmem)
    finally:
        dma_resv.unlock(shmem.resv)


# --- pin ------------------------------------------------------------------------------------


def pin_locked(shmem: DrmGemShmemObject) -> None:
    """Make the pages resident and unreclaimable until :func:`unpin_locked`.

    Kernel: drm_gem_shmem_pin_locked() (exported in mainline, static in v19)
    Locking: caller holds ``shmem.resv`` (asserted).

    The first pin swaps an evicted object in (v19), then takes one use reference for the
    whole pin period.

    Raises:
        Einval: the object is imported.
        Enomem: purged, or no frames.
    """
    dma_resv.assert_held(shmem.resv)
    if warn_on(shmem.import_attach is not None, "pinning imported %r", shmem):
        raise Einval(msg="imported object")
    if _inc_not_zero(shmem, "pages_pin_count"):
        return
    if _v19(shmem):
        swapin_locked(shmem)
    get_pages_locked(shmem)
    shmem.pages_pin_count = 1
    update_lru_locked(shmem)


def unpin_locked(shmem: DrmGemShmemObject) -> None:
    """End a pin; the last unpin drops the pin period's use reference.

    Kernel: drm_gem_shmem_unpin_locked() [drivers/gpu/drm/drm_gem_shmem_helper.c]
    Locking: caller holds ``shmem.resv`` (asserted).
    """
    dma_resv.assert_held(shmem.resv)
    if _dec_and_test(shmem, "pages_pin_count"):
        put_pages_locked(shmem)


def pin(shmem: DrmGemShmemObject) -> None:
    """Pin without holding the reservation lock. Kernel: drm_gem_shmem_pin()

    Locking: caller must not hold ``shmem.resv``; the lock is taken interruptibly.

    Raises:
        Eintr: a signal arrived while waiting for the lock.
        Einval, Enomem: as :func:`pin_locked`.
    """
    if _inc_not_zero(shmem, "pages_pin_count"):
        return
    dma_resv.lock_interruptible(shmem.resv, None)
    try:
        pin_locked(shmem)
    finally:
        dma_resv.unlock(shmem.resv)


def unpin(shmem: DrmGemShmemObject) -> None:
    """Unpin without holding the reservation lock. Kernel: drm_gem_shmem_unpin()

    Locking: caller must not hold ``shmem.resv``.
    """
    if _dec_not_one(shmem, "pages_pin_count"):
        return
    dma_resv.lock(shmem.resv, None)
    try:
        unpin_locked(shmem)
    finally:
        dma_resv.unlock(shmem.resv)


# --- vmap -----------------------------------------------------------------------------------


def vmap_locked(shmem: DrmGemShmemObject) -> IosysMap:
    """Map the object into the CPU's address space; nested calls share one mapping.

    Kernel: drm_gem_shmem_vmap_locked() [drivers/gpu/drm/drm_gem_shmem_helper.c]
    Locking: caller holds ``shmem.resv`` (asserted).

    The first vmap pins the object. An imported object is mapped through its exporter's
    frames without counting (the kernel's dma_buf_vmap()).

    Raises:
        Einval, Enomem: as :func:`pin_locked`.
    """
    dma_resv.assert_held(shmem.resv)
    physmem = shmem.dev.allocator.physmem
    if shmem.import_attach is not None:
        return IosysMap(physmem, shmem.sgt.pfns)
    if _inc_not_zero(shmem, "vmap_use_count"):
        return shmem.vaddr
    pin_locked(shmem)
    shmem.vaddr = IosysMap(physmem, shmem.pages)
    shmem.vmap_use_count = 1
    return shmem.vaddr


def vunmap_locked(shmem: DrmGemShmemObject, vaddr: IosysMap) -> None:
    """Drop one vmap; the mapping (and the pin) go with the last one.

    Kernel: drm_gem_shmem_vunmap_locked() [drivers/gpu/drm/drm_gem_shmem_helper.c]
    Locking: caller holds ``shmem.resv`` (asserted).

    ``vaddr`` stays valid for the remaining users of a nested vmap: it is torn down only when
    ``vmap_use_count`` reaches 0.
    """
    dma_resv.assert_held(shmem.resv)
    if shmem.import_attach is not None:
        vaddr.pfns = None
        return
    warn_on(vaddr is not shmem.vaddr, "vunmap of %r, not the mapping of %r", vaddr, shmem)
    if _dec_and_test(shmem, "vmap_use_count"):
        shmem.vaddr.pfns = None
        shmem.vaddr = None
        unpin_locked(shmem)
        return
    mm = shmem.dev.shmem_mm
    if mm is not None and mm.vunmap_clears_vaddr:
        # gemu explore's vunmap-clears-vaddr mutant: drm_gem_shmem_vunmap_locked() between
        # e1fc39a92332 (vmap_use_count a refcount_t) and dd7177627618 "drm/shmem-helper: Fix
        # unsetting shmem vaddr while vmap refcount > 0" set shmem->vaddr = NULL after the
        # refcount block, on every call.
        shmem.vaddr = None


def vmap(shmem: DrmGemShmemObject) -> IosysMap:
    """Lock, :func:`vmap_locked`, unlock. Kernel: drm_gem_shmem_vmap() (KUnit-only in mainline)"""
    dma_resv.lock(shmem.resv, None)
    try:
        return vmap_locked(shmem)
    finally:
        dma_resv.unlock(shmem.resv)


def vunmap(shmem: DrmGemShmemObject, vaddr: IosysMap) -> None:
    """Lock, :func:`vunmap_locked`, unlock. Kernel: drm_gem_shmem_vunmap() (KUnit-only in mainline)"""
    dma_resv.lock(shmem.resv, None)
    try:
        vunmap_locked(shmem, vaddr)
    finally:
        dma_resv.unlock(shmem.resv)


# --- scatter-gather tables ------------------------------------------------------------------


def get_sg_table(shmem: DrmGemShmemObject) -> SgTable:
    """A new table of the object's current frames; neither cached nor counted.

    Kernel: drm_gem_shmem_get_sg_table() [drivers/gpu/drm/drm_gem_shmem_helper.c]

    Raises:
        Einval: the object is imported (warns).
        Enomem: the object has no pages (warns: the caller should have got or pinned them).
    """
    if warn_on(shmem.import_attach is not None, "get_sg_table of imported %r", shmem):
        raise Einval(msg="imported object")
    if warn_on(shmem.pages is None, "get_sg_table of %r without pages", shmem):
        raise Enomem(msg="object has no pages")
    # drm_prime_pages_to_sg(): kmalloc of the table and sg_alloc_table_from_pages_segment(),
    # both GFP_KERNEL; the model keeps no slab, the annotation is the allocation.
    lockdep.might_alloc(GFP_KERNEL)
    return SgTable(shmem.pages, shmem)


def get_pages_sgt_locked(shmem: DrmGemShmemObject) -> SgTable:
    """The cached table of the object's frames, built on first use.

    Kernel: drm_gem_shmem_get_pages_sgt_locked() (exported in v19, static in mainline)
    Locking: caller holds ``shmem.resv`` (asserted).

    v19: takes no page reference; the caller must already hold the pages (pinned, or got and
    swapped in under this lock). The table lives until the pages go (eviction, purge, last
    put) and is valid only while the frames cannot move.

    Mainline: the first call gets the pages and the table keeps that reference.

    Raises:
        Einval: imported object. Enomem: no pages (v19) or no frames (mainline).
    """
    dma_resv.assert_held(shmem.resv)
    if shmem.sgt is not None:
        return shmem.sgt
    if warn_on(shmem.import_attach is not None, "get_pages_sgt of imported %r", shmem):
        raise Einval(msg="imported object")
    if _v19(shmem):
        shmem.sgt = get_sg_table(shmem)
        return shmem.sgt
    get_pages_locked(shmem)
    try:
        shmem.sgt = get_sg_table(shmem)
    except KernelError:
        put_pages_locked(shmem)
        raise
    update_lru_locked(shmem)  # a table makes a purgeable object reclaimable (mainline rule)
    return shmem.sgt


def get_pages_sgt(shmem: DrmGemShmemObject) -> SgTable:
    """:func:`get_pages_sgt_locked` for callers that do not hold the reservation lock.

    Kernel: drm_gem_shmem_get_pages_sgt() [drivers/gpu/drm/drm_gem_shmem_helper.c]
    Locking: caller must not hold ``shmem.resv``; it is taken interruptibly.

    v19: the object must be pinned (or otherwise not reclaimable): a table of frames the
    shrinker may take away is refused. A cached table is returned without the lock.

    Raises:
        Ebusy: (v19) the object is evictable or purgeable (warns).
        Eintr: a signal arrived while waiting for the lock.
        Einval, Enomem: as :func:`get_pages_sgt_locked`.
    """
    if _v19(shmem):
        if warn_on(
            is_evictable(shmem) or is_purgeable(shmem),
            "get_pages_sgt of reclaimable %r: pin it first",
            shmem,
        ):
            raise Ebusy(msg="object is not pinned")
        sgt = shmem.sgt
        if sgt is not None:
            return sgt
    dma_resv.lock_interruptible(shmem.resv, None)
    try:
        return get_pages_sgt_locked(shmem)
    finally:
        dma_resv.unlock(shmem.resv)


# --- madvise, predicates, purge, evict, swap-in ---------------------------------------------


def madvise_locked(shmem: DrmGemShmemObject, madv: int) -> bool:
    """Record whether userspace needs the contents; return whether they still exist.

    Kernel: drm_gem_shmem_madvise_locked() [drivers/gpu/drm/drm_gem_shmem_helper.c]
    Locking: caller holds ``shmem.resv`` (asserted).

    A purged object (``madv < 0``) stays purged whatever is asked. The LRU placement follows
    the new state.
    """
    dma_resv.assert_held(shmem.resv)
    if shmem.madv >= 0:
        shmem.madv = madv
    mm = shmem.dev.shmem_mm
    if (
        mm is not None
        and mm.madvise_list_add
        and madv > 0
        and shmem.madv >= 0
        and shmem.import_attach is None
    ):
        # gemu explore's madvise-list-add mutant, panfrost_ioctl_madvise() before 9fc33eaaa979
        # "drm/panfrost: Fix shrinker list corruption by madvise IOCTL": list_add_tail() of a
        # node that may already be on the list (the fix made it list_move_tail()).
        with mm.lock:
            gem_lru.add_tail_locked(mm.lru_evictable, shmem)
        return shmem.madv >= 0
    update_lru_locked(shmem)
    return shmem.madv >= 0


def madvise(shmem: DrmGemShmemObject, madv: int) -> bool:
    """:func:`madvise_locked` for an ioctl. Kernel: drm_gem_shmem_madvise() (v19)

    Raises:
        Eintr: a signal arrived while waiting for the lock.
    """
    dma_resv.lock_interruptible(shmem.resv, None)
    try:
        return madvise_locked(shmem, madv)
    finally:
        dma_resv.unlock(shmem.resv)


def is_purgeable(shmem: DrmGemShmemObject) -> bool:
    """Whether the shrinker may drop the contents.

    Kernel: drm_gem_shmem_is_purgeable() [include/drm/drm_gem_shmem_helper.h]

    v19: ``madv > 0``, the driver can evict, pages are held, not pinned, not shared through
    dma-buf. An evicted object stays purgeable (its swap is dropped). Mainline: ``madv > 0``,
    not pinned, has an sgt, not shared.
    """
    if shmem.madv <= 0 or shmem.pages_pin_count or shmem.dma_buf is not None:
        return False
    if shmem.import_attach is not None:
        return False
    if _v19(shmem):
        return shmem.funcs.evict is not None and shmem.pages_use_count > 0
    return shmem.sgt is not None


def is_evictable(shmem: DrmGemShmemObject) -> bool:
    """Whether the shrinker may write the pages to swap.

    Kernel: drm_gem_shmem_is_evictable() (v19)

    ``madv >= 0``, the driver can evict, pages are held and not pinned, not evicted already,
    not shared through dma-buf. Mainline has no eviction: always False there.
    """
    return (
        _v19(shmem)
        and shmem.madv >= 0
        and shmem.funcs.evict is not None
        and shmem.pages_use_count > 0
        and shmem.pages_pin_count == 0
        and not shmem.evicted
        and shmem.dma_buf is None
        and shmem.import_attach is None
    )


def purge_locked(shmem: DrmGemShmemObject) -> None:
    """Drop the contents for good: frames and swap given back, ``madv`` = -1.

    Kernel: drm_gem_shmem_purge_locked() [drivers/gpu/drm/drm_gem_shmem_helper.c]
    Locking: caller holds ``shmem.resv`` (asserted).

    Warns (and purges anyway) if the object is not purgeable. v19: ``pages_use_count`` is left
    alone (its holders now hold a purged object; getting pages fails with Enomem). Mainline:
    the sgt and the one page reference it holds are dropped. CPU mappings are zapped; their
    next access gets :class:`SigBus`; v19 skips the zap for an evicted object (its eviction
    zapped them and a fault since would have swapped it in), as its
    drm_gem_shmem_shrinker_put_pages_locked() returns early for one. Both free the fake mmap
    offset (drm_gem_free_mmap_offset()): a new :func:`gem.mmap` of the object fails with
    Einval, mappings made before stay and SIGBUS.
    """
    dma_resv.assert_held(shmem.resv)
    warn_on(not is_purgeable(shmem), "purging %r which is not purgeable", shmem)
    if _v19(shmem):
        if not shmem.evicted:  # drm_gem_shmem_shrinker_put_pages_locked()
            _free_pages(shmem, "drm_gem_shmem_purge_locked")
            _zap_vmas(shmem)
    else:
        _zap_vmas(shmem)
        if shmem.sgt is not None:
            shmem.sgt = None
            put_pages_locked(shmem)
        # the file is truncated below: no page may outlive it
        _free_pages(shmem, "drm_gem_shmem_purge_locked")
    gem.free_mmap_offset(shmem)
    shmem.filp.truncate()
    shmem.madv = -1
    shmem.evicted = False
    update_lru_locked(shmem)
    if trace.enabled:
        trace.instant("gem", "purge", obj=_label(shmem), pages=shmem.size >> PAGE_SHIFT)


def purge(shmem: DrmGemShmemObject) -> None:
    """Lock, :func:`purge_locked`, unlock. Kernel: drm_gem_shmem_purge() (KUnit-only in mainline)"""
    dma_resv.lock(shmem.resv, None)
    try:
        purge_locked(shmem)
    finally:
        dma_resv.unlock(shmem.resv)


def evict_locked(shmem: DrmGemShmemObject) -> None:
    """Write the pages to swap and give their frames back; the contents survive.

    Kernel: drm_gem_shmem_evict_locked() (v19)
    Locking: caller holds ``shmem.resv`` (asserted).

    The sgt is dropped and CPU mappings are zapped, ``pages`` becomes None and ``evicted``
    true; ``pages_use_count`` does not change. A driver must have removed every other mapping
    of the frames (GPU page tables, TLBs) *before* calling this: the frames are freed here.

    Raises:
        Ebusy: the object is not evictable (warns).
        Enospc, Eio: writing to swap failed; the object is unchanged and still resident.
    """
    dma_resv.assert_held(shmem.resv)
    if warn_on(not is_evictable(shmem), "evicting %r which is not evictable", shmem):
        raise Ebusy(msg="object is not evictable")
    _zap_vmas(shmem)
    shmem.filp.writeout()
    _free_pages(shmem, "drm_gem_shmem_evict_locked")
    shmem.evicted = True
    update_lru_locked(shmem)
    if trace.enabled:
        trace.instant("gem", "evict", obj=_label(shmem), pages=shmem.size >> PAGE_SHIFT)


def swapin_locked(shmem: DrmGemShmemObject) -> None:
    """Bring an evicted object's contents back into (usually different) frames.

    Kernel: drm_gem_shmem_swapin_locked() (v19)
    Locking: caller holds ``shmem.resv`` (asserted).

    Also the "this object is being used" signal for the LRU: an object that is not evicted
    moves to the tail of its LRU, so a busy object drifts away from the shrinker's end. The
    sgt is *not* rebuilt: call :func:`get_pages_sgt_locked` for the new frames.

    Raises:
        Enomem: no frames for the pages (the object stays evicted).
        Eio: reading from swap failed.
    """
    dma_resv.assert_held(shmem.resv)
    if not shmem.evicted:
        update_lru_locked(shmem)
        return
    if trace.enabled:
        trace.begin("gem", "swapin", id(shmem), obj=_label(shmem), pages=shmem.size >> PAGE_SHIFT)
    try:
        _acquire_pages(shmem)
    finally:
        if trace.enabled:
            trace.end("gem", "swapin", id(shmem), ok=shmem.pages is not None)
    shmem.evicted = False
    mm = shmem.dev.shmem_mm
    if mm is not None:
        mm.stats.swapped_in += 1
    update_lru_locked(shmem)


def _label(shmem: DrmGemShmemObject) -> str:
    return shmem.resv.lock.name if shmem.resv is not None else "?"


def update_lru_locked(shmem: DrmGemShmemObject) -> None:
    """Put the object on the LRU its state calls for; the first matching rule wins:

    1. purged (``madv < 0``): on no LRU;
    2. evictable or purgeable: tail (most recent end) of ``lru_evictable``;
    3. evicted: ``lru_evicted``;
    4. no pages: on no LRU;
    5. otherwise (pinned, or held but not reclaimable): ``lru_pinned``.

    Kernel: drm_gem_shmem_shrinker_update_lru_locked() (v19)
    Locking: caller holds ``shmem.resv`` (asserted); takes the shrinker's LRU lock.

    Nothing happens before the device's shrinker is set up, or for an imported object.
    Drivers call it to mark an object as recently used.
    """
    dma_resv.assert_held(shmem.resv)
    mm = shmem.dev.shmem_mm
    if mm is None or shmem.import_attach is not None:
        return
    with mm.lock:
        if shmem.madv < 0:
            gem_lru.remove_locked(shmem)
        elif is_evictable(shmem) or is_purgeable(shmem):
            gem_lru.move_tail_locked(mm.lru_evictable, shmem)
        elif shmem.evicted:
            gem_lru.move_tail_locked(mm.lru_evicted, shmem)
        elif shmem.pages is None:
            gem_lru.remove_locked(shmem)
        else:
            gem_lru.move_tail_locked(mm.lru_pinned, shmem)


# --- CPU mappings ---------------------------------------------------------------------------


class ShmemVma:
    """A userspace mapping of an object. Kernel: struct vm_area_struct (VM_PFNMAP)

    It holds one GEM reference and one use reference on the pages. ``ptes`` maps page index
    to the frame inserted by the last fault; eviction and purge clear it, so the next access
    faults again (and, after an eviction, swaps the object back in).
    """

    __slots__ = ("obj", "ptes")

    def __init__(self, obj: DrmGemShmemObject) -> None:
        self.obj: DrmGemShmemObject | None = obj
        self.ptes: dict[int, int] = {}

    def __repr__(self) -> str:
        return f"<ShmemVma of {self.obj!r} {len(self.ptes)} ptes>"

    def _frame(self, page: int) -> int:
        pfn = self.ptes.get(page)
        if pfn is None:
            pfn = fault(self.obj, page << PAGE_SHIFT)
            self.ptes[page] = pfn
        return pfn

    def _access(self, offset: int, n: int) -> Iterable[tuple[int, int, int]]:
        if self.obj is None:
            raise SigBus("access to a closed mapping")
        while n > 0:
            page, off = divmod(offset, PAGE_SIZE)
            step = min(n, PAGE_SIZE - off)
            yield self._frame(page), off, step
            offset += step
            n -= step

    def read(self, offset: int, n: int) -> bytes:
        """A CPU load of ``n`` bytes at ``offset``; faults in missing pages.

        Raises:
            SigBus: the offset is past the object, or its contents were purged.
            Enomem: swapping in failed (VM_FAULT_OOM).
        """
        physmem = self.obj.dev.allocator.physmem if self.obj is not None else None
        return b"".join(
            physmem.read((pfn << PAGE_SHIFT) + off, step)
            for pfn, off, step in self._access(offset, n)
        )

    def write(self, offset: int, data: bytes) -> None:
        """A CPU store of ``data`` at ``offset``; faults in missing pages.

        Raises:
            SigBus, Enomem: as :meth:`read`.
        """
        physmem = self.obj.dev.allocator.physmem if self.obj is not None else None
        data = memoryview(data)
        pos = 0
        for pfn, off, step in self._access(offset, len(data)):
            physmem.write((pfn << PAGE_SHIFT) + off, data[pos : pos + step])
            pos += step


def mmap(shmem: DrmGemShmemObject, shared: bool = True) -> ShmemVma:
    """Map the object into userspace; the mapping holds a GEM and a page reference.

    Kernel: drm_gem_shmem_mmap() with drm_gem_mmap_obj() [drivers/gpu/drm/]

    Raises:
        Einval: a private (copy-on-write) mapping was asked for.
        Enodev: the object is imported (mapping through the exporter is not modelled).
        Enomem: as :func:`get_pages_locked`.
    """
    if shmem.import_attach is not None:
        raise Enodev(msg="mmap of an imported object")
    if not shared:
        raise Einval(msg="copy-on-write mapping of a GEM object")
    gem.get(shmem)
    try:
        dma_resv.lock(shmem.resv, None)
        try:
            get_pages_locked(shmem)
        finally:
            dma_resv.unlock(shmem.resv)
    except BaseException:
        gem.put(shmem)
        mm = shmem.dev.shmem_mm
        if mm is not None and mm.mmap_errant_put:
            # gemu explore's mmap-errant-put mutant: drm_gem_shmem_mmap() before 24013314be6e
            # "drm/shmem-helper: Remove errant put in error path" called drm_gem_vm_close()
            # (a drm_gem_object_put()) when getting the pages failed, a reference the mmap
            # core owns and drops itself.
            gem.put(shmem)
        raise
    vma = ShmemVma(shmem)
    with _atomic:
        if shmem.vmas is None:
            shmem.vmas = []
        shmem.vmas.append(vma)
    return vma


def vm_open(vma: ShmemVma) -> ShmemVma:
    """A copy of the mapping (fork); it takes its own references.

    Kernel: drm_gem_shmem_vm_open() [drivers/gpu/drm/drm_gem_shmem_helper.c]
    """
    shmem = vma.obj
    gem.get(shmem)
    dma_resv.lock(shmem.resv, None)
    try:
        warn_on(
            not _inc_not_zero(shmem, "pages_use_count"),
            "vm_open of %r whose pages have no users",
            shmem,
        )
        if _v19(shmem):
            update_lru_locked(shmem)
    finally:
        dma_resv.unlock(shmem.resv)
    copy = ShmemVma(shmem)
    with _atomic:
        shmem.vmas.append(copy)
    return copy


def vm_close(vma: ShmemVma) -> None:
    """Unmap: drop the mapping's page and GEM references.

    Kernel: drm_gem_shmem_vm_close() + drm_gem_vm_close() [drivers/gpu/drm/]
    """
    shmem = vma.obj
    if warn_on(shmem is None, "vm_close of a closed mapping"):
        return
    with _atomic:
        shmem.vmas.remove(vma)
        if not shmem.vmas:
            shmem.vmas = None
    vma.obj = None
    vma.ptes.clear()
    dma_resv.lock(shmem.resv, None)
    try:
        put_pages_locked(shmem)
    finally:
        dma_resv.unlock(shmem.resv)
    gem.put(shmem)


def fault(shmem: DrmGemShmemObject, offset: int) -> int:
    """Resolve a CPU access at byte ``offset``: return the frame to map.

    Kernel: drm_gem_shmem_fault() [drivers/gpu/drm/drm_gem_shmem_helper.c]
    Locking: takes ``shmem.resv`` (uninterruptibly).

    v19 swaps an evicted object in first. The model checks a purged object before the "no
    pages" warning, since a purged object legitimately has none.

    Raises:
        Enomem: swap-in failed (VM_FAULT_OOM).
        SigBus: ``offset`` is outside the object, the object was purged, or (with a warning)
            it has no pages.
    """
    dma_resv.lock(shmem.resv, None)
    try:
        if _v19(shmem):
            try:
                swapin_locked(shmem)
            except KernelError as err:
                raise Enomem(msg=f"VM_FAULT_OOM: swap-in of {shmem!r} failed: {err}") from err
        if offset < 0 or offset >= shmem.size:
            raise SigBus(f"offset {offset} outside {shmem!r}")
        if shmem.madv < 0:
            raise SigBus(f"{shmem!r} was purged")
        if warn_on(shmem.pages is None, "fault on %r without pages", shmem):
            raise SigBus(f"{shmem!r} has no pages")
        return shmem.pages[offset >> PAGE_SHIFT]
    finally:
        dma_resv.unlock(shmem.resv)


# --- debug ----------------------------------------------------------------------------------


def print_info(shmem: DrmGemShmemObject, out: list[str], indent: int = 0) -> None:
    """Append the object's counters to a debug dump. Kernel: drm_gem_shmem_print_info()"""
    if shmem.import_attach is not None:
        return
    pad = " " * indent
    out.append(f"{pad}pages_pin_count={shmem.pages_pin_count}")
    out.append(f"{pad}pages_use_count={shmem.pages_use_count}")
    out.append(f"{pad}vmap_use_count={shmem.vmap_use_count}")
    out.append(f"{pad}vaddr={'mapped' if shmem.vaddr is not None else 'none'}")
    out.append(f"{pad}madv={shmem.madv}")
    out.append(f"{pad}evicted={int(shmem.evicted)}")
