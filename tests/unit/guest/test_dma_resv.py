"""dma_resv: the kernel's st-dma-resv selftests for every usage, plus slots, replacement rules,
queries and the locking contract."""

from __future__ import annotations

import errno

import pytest

from gemu.guest import errors
from gemu.guest.dma_buf import dma_fence, dma_resv
from gemu.guest.dma_buf.dma_fence import DmaFence
from gemu.guest.dma_buf.dma_resv import DmaResv, DmaResvUsage
from gemu.guest.errors import Ealready, Einval, Enomem, Erestartsys, KernelWarning
from gemu.guest.kernel import runtime
from gemu.guest.locking import lockdep, ww_mutex

MS = 1_000_000
USAGES = list(DmaResvUsage)


@pytest.fixture
def lax():
    """Non-strict warnings (as in emulator runs): warn_on counts instead of raising."""
    was = errors.is_strict()
    errors.set_strict(False)
    errors.reset_warn_stats()
    yield errors.warn_stats()
    errors.set_strict(was)
    errors.reset_warn_stats()


@pytest.fixture
def resv():
    """An unlocked reservation object, torn down (unlocked if needed) after the test."""
    obj = dma_resv.init(name="test-resv")
    yield obj
    if dma_resv.held(obj):
        dma_resv.unlock(obj)
    dma_resv.fini(obj)


def alloc_fence(context: int | None = None, seqno: int = 1) -> DmaFence:
    return DmaFence(None, dma_fence.context_alloc(1) if context is None else context, seqno)


def add_locked(obj: DmaResv, fence: DmaFence, usage: DmaResvUsage) -> None:
    dma_resv.lock(obj, None)
    dma_resv.reserve_fences(obj, 1)
    dma_resv.add_fence(obj, fence, usage)
    dma_resv.unlock(obj)


def entries(obj: DmaResv) -> list[tuple[DmaFence, DmaResvUsage]]:
    lst = obj.fences
    return [] if lst is None else list(lst.table[: lst.num_fences])


# --- st-dma-resv ----------------------------------------------------------------------------


def test_sanity(resv):
    """A reservation object can be locked without a context and unlocked."""
    f = alloc_fence()
    dma_fence.enable_sw_signaling(f)
    dma_fence.signal(f)
    dma_fence.put(f)
    dma_resv.lock(resv, None)
    assert dma_resv.is_locked(resv)
    dma_resv.unlock(resv)
    assert not dma_resv.is_locked(resv)


@pytest.mark.parametrize("usage", USAGES, ids=lambda u: u.name)
def test_signaling(resv, usage):
    """test_signaled() is false while the added fence is pending and true once it signals."""
    f = alloc_fence()
    dma_fence.enable_sw_signaling(f)
    dma_resv.lock(resv, None)
    dma_resv.reserve_fences(resv, 1)
    dma_resv.add_fence(resv, f, usage)
    assert not dma_resv.test_signaled(resv, usage), "Resv unexpectedly signaled"
    dma_fence.signal(f)
    assert dma_resv.test_signaled(resv, usage), "Resv not reporting signaled"
    dma_resv.unlock(resv)
    dma_fence.put(f)


@pytest.mark.parametrize("usage", USAGES, ids=lambda u: u.name)
def test_for_each(resv, usage):
    """The locked iterator finds exactly the one added fence, with its usage, even signaled."""
    f = alloc_fence()
    dma_resv.lock(resv, None)
    dma_resv.reserve_fences(resv, 1)
    dma_resv.add_fence(resv, f, usage)
    for _pending_then_signaled in range(2):
        cursor = dma_resv.iter_begin(resv, usage)
        found = [
            (g, dma_resv.iter_usage(cursor)) for g in dma_resv.for_each_fence(resv, usage, cursor)
        ]
        assert found == [(f, usage)]
        dma_fence.check_and_signal(f)
    dma_resv.unlock(resv)
    dma_fence.put(f)


@pytest.mark.parametrize("usage", USAGES, ids=lambda u: u.name)
def test_for_each_unlocked(resv, usage):
    """The unlocked iterator flags its first fence as restarted, finds the same fence again
    (restarted) when the list changes under it, and skips the fence once signaled."""
    f = alloc_fence()
    add_locked(resv, f, usage)
    cursor = dma_resv.iter_begin(resv, usage)
    seen = []
    for fence in dma_resv.for_each_fence_unlocked(cursor):
        assert dma_resv.iter_is_restarted(cursor), "No restart flag"
        assert fence is f
        assert dma_resv.iter_usage(cursor) == usage
        seen.append(fence)
        if len(seen) == 1:
            cursor.fences = object()  # as if the list was replaced: must restart
    dma_resv.iter_end(cursor)
    assert seen == [f, f]
    dma_fence.signal(f)
    cursor = dma_resv.iter_begin(resv, usage)
    assert list(dma_resv.for_each_fence_unlocked(cursor)) == []
    dma_resv.iter_end(cursor)
    dma_fence.put(f)


@pytest.mark.parametrize("usage", USAGES, ids=lambda u: u.name)
def test_get_fences(resv, usage):
    """get_fences returns exactly the added fence, referenced, and nothing after it signals."""
    f = alloc_fence()
    add_locked(resv, f, usage)
    fences = dma_resv.get_fences(resv, usage)
    assert fences == [f]
    assert f.refcount == 3  # ours, the resv's, the copy's
    dma_fence.signal(f)
    for g in fences:
        dma_fence.put(g)
    assert dma_resv.get_fences(resv, usage) == []
    dma_fence.put(f)


# --- usage filtering and replacement ---------------------------------------------------------


@pytest.mark.parametrize("query", USAGES, ids=lambda u: u.name)
def test_usage_filtering(resv, query):
    """A query for one usage returns the fences of that usage and every stricter one."""
    fences = {u: alloc_fence() for u in USAGES}
    dma_resv.lock(resv, None)
    dma_resv.reserve_fences(resv, len(USAGES))
    for u, f in fences.items():
        dma_resv.add_fence(resv, f, u)
    want = [fences[u] for u in USAGES if u <= query]
    assert list(dma_resv.for_each_fence(resv, query)) == want
    dma_resv.unlock(resv)
    assert dma_resv.get_fences(resv, query) == want
    for f in want:
        dma_fence.put(f)


def test_usage_rw():
    """A writer waits for readers and writers, a reader only for writers."""
    assert dma_resv.usage_rw(True) is DmaResvUsage.READ
    assert dma_resv.usage_rw(False) is DmaResvUsage.WRITE


def test_later_fence_of_same_context_replaces(resv):
    """A later fence of the same context and equal usage takes the old fence's slot."""
    ctx = dma_fence.context_alloc(1)
    old, new = alloc_fence(ctx, 1), alloc_fence(ctx, 2)
    dma_resv.lock(resv, None)
    dma_resv.reserve_fences(resv, 1)
    dma_resv.add_fence(resv, old, DmaResvUsage.WRITE)
    dma_resv.reserve_fences(resv, 1)
    dma_resv.add_fence(resv, new, DmaResvUsage.WRITE)
    assert entries(resv) == [(new, DmaResvUsage.WRITE)]
    assert old.refcount == 1  # the resv dropped its reference
    dma_resv.unlock(resv)


def test_fence_is_promoted_never_degraded(resv):
    """Re-adding a BOOKKEEP fence as READ promotes it in place; re-adding a READ fence as
    BOOKKEEP keeps the READ entry and takes a new slot."""
    ctx = dma_fence.context_alloc(1)
    f = alloc_fence(ctx, 1)
    dma_resv.lock(resv, None)
    dma_resv.reserve_fences(resv, 2)
    dma_resv.add_fence(resv, f, DmaResvUsage.BOOKKEEP)
    dma_resv.add_fence(resv, f, DmaResvUsage.READ)
    assert entries(resv) == [(f, DmaResvUsage.READ)]
    dma_resv.add_fence(resv, f, DmaResvUsage.BOOKKEEP)
    assert entries(resv) == [(f, DmaResvUsage.READ), (f, DmaResvUsage.BOOKKEEP)]
    assert list(dma_resv.for_each_fence(resv, DmaResvUsage.READ)) == [f]
    dma_resv.unlock(resv)


def test_earlier_fence_does_not_replace(resv):
    """An earlier fence of the same context does not replace a later one: it takes a slot."""
    ctx = dma_fence.context_alloc(1)
    later, earlier = alloc_fence(ctx, 5), alloc_fence(ctx, 4)
    dma_resv.lock(resv, None)
    dma_resv.reserve_fences(resv, 2)
    dma_resv.add_fence(resv, later, DmaResvUsage.READ)
    dma_resv.add_fence(resv, earlier, DmaResvUsage.READ)
    assert [f for f, _ in entries(resv)] == [later, earlier]
    dma_resv.unlock(resv)


def test_signaled_entry_is_reused(resv):
    """Any signaled entry is overwritten by the next add, whatever its context."""
    a, b = alloc_fence(), alloc_fence()
    dma_resv.lock(resv, None)
    dma_resv.reserve_fences(resv, 1)
    dma_resv.add_fence(resv, a, DmaResvUsage.KERNEL)
    dma_fence.signal(a)
    dma_resv.reserve_fences(resv, 1)
    dma_resv.add_fence(resv, b, DmaResvUsage.BOOKKEEP)
    assert entries(resv) == [(b, DmaResvUsage.BOOKKEEP)]
    dma_resv.unlock(resv)


def test_replace_fences(resv):
    """replace_fences swaps every fence of a context for the replacement at the new usage."""
    ctx = dma_fence.context_alloc(1)
    a, other = alloc_fence(ctx, 1), alloc_fence()
    repl = alloc_fence()
    dma_resv.lock(resv, None)
    dma_resv.reserve_fences(resv, 2)
    dma_resv.add_fence(resv, a, DmaResvUsage.WRITE)
    dma_resv.add_fence(resv, other, DmaResvUsage.READ)
    dma_resv.replace_fences(resv, ctx, repl, DmaResvUsage.BOOKKEEP)
    assert entries(resv) == [(repl, DmaResvUsage.BOOKKEEP), (other, DmaResvUsage.READ)]
    assert a.refcount == 1 and repl.refcount == 2
    dma_resv.unlock(resv)


def test_container_fence_warns(resv):
    """Adding a fence array is a driver bug: add its members instead."""
    arr = dma_fence.array_create([alloc_fence()], dma_fence.context_alloc(1), 1)
    dma_resv.lock(resv, None)
    dma_resv.reserve_fences(resv, 1)
    with pytest.raises(KernelWarning, match="container"):
        dma_resv.add_fence(resv, arr, DmaResvUsage.READ)


# --- slots -----------------------------------------------------------------------------------


def test_reserve_growth_rule(resv):
    """The first list has max(4, n) slots; growth gives max(num + n, 2 * max) slots."""
    dma_resv.lock(resv, None)
    dma_resv.reserve_fences(resv, 1)
    assert resv.fences.max_fences == 4
    for _ in range(4):
        dma_resv.add_fence(resv, alloc_fence(), DmaResvUsage.READ)
    dma_resv.reserve_fences(resv, 1)
    assert resv.fences.max_fences == 8
    dma_resv.reserve_fences(resv, 3)  # 4 + 3 <= 8: no change
    assert resv.fences.max_fences == 8
    dma_resv.reserve_fences(resv, 20)
    assert resv.fences.max_fences == 24
    dma_resv.unlock(resv)


def test_reserve_drops_signaled_fences(resv):
    """Reallocating the list keeps only the fences that have not signaled."""
    a, b = alloc_fence(), alloc_fence()
    dma_resv.lock(resv, None)
    dma_resv.reserve_fences(resv, 2)
    dma_resv.add_fence(resv, a, DmaResvUsage.READ)
    dma_resv.add_fence(resv, b, DmaResvUsage.READ)
    dma_fence.signal(a)
    dma_resv.unlock(resv)
    dma_resv.lock(resv, None)
    dma_resv.reserve_fences(resv, 1)
    assert entries(resv) == [(b, DmaResvUsage.READ)]
    assert a.refcount == 1
    dma_resv.unlock(resv)


def test_unlock_forgets_reservation(resv):
    """A reservation does not survive unlock: adding after re-locking without reserving fails."""
    dma_resv.lock(resv, None)
    dma_resv.reserve_fences(resv, 4)
    dma_resv.unlock(resv)
    dma_resv.lock(resv, None)
    with pytest.raises(KernelWarning, match="without a reserved slot"):
        dma_resv.add_fence(resv, alloc_fence(), DmaResvUsage.READ)


def test_add_without_reserve_lax(resv, lax):
    """In runs the missing reservation is counted and the fence is still tracked."""
    f = alloc_fence()
    dma_resv.lock(resv, None)
    dma_resv.add_fence(resv, f, DmaResvUsage.WRITE)
    assert lax.total == 1
    assert entries(resv) == [(f, DmaResvUsage.WRITE)]
    dma_resv.unlock(resv)


def test_reserve_zero_is_invalid(resv):
    """Reserving no slots is a bug (warning) and -EINVAL."""
    dma_resv.lock(resv, None)
    with pytest.raises(KernelWarning, match="num_fences"):
        dma_resv.reserve_fences(resv, 0)


def test_reserve_enomem_keeps_old_list(resv, monkeypatch):
    """An injected allocation failure gives -ENOMEM and leaves the fences untouched."""
    f = alloc_fence()
    add_locked(resv, f, DmaResvUsage.READ)
    before = resv.fences
    monkeypatch.setattr(dma_resv, "should_fail_alloc", lambda obj, n: True)
    dma_resv.lock(resv, None)
    with pytest.raises(Enomem):
        dma_resv.reserve_fences(resv, 1)
    assert resv.fences is before and entries(resv) == [(f, DmaResvUsage.READ)]
    dma_resv.unlock(resv)


def test_reserve_needs_lock(resv):
    """reserve_fences asserts the lock is held."""
    with pytest.raises(lockdep.LockdepError, match="must hold"):
        dma_resv.reserve_fences(resv, 1)


def test_add_fence_needs_lock(resv):
    """add_fence asserts the lock is held."""
    with pytest.raises(lockdep.LockdepError, match="must hold"):
        dma_resv.add_fence(resv, alloc_fence(), DmaResvUsage.READ)


# --- locking ---------------------------------------------------------------------------------


def test_lock_with_ctx_twice_is_ealready(resv):
    """Locking an object twice in one acquire context is -EALREADY; locking_ctx names the ctx."""
    ctx = ww_mutex.acquire_init(dma_resv.RESERVATION_WW_CLASS)
    dma_resv.lock(resv, ctx)
    assert dma_resv.locking_ctx(resv) is ctx
    with pytest.raises(Ealready):
        dma_resv.lock(resv, ctx)
    dma_resv.unlock(resv)
    ww_mutex.acquire_fini(ctx)


def test_trylock(resv):
    """trylock succeeds on a free object and fails on a held one."""

    def main():
        assert dma_resv.trylock(resv)
        got = []
        t = runtime.spawn(lambda: got.append(dma_resv.trylock(resv)), name="other")
        t.join()
        assert got == [False]
        dma_resv.unlock(resv)

    runtime.Deterministic(0).run(main)


def test_add_fence_publishes_for_the_signal_owner(resv):
    """In the strict signalling mode, publishing a fence this task must signal opens the
    implicit signalling section; signalling the fence closes it. In the default mode (real
    lockdep's view) publishing opens nothing."""
    for strict in (False, True):
        lockdep.set_implicit_signalling(strict)
        try:
            f = alloc_fence()
            f.signal_owner = runtime.current()
            dma_resv.lock(resv, None)
            dma_resv.reserve_fences(resv, 1)
            dma_resv.add_fence(resv, f, DmaResvUsage.WRITE)
            assert lockdep.in_signalling() is strict
            dma_resv.unlock(resv)
            dma_fence.signal(f)
            assert not lockdep.in_signalling()
        finally:
            lockdep.set_implicit_signalling(False)


# --- queries ---------------------------------------------------------------------------------


def test_wait_timeout(resv):
    """wait_timeout returns >0 once every matching fence signaled, 0 on virtual timeout, and
    ignores fences of weaker usage."""

    def main():
        w, r = alloc_fence(), alloc_fence()
        dma_resv.lock(resv, None)
        dma_resv.reserve_fences(resv, 2)
        dma_resv.add_fence(resv, w, DmaResvUsage.WRITE)
        dma_resv.add_fence(resv, r, DmaResvUsage.READ)
        dma_resv.unlock(resv)
        assert dma_resv.wait_timeout(resv, DmaResvUsage.READ, False, 0) == 0
        assert dma_resv.wait_timeout(resv, DmaResvUsage.READ, False, 3 * MS) == 0

        def gpu():
            runtime.sleep_ns(MS)
            dma_fence.signal(w)

        runtime.spawn(gpu, name="gpu")
        left = dma_resv.wait_timeout(resv, DmaResvUsage.WRITE, False, 10 * MS)
        assert 0 < left <= 9 * MS
        assert not dma_resv.test_signaled(resv, DmaResvUsage.READ)
        dma_fence.signal(r)
        assert dma_resv.wait_timeout(resv, DmaResvUsage.BOOKKEEP, False, 0) == 1

    runtime.Deterministic(0).run(main)


def test_wait_interruptible(resv):
    """An interruptible wait with a pending signal raises -ERESTARTSYS."""

    def main():
        add_locked(resv, alloc_fence(), DmaResvUsage.KERNEL)
        runtime.current().send_signal()
        with pytest.raises(Erestartsys):
            dma_resv.wait_timeout(resv, DmaResvUsage.KERNEL, True, 10 * MS)
        runtime.current().clear_signal()
        dma_fence.signal(resv.fences.table[0][0])

    runtime.Deterministic(0).run(main)


def test_get_singleton(resv):
    """get_singleton gives None, the one fence, or an array that signals when all do."""
    assert dma_resv.get_singleton(resv, DmaResvUsage.BOOKKEEP) is None
    a, b = alloc_fence(), alloc_fence()
    add_locked(resv, a, DmaResvUsage.WRITE)
    one = dma_resv.get_singleton(resv, DmaResvUsage.BOOKKEEP)
    assert one is a
    dma_fence.put(one)
    add_locked(resv, b, DmaResvUsage.READ)
    many = dma_resv.get_singleton(resv, DmaResvUsage.BOOKKEEP)
    assert dma_fence.is_array(many) and many.fences == [a, b]
    dma_fence.signal(a)
    assert not dma_fence.is_signaled(many)
    dma_fence.signal(b)
    assert dma_fence.is_signaled(many)


def test_copy_fences(resv):
    """copy_fences gives dst the unsignaled fences of src with their usages, replacing its own."""
    src = dma_resv.init(name="src")
    a, b, gone = alloc_fence(), alloc_fence(), alloc_fence()
    dma_resv.lock(src, None)
    dma_resv.reserve_fences(src, 3)
    dma_resv.add_fence(src, a, DmaResvUsage.KERNEL)
    dma_resv.add_fence(src, gone, DmaResvUsage.WRITE)
    dma_resv.add_fence(src, b, DmaResvUsage.BOOKKEEP)
    dma_resv.unlock(src)
    dma_fence.signal(gone)
    old = alloc_fence()
    add_locked(resv, old, DmaResvUsage.READ)
    dma_resv.lock(resv, None)
    dma_resv.copy_fences(resv, src)
    assert entries(resv) == [(a, DmaResvUsage.KERNEL), (b, DmaResvUsage.BOOKKEEP)]
    dma_resv.unlock(resv)
    assert old.refcount == 1
    dma_resv.fini(src)


def test_unlocked_iterator_restarts_on_reallocation(resv):
    """A writer that grows the list while a reader walks it makes the reader restart."""
    a, b = alloc_fence(), alloc_fence()
    add_locked(resv, a, DmaResvUsage.READ)
    cursor = dma_resv.iter_begin(resv, DmaResvUsage.READ)
    it = dma_resv.for_each_fence_unlocked(cursor)
    assert next(it) is a and cursor.is_restarted
    add_locked(resv, b, DmaResvUsage.READ)  # unlock shrank max_fences: this reallocates
    rest = [(f, cursor.is_restarted) for f in it]
    dma_resv.iter_end(cursor)
    assert rest == [(a, True), (b, False)]


def test_fini_drops_references():
    """fini puts every fence the object held."""
    obj = dma_resv.init()
    f = alloc_fence()
    add_locked(obj, f, DmaResvUsage.READ)
    assert f.refcount == 2
    dma_resv.fini(obj)
    assert f.refcount == 1


def test_status_error_visible_through_singleton(resv):
    """A fence error stays visible to waiters that collect fences from the object."""
    f = alloc_fence()
    add_locked(resv, f, DmaResvUsage.WRITE)
    g = dma_resv.get_singleton(resv, DmaResvUsage.WRITE)
    dma_fence.set_error(f, -errno.EIO)
    dma_fence.signal(f)
    assert dma_fence.get_status(g) == -errno.EIO
    with pytest.raises(Einval):
        dma_fence.signal(g)
