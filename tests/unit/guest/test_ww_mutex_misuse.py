"""Every ww_mutex misuse check fires on a minimal wrong program and stays quiet on the
matching right one (the checks CONFIG_DEBUG_WW_MUTEXES / DEBUG_LOCKS_WARN_ON make)."""

from __future__ import annotations

import pytest

from gemu.guest.errors import Edeadlk
from gemu.guest.kernel import runtime
from gemu.guest.kernel.runtime import Completion, Deterministic
from gemu.guest.locking import lockdep
from gemu.guest.locking import ww_mutex as ww
from gemu.guest.locking.lockdep import LockdepError

CLS = ww.WD_CLASS("misuse")


def _locks(*names):
    return [ww.WwMutex(CLS, n) for n in names]


def _die_on_b():
    """Lock A then B with spurious -EDEADLK forced on B; returns (ctx, A, B)."""
    a, b = _locks("A", "B")
    ctx = ww.acquire_init(CLS, inject_deadlk=1.0)
    ww.lock(a, ctx)
    with pytest.raises(Edeadlk):
        ww.lock(b, ctx)
    assert ctx.contending_lock is b
    return ctx, a, b


def slow_without_deadlk(wrong: bool):
    (a,) = _locks("A")
    ctx = ww.acquire_init(CLS)
    if wrong:
        ww.lock_slow(a, ctx)
    else:
        ww.lock(a, ctx)
    ww.unlock(a)
    ww.acquire_fini(ctx)


def slow_on_other_lock(wrong: bool):
    ctx, a, b = _die_on_b()
    ww.unlock(a)
    (c,) = _locks("C")
    target = c if wrong else b
    ww.lock_slow(target, ctx)
    ww.unlock(target)
    ww.acquire_fini(ctx)


def slow_with_locks_held(wrong: bool):
    ctx, a, b = _die_on_b()
    if not wrong:
        ww.unlock(a)
    ww.lock_slow(b, ctx)
    ww.unlock(b)
    if wrong:
        ww.unlock(a)
    ww.acquire_fini(ctx)


def lock_after_done(wrong: bool):
    a, b = _locks("A", "B")
    ctx = ww.acquire_init(CLS)
    ww.lock(a, ctx)
    if not wrong:
        ww.lock(b, ctx)
    ww.acquire_done(ctx)
    if wrong:
        ww.lock(b, ctx)
    ww.unlock(b)
    ww.unlock(a)
    ww.acquire_fini(ctx)


def fini_with_locks_held(wrong: bool):
    (a,) = _locks("A")
    ctx = ww.acquire_init(CLS)
    ww.lock(a, ctx)
    if not wrong:
        ww.unlock(a)
    ww.acquire_fini(ctx)
    if wrong:
        ww.unlock(a)


def lock_after_fini(wrong: bool):
    (a,) = _locks("A")
    ctx = ww.acquire_init(CLS)
    if not wrong:
        ww.lock(a, ctx)
        ww.unlock(a)
    ww.acquire_fini(ctx)
    if wrong:
        ww.lock(a, ctx)
        ww.unlock(a)


def fini_twice(wrong: bool):
    ctx = ww.acquire_init(CLS)
    ww.acquire_fini(ctx)
    if wrong:
        ww.acquire_fini(ctx)


def mixed_classes(wrong: bool):
    other = ww.WD_CLASS("other")
    a = ww.WwMutex(other if wrong else CLS, "A")
    ctx = ww.acquire_init(CLS)
    ww.lock(a, ctx)
    ww.unlock(a)
    ww.acquire_fini(ctx)


def unlock_by_non_owner(wrong: bool):
    (a,) = _locks("A")
    held, release = Completion("held"), Completion("release")

    def holder():
        ww.lock(a, None)
        held.complete()
        release.wait_for_completion()
        if not wrong:
            ww.unlock(a)

    t = runtime.spawn(holder, name="holder")
    held.wait_for_completion()
    if wrong:
        ww.unlock(a)
    release.complete()
    t.join()


def unlock_unlocked(wrong: bool):
    (a,) = _locks("A")
    if not wrong:
        ww.lock(a, None)
    ww.unlock(a)


def ctx_of_another_task(wrong: bool):
    (a,) = _locks("A")
    ctx = ww.acquire_init(CLS)

    def borrower():
        mine = ctx if wrong else ww.acquire_init(CLS)
        ww.lock(a, mine)
        ww.unlock(a)
        if not wrong:
            ww.acquire_fini(mine)

    runtime.spawn(borrower, name="borrower").join()
    ww.acquire_fini(ctx)


def relock_without_ctx(wrong: bool):
    (a,) = _locks("A")
    ww.lock(a, None)
    if wrong:
        ww.lock(a, None)
    ww.unlock(a)


CASES = [
    (slow_without_deadlk, "ww-misuse", "lock_slow A without a preceding -EDEADLK"),
    (slow_on_other_lock, "ww-misuse", "after -EDEADLK on B, context .* must lock B first, not C"),
    (slow_with_locks_held, "ww-misuse", "without first releasing the 1 lock"),
    (lock_after_done, "ww-misuse", "lock B with context .* after acquire_done"),
    (fini_with_locks_held, "ww-misuse", "acquire_fini on context .* still holds 1 lock"),
    (lock_after_fini, "ww-misuse", "lock A with context .* after acquire_fini"),
    (fini_twice, "ww-misuse", "acquire_fini twice"),
    (mixed_classes, "ww-misuse", "lock A of class other with a context of class misuse"),
    (unlock_by_non_owner, "ww-misuse", "main unlocks A held by holder"),
    (unlock_unlocked, "ww-misuse", "main unlocks A which is not locked"),
    (ctx_of_another_task, "ww-misuse", "borrower locks A with main's acquire context"),
    (relock_without_ctx, "recursive", "main locks A which it already holds"),
]


@pytest.mark.parametrize(("program", "kind", "message"), CASES, ids=[c[0].__name__ for c in CASES])
def test_misuse_is_reported(program, kind, message):
    """The wrong program raises a LockdepError of the expected kind and message."""
    with pytest.raises(LockdepError, match=message) as info:
        Deterministic(0).run(program, True)
    assert info.value.report.kind == kind


@pytest.mark.parametrize(("program", "kind", "message"), CASES, ids=[c[0].__name__ for c in CASES])
def test_right_program_is_quiet(program, kind, message):
    """The matching right program runs in strict mode without any report."""
    for seed in range(5):
        rt = Deterministic(seed)
        rt.run(program, False)
        assert not rt.lockdep or not rt.lockdep.reports


def test_non_strict_runs_count_misuse_and_keep_going():
    """Out of strict mode a misuse is counted once per kind of violation (with a count),
    logged in the event log, and the program continues as the kernel would."""

    def main():
        (a,) = _locks("A")
        for _ in range(3):
            ww.unlock(a)
        unlock_by_non_owner(True)
        return lockdep.reports()

    rt = Deterministic(0, strict=False)
    reps = rt.run(main)
    assert [(r.kind, r.count) for r in reps] == [("ww-misuse", 3), ("ww-misuse", 1)]
    assert "not locked" in reps[0].message and reps[0].task == "main"
    assert any("lockdep ww-misuse" in line for line in rt.event_log)


def test_non_owner_unlock_still_releases_in_non_strict_mode():
    """After a reported non-owner unlock the mutex is free and the owner's lockdep stack no
    longer lists it, so the run does not cascade into more reports."""

    def main():
        (a,) = _locks("A")
        held, release = Completion("held"), Completion("release")

        def holder():
            ww.lock(a, None)
            held.complete()
            release.wait_for_completion()

        t = runtime.spawn(holder, name="holder")
        held.wait_for_completion()
        ww.unlock(a)
        assert not ww.is_locked(a)
        release.complete()
        t.join()
        return len(lockdep.reports())

    assert Deterministic(0, strict=False).run(main) == 1
