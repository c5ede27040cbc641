"""dma_fence: the behaviours of the kernel's st-dma-fence selftests, plus ordering and misuse."""

from __future__ import annotations

import errno

import pytest

from gemu.guest import errors
from gemu.guest.dma_buf import dma_fence
from gemu.guest.dma_buf.dma_fence import MAX_SCHEDULE_TIMEOUT, DmaFence, DmaFenceCb
from gemu.guest.errors import Einval, Enoent, Erestartsys, KernelWarning
from gemu.guest.kernel import runtime

MS = 1_000_000


@pytest.fixture
def lax():
    """Non-strict warnings (as in emulator runs): warn_on counts instead of raising."""
    was = errors.is_strict()
    errors.set_strict(False)
    errors.reset_warn_stats()
    yield errors.warn_stats()
    errors.set_strict(was)
    errors.reset_warn_stats()


def mock_fence(seqno: int = 0, *, seqno64: bool = False) -> DmaFence:
    return DmaFence(None, dma_fence.context_alloc(1), seqno, seqno64=seqno64)


def run_det(fn, seed: int = 0):
    return runtime.Deterministic(seed).run(fn)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[DmaFence] = []

    def __call__(self, fence: DmaFence, cb: DmaFenceCb) -> None:
        self.calls.append(fence)


def test_sanity():
    """A fresh fence is pending, and it can be signaled and released."""
    f = mock_fence()
    assert not dma_fence.is_signaled(f)
    dma_fence.signal(f)
    assert dma_fence.is_signaled(f)
    dma_fence.put(f)
    assert f.refcount == 0


def test_signaling():
    """Signal takes effect once: check_and_signal reports "already", ops detach, -EINVAL twice."""
    f = mock_fence()
    assert not dma_fence.is_signaled(f)
    assert dma_fence.check_and_signal(f) is False
    assert dma_fence.is_signaled(f)
    assert f.ops is None
    assert dma_fence.check_and_signal(f) is True
    with pytest.raises(Einval):
        dma_fence.signal(f)
    assert dma_fence.timeline_name(f) == "signaled-timeline"


def test_signal_timestamp():
    """Signalling stamps the fence with the runtime clock; an explicit time is kept."""

    def main():
        runtime.advance(5 * MS)
        f = mock_fence()
        dma_fence.signal(f)
        g = mock_fence()
        dma_fence.signal_timestamp(g, 3)
        return f.timestamp, g.timestamp, f.flags & dma_fence.DmaFenceFlag.TIMESTAMP

    stamp, explicit, flag = run_det(main)
    assert stamp == 5 * MS and explicit == 3 and flag


def test_add_callback():
    """A callback added before the signal runs exactly once, on signal."""
    f = mock_fence()
    rec = Recorder()
    cb = DmaFenceCb()
    dma_fence.add_callback(f, cb, rec)
    assert rec.calls == []
    dma_fence.signal(f)
    assert rec.calls == [f]
    dma_fence.check_and_signal(f)
    assert rec.calls == [f]


def test_late_add_callback():
    """Adding a callback after the signal fails with -ENOENT and never calls it."""
    f = mock_fence()
    dma_fence.signal(f)
    rec = Recorder()
    cb = DmaFenceCb()
    with pytest.raises(Enoent):
        dma_fence.add_callback(f, cb, rec)
    assert rec.calls == [] and cb.func is None


def test_add_callback_invalid():
    """A missing callback function is -EINVAL (and a warning)."""
    f = mock_fence()
    with pytest.raises(KernelWarning, match="required"):
        dma_fence.add_callback(f, DmaFenceCb(), None)


def test_rm_callback():
    """A callback removed before the signal is reported removed and never runs."""
    f = mock_fence()
    rec = Recorder()
    cb = DmaFenceCb()
    dma_fence.add_callback(f, cb, rec)
    assert dma_fence.remove_callback(f, cb) is True
    dma_fence.signal(f)
    assert rec.calls == []


def test_late_rm_callback():
    """Removing a callback that already ran returns False; it ran exactly once."""
    f = mock_fence()
    rec = Recorder()
    cb = DmaFenceCb()
    dma_fence.add_callback(f, cb, rec)
    dma_fence.signal(f)
    assert rec.calls == [f]
    assert dma_fence.remove_callback(f, cb) is False
    assert rec.calls == [f]


def test_status():
    """get_status is 0 while pending and 1 once signaled without error."""
    f = mock_fence()
    assert dma_fence.get_status(f) == 0
    dma_fence.signal(f)
    assert dma_fence.get_status(f) == 1


def test_error():
    """An error set before the signal is invisible until the signal, then reported."""
    f = mock_fence()
    dma_fence.set_error(f, -errno.EIO)
    assert dma_fence.get_status(f) == 0
    dma_fence.signal(f)
    assert dma_fence.get_status(f) == -errno.EIO


def test_error_after_signal_warns():
    """Setting an error on a signaled fence is a contract violation."""
    f = mock_fence()
    dma_fence.signal(f)
    with pytest.raises(KernelWarning, match="already signaled"):
        dma_fence.set_error(f, -errno.EIO)


def test_error_must_be_negative_errno():
    """A non-negative error is rejected with a warning."""
    f = mock_fence()
    with pytest.raises(KernelWarning, match="negative errno"):
        dma_fence.set_error(f, errno.EIO)


def test_wait():
    """A zero-timeout wait polls: 0 before the signal, 1 after."""
    f = mock_fence()
    assert dma_fence.wait_timeout(f, False, 0) == 0
    dma_fence.signal(f)
    assert dma_fence.wait_timeout(f, False, 0) == 1


def test_wait_negative_timeout():
    """A negative timeout warns and is -EINVAL; lax runs count the warning."""
    f = mock_fence()
    with pytest.raises(KernelWarning, match="timeout"):
        dma_fence.wait_timeout(f, False, -1)


def test_wait_negative_timeout_lax(lax):
    """Outside tests the negative timeout is counted and still returns -EINVAL."""
    f = mock_fence()
    with pytest.raises(Einval):
        dma_fence.wait_timeout(f, False, -1)
    assert lax.total == 1


def test_wait_timeout():
    """A wait times out (0) after its virtual timeout, and returns time left once signaled."""

    def main():
        f = mock_fence()
        t0 = runtime.now_ns()
        assert dma_fence.wait_timeout(f, False, 2 * MS) == 0
        assert runtime.now_ns() - t0 == 2 * MS

        def signaller():
            runtime.sleep_ns(1 * MS)
            dma_fence.signal(f)

        runtime.spawn(signaller, name="signaller")
        left = dma_fence.wait_timeout(f, False, 10 * MS)
        assert left == 9 * MS
        assert dma_fence.wait_timeout(f, False, MAX_SCHEDULE_TIMEOUT) == MAX_SCHEDULE_TIMEOUT

    for seed in range(5):
        run_det(main, seed)


def test_wait_interruptible():
    """An interruptible wait with a pending signal raises -ERESTARTSYS; uninterruptible waits on."""

    def main():
        f = mock_fence()
        me = runtime.current()

        def poker():
            runtime.sleep_ns(MS)
            me.send_signal()
            runtime.sleep_ns(MS)
            dma_fence.signal(f)

        runtime.spawn(poker, name="poker")
        with pytest.raises(Erestartsys):
            dma_fence.wait_timeout(f, True, 10 * MS)
        assert not dma_fence.is_signaled(f)
        assert dma_fence.wait_timeout(f, False, 10 * MS) > 0
        me.clear_signal()

    run_det(main)


def test_stub():
    """The stub fence is always signaled."""
    f = dma_fence.get_stub()
    assert dma_fence.is_signaled(f)
    assert dma_fence.get_status(f) == 1
    dma_fence.put(f)
    g = dma_fence.allocate_private_stub(42)
    assert dma_fence.is_signaled(g) and g.timestamp == 42


def test_is_later_32bit_wraps():
    """32-bit fences compare modulo 2**32: seqno 1 is after 0xffffffff."""
    ctx = dma_fence.context_alloc(1)
    a = DmaFence(None, ctx, 0xFFFFFFFF)
    b = DmaFence(None, ctx, 1)
    assert dma_fence.is_later(b, a)
    assert not dma_fence.is_later(a, b)
    assert not dma_fence.is_later(a, a)
    assert dma_fence.is_later_or_same(a, a)
    assert dma_fence.later(a, b) is b


def test_is_later_64bit_orders():
    """init64 fences compare as plain 64-bit numbers: no wraparound at 2**32."""
    ctx = dma_fence.context_alloc(1)
    a = DmaFence(None, ctx, 0xFFFFFFFF, seqno64=True)
    b = DmaFence(None, ctx, 0x1_0000_0001, seqno64=True)
    assert dma_fence.is_later(b, a)
    assert not dma_fence.is_later(a, b)
    c = DmaFence(None, ctx, 1, seqno64=True)
    assert dma_fence.is_later(a, c)


def test_is_later_needs_one_context():
    """Fences of different contexts cannot be ordered: a warning."""
    with pytest.raises(KernelWarning, match="contexts differ"):
        dma_fence.is_later(mock_fence(2), mock_fence(1))


def test_context_alloc_is_consecutive():
    """context_alloc(n) reserves n consecutive contexts no one else gets."""
    first = dma_fence.context_alloc(3)
    nxt = dma_fence.context_alloc(1)
    assert nxt == first + 3


def test_ops_signaled_hook():
    """A driver's signaled() hook makes is_signaled signal the fence and run callbacks."""

    class Done(dma_fence.DmaFenceOps):
        done = False

        def signaled(self, fence):
            return self.done

    ops = Done()
    f = DmaFence(ops, dma_fence.context_alloc(1), 1)
    rec = Recorder()
    dma_fence.add_callback(f, DmaFenceCb(), rec)
    assert not dma_fence.is_signaled(f)
    ops.done = True
    assert dma_fence.is_signaled(f)
    assert rec.calls == [f] and dma_fence.test_signaled_flag(f)


def test_enable_signaling_false_signals():
    """enable_signaling() returning False means done: add_callback then gets -ENOENT."""

    class AlreadyDone(dma_fence.DmaFenceOps):
        def enable_signaling(self, fence):
            return False

    f = DmaFence(AlreadyDone(), dma_fence.context_alloc(1), 1)
    with pytest.raises(Enoent):
        dma_fence.add_callback(f, DmaFenceCb(), Recorder())
    assert dma_fence.test_signaled_flag(f)


def test_release_with_pending_signals():
    """Dropping the last reference of a pending fence with callbacks warns."""
    f = mock_fence()
    dma_fence.add_callback(f, DmaFenceCb(), Recorder())
    with pytest.raises(KernelWarning, match="released with pending signals"):
        dma_fence.put(f)


def test_release_with_pending_signals_lax(lax):
    """In runs, the stranded fence is signaled with -EDEADLK so its callbacks still run."""
    f = mock_fence()
    rec = Recorder()
    dma_fence.add_callback(f, DmaFenceCb(), rec)
    dma_fence.put(f)
    assert rec.calls == [f]
    assert f.error == -errno.EDEADLK
    assert lax.total == 1


def test_refcount_underflow_warns():
    """Putting a released fence is caught."""
    f = mock_fence()
    dma_fence.put(f)
    with pytest.raises(KernelWarning, match="underflow"):
        dma_fence.put(f)


def test_array_signals_when_all_members_do():
    """A fence array signals after its last member and reports the first member error."""
    a, b = mock_fence(1), mock_fence(1)
    arr = dma_fence.array_create([a, b], dma_fence.context_alloc(1), 1)
    assert dma_fence.is_container(arr)
    dma_fence.set_error(a, -errno.EIO)
    dma_fence.signal(a)
    assert not dma_fence.is_signaled(arr)
    dma_fence.signal(b)
    assert dma_fence.get_status(arr) == -errno.EIO


@pytest.mark.parametrize("seed", range(20))
def test_race_signal_callback(seed):
    """Racing add_callback against signal: every callback runs exactly once iff it was added."""

    def main():
        fences = [mock_fence(i) for i in range(4)]
        ran: list[int] = []
        added: list[int] = []

        def adder():
            for i, f in enumerate(fences):
                try:
                    dma_fence.add_callback(f, DmaFenceCb(), lambda _f, _cb, i=i: ran.append(i))
                    added.append(i)
                except Enoent:
                    pass

        def signaller():
            for f in fences:
                dma_fence.signal(f)

        t1 = runtime.spawn(adder, name="adder")
        t2 = runtime.spawn(signaller, name="signaller")
        t1.join()
        t2.join()
        assert sorted(ran) == sorted(added)
        assert len(ran) == len(set(ran))

    run_det(main, seed)
