"""DOC: dma_resv, the reservation object: one ww_mutex plus the fences of a buffer.

Every buffer shared between drivers has a reservation object. Its lock is a Wait-Die ww_mutex
of :data:`RESERVATION_WW_CLASS`; its fence list records which operations still use the buffer,
each with a :class:`DmaResvUsage`. Asking for fences of one usage also returns the fences of
every lower usage (KERNEL < WRITE < READ < BOOKKEEP).

Adding a fence cannot fail: a submitter reserves slots while it may still back off, then adds
fences past the point of no return::

    dma_resv.lock(resv, None)
    dma_resv.reserve_fences(resv, 1)           # may raise Enomem
    ...                                        # validate, arm the job
    dma_resv.add_fence(resv, job_fence, DmaResvUsage.WRITE)
    dma_resv.unlock(resv)
    if not dma_resv.test_signaled(resv, DmaResvUsage.READ):
        dma_resv.wait_timeout(resv, DmaResvUsage.READ, True, MAX_SCHEDULE_TIMEOUT)

The model is the debug kernel (``CONFIG_DEBUG_MUTEXES``): :func:`unlock` shrinks
``max_fences`` to ``num_fences``, so a reservation made before an unlock is gone after it, and
:func:`add_fence` without a fresh reservation is caught.

Readers that do not hold the lock use the unlocked iterator, which sees a snapshot of the list
and restarts (``is_restarted``) when the list is replaced by a reallocation; it skips fences that
have signaled. The locked iterator returns every matching entry, signaled or not.

Slab rounding is not modelled: a reallocated list has exactly ``max(num + n, 2 * max)`` slots
(at least 4).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from enum import IntEnum

from gemu.guest.dma_buf import dma_fence
from gemu.guest.dma_buf.dma_fence import MAX_SCHEDULE_TIMEOUT, DmaFence
from gemu.guest.errors import Einval, Enomem, warn_on
from gemu.guest.kernel import runtime
from gemu.guest.locking import lockdep, ww_mutex
from gemu.guest.mm.gfp import GFP_KERNEL

__all__ = [
    "MAX_SCHEDULE_TIMEOUT",
    "RESERVATION_WW_CLASS",
    "DmaResv",
    "DmaResvIter",
    "DmaResvList",
    "DmaResvUsage",
]

RESERVATION_WW_CLASS: ww_mutex.WwClass = ww_mutex.RESERVATION_WW_CLASS
"""The Wait-Die ww class of every reservation lock, with lockdep classes
``reservation_ww_class_mutex``/``_acquire``. Kernel: reservation_ww_class (DEFINE_WD_CLASS).

It is the one instance :mod:`~gemu.guest.locking.ww_mutex` defines: a ww class is a stamp
counter and an identity that acquire contexts are checked against, so there must be only one."""


class DmaResvUsage(IntEnum):
    """How a fence uses the buffer; lower values are stricter.

    Kernel: enum dma_resv_usage [include/linux/dma-resv.h]

    The order is KERNEL < WRITE < READ < BOOKKEEP, and a query for one usage also returns the
    fences of every lower usage. A fence may be promoted (added again with a lower usage), never
    degraded.
    """

    KERNEL = 0
    """In-kernel memory management (moves, clears); everyone must wait for these."""
    WRITE = 1
    """Implicitly synchronised writes."""
    READ = 2
    """Implicitly synchronised reads."""
    BOOKKEEP = 3
    """No implicit sync: preemption fences, page-table updates, explicitly synced submits."""


def usage_rw(write: bool) -> DmaResvUsage:
    """The usage a new access must wait for: a writer waits for readers too.

    Kernel: dma_resv_usage_rw() [include/linux/dma-resv.h]
    """
    return DmaResvUsage.READ if write else DmaResvUsage.WRITE


#: Fault injection for list allocations: called with (obj, slots); returning True fails the
#: allocation with -ENOMEM. Tests and the memory model plug in here.
should_fail_alloc: Callable[[DmaResv | None, int], bool] | None = None


def _alloc(obj: DmaResv | None, slots: int) -> None:
    lockdep.might_alloc(GFP_KERNEL)
    hook = should_fail_alloc
    if hook is not None and hook(obj, slots):
        raise Enomem(msg=f"dma_resv list of {slots} slots")


class DmaResvList:
    """The fence table. Kernel: struct dma_resv_list [drivers/dma-buf/dma-resv.c]

    Invariant: ``num_fences <= max_fences``; entries ``[0, num_fences)`` are ``(fence, usage)``
    pairs each holding one fence reference.
    """

    __slots__ = ("max_fences", "num_fences", "table")

    def __init__(self, max_fences: int) -> None:
        self.max_fences = max_fences
        self.num_fences = 0
        self.table: list[tuple[DmaFence, DmaResvUsage]] = []


class DmaResv:
    """A reservation object. Kernel: struct dma_resv [include/linux/dma-resv.h]

    ``lock`` guards ``fences`` for writers. ``fences`` is None until the first reservation and
    is replaced (never resized in place) when it grows, which is what restarts unlocked readers.
    """

    __slots__ = ("__weakref__", "fences", "lock")

    def __init__(self, name: str = "resv") -> None:
        self.lock = ww_mutex.WwMutex(RESERVATION_WW_CLASS, name)
        self.fences: DmaResvList | None = None

    def __repr__(self) -> str:
        n = self.fences.num_fences if self.fences else 0
        return f"<DmaResv {self.lock.name} fences={n}>"


def init(obj: DmaResv | None = None, name: str = "resv") -> DmaResv:
    """Return an unlocked reservation object with no fences. Kernel: dma_resv_init()"""
    if obj is None:
        return DmaResv(name)
    DmaResv.__init__(obj, name)
    return obj


def fini(obj: DmaResv) -> None:
    """Drop every fence of the object. Kernel: dma_resv_fini() [drivers/dma-buf/dma-resv.c]"""
    warn_on(is_locked(obj), f"dma_resv_fini on locked {obj!r}")
    _list_free(obj.fences)
    obj.fences = None


def _list_free(lst: DmaResvList | None) -> None:
    if lst is None:
        return
    for fence, _ in lst.table[: lst.num_fences]:
        dma_fence.put(fence)


# --- locking ----------------------------------------------------------------------------


def lock(obj: DmaResv, ctx: ww_mutex.WwAcquireCtx | None) -> None:
    """Lock the reservation object, as part of ``ctx`` or (with None) on its own.

    Kernel: dma_resv_lock() [include/linux/dma-resv.h]

    Raises:
        Edeadlk: wait-die says back off: unlock everything of ``ctx``, then :func:`lock_slow`.
        Ealready: ``ctx`` already holds this object.
    """
    ww_mutex.lock(obj.lock, ctx)


def lock_interruptible(obj: DmaResv, ctx: ww_mutex.WwAcquireCtx | None) -> None:
    """Like :func:`lock`, but a pending signal aborts the wait.

    Kernel: dma_resv_lock_interruptible() [include/linux/dma-resv.h]

    Raises:
        Edeadlk, Ealready: as :func:`lock`.
        Eintr: a signal is pending.
    """
    ww_mutex.lock_interruptible(obj.lock, ctx)


def lock_slow(obj: DmaResv, ctx: ww_mutex.WwAcquireCtx) -> None:
    """Sleep for the contended object after -EDEADLK, holding nothing else of ``ctx``.

    Kernel: dma_resv_lock_slow() [include/linux/dma-resv.h]
    """
    ww_mutex.lock_slow(obj.lock, ctx)


def lock_slow_interruptible(obj: DmaResv, ctx: ww_mutex.WwAcquireCtx) -> None:
    """Interruptible :func:`lock_slow`. Kernel: dma_resv_lock_slow_interruptible()

    Raises:
        Eintr: a signal is pending.
    """
    ww_mutex.lock_slow_interruptible(obj.lock, ctx)


def trylock(obj: DmaResv) -> bool:
    """Lock without waiting and without a context. Kernel: dma_resv_trylock()"""
    return ww_mutex.trylock(obj.lock, None)


def unlock(obj: DmaResv) -> None:
    """Drop the lock; fence slots reserved but unused are forgotten.

    Kernel: dma_resv_unlock() with dma_resv_reset_max_fences() [include/linux/dma-resv.h]
    """
    reset_max_fences(obj)
    ww_mutex.unlock(obj.lock)


def reset_max_fences(obj: DmaResv) -> None:
    """Forget unused reservations so that a missing :func:`reserve_fences` is caught.

    Kernel: dma_resv_reset_max_fences() [drivers/dma-buf/dma-resv.c] (CONFIG_DEBUG_MUTEXES)
    """
    assert_held(obj)
    fences = obj.fences
    if fences is not None:
        fences.max_fences = fences.num_fences


def is_locked(obj: DmaResv) -> bool:
    """Whether anyone holds the lock. Kernel: dma_resv_is_locked()"""
    return ww_mutex.is_locked(obj.lock)


def locking_ctx(obj: DmaResv) -> ww_mutex.WwAcquireCtx | None:
    """The acquire context holding the lock, if any. Kernel: dma_resv_locking_ctx()"""
    return obj.lock.ctx


def held(obj: DmaResv) -> bool:
    """Whether the current task holds the lock. Kernel: dma_resv_held()"""
    return lockdep.held(obj.lock)


def assert_held(obj: DmaResv) -> None:
    """Fail loudly unless the current task holds the lock. Kernel: dma_resv_assert_held()"""
    lockdep.assert_held(obj.lock)


# --- fences -----------------------------------------------------------------------------


def reserve_fences(obj: DmaResv, num_fences: int) -> None:
    """Make room so that ``num_fences`` more :func:`add_fence` calls cannot fail.

    Kernel: dma_resv_reserve_fences() [drivers/dma-buf/dma-resv.c]
    Locking: caller holds ``obj`` (asserted). The reservation lasts until :func:`unlock`.

    Growing replaces the list with one of ``max(num + n, 2 * max)`` slots (at least 4) holding
    only the unsignaled fences.

    Raises:
        Einval: ``num_fences`` is 0 (also warns: reserving nothing is a bug).
        Enomem: the new list could not be allocated; the old one is untouched.
    """
    assert_held(obj)
    if warn_on(num_fences <= 0, f"reserve_fences: num_fences must be positive, not {num_fences!r}"):
        raise Einval(msg="reserve_fences(0)")
    old = obj.fences
    if old is not None and old.max_fences:
        if old.num_fences + num_fences <= old.max_fences:
            return
        max_fences = max(old.num_fences + num_fences, old.max_fences * 2)
    else:
        max_fences = max(4, num_fences)
    _alloc(obj, max_fences)
    new = DmaResvList(max_fences)
    keep: list[tuple[DmaFence, DmaResvUsage]] = []
    drop: list[DmaFence] = []
    if old is not None:
        for fence, usage in old.table[: old.num_fences]:
            if dma_fence.is_signaled(fence):
                drop.append(fence)
            else:
                keep.append((fence, usage))
    new.table = keep
    new.num_fences = len(keep)
    obj.fences = new
    for fence in drop:
        dma_fence.put(fence)


def _replaces_any(new: DmaFence, old: DmaFence) -> bool:
    return True


replaces_same_context: Callable[[DmaFence, DmaFence], bool] = dma_fence.is_later_or_same
"""Whether :func:`add_fence` may put ``new`` in the slot of ``old``, a fence of the same
context: ``dma_fence_is_later_or_same`` since 95ba893c9f4f. gemu explore's
``resv-replace-older`` mutant (set by the driver at probe) makes it :func:`_replaces_any`,
the test before a3f7c10a269d "dma-buf/dma-resv: check if the new fence is really later"."""


def set_replaces_older(on: bool) -> None:
    """Switch gemu explore's ``resv-replace-older`` mutant on or off (process-wide)."""
    global replaces_same_context
    replaces_same_context = _replaces_any if on else dma_fence.is_later_or_same


def add_fence(obj: DmaResv, fence: DmaFence, usage: DmaResvUsage) -> None:
    """Record that ``fence`` uses the buffer as ``usage``, in a reserved slot.

    Kernel: dma_resv_add_fence() [drivers/dma-buf/dma-resv.c]
    Locking: caller holds ``obj`` (asserted) and reserved a slot since locking it.

    An entry is replaced in place when it is of the same context, of an equal or weaker usage
    and not later than ``fence`` (so a fence is promoted, never degraded), or when it has
    signaled. Otherwise ``fence`` takes a new slot. Publishing the fence starts its signalling
    critical section for the task that must signal it. Takes its own reference.

    Adding without a free slot is the kernel's ``BUG_ON``: it warns (and in non-strict runs
    grows the list so the run continues).
    """
    assert_held(obj)
    if dma_fence.is_container(fence):
        warn_on(True, f"add_fence: container fence {fence!r}; add its members instead")
    runtime.preempt("dma_resv.add_fence", obj)
    dma_fence.get(fence)
    lockdep.fence_published(fence)
    fobj = obj.fences
    if fobj is not None:
        table = fobj.table
        for i in range(fobj.num_fences):
            old, old_usage = table[i]
            if (
                old.context == fence.context
                and old_usage >= usage
                and replaces_same_context(fence, old)
            ) or dma_fence.is_signaled(old):
                table[i] = (fence, usage)
                dma_fence.put(old)
                return
    if (fobj is None or fobj.num_fences >= fobj.max_fences) and warn_on(
        True, f"add_fence on {obj!r} without a reserved slot: call reserve_fences after locking"
    ):
        if fobj is None:
            fobj = obj.fences = DmaResvList(0)
        fobj.max_fences = fobj.num_fences + 1
    fobj.table.append((fence, usage))
    fobj.num_fences += 1


def replace_fences(obj: DmaResv, context: int, replacement: DmaFence, usage: DmaResvUsage) -> None:
    """Replace every fence of ``context`` with ``replacement`` at ``usage``.

    Kernel: dma_resv_replace_fences() [drivers/dma-buf/dma-resv.c]
    Locking: caller holds ``obj`` (asserted).
    """
    assert_held(obj)
    lst = obj.fences
    if lst is None:
        return
    for i in range(lst.num_fences):
        old, _ = lst.table[i]
        if old.context != context:
            continue
        lst.table[i] = (dma_fence.get(replacement), usage)
        dma_fence.put(old)


# --- iteration --------------------------------------------------------------------------


class DmaResvIter:
    """Cursor over the fences of one reservation object. Kernel: struct dma_resv_iter

    ``usage`` is the query; ``fence``/``fence_usage`` the current entry; ``fences`` and
    ``num_fences`` the snapshot being walked; ``is_restarted`` is true on the first fence
    returned after the walk (re)started.
    """

    __slots__ = (
        "fence",
        "fence_usage",
        "fences",
        "index",
        "is_restarted",
        "num_fences",
        "obj",
        "usage",
    )

    def __init__(self, obj: DmaResv, usage: DmaResvUsage) -> None:
        self.obj = obj
        self.usage = usage
        self.fence: DmaFence | None = None
        self.fence_usage = DmaResvUsage.KERNEL
        self.fences: DmaResvList | None = None
        self.index = 0
        self.num_fences = 0
        self.is_restarted = False


def iter_begin(obj: DmaResv, usage: DmaResvUsage) -> DmaResvIter:
    """Start a cursor. Kernel: dma_resv_iter_begin() [include/linux/dma-resv.h]"""
    return DmaResvIter(obj, usage)


def iter_end(cursor: DmaResvIter) -> None:
    """Finish a cursor, dropping the unlocked walker's reference. Kernel: dma_resv_iter_end()"""
    if cursor.fences is not None:
        dma_fence.put(cursor.fence)
    cursor.fence = None


def iter_usage(cursor: DmaResvIter) -> DmaResvUsage:
    """The usage of the current fence. Kernel: dma_resv_iter_usage()"""
    return cursor.fence_usage


def iter_is_restarted(cursor: DmaResvIter) -> bool:
    """Whether the current fence is the first after a (re)start. Kernel: dma_resv_iter_is_restarted()"""
    return cursor.is_restarted


def _restart(cursor: DmaResvIter) -> None:
    cursor.index = 0
    cursor.is_restarted = True
    cursor.fences = cursor.obj.fences
    cursor.num_fences = cursor.fences.num_fences if cursor.fences is not None else 0


def _walk_unlocked(cursor: DmaResvIter) -> None:
    while True:
        dma_fence.put(cursor.fence)
        cursor.fence = None
        if cursor.index >= cursor.num_fences:
            return
        fence, fence_usage = cursor.fences.table[cursor.index]
        cursor.index += 1
        cursor.fence = dma_fence.get(fence)
        cursor.fence_usage = fence_usage
        if cursor.usage >= fence_usage and not dma_fence.is_signaled(fence):
            return


def iter_first_unlocked(cursor: DmaResvIter) -> DmaFence | None:
    """First unsignaled fence of the query, without the lock.

    Kernel: dma_resv_iter_first_unlocked() [drivers/dma-buf/dma-resv.c]
    """
    runtime.preempt("dma_resv.iter_unlocked", cursor.obj)
    while True:
        _restart(cursor)
        _walk_unlocked(cursor)
        if cursor.obj.fences is cursor.fences:
            return cursor.fence


def iter_next_unlocked(cursor: DmaResvIter) -> DmaFence | None:
    """Next unsignaled fence; restarts from the top if the list was replaced meanwhile.

    Kernel: dma_resv_iter_next_unlocked() [drivers/dma-buf/dma-resv.c]
    """
    runtime.preempt("dma_resv.iter_unlocked", cursor.obj)
    cursor.is_restarted = False
    restart = cursor.obj.fences is not cursor.fences
    while True:
        if restart:
            _restart(cursor)
        _walk_unlocked(cursor)
        restart = True
        if cursor.obj.fences is cursor.fences:
            return cursor.fence


def for_each_fence_unlocked(cursor: DmaResvIter) -> Iterator[DmaFence]:
    """Yield every unsignaled fence of the cursor's query; check ``cursor.is_restarted``.

    Kernel: dma_resv_for_each_fence_unlocked() [include/linux/dma-resv.h]

    The cursor holds a reference to the yielded fence until the next step or
    :func:`iter_end`; take your own with :func:`dma_fence.get` to keep it.
    """
    fence = iter_first_unlocked(cursor)
    while fence is not None:
        yield fence
        fence = iter_next_unlocked(cursor)


def _walk_locked(cursor: DmaResvIter) -> DmaFence | None:
    lst = cursor.obj.fences
    while lst is not None and cursor.index < lst.num_fences:
        fence, fence_usage = lst.table[cursor.index]
        cursor.index += 1
        if cursor.usage >= fence_usage:
            cursor.fence = fence
            cursor.fence_usage = fence_usage
            return fence
    cursor.fence = None
    return None


def iter_first(cursor: DmaResvIter) -> DmaFence | None:
    """First fence of the query, signaled or not. Kernel: dma_resv_iter_first()

    Locking: caller holds the object (asserted).
    """
    assert_held(cursor.obj)
    cursor.index = 0
    cursor.is_restarted = True
    return _walk_locked(cursor)


def iter_next(cursor: DmaResvIter) -> DmaFence | None:
    """Next fence of the query, signaled or not. Kernel: dma_resv_iter_next()

    Locking: caller holds the object (asserted).
    """
    assert_held(cursor.obj)
    cursor.is_restarted = False
    return _walk_locked(cursor)


def for_each_fence(
    obj: DmaResv, usage: DmaResvUsage, cursor: DmaResvIter | None = None
) -> Iterator[DmaFence]:
    """Yield every fence with usage <= ``usage``, including signaled ones; no references taken.

    Kernel: dma_resv_for_each_fence() [include/linux/dma-resv.h]
    Locking: caller holds ``obj`` (asserted). Pass ``cursor`` to read ``iter_usage`` per fence.
    """
    if cursor is None:
        cursor = DmaResvIter(obj, usage)
    fence = iter_first(cursor)
    while fence is not None:
        yield fence
        fence = iter_next(cursor)


# --- queries ----------------------------------------------------------------------------


def test_signaled(obj: DmaResv, usage: DmaResvUsage) -> bool:
    """True if every fence with usage <= ``usage`` has signaled. No lock needed.

    Kernel: dma_resv_test_signaled() [drivers/dma-buf/dma-resv.c]
    """
    cursor = iter_begin(obj, usage)
    fence = iter_first_unlocked(cursor)
    iter_end(cursor)
    return fence is None


def wait_timeout(obj: DmaResv, usage: DmaResvUsage, intr: bool, timeout_ns: int) -> int:
    """Wait for every fence with usage <= ``usage``; no lock needed.

    Kernel: dma_resv_wait_timeout() [drivers/dma-buf/dma-resv.c]

    Returns the time left (>0) when all signaled, 0 on timeout. A zero timeout waits at most
    the smallest tick per fence (the kernel's one jiffy), i.e. it polls.

    Raises:
        Erestartsys: ``intr`` and a signal is pending.
    """
    ret = timeout_ns if timeout_ns else 1
    cursor = iter_begin(obj, usage)
    try:
        for fence in for_each_fence_unlocked(cursor):
            ret = dma_fence.wait_timeout(fence, intr, ret)
            if ret <= 0:
                return ret
    finally:
        iter_end(cursor)
    return ret


def get_fences(obj: DmaResv, usage: DmaResvUsage) -> list[DmaFence]:
    """Return referenced copies of the unsignaled fences with usage <= ``usage``.

    Kernel: dma_resv_get_fences() [drivers/dma-buf/dma-resv.c]

    Raises:
        Enomem: the array could not be allocated.
    """
    fences: list[DmaFence] = []
    cursor = iter_begin(obj, usage)
    try:
        for fence in for_each_fence_unlocked(cursor):
            if cursor.is_restarted:
                for f in fences:
                    dma_fence.put(f)
                fences = []
                _alloc(obj, cursor.num_fences)
            fences.append(dma_fence.get(fence))
    except BaseException:
        for f in fences:
            dma_fence.put(f)
        raise
    finally:
        iter_end(cursor)
    return fences


def get_singleton(obj: DmaResv, usage: DmaResvUsage) -> DmaFence | None:
    """One fence standing for all unsignaled fences with usage <= ``usage``, or None.

    Kernel: dma_resv_get_singleton() [drivers/dma-buf/dma-resv.c]

    Several fences are wrapped in a :class:`~dma_fence.DmaFenceArray` on a fresh context.

    Raises:
        Enomem: allocation failed.
    """
    fences = get_fences(obj, usage)
    if not fences:
        return None
    if len(fences) == 1:
        return fences[0]
    return dma_fence.array_create(fences, dma_fence.context_alloc(1), 1, False)


def copy_fences(dst: DmaResv, src: DmaResv) -> None:
    """Make ``dst`` hold the unsignaled fences of ``src`` with their usages.

    Kernel: dma_resv_copy_fences() [drivers/dma-buf/dma-resv.c]
    Locking: caller holds ``dst`` (asserted); ``src`` is read without its lock.

    Raises:
        Enomem: the new list could not be allocated; ``dst`` is untouched.
    """
    assert_held(dst)
    new: DmaResvList | None = None
    cursor = iter_begin(src, DmaResvUsage.BOOKKEEP)
    try:
        for fence in for_each_fence_unlocked(cursor):
            if cursor.is_restarted:
                _list_free(new)
                _alloc(dst, cursor.num_fences)
                new = DmaResvList(cursor.num_fences)
            new.table.append((dma_fence.get(fence), cursor.fence_usage))
            new.num_fences += 1
    except BaseException:
        _list_free(new)
        raise
    finally:
        iter_end(cursor)
    old, dst.fences = dst.fences, new
    _list_free(old)
