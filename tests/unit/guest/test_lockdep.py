"""Tests of gemu.guest.locking.lockdep: lock-order inversions, the primed dma_resv order,
the dma_fence signalling critical section (explicit and implicit), reclaim, held-lock
assertions and report counting."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from gemu.guest.kernel import runtime
from gemu.guest.kernel.runtime import Completion, Deterministic
from gemu.guest.locking import lockdep
from gemu.guest.locking import ww_mutex as ww
from gemu.guest.locking.lockdep import LockClass, LockdepError
from gemu.guest.locking.mutex import Mutex
from gemu.guest.mm import gfp
from gemu.guest.mm.gfp import GFP_ATOMIC, GFP_NOWAIT

RESV = ww.RESERVATION_WW_CLASS


def run(fn, *args, strict: bool = True, seed: int = 0):
    return Deterministic(seed, strict=strict).run(fn, *args)


def expect(kind: str, message: str, fn, *args) -> lockdep.LockdepReport:
    with pytest.raises(LockdepError, match=message) as info:
        run(fn, *args)
    assert info.value.report.kind == kind
    return info.value.report


def resv(name: str = "resv#1") -> ww.WwMutex:
    return ww.WwMutex(RESV, name)


def lock_resv(obj: ww.WwMutex) -> ww.WwAcquireCtx:
    ctx = ww.acquire_init(RESV)
    ww.lock(obj, ctx)
    return ctx


def unlock_resv(obj: ww.WwMutex, ctx: ww.WwAcquireCtx) -> None:
    ww.unlock(obj)
    ww.acquire_fini(ctx)


class Fence:
    """The one attribute lockdep reads from a fence."""

    def __init__(self, owner=None) -> None:
        self.signal_owner = owner


# Lock order.


def _pair(a: Mutex, b: Mutex) -> None:
    with a, b:
        pass


def take_a_then_b(a, b):
    _pair(a, b)


def take_b_then_a(a, b):
    _pair(b, a)


def test_inversion_is_reported_with_both_stacks():
    """A then B, later B then A: an inversion naming the recorded order, with the stack
    that recorded it and the current one."""

    def main():
        a, b = Mutex("A", LockClass("a_lock")), Mutex("B", LockClass("b_lock"))
        take_a_then_b(a, b)
        take_b_then_a(a, b)

    rep = expect("inversion", "circular locking dependency", main)
    assert "main takes A (a_lock) while holding B (b_lock)" in rep.message
    assert "a_lock -> b_lock is a recorded order" in rep.message
    existing, current = rep.stacks
    assert existing.startswith("existing order a_lock -> b_lock") and "take_a_then_b" in existing
    assert current.startswith("new order b_lock -> a_lock") and "take_b_then_a" in current
    assert "take_a_then_b" not in current


def test_inversion_across_tasks_and_through_a_chain():
    """Orders recorded by other tasks count, transitively: A->B (task 1), B->C (task 2),
    then C->A (task 3) is a cycle listing every link's stack."""

    def main():
        a, b, c = (Mutex(n, LockClass(f"{n}_lock")) for n in "abc")
        runtime.spawn(_pair, a, b, name="t1").join()
        runtime.spawn(_pair, b, c, name="t2").join()
        runtime.spawn(_pair, c, a, name="t3").join()

    rep = expect("inversion", "a_lock -> b_lock -> c_lock is a recorded order", main)
    assert len(rep.stacks) == 3
    assert "t1 took b while holding a" in rep.stacks[0]
    assert "t2 took c while holding b" in rep.stacks[1]
    assert rep.task == "t3"


def test_consistent_order_is_quiet():
    """Always A before B, from many tasks and interleavings: no report."""

    def main():
        a, b = Mutex("A", LockClass("a_lock")), Mutex("B", LockClass("b_lock"))
        tasks = [runtime.spawn(_pair, a, b, name=f"t{i}") for i in range(3)]
        for t in tasks:
            t.join()

    for seed in range(20):
        run(main, seed=seed)


def test_trylock_adds_no_order_but_orders_later_locks():
    """Holding A, a trylock of B records nothing, so B then A stays quiet; a lock held by
    trylock still orders the locks taken after it."""

    def quiet():
        a, b = Mutex("A", LockClass("a_lock")), Mutex("B", LockClass("b_lock"))
        with a:
            assert b.trylock()
            b.unlock()
        _pair(b, a)

    run(quiet)

    def reported():
        a, b = Mutex("A", LockClass("a_lock")), Mutex("B", LockClass("b_lock"))
        assert b.trylock()
        with a:
            pass
        b.unlock()
        _pair(a, b)

    expect("inversion", "b_lock -> a_lock is a recorded order", reported)


def test_order_graph_is_per_runtime():
    """An order learned in one runtime does not leak into another."""
    a_cls, b_cls = LockClass("a_lock"), LockClass("b_lock")

    def ab():
        _pair(Mutex("A", a_cls), Mutex("B", b_cls))

    def ba():
        _pair(Mutex("B", b_cls), Mutex("A", a_cls))

    run(ab)
    run(ba)


def test_might_lock_records_order_without_locking():
    """might_lock(cls) under A records A -> cls, so taking A under a cls lock inverts."""

    def main():
        a, b = Mutex("A", LockClass("a_lock")), Mutex("B", LockClass("b_lock"))
        with a:
            lockdep.might_lock(b.cls)
        assert not b.is_locked()
        _pair(b, a)

    expect("inversion", "a_lock -> b_lock", main)


def test_same_class_nesting_needs_an_acquire_context():
    """Two locks of one class nested without a context is recursive locking; under a ww
    acquire context it is the normal case."""

    def plain():
        cls = LockClass("bo_lock")
        _pair(Mutex("bo1", cls), Mutex("bo2", cls))

    expect("recursive", "main takes bo2 while holding bo1, both bo_lock", plain)

    def with_ctx():
        a, b = resv("resv#1"), resv("resv#2")
        ctx = ww.acquire_init(RESV)
        ww.lock(a, ctx)
        ww.lock(b, ctx)
        ww.unlock(b)
        ww.unlock(a)
        ww.acquire_fini(ctx)

    run(with_ctx)


# The primed dma_resv order.


def test_primed_order_allows_the_documented_nesting():
    """mmap_lock -> resv -> fs_reclaim -> i_mmap_rwsem, and fence waits under mmap_lock,
    resv and reclaim, are all allowed from boot."""

    def main():
        mmap = Mutex("mm->mmap_lock", lockdep.MMAP_LOCK)
        i_mmap = Mutex("mapping->i_mmap_rwsem", lockdep.I_MMAP)
        obj = resv()
        with mmap:
            lockdep.dma_fence_might_wait()
            ctx = lock_resv(obj)
            lockdep.might_alloc()
            lockdep.dma_fence_might_wait()
            lockdep.fs_reclaim_acquire()
            lockdep.dma_fence_might_wait()
            with i_mmap:
                pass
            lockdep.fs_reclaim_release()
            unlock_resv(obj, ctx)

    run(main)


def test_primed_order_catches_mmap_lock_under_resv():
    """Taking mmap_lock while holding a reservation lock inverts the boot order."""

    def main():
        obj = resv()
        ctx = lock_resv(obj)
        with Mutex("mm->mmap_lock", lockdep.MMAP_LOCK):
            pass
        unlock_resv(obj, ctx)

    rep = expect("inversion", "mmap_lock -> .*reservation_ww_class_mutex", main)
    assert "dma_resv_lockdep" in rep.stacks[0]


def test_reclaimable_allocation_under_i_mmap_is_reported():
    """GFP_KERNEL under i_mmap_rwsem inverts fs_reclaim -> i_mmap_rwsem."""

    def main():
        with Mutex("mapping->i_mmap_rwsem", lockdep.I_MMAP):
            lockdep.might_alloc()

    expect("inversion", "fs_reclaim -> i_mmap_rwsem is a recorded order", main)


# Reclaim and the shrinker.


def test_shrinker_trylock_of_resv_inside_reclaim_is_fine():
    """The shrinker runs inside fs_reclaim and may trylock reservation objects."""

    def main():
        obj = resv()
        lockdep.fs_reclaim_acquire()
        assert ww.trylock(obj)
        lockdep.dma_fence_might_wait()
        ww.unlock(obj)
        lockdep.fs_reclaim_release()

    run(main)


def test_blocking_resv_lock_inside_reclaim_is_reported():
    """A blocking reservation lock inside fs_reclaim inverts resv -> fs_reclaim, with a hint
    that shrinkers may only trylock."""

    def main():
        obj = resv()
        lockdep.fs_reclaim_acquire()
        ww.lock(obj, None)
        ww.unlock(obj)
        lockdep.fs_reclaim_release()

    rep = expect("inversion", "reservation_ww_class_mutex -> fs_reclaim", main)
    assert "shrinkers run inside fs_reclaim and may only trylock" in rep.message


def test_allocation_inside_reclaim_does_not_recurse():
    """might_alloc from a task inside reclaim (PF_MEMALLOC, as the shrinkers run) records
    nothing; nor does a non-blocking allocation anywhere."""

    def main():
        with Mutex("mapping->i_mmap_rwsem", lockdep.I_MMAP):
            pass
        lockdep.fs_reclaim_acquire()
        flags = gfp.memalloc_noreclaim_save()
        lockdep.might_alloc()
        gfp.memalloc_noreclaim_restore(flags)
        lockdep.fs_reclaim_release()
        lockdep.might_alloc(GFP_NOWAIT)

    run(main)


# The dma_fence signalling critical section.


def explicit_section(op: str):
    obj = resv()
    ctx = ww.acquire_init(RESV)
    cookie = lockdep.dma_fence_begin_signalling()
    if op == "resv lock":
        ww.lock(obj, ctx)
        ww.unlock(obj)
    elif op == "resv trylock":
        assert ww.trylock(obj, ctx)
        ww.unlock(obj)
    elif op == "alloc":
        lockdep.might_alloc()
    elif op == "atomic alloc":
        lockdep.might_alloc(GFP_ATOMIC)
    elif op == "fence wait":
        lockdep.dma_fence_might_wait()
    lockdep.dma_fence_end_signalling(cookie)
    ww.acquire_fini(ctx)


@pytest.mark.parametrize(
    ("op", "message"),
    [
        ("resv lock", "blocking on resv#1 .* inside a dma_fence signalling critical section"),
        ("alloc", "a reclaimable allocation .* inside a dma_fence signalling critical section"),
        ("fence wait", "fence wait inside a dma_fence signalling critical section"),
    ],
)
def test_explicit_section_reports(op, message):
    """Inside begin/end_signalling a blocking resv lock, a GFP_KERNEL allocation and a
    fence wait are each reported, with the stack where the section began."""
    rep = expect("signalling", message, explicit_section, op)
    assert any(
        s.startswith("signalling section began at") and "explicit_section" in s for s in rep.stacks
    )


@pytest.mark.parametrize("op", ["resv trylock", "atomic alloc", "nothing"])
def test_explicit_section_allows_trylock_and_atomic_allocation(op):
    """A resv trylock or a non-reclaimable allocation inside the section is fine."""
    run(explicit_section, op)


def test_after_the_section_everything_is_allowed_again():
    """Once the section ends, resv locks, allocations and fence waits are quiet."""

    def main():
        cookie = lockdep.dma_fence_begin_signalling()
        lockdep.dma_fence_end_signalling(cookie)
        obj = resv()
        ctx = lock_resv(obj)
        lockdep.might_alloc()
        lockdep.dma_fence_might_wait()
        unlock_resv(obj, ctx)

    run(main)


def test_sections_nest_and_cookie_says_so():
    """A nested begin returns a true cookie; the section lasts until the outer end."""

    def main():
        outer = lockdep.dma_fence_begin_signalling()
        inner = lockdep.dma_fence_begin_signalling()
        assert (outer, inner) == (False, True)
        lockdep.dma_fence_end_signalling(inner)
        assert lockdep.in_signalling()
        lockdep.dma_fence_end_signalling(outer)
        assert not lockdep.in_signalling()

    run(main)


def test_end_without_begin_is_unbalanced():
    """dma_fence_end_signalling without a begin is reported."""
    expect("unbalanced", "without a begin", lambda: lockdep.dma_fence_end_signalling(False))


def test_implicit_section_from_publish_to_hand_off():
    """In the strict signalling mode, publishing a fence the task must signal starts the
    section even before the resv is unlocked: a resv lock then is reported, labelled as gemu's
    own check; after the hand-off it is quiet."""

    def published_then_lock():
        lockdep.set_implicit_signalling(True)
        a, b = resv("resv#1"), resv("resv#2")
        ctx = lock_resv(a)
        lockdep.fence_published(Fence(runtime.current()))
        ww.lock(b, ctx)

    rep = expect("signalling", "blocking on resv#2", published_then_lock)
    assert any("published_then_lock" in s for s in rep.stacks)
    assert rep.message.startswith("gemu model check (strict signalling")

    def handed_off_then_lock():
        lockdep.set_implicit_signalling(True)
        a, b = resv("resv#1"), resv("resv#2")
        ctx = lock_resv(a)
        fence = Fence(runtime.current())
        lockdep.fence_published(fence)
        lockdep.fence_published(fence)  # added to a second resv: still one fence
        assert lockdep.in_signalling()
        lockdep.fence_handed_off(fence)
        assert not lockdep.in_signalling()
        ww.lock(b, ctx)
        ww.unlock(b)
        unlock_resv(a, ctx)
        lockdep.might_alloc()

    run(handed_off_then_lock)


def test_implicit_section_only_for_the_fence_owner():
    """A fence signalled by someone else (or by nobody in particular) does not put the
    publishing task in a section."""

    def main():
        lockdep.set_implicit_signalling(True)
        other = runtime.spawn(lambda: None, name="other")
        lockdep.fence_published(Fence(other))
        lockdep.fence_published(Fence(None))
        lockdep.fence_published(object())
        assert not lockdep.in_signalling()
        lockdep.might_alloc()
        other.join()

    run(main)


def test_hand_off_by_another_task_ends_the_publishers_section():
    """The signaller (another task) handing the fence off ends the publisher's section."""

    def main():
        lockdep.set_implicit_signalling(True)
        fence = Fence(runtime.current())
        lockdep.fence_published(fence)
        runtime.spawn(lockdep.fence_handed_off, fence, name="irq").join()
        assert not lockdep.in_signalling()
        lockdep.might_alloc()

    for seed in range(10):
        run(main, seed=seed)


def test_fence_wait_under_a_lock_used_in_a_section_is_reported():
    """A lock taken inside a signalling section must not be held while waiting for a
    fence: the signaller may need it."""

    def main():
        sched_lock = Mutex("sched_lock", LockClass("sched_lock"))
        cookie = lockdep.dma_fence_begin_signalling()
        with sched_lock:
            pass
        lockdep.dma_fence_end_signalling(cookie)
        with sched_lock:
            lockdep.dma_fence_might_wait()

    expect("signalling", "fence wait while holding sched_lock", main)


def test_section_counts_from_where_it_began_in_the_lock_stack():
    """Locks taken inside a section are ordered after it, even if a lock held from before
    the section is released first."""

    def main():
        outer = Mutex("outer", LockClass("outer_lock"))
        inner = Mutex("inner", LockClass("inner_lock"))
        outer.lock()
        cookie = lockdep.dma_fence_begin_signalling()
        outer.unlock()
        with inner:
            pass
        lockdep.dma_fence_end_signalling(cookie)
        with inner:
            lockdep.dma_fence_might_wait()

    expect("signalling", "fence wait while holding inner", main)


# Held locks.


def test_assert_held_and_held():
    """assert_held is quiet for a held lock and reports one the task does not hold, also
    when another task holds it."""

    def main():
        m = Mutex("m")
        assert not lockdep.held(m)
        with m:
            assert lockdep.held(m)
            lockdep.assert_held(m)
            other = runtime.spawn(lockdep.assert_held, m, name="other")
            other.join()

    expect("not-held", "other must hold m here but does not", main)


def test_release_of_a_lock_not_held_is_unbalanced():
    """Releasing what the task does not hold is a bad unlock balance."""
    expect("unbalanced", "main releases x which it does not hold", lockdep.release, _named("x"))


def test_out_of_order_release_is_fine():
    """Releasing locks in another order than taken is allowed."""

    def main():
        a, b = Mutex("A", LockClass("a_lock")), Mutex("B", LockClass("b_lock"))
        a.lock()
        b.lock()
        a.unlock()
        b.unlock()
        assert runtime.current().held_locks == []

    run(main)


def test_task_exiting_with_locks_held_is_reported():
    """A task that returns while holding a lock is reported (the kernel's "lock held when
    returning to user space")."""

    def main():
        m = Mutex("leaked")
        runtime.spawn(m.lock, name="leaker").join()

    expect("held-at-exit", "task leaker exited holding leaked", main)


def test_sleep_in_atomic_context():
    """might_sleep with atomic_depth > 0 is reported."""

    def main():
        runtime.current().atomic_depth = 1
        lockdep.might_sleep()

    expect("sleep-in-atomic", "sleeping function called from atomic context", main)


# Counting instead of raising.


def test_non_strict_reports_are_counted_deduplicated_and_reset():
    """Out of strict mode, each distinct violation is one report with a count; reset()
    forgets them."""

    def main():
        a, b = Mutex("A", LockClass("a_lock")), Mutex("B", LockClass("b_lock"))
        _pair(a, b)
        for _ in range(3):
            _pair(b, a)
        first = [(r.kind, r.count) for r in lockdep.reports()]
        lockdep.reset()
        return first, lockdep.reports()

    first, after = run(main, strict=False)
    assert first == [("inversion", 3)]
    assert after == []


def test_reports_are_per_runtime():
    """Reports of one runtime are not seen by another."""

    def bad():
        lockdep.release(_named("x"))
        return len(lockdep.reports())

    assert run(bad, strict=False) == 1
    assert run(lambda: len(lockdep.reports()), strict=False) == 0


def test_works_without_setup_in_the_default_runtime():
    """A plain thread (adopted by the default runtime) can use locks and assertions."""
    out = SimpleNamespace()

    def body():
        m = Mutex("plain")
        with m:
            lockdep.assert_held(m)
            out.held = lockdep.held(m)
        out.task = runtime.current()

    th = threading.Thread(target=body)
    th.start()
    th.join()
    assert out.held and out.task.held_locks == []
    assert out.task.runtime is runtime.default_runtime()


def test_deadlock_report_shows_lockdep_held_locks():
    """The scheduler's deadlock report lists the locks from lockdep's held-lock stacks."""

    def main():
        obj = resv("resv#9")
        ctx = lock_resv(obj)
        Completion("never").wait_for_completion()
        unlock_resv(obj, ctx)

    with pytest.raises(runtime.DeadlockError, match="holds reservation_ww_class_acquire#1, resv#9"):
        run(main)


def _named(name: str):
    return SimpleNamespace(name=name)
