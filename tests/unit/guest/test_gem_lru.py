"""drm_gem_lru: ordering and page counts, and the reclaim walk of drm_gem_lru_scan (rotation,
skipping objects being freed, trylock failures, the callback contract, tickets, races)."""

from __future__ import annotations

import itertools

import pytest

from gemu.guest.dma_buf import dma_resv
from gemu.guest.drm import gem, gem_lru
from gemu.guest.drm.gem_lru import DrmGemLru, Remaining
from gemu.guest.errors import KernelWarning
from gemu.guest.kernel import runtime
from gemu.guest.locking import lockdep, ww_mutex
from gemu.guest.locking.lockdep import LockdepError
from gemu.guest.locking.mutex import Mutex
from gemu.guest.mm.page_alloc import PAGE_SIZE, PageAllocator, PhysMem


@pytest.fixture
def dev():
    """A device whose objects have no shmem file (the LRU does not care)."""
    lockdep.reset()
    d = gem.DrmDevice(PageAllocator(PhysMem(bytearray(16 * PAGE_SIZE)), watermarks=(0, 0, 0)))
    yield d
    assert d.object_count == 0
    assert not runtime.current().held_locks
    assert not lockdep.reports()


@pytest.fixture
def lru():
    return DrmGemLru(Mutex("test_lru"), "test")


def _free(obj: gem.DrmGemObject) -> None:
    gem.object_release(obj)


FUNCS = gem.DrmGemObjectFuncs(free=_free)


def make(dev: gem.DrmDevice, pages: int = 1) -> gem.DrmGemObject:
    obj = gem.DrmGemObject()
    gem.private_object_init(dev, obj, pages * PAGE_SIZE)
    obj.funcs = FUNCS
    return obj


def names(lru: DrmGemLru) -> list[str]:
    return [o.resv.lock.name for o in lru]


def check(lru: DrmGemLru) -> None:
    """The list is consistent: links both ways, obj.lru, and the page count."""
    objs = list(lru)
    assert lru.count == sum(o.npages for o in objs)
    assert all(o.lru is lru for o in objs)
    assert (lru.first, lru.last) == ((objs[0], objs[-1]) if objs else (None, None))
    for prev, nxt in itertools.pairwise(objs):
        assert prev.lru_next is nxt and nxt.lru_prev is prev


def test_move_tail_orders_and_counts(dev, lru):
    """move_tail appends (or re-appends) at the tail and counts pages; remove unlinks."""
    a, b, c = make(dev, 1), make(dev, 2), make(dev, 4)
    for o in (a, b, c):
        gem_lru.move_tail(lru, o)
    assert list(lru) == [a, b, c] and lru.count == 7
    gem_lru.move_tail(lru, a)
    assert list(lru) == [b, c, a]
    gem_lru.remove(c)
    assert list(lru) == [b, a] and lru.count == 3 and c.lru is None
    gem_lru.remove(c)  # not on a list: nothing happens
    check(lru)
    for o in (a, b, c):
        gem_lru.remove(o)
        gem.put(o)
    assert lru.count == 0 and lru.first is None


def test_move_between_lrus_of_one_lock(dev, lru):
    """Moving to another LRU of the same lock takes the object off the first one."""
    other = DrmGemLru(lru.lock, "other")
    a, b = make(dev), make(dev)
    gem_lru.move_tail(lru, a)
    gem_lru.move_tail(lru, b)
    gem_lru.move_tail(other, a)
    assert list(lru) == [b] and list(other) == [a] and (lru.count, other.count) == (1, 1)
    check(lru)
    check(other)
    for o in (a, b):
        gem_lru.remove(o)
        gem.put(o)


def test_locked_variants_assert_the_lru_lock(dev, lru):
    """move_tail_locked and remove_locked need the LRU lock held."""
    a = make(dev)
    with pytest.raises(LockdepError, match="must hold"):
        gem_lru.move_tail_locked(lru, a)
    lockdep.reset()
    gem.put(a)


def _fill(dev, lru, n, pages=1):
    objs = [make(dev, pages) for _ in range(n)]
    for o in objs:
        gem_lru.move_tail(lru, o)
    return objs


def _drain(lru, objs):
    for o in objs:
        gem_lru.remove(o)
        gem.put(o)


def test_scan_frees_from_the_head_until_enough(dev, lru):
    """scan offers objects head first with their resv held and a reference taken, and stops
    once nr_to_scan pages were freed; the callback must take freed objects off the list."""
    objs = _fill(dev, lru, 4, pages=2)
    seen = []

    def shrink(obj, ticket):
        assert dma_resv.held(obj.resv) and obj.refcount == 2 and ticket is None
        seen.append(obj)
        gem_lru.remove(obj)
        return True

    freed = gem_lru.scan(lru, 3, Remaining(), shrink)
    assert freed == 4 and seen == objs[:2] and list(lru) == objs[2:]
    assert all(o.refcount == 1 and not dma_resv.is_locked(o.resv) for o in objs)
    check(lru)
    _drain(lru, objs)


def test_scan_rotates_unfreed_objects_to_the_tail(dev, lru):
    """Objects looked at but not freed go to the tail in the order they were met; the rest
    of the list keeps its order ahead of them."""
    a, b, c, d = _fill(dev, lru, 4)

    def shrink(obj, ticket):
        if obj is b:
            gem_lru.remove(obj)
            return True
        return False

    assert gem_lru.scan(lru, 1, Remaining(), shrink) == 1
    assert list(lru) == [c, d, a]
    assert gem_lru.scan(lru, 10, Remaining(), lambda o, t: False) == 0
    assert list(lru) == [c, d, a] and lru.scanned == 5
    check(lru)
    _drain(lru, [a, b, c, d])


def test_scan_skips_objects_being_freed(dev, lru):
    """An object whose reference count already hit 0 is never handed to the callback."""
    a, b = _fill(dev, lru, 2)
    a.refcount = 0  # its free path is running elsewhere
    seen = []
    gem_lru.scan(lru, 10, Remaining(), lambda o, t: seen.append(o) or False)
    assert seen == [b] and list(lru) == [a, b]
    a.refcount = 1
    _drain(lru, [a, b])


def test_scan_counts_contended_objects_as_remaining(dev, lru):
    """A resv that cannot be trylocked (here: held by the reclaiming task itself, as when an
    allocation under the lock enters reclaim) is skipped, its pages added to remaining."""
    a, b = _fill(dev, lru, 2, pages=3)
    seen = []
    remaining = Remaining(1)
    dma_resv.lock(a.resv, None)
    try:
        freed = gem_lru.scan(lru, 10, remaining, lambda o, t: seen.append(o) or False)
    finally:
        dma_resv.unlock(a.resv)
    assert (freed, remaining.pages, seen, lru.trylock_failed) == (0, 4, [b], 1)
    assert list(lru) == [a, b]
    _drain(lru, [a, b])


def test_scan_contention_from_another_task(dev, lru):
    """Under the deterministic runtime, a scan racing a task that holds an object's resv
    either offers the object (lock was free) or counts it as remaining, never both, and
    never blocks; checked over 30 seeds."""
    outcomes = set()
    for seed in range(30):
        a = make(dev, 2)
        gem_lru.move_tail(lru, a)
        result = {}

        def holder(a=a):
            dma_resv.lock(a.resv, None)
            runtime.preempt("holding")
            dma_resv.unlock(a.resv)

        def main(a=a, result=result):
            t = runtime.spawn(holder, name="holder")
            remaining = Remaining()
            seen = []
            result["freed"] = gem_lru.scan(lru, 10, remaining, lambda o, _: seen.append(o) or False)
            result["seen"], result["remaining"] = len(seen), remaining.pages
            t.join()

        runtime.Deterministic(seed).run(main)
        assert result["freed"] == 0
        assert (result["seen"], result["remaining"]) in {(1, 0), (0, 2)}
        outcomes.add((result["seen"], result["remaining"]))
        _drain(lru, [a])
    assert len(outcomes) == 2, "the schedules never hit the contended case"


def test_scan_warns_when_a_freed_object_stays_listed(dev, lru):
    """A callback that reports success but leaves the object on the LRU breaks the contract."""
    (a,) = _fill(dev, lru, 1)
    with pytest.raises(KernelWarning, match="left"):
        gem_lru.scan(lru, 1, Remaining(), lambda o, t: True)
    assert not dma_resv.is_locked(a.resv) and a.refcount == 1 and list(lru) == [a]
    _drain(lru, [a])


def test_scan_with_ticket_locks_in_a_transaction(dev, lru):
    """With a ticket each object is trylocked under a fresh acquire context, which the
    callback receives holding exactly that lock, and which is finished afterwards."""
    a, b = _fill(dev, lru, 2)
    tickets = []

    def shrink(obj, ticket):
        assert isinstance(ticket, ww_mutex.WwAcquireCtx) and ticket.acquired == 1
        assert obj.resv.lock.ctx is ticket
        tickets.append(ticket)
        return False

    gem_lru.scan(lru, 10, Remaining(), shrink, ticket=True)
    assert len(tickets) == 2 and tickets[0] is not tickets[1]
    assert all(t.finished and t.acquired == 0 for t in tickets)
    _drain(lru, [a, b])


def test_last_reference_dropped_by_scan_frees_after_unlock(dev, lru):
    """If the callback drops the last other reference, the object is freed by the scan's own
    put, after its resv was unlocked and the LRU lock released."""
    (a,) = _fill(dev, lru, 1)

    def shrink(obj, ticket):
        gem_lru.remove(obj)
        gem.put(obj)  # the owner's reference; the scan still holds one
        assert obj.refcount == 1
        return True

    assert gem_lru.scan(lru, 1, Remaining(), shrink) == 1
    assert a.refcount == 0 and dev.object_count == 0


def test_scan_races_moves_and_removes(dev, lru):
    """A task moving objects to the tail and removing them while another scans keeps the
    list consistent (links, obj.lru, page count) under 40 seeded schedules."""
    for seed in range(40):
        objs = _fill(dev, lru, 5)
        victims = objs[:2]

        def mover(objs=objs):
            for o in objs[2:]:
                gem_lru.move_tail(lru, o)
            gem_lru.remove(objs[4])

        def main(victims=victims):
            t = runtime.spawn(mover, name="mover")

            def shrink(obj, ticket):
                if obj in victims:
                    gem_lru.remove(obj)
                    return True
                return False

            gem_lru.scan(lru, 10, Remaining(), shrink)
            t.join()

        runtime.Deterministic(seed).run(main)
        check(lru)
        assert set(lru) == set(objs[2:4])
        _drain(lru, objs)
