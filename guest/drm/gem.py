"""DOC: GEM, the driver-neutral buffer object, its handles and the eviction entry point.

A :class:`DrmGemObject` is a buffer of ``size`` bytes (a whole number of pages) owned by a
:class:`DrmDevice`. Its lifetime is a reference count: :func:`get` and :func:`put`, the last
``put`` calling ``funcs.free``. Userspace names objects through per-file handles
(:class:`DrmFile`); a handle holds one reference. Every object carries its own reservation
object ``resv`` (a :class:`~gemu.guest.dma_buf.dma_resv.DmaResv`): its lock serialises every
change of the object's backing storage and its fences say which GPU work still uses it.

The memory manager reclaims an object through :func:`evict_locked`: with the reservation lock
held it refuses (``Ebusy``) while a fence of the device's *idle usage* is unsignalled, and
otherwise calls the driver's ``funcs.evict``. The idle usage is READ by default, as in the
kernel; a driver whose page-table updates or preemption fences sit at BOOKKEEP chooses
BOOKKEEP so that those fences also keep the object resident::

    dev = gem.DrmDevice(allocator, swap, idle_usage=DmaResvUsage.BOOKKEEP)
    obj = gem_shmem.create(dev, 8192)            # one reference, owned by the caller
    handle = gem.handle_create(file, obj)        # the handle takes its own reference
    gem.put(obj)                                 # now the handle keeps it alive
    dma_resv.lock(obj.resv, None)
    try:
        gem.evict_locked(obj)                    # Ebusy while BOOKKEEP fences are pending
    finally:
        dma_resv.unlock(obj.resv)
    gem.handle_delete(file, handle)              # last reference: funcs.free runs

``DrmDevice.semantics`` picks between the two versions of the shmem helper the model knows:
``"v19"`` (default: the shrinker-enabled helper of the v19 series) and ``"mainline"`` (the
helper as merged in Linux 6.16+). ``docs/shmem.md`` lists what differs.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from gemu.guest.dma_buf import dma_resv
from gemu.guest.dma_buf.dma_resv import DmaResv, DmaResvUsage
from gemu.guest.errors import Ebusy, Einval, warn_on
from gemu.guest.mm.shmem import ShmemFile

if TYPE_CHECKING:
    from gemu.guest.drm.gem_lru import DrmGemLru

__all__ = [
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "SEMANTICS",
    "DrmDevice",
    "DrmFile",
    "DrmGemObject",
    "DrmGemObjectFuncs",
    "Idr",
    "RareField",
    "VmaOffsetManager",
    "create_mmap_offset",
    "evict_locked",
    "free_mmap_offset",
    "get",
    "get_unless_zero",
    "handle_create",
    "handle_delete",
    "mmap",
    "mmap_offset",
    "object_lookup",
    "put",
]

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
SEMANTICS = ("v19", "mainline")
"""The shmem-helper versions :attr:`DrmDevice.semantics` may name."""
DRM_FILE_PAGE_OFFSET_START = (0xFFFFFFFF >> PAGE_SHIFT) + 1
"""First page of the fake mmap offsets (64-bit kernels). Kernel: DRM_FILE_PAGE_OFFSET_START"""

# Reference counts are atomics in the kernel; one process-wide lock plays that role here, so
# that an object needs no lock of its own (100k objects must stay small).
_atomic = threading.Lock()
_serial = itertools.count(1)


def page_align(size: int) -> int:
    """Round ``size`` up to whole pages. Kernel: PAGE_ALIGN()

    A size that is whole pages already comes back as the same int object: objects of one
    size then share it instead of holding a copy each (an int above 256 costs 32 bytes).
    """
    if not size & (PAGE_SIZE - 1):
        return size
    return (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


class RareField:
    """A field of a slotted object that few objects ever set, kept out of its slots.

    A machine may hold 100k small objects, and most never get a CPU mapping, a vmap, an
    export or an import: the fields serving those live in the object's ``_rare`` dict, made
    on the first write of a value other than the field's default and dropped again once
    every rare field is back at its default. Reading a field that was never set gives the
    default. Declared in the class body (``vaddr = RareField()``) of a class with a
    ``_rare`` slot set to None by its ``__init__``.
    """

    __slots__ = ("default", "name")

    def __init__(self, default: Any = None) -> None:
        self.default = default
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        rare = obj._rare
        return self.default if rare is None else rare.get(self.name, self.default)

    def __set__(self, obj: Any, value: Any) -> None:
        rare = obj._rare
        default = self.default
        if value is default or (type(value) is type(default) and value == default):
            if rare is not None:
                rare.pop(self.name, None)
                if not rare:
                    obj._rare = None
            return
        if rare is None:
            obj._rare = rare = {}
        rare[self.name] = value


class VmaOffsetManager:
    """The fake mmap offsets of a device's objects, in pages, each naming its object.

    Kernel: struct drm_vma_offset_manager [drivers/gpu/drm/drm_vma_manager.c]

    The entries are two lists sorted by offset, searched by bisection: two pointers an
    object, where a dict costs an entry and its share of the table (about 50 bytes an object
    at 100k objects). Offsets are handed out in increasing order, so an entry is appended; a
    removed one leaves a hole (object None) until holes are half the entries and the lists
    are compacted. Reads as a dict of the live entries: ``get``, ``in``, ``len``, iteration
    over the offsets in increasing order. The caller serialises calls (the kernel's
    ``vm_lock``; gem's ``_atomic`` here).
    """

    __slots__ = ("_holes", "_objs", "_offsets")

    def __init__(self) -> None:
        self._offsets: list[int] = []
        self._objs: list[DrmGemObject | None] = []
        self._holes = 0

    def add(self, offset: int, obj: DrmGemObject) -> None:
        """Name ``obj`` by ``offset``, which no live entry has. Kernel: drm_vma_offset_add()"""
        offsets = self._offsets
        if not offsets or offsets[-1] < offset:
            offsets.append(offset)
            self._objs.append(obj)
            return
        i = bisect.bisect_left(offsets, offset)
        if offsets[i] == offset:  # a hole of a removed entry
            self._holes -= self._objs[i] is None
            self._objs[i] = obj
        else:
            offsets.insert(i, offset)
            self._objs.insert(i, obj)

    def _index(self, offset: int) -> int:
        offsets = self._offsets
        i = bisect.bisect_left(offsets, offset)
        return i if i < len(offsets) and offsets[i] == offset else -1

    def get(self, offset: int, default: Any = None) -> Any:
        """The object at exactly ``offset``. Kernel: drm_vma_offset_exact_lookup_locked()"""
        i = self._index(offset)
        obj = self._objs[i] if i >= 0 else None
        return default if obj is None else obj

    def remove(self, offset: int) -> DrmGemObject | None:
        """Forget ``offset``; return its object (None: there was none). Kernel:
        drm_vma_offset_remove()"""
        i = self._index(offset)
        obj = self._objs[i] if i >= 0 else None
        if obj is not None:
            self._objs[i] = None
            self._holes += 1
            if self._holes * 2 > len(self._objs):
                pairs = zip(self._offsets, self._objs, strict=True)
                live = [(o, x) for o, x in pairs if x is not None]
                self._offsets = [o for o, _ in live]
                self._objs = [x for _, x in live]
                self._holes = 0
        return obj

    def __contains__(self, offset: object) -> bool:
        return isinstance(offset, int) and self.get(offset) is not None

    def __iter__(self) -> Iterator[int]:
        return (o for o, x in zip(self._offsets, self._objs, strict=True) if x is not None)

    def __len__(self) -> int:
        return len(self._objs) - self._holes

    def __repr__(self) -> str:
        return f"<VmaOffsetManager {len(self)} offsets>"


class DrmDevice:
    """The GEM-relevant part of a DRM device. Kernel: struct drm_device [include/drm/drm_device.h]

    ``allocator`` hands out the frames of guest RAM, ``swap`` takes evicted pages.
    ``shmem_mm`` is the shmem helper's shrinker state (the kernel's ``dev->shmem_mm``), None
    until :func:`gemu.guest.drm.gem_shmem_shrinker.drmm_gem_shmem_init` runs; without it no
    object is ever placed on an LRU or reclaimed. ``idle_usage`` is the dma_resv usage up to
    which fences must have signalled before :func:`evict_locked` lets an object go.
    ``leaked`` keeps the objects a v19 free refused to release (their counters were not zero),
    so a test can find them; ``object_count`` is the number of live objects.
    ``vma_offset_manager`` (a :class:`VmaOffsetManager`) maps each fake mmap offset (in
    pages) to its object (the kernel's ``dev->vma_offset_manager``); offsets are handed out in increasing order from
    :data:`DRM_FILE_PAGE_OFFSET_START` and never reused, where the kernel's drm_mm may reuse a
    freed range.
    """

    __slots__ = (
        "_next_offset",
        "allocator",
        "idle_usage",
        "leaked",
        "object_count",
        "semantics",
        "shmem_mm",
        "swap",
        "unique",
        "vma_offset_manager",
    )

    def __init__(
        self,
        allocator: Any,
        swap: Any = None,
        *,
        semantics: str = "v19",
        idle_usage: DmaResvUsage = DmaResvUsage.READ,
        unique: str = "gemu",
    ) -> None:
        if semantics not in SEMANTICS:
            raise ValueError(f"semantics must be one of {SEMANTICS}, not {semantics!r}")
        self.allocator = allocator
        self.swap = swap
        self.semantics = semantics
        self.idle_usage = DmaResvUsage(idle_usage)
        self.unique = unique
        self.shmem_mm: Any = None
        self.object_count = 0
        self.leaked: list[DrmGemObject] = []
        self.vma_offset_manager = VmaOffsetManager()
        self._next_offset = DRM_FILE_PAGE_OFFSET_START

    @property
    def v19(self) -> bool:
        """Whether the device models the v19 shrinker-enabled helper."""
        return self.semantics == "v19"

    def __repr__(self) -> str:
        return f"<DrmDevice {self.unique} {self.semantics} objects={self.object_count}>"


class DrmGemObjectFuncs:
    """Per-driver object callbacks; each is optional. Kernel: struct drm_gem_object_funcs

    ``free(obj)`` releases the object when its last reference goes. ``evict(obj)`` gives the
    object's pages back to the system; it runs with the reservation lock held, raises a
    :class:`~gemu.guest.errors.KernelError` on failure, and must take the object off every LRU
    it frees (``drm_gem_lru_scan`` checks that). ``print_info(obj, out)`` adds lines to a debug
    dump. ``mmap(obj)`` maps the object for userspace once :func:`mmap` found it by its fake
    offset, and returns the mapping. One instance is shared by every object of a driver.
    """

    __slots__ = ("evict", "free", "mmap", "print_info")

    def __init__(
        self,
        *,
        free: Callable[[DrmGemObject], None] | None = None,
        evict: Callable[[DrmGemObject], None] | None = None,
        print_info: Callable[[DrmGemObject, list[str]], None] | None = None,
        mmap: Callable[[DrmGemObject], Any] | None = None,
    ) -> None:
        self.free = free
        self.evict = evict
        self.print_info = print_info
        self.mmap = mmap

    def replace(self, **changes: Any) -> DrmGemObjectFuncs:
        """A copy with some callbacks changed (a driver wrapping the helper's defaults)."""
        fields = {name: getattr(self, name) for name in self.__slots__}
        fields.update(changes)
        return DrmGemObjectFuncs(**fields)


class DrmGemObject:
    """A GEM buffer object. Kernel: struct drm_gem_object [include/drm/drm_gem.h]

    Invariants: ``size`` is a positive multiple of :data:`PAGE_SIZE` and never changes;
    ``refcount`` > 0 while anyone may use the object (it is freed when it drops to 0);
    ``handle_count`` counts the handles naming it, each also holding one reference; ``lru`` is
    the :class:`~gemu.guest.drm.gem_lru.DrmGemLru` the object is on (None when on none) and
    changes only under that LRU's lock, with ``lru_prev``/``lru_next`` its links there (the
    kernel's ``lru_node``). ``filp`` is the shmem file backing the object (None for a private
    object, e.g. an import). ``dma_buf`` is set while the object is exported and
    ``import_attach`` when it was imported; the shrinker leaves both kinds alone (both are
    rare fields, :class:`RareField`: most objects are neither). ``vma_node`` is the object's
    fake mmap offset in pages (the kernel's ``vma_node``), 0 while it has none. Global (flink)
    names are not modelled.
    """

    __slots__ = (
        "__weakref__",
        "_rare",
        "dev",
        "filp",
        "funcs",
        "handle_count",
        "lru",
        "lru_next",
        "lru_prev",
        "refcount",
        "resv",
        "size",
        "vma_node",
    )

    dma_buf: Any = RareField()
    import_attach: Any = RareField()

    def __init__(self) -> None:
        self._rare: dict[str, Any] | None = None
        self.dev: DrmDevice | None = None
        self.size = 0
        self.refcount = 0
        self.handle_count = 0
        self.funcs: DrmGemObjectFuncs | None = None
        self.resv: DmaResv | None = None
        self.filp: Any = None
        self.lru: DrmGemLru | None = None
        self.lru_prev: DrmGemObject | None = None
        self.lru_next: DrmGemObject | None = None
        self.vma_node = 0

    @property
    def base(self) -> DrmGemObject:
        """The object itself, so helper code reads like the kernel's ``shmem->base``."""
        return self

    @property
    def npages(self) -> int:
        """Size in pages (the kernel's ``obj->size >> PAGE_SHIFT``)."""
        return self.size >> PAGE_SHIFT

    def __repr__(self) -> str:
        label = self.resv.lock.name if self.resv is not None else "uninit"
        return f"<{type(self).__name__} {label} size={self.size} ref={self.refcount}>"


def private_object_init(dev: DrmDevice, obj: DrmGemObject, size: int) -> None:
    """Initialise an object that has no shmem file (an import or a driver-private buffer).

    Kernel: drm_gem_private_object_init() [drivers/gpu/drm/drm_gem.c]

    Raises:
        Einval: ``size`` is not a positive multiple of the page size.
    """
    if warn_on(size <= 0 or size % PAGE_SIZE, f"GEM object size {size} is not whole pages"):
        raise Einval(msg=f"object size {size}")
    obj.dev = dev
    obj.size = size
    obj.refcount = 1
    obj.handle_count = 0
    obj.resv = dma_resv.init(name=f"bo{next(_serial)}")
    obj.filp = None
    obj.lru = None
    with _atomic:
        dev.object_count += 1


def object_init(dev: DrmDevice, obj: DrmGemObject, size: int) -> None:
    """Initialise an object backed by a new shmem file of ``size`` bytes.

    Kernel: drm_gem_object_init() [drivers/gpu/drm/drm_gem.c]
    """
    private_object_init(dev, obj, size)
    obj.filp = ShmemFile(dev.allocator, dev.swap, size, name=obj.resv.lock.name)


def object_release(obj: DrmGemObject) -> None:
    """Release what :func:`object_init` set up: LRU membership, the shmem file, the resv.

    Kernel: drm_gem_object_release() [drivers/gpu/drm/drm_gem.c]

    Releasing the shmem file gives back every frame and swap slot it still holds.
    """
    from gemu.guest.drm import gem_lru  # gem_lru builds on this module

    gem_lru.remove(obj)
    free_mmap_offset(obj)
    if obj.filp is not None:
        obj.filp.release()
        obj.filp = None
    dma_resv.fini(obj.resv)
    with _atomic:
        obj.dev.object_count -= 1


def get(obj: DrmGemObject) -> DrmGemObject:
    """Take a reference. Kernel: drm_gem_object_get() [include/drm/drm_gem.h]"""
    with _atomic:
        bad = obj.refcount <= 0
        if not bad:
            obj.refcount += 1
    if bad:  # the message (a repr) is made only when it is printed
        warn_on(bad, f"drm_gem_object_get on freed {obj!r}")
    return obj


def get_unless_zero(obj: DrmGemObject) -> bool:
    """Take a reference unless the object is already being freed.

    Kernel: kref_get_unless_zero(&obj->refcount) [include/linux/kref.h]
    """
    with _atomic:
        if obj.refcount == 0:
            return False
        obj.refcount += 1
        return True


def put(obj: DrmGemObject | None) -> None:
    """Drop a reference; the last one calls ``funcs.free``.

    Kernel: drm_gem_object_put() / drm_gem_object_free() [drivers/gpu/drm/drm_gem.c]
    """
    if obj is None:
        return
    with _atomic:
        bad = obj.refcount <= 0
        if not bad:
            obj.refcount -= 1
        last = not bad and obj.refcount == 0
    if bad and warn_on(bad, f"drm_gem_object_put: refcount underflow on {obj!r}"):
        return
    if last:
        free = obj.funcs.free if obj.funcs is not None else None
        if free is None and warn_on(True, f"{obj!r} has no free callback"):
            return
        free(obj)


def evict_locked(obj: DrmGemObject) -> None:
    """Reclaim the object's memory through the driver, if the GPU no longer uses it.

    Kernel: drm_gem_evict_locked() [drivers/gpu/drm/drm_gem.c] (``drm_gem_evict`` before v6.16)
    Locking: caller holds ``obj.resv`` (asserted).

    The object is idle when every fence up to the device's ``idle_usage`` has signalled (the
    kernel hard-codes READ; a device may choose BOOKKEEP). An object without an ``evict``
    callback is left alone and the call succeeds.

    Raises:
        Ebusy: a fence up to ``idle_usage`` has not signalled.
        KernelError: whatever ``funcs.evict`` raises.
    """
    dma_resv.assert_held(obj.resv)
    if not dma_resv.test_signaled(obj.resv, obj.dev.idle_usage):
        raise Ebusy(msg=f"{obj!r} has unsignalled fences up to {obj.dev.idle_usage.name}")
    evict = obj.funcs.evict if obj.funcs is not None else None
    if evict is not None:
        evict(obj)


# --- fake mmap offsets ----------------------------------------------------------------------


def create_mmap_offset(obj: DrmGemObject) -> int:
    """Give the object a fake mmap offset (if it has none); return it in bytes.

    Kernel: drm_gem_create_mmap_offset() [drivers/gpu/drm/drm_gem.c]
    """
    dev = obj.dev
    with _atomic:
        if not obj.vma_node:
            obj.vma_node = dev._next_offset
            dev._next_offset += obj.npages
            dev.vma_offset_manager.add(obj.vma_node, obj)
        return obj.vma_node << PAGE_SHIFT


def free_mmap_offset(obj: DrmGemObject) -> None:
    """Remove the object's fake mmap offset: a later mmap of it finds nothing. Mappings made
    before stay (their pages are zapped separately).

    Kernel: drm_gem_free_mmap_offset() [drivers/gpu/drm/drm_gem.c]
    """
    with _atomic:
        if obj.vma_node:
            obj.dev.vma_offset_manager.remove(obj.vma_node)
            obj.vma_node = 0


def mmap_offset(obj: DrmGemObject) -> int:
    """The object's fake mmap offset in bytes, 0 when it has none.

    Kernel: drm_vma_node_offset_addr() [include/drm/drm_vma_manager.h]
    """
    return obj.vma_node << PAGE_SHIFT


def mmap(dev: DrmDevice, offset: int) -> Any:
    """Map the object found at a fake mmap offset: what ``mmap(fd, offset)`` on a DRM file does.

    Kernel: drm_gem_mmap() [drivers/gpu/drm/drm_gem.c] (drm_vma_offset_exact_lookup_locked,
    kref_get_unless_zero, then the object's ``funcs.mmap``)

    Raises:
        Einval: no object has that offset (never had one, freed, or purged: a purge frees the
            offset), or the object cannot be mapped.
    """
    with _atomic:
        obj = dev.vma_offset_manager.get(offset >> PAGE_SHIFT) if offset % PAGE_SIZE == 0 else None
    if obj is None or not get_unless_zero(obj):
        raise Einval(msg=f"no GEM object at mmap offset {offset:#x}")
    try:
        mapper = obj.funcs.mmap if obj.funcs is not None else None
        if mapper is None:
            raise Einval(msg=f"{obj!r} cannot be mapped")
        return mapper(obj)
    finally:
        put(obj)


# --- handles ------------------------------------------------------------------------------


class Idr:
    """Small positive ids naming objects, the lowest free id handed out first.

    Kernel: struct idr with idr_alloc(idr, ptr, 1, 0, ...), idr_find() and idr_remove()
    [lib/idr.c]

    A list indexed by id (the kernel's radix tree is as dense for ids from 1 up): an entry
    costs one pointer, where a dict costs an entry and an int per id (a file may hold 100k
    handles). Iterating gives the live ids in increasing order; ``get``, ``len`` and
    ``in`` read as a dict's do.
    """

    __slots__ = ("_count", "_free", "_slots")

    def __init__(self) -> None:
        self._slots: list[Any] = [None]  # id 0 is never handed out
        self._free: list[int] = []  # heap of the free ids below len(_slots)
        self._count = 0

    def alloc(self, obj: Any) -> int:
        """Store ``obj`` under the lowest free id; return the id. Kernel: idr_alloc()"""
        if self._free:
            id_ = heapq.heappop(self._free)
            self._slots[id_] = obj
        else:
            id_ = len(self._slots)
            self._slots.append(obj)
        self._count += 1
        return id_

    def get(self, id_: int, default: Any = None) -> Any:
        """The object stored under ``id_``, or ``default``. Kernel: idr_find()"""
        if isinstance(id_, int) and 0 < id_ < len(self._slots):
            obj = self._slots[id_]
            if obj is not None:
                return obj
        return default

    def remove(self, id_: int) -> Any:
        """Free ``id_``; return what it named, or None when it named nothing. Kernel:
        idr_remove()"""
        obj = self.get(id_)
        if obj is not None:
            self._slots[id_] = None
            heapq.heappush(self._free, id_)
            self._count -= 1
        return obj

    def __contains__(self, id_: object) -> bool:
        return self.get(id_) is not None

    def __iter__(self) -> Iterator[int]:
        return (i for i, obj in enumerate(self._slots) if obj is not None)

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"<Idr {self._count} ids>"


class DrmFile:
    """An open DRM file: the handles its owner created. Kernel: struct drm_file

    Handles are small positive integers in ``object_idr`` (an :class:`Idr`); the lowest free
    one is handed out first, as ``idr_alloc(&file->object_idr, obj, 1, 0, ...)`` does. Each
    handle holds one object reference and one ``handle_count``.
    """

    __slots__ = ("dev", "object_idr", "table_lock")

    def __init__(self, dev: DrmDevice) -> None:
        self.dev = dev
        self.object_idr = Idr()
        self.table_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<DrmFile {len(self.object_idr)} handles>"


def handle_create(file: DrmFile, obj: DrmGemObject) -> int:
    """Name ``obj`` in ``file`` with a new handle, which takes its own reference.

    Kernel: drm_gem_handle_create() [drivers/gpu/drm/drm_gem.c]
    """
    get(obj)
    with _atomic:
        obj.handle_count += 1
    with file.table_lock:
        return file.object_idr.alloc(obj)


def object_lookup(file: DrmFile, handle: int) -> DrmGemObject | None:
    """The object named by ``handle`` with a new reference, or None.

    Kernel: drm_gem_object_lookup() [drivers/gpu/drm/drm_gem.c]
    """
    with file.table_lock:
        obj = file.object_idr.get(handle)
        if obj is not None:
            get(obj)
    return obj


def handle_delete(file: DrmFile, handle: int) -> None:
    """Remove ``handle`` and drop its reference.

    Kernel: drm_gem_handle_delete() [drivers/gpu/drm/drm_gem.c]

    Raises:
        Einval: no such handle.
    """
    with file.table_lock:
        obj = file.object_idr.remove(handle)
    if obj is None:
        raise Einval(msg=f"no GEM handle {handle}")
    with _atomic:
        obj.handle_count -= 1
    put(obj)


def release(file: DrmFile) -> None:
    """Drop every handle of a closing file. Kernel: drm_gem_release() [drivers/gpu/drm/drm_gem.c]"""
    for handle in sorted(file.object_idr):
        handle_delete(file, handle)
