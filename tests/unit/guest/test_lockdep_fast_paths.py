"""lockdep's shortcuts on the per-job path decide exactly what the full path decides:
might_alloc() with nothing held and no signalling section open records nothing (taking the
fs_reclaim and mmu-notifier maps would only meet the primed fs_reclaim -> mmu_notifier
order), and still records or reports as soon as a lock is held or a section is open."""

from __future__ import annotations

import pytest

from gemu.guest.kernel import runtime
from gemu.guest.locking import lockdep
from gemu.guest.mm.gfp import GFP_KERNEL, GFP_NOFS


def _graph(st: lockdep.LockdepState) -> dict[str, set[str]]:
    return {a.name: {b.name for b in succ} for a, succ in st.after.items()}


def _run(main):
    return runtime.Deterministic(seed=0, strict=False).run(main)


@pytest.mark.parametrize("gfp", [GFP_KERNEL, GFP_NOFS], ids=["GFP_KERNEL", "GFP_NOFS"])
def test_might_alloc_with_nothing_held_records_what_taking_the_maps_records(gfp):
    """The graph and the held stack after might_alloc() with nothing held equal those after
    taking and releasing the maps by hand (fs_reclaim_acquire/release + the notifier map)."""

    def main():
        st = lockdep._state()
        before = _graph(st)
        lockdep.might_alloc(gfp)
        shortcut = _graph(st)
        lockdep.fs_reclaim_acquire(gfp)
        lockdep.fs_reclaim_release(gfp)
        full = _graph(st)
        return before, shortcut, full, runtime.current().held_locks, lockdep.reports()

    before, shortcut, full, held, reps = _run(main)
    assert shortcut == before == full
    assert held == [] and reps == []


def test_might_alloc_under_a_lock_still_orders_it_before_fs_reclaim():
    cls = lockdep.LockClass("fast_path_lock")

    class L:
        name = "fast_path_lock#1"

    def main():
        lock = L()
        lockdep.acquire(lock, cls)
        lockdep.might_alloc(GFP_KERNEL)
        lockdep.release(lock)
        return _graph(lockdep._state())

    graph = _run(main)
    assert "fs_reclaim" in graph["fast_path_lock"]


def test_might_alloc_in_a_section_with_nothing_held_is_still_reported():
    def main():
        cookie = lockdep.dma_fence_begin_signalling()
        lockdep.might_alloc(GFP_KERNEL)
        lockdep.dma_fence_end_signalling(cookie)
        return lockdep.reports()

    (rep,) = _run(main)
    assert rep.kind == "signalling" and "might_alloc" in rep.message


def test_a_lock_taken_first_in_a_section_is_ordered_after_the_section():
    """Nothing held, inside a signalling section: the lock's class goes after dma_fence_map,
    a trylock adds no order, and an inversion against it is still reported."""
    blocking, tried = lockdep.LockClass("fast_blocking"), lockdep.LockClass("fast_tried")

    class L:
        def __init__(self, name):
            self.name = name

    a, b = L("a"), L("b")

    def main():
        cookie = lockdep.dma_fence_begin_signalling()
        lockdep.acquire(a, blocking)
        lockdep.release(a)
        lockdep.acquire(b, tried, trylock=True)
        lockdep.release(b)
        lockdep.dma_fence_end_signalling(cookie)
        graph = _graph(lockdep._state())
        lockdep.acquire(a, blocking)
        lockdep.dma_fence_might_wait()  # a fence wait under a lock taken in a section
        lockdep.release(a)
        return graph, lockdep.reports()

    graph, reps = _run(main)
    assert "fast_blocking" in graph["dma_fence_map"]
    assert "fast_tried" not in graph["dma_fence_map"]
    (rep,) = reps
    assert rep.kind == "signalling" and "fence wait while holding a (fast_blocking)" in rep.message


def test_driver_locks_keep_one_held_entry_and_report_as_before():
    """SpinLock and Mutex push the held-stack entry they made once: lockdep sees the lock
    and its class while held, drops it on release, and a second acquisition is still the
    recursion report."""
    from gemu.guest.gemu_drv.sync import SpinLock
    from gemu.guest.locking.mutex import Mutex

    def main():
        spin = SpinLock("fast.spin", lockdep.LockClass("fast_spin"))
        mutex = Mutex("fast.mutex")
        task = runtime.current()
        seen = []
        for _ in range(2):
            spin.acquire()
            mutex.lock()
            seen.append([(e.lock, e.cls.name) for e in task.held_locks])
            assert lockdep.held(spin) and lockdep.held(mutex)
            mutex.unlock()
            spin.release()
        assert not task.held_locks
        spin.acquire()
        try:
            spin.acquire()
        except RuntimeError as exc:
            seen.append(str(exc))
        spin.release()
        return spin, mutex, seen, lockdep.reports()

    spin, mutex, seen, reps = _run(main)
    assert seen[0] == seen[1] == [(spin, "fast_spin"), (mutex, "fast.mutex")]
    assert "takes fast.spin which it already holds" in seen[2]
    (rep,) = reps
    assert rep.kind == "recursive" and "fast.spin" in rep.message
