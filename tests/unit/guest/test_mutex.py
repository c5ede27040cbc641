"""Tests of gemu.guest.locking.mutex: exclusion, owner checks, interruptible locking and
deadlock reports."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gemu.guest.errors import Eintr
from gemu.guest.kernel import runtime
from gemu.guest.kernel.runtime import Completion, DeadlockError, Deterministic
from gemu.guest.locking import lockdep
from gemu.guest.locking.lockdep import LockdepError
from gemu.guest.locking.mutex import Mutex


def run(fn, *args, seed: int = 0, strict: bool = True):
    return Deterministic(seed, strict=strict).run(fn, *args)


def test_lock_unlock_trylock_and_context_manager():
    """The basic operations change owner and lockdep's held stack together."""

    def main():
        m = Mutex("m")
        me = runtime.current()
        assert not m.is_locked()
        m.lock()
        assert m.owner is me and lockdep.held(m)
        m.assert_held()
        assert not m.trylock()
        m.unlock()
        assert m.trylock()
        m.unlock()
        with m:
            assert m.statistics() == {"locked": True, "owner": "main", "has_waiters": False}
        assert not m.is_locked() and me.held_locks == []

    run(main)


def test_mutual_exclusion_under_many_interleavings():
    """Several tasks never overlap inside the mutex, whatever the schedule."""

    def main():
        m = Mutex("m")
        state = SimpleNamespace(inside=0, total=0)

        def worker():
            for _ in range(4):
                with m:
                    state.inside += 1
                    assert state.inside == 1
                    runtime.preempt("inside")
                    state.inside -= 1
                    state.total += 1

        tasks = [runtime.spawn(worker, name=f"w{i}") for i in range(3)]
        for t in tasks:
            t.join()
        return state.total

    for seed in range(60):
        assert run(main, seed=seed) == 12


def test_lock_and_unlock_are_preemption_points():
    """Lock and unlock appear in the event log as scheduling points."""

    def main():
        with Mutex("m"):
            pass

    rt = Deterministic(0)
    rt.run(main)
    assert rt.event_log == ["1 main lock m", "2 main unlock m"]


def test_relock_by_owner_is_loud():
    """Locking a mutex the task already holds is reported instead of hanging."""

    def main():
        m = Mutex("m")
        m.lock()
        m.lock()

    with pytest.raises(LockdepError, match="main locks mutex m which it already holds"):
        run(main)


def test_unlock_by_non_owner_and_of_free_mutex_are_loud():
    """Unlocking a free mutex, or one another task holds, is reported."""

    def free():
        Mutex("m").unlock()

    with pytest.raises(LockdepError, match="main unlocks mutex m which is free"):
        run(free)

    def other():
        m = Mutex("m")
        held, done = Completion("held"), Completion("done")

        def holder():
            m.lock()
            held.complete()
            done.wait_for_completion()
            m.unlock()

        t = runtime.spawn(holder, name="holder")
        held.wait_for_completion()
        m.unlock()
        done.complete()
        t.join()

    with pytest.raises(LockdepError, match="main unlocks mutex m held by holder"):
        run(other)


def test_lock_interruptible_returns_eintr_on_signal():
    """A signal aborts mutex_lock_interruptible's wait with -EINTR; lockdep forgets the
    attempt."""

    def main():
        m = Mutex("m")
        m.lock()
        out = {}

        def waiter():
            try:
                m.lock_interruptible()
            except Eintr as e:
                out["err"] = str(e)
                out["held"] = list(runtime.current().held_locks)

        t = runtime.spawn(waiter, name="waiter")
        runtime.preempt("p")
        t.send_signal()
        t.join()
        m.unlock()
        return out

    for seed in range(30):
        out = run(main, seed=seed)
        assert out == {"err": "-EINTR: signal while waiting for mutex m", "held": []}


def test_abba_mutexes_deadlock_is_reported_with_both_tasks():
    """Two tasks locking two mutexes in opposite orders (forced to overlap) deadlock; the
    report names both tasks, the mutex each holds and the one each waits for, and lockdep
    (counting here) saw the inversion first."""

    def main():
        a, b = Mutex("A"), Mutex("B")
        a_held, b_held = Completion("A held"), Completion("B held")

        def side(first, second, mine, theirs):
            with first:
                mine.complete()
                theirs.wait_for_completion()
                with second:
                    pass

        runtime.spawn(side, b, a, b_held, a_held, name="ba")
        side(a, b, a_held, b_held)

    for seed in range(30):
        rt = Deterministic(seed, strict=False)
        with pytest.raises(DeadlockError) as info:
            rt.run(main)
        msg = str(info.value)
        assert "'main': holds A; waits for mutex B held by ba" in msg
        assert "'ba': holds B; waits for mutex A held by main" in msg
        assert [r.kind for r in rt.lockdep.reports] == ["inversion"]


def test_shared_class_orders_all_its_mutexes():
    """Mutexes sharing a LockClass are ordered as one."""
    cls = lockdep.LockClass("bo_list")
    other = lockdep.LockClass("other")

    def main():
        x1, x2, y = Mutex("x1", cls), Mutex("x2", cls), Mutex("y", other)
        with x1, y:
            pass
        with y, x2:
            pass

    with pytest.raises(LockdepError, match="bo_list -> other is a recorded order"):
        run(main)


def test_free_running_mutex_with_real_threads():
    """In free-running mode the mutex excludes real threads."""
    m = Mutex("m")
    state = SimpleNamespace(count=0)

    def worker():
        for _ in range(1000):
            with m:
                state.count += 1

    def main():
        tasks = [runtime.spawn(worker, name=f"w{i}") for i in range(4)]
        for t in tasks:
            t.join()

    runtime.FreeRunning().run(main)
    assert state.count == 4000
