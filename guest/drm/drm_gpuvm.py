"""DOC: drm_gpuvm, the GPU VA manager: mappings, per-VM-per-BO links, and the exec helpers.

A :class:`DrmGpuvm` tracks one GPU virtual address space: its mappings (:class:`DrmGpuva`,
kept in address order in an interval index, never overlapping), the GEM objects backing them
(one :class:`DrmGpuvmBo` per VM and object, on the object's gpuva list, holding the object's
mappings in this VM), and a reservation object of its own, ``r_obj``, whose ``resv`` every
VM-private object shares. An object whose ``resv`` differs from the VM's is *external*
(:func:`is_extobj`): it sits on the VM's ``extobj`` list so that :func:`exec_lock` can lock it,
and its eviction is tracked per VM on the ``evict`` list so that :func:`validate` can bring it
back before the next job runs.

A map or unmap request becomes a sequence of split/merge steps, computed by
:func:`sm_map`/:func:`sm_unmap` exactly as the kernel's ``__drm_gpuvm_sm_map()`` does and handed
to the driver's ``sm_step_map``/``sm_step_remap``/``sm_step_unmap`` callbacks (or returned as a
list by :func:`sm_map_ops_create`). The driver applies them with :func:`gpuva_map`,
:func:`gpuva_remap`, :func:`gpuva_unmap` and :func:`gpuva_link`/:func:`gpuva_unlink`::

    vm = drm_gpuvm.DrmGpuvm()
    r_obj = drm_gpuvm.resv_object_alloc(dev)
    drm_gpuvm.init(vm, "vm0", DRM_GPUVM_RESV_PROTECTED, dev, r_obj, 0, 1 << 32, 0, 0, ops)
    gem.put(r_obj)                                  # the VM holds its own reference

    dma_resv.lock(bo.resv, None)                    # the GEM's gpuva lock (its resv)
    vm_bo = drm_gpuvm.bo_obtain(vm, bo)
    drm_gpuvm.sm_map(vm, vm_bo, DrmGpuvmMapReq(0x10000, 0x4000, bo, 0))  # steps -> ops
    drm_gpuvm.bo_put(vm_bo)                         # the mappings keep it alive
    dma_resv.unlock(bo.resv)

    with DrmGpuvmExec(vm, DRM_EXEC_INTERRUPTIBLE_WAIT, num_fences=1) as vm_exec:
        drm_gpuvm.exec_lock(vm_exec)                # VM resv + every external object
        drm_gpuvm.validate(vm, vm_exec.exec)        # ops.vm_bo_validate for each evicted vm_bo
        ...                                         # arm the job
        drm_gpuvm.resv_add_fence(vm, vm_exec.exec, fence, BOOKKEEP, BOOKKEEP)
    # leaving the with-block is drm_gpuvm_exec_unlock()

Locking (kernel DOC "Locking"): the VA tree is the driver's to serialise. A GEM object's list
of vm_bos and each vm_bo's list of mappings are protected by the object's *gpuva lock*: its
``resv`` by default, the object's ``gpuva.lock`` mutex when the VM is
``DRM_GPUVM_IMMEDIATE_MODE``, or a lock named with :func:`gem_gpuva_set_lock`; lockdep checks
it in link/unlink, obtain/find and the last put. The ``extobj`` and ``evict`` lists are guarded
by spinlocks of their own, unless the VM is ``DRM_GPUVM_RESV_PROTECTED``: then the VM's resv
protects them, and every function touching them asserts it. ``vm_bo.evicted`` is protected by
the object's resv. docs/gpuvm.md lists what differs from the kernel and why.
"""

from __future__ import annotations

import bisect
import errno
import threading
import weakref
from collections.abc import Callable, Iterator
from enum import IntEnum, IntFlag
from typing import Any

from gemu.guest.dma_buf import dma_resv
from gemu.guest.dma_buf.dma_fence import DmaFence
from gemu.guest.dma_buf.dma_resv import DmaResv, DmaResvUsage
from gemu.guest.drm import drm_exec, gem
from gemu.guest.drm.drm_exec import DrmExec
from gemu.guest.drm.gem import DrmDevice, DrmGemObject
from gemu.guest.errors import Eexist, Einval, Enomem, KernelError, warn_on
from gemu.guest.kernel import runtime
from gemu.guest.locking import lockdep
from gemu.guest.locking.lockdep import LockClass
from gemu.guest.locking.mutex import Mutex
from gemu.guest.mm.gfp import GFP_KERNEL

__all__ = [
    "DRM_GPUVA_INVALIDATED",
    "DRM_GPUVA_SPARSE",
    "DRM_GPUVM_IMMEDIATE_MODE",
    "DRM_GPUVM_RESV_PROTECTED",
    "DrmGpuva",
    "DrmGpuvaFlags",
    "DrmGpuvaOp",
    "DrmGpuvaOpMap",
    "DrmGpuvaOpRemap",
    "DrmGpuvaOpType",
    "DrmGpuvaOpUnmap",
    "DrmGpuvaOps",
    "DrmGpuvm",
    "DrmGpuvmBo",
    "DrmGpuvmExec",
    "DrmGpuvmFlags",
    "DrmGpuvmMapReq",
    "DrmGpuvmOps",
]

U64_MAX = (1 << 64) - 1

EXTOBJ_LOCK_CLASS = LockClass("&gpuvm->extobj.lock")
"""Every VM's extobj spinlock (one ``spin_lock_init()`` call site, one class)."""
EVICT_LOCK_CLASS = LockClass("&gpuvm->evict.lock")
"""Every VM's evict spinlock."""
GEM_GPUVA_LOCK_CLASS = LockClass("&obj->gpuva.lock")
"""Every GEM object's gpuva mutex (``drm_gem_private_object_init()`` initialises them all)."""

#: Fault injection for the allocations drm_gpuvm makes (vm_bos, op lists, ops): called with a
#: label, returning True fails the allocation with -ENOMEM.
should_fail_alloc: Callable[[str], bool] | None = None

# kref counters are atomics in the kernel; one lock plays that role (no preemption inside).
_atomic = threading.Lock()


def _kref_get(obj: DrmGpuvm | DrmGpuvmBo, what: str) -> None:
    """kref_get() of ``obj.kref``: WARN (and leave it) if the object was already freed."""
    with _atomic:
        bad = obj.kref <= 0
        if not bad:
            obj.kref += 1
    warn_on(bad, f"{what} on freed {obj!r}")


def _kref_put(obj: DrmGpuvm | DrmGpuvmBo, what: str) -> bool:
    """kref_put() of ``obj.kref``; True when that was the last reference (underflow WARNs)."""
    with _atomic:
        bad = obj.kref <= 0
        if not bad:
            obj.kref -= 1
        last = not bad and obj.kref == 0
    return not warn_on(bad, f"{what}: refcount underflow on {obj!r}") and last


def _alloc(what: str) -> None:
    """A ``kzalloc(..., GFP_KERNEL)``: may enter reclaim, so lockdep checks the context."""
    lockdep.might_alloc(GFP_KERNEL)
    hook = should_fail_alloc
    if hook is not None and hook(what):
        raise Enomem(msg=f"drm_gpuvm: allocating {what}")


class DrmGpuvmFlags(IntFlag):
    """Kernel: enum drm_gpuvm_flags [include/drm/drm_gpuvm.h]"""

    RESV_PROTECTED = 1 << 0
    """The extobj and evict lists are protected by the VM's resv, not by spinlocks."""
    IMMEDIATE_MODE = 1 << 1
    """GEM gpuva lists are protected by each object's ``gpuva.lock`` mutex, not its resv, so
    that the VM can be changed from the fence signalling path."""
    USERBITS = 1 << 2


DRM_GPUVM_RESV_PROTECTED = DrmGpuvmFlags.RESV_PROTECTED
DRM_GPUVM_IMMEDIATE_MODE = DrmGpuvmFlags.IMMEDIATE_MODE


class DrmGpuvaFlags(IntFlag):
    """Kernel: enum drm_gpuva_flags [include/drm/drm_gpuvm.h]"""

    INVALIDATED = 1 << 0
    SPARSE = 1 << 1
    USERBITS = 1 << 2


DRM_GPUVA_INVALIDATED = DrmGpuvaFlags.INVALIDATED
DRM_GPUVA_SPARSE = DrmGpuvaFlags.SPARSE


class DrmGpuvaOpType(IntEnum):
    """Kernel: enum drm_gpuva_op_type [include/drm/drm_gpuvm.h]"""

    MAP = 0
    REMAP = 1
    UNMAP = 2
    PREFETCH = 3
    DRIVER = 4


DRM_GPUVA_OP_MAP = DrmGpuvaOpType.MAP
DRM_GPUVA_OP_REMAP = DrmGpuvaOpType.REMAP
DRM_GPUVA_OP_UNMAP = DrmGpuvaOpType.UNMAP
DRM_GPUVA_OP_PREFETCH = DrmGpuvaOpType.PREFETCH


# --- the objects ----------------------------------------------------------------------------


class _Va:
    """``va`` of a mapping or a map op: ``addr`` and ``range`` (in the VM's unit)."""

    __slots__ = ("addr", "range")

    def __init__(self, addr: int = 0, range: int = 0) -> None:
        self.addr = addr
        self.range = range

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Va) and (self.addr, self.range) == (other.addr, other.range)

    def __repr__(self) -> str:
        return f"[{self.addr:#x}, {self.addr + self.range:#x})"


class _Gem:
    """``gem`` of a mapping or a map op: the backing ``obj`` (None: sparse) and ``offset``."""

    __slots__ = ("obj", "offset")

    def __init__(self, obj: DrmGemObject | None = None, offset: int = 0) -> None:
        self.obj = obj
        self.offset = offset

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Gem) and self.obj is other.obj and self.offset == other.offset

    def __repr__(self) -> str:
        return f"{self.obj!r}@{self.offset:#x}"


class DrmGpuva:
    """One GPU VA mapping. Kernel: struct drm_gpuva [include/drm/drm_gpuvm.h]

    ``va.addr``/``va.range`` is the mapped interval, ``gem.obj``/``gem.offset`` what backs it
    (``gem.obj`` None is a sparse or NULL mapping). ``vm`` is set while it is inserted;
    ``vm_bo`` while it is linked. Drivers embed it (subclass it) to carry their own state.
    """

    __slots__ = ("__weakref__", "flags", "gem", "va", "vm", "vm_bo")

    def __init__(self) -> None:
        self.vm: DrmGpuvm | None = None
        self.vm_bo: DrmGpuvmBo | None = None
        self.flags = DrmGpuvaFlags(0)
        self.va = _Va()
        self.gem = _Gem()

    @property
    def last(self) -> int:
        """The last address covered. Kernel: GPUVA_LAST()"""
        return self.va.addr + self.va.range - 1

    def __repr__(self) -> str:
        return f"<DrmGpuva {self.va!r} {self.gem!r}>"


def gpuva_init(va: DrmGpuva, addr: int, range: int, obj: DrmGemObject | None, offset: int) -> None:
    """Kernel: drm_gpuva_init() [include/drm/drm_gpuvm.h]"""
    va.va.addr = addr
    va.va.range = range
    va.gem.obj = obj
    va.gem.offset = offset


def gpuva_invalidate(va: DrmGpuva, invalidate: bool) -> None:
    """Kernel: drm_gpuva_invalidate() [include/drm/drm_gpuvm.h]"""
    if invalidate:
        va.flags |= DrmGpuvaFlags.INVALIDATED
    else:
        va.flags &= ~DrmGpuvaFlags.INVALIDATED


def gpuva_invalidated(va: DrmGpuva) -> bool:
    """Kernel: drm_gpuva_invalidated() [include/drm/drm_gpuvm.h]"""
    return bool(va.flags & DrmGpuvaFlags.INVALIDATED)


class _GpuvaTree:
    """The VM's mappings in address order. Kernel: ``gpuvm->rb`` (an interval tree,
    ``drm_gpuva_it``, plus ``rb.list`` in address order).

    Mappings in one VM never overlap (:func:`gpuva_insert` refuses), so sorting them by start
    also sorts them by end, and a binary search answers every interval query the kernel's
    interval tree answers here, in O(log n).
    """

    __slots__ = ("starts", "vas")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.vas: list[DrmGpuva] = []

    def __len__(self) -> int:
        return len(self.vas)

    def iter_first(self, start: int, last: int) -> DrmGpuva | None:
        """The lowest mapping overlapping ``[start, last]``. Kernel: drm_gpuva_it_iter_first()"""
        i = bisect.bisect_right(self.starts, start) - 1
        if i < 0 or self.vas[i].last < start:
            i += 1
        if i < len(self.vas) and self.vas[i].va.addr <= last:
            return self.vas[i]
        return None

    def _index(self, va: DrmGpuva) -> int:
        i = bisect.bisect_left(self.starts, va.va.addr)
        if i < len(self.vas) and self.vas[i] is va:
            return i
        return -1

    def insert(self, va: DrmGpuva) -> None:
        i = bisect.bisect_left(self.starts, va.va.addr)
        self.starts.insert(i, va.va.addr)
        self.vas.insert(i, va)

    def remove(self, va: DrmGpuva) -> None:
        i = self._index(va)
        assert i >= 0, f"{va!r} is not in this tree"
        del self.starts[i]
        del self.vas[i]

    def next(self, va: DrmGpuva) -> DrmGpuva | None:
        """The mapping after ``va`` in address order. Kernel: __drm_gpuva_next()"""
        i = self._index(va)
        if i < 0 or i + 1 >= len(self.vas):
            return None
        return self.vas[i + 1]


class _VmBoList:
    """One of the VM's vm_bo lists (``extobj`` or ``evict``). Kernel: the anonymous struct of
    ``list``, ``local_list`` and ``lock`` in struct drm_gpuvm.

    ``list`` is ordered (a dict used as an ordered set). A vm_bo records which list its entry is
    on (the kernel's ``list.entry.<name>`` being non-empty): the VM's list, the local list of a
    running iteration, or none.
    """

    __slots__ = ("list", "local_list", "lock", "name")

    def __init__(self, name: str, vm_name: str, cls: LockClass) -> None:
        self.name = name
        self.list: dict[DrmGpuvmBo, None] = {}
        self.local_list: dict[DrmGpuvmBo, None] | None = None
        self.lock = _SpinLock(f"{vm_name}.{name}.lock", cls)

    def __contains__(self, vm_bo: DrmGpuvmBo) -> bool:
        return vm_bo in self.list

    def __len__(self) -> int:
        return len(self.list)

    def __iter__(self) -> Iterator[DrmGpuvmBo]:
        return iter(list(self.list))


class _SpinLock:
    """A spinlock: a lockdep-tracked lock that puts its holder in atomic context, so sleeping
    under it (a resv lock, ``drm_gpuvm_bo_put()``'s ``might_sleep()``) is reported.

    Kernel: spinlock_t (``gpuvm->extobj.lock``, ``gpuvm->evict.lock``)
    """

    __slots__ = ("mutex",)

    def __init__(self, name: str, cls: LockClass) -> None:
        self.mutex = Mutex(name, cls)

    def __enter__(self) -> _SpinLock:
        self.mutex.lock()
        runtime.current().atomic_depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        runtime.current().atomic_depth -= 1
        self.mutex.unlock()

    def assert_held(self) -> None:
        """Kernel: lockdep_assert_held(lock)"""
        self.mutex.assert_held()


class DrmGpuvmOps:
    """The driver's callbacks. Kernel: struct drm_gpuvm_ops [include/drm/drm_gpuvm.h]

    ``vm_free(vm)`` is mandatory (called at the last :func:`put`). ``vm_bo_alloc()`` /
    ``vm_bo_free(vm_bo)`` and ``op_alloc()`` / ``op_free(op)`` let a driver embed the structs.
    ``vm_bo_validate(vm_bo, exec)`` brings an evicted object back for :func:`validate` and
    clears ``vm_bo.evicted``. ``sm_step_map/remap/unmap(op, priv)`` receive the split/merge steps
    of :func:`sm_map`/:func:`sm_unmap`. A callback reports failure by raising a
    :class:`~gemu.guest.errors.KernelError` (the kernel's non-zero return), which stops the walk.
    """

    __slots__ = (
        "op_alloc",
        "op_free",
        "sm_step_map",
        "sm_step_remap",
        "sm_step_unmap",
        "vm_bo_alloc",
        "vm_bo_free",
        "vm_bo_validate",
        "vm_free",
    )

    def __init__(
        self,
        *,
        vm_free: Callable[[DrmGpuvm], None] | None = None,
        op_alloc: Callable[[], DrmGpuvaOp] | None = None,
        op_free: Callable[[DrmGpuvaOp], None] | None = None,
        vm_bo_alloc: Callable[[], DrmGpuvmBo] | None = None,
        vm_bo_free: Callable[[DrmGpuvmBo], None] | None = None,
        vm_bo_validate: Callable[[DrmGpuvmBo, DrmExec], None] | None = None,
        sm_step_map: Callable[[DrmGpuvaOp, Any], None] | None = None,
        sm_step_remap: Callable[[DrmGpuvaOp, Any], None] | None = None,
        sm_step_unmap: Callable[[DrmGpuvaOp, Any], None] | None = None,
    ) -> None:
        self.vm_free = vm_free
        self.op_alloc = op_alloc
        self.op_free = op_free
        self.vm_bo_alloc = vm_bo_alloc
        self.vm_bo_free = vm_bo_free
        self.vm_bo_validate = vm_bo_validate
        self.sm_step_map = sm_step_map
        self.sm_step_remap = sm_step_remap
        self.sm_step_unmap = sm_step_unmap


class DrmGpuvm:
    """A GPU VA space. Kernel: struct drm_gpuvm [include/drm/drm_gpuvm.h]

    Set up with :func:`init`. Invariants: ``rb`` holds non-overlapping mappings inside
    ``[mm_start, mm_start + mm_range)``, the kernel's reserved ``kernel_alloc_node`` among them
    when ``kernel_alloc_node.va.range`` is not 0; ``kref`` counts the driver's references plus
    one per inserted mapping (not the kernel node) and one per vm_bo; ``extobj`` holds vm_bos of
    external objects only; ``r_obj`` is held by a GEM reference until the last :func:`put`.
    """

    __slots__ = (
        "__weakref__",
        "drm",
        "evict",
        "extobj",
        "flags",
        "kernel_alloc_node",
        "kref",
        "mm_range",
        "mm_start",
        "name",
        "ops",
        "r_obj",
        "rb",
    )

    def __init__(self) -> None:
        self.name: str | None = None
        self.flags = DrmGpuvmFlags(0)
        self.drm: DrmDevice | None = None
        self.mm_start = 0
        self.mm_range = 0
        self.rb = _GpuvaTree()
        self.kref = 0
        self.kernel_alloc_node = DrmGpuva()
        self.ops: DrmGpuvmOps | None = None
        self.r_obj: DrmGemObject | None = None
        self.extobj = _VmBoList("extobj", "gpuvm", EXTOBJ_LOCK_CLASS)
        self.evict = _VmBoList("evict", "gpuvm", EVICT_LOCK_CLASS)

    def __repr__(self) -> str:
        return f"<DrmGpuvm {self.name} vas={len(self.rb)} ref={self.kref}>"


class DrmGpuvmBo:
    """The link of one VM and one GEM object. Kernel: struct drm_gpuvm_bo

    Unique per (``vm``, ``obj``): :func:`bo_obtain` finds the existing one on the object's
    gpuva list. It holds a VM reference and a GEM reference. ``gpuva`` lists this object's
    mappings in ``vm`` (the kernel's ``list.gpuva``; under the object's gpuva lock), each
    holding one ``kref``: a dict used as an ordered set, so that, as with the kernel's
    list_add_tail()/list_del_init(), a mapping joins at the tail and leaves without a walk of
    the others (one BO may have a mapping per page). ``evicted`` is protected by
    ``obj.resv``. ``entry_extobj`` / ``entry_evict`` name the list its entry is on (the VM's,
    an iteration's local list) or None (the kernel's ``list.entry.extobj``/``evict`` being
    empty).
    """

    __slots__ = (
        "__weakref__",
        "entry_evict",
        "entry_extobj",
        "entry_gem",
        "evicted",
        "gpuva",
        "kref",
        "obj",
        "vm",
    )

    def __init__(self) -> None:
        self.vm: DrmGpuvm | None = None
        self.obj: DrmGemObject | None = None
        self.evicted = False
        self.kref = 0
        self.gpuva: dict[DrmGpuva, None] = {}
        self.entry_gem = False
        self.entry_extobj: dict | None = None
        self.entry_evict: dict | None = None

    def __repr__(self) -> str:
        name = self.vm.name if self.vm is not None else None
        return f"<DrmGpuvmBo vm={name} obj={self.obj!r} vas={len(self.gpuva)} ref={self.kref}>"


# --- the GEM side: gpuva list and its lock --------------------------------------------------


class DrmGemGpuva:
    """The ``gpuva`` member of a GEM object: its vm_bos and the lock that may protect them.

    Kernel: ``struct drm_gem_object::gpuva`` (``list``, ``lock``, and in kernels before
    ``DRM_GPUVM_IMMEDIATE_MODE`` the ``lock_dep_map`` set by drm_gem_gpuva_set_lock()).
    """

    __slots__ = ("list", "lock", "lock_dep_map")

    def __init__(self, name: str) -> None:
        self.list: list[DrmGpuvmBo] = []
        self.lock = Mutex(f"{name}.gpuva.lock", GEM_GPUVA_LOCK_CLASS)
        self.lock_dep_map: object | None = None


_gem_gpuva: weakref.WeakKeyDictionary[DrmGemObject, DrmGemGpuva] = weakref.WeakKeyDictionary()
_gem_gpuva_lock = threading.Lock()


def gem_gpuva(obj: DrmGemObject) -> DrmGemGpuva:
    """The object's ``gpuva`` member, initialised on first use.

    Kernel: ``obj->gpuva``, set up by drm_gem_gpuva_init() [include/drm/drm_gem.h] from
    drm_gem_private_object_init().
    """
    with _gem_gpuva_lock:
        g = _gem_gpuva.get(obj)
        if g is None:
            label = obj.resv.lock.name if obj.resv is not None else "gem"
            g = _gem_gpuva[obj] = DrmGemGpuva(label)
        return g


def gem_gpuva_set_lock(obj: DrmGemObject, lock: object) -> None:
    """Name the lock protecting the object's gpuva list instead of its resv (a Mutex, a
    SpinLock, anything lockdep tracks).

    Kernel: drm_gem_gpuva_set_lock() [include/drm/drm_gem.h], as in kernels before
    ``DRM_GPUVM_IMMEDIATE_MODE`` replaced it (WARNs when set twice).
    """
    g = gem_gpuva(obj)
    if not warn_on(g.lock_dep_map is not None, f"GEM GPUVA lock of {obj!r} set twice"):
        g.lock_dep_map = lock


def gem_gpuva_assert_lock_held(vm: DrmGpuvm, obj: DrmGemObject) -> None:
    """Report unless the current task holds the lock protecting ``obj``'s gpuva list for
    ``vm``: ``obj.gpuva.lock`` in immediate mode, else a lock named with
    :func:`gem_gpuva_set_lock`, else ``obj.resv``.

    Kernel: drm_gem_gpuva_assert_lock_held(gpuvm, obj) [include/drm/drm_gem.h]
    """
    g = gem_gpuva(obj)
    if immediate_mode(vm):
        lockdep.assert_held(g.lock)
    elif g.lock_dep_map is not None:
        lockdep.assert_held(g.lock_dep_map)
    else:
        dma_resv.assert_held(obj.resv)


def gem_for_each_gpuvm_bo(obj: DrmGemObject) -> Iterator[DrmGpuvmBo]:
    """Every vm_bo of the object (caller holds its gpuva lock).

    Kernel: drm_gem_for_each_gpuvm_bo_safe() [include/drm/drm_gem.h]
    """
    yield from list(gem_gpuva(obj).list)


# --- the VM ---------------------------------------------------------------------------------


def resv_protected(vm: DrmGpuvm) -> bool:
    """Kernel: drm_gpuvm_resv_protected() [include/drm/drm_gpuvm.h]"""
    return bool(vm.flags & DrmGpuvmFlags.RESV_PROTECTED)


def immediate_mode(vm: DrmGpuvm) -> bool:
    """Kernel: drm_gpuvm_immediate_mode() [include/drm/drm_gpuvm.h]"""
    return bool(vm.flags & DrmGpuvmFlags.IMMEDIATE_MODE)


def resv(vm: DrmGpuvm) -> DmaResv:
    """The VM's shared reservation object. Kernel: drm_gpuvm_resv()"""
    return vm.r_obj.resv


def resv_obj(vm: DrmGpuvm) -> DrmGemObject:
    """The GEM object holding the VM's resv. Kernel: drm_gpuvm_resv_obj()"""
    return vm.r_obj


def resv_held(vm: DrmGpuvm) -> bool:
    """Kernel: drm_gpuvm_resv_held()"""
    return dma_resv.held(resv(vm))


def resv_assert_held(vm: DrmGpuvm) -> None:
    """Kernel: drm_gpuvm_resv_assert_held()"""
    dma_resv.assert_held(resv(vm))


def is_extobj(vm: DrmGpuvm, obj: DrmGemObject | None) -> bool:
    """Whether ``obj`` is external to ``vm``: its resv is not the VM's.

    Kernel: drm_gpuvm_is_extobj() [include/drm/drm_gpuvm.h]
    """
    return obj is not None and obj.resv is not resv(vm)


def _resv_object_free(obj: DrmGemObject) -> None:
    """Kernel: drm_gpuvm_gem_object_free() [drivers/gpu/drm/drm_gpuvm.c]"""
    gem.object_release(obj)


_RESV_OBJECT_FUNCS = gem.DrmGemObjectFuncs(free=_resv_object_free)


def resv_object_alloc(drm: DrmDevice) -> DrmGemObject:
    """A dummy GEM object to serve as a VM's ``r_obj``, one reference held by the caller.

    Kernel: drm_gpuvm_resv_object_alloc() [drivers/gpu/drm/drm_gpuvm.c]

    The kernel's dummy has size 0; the model's GEM objects are whole pages, so it is one page
    with no backing storage (``filp`` None), never mapped or populated.

    Raises:
        Enomem: the allocation failed (the kernel returns NULL).
    """
    _alloc("resv object")
    obj = DrmGemObject()
    obj.funcs = _RESV_OBJECT_FUNCS
    gem.private_object_init(drm, obj, gem.PAGE_SIZE)
    return obj


def _check_overflow(addr: int, range: int) -> bool:
    """Kernel: drm_gpuvm_check_overflow() (check_add_overflow on u64)"""
    return addr < 0 or range < 0 or addr + range > U64_MAX


def _in_mm_range(vm: DrmGpuvm, addr: int, range: int) -> bool:
    """Kernel: drm_gpuvm_in_mm_range()"""
    return addr >= vm.mm_start and addr + range <= vm.mm_start + vm.mm_range


def _in_kernel_node(vm: DrmGpuvm, addr: int, range: int) -> bool:
    """Kernel: drm_gpuvm_in_kernel_node()"""
    kstart = vm.kernel_alloc_node.va.addr
    krange = vm.kernel_alloc_node.va.range
    return bool(krange) and addr < kstart + krange and kstart < addr + range


def range_valid(vm: DrmGpuvm, addr: int, range: int) -> bool:
    """Whether ``[addr, addr + range)`` lies in the VM and outside the kernel's node.

    Kernel: drm_gpuvm_range_valid() [drivers/gpu/drm/drm_gpuvm.c]
    """
    return (
        not _check_overflow(addr, range)
        and _in_mm_range(vm, addr, range)
        and not _in_kernel_node(vm, addr, range)
    )


def init(
    vm: DrmGpuvm,
    name: str | None,
    flags: DrmGpuvmFlags | int,
    drm: DrmDevice,
    r_obj: DrmGemObject,
    start_offset: int,
    range: int,
    reserve_offset: int,
    reserve_range: int,
    ops: DrmGpuvmOps,
) -> None:
    """Initialise a VM of ``[start_offset, start_offset + range)``, holding one reference (the
    caller's) and a GEM reference on ``r_obj``; a non-zero ``reserve_range`` inserts the
    kernel's node there (it takes no VM reference).

    Kernel: drm_gpuvm_init() [drivers/gpu/drm/drm_gpuvm.c]
    """
    vm.name = name if name else "unknown"
    vm.rb = _GpuvaTree()
    vm.extobj = _VmBoList("extobj", vm.name, EXTOBJ_LOCK_CLASS)
    vm.evict = _VmBoList("evict", vm.name, EVICT_LOCK_CLASS)
    vm.kref = 1
    vm.flags = DrmGpuvmFlags(flags)
    vm.ops = ops
    vm.drm = drm
    vm.r_obj = gem.get(r_obj)
    warn_on(_check_overflow(start_offset, range), "GPUVA address limited to 8 bytes")
    vm.mm_start = start_offset
    vm.mm_range = range
    vm.kernel_alloc_node = DrmGpuva()
    if reserve_range:
        vm.kernel_alloc_node.va.addr = reserve_offset
        vm.kernel_alloc_node.va.range = reserve_range
        if not warn_on(
            _check_overflow(reserve_offset, reserve_range), "GPUVA address limited to 8 bytes"
        ):
            _insert(vm, vm.kernel_alloc_node)


def get(vm: DrmGpuvm) -> DrmGpuvm:
    """Take a reference (the caller must already hold one). Kernel: drm_gpuvm_get()"""
    _kref_get(vm, "drm_gpuvm_get")
    return vm


def _fini(vm: DrmGpuvm) -> None:
    """Kernel: drm_gpuvm_fini() [drivers/gpu/drm/drm_gpuvm.c]"""
    vm.name = None
    if vm.kernel_alloc_node.va.range:
        _remove(vm.kernel_alloc_node)
    warn_on(len(vm.rb), f"GPUVA tree of {vm!r} is not empty, potentially leaking memory")
    warn_on(len(vm.extobj.list), f"extobj list of {vm!r} should be empty")
    warn_on(len(vm.evict.list), f"evict list of {vm!r} should be empty")
    gem.put(vm.r_obj)


def put(vm: DrmGpuvm | None) -> None:
    """Drop a reference; the last one finalises the VM and calls ``ops.vm_free``.

    Kernel: drm_gpuvm_put() / drm_gpuvm_free() [drivers/gpu/drm/drm_gpuvm.c]
    """
    if vm is None:
        return
    if not _kref_put(vm, "drm_gpuvm_put"):
        return
    _fini(vm)
    vm_free = vm.ops.vm_free if vm.ops is not None else None
    if warn_on(vm_free is None, f"{vm!r} has no vm_free callback"):
        return
    vm_free(vm)


# --- mappings -------------------------------------------------------------------------------


def _insert(vm: DrmGpuvm, va: DrmGpuva) -> None:
    """Kernel: __drm_gpuva_insert() [drivers/gpu/drm/drm_gpuvm.c]"""
    if vm.rb.iter_first(va.va.addr, va.last) is not None:
        raise Eexist(msg=f"{va!r} overlaps a mapping of {vm.name}")
    va.vm = vm
    vm.rb.insert(va)


def _remove(va: DrmGpuva) -> None:
    """Kernel: __drm_gpuva_remove() [drivers/gpu/drm/drm_gpuvm.c]"""
    va.vm.rb.remove(va)


def gpuva_insert(vm: DrmGpuvm, va: DrmGpuva) -> None:
    """Insert a mapping; it takes a VM reference.

    Kernel: drm_gpuva_insert() [drivers/gpu/drm/drm_gpuvm.c]

    Raises:
        Einval: the range overflows, leaves the VM or overlaps the kernel's node.
        Eexist: it overlaps an existing mapping.
    """
    if not range_valid(vm, va.va.addr, va.va.range):
        raise Einval(msg=f"{va!r} is not a valid range of {vm.name}")
    _insert(vm, va)
    get(vm)


def gpuva_remove(va: DrmGpuva) -> None:
    """Remove a mapping and drop its VM reference; the kernel's node is refused (WARN).

    Kernel: drm_gpuva_remove() [drivers/gpu/drm/drm_gpuvm.c]
    """
    vm = va.vm
    if warn_on(va is vm.kernel_alloc_node, "Can't destroy kernel reserved node"):
        return
    _remove(va)
    put(vm)


def gpuva_link(va: DrmGpuva, vm_bo: DrmGpuvmBo) -> None:
    """Add an inserted mapping to its vm_bo's list, taking a vm_bo reference. No-op for a
    sparse mapping (``gem.obj`` None).

    Kernel: drm_gpuva_link() [drivers/gpu/drm/drm_gpuvm.c]
    Locking: the object's gpuva lock (asserted).
    """
    obj = va.gem.obj
    if obj is None:
        return
    warn_on(obj is not vm_bo.obj, f"linking {va!r} to {vm_bo!r} of another object")
    # Asserted before the reference is taken, so a reported call changes nothing.
    gem_gpuva_assert_lock_held(va.vm, obj)
    va.vm_bo = bo_get(vm_bo)
    vm_bo.gpuva[va] = None


def gpuva_unlink(va: DrmGpuva) -> None:
    """Remove a mapping from its vm_bo's list and drop that vm_bo reference, which may free
    the vm_bo (see :func:`bo_put`). No-op for a sparse mapping.

    Kernel: drm_gpuva_unlink() [drivers/gpu/drm/drm_gpuvm.c]
    Locking: the object's gpuva lock (asserted).
    """
    obj = va.gem.obj
    vm_bo = va.vm_bo
    if obj is None:
        return
    gem_gpuva_assert_lock_held(va.vm, obj)
    if vm_bo is not None:
        vm_bo.gpuva.pop(va, None)
    va.vm_bo = None
    bo_put(vm_bo)


def gpuva_find_first(vm: DrmGpuvm, addr: int, range: int) -> DrmGpuva | None:
    """The lowest mapping overlapping ``[addr, addr + range)``.

    Kernel: drm_gpuva_find_first() [drivers/gpu/drm/drm_gpuvm.c]
    """
    return vm.rb.iter_first(addr, addr + range - 1)


def gpuva_find(vm: DrmGpuvm, addr: int, range: int) -> DrmGpuva | None:
    """The mapping of exactly ``[addr, addr + range)``, or None.

    Kernel: drm_gpuva_find() [drivers/gpu/drm/drm_gpuvm.c]
    """
    va = gpuva_find_first(vm, addr, range)
    if va is None or va.va.addr != addr or va.va.range != range:
        return None
    return va


def gpuva_find_prev(vm: DrmGpuvm, start: int) -> DrmGpuva | None:
    """The mapping ending right at ``start`` (None across a gap).

    Kernel: drm_gpuva_find_prev() [drivers/gpu/drm/drm_gpuvm.c]
    """
    if not range_valid(vm, start - 1, 1):
        return None
    return vm.rb.iter_first(start - 1, start)


def gpuva_find_next(vm: DrmGpuvm, end: int) -> DrmGpuva | None:
    """The mapping starting right at ``end`` (None across a gap).

    Kernel: drm_gpuva_find_next() [drivers/gpu/drm/drm_gpuvm.c]
    """
    if not range_valid(vm, end, 1):
        return None
    return vm.rb.iter_first(end, end + 1)


def interval_empty(vm: DrmGpuvm, addr: int, range: int) -> bool:
    """Kernel: drm_gpuvm_interval_empty() [drivers/gpu/drm/drm_gpuvm.c]"""
    return gpuva_find_first(vm, addr, range) is None


def for_each_va_range(vm: DrmGpuvm, start: int, end: int) -> Iterator[DrmGpuva]:
    """The mappings overlapping ``[start, end)`` in address order, the kernel's node included.
    Safe against removing the current mapping (the next one is found before it is yielded).

    Kernel: drm_gpuvm_for_each_va_range_safe() [include/drm/drm_gpuvm.h]
    """
    va = gpuva_find_first(vm, start, end - start)
    nxt = vm.rb.next(va) if va is not None else None
    while va is not None and va.va.addr < end:
        yield va
        va, nxt = nxt, (vm.rb.next(nxt) if nxt is not None else None)


def for_each_va(vm: DrmGpuvm) -> Iterator[DrmGpuva]:
    """Every mapping in address order (a snapshot: safe against removal).

    Kernel: drm_gpuvm_for_each_va_safe() [include/drm/drm_gpuvm.h]
    """
    yield from list(vm.rb.vas)


def bo_for_each_va(vm_bo: DrmGpuvmBo) -> Iterator[DrmGpuva]:
    """The vm_bo's mappings (a snapshot; caller holds the object's gpuva lock).

    Kernel: drm_gpuvm_bo_for_each_va_safe() [include/drm/drm_gpuvm.h]
    """
    yield from list(vm_bo.gpuva)


# --- vm_bo ----------------------------------------------------------------------------------


def _list_add(vm_bo: DrmGpuvmBo, lst: _VmBoList, lock: bool) -> None:
    """Add unless already on a list. Kernel: drm_gpuvm_bo_list_add()"""
    attr = f"entry_{lst.name}"
    if lock:
        with lst.lock:
            if getattr(vm_bo, attr) is None:
                lst.list[vm_bo] = None
                setattr(vm_bo, attr, lst.list)
    elif getattr(vm_bo, attr) is None:
        lst.list[vm_bo] = None
        setattr(vm_bo, attr, lst.list)


def _list_del(vm_bo: DrmGpuvmBo, lst: _VmBoList, lock: bool) -> None:
    """Remove from whichever list the entry is on (the VM's or an iteration's local list).

    Kernel: drm_gpuvm_bo_list_del() / drm_gpuvm_bo_list_del_init()
    """
    attr = f"entry_{lst.name}"

    def do() -> None:
        on = getattr(vm_bo, attr)
        if on is not None:
            del on[vm_bo]
            setattr(vm_bo, attr, None)

    if lock:
        with lst.lock:
            do()
    else:
        do()


def bo_create(vm: DrmGpuvm, obj: DrmGemObject) -> DrmGpuvmBo:
    """A new vm_bo holding a VM and a GEM reference, on no list yet.

    Kernel: drm_gpuvm_bo_create() [drivers/gpu/drm/drm_gpuvm.c]

    Raises:
        Enomem: the allocation failed (``ops.vm_bo_alloc`` or the default one).
    """
    ops = vm.ops
    if ops is not None and ops.vm_bo_alloc is not None:
        vm_bo = ops.vm_bo_alloc()
        if vm_bo is None:
            raise Enomem(msg="vm_bo_alloc")
    else:
        _alloc("drm_gpuvm_bo")
        vm_bo = DrmGpuvmBo()
    vm_bo.vm = get(vm)
    vm_bo.obj = gem.get(obj)
    vm_bo.kref = 1
    vm_bo.gpuva = {}
    vm_bo.entry_gem = False
    vm_bo.entry_extobj = None
    vm_bo.entry_evict = None
    vm_bo.evicted = False
    return vm_bo


def bo_get(vm_bo: DrmGpuvmBo) -> DrmGpuvmBo:
    """Kernel: drm_gpuvm_bo_get() [include/drm/drm_gpuvm.h]"""
    _kref_get(vm_bo, "drm_gpuvm_bo_get")
    return vm_bo


def _bo_get_unless_zero(vm_bo: DrmGpuvmBo) -> bool:
    """Kernel: kref_get_unless_zero(&vm_bo->kref)"""
    with _atomic:
        if vm_bo.kref == 0:
            return False
        vm_bo.kref += 1
        return True


def _bo_destroy(vm_bo: DrmGpuvmBo) -> None:
    """Kernel: drm_gpuvm_bo_destroy() [drivers/gpu/drm/drm_gpuvm.c]"""
    vm = vm_bo.vm
    ops = vm.ops
    obj = vm_bo.obj
    lock = not resv_protected(vm)
    if not lock:
        resv_assert_held(vm)
    _list_del(vm_bo, vm.extobj, lock)
    _list_del(vm_bo, vm.evict, lock)
    gem_gpuva_assert_lock_held(vm, obj)
    g = gem_gpuva(obj)
    if vm_bo in g.list:
        g.list.remove(vm_bo)
    vm_bo.entry_gem = False
    if ops is not None and ops.vm_bo_free is not None:
        ops.vm_bo_free(vm_bo)
    put(vm)
    gem.put(obj)


def bo_put(vm_bo: DrmGpuvmBo | None) -> bool:
    """Drop a reference; return True if that destroyed the vm_bo.

    Kernel: drm_gpuvm_bo_put() [drivers/gpu/drm/drm_gpuvm.c]
    Locking: whoever may drop the last reference holds the object's gpuva lock and, for a
    ``RESV_PROTECTED`` VM, the VM's resv (both asserted at destruction); not atomic context.

    The last reference takes the vm_bo off the extobj and evict lists and the object's gpuva
    list, calls ``ops.vm_bo_free``, and drops its VM and GEM references.
    """
    lockdep.might_sleep()
    if vm_bo is None:
        return False
    if not _kref_put(vm_bo, "drm_gpuvm_bo_put"):
        return False
    _bo_destroy(vm_bo)
    return True


def _bo_find(vm: DrmGpuvm, obj: DrmGemObject) -> DrmGpuvmBo | None:
    """Kernel: __drm_gpuvm_bo_find() [drivers/gpu/drm/drm_gpuvm.c]"""
    gem_gpuva_assert_lock_held(vm, obj)
    for vm_bo in gem_gpuva(obj).list:
        if vm_bo.vm is vm:
            return vm_bo
    return None


def bo_find(vm: DrmGpuvm, obj: DrmGemObject) -> DrmGpuvmBo | None:
    """The vm_bo of ``vm`` and ``obj`` with a new reference, or None.

    Kernel: drm_gpuvm_bo_find() [drivers/gpu/drm/drm_gpuvm.c]
    Locking: the object's gpuva lock (asserted).
    """
    vm_bo = _bo_find(vm, obj)
    return bo_get(vm_bo) if vm_bo is not None else None


def bo_obtain(vm: DrmGpuvm, obj: DrmGemObject) -> DrmGpuvmBo:
    """The vm_bo of ``vm`` and ``obj`` with a new reference, created and added to the
    object's gpuva list if there is none.

    Kernel: drm_gpuvm_bo_obtain() [drivers/gpu/drm/drm_gpuvm.c] (drm_gpuvm_bo_obtain_locked()
    in the tree that adds deferred vm_bo cleanup)
    Locking: the object's gpuva lock (asserted). It allocates (GFP_KERNEL), so not from the
    fence signalling path: preallocate with :func:`bo_create` and :func:`bo_obtain_prealloc`.

    Raises:
        Enomem: a new vm_bo could not be allocated.
    """
    vm_bo = bo_find(vm, obj)
    if vm_bo is not None:
        return vm_bo
    vm_bo = bo_create(vm, obj)
    gem_gpuva_assert_lock_held(vm, obj)
    gem_gpuva(obj).list.append(vm_bo)
    vm_bo.entry_gem = True
    return vm_bo


def bo_obtain_prealloc(new_vm_bo: DrmGpuvmBo) -> DrmGpuvmBo:
    """Link a preallocated vm_bo, or, if its (VM, object) pair already has one, drop the
    preallocated one and return the existing one with a new reference.

    Kernel: drm_gpuvm_bo_obtain_prealloc() [drivers/gpu/drm/drm_gpuvm.c]
    Locking: the object's gpuva lock (asserted).
    """
    vm = new_vm_bo.vm
    obj = new_vm_bo.obj
    vm_bo = bo_find(vm, obj)
    if vm_bo is not None:
        bo_put(new_vm_bo)
        return vm_bo
    gem_gpuva_assert_lock_held(vm, obj)
    gem_gpuva(obj).list.append(new_vm_bo)
    new_vm_bo.entry_gem = True
    return new_vm_bo


def bo_extobj_add(vm_bo: DrmGpuvmBo) -> None:
    """Put the vm_bo on its VM's extobj list if its object is external and not listed yet.

    Kernel: drm_gpuvm_bo_extobj_add() [drivers/gpu/drm/drm_gpuvm.c]
    Locking: the extobj spinlock (taken here), or the VM's resv if ``RESV_PROTECTED``
    (asserted).
    """
    vm = vm_bo.vm
    lock = not resv_protected(vm)
    if not lock:
        resv_assert_held(vm)
    if is_extobj(vm, vm_bo.obj):
        _list_add(vm_bo, vm.extobj, lock)


def bo_evict(vm_bo: DrmGpuvmBo, evict: bool) -> None:
    """Mark the vm_bo evicted (or not) and add it to (remove it from) its VM's evict list.

    Kernel: drm_gpuvm_bo_evict() [drivers/gpu/drm/drm_gpuvm.c]
    Locking: the object's resv (asserted).

    For an external object of a ``RESV_PROTECTED`` VM only ``evicted`` changes: the evict list
    is protected by the VM's resv, which the caller need not hold; :func:`prepare_objects`
    moves it onto the list on the next exec.
    """
    vm = vm_bo.vm
    obj = vm_bo.obj
    lock = not resv_protected(vm)
    dma_resv.assert_held(obj.resv)
    vm_bo.evicted = evict
    if is_extobj(vm, obj) and not lock:
        return
    if evict:
        _list_add(vm_bo, vm.evict, lock)
    else:
        _list_del(vm_bo, vm.evict, lock)


def bo_gem_evict(obj: DrmGemObject, evict: bool) -> None:
    """:func:`bo_evict` every vm_bo of the object: evicted in every VM that maps it.

    Kernel: drm_gpuvm_bo_gem_evict() [include/drm/drm_gpuvm.h]
    Locking: the object's resv and gpuva lock (asserted per vm_bo).
    """
    for vm_bo in gem_for_each_gpuvm_bo(obj):
        gem_gpuva_assert_lock_held(vm_bo.vm, obj)
        bo_evict(vm_bo, evict)


def _for_each_vm_bo_in_list(vm: DrmGpuvm, lst: _VmBoList) -> Iterator[DrmGpuvmBo]:
    """Walk a vm_bo list holding its spinlock only to pop each entry, so entries may be added
    and removed meanwhile; popped entries wait on a local list (where removal still works)
    and go back to the head of the VM's list at the end. Each yielded vm_bo is held by a
    reference, dropped when the walk moves on or stops.

    Kernel: for_each_vm_bo_in_list() / get_next_vm_bo_from_list() / restore_vm_bo_list()
    [drivers/gpu/drm/drm_gpuvm.c]
    """
    local: dict[DrmGpuvmBo, None] = {}
    attr = f"entry_{lst.name}"
    vm_bo: DrmGpuvmBo | None = None
    try:
        while True:
            bo_put(vm_bo)
            vm_bo = None
            with lst.lock:
                if lst.local_list is None:
                    lst.local_list = local
                else:
                    warn_on(lst.local_list is not local, f"concurrent walks of {lst.name} list")
                while lst.list:
                    first = next(iter(lst.list))
                    del lst.list[first]
                    if _bo_get_unless_zero(first):
                        local[first] = None
                        setattr(first, attr, local)
                        vm_bo = first
                        break
                    setattr(first, attr, None)
            if vm_bo is None:
                return
            yield vm_bo
    finally:
        bo_put(vm_bo)
        with lst.lock:
            if lst.local_list is not None:
                merged = dict(lst.local_list)
                for bo in merged:
                    setattr(bo, attr, lst.list)
                merged.update(lst.list)
                lst.list.clear()
                lst.list.update(merged)
                lst.local_list = None


# --- split and merge ------------------------------------------------------------------------


class DrmGpuvaOpMap:
    """Kernel: struct drm_gpuva_op_map [include/drm/drm_gpuvm.h]"""

    __slots__ = ("gem", "va")

    def __init__(self, addr: int = 0, range: int = 0, obj=None, offset: int = 0) -> None:
        self.va = _Va(addr, range)
        self.gem = _Gem(obj, offset)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DrmGpuvaOpMap) and self.va == other.va and self.gem == other.gem

    def __repr__(self) -> str:
        return f"map{self.va!r} {self.gem!r}"


class DrmGpuvmMapReq:
    """Kernel: struct drm_gpuvm_map_req [include/drm/drm_gpuvm.h]"""

    __slots__ = ("map",)

    def __init__(self, addr: int, range: int, obj: DrmGemObject | None, offset: int) -> None:
        self.map = DrmGpuvaOpMap(addr, range, obj, offset)


class DrmGpuvaOpUnmap:
    """Kernel: struct drm_gpuva_op_unmap [include/drm/drm_gpuvm.h]

    ``keep`` says the mapping is physically contiguous with the map request, so a driver may
    keep its page table entries.
    """

    __slots__ = ("keep", "va")

    def __init__(self, va: DrmGpuva, keep: bool = False) -> None:
        self.va = va
        self.keep = keep

    def __repr__(self) -> str:
        return f"unmap {self.va!r}{' keep' if self.keep else ''}"


class DrmGpuvaOpRemap:
    """Kernel: struct drm_gpuva_op_remap [include/drm/drm_gpuvm.h]

    ``unmap`` removes an existing mapping; ``prev``/``next`` map back the parts before and
    after the hole (None when the hole reaches that end of the old mapping).
    """

    __slots__ = ("next", "prev", "unmap")

    def __init__(self, prev, next, unmap) -> None:
        self.prev: DrmGpuvaOpMap | None = prev
        self.next: DrmGpuvaOpMap | None = next
        self.unmap: DrmGpuvaOpUnmap = unmap

    def __repr__(self) -> str:
        return f"remap(prev={self.prev!r}, next={self.next!r}, {self.unmap!r})"


class DrmGpuvaOpPrefetch:
    """Kernel: struct drm_gpuva_op_prefetch [include/drm/drm_gpuvm.h]"""

    __slots__ = ("va",)

    def __init__(self, va: DrmGpuva) -> None:
        self.va = va


class DrmGpuvaOp:
    """One split/merge step. Kernel: struct drm_gpuva_op [include/drm/drm_gpuvm.h]

    ``op`` says which of ``map``, ``remap``, ``unmap``, ``prefetch`` is set (the kernel's union).
    """

    __slots__ = ("map", "op", "prefetch", "remap", "unmap")

    def __init__(self, op: DrmGpuvaOpType = DrmGpuvaOpType.MAP) -> None:
        self.op = op
        self.map: DrmGpuvaOpMap | None = None
        self.remap: DrmGpuvaOpRemap | None = None
        self.unmap: DrmGpuvaOpUnmap | None = None
        self.prefetch: DrmGpuvaOpPrefetch | None = None

    def __repr__(self) -> str:
        body = {
            DrmGpuvaOpType.MAP: self.map,
            DrmGpuvaOpType.REMAP: self.remap,
            DrmGpuvaOpType.UNMAP: self.unmap,
            DrmGpuvaOpType.PREFETCH: self.prefetch,
        }.get(self.op)
        return f"<{self.op.name} {body!r}>"


class DrmGpuvaOps:
    """A list of steps. Kernel: struct drm_gpuva_ops (``drm_gpuva_for_each_op()`` is
    iteration over it; :func:`gpuva_ops_free` releases it)."""

    __slots__ = ("list",)

    def __init__(self) -> None:
        self.list: list[DrmGpuvaOp] = []

    def __iter__(self) -> Iterator[DrmGpuvaOp]:
        return iter(self.list)

    def __len__(self) -> int:
        return len(self.list)


def _op_map_cb(fn: DrmGpuvmOps, priv: Any, req: DrmGpuvmMapReq) -> None:
    """Kernel: op_map_cb() [drivers/gpu/drm/drm_gpuvm.c]"""
    op = DrmGpuvaOp(DrmGpuvaOpType.MAP)
    m = req.map
    op.map = DrmGpuvaOpMap(m.va.addr, m.va.range, m.gem.obj, m.gem.offset)
    fn.sm_step_map(op, priv)


def _op_remap_cb(fn: DrmGpuvmOps, priv: Any, prev, nxt, unmap: DrmGpuvaOpUnmap) -> None:
    """Kernel: op_remap_cb() [drivers/gpu/drm/drm_gpuvm.c]"""
    op = DrmGpuvaOp(DrmGpuvaOpType.REMAP)
    op.remap = DrmGpuvaOpRemap(prev, nxt, unmap)
    fn.sm_step_remap(op, priv)


def _op_unmap_cb(fn: DrmGpuvmOps, priv: Any, va: DrmGpuva, merge: bool) -> None:
    """Kernel: op_unmap_cb() [drivers/gpu/drm/drm_gpuvm.c]"""
    op = DrmGpuvaOp(DrmGpuvaOpType.UNMAP)
    op.unmap = DrmGpuvaOpUnmap(va, merge)
    fn.sm_step_unmap(op, priv)


def _sm_map(vm: DrmGpuvm, fn: DrmGpuvmOps, priv: Any, req: DrmGpuvmMapReq) -> None:
    """Walk the mappings overlapping the request in address order: unmap those it covers,
    remap those it cuts (keeping the parts outside it), then map the request.

    Kernel: __drm_gpuvm_sm_map() [drivers/gpu/drm/drm_gpuvm.c] (without madvise)

    An old mapping gets ``keep`` when it is backed by the requested object at the offset the
    request would give its first overlapping address (and is not sparse).
    """
    req_obj = req.map.gem.obj
    req_offset = req.map.gem.offset
    req_range = req.map.va.range
    req_addr = req.map.va.addr
    req_end = req_addr + req_range
    if not range_valid(vm, req_addr, req_range):
        raise Einval(msg=f"map [{req_addr:#x}, {req_end:#x}) is not a valid range of {vm.name}")
    for va in for_each_va_range(vm, req_addr, req_end):
        obj = va.gem.obj
        offset = va.gem.offset
        addr = va.va.addr
        range_ = va.va.range
        end = addr + range_
        merge = obj is not None
        if addr == req_addr:
            merge = merge and obj is req_obj and offset == req_offset
            if end == req_end:
                _op_unmap_cb(fn, priv, va, merge)
                break
            if end < req_end:
                _op_unmap_cb(fn, priv, va, merge)
                continue
            n = DrmGpuvaOpMap(req_end, range_ - req_range, obj, offset + req_range)
            _op_remap_cb(fn, priv, None, n, DrmGpuvaOpUnmap(va, merge))
            break
        if addr < req_addr:
            ls_range = req_addr - addr
            p = DrmGpuvaOpMap(addr, ls_range, obj, offset)
            merge = merge and obj is req_obj and offset + ls_range == req_offset
            u = DrmGpuvaOpUnmap(va, merge)
            if end == req_end:
                _op_remap_cb(fn, priv, p, None, u)
                break
            if end < req_end:
                _op_remap_cb(fn, priv, p, None, u)
                continue
            n = DrmGpuvaOpMap(req_end, end - req_end, obj, offset + ls_range + req_range)
            _op_remap_cb(fn, priv, p, n, u)
            break
        # addr > req_addr
        merge = merge and obj is req_obj and offset == req_offset + (addr - req_addr)
        if end == req_end:
            _op_unmap_cb(fn, priv, va, merge)
            break
        if end < req_end:
            _op_unmap_cb(fn, priv, va, merge)
            continue
        n = DrmGpuvaOpMap(req_end, end - req_end, obj, offset + req_end - addr)
        _op_remap_cb(fn, priv, None, n, DrmGpuvaOpUnmap(va, merge))
        break
    _op_map_cb(fn, priv, req)


def _sm_unmap(vm: DrmGpuvm, fn: DrmGpuvmOps, priv: Any, req_addr: int, req_range: int) -> None:
    """Unmap every mapping inside the range, remap every one it cuts.

    Kernel: __drm_gpuvm_sm_unmap() [drivers/gpu/drm/drm_gpuvm.c]
    """
    req_end = req_addr + req_range
    if not range_valid(vm, req_addr, req_range):
        raise Einval(msg=f"unmap [{req_addr:#x}, {req_end:#x}) is not a valid range of {vm.name}")
    for va in for_each_va_range(vm, req_addr, req_end):
        obj = va.gem.obj
        offset = va.gem.offset
        addr = va.va.addr
        end = addr + va.va.range
        prev = DrmGpuvaOpMap(addr, req_addr - addr, obj, offset) if addr < req_addr else None
        nxt = (
            DrmGpuvaOpMap(req_end, end - req_end, obj, offset + (req_end - addr))
            if end > req_end
            else None
        )
        if prev is not None or nxt is not None:
            _op_remap_cb(fn, priv, prev, nxt, DrmGpuvaOpUnmap(va))
        else:
            _op_unmap_cb(fn, priv, va, False)


def sm_map(vm: DrmGpuvm, priv: Any, req: DrmGpuvmMapReq) -> None:
    """Hand the driver the steps that fit the requested mapping into the VA space: UNMAP and
    REMAP steps in address order (at most two REMAPs), then one MAP of the request.

    Kernel: drm_gpuvm_sm_map() [drivers/gpu/drm/drm_gpuvm.c]
    Locking: the VA tree is the driver's to serialise (its VM lock).

    A request identical to an existing mapping still gives UNMAP (keep) + MAP, as the code
    does (the kerneldoc says it might give none). The callback of each step runs before the
    next step is computed from the tree, so a driver applies it at once.

    Raises:
        Einval: a ``sm_step_*`` callback is missing, or the range is not valid.
        KernelError: whatever a callback raised; the steps before it stay applied.
    """
    ops = vm.ops
    if not (ops and ops.sm_step_map and ops.sm_step_remap and ops.sm_step_unmap):
        raise Einval(msg=f"{vm.name}: drm_gpuvm_sm_map needs sm_step_map/remap/unmap")
    _sm_map(vm, ops, priv, req)


def sm_unmap(vm: DrmGpuvm, priv: Any, req_addr: int, req_range: int) -> None:
    """Hand the driver the steps that unmap ``[req_addr, req_addr + req_range)``: UNMAP for
    mappings inside it, REMAP for those it cuts; nothing for an empty range.

    Kernel: drm_gpuvm_sm_unmap() [drivers/gpu/drm/drm_gpuvm.c]

    Raises:
        Einval: ``sm_step_remap``/``sm_step_unmap`` is missing, or the range is not valid.
        KernelError: whatever a callback raised.
    """
    ops = vm.ops
    if not (ops and ops.sm_step_remap and ops.sm_step_unmap):
        raise Einval(msg=f"{vm.name}: drm_gpuvm_sm_unmap needs sm_step_remap/unmap")
    _sm_unmap(vm, ops, priv, req_addr, req_range)


def _sm_step_lock(op: DrmGpuvaOp, ex: DrmExec) -> None:
    """Kernel: drm_gpuva_sm_step_lock() [drivers/gpu/drm/drm_gpuvm.c]"""
    if op.op == DrmGpuvaOpType.REMAP:
        obj = op.remap.unmap.va.gem.obj
    elif op.op == DrmGpuvaOpType.UNMAP:
        obj = op.unmap.va.gem.obj
    else:
        return
    if obj is not None:
        drm_exec.lock_obj(ex, obj)


_LOCK_OPS = DrmGpuvmOps(
    sm_step_map=_sm_step_lock, sm_step_remap=_sm_step_lock, sm_step_unmap=_sm_step_lock
)


def sm_map_exec_lock(vm: DrmGpuvm, ex: DrmExec, num_fences: int, req: DrmGpuvmMapReq) -> None:
    """Lock (and reserve ``num_fences`` on) the object to map, and lock every object whose
    mapping :func:`sm_map` would unmap or remap, before changing anything.

    Kernel: drm_gpuvm_sm_map_exec_lock() [drivers/gpu/drm/drm_gpuvm.c]
    Use inside ``until_all_locked`` with ``DRM_EXEC_IGNORE_DUPLICATES``.
    """
    if req.map.gem.obj is not None:
        drm_exec.prepare_obj(ex, req.map.gem.obj, num_fences)
    _sm_map(vm, _LOCK_OPS, ex, req)


def sm_unmap_exec_lock(vm: DrmGpuvm, ex: DrmExec, req_addr: int, req_range: int) -> None:
    """Lock every object whose mapping :func:`sm_unmap` would unmap or remap.

    Kernel: drm_gpuvm_sm_unmap_exec_lock() [drivers/gpu/drm/drm_gpuvm.c]
    """
    _sm_unmap(vm, _LOCK_OPS, ex, req_addr, req_range)


def _gpuva_op_alloc(vm: DrmGpuvm) -> DrmGpuvaOp:
    """Kernel: gpuva_op_alloc() [drivers/gpu/drm/drm_gpuvm.c]"""
    fn = vm.ops
    if fn is not None and fn.op_alloc is not None:
        op = fn.op_alloc()
        if op is None:
            raise Enomem(msg="op_alloc")
        return op
    _alloc("drm_gpuva_op")
    return DrmGpuvaOp()


def _gpuva_op_free(vm: DrmGpuvm, op: DrmGpuvaOp) -> None:
    """Kernel: gpuva_op_free() [drivers/gpu/drm/drm_gpuvm.c]"""
    fn = vm.ops
    if fn is not None and fn.op_free is not None:
        fn.op_free(op)


def _copy_map(m: DrmGpuvaOpMap | None) -> DrmGpuvaOpMap | None:
    if m is None:
        return None
    _alloc("drm_gpuva_op_map")
    return DrmGpuvaOpMap(m.va.addr, m.va.range, m.gem.obj, m.gem.offset)


def _list_step(vm: DrmGpuvm, ops: DrmGpuvaOps) -> Callable[[DrmGpuvaOp, Any], None]:
    """Kernel: drm_gpuva_sm_step() [drivers/gpu/drm/drm_gpuvm.c]: copy each step into the list
    (kmemdup of remap's parts)."""

    def step(src: DrmGpuvaOp, _priv: Any) -> None:
        op = _gpuva_op_alloc(vm)
        op.op = src.op
        if src.op == DrmGpuvaOpType.MAP:
            op.map = DrmGpuvaOpMap(
                src.map.va.addr, src.map.va.range, src.map.gem.obj, src.map.gem.offset
            )
        elif src.op == DrmGpuvaOpType.UNMAP:
            op.unmap = DrmGpuvaOpUnmap(src.unmap.va, src.unmap.keep)
        else:
            try:
                _alloc("drm_gpuva_op_unmap")
                unmap = DrmGpuvaOpUnmap(src.remap.unmap.va, src.remap.unmap.keep)
                op.remap = DrmGpuvaOpRemap(
                    _copy_map(src.remap.prev), _copy_map(src.remap.next), unmap
                )
            except BaseException:
                _gpuva_op_free(vm, op)
                raise
        ops.list.append(op)

    return step


def _new_ops() -> DrmGpuvaOps:
    _alloc("drm_gpuva_ops")
    return DrmGpuvaOps()


def sm_map_ops_create(vm: DrmGpuvm, req: DrmGpuvmMapReq) -> DrmGpuvaOps:
    """The steps :func:`sm_map` would give, as a list the driver can walk twice (once where it
    may allocate, once in the signalling path). The VA tree is not changed; apply or abandon
    the list before asking again.

    Kernel: drm_gpuvm_sm_map_ops_create() [drivers/gpu/drm/drm_gpuvm.c]

    Raises:
        Einval: the range is not valid.
        Enomem: an allocation failed; nothing is returned (the partial list is freed).
    """
    ops = _new_ops()
    step = _list_step(vm, ops)
    try:
        _sm_map(
            vm, DrmGpuvmOps(sm_step_map=step, sm_step_remap=step, sm_step_unmap=step), None, req
        )
    except BaseException:
        gpuva_ops_free(vm, ops)
        raise
    return ops


def sm_unmap_ops_create(vm: DrmGpuvm, req_addr: int, req_range: int) -> DrmGpuvaOps:
    """The steps :func:`sm_unmap` would give, as a list.

    Kernel: drm_gpuvm_sm_unmap_ops_create() [drivers/gpu/drm/drm_gpuvm.c]

    Raises:
        Einval: the range is not valid.
        Enomem: an allocation failed.
    """
    ops = _new_ops()
    step = _list_step(vm, ops)
    try:
        _sm_unmap(
            vm, DrmGpuvmOps(sm_step_remap=step, sm_step_unmap=step), None, req_addr, req_range
        )
    except BaseException:
        gpuva_ops_free(vm, ops)
        raise
    return ops


def prefetch_ops_create(vm: DrmGpuvm, addr: int, range: int) -> DrmGpuvaOps:
    """One PREFETCH step per mapping overlapping ``[addr, addr + range)``.

    Kernel: drm_gpuvm_prefetch_ops_create() [drivers/gpu/drm/drm_gpuvm.c]
    """
    ops = _new_ops()
    try:
        for va in for_each_va_range(vm, addr, addr + range):
            op = _gpuva_op_alloc(vm)
            op.op = DrmGpuvaOpType.PREFETCH
            op.prefetch = DrmGpuvaOpPrefetch(va)
            ops.list.append(op)
    except BaseException:
        gpuva_ops_free(vm, ops)
        raise
    return ops


def bo_unmap_ops_create(vm_bo: DrmGpuvmBo) -> DrmGpuvaOps:
    """One UNMAP step per mapping of the vm_bo.

    Kernel: drm_gpuvm_bo_unmap_ops_create() [drivers/gpu/drm/drm_gpuvm.c]
    Locking: the object's gpuva lock (asserted).
    """
    gem_gpuva_assert_lock_held(vm_bo.vm, vm_bo.obj)
    ops = _new_ops()
    try:
        for va in bo_for_each_va(vm_bo):
            op = _gpuva_op_alloc(vm_bo.vm)
            op.op = DrmGpuvaOpType.UNMAP
            op.unmap = DrmGpuvaOpUnmap(va)
            ops.list.append(op)
    except BaseException:
        gpuva_ops_free(vm_bo.vm, ops)
        raise
    return ops


def gpuva_ops_free(vm: DrmGpuvm, ops: DrmGpuvaOps) -> None:
    """Free a list of steps (``ops.op_free`` for each). Kernel: drm_gpuva_ops_free()"""
    for op in ops.list:
        _gpuva_op_free(vm, op)
    ops.list.clear()


def gpuva_init_from_op(va: DrmGpuva, op: DrmGpuvaOpMap) -> None:
    """Kernel: drm_gpuva_init_from_op() [include/drm/drm_gpuvm.h]"""
    gpuva_init(va, op.va.addr, op.va.range, op.gem.obj, op.gem.offset)


def gpuva_map(vm: DrmGpuvm, va: DrmGpuva, op: DrmGpuvaOpMap) -> None:
    """Initialise ``va`` from a MAP step and insert it.

    Kernel: drm_gpuva_map() [drivers/gpu/drm/drm_gpuvm.c]

    The kernel drops the insert's error; here a failed insert (the step was computed on a
    view of the tree that has since changed) is a WARN, and ``va`` stays out of the tree.
    """
    gpuva_init_from_op(va, op)
    try:
        gpuva_insert(vm, va)
    except KernelError as err:
        warn_on(True, f"drm_gpuva_map: {err}")


def gpuva_remap(prev: DrmGpuva | None, nxt: DrmGpuva | None, op: DrmGpuvaOpRemap) -> None:
    """Remove the mapping a REMAP step splits and insert its kept parts as ``prev``/``nxt``.

    Kernel: drm_gpuva_remap() [drivers/gpu/drm/drm_gpuvm.c]
    """
    va = op.unmap.va
    vm = va.vm
    gpuva_remove(va)
    if op.prev is not None:
        gpuva_map(vm, prev, op.prev)
    if op.next is not None:
        gpuva_map(vm, nxt, op.next)


def gpuva_unmap(op: DrmGpuvaOpUnmap) -> None:
    """Remove the mapping of an UNMAP step. Kernel: drm_gpuva_unmap()"""
    gpuva_remove(op.va)


def gpuva_op_remap_to_unmap_range(op: DrmGpuvaOpRemap) -> tuple[int, int]:
    """The ``(start, range)`` of the hole a REMAP step leaves in the old mapping.

    Kernel: drm_gpuva_op_remap_to_unmap_range() [include/drm/drm_gpuvm.h]
    """
    va = op.unmap.va
    start = op.prev.va.addr + op.prev.va.range if op.prev is not None else va.va.addr
    end = op.next.va.addr if op.next is not None else va.va.addr + va.va.range
    return start, end - start


# --- exec helpers ---------------------------------------------------------------------------


def _exec_prepare_obj(ex: DrmExec, obj: DrmGemObject, num_fences: int) -> None:
    """Kernel: exec_prepare_obj() [drivers/gpu/drm/drm_gpuvm.c]"""
    if num_fences:
        drm_exec.prepare_obj(ex, obj, num_fences)
    else:
        drm_exec.lock_obj(ex, obj)


def prepare_vm(vm: DrmGpuvm, ex: DrmExec, num_fences: int) -> None:
    """Lock the VM's resv (``r_obj``) in ``ex`` and reserve ``num_fences`` slots (0: lock only).

    Kernel: drm_gpuvm_prepare_vm() [drivers/gpu/drm/drm_gpuvm.c]

    Raises:
        Edeadlk: contention; the drm_exec loop restarts.
    """
    _exec_prepare_obj(ex, vm.r_obj, num_fences)


def prepare_objects(vm: DrmGpuvm, ex: DrmExec, num_fences: int) -> None:
    """Lock every external object of the VM in ``ex`` (private objects share the VM's resv,
    which :func:`prepare_vm` locks).

    Kernel: drm_gpuvm_prepare_objects() [drivers/gpu/drm/drm_gpuvm.c]
    Locking: ``RESV_PROTECTED``: the VM's resv (asserted), and every external vm_bo marked
    ``evicted`` moves onto the evict list here. Otherwise the extobj list is walked holding
    its spinlock only to pop entries; concurrent calls must still be serialised by the driver
    (call :func:`prepare_vm` first in the same loop).
    """
    if resv_protected(vm):
        resv_assert_held(vm)
        for vm_bo in list(vm.extobj.list):
            _exec_prepare_obj(ex, vm_bo.obj, num_fences)
            if vm_bo.evicted:
                _list_add(vm_bo, vm.evict, False)
        return
    for vm_bo in _for_each_vm_bo_in_list(vm, vm.extobj):
        _exec_prepare_obj(ex, vm_bo.obj, num_fences)


def prepare_range(vm: DrmGpuvm, ex: DrmExec, addr: int, range: int, num_fences: int) -> None:
    """Lock the object of every mapping overlapping ``[addr, addr + range)``.

    Kernel: drm_gpuvm_prepare_range() [drivers/gpu/drm/drm_gpuvm.c]

    The kernel passes a sparse mapping's NULL object on to drm_exec; here it is a WARN.
    """
    for va in for_each_va_range(vm, addr, addr + range):
        obj = va.gem.obj
        if warn_on(obj is None, f"drm_gpuvm_prepare_range: {va!r} has no object"):
            continue
        _exec_prepare_obj(ex, obj, num_fences)


class _Extra:
    """Kernel: ``struct drm_gpuvm_exec::extra``"""

    __slots__ = ("fn", "priv")

    def __init__(self, fn=None, priv=None) -> None:
        self.fn: Callable[[DrmGpuvmExec], None] | None = fn
        self.priv: Any = priv


class DrmGpuvmExec:
    """drm_exec wrapped for one VM. Kernel: struct drm_gpuvm_exec [include/drm/drm_gpuvm.h]

    ``flags`` are the drm_exec flags, ``num_fences`` the slots reserved on every locked
    object, ``extra.fn(vm_exec)`` locks more objects inside the same loop. As a context
    manager, leaving the block is :func:`exec_unlock`.
    """

    __slots__ = ("exec", "extra", "flags", "num_fences", "vm")

    def __init__(
        self,
        vm: DrmGpuvm,
        flags: drm_exec.DrmExecFlags | int = 0,
        num_fences: int = 0,
        fn: Callable[[DrmGpuvmExec], None] | None = None,
        priv: Any = None,
    ) -> None:
        self.vm = vm
        self.flags = flags
        self.num_fences = num_fences
        self.extra = _Extra(fn, priv)
        self.exec: DrmExec | None = None

    def __enter__(self) -> DrmGpuvmExec:
        return self

    def __exit__(self, *exc: object) -> None:
        exec_unlock(self)


def exec_lock(vm_exec: DrmGpuvmExec) -> None:
    """Lock the VM's resv, every external object and whatever ``extra.fn`` locks, in one
    drm_exec transaction (restarted on contention). On success the locks stay held until
    :func:`exec_unlock`; on failure everything is unlocked again.

    Kernel: drm_gpuvm_exec_lock() [drivers/gpu/drm/drm_gpuvm.c]

    Raises:
        Eintr, Enomem, Ealready, ...: what locking or reserving raised.
    """
    vm = vm_exec.vm
    num_fences = vm_exec.num_fences
    ex = vm_exec.exec = drm_exec.init(vm_exec.flags, 0)
    try:
        for attempt in drm_exec.until_all_locked(ex):
            with attempt:
                prepare_vm(vm, ex, num_fences)
                drm_exec.retry_on_contention(ex)
                prepare_objects(vm, ex, num_fences)
                drm_exec.retry_on_contention(ex)
                if vm_exec.extra.fn is not None:
                    vm_exec.extra.fn(vm_exec)
                    drm_exec.retry_on_contention(ex)
    except BaseException:
        drm_exec.fini(ex)
        raise


def exec_lock_array(vm_exec: DrmGpuvmExec, objs: list[DrmGemObject]) -> None:
    """:func:`exec_lock` plus ``objs`` (each with ``num_fences`` slots).

    Kernel: drm_gpuvm_exec_lock_array() [drivers/gpu/drm/drm_gpuvm.c]
    """

    def fn_lock_array(ve: DrmGpuvmExec) -> None:
        drm_exec.prepare_array(ve.exec, ve.extra.priv, ve.num_fences)

    vm_exec.extra = _Extra(fn_lock_array, list(objs))
    exec_lock(vm_exec)


def exec_lock_range(vm_exec: DrmGpuvmExec, addr: int, range: int) -> None:
    """Lock the objects mapped in ``[addr, addr + range)`` only (not the VM's resv, unless a
    mapping there is backed by ``r_obj``).

    Kernel: drm_gpuvm_exec_lock_range() [drivers/gpu/drm/drm_gpuvm.c]
    """
    ex = vm_exec.exec = drm_exec.init(vm_exec.flags, 0)
    try:
        for attempt in drm_exec.until_all_locked(ex):
            with attempt:
                prepare_range(vm_exec.vm, ex, addr, range, vm_exec.num_fences)
                drm_exec.retry_on_contention(ex)
    except BaseException:
        drm_exec.fini(ex)
        raise


def exec_unlock(vm_exec: DrmGpuvmExec) -> None:
    """Unlock everything :func:`exec_lock` locked. Kernel: drm_gpuvm_exec_unlock()"""
    if vm_exec.exec is not None:
        drm_exec.fini(vm_exec.exec)


def validate(vm: DrmGpuvm, ex: DrmExec) -> None:
    """Call ``ops.vm_bo_validate(vm_bo, ex)`` for every vm_bo on the VM's evict list, stopping
    at the first error.

    Kernel: drm_gpuvm_validate() [drivers/gpu/drm/drm_gpuvm.c]
    Locking: ``RESV_PROTECTED``: the VM's resv (asserted) and each object's resv (asserted
    after its callback); an entry whose ``evicted`` the callback cleared leaves the list.
    Otherwise the list is walked as :func:`prepare_objects` walks extobj, and removal is up to
    the callback (``bo_evict(vm_bo, False)``).

    Raises:
        KernelError(EOPNOTSUPP): the driver has no ``vm_bo_validate``.
        KernelError: what the callback raised.
    """
    ops = vm.ops
    if ops is None or ops.vm_bo_validate is None:
        raise KernelError(errno.EOPNOTSUPP, msg=f"{vm.name} has no vm_bo_validate")
    if resv_protected(vm):
        resv_assert_held(vm)
        for vm_bo in list(vm.evict.list):
            if vm_bo.entry_evict is None:
                continue  # an earlier callback took it off the list
            ops.vm_bo_validate(vm_bo, ex)
            dma_resv.assert_held(vm_bo.obj.resv)
            if not vm_bo.evicted:
                _list_del(vm_bo, vm.evict, False)
        return
    for vm_bo in _for_each_vm_bo_in_list(vm, vm.evict):
        ops.vm_bo_validate(vm_bo, ex)


def resv_add_fence(
    vm: DrmGpuvm,
    ex: DrmExec,
    fence: DmaFence,
    private_usage: DmaResvUsage,
    extobj_usage: DmaResvUsage,
) -> None:
    """Add ``fence`` to every object locked in ``ex``: ``extobj_usage`` on external objects,
    ``private_usage`` on the rest (the VM's resv among them). The slots must have been
    reserved (``num_fences`` >= 1 when locking).

    Kernel: drm_gpuvm_resv_add_fence() [drivers/gpu/drm/drm_gpuvm.c]
    """
    for _, obj in drm_exec.for_each_locked_object(ex):
        dma_resv.assert_held(obj.resv)
        usage = extobj_usage if is_extobj(vm, obj) else private_usage
        dma_resv.add_fence(obj.resv, fence, usage)


def exec_resv_add_fence(
    vm_exec: DrmGpuvmExec,
    fence: DmaFence,
    private_usage: DmaResvUsage,
    extobj_usage: DmaResvUsage,
) -> None:
    """Kernel: drm_gpuvm_exec_resv_add_fence() [include/drm/drm_gpuvm.h]"""
    resv_add_fence(vm_exec.vm, vm_exec.exec, fence, private_usage, extobj_usage)


def exec_validate(vm_exec: DrmGpuvmExec) -> None:
    """Kernel: drm_gpuvm_exec_validate() [include/drm/drm_gpuvm.h]"""
    validate(vm_exec.vm, vm_exec.exec)
