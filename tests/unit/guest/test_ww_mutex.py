"""Tests of gemu.guest.locking.ww_mutex behaviour under the deterministic runtime: the
families of the kernel's test-ww_mutex (mutex, AA, ABBA, cycle, stress) for both Wait-Die
and Wound-Wait classes, plus the die/wound rules of the design document."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from gemu.guest.errors import Ealready, Edeadlk, Eintr
from gemu.guest.kernel import runtime
from gemu.guest.kernel.runtime import Completion, DeadlockError, Deterministic
from gemu.guest.locking import ww_mutex as ww

CLASSES = {
    "wait-die": lambda: ww.WD_CLASS("test_wd"),
    "wound-wait": lambda: ww.WW_CLASS("test_ww"),
}


@pytest.fixture(params=sorted(CLASSES))
def ww_class(request) -> ww.WwClass:
    return CLASSES[request.param]()


def run(fn, *args, seed: int = 0, **kw):
    return Deterministic(seed, **kw).run(fn, *args)


def lock_all(locks: list[ww.WwMutex], ctx: ww.WwAcquireCtx, stats=None) -> None:
    """Take every lock in ``locks`` order under ``ctx``, backing off on -EDEADLK."""
    contended = None
    while True:
        if contended is not None:
            ww.lock_slow(contended, ctx)
        try:
            for lk in locks:
                if lk is not contended:
                    ww.lock(lk, ctx)
            return
        except Edeadlk:
            if stats is not None:
                stats.backoffs += 1
            for lk in locks:
                if lk.ctx is ctx:
                    ww.unlock(lk)
            contended = ctx.contending_lock


# test_mutex / test_aa


def test_uncontended_lock_unlock_with_and_without_context(ww_class):
    """A ww mutex locks and unlocks with a context, without one, and by trylock."""

    def main():
        m = ww.WwMutex(ww_class, "m")
        ctx = ww.acquire_init(ww_class)
        ww.lock(m, ctx)
        assert ww.is_locked(m) and m.ctx is ctx and ctx.acquired == 1
        ww.unlock(m)
        assert not ww.is_locked(m) and ctx.acquired == 0
        ww.acquire_fini(ctx)
        ww.lock(m, None)
        assert m.owner is runtime.current() and m.ctx is None
        ww.unlock(m)
        assert ww.trylock(m)
        ww.unlock(m)

    run(main)


def test_mutex_handoff_between_tasks(ww_class):
    """A task blocked on a ww mutex held by another gets it once released (test_mutex)."""

    def main():
        m = ww.WwMutex(ww_class, "m")
        ready = Completion("ready")
        order = []

        def other():
            ctx = ww.acquire_init(ww_class)
            ready.complete()
            ww.lock(m, ctx)
            order.append("other")
            ww.unlock(m)
            ww.acquire_fini(ctx)

        ctx = ww.acquire_init(ww_class)
        ww.lock(m, ctx)
        t = runtime.spawn(other, name="other")
        ready.wait_for_completion()
        runtime.preempt("let other block")
        order.append("main")
        ww.unlock(m)
        ww.acquire_fini(ctx)
        t.join()
        return order

    for seed in range(40):
        assert run(main, seed=seed) == ["main", "other"]


def test_aa_same_context_gets_ealready_and_trylock_fails(ww_class):
    """Locking a mutex the context already holds returns -EALREADY; trylock fails (test_aa)."""

    def main():
        m = ww.WwMutex(ww_class, "A")
        ctx = ww.acquire_init(ww_class)
        ww.lock(m, ctx)
        assert not ww.trylock(m, ctx)
        assert not ww.trylock(m)
        with pytest.raises(Ealready, match="already locked by context"):
            ww.lock(m, ctx)
        with pytest.raises(Ealready):
            ww.lock_interruptible(m, ctx)
        assert ctx.acquired == 1
        ww.unlock(m)
        ww.acquire_fini(ctx)

    run(main)


# test_abba


def _abba(ww_class, resolve: bool):
    """Two tasks lock A,B and B,A, each holding its first lock before the other tries
    its second (the kernel's test_abba)."""
    a, b = ww.WwMutex(ww_class, "A"), ww.WwMutex(ww_class, "B")
    a_ready, b_ready = Completion("A locked"), Completion("B locked")
    results = {}

    def side(name, first, second, mine, theirs):
        ctx = ww.acquire_init(ww_class)
        ww.lock(first, ctx)
        mine.complete()
        theirs.wait_for_completion()
        err = None
        try:
            ww.lock(second, ctx)
        except Edeadlk:
            err = "EDEADLK"
            if resolve:
                ww.unlock(first)
                ww.lock_slow(second, ctx)
                ww.lock(first, ctx)
                err = None
        for lk in (second, first):  # reverse order, as test_abba: B is free once A is
            if lk.ctx is ctx:
                ww.unlock(lk)
        ww.acquire_fini(ctx)
        results[name] = err

    t = runtime.spawn(side, "ba", b, a, b_ready, a_ready, name="ba")
    side("ab", a, b, a_ready, b_ready)
    t.join()
    return results


def test_abba_with_backoff_always_completes(ww_class):
    """With back-off (unlock, lock_slow the contended lock, relock) ABBA always completes."""
    for seed in range(100):
        assert run(_abba, ww_class, True, seed=seed) == {"ab": None, "ba": None}


def test_abba_without_backoff_one_side_dies(ww_class):
    """Without resolving, exactly one of the two transactions sees -EDEADLK: the ABBA
    deadlock is never missed and the older transaction never dies."""
    for seed in range(100):
        results = run(_abba, ww_class, False, seed=seed)
        assert sorted(results.values(), key=str) == ["EDEADLK", None]


def test_abba_as_plain_mutexes_deadlocks_and_names_both_tasks(ww_class):
    """The same ABBA with ctx=None (no deadlock avoidance) deadlocks, and the report names
    both tasks with the lock each holds and the one each waits for (lockdep, counting
    instead of raising here, flags the unnested same-class locking first)."""

    def main():
        a, b = ww.WwMutex(ww_class, "A"), ww.WwMutex(ww_class, "B")
        a_ready, b_ready = Completion("A locked"), Completion("B locked")

        def side(first, second, mine, theirs):
            ww.lock(first, None)
            mine.complete()
            theirs.wait_for_completion()
            ww.lock(second, None)

        runtime.spawn(side, b, a, b_ready, a_ready, name="ba")
        side(a, b, a_ready, b_ready)

    for seed in range(50):
        rt = Deterministic(seed, strict=False)
        with pytest.raises(DeadlockError) as info:
            rt.run(main)
        assert [r.kind for r in rt.lockdep.reports] == ["recursive"]
        msg = str(info.value)
        assert "'main': holds A; waits for ww_mutex B held by ba" in msg
        assert "'ba': holds B; waits for ww_mutex A held by main" in msg


# test_cycle


def _cycle(ww_class, n: int):
    """n transactions in a ring: each holds its own lock, then takes its neighbour's
    (the kernel's test_cycle), backing off once on -EDEADLK."""
    locks = [ww.WwMutex(ww_class, f"L{i}") for i in range(n)]
    ready = [Completion(f"L{i} locked") for i in range(n)]
    results = [None] * n

    def worker(i):
        mine, theirs = locks[i], locks[(i + 1) % n]
        ctx = ww.acquire_init(ww_class)
        ww.lock(mine, ctx)
        ready[i].complete()
        ready[(i + 1) % n].wait_for_completion()
        try:
            ww.lock(theirs, ctx)
        except Edeadlk:
            ww.unlock(mine)
            ww.lock_slow(theirs, ctx)
            try:
                ww.lock(mine, ctx)
            except Edeadlk as e:
                results[i] = e
        for lk in (theirs, mine):
            if lk.ctx is ctx:
                ww.unlock(lk)
        ww.acquire_fini(ctx)

    tasks = [runtime.spawn(worker, i, name=f"cycle{i}") for i in range(1, n)]
    worker(0)
    for t in tasks:
        t.join()
    return results


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_cycle_of_contexts_resolves(ww_class, n):
    """A ring of 2..5 contexts, each waiting on its neighbour, is always broken by
    back-off and every transaction completes."""
    for seed in range(40):
        assert run(_cycle, ww_class, n, seed=seed) == [None] * n


# stress


def _stress(ww_class, reorder: bool, seed: int, n_tasks=4, n_locks=6, loops=3):
    """Tasks run transactions over random subsets of shared locks (stress_inorder /
    stress_reorder) and check that every lock they hold is theirs alone."""
    locks = [ww.WwMutex(ww_class, f"S{i}") for i in range(n_locks)]
    holder = {lk: None for lk in locks}
    stats = SimpleNamespace(backoffs=0, done=0)
    rng = random.Random(seed)
    plans = [
        [rng.sample(locks, rng.randint(2, n_locks)) for _ in range(loops)] for _ in range(n_tasks)
    ]

    def worker(plan):
        me = runtime.current()
        for order in plan:
            order = list(order)
            ctx = ww.acquire_init(ww_class)
            if reorder:
                _lock_reorder(order, ctx, stats)
            else:
                lock_all(order, ctx, stats)
            ww.acquire_done(ctx)
            for lk in order:
                assert holder[lk] is None
                holder[lk] = me
            runtime.preempt("work")
            for lk in order:
                assert holder[lk] is me
                holder[lk] = None
            for lk in reversed(order):
                ww.unlock(lk)
            ww.acquire_fini(ctx)
            stats.done += 1

    tasks = [runtime.spawn(worker, plan, name=f"stress{i}") for i, plan in enumerate(plans)]
    for t in tasks:
        t.join()
    assert all(not ww.is_locked(lk) for lk in locks)
    return stats


def _lock_reorder(order: list[ww.WwMutex], ctx, stats) -> None:
    """stress_reorder: on -EDEADLK, release all, take the contended lock first and move it
    to the front of the list."""
    while True:
        taken = []
        try:
            for lk in order:
                if lk.ctx is not ctx:
                    ww.lock(lk, ctx)
                taken.append(lk)
            return
        except Edeadlk:
            stats.backoffs += 1
            for lk in order:
                if lk.ctx is ctx:
                    ww.unlock(lk)
            contended = ctx.contending_lock
            ww.lock_slow(contended, ctx)
            order.remove(contended)
            order.insert(0, contended)


@pytest.mark.parametrize("reorder", [False, True], ids=["inorder", "reorder"])
def test_stress_transactions_complete_exclusively(ww_class, reorder):
    """Random overlapping transactions always complete, never share a lock, and do hit
    the back-off path."""
    backoffs = 0
    for seed in range(40):
        stats = run(_stress, ww_class, reorder, seed, seed=seed)
        assert stats.done == 4 * 3
        backoffs += stats.backoffs
    assert backoffs > 0


def test_stress_one_lock_without_context(ww_class):
    """Many tasks hammering one ww mutex with ctx=None keep mutual exclusion (stress_one)."""

    def main():
        m = ww.WwMutex(ww_class, "one")
        state = SimpleNamespace(inside=0, total=0)

        def worker():
            for _ in range(5):
                if ww.trylock(m):
                    pass
                else:
                    ww.lock(m, None)
                state.inside += 1
                assert state.inside == 1
                runtime.preempt("inside")
                state.inside -= 1
                state.total += 1
                ww.unlock(m)

        tasks = [runtime.spawn(worker, name=f"w{i}") for i in range(4)]
        for t in tasks:
            t.join()
        return state.total

    for seed in range(30):
        assert run(main, seed=seed) == 20


# The die and wound rules.


def _aged_pair(ww_class):
    """Completions that make the task calling ``older()`` take its stamp first."""
    stamped = Completion("older stamped")

    def older():
        ctx = ww.acquire_init(ww_class)
        stamped.complete()
        return ctx

    def younger():
        stamped.wait_for_completion()
        return ww.acquire_init(ww_class)

    return older, younger


def _hold_then_request(ww_class, older_holds: bool):
    """The holder's context holds X; the requester's context holds Z and requests X.
    Returns what the requester saw and whether the holder got wounded."""
    x, z = ww.WwMutex(ww_class, "X"), ww.WwMutex(ww_class, "Z")
    older, younger = _aged_pair(ww_class)
    x_held = Completion("X held")
    out = {}

    def requester():
        ctx = younger() if older_holds else older()
        ww.lock(z, ctx)
        x_held.wait_for_completion()
        try:
            ww.lock(x, ctx)
            out["requester"] = "locked"
            ww.unlock(x)
        except Edeadlk:
            out["requester"] = "EDEADLK"
            out["contending"] = ctx.contending_lock
        ww.unlock(z)
        ww.acquire_fini(ctx)

    t = runtime.spawn(requester, name="requester")
    ctx = older() if older_holds else younger()
    ww.lock(x, ctx)
    x_held.complete()
    while not t.done and t.wait_reason is None:
        runtime.preempt("let requester contend")
    out["holder_wounded"] = ctx.wounded
    ww.unlock(x)
    ww.acquire_fini(ctx)
    t.join()
    return out, x


def test_wait_die_younger_requester_dies_older_waits():
    """Wait-Die: a younger context holding locks dies on a lock held by an older one and
    records the contended lock; an older requester waits instead."""
    for seed in range(30):
        out, x = run(_hold_then_request, ww.WD_CLASS("wd"), True, seed=seed)
        assert out == {"requester": "EDEADLK", "contending": x, "holder_wounded": False}
        out, _ = run(_hold_then_request, ww.WD_CLASS("wd"), False, seed=seed)
        assert out == {"requester": "locked", "holder_wounded": False}


def test_wound_wait_older_requester_wounds_younger_holder():
    """Wound-Wait: an older requester wounds the younger holder and waits; a younger
    requester just waits."""
    for seed in range(30):
        out, _ = run(_hold_then_request, ww.WW_CLASS("ww"), False, seed=seed)
        assert out == {"requester": "locked", "holder_wounded": True}
        out, _ = run(_hold_then_request, ww.WW_CLASS("ww"), True, seed=seed)
        assert out == {"requester": "locked", "holder_wounded": False}


def test_wounded_context_dies_lazily_at_next_contended_lock():
    """A wounded context keeps running: an uncontended lock still succeeds, and it dies
    (-EDEADLK) the next time it has to wait for a lock."""
    cls = ww.WW_CLASS("ww")

    def main():
        a, c, d = (ww.WwMutex(cls, n) for n in "ACD")
        older, younger = _aged_pair(cls)
        a_held, d_held = Completion("A held"), Completion("D held")
        out = {}

        def young():
            ctx = younger()
            ww.lock(a, ctx)
            a_held.complete()
            while not ctx.wounded:
                runtime.preempt("wait to be wounded")
            ww.lock(c, ctx)  # free: succeeds although wounded
            out["c"] = "locked"
            d_held.wait_for_completion()
            try:
                ww.lock(d, ctx)
            except Edeadlk:
                out["died"] = True
            for lk in (c, a):
                ww.unlock(lk)
            ww.acquire_fini(ctx)

        t = runtime.spawn(young, name="young")
        ctx = older()
        ww.lock(d, ctx)
        d_held.complete()
        a_held.wait_for_completion()
        ww.lock(a, ctx)  # wounds young, then waits for it to back off
        ww.unlock(a)
        ww.unlock(d)
        ww.acquire_fini(ctx)
        t.join()
        return out

    for seed in range(30):
        assert run(main, seed=seed) == {"c": "locked", "died": True}


def test_context_holding_nothing_never_dies(ww_class):
    """A context with acquired == 0 always waits, never gets -EDEADLK, whoever holds the
    lock (which is what makes lock_slow safe)."""

    def main():
        m = ww.WwMutex(ww_class, "M")
        older, younger = _aged_pair(ww_class)
        m_held = Completion("M held")

        def young():
            ctx = younger()
            m_held.wait_for_completion()
            ww.lock(m, ctx)
            ww.unlock(m)
            ww.acquire_fini(ctx)

        t = runtime.spawn(young, name="young")
        ctx = older()
        ww.lock(m, ctx)
        m_held.complete()
        while t.wait_reason != "ww_mutex M held by main" and not t.done:
            runtime.preempt("let it wait")
        assert not t.done
        ww.unlock(m)
        ww.acquire_fini(ctx)
        t.join()

    for seed in range(30):
        run(main, seed=seed)


def test_trylock_never_dies_even_against_an_older_holder(ww_class):
    """trylock with a context returns False on a held lock instead of -EDEADLK."""

    def main():
        m, n = ww.WwMutex(ww_class, "M"), ww.WwMutex(ww_class, "N")
        older = ww.acquire_init(ww_class)
        ww.lock(m, older)
        out = {}

        def young():
            ctx = ww.acquire_init(ww_class)
            ww.lock(n, ctx)
            out["try"] = ww.trylock(m, ctx)
            ww.unlock(n)
            ww.acquire_fini(ctx)

        runtime.spawn(young, name="young").join()
        ww.unlock(m)
        ww.acquire_fini(older)
        return out

    assert run(main) == {"try": False}


def test_injected_deadlk_exercises_backoff_deterministically(ww_class):
    """acquire_init(inject_deadlk=p) makes locks fail with spurious -EDEADLK drawn from the
    runtime's seed: transactions still complete, back-offs happen, and the same seed
    injects the same failures."""

    def main():
        locks = [ww.WwMutex(ww_class, f"I{i}") for i in range(4)]
        stats = SimpleNamespace(backoffs=0)
        for _ in range(5):
            ctx = ww.acquire_init(ww_class, inject_deadlk=0.5)
            lock_all(locks, ctx, stats)
            for lk in locks:
                ww.unlock(lk)
            ww.acquire_fini(ctx)
        return stats.backoffs

    counts = [run(main, seed=s) for s in range(20)]
    assert sum(counts) > 0
    assert counts == [run(main, seed=s) for s in range(20)]


def test_lock_interruptible_raises_eintr_on_signal(ww_class):
    """A signal aborts ww_mutex_lock_interruptible's wait with -EINTR and leaves the
    context holding nothing more."""

    def main():
        m = ww.WwMutex(ww_class, "M")
        ww.lock(m, None)
        out = {}

        def waiter():
            ctx = ww.acquire_init(ww_class)
            try:
                ww.lock_interruptible(m, ctx)
            except Eintr as e:
                out["err"] = str(e)
                out["acquired"] = ctx.acquired
            ww.acquire_fini(ctx)

        t = runtime.spawn(waiter, name="waiter")
        runtime.preempt("p")
        t.send_signal()
        t.join()
        ww.unlock(m)
        return out

    for seed in range(30):
        out = run(main, seed=seed)
        assert out["err"].startswith("-EINTR") and out["acquired"] == 0


def test_stamps_are_per_runtime_and_increase():
    """Contexts of one class get increasing stamps, restarting in every runtime, so event
    logs do not depend on earlier runs."""
    cls = ww.WD_CLASS("stamps")

    def main():
        stamps = []
        for _ in range(3):
            ctx = ww.acquire_init(cls)
            stamps.append(ctx.stamp)
            ww.acquire_fini(ctx)
        return stamps

    assert run(main) == run(main) == [1, 2, 3]


def test_reservation_class_is_wait_die_with_lockdep_names():
    """The dma_resv class is Wait-Die and its lockdep classes carry the kernel's names."""
    cls = ww.RESERVATION_WW_CLASS
    assert cls.is_wait_die
    assert cls.mutex_class.name == "reservation_ww_class_mutex"
    assert cls.acquire_class.name == "reservation_ww_class_acquire"
    assert not ww.WW_CLASS("x").is_wait_die and ww.WD_CLASS("y").is_wait_die


def test_statistics_show_owner_and_waiters(ww_class):
    """statistics() reports the owner, its stamp and the queued tasks."""

    def main():
        m = ww.WwMutex(ww_class, "M")
        ctx = ww.acquire_init(ww_class)
        ww.lock(m, ctx)

        def waiter():
            ww.lock(m, None)
            ww.unlock(m)

        t = runtime.spawn(waiter, name="waiter")
        while t.wait_reason is None:
            runtime.preempt("p")
        stats = m.statistics()
        ww.unlock(m)
        ww.acquire_fini(ctx)
        t.join()
        return stats

    assert run(main) == {"locked": True, "owner": "main", "ctx_stamp": 1, "waiters": ["waiter"]}
