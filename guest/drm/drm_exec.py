"""DOC: drm_exec, lock many reservation objects at once with ww_mutex backoff.

A submitter locks every buffer of a job under one acquire ticket. When wait-die says back off
(-EDEADLK), drm_exec drops every lock, remembers the contended object, and runs the locking
body again; on that pass the contended object is locked first with the sleeping slow path, so
the loop always makes progress.

The kernel writes the retry loop as ``drm_exec_until_all_locked(exec) { ...;
drm_exec_retry_on_contention(exec); }`` with a ``goto`` back to the top. The model's idiom is a
``for`` loop whose body runs inside the attempt's ``with`` block; an -EDEADLK leaving the block
(or :func:`retry_on_contention` seeing contention) restarts the body with nothing locked::

    with drm_exec.init(DRM_EXEC_INTERRUPTIBLE_WAIT, 0) as ex:
        for attempt in drm_exec.until_all_locked(ex):
            with attempt:
                drm_exec.prepare_obj(ex, bo_a, 1)
                drm_exec.prepare_obj(ex, bo_b, 1)
        for _, obj in drm_exec.for_each_locked_object(ex):
            dma_resv.add_fence(obj.resv, fence, DmaResvUsage.READ)
    # leaving the outer with is drm_exec_fini(): everything unlocked on every path

Any other error (-EINTR, -ENOMEM, -EALREADY) leaves the loop as an exception; the outer ``with``
still unlocks everything. The kernel-literal form works too: ``while drm_exec.cleanup(ex):``
with ``try: ... except Edeadlk: continue`` as the body, then :func:`fini`.

Objects are anything with a ``resv`` attribute (:class:`LockableObject`). A GEM object
(:class:`~gemu.guest.drm.gem.DrmGemObject`) is held by a reference from the moment it is locked
(or found contended) until it is unlocked, as the kernel's ``drm_exec_obj_locked()`` takes
``drm_gem_object_get()`` and ``drm_exec_unlock_all()`` drops it: a caller may drop its own last
reference while the object is locked, and the object is freed only by :func:`fini` (or by the
unlock of a restart). A bare reservation holder (a unit test's stand-in, no reference count)
is tracked without one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from enum import IntFlag
from typing import Protocol

from gemu.guest.dma_buf import dma_resv
from gemu.guest.dma_buf.dma_resv import DmaResv
from gemu.guest.drm import gem
from gemu.guest.errors import Ealready, Edeadlk, Enomem, warn_on
from gemu.guest.locking import lockdep, ww_mutex
from gemu.guest.mm.gfp import GFP_KERNEL

PAGE_SIZE = 4096
_PTRS_PER_PAGE = PAGE_SIZE // 8


class DrmExecFlags(IntFlag):
    """Kernel: DRM_EXEC_* [include/drm/drm_exec.h]"""

    INTERRUPTIBLE_WAIT = 1 << 0
    """Lock with the interruptible variants (a pending signal gives -EINTR)."""
    IGNORE_DUPLICATES = 1 << 1
    """Locking an object twice is not an error (-EALREADY is swallowed)."""


DRM_EXEC_INTERRUPTIBLE_WAIT = DrmExecFlags.INTERRUPTIBLE_WAIT
DRM_EXEC_IGNORE_DUPLICATES = DrmExecFlags.IGNORE_DUPLICATES


class LockableObject(Protocol):
    """What drm_exec needs of an object: its reservation object (a GEM object's ``resv``)."""

    resv: DmaResv


class _Dummy:
    def __repr__(self) -> str:
        return "DRM_EXEC_DUMMY"


DRM_EXEC_DUMMY = _Dummy()
"""Marks a :class:`DrmExec` whose loop has not started (no ticket yet)."""

#: Fault injection for growing the object table (True → -ENOMEM).
should_fail_alloc = None


class DrmExec:
    """State of one multi-object locking transaction. Kernel: struct drm_exec

    Invariants: ``objects`` lists exactly the locked objects, in locking order; ``contended`` is
    :data:`DRM_EXEC_DUMMY` before the loop, else None or the object to lock first on the next
    pass; ``prelocked`` is the object locked by that slow path and not yet claimed by
    :func:`lock_obj`.
    """

    __slots__ = ("contended", "flags", "max_objects", "objects", "prelocked", "ticket")

    def __init__(self, flags: DrmExecFlags | int = 0, nr: int = 0) -> None:
        self.flags = flags if type(flags) is DrmExecFlags else DrmExecFlags(flags)
        self.max_objects = nr if nr else _PTRS_PER_PAGE
        self.objects: list[LockableObject] = []
        self.ticket: ww_mutex.WwAcquireCtx | None = None
        self.contended: object = DRM_EXEC_DUMMY
        self.prelocked: LockableObject | None = None

    @property
    def num_objects(self) -> int:
        return len(self.objects)

    def __enter__(self) -> DrmExec:
        return self

    def __exit__(self, *exc) -> None:
        fini(self)

    def __repr__(self) -> str:
        return f"<DrmExec flags={self.flags!r} locked={len(self.objects)}>"


def init(flags: DrmExecFlags | int = 0, nr: int = 0) -> DrmExec:
    """Start a transaction; ``nr`` sizes the initial table (0: one page of pointers).

    Kernel: drm_exec_init() [drivers/gpu/drm/drm_exec.c]
    """
    return DrmExec(flags, nr)


def _get(obj: LockableObject) -> None:
    """drm_gem_object_get() for a GEM object; nothing for a bare reservation holder."""
    if isinstance(obj, gem.DrmGemObject):
        gem.get(obj)


def _put(obj: LockableObject | None) -> None:
    """drm_gem_object_put() for a GEM object (None allowed, as in the kernel)."""
    if isinstance(obj, gem.DrmGemObject):
        gem.put(obj)


def _unlock_all(ex: DrmExec) -> None:
    """Unlock every object and drop its reference. Kernel: drm_exec_unlock_all()

    The references go after all the unlocks: a put may free the object, and the free of a
    GEM object must not find its reservation still locked.
    """
    if ex.objects:
        objects = ex.objects[::-1]
        ex.objects.clear()
        for obj in objects:
            dma_resv.unlock(obj.resv)
        for obj in objects:
            _put(obj)
    prelocked = ex.prelocked
    if prelocked is not None:
        ex.prelocked = None
        _put(prelocked)


def fini(ex: DrmExec) -> None:
    """Unlock every object and end the ticket. Safe on every path, also twice.

    Kernel: drm_exec_fini() [drivers/gpu/drm/drm_exec.c]
    """
    _unlock_all(ex)
    if ex.contended is not DRM_EXEC_DUMMY:
        contended, ex.contended = ex.contended, DRM_EXEC_DUMMY
        _put(contended)  # the reference lock_obj took when it backed off
        ww_mutex.acquire_fini(ex.ticket)
        ex.ticket = None


def cleanup(ex: DrmExec) -> bool:
    """Loop condition: True to run the locking body (again), False once all is locked.

    Kernel: drm_exec_cleanup() [drivers/gpu/drm/drm_exec.c]

    The first call starts the ticket. After a pass without contention it marks the ticket done
    and ends the loop. After contention it unlocks everything, so each pass starts with
    nothing locked.
    """
    if ex.contended is None:
        ww_mutex.acquire_done(ex.ticket)
        return False
    if ex.contended is DRM_EXEC_DUMMY:
        ex.contended = None
        ex.ticket = ww_mutex.acquire_init(dma_resv.RESERVATION_WW_CLASS)
        return True
    _unlock_all(ex)
    return True


class _Restart(Exception):
    """Raised by :func:`retry_on_contention` to leave the body; swallowed by the attempt."""


class Attempt:
    """One pass of the locking body; use as ``with attempt:``.

    Leaving the block with -EDEADLK (or through :func:`retry_on_contention`) while an object is
    contended ends this pass quietly, and the loop runs the body again.
    """

    __slots__ = ("ex",)

    def __init__(self, ex: DrmExec) -> None:
        self.ex = ex

    def __enter__(self) -> Attempt:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            return False
        return issubclass(exc_type, _Restart | Edeadlk) and is_contended(self.ex)


def until_all_locked(ex: DrmExec) -> Iterator[Attempt]:
    """Run the locking body until every object is locked without contention.

    Kernel: drm_exec_until_all_locked() [include/drm/drm_exec.h]

    At the start of every pass nothing of ``ex`` is locked.
    """
    while cleanup(ex):
        yield Attempt(ex)


def retry_on_contention(ex: DrmExec) -> None:
    """Restart the locking body if the last lock attempt hit contention.

    Kernel: drm_exec_retry_on_contention() [include/drm/drm_exec.h]

    Must run inside an attempt's ``with`` block (that is where the restart lands).
    """
    if is_contended(ex):
        raise _Restart()


def is_contended(ex: DrmExec) -> bool:
    """Whether a pass must be restarted. Kernel: drm_exec_is_contended()"""
    return ex.contended is not None and ex.contended is not DRM_EXEC_DUMMY


def _obj_locked(ex: DrmExec, obj: LockableObject) -> None:
    """Track a just-locked object and take its reference. Kernel: drm_exec_obj_locked()

    Growing a full table allocates (GFP_KERNEL); if that fails nothing was taken.
    """
    if len(ex.objects) == ex.max_objects:
        lockdep.might_alloc(GFP_KERNEL)
        hook = should_fail_alloc
        if hook is not None and hook(ex):
            raise Enomem(msg="drm_exec object table")
        ex.max_objects += _PTRS_PER_PAGE
    _get(obj)
    ex.objects.append(obj)


def _lock_contended(ex: DrmExec) -> None:
    """Lock the object the last pass backed off from, first. Kernel: drm_exec_lock_contended()

    The reference taken at the back-off moves to ``prelocked`` (the table holds its own); on
    an error it is dropped.
    """
    obj = ex.contended
    if obj is None:
        return
    # Clear it first so an error here reaches the caller's error handling instead of looping.
    ex.contended = None
    try:
        if ex.flags & DrmExecFlags.INTERRUPTIBLE_WAIT:
            dma_resv.lock_slow_interruptible(obj.resv, ex.ticket)
        else:
            dma_resv.lock_slow(obj.resv, ex.ticket)
    except BaseException:
        _put(obj)
        raise
    try:
        _obj_locked(ex, obj)
    except BaseException:
        dma_resv.unlock(obj.resv)
        _put(obj)
        raise
    ex.prelocked = obj


def lock_obj(ex: DrmExec, obj: LockableObject) -> None:
    """Lock ``obj`` as part of the transaction and track it.

    Kernel: drm_exec_lock_obj() [drivers/gpu/drm/drm_exec.c]

    A pending contended object is locked first (slow path). The object just locked that way is
    not locked twice. A locked GEM object is held by a reference until it is unlocked; one
    that backs off (-EDEADLK) is held until the next pass locks it (or :func:`fini`).

    Raises:
        Edeadlk: back off; ``obj`` is now the contended object (restart the loop).
        Ealready: ``obj`` is already locked by this transaction (not with IGNORE_DUPLICATES).
        Eintr: a signal is pending (INTERRUPTIBLE_WAIT).
        Enomem: the table could not grow; ``obj`` is left unlocked.
    """
    warn_on(ex.contended is DRM_EXEC_DUMMY, "drm_exec: lock_obj outside until_all_locked")
    _lock_contended(ex)
    if ex.prelocked is obj:
        ex.prelocked = None
        _put(obj)  # the table keeps its own reference
        return
    try:
        if ex.flags & DrmExecFlags.INTERRUPTIBLE_WAIT:
            dma_resv.lock_interruptible(obj.resv, ex.ticket)
        else:
            dma_resv.lock(obj.resv, ex.ticket)
    except Edeadlk:
        _get(obj)
        ex.contended = obj
        raise
    except Ealready:
        if ex.flags & DrmExecFlags.IGNORE_DUPLICATES:
            return
        raise
    try:
        _obj_locked(ex, obj)
    except BaseException:
        dma_resv.unlock(obj.resv)
        raise


def unlock_obj(ex: DrmExec, obj: LockableObject) -> None:
    """Unlock and untrack ``obj`` (cheapest for the most recently locked objects).

    Kernel: drm_exec_unlock_obj() [drivers/gpu/drm/drm_exec.c]
    """
    for i in range(len(ex.objects) - 1, -1, -1):
        if ex.objects[i] is obj:
            dma_resv.unlock(obj.resv)
            del ex.objects[i]
            _put(obj)
            return


def prepare_obj(ex: DrmExec, obj: LockableObject, num_fences: int) -> None:
    """Lock ``obj`` and reserve ``num_fences`` fence slots on it.

    Kernel: drm_exec_prepare_obj() [drivers/gpu/drm/drm_exec.c]

    Raises:
        Edeadlk, Ealready, Eintr, Enomem: as :func:`lock_obj`; a failed reservation
        (Enomem, Einval) unlocks ``obj`` again.
    """
    lock_obj(ex, obj)
    try:
        dma_resv.reserve_fences(obj.resv, num_fences)
    except BaseException:
        unlock_obj(ex, obj)
        raise


def prepare_array(ex: DrmExec, objs: Iterable[LockableObject], num_fences: int) -> None:
    """:func:`prepare_obj` each object in turn, stopping at the first error.

    Kernel: drm_exec_prepare_array() [drivers/gpu/drm/drm_exec.c]
    """
    for obj in objs:
        prepare_obj(ex, obj, num_fences)


def obj(ex: DrmExec, index: int) -> LockableObject | None:
    """The ``index``-th locked object, or None past the end. Kernel: drm_exec_obj()"""
    return ex.objects[index] if 0 <= index < len(ex.objects) else None


def for_each_locked_object(ex: DrmExec) -> Iterator[tuple[int, LockableObject]]:
    """Yield ``(index, obj)`` for every locked object in locking order.

    Kernel: drm_exec_for_each_locked_object() [include/drm/drm_exec.h]
    """
    yield from enumerate(list(ex.objects))


def for_each_locked_object_reverse(ex: DrmExec) -> Iterator[tuple[int, LockableObject]]:
    """Yield ``(index, obj)`` for every locked object, last locked first.

    Kernel: drm_exec_for_each_locked_object_reverse() [include/drm/drm_exec.h]
    """
    objects = list(ex.objects)
    for i in range(len(objects) - 1, -1, -1):
        yield i, objects[i]
