"""DOC: dma_fence, the one-shot completion signal shared between drivers.

A fence belongs to a *context* (a timeline, from :func:`context_alloc`) and carries a
*seqno*; on one context, fences signal in seqno order. A fence goes from unsignaled to
signaled exactly once; signalling stamps ``timestamp``, runs every callback once, wakes every
waiter and detaches ``ops``. ``error`` may be set before signalling and is reported by
:func:`get_status`.

Usage::

    ctx = dma_fence.context_alloc(1)
    fence = dma_fence.DmaFence(None, ctx, 1)
    cb = dma_fence.DmaFenceCb()
    dma_fence.add_callback(fence, cb, lambda f, cb: print("done", f.seqno))
    dma_fence.signal(fence)                      # prints "done 1"
    assert dma_fence.wait_timeout(fence, False, 0) == 1
    dma_fence.put(fence)

Modelled: mainline ``drivers/dma-buf/dma-fence.c`` with the newest API touches (inline per-fence
lock, ``ops`` cleared on signal, :func:`check_and_signal`). Choices the model makes:

- :func:`signal` keeps the classic contract: the second signal of a fence is the classic
  ``-EINVAL``, raised as :class:`Einval`. Callers that do not care use :func:`check_and_signal`
  (returns whether the fence was already signaled).
- Timeouts are in nanoseconds of the runtime clock instead of jiffies;
  :data:`MAX_SCHEDULE_TIMEOUT` means "wait forever".
- Callbacks run right after the fence is marked signaled, outside the per-fence lock (the kernel
  runs them under it); each still runs exactly once and a callback removed before the signal
  never runs.
- Every wait is annotated with ``lockdep.dma_fence_might_wait()`` and every signal runs inside a
  signalling section and hands the fence off (``lockdep.fence_handed_off``), so the fence
  signalling rules are checked wherever fences are used.
"""

from __future__ import annotations

import errno
import itertools
import sys
import threading
from collections.abc import Callable, Sequence
from enum import IntFlag

from gemu.guest.errors import Einval, Enoent, warn_on
from gemu.guest.kernel import runtime
from gemu.guest.locking import lockdep
from gemu.guest.mm.gfp import GFP_KERNEL

MAX_SCHEDULE_TIMEOUT = sys.maxsize
"""Timeout meaning "no timeout" (the kernel's ``MAX_SCHEDULE_TIMEOUT``)."""

_MAX_ERRNO = 4095


class DmaFenceFlag(IntFlag):
    """Bits of :attr:`DmaFence.flags`. Kernel: enum dma_fence_flag_bits."""

    INITIALIZED = 1 << 0
    SEQNO64 = 1 << 1
    SIGNALED = 1 << 2
    TIMESTAMP = 1 << 3
    ENABLE_SIGNAL = 1 << 4
    USER_BITS = 1 << 5


# Plain ints on the hot paths: IntFlag arithmetic costs more than the rest of an operation.
_SIGNALED = int(DmaFenceFlag.SIGNALED)
_SEQNO64 = int(DmaFenceFlag.SEQNO64)
_TIMESTAMP = int(DmaFenceFlag.TIMESTAMP)
_ENABLE_SIGNAL = int(DmaFenceFlag.ENABLE_SIGNAL)
_INITIALIZED = int(DmaFenceFlag.INITIALIZED)


class DmaFenceOps:
    """Driver hooks of a fence; every hook is optional. Kernel: struct dma_fence_ops.

    ``enable_signaling`` returning False means "already done": the fence is signaled at once.
    ``signaled`` is the driver's fast check used by :func:`is_signaled`.
    """

    def get_driver_name(self, fence: DmaFence) -> str:
        return "gemu"

    def get_timeline_name(self, fence: DmaFence) -> str:
        return f"ctx{fence.context}"

    def enable_signaling(self, fence: DmaFence) -> bool:
        return True

    def signaled(self, fence: DmaFence) -> bool:
        return False

    def release(self, fence: DmaFence) -> None:
        return None


_DEFAULT_OPS = DmaFenceOps()
_NO_CALLBACKS: tuple = ()
"""``cb_list`` of a fence without queued callbacks."""

FenceFunc = Callable[["DmaFence", "DmaFenceCb"], None]


class DmaFenceCb:
    """A callback slot that a caller owns and hands to :func:`add_callback`.

    Kernel: struct dma_fence_cb. ``func`` is None while the slot is not on any fence.
    """

    __slots__ = ("func", "queued")

    def __init__(self) -> None:
        self.func: FenceFunc | None = None
        self.queued = False


class DmaFence:
    """A one-shot completion signal. Kernel: struct dma_fence [include/linux/dma-fence.h].

    Invariants: ``SIGNALED`` in ``flags`` is set at most once and never cleared; once it is set
    ``cb_list`` is empty, ``timestamp`` is valid and ``ops`` is None. ``cb_list`` is a list
    while callbacks are queued, else the empty tuple (a fence nobody waits on, and every
    signalled fence, has no list of its own). ``error`` is 0 or a
    negative errno and only changes before the signal. ``refcount`` > 0 while anyone holds the
    fence.
    """

    __slots__ = (
        "__weakref__",
        "cb_list",
        "context",
        "error",
        "flags",
        "lock",
        "ops",
        "refcount",
        "seqno",
        "signal_owner",
        "timestamp",
    )

    def __init__(
        self,
        ops: DmaFenceOps | None = None,
        context: int = 0,
        seqno: int = 0,
        *,
        seqno64=False,
        lock: threading.Lock | None = None,
    ) -> None:
        # ``lock``: the spinlock dma_fence_init() is given, which fences may share (a job's
        # scheduled and finished fences share their drm_sched_fence's); by default the
        # fence's own (the kernel's inline per-fence lock). Then dma_fence_init()/_init64()
        # (_fence_init, spelled out: three fences per job).
        self.lock = threading.Lock() if lock is None else lock
        self.ops = ops if ops is not None else _DEFAULT_OPS
        self.context = context
        self.seqno = seqno
        self.flags = _SEQNO64 | _INITIALIZED if seqno64 else _INITIALIZED
        self.error = 0
        self.refcount = 1
        self.timestamp = 0
        self.cb_list = _NO_CALLBACKS
        self.signal_owner = None

    def __repr__(self) -> str:
        state = "signaled" if self.flags & _SIGNALED else "pending"
        err = f" error={self.error}" if self.error else ""
        return f"<{type(self).__name__} {self.context}:{self.seqno} {state}{err}>"


def _fence_init(fence: DmaFence, ops, context: int, seqno: int, flags: int) -> None:
    # DmaFence.__init__ has a copy of these assignments: keep the two alike.
    fence.ops = ops if ops is not None else _DEFAULT_OPS
    fence.context = context
    fence.seqno = seqno
    fence.flags = flags | _INITIALIZED
    fence.error = 0
    fence.refcount = 1
    fence.timestamp = 0
    fence.cb_list = _NO_CALLBACKS
    #: The task that must push or signal this fence after publishing it; lockdep uses it to
    #: open the implicit signalling section (drm_sched sets it from arm until push).
    fence.signal_owner = None


def _ensure_lock(fence: DmaFence) -> None:
    # A fence initialised in place (not through DmaFence()) gets its lock here; DmaFence()
    # makes it before _fence_init, so the common path pays no attribute test.
    if not hasattr(fence, "lock"):
        fence.lock = threading.Lock()


def init(fence: DmaFence, ops: DmaFenceOps | None, context: int, seqno: int) -> None:
    """Initialise a fence with 32-bit seqno ordering: refcount 1, unsignaled, no error.

    Kernel: dma_fence_init() [drivers/dma-buf/dma-fence.c]
    """
    _ensure_lock(fence)
    _fence_init(fence, ops, context, seqno, 0)


def init64(fence: DmaFence, ops: DmaFenceOps | None, context: int, seqno: int) -> None:
    """Initialise a fence whose seqnos compare as 64-bit numbers (no wraparound).

    Kernel: dma_fence_init64() [drivers/dma-buf/dma-fence.c]
    """
    _ensure_lock(fence)
    _fence_init(fence, ops, context, seqno, _SEQNO64)


_context_lock = threading.Lock()
_context_counter = itertools.count(1)


def context_alloc(num: int) -> int:
    """Reserve ``num`` consecutive fresh fence contexts and return the first.

    Kernel: dma_fence_context_alloc() [drivers/dma-buf/dma-fence.c]
    """
    warn_on(num <= 0, f"context_alloc: num must be positive, not {num!r}")
    with _context_lock:
        first = next(_context_counter)
        for _ in range(num - 1):
            next(_context_counter)
    return first


# --- references -------------------------------------------------------------------------


def get(fence: DmaFence | None) -> DmaFence | None:
    """Take a reference. Kernel: dma_fence_get() [include/linux/dma-fence.h]"""
    if fence is not None:
        lock = fence.lock
        lock.acquire()  # not a with-block: see _signal()
        try:
            if fence.refcount <= 0:
                warn_on(True, f"dma_fence_get on a released fence {fence!r}")
            fence.refcount += 1
        finally:
            lock.release()
    return fence


def put(fence: DmaFence | None) -> None:
    """Drop a reference; the last one releases the fence.

    Kernel: dma_fence_put() / dma_fence_release() [drivers/dma-buf/dma-fence.c]

    Releasing an unsignaled fence that still has callbacks is a driver bug: the model signals it
    with ``-EDEADLK`` so the waiters are not stranded, then warns "released with pending signals".
    """
    if fence is None:
        return
    lock = fence.lock
    lock.acquire()
    try:
        if fence.refcount <= 0:
            warn_on(True, f"dma_fence_put: refcount underflow on {fence!r}")
            return
        fence.refcount -= 1
        if fence.refcount:
            return
        pending = bool(fence.cb_list) and not fence.flags & _SIGNALED
    finally:
        lock.release()
    if pending:
        name = f"{driver_name(fence)}:{timeline_name(fence)}:{fence.context:x}:{fence.seqno:x}"
        with fence.lock:
            fence.error = -errno.EDEADLK
        _signal(fence, None)
        warn_on(True, f"Fence {name} released with pending signals!")
    ops = fence.ops
    if ops is not None:
        ops.release(fence)


def driver_name(fence: DmaFence) -> str:
    """Name of the driver owning an unsignaled fence. Kernel: dma_fence_driver_name()"""
    ops = fence.ops
    return ops.get_driver_name(fence) if ops is not None else "detached-driver"


def timeline_name(fence: DmaFence) -> str:
    """Name of the fence's timeline. Kernel: dma_fence_timeline_name()"""
    ops = fence.ops
    return ops.get_timeline_name(fence) if ops is not None else "signaled-timeline"


# --- ordering ---------------------------------------------------------------------------


def _seqno_after(fence: DmaFence, f1: int, f2: int) -> bool:
    if fence.flags & _SEQNO64:
        return f1 > f2
    delta = (f1 - f2) & 0xFFFFFFFF
    return 0 < delta < 0x80000000


def is_later(f1: DmaFence, f2: DmaFence) -> bool:
    """True if ``f1`` is after ``f2`` on their shared context.

    Kernel: dma_fence_is_later() [include/linux/dma-fence.h]

    Seqnos compare with 32-bit wraparound unless ``f1`` was made with :func:`init64`. Fences of
    different contexts cannot be ordered: warn and return False.
    """
    if f1.context != f2.context:
        warn_on(True, f"is_later: contexts differ ({f1!r} vs {f2!r})")
        return False
    return _seqno_after(f1, f1.seqno, f2.seqno)


def is_later_or_same(f1: DmaFence, f2: DmaFence) -> bool:
    """True if ``f1`` is ``f2`` or later. Kernel: dma_fence_is_later_or_same()"""
    return f1 is f2 or is_later(f1, f2)


def later(f1: DmaFence, f2: DmaFence) -> DmaFence | None:
    """Return the later of two fences of one context. Kernel: dma_fence_later()"""
    if f1.context != f2.context:
        warn_on(True, f"later: contexts differ ({f1!r} vs {f2!r})")
        return None
    return f1 if is_later(f1, f2) else f2


# --- signalling -------------------------------------------------------------------------


def test_signaled_flag(fence: DmaFence) -> bool:
    """Whether the SIGNALED bit is set, without asking the driver.

    Kernel: dma_fence_test_signaled_flag() [include/linux/dma-fence.h]
    """
    return bool(fence.flags & _SIGNALED)


def _signal(fence: DmaFence, timestamp: int | None) -> bool:
    """Mark signaled and run callbacks; return True if it was already signaled."""
    # The per-fence lock is taken with acquire()/release() in try/finally rather than a
    # with-block, here and in get(), put() and the callback functions: a with-block looks up
    # and binds __enter__ and __exit__ each time, twice the cost of the lock itself, and a job
    # takes fence locks some fifteen times.
    lock = fence.lock
    lock.acquire()
    try:
        if fence.flags & _SIGNALED:
            return True
        fence.timestamp = runtime.timestamp_ns() if timestamp is None else timestamp
        fence.flags |= _SIGNALED | _TIMESTAMP
        callbacks = fence.cb_list
        fence.cb_list = _NO_CALLBACKS
        fence.ops = None
        # each callback's function is taken now: a callback may let its owner run and re-arm
        # its slot on another fence before this loop reaches it (kernel callbacks run under
        # the fence lock and cannot; the model's may reach preemption points)
        calls = []
        for cb in callbacks:
            cb.queued = False
            calls.append(cb.func)
            cb.func = None
    finally:
        lock.release()
    for cb, func in zip(callbacks, calls, strict=True):
        func(fence, cb)
    return False


def _signal_annotated(fence: DmaFence, timestamp: int | None) -> bool:
    runtime.preempt("dma_fence.signal", fence)
    cookie = lockdep.dma_fence_begin_signalling()
    try:
        already = _signal(fence, timestamp)
        if not already:
            lockdep.fence_handed_off(fence)
    finally:
        lockdep.dma_fence_end_signalling(cookie)
    return already


def signal(fence: DmaFence) -> None:
    """Signal the fence: stamp it, run its callbacks, wake its waiters.

    Kernel: dma_fence_signal() [drivers/dma-buf/dma-fence.c]

    Raises:
        Einval: the fence was already signaled (the classic ``-EINVAL`` return).
    """
    if _signal_annotated(fence, None):
        raise Einval(msg=f"{fence!r} already signaled")


def signal_timestamp(fence: DmaFence, timestamp: int) -> None:
    """Signal with a given completion time. Kernel: dma_fence_signal_timestamp()

    Raises:
        Einval: the fence was already signaled.
    """
    if _signal_annotated(fence, timestamp):
        raise Einval(msg=f"{fence!r} already signaled")


def check_and_signal(fence: DmaFence) -> bool:
    """Signal the fence if needed; return True if it was already signaled.

    Kernel: dma_fence_check_and_signal() [drivers/dma-buf/dma-fence.c]
    """
    return _signal_annotated(fence, None)


def is_signaled(fence: DmaFence) -> bool:
    """Whether the fence has signaled, asking the driver's ``signaled`` hook if needed.

    Kernel: dma_fence_is_signaled() [include/linux/dma-fence.h]

    A driver that reports completion through the hook gets the fence signaled here.
    """
    runtime.preempt("dma_fence.is_signaled", fence)
    if fence.flags & _SIGNALED:
        return True
    ops = fence.ops
    if ops is not None and ops.signaled(fence):
        check_and_signal(fence)
        return True
    return False


def set_error(fence: DmaFence, error: int) -> None:
    """Record a negative errno to be reported once the fence signals.

    Kernel: dma_fence_set_error() [include/linux/dma-fence.h]

    Setting it after the signal, or passing anything but a negative errno, warns.
    """
    if fence.flags & _SIGNALED:
        warn_on(True, f"set_error on already signaled {fence!r}")
    if warn_on(
        not -_MAX_ERRNO <= error < 0, f"set_error: error must be a negative errno, not {error!r}"
    ):
        return
    fence.error = error


def get_status_locked(fence: DmaFence) -> int:
    """0 if pending, 1 if signaled cleanly, else the negative error.

    Kernel: dma_fence_get_status_locked() [include/linux/dma-fence.h]
    """
    if fence.flags & _SIGNALED:
        return fence.error or 1
    return 0


def get_status(fence: DmaFence) -> int:
    """0 if pending, 1 if signaled cleanly, else the negative error.

    Kernel: dma_fence_get_status() [drivers/dma-buf/dma-fence.c]
    """
    is_signaled(fence)
    return get_status_locked(fence)


# --- callbacks --------------------------------------------------------------------------


def enable_sw_signaling(fence: DmaFence) -> None:
    """Ask the driver to report completion; signals at once if it says it is done.

    Kernel: dma_fence_enable_sw_signaling() [drivers/dma-buf/dma-fence.c]
    """
    lock = fence.lock
    lock.acquire()
    try:
        if fence.flags & (_SIGNALED | _ENABLE_SIGNAL):
            return
        fence.flags |= _ENABLE_SIGNAL
        ops = fence.ops
    finally:
        lock.release()
    if ops is not None and not ops.enable_signaling(fence):
        check_and_signal(fence)


def add_callback(fence: DmaFence, cb: DmaFenceCb, func: FenceFunc) -> None:
    """Call ``func(fence, cb)`` once, when the fence signals.

    Kernel: dma_fence_add_callback() [drivers/dma-buf/dma-fence.c]

    Raises:
        Enoent: the fence has already signaled; ``func`` is not called and ``cb`` stays unused.
        Einval: ``fence`` or ``func`` is None.
    """
    if fence is None or func is None:
        warn_on(True, "add_callback: fence and func are required")
        raise Einval(msg="add_callback without fence or func")
    runtime.preempt("dma_fence.add_callback", fence)
    enable_sw_signaling(fence)
    lock = fence.lock
    lock.acquire()
    try:
        if not fence.flags & _SIGNALED:
            if cb.queued:
                warn_on(True, "add_callback: callback is already queued on a fence")
            cb.func = func
            cb.queued = True
            if fence.cb_list:
                fence.cb_list.append(cb)
            else:
                fence.cb_list = [cb]
            return
    finally:
        lock.release()
    cb.func = None
    raise Enoent(msg=f"{fence!r} already signaled")


def remove_callback(fence: DmaFence, cb: DmaFenceCb) -> bool:
    """Take a callback off the fence; True if it was removed before it could run.

    Kernel: dma_fence_remove_callback() [drivers/dma-buf/dma-fence.c]
    """
    runtime.preempt("dma_fence.remove_callback", fence)
    with fence.lock:
        if cb.queued and cb in fence.cb_list:
            fence.cb_list.remove(cb)
            cb.queued = False
            cb.func = None
            return True
    return False


# --- waiting ----------------------------------------------------------------------------


def wait_timeout(fence: DmaFence, intr: bool, timeout_ns: int) -> int:
    """Sleep until the fence signals or ``timeout_ns`` of runtime clock passes.

    Kernel: dma_fence_wait_timeout() / dma_fence_default_wait() [drivers/dma-buf/dma-fence.c]

    Returns the time left (>0, at least 1) when signaled, 0 on timeout. ``timeout_ns == 0``
    polls: 1 if signaled, else 0. :data:`MAX_SCHEDULE_TIMEOUT` waits forever and returns it.

    Raises:
        Einval: ``timeout_ns`` is negative (also warns).
        Erestartsys: ``intr`` and a signal is pending for the waiting task.
    """
    if warn_on(timeout_ns < 0, f"wait_timeout: timeout must be >= 0, not {timeout_ns!r}"):
        raise Einval(msg=f"negative timeout {timeout_ns}")
    lockdep.might_sleep()
    lockdep.dma_fence_might_wait()
    runtime.preempt("dma_fence.wait", fence)
    enable_sw_signaling(fence)
    if is_signaled(fence):
        return timeout_ns if timeout_ns else 1
    if timeout_ns == 0:
        return 0

    wq = runtime.WaitQueue(f"dma_fence {fence.context}:{fence.seqno}")
    cb = DmaFenceCb()

    def wake(_fence: DmaFence, _cb: DmaFenceCb) -> None:
        with wq.lock:
            pass
        wq.wake_up_all()

    try:
        add_callback(fence, cb, wake)
    except Enoent:
        return timeout_ns if timeout_ns else 1
    forever = timeout_ns >= MAX_SCHEDULE_TIMEOUT
    start = runtime.now_ns()
    try:
        done = wq.wait_event(
            lambda: bool(fence.flags & _SIGNALED),
            timeout_ns=None if forever else timeout_ns,
            interruptible=intr,
        )
    finally:
        remove_callback(fence, cb)
    if not done:
        return 0
    if forever:
        return MAX_SCHEDULE_TIMEOUT
    return max(1, timeout_ns - (runtime.now_ns() - start))


def wait(fence: DmaFence, intr: bool) -> None:
    """Sleep until the fence signals. Kernel: dma_fence_wait() [include/linux/dma-fence.h]

    Raises:
        Erestartsys: ``intr`` and a signal is pending.
    """
    wait_timeout(fence, intr, MAX_SCHEDULE_TIMEOUT)


# --- stub and containers ----------------------------------------------------------------


class _StubOps(DmaFenceOps):
    def get_driver_name(self, fence: DmaFence) -> str:
        return "stub"

    def get_timeline_name(self, fence: DmaFence) -> str:
        return "stub"


_stub: DmaFence | None = None
_stub_lock = threading.Lock()


def get_stub() -> DmaFence:
    """Return a reference to the shared, always-signaled stub fence.

    Kernel: dma_fence_get_stub() [drivers/dma-buf/dma-fence.c]
    """
    global _stub
    with _stub_lock:
        if _stub is None:
            stub = DmaFence(_StubOps(), 0, 0)
            _signal(stub, 0)
            _stub = stub
    return get(_stub)


def allocate_private_stub(timestamp: int) -> DmaFence:
    """Return a new fence already signaled at ``timestamp``.

    Kernel: dma_fence_allocate_private_stub() [drivers/dma-buf/dma-fence.c]
    """
    fence = DmaFence(_StubOps(), 0, 0)
    _signal(fence, timestamp)
    return fence


class _ArrayOps(DmaFenceOps):
    def get_driver_name(self, fence: DmaFence) -> str:
        return "dma_fence_array"

    def get_timeline_name(self, fence: DmaFence) -> str:
        return "unbound"

    def release(self, fence: DmaFence) -> None:
        for f in fence.fences:
            put(f)


class DmaFenceArray(DmaFence):
    """A fence that signals when all (or, with ``signal_on_any``, one) of ``fences`` has.

    Kernel: struct dma_fence_array [drivers/dma-buf/dma-fence-array.c]

    Owns one reference to each member. Its error is the first member error seen.
    """

    __slots__ = ("_cbs", "fences", "num_fences", "num_pending")

    def __init__(
        self, fences: Sequence[DmaFence], context: int, seqno: int, signal_on_any: bool = False
    ) -> None:
        super().__init__(_ArrayOps(), context, seqno)
        self.fences = list(fences)
        self.num_fences = len(self.fences)
        self.num_pending = 1 if signal_on_any else self.num_fences
        self._cbs: list[DmaFenceCb] = []


def _array_member_done(array: DmaFenceArray, member: DmaFence) -> None:
    with array.lock:
        if member.error and not array.error:
            array.error = member.error
        array.num_pending -= 1
        done = array.num_pending == 0
    if done:
        check_and_signal(array)


def array_create(
    fences: Sequence[DmaFence], context: int, seqno: int, signal_on_any: bool = False
) -> DmaFenceArray:
    """Build a fence array that takes over the caller's references on ``fences``.

    Kernel: dma_fence_array_create() [drivers/dma-buf/dma-fence-array.c], which allocates
    the array with its callbacks (dma_fence_array_alloc(): kzalloc, GFP_KERNEL).
    """
    lockdep.might_alloc(GFP_KERNEL)
    array = DmaFenceArray(fences, context, seqno, signal_on_any)
    if not array.fences:
        check_and_signal(array)
    for member in array.fences:
        cb = DmaFenceCb()
        array._cbs.append(cb)
        try:
            add_callback(member, cb, lambda f, _cb, a=array: _array_member_done(a, f))
        except Enoent:
            _array_member_done(array, member)
    return array


def is_array(fence: DmaFence) -> bool:
    """Kernel: dma_fence_is_array() [include/linux/dma-fence-array.h]"""
    return isinstance(fence, DmaFenceArray)


def is_container(fence: DmaFence) -> bool:
    """Whether the fence aggregates other fences. Kernel: dma_fence_is_container()"""
    return is_array(fence)
