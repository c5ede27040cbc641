"""DOC: drm_gem_lru, ordered lists of GEM objects for a shrinker to walk.

An LRU is a list of GEM objects, least recently used first, plus the number of pages they
hold (``count``, what a shrinker's ``count_objects`` reports). An object is on at most one LRU
at a time (``obj.lru``); moving it to another LRU takes it off the old one. Every change
happens under the LRU's lock, and all LRUs that objects move between must share one lock,
because a move touches both.

:func:`scan` is the reclaim walk: it takes objects from the head, skips the ones being freed,
*trylocks* each reservation object (reclaim may run inside a task that already holds one, so
it must never sleep on it), and hands each locked object to a callback that frees it and
takes it off the list. Objects it could not lock count as ``remaining``; every object it
looked at but did not free goes back to the tail, so the next walk starts elsewhere::

    lock = Mutex("shmem_mm")
    lru_evictable = gem_lru.DrmGemLru(lock, "evictable")
    gem_lru.move_tail(lru_evictable, obj)                  # obj is now the most recent
    remaining = gem_lru.Remaining()
    freed = gem_lru.scan(lru_evictable, 64, remaining, lambda obj, ticket: try_to_free(obj))

Objects are linked through their own ``lru_prev``/``lru_next`` fields (the kernel's
``lru_node``), so membership costs no allocation and removal is O(1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from gemu.guest.dma_buf import dma_resv
from gemu.guest.drm import gem
from gemu.guest.drm.gem import PAGE_SHIFT, DrmGemObject
from gemu.guest.errors import warn_on
from gemu.guest.kernel import runtime
from gemu.guest.locking import lockdep, ww_mutex
from gemu.guest.locking.mutex import Mutex

__all__ = [
    "DrmGemLru",
    "ListCorruption",
    "Remaining",
    "add_tail_locked",
    "check",
    "init",
    "move_tail",
    "move_tail_locked",
    "remove",
    "remove_locked",
    "scan",
]

ShrinkFn = Callable[[DrmGemObject, "ww_mutex.WwAcquireCtx | None"], bool]


class DrmGemLru:
    """An LRU of GEM objects. Kernel: struct drm_gem_lru [include/drm/drm_gem.h]

    Invariants (under ``lock``): ``count`` is the sum of ``obj.size >> PAGE_SHIFT`` over the
    objects on the list; ``first``/``last`` are None exactly when the list is empty; every
    object on the list has ``obj.lru is self``. ``scanned`` and ``trylock_failed`` count objects
    that :func:`scan` looked at and could not lock.
    """

    __slots__ = ("count", "first", "last", "lock", "name", "scanned", "trylock_failed")

    def __init__(self, lock: Mutex, name: str = "lru") -> None:
        self.lock = lock
        self.name = name
        self.count = 0
        self.first: DrmGemObject | None = None
        self.last: DrmGemObject | None = None
        self.scanned = 0
        self.trylock_failed = 0

    def __repr__(self) -> str:
        return f"<DrmGemLru {self.name} pages={self.count}>"

    def __iter__(self) -> Iterator[DrmGemObject]:
        """The objects, head (least recent) first; take ``lock`` to get a stable answer."""
        obj = self.first
        while obj is not None:
            nxt = obj.lru_next
            yield obj
            obj = nxt

    def statistics(self) -> dict:
        """Pages and objects on the list and the scan counters, for dumps and tests."""
        return {
            "pages": self.count,
            "objects": sum(1 for _ in self),
            "scanned": self.scanned,
            "trylock_failed": self.trylock_failed,
        }


class Remaining:
    """Pages a scan could not look at because their object was locked (the kernel's
    ``unsigned long *remaining``); one counter may be shared by several scans."""

    __slots__ = ("pages",)

    def __init__(self, pages: int = 0) -> None:
        self.pages = pages

    def __repr__(self) -> str:
        return f"<Remaining {self.pages} pages>"


def init(lru: DrmGemLru, lock: Mutex) -> None:
    """Make ``lru`` an empty list guarded by ``lock``. Kernel: drm_gem_lru_init()"""
    DrmGemLru.__init__(lru, lock, getattr(lru, "name", "lru"))


class ListCorruption(RuntimeError):
    """A list operation found the links around a node inconsistent.

    Kernel: __list_del_entry_valid_or_report() / __list_add_valid_or_report()
    [lib/list_debug.c] with CONFIG_DEBUG_LIST and CONFIG_BUG_ON_DATA_CORRUPTION: the kernel
    BUG()s there, so the model stops the task (``gemu explore`` reports it as ``lru``) rather
    than walk a list that may now be a cycle.
    """


def _unlink(lru: DrmGemLru, obj: DrmGemObject) -> None:
    prev, nxt = obj.lru_prev, obj.lru_next
    # list_del's debug checks: the neighbours must point back at the node
    if (lru.first if prev is None else prev.lru_next) is not obj:
        raise ListCorruption(
            f"list_del corruption: {obj!r} on {lru.name}: prev->next should be {obj!r}, but was "
            f"{lru.first if prev is None else prev.lru_next!r}"
        )
    if (lru.last if nxt is None else nxt.lru_prev) is not obj:
        raise ListCorruption(
            f"list_del corruption: {obj!r} on {lru.name}: next->prev should be {obj!r}, but was "
            f"{lru.last if nxt is None else nxt.lru_prev!r}"
        )
    if prev is None:
        lru.first = nxt
    else:
        prev.lru_next = nxt
    if nxt is None:
        lru.last = prev
    else:
        nxt.lru_prev = prev
    obj.lru_prev = obj.lru_next = None
    lru.count -= obj.size >> PAGE_SHIFT
    obj.lru = None


def _link_tail(lru: DrmGemLru, obj: DrmGemObject) -> None:
    obj.lru_prev = lru.last
    obj.lru_next = None
    if lru.last is None:
        lru.first = obj
    else:
        lru.last.lru_next = obj
    lru.last = obj
    lru.count += obj.size >> PAGE_SHIFT
    obj.lru = lru


def add_tail_locked(lru: DrmGemLru, obj: DrmGemObject) -> None:
    """list_add_tail() of ``obj``'s node onto ``lru`` *without* taking it off the list it is
    on: never right for a linked node, only gemu explore's ``madvise-list-add`` mutant calls it
    (panfrost's madvise before 9fc33eaaa979, host/explore/bugs.py).

    Kernel: list_add_tail() with CONFIG_DEBUG_LIST's __list_add_valid(). The kernel's check
    sees a double add only when the node is the list's tail; any other linked node is linked
    again and its old neighbours keep pointing at it, which a later list_del reports. The
    model refuses every add of a linked node at once: the corrupted list would otherwise be
    walked by code that has no bound on a cycle.
    """
    lockdep.assert_held(lru.lock)
    if obj.lru is not None:
        raise ListCorruption(
            f"list_add double add: {obj!r} is already on {obj.lru.name}, added to {lru.name}"
        )
    _link_tail(lru, obj)


def check(lru: DrmGemLru, limit: int) -> str | None:
    """What is wrong with ``lru``'s structure, or None: links both ways, ``obj.lru``, no node
    twice, ``count`` equal to the pages of the objects on it. The walk stops after ``limit``
    nodes (a cycle is then reported).

    For gemu explore's ``lru`` invariant; reads without the lock, which the deterministic
    runtime makes atomic.
    """
    seen: set[int] = set()
    prev = None
    obj = lru.first
    pages = 0
    while obj is not None:
        if len(seen) >= limit or id(obj) in seen:
            return f"{lru.name}: a cycle through {obj!r}"
        seen.add(id(obj))
        if obj.lru is not lru:
            return f"{lru.name}: {obj!r} is on it but its lru is {obj.lru!r}"
        if obj.lru_prev is not prev:
            return f"{lru.name}: {obj!r}'s prev is {obj.lru_prev!r}, not {prev!r}"
        pages += obj.size >> PAGE_SHIFT
        prev, obj = obj, obj.lru_next
    if lru.last is not prev:
        return f"{lru.name}: last is {lru.last!r}, the walk ended at {prev!r}"
    if pages != lru.count:
        return f"{lru.name}: count {lru.count} pages, the objects on it hold {pages}"
    return None


def remove_locked(obj: DrmGemObject) -> None:
    """Take ``obj`` off its LRU, if any. Kernel: drm_gem_lru_remove_locked()

    Locking: caller holds the LRU lock (asserted).
    """
    lru = obj.lru
    if lru is None:
        return
    lockdep.assert_held(lru.lock)
    _unlink(lru, obj)


remove_reads_lru_unlocked = False
"""gemu explore's ``gem-lru-remove-unlocked`` mutant (set by the driver at probe): :func:`remove`
reads ``obj.lru`` and may be preempted before it takes the lock it found there."""


class _FreedLruLock:
    """The lock field of a :func:`scan`'s on-stack ``still_in_lru`` once the scan returned:
    its stack frame is gone, so reaching the lock through it is a use after free (KASAN's
    stack-out-of-bounds). Each use is reported (``lifetime``); the model then goes on with
    the real lock so that the run can continue."""

    __slots__ = ("name", "real")

    def __init__(self, real: Mutex, name: str) -> None:
        self.real = real
        self.name = name

    def _report(self) -> Mutex:
        warn_on(True, f"use after free: the lock of {self.name}, reached after its scan returned")
        return self.real

    def lock(self) -> None:
        self._report().lock()

    def unlock(self) -> None:
        self.real.unlock()

    def __enter__(self) -> _FreedLruLock:
        self.lock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.real.unlock()


def remove(obj: DrmGemObject) -> None:
    """Take ``obj`` off its LRU, if any. Kernel: drm_gem_lru_remove() [drivers/gpu/drm/drm_gem.c]

    ``obj.lru`` and the lock it leads to are read together (no preemption between them), and
    ``obj.lru`` is read again under the lock: a concurrent :func:`scan` may have moved the
    object to its private list meanwhile (both lists share the lock, so the second read is
    stable). That is what the kernel's device-wide ``gem_lru_mutex`` gives since 379e8f1ca5e9.
    """
    lru = obj.lru
    if lru is None:
        return
    if remove_reads_lru_unlocked:
        # gemu explore's gem-lru-remove-unlocked mutant: drm_gem_lru_remove() before
        # 379e8f1ca5e9 "drm/gem: Make the GEM LRU lock part of drm_device" read obj->lru
        # without the lock, then mutex_lock(lru->lock): between the two a scan may return,
        # and lru was its on-stack still_in_lru.
        runtime.preempt("drm_gem_lru_remove: obj->lru read without the lock", obj)
    with lru.lock:
        remove_locked(obj)


def move_tail_locked(lru: DrmGemLru, obj: DrmGemObject) -> None:
    """Make ``obj`` the most recent entry of ``lru``, leaving its previous LRU.

    Kernel: drm_gem_lru_move_tail_locked() [drivers/gpu/drm/drm_gem.c]
    Locking: caller holds ``lru.lock`` (asserted), which is also the old LRU's lock.
    """
    lockdep.assert_held(lru.lock)
    old = obj.lru
    if old is not None:
        if old.lock is not lru.lock:
            warn_on(True, f"moving {obj!r} between LRUs {old} and {lru} with different locks")
        _unlink(old, obj)
    _link_tail(lru, obj)


def move_tail(lru: DrmGemLru, obj: DrmGemObject) -> None:
    """Make ``obj`` the most recent entry of ``lru``. Kernel: drm_gem_lru_move_tail()"""
    with lru.lock:
        move_tail_locked(lru, obj)


def scan(
    lru: DrmGemLru,
    nr_to_scan: int,
    remaining: Remaining,
    shrink: ShrinkFn,
    ticket: bool | None = None,
    *,
    blocking: bool = False,
) -> int:
    """Walk ``lru`` from the head, offering each idle, lockable object to ``shrink``.

    Kernel: drm_gem_lru_scan() [drivers/gpu/drm/drm_gem.c] (with ``remaining`` and ``ticket``)

    Stops once ``nr_to_scan`` pages were freed or the list is exhausted. Per object: move it
    to a private list; skip it if its reference count is already 0 (it is being freed and its
    free path may wait for this lock to take it off); otherwise take a reference, drop the LRU
    lock and trylock the reservation object. If that fails, its pages are added to
    ``remaining.pages``. If it succeeds, ``shrink(obj, ctx)`` runs with the reservation lock
    held and returns whether it freed the object's pages, in which case it must also have taken
    the object off every LRU (a warning otherwise). Finally unlock and drop the reference.
    Objects left on the private list rotate to the tail of ``lru``.

    With ``ticket`` true each trylock uses a fresh acquire context of the reservation class,
    handed to ``shrink`` so it can lock more objects in the same transaction (the kernel's
    ``ticket`` argument is storage for exactly that per-object context); otherwise ``ctx`` is
    None.

    ``blocking`` (never in normal use: ``gemu explore``'s ``shrinker-blocking-lock`` mutant)
    takes each reservation lock with a blocking lock instead of the trylock: reclaim then
    waits for, or deadlocks on, a lock its own caller may hold.

    Returns the number of pages freed.
    """
    still_in_lru = DrmGemLru(lru.lock, f"{lru.name}:still_in_lru")
    freed = 0
    lru.lock.lock()
    try:
        while freed < nr_to_scan:
            obj = lru.first
            if obj is None:
                break
            move_tail_locked(still_in_lru, obj)
            lru.scanned += 1
            if not gem.get_unless_zero(obj):
                continue
            lru.lock.unlock()
            try:
                freed += _scan_one(lru, still_in_lru, obj, remaining, shrink, ticket, blocking)
            finally:
                gem.put(obj)
                lru.lock.lock()
    finally:
        # Whatever was looked at and not freed goes to the tail, in the order it was met
        # (also when a callback raised: no object may stay on the private list).
        while still_in_lru.first is not None:
            move_tail_locked(lru, still_in_lru.first)
        lru.lock.unlock()
        # still_in_lru lives on the scan's stack: whoever still reaches its lock is too late
        still_in_lru.lock = _FreedLruLock(lru.lock, still_in_lru.name)
    return freed


def _scan_one(
    lru: DrmGemLru,
    still_in_lru: DrmGemLru,
    obj: DrmGemObject,
    remaining: Remaining,
    shrink: ShrinkFn,
    ticket: bool | None,
    blocking: bool = False,
) -> int:
    ctx = ww_mutex.acquire_init(dma_resv.RESERVATION_WW_CLASS) if ticket else None
    try:
        if blocking:
            dma_resv.lock(obj.resv, ctx)
        elif not ww_mutex.trylock(obj.resv.lock, ctx):
            remaining.pages += obj.size >> PAGE_SHIFT
            lru.trylock_failed += 1
            return 0
        try:
            if not shrink(obj, ctx):
                return 0
            warn_on(obj.lru is still_in_lru, f"shrink callback left {obj!r} on the scanned LRU")
            warn_on(obj.lru is lru, f"shrink callback left {obj!r} on {lru}")
            return obj.size >> PAGE_SHIFT
        finally:
            dma_resv.unlock(obj.resv)
    finally:
        if ctx is not None:
            ww_mutex.acquire_fini(ctx)
