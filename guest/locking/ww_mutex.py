"""DOC: wound/wait mutexes, the deadlock-avoiding locks under every reservation object.

A transaction that must hold several locks at once takes them under one acquire context
(:class:`WwAcquireCtx`). Each context gets a stamp from its class when it starts; a smaller
stamp is older and has priority. When two transactions contend, the younger one backs off:

- **Wait-Die** (:func:`WD_CLASS`, and :data:`RESERVATION_WW_CLASS` as for dma_resv): a younger
  requester dies (:class:`~gemu.guest.errors.Edeadlk`) if the holder is older or an older
  requester is already queued; an older requester waits.
- **Wound-Wait** (:func:`WW_CLASS`): an older requester wounds a younger holder and waits; the
  wounded transaction dies at its next contended lock.

Only a context that already holds locks dies, so after backing off (unlock everything, then
:func:`lock_slow` on the contended lock) a transaction always makes progress. Locking a mutex
the context already holds raises :class:`~gemu.guest.errors.Ealready`. With ``ctx=None`` a ww
mutex is a plain mutex. Misuse (locking after :func:`acquire_done`, a slow lock that is not the
contended one, :func:`acquire_fini` with locks held, mixing classes, unlocking a mutex one does
not own) is reported through lockdep.

Usage (the back-off loop every multi-lock transaction needs)::

    from gemu.guest.errors import Edeadlk
    from gemu.guest.locking import ww_mutex

    def lock_all(locks, ww_class):
        ctx = ww_mutex.acquire_init(ww_class)
        contended = None
        while True:
            if contended is not None:
                ww_mutex.lock_slow(contended, ctx)
            try:
                for lk in locks:
                    if lk is not contended:
                        ww_mutex.lock(lk, ctx)
                break
            except Edeadlk:
                for held in [lk for lk in locks if lk.ctx is ctx]:
                    ww_mutex.unlock(held)
                contended = ctx.contending_lock
        ww_mutex.acquire_done(ctx)
        return ctx   # ... work ..., unlock each lock, then ww_mutex.acquire_fini(ctx)

Kernel: include/linux/ww_mutex.h, kernel/locking/ww_mutex.h,
Documentation/locking/ww-mutex-design.rst.
"""

from __future__ import annotations

import threading

from gemu.guest.errors import Ealready, Edeadlk, Eintr, Erestartsys
from gemu.guest.kernel import trace
from gemu.guest.kernel.runtime import Task, WaitQueue, current, preempt
from gemu.guest.locking import lockdep
from gemu.guest.locking.lockdep import LockClass
from gemu.guest.locking.mutex import next_wait_id


class WwClass:
    """A family of ww mutexes with one stamp counter and one deadlock-avoidance algorithm.

    Kernel: struct ww_class (DEFINE_WW_CLASS / DEFINE_WD_CLASS).
    """

    def __init__(
        self,
        name: str,
        wait_die: bool,
        *,
        mutex_class: LockClass | None = None,
        acquire_class: LockClass | None = None,
    ) -> None:
        self.name = name
        self.is_wait_die = wait_die
        self.mutex_class = mutex_class or LockClass(f"{name}_mutex")
        self.acquire_class = acquire_class or LockClass(f"{name}_acquire")

    def __repr__(self) -> str:
        return f"<WwClass {self.name} {'wait-die' if self.is_wait_die else 'wound-wait'}>"


def WW_CLASS(name: str) -> WwClass:
    """A Wound-Wait class. Kernel: DEFINE_WW_CLASS()."""
    return WwClass(name, wait_die=False)


def WD_CLASS(name: str) -> WwClass:
    """A Wait-Die class. Kernel: DEFINE_WD_CLASS()."""
    return WwClass(name, wait_die=True)


RESERVATION_WW_CLASS = WwClass(
    "reservation_ww_class",
    wait_die=True,
    mutex_class=lockdep.RESV_CLASS,
    acquire_class=lockdep.RESV_ACQUIRE_CLASS,
)
"""The class of every dma_resv lock (Wait-Die). Kernel: reservation_ww_class."""


class WwAcquireCtx:
    """One locking transaction. Kernel: struct ww_acquire_ctx.

    Invariants: ``acquired`` counts the mutexes whose ``ctx`` is this context; ``wounded``
    is only set while ``acquired > 0``; ``contending_lock`` is the mutex that made the last
    lock die, and the next lock of this context must be that mutex with nothing held.
    """

    __slots__ = (
        "acquired",
        "contending_lock",
        "done_acquire",
        "finished",
        "inject_deadlk",
        "stamp",
        "task",
        "wounded",
        "ww_class",
    )

    def __init__(self, ww_class: WwClass, task: Task, stamp: int, inject: float | None) -> None:
        self.ww_class = ww_class
        self.task = task
        self.stamp = stamp
        self.acquired = 0
        self.wounded = False
        self.contending_lock: WwMutex | None = None
        self.done_acquire = False
        self.finished = False
        self.inject_deadlk = inject

    @property
    def name(self) -> str:
        """``<acquire class>#<stamp>``, as messages and lockdep reports name the context
        (made when asked: every submit starts a context, few are ever named)."""
        return f"{self.ww_class.acquire_class.name}#{self.stamp}"

    @property
    def is_wait_die(self) -> bool:
        return self.ww_class.is_wait_die

    def __repr__(self) -> str:
        return f"<WwAcquireCtx stamp {self.stamp} of {self.task.name} acquired {self.acquired}>"


class _Waiter:
    __slots__ = ("ctx", "task")

    def __init__(self, task: Task, ctx: WwAcquireCtx | None) -> None:
        self.task = task
        self.ctx = ctx


class WwMutex:
    """A wound/wait mutex. Kernel: struct ww_mutex.

    ``owner`` is the holding task, ``ctx`` the holding context (None when held without one);
    both are None exactly when the mutex is free.

    ``wq`` (the wait queue) and ``waiters`` are made the first time a task has to wait: every
    GEM object has a reservation lock, most are never contended, and a wait queue costs about
    280 bytes. Until then ``wq`` is None, ``waiters`` an empty tuple, and ``owner``/``ctx``
    change under the module's ``_UNCONTENDED`` lock; once ``wq`` exists, under ``wq.lock``.
    """

    __slots__ = ("ctx", "name", "owner", "waiters", "wq", "ww_class")

    def __init__(self, ww_class: WwClass, name: str = "ww_mutex") -> None:
        self.ww_class = ww_class
        self.name = name
        self.owner: Task | None = None
        self.ctx: WwAcquireCtx | None = None
        self.waiters: list[_Waiter] | tuple[()] = ()
        self.wq: WaitQueue | None = None

    def __repr__(self) -> str:
        owner = self.owner.name if self.owner else None
        return f"<WwMutex {self.name} owner={owner}>"

    def statistics(self) -> dict:
        """Who holds it and who waits, for dumps and tests."""
        return {
            "locked": self.owner is not None,
            "owner": self.owner.name if self.owner else None,
            "ctx_stamp": self.ctx.stamp if self.ctx else None,
            "waiters": [w.task.name for w in self.waiters],
        }


def _misuse(message: str) -> None:
    lockdep.report("ww-misuse", message)


_UNCONTENDED = threading.Lock()
"""Guards ``owner``/``ctx`` of the mutexes that never had a waiter (``wq`` is None), and the
making of a mutex's wait queue: a task that finds ``wq`` None under it may change the owner
without ``wq.lock``, because no waiter can exist yet."""


def _wait_queue(lock: WwMutex) -> WaitQueue:
    """The mutex's wait queue, made on first use (a task is about to wait on it)."""
    with _UNCONTENDED:
        wq = lock.wq
        if wq is None:
            lock.waiters = []
            wq = lock.wq = WaitQueue(lock.name)
    return wq


def acquire_init(ww_class: WwClass, inject_deadlk: float | None = None) -> WwAcquireCtx:
    """Start a transaction and take its stamp. Kernel: ww_acquire_init() [include/linux/ww_mutex.h]

    ``inject_deadlk`` (a probability) makes each lock taken while others are held fail with a
    spurious -EDEADLK drawn from the runtime's seeded RNG, as
    CONFIG_DEBUG_WW_MUTEX_SLOWPATH does, to exercise back-off paths.
    """
    task = current()
    stamp = task.runtime.next_stamp(ww_class)
    ctx = WwAcquireCtx(ww_class, task, stamp, inject_deadlk)
    lockdep.acquire(ctx, ww_class.acquire_class, task=task)
    return ctx


def acquire_done(ctx: WwAcquireCtx) -> None:
    """Declare that the transaction takes no more locks. Kernel: ww_acquire_done()."""
    if ctx.finished:
        _misuse(f"acquire_done on finished context {ctx.name}")
    ctx.done_acquire = True


def acquire_fini(ctx: WwAcquireCtx) -> None:
    """End the transaction; every lock must be released. Kernel: ww_acquire_fini()."""
    if ctx.finished:
        _misuse(f"acquire_fini twice on context {ctx.name}")
        return
    if ctx.acquired:
        _misuse(f"acquire_fini on context {ctx.name} which still holds {ctx.acquired} lock(s)")
    ctx.finished = True
    ctx.done_acquire = True
    lockdep.release(ctx, task=ctx.task)


def _check_ctx(task: Task, lock: WwMutex, ctx: WwAcquireCtx) -> None:
    if ctx.task is not task:
        _misuse(f"{task.name} locks {lock.name} with {ctx.task.name}'s acquire context")
    if ctx.finished:
        _misuse(f"lock {lock.name} with context {ctx.name} after acquire_fini")
    elif ctx.done_acquire:
        _misuse(f"lock {lock.name} with context {ctx.name} after acquire_done")
    if lock.ww_class is not ctx.ww_class:
        _misuse(
            f"lock {lock.name} of class {lock.ww_class.name} with a context of class "
            f"{ctx.ww_class.name}"
        )
    contended = ctx.contending_lock
    if contended is not None:
        if contended is not lock:
            _misuse(
                f"after -EDEADLK on {contended.name}, context {ctx.name} must lock "
                f"{contended.name} first, not {lock.name}"
            )
        if ctx.acquired:
            _misuse(
                f"after -EDEADLK on {contended.name}, context {ctx.name} locks {lock.name} "
                f"without first releasing the {ctx.acquired} lock(s) it holds"
            )


def _should_die(lock: WwMutex, ctx: WwAcquireCtx) -> bool:
    """Kernel: __ww_mutex_check_kill(); only called when ctx.acquired > 0."""
    if not ctx.ww_class.is_wait_die:
        return ctx.wounded
    hold = lock.ctx
    if hold is not None and hold.stamp < ctx.stamp:
        return True
    # Waiters queue in stamp order, so an older waiter is one queued ahead of us.
    return any(
        w.ctx is not None and w.ctx is not ctx and w.ctx.stamp < ctx.stamp for w in lock.waiters
    )


def _wound_holder(lock: WwMutex, ctx: WwAcquireCtx) -> None:
    """Kernel: __ww_mutex_wound(): an older requester wounds a younger holder."""
    hold = lock.ctx
    if (
        hold is not None
        and hold is not ctx
        and not hold.wounded
        and hold.acquired > 0
        and ctx.stamp < hold.stamp
    ):
        hold.wounded = True
        owner = lock.owner
        owner.runtime.log(f"ww: {ctx.name} wounds {hold.name} on {lock.name}")
        if owner is not current():
            owner.runtime.wake_task(owner)


def _take(lock: WwMutex, task: Task, ctx: WwAcquireCtx | None) -> None:
    lock.owner = task
    lock.ctx = ctx
    if ctx is not None:
        ctx.acquired += 1
        ctx.contending_lock = None


def _lock(lock: WwMutex, ctx: WwAcquireCtx | None, interruptible: bool, op: str) -> None:
    task = current()
    if ctx is not None:
        if lock.ctx is ctx:
            raise Ealready(msg=f"{lock.name} is already locked by context {ctx.name}")
        _check_ctx(task, lock, ctx)
        if ctx.acquired == 0:
            ctx.wounded = False
    if lock.owner is task:
        lockdep.report(
            "recursive",
            f"{task.name} locks {lock.name} which it already holds (AA deadlock)",
            key=("recursive", id(lock)),
        )
        raise Edeadlk(msg=f"{lock.name} is already held by {task.name}")
    lockdep.might_sleep()
    preempt(f"{op} {lock.name}")
    lockdep.acquire(lock, lock.ww_class.mutex_class, nest=ctx, task=task)
    try:
        _acquire(lock, task, ctx, interruptible)
    except BaseException:
        lockdep.release(lock)
        raise
    if (
        ctx is not None
        and ctx.inject_deadlk
        and ctx.acquired > 1
        and task.runtime.rng.random() < ctx.inject_deadlk
    ):
        unlock(lock)
        ctx.contending_lock = lock
        task.runtime.log(f"ww: injected -EDEADLK for {ctx.name} on {lock.name}")
        raise Edeadlk(msg=f"injected on {lock.name} (debug slow path)")


def _acquire(lock: WwMutex, task: Task, ctx: WwAcquireCtx | None, interruptible: bool) -> None:
    if lock.wq is None:
        with _UNCONTENDED:
            if lock.wq is None and lock.owner is None:
                _take(lock, task, ctx)  # no wait queue, so nobody waits: nothing to wake
                return
    wq = _wait_queue(lock)
    with wq.lock:
        if lock.owner is None:
            _take(lock, task, ctx)
            if ctx is not None and lock.waiters:
                wq.wake_up_all()  # waiters re-check die/wound against the new holder
            return
    waiter = _Waiter(task, ctx)
    died = False

    def granted_or_dead() -> bool:
        nonlocal died
        if lock.owner is None:
            _take(lock, task, ctx)
            return True
        if ctx is not None:
            if ctx.acquired > 0 and _should_die(lock, ctx):
                died = True
                return True
            if not ctx.ww_class.is_wait_die:
                _wound_holder(lock, ctx)
        if waiter not in lock.waiters:
            lock.waiters.append(waiter)
            wq.wake_up_all()  # younger waiters may now have to die
        return False

    def reason() -> str:
        holder = lock.owner.name if lock.owner else "nobody"
        return f"ww_mutex {lock.name} held by {holder}"

    wait_id = 0
    if trace.enabled:
        wait_id = next_wait_id()
        trace.begin("lock", "wait", wait_id, lock=lock.name, holder=reason())
    try:
        wq.wait_event(granted_or_dead, interruptible=interruptible, reason=reason)
    except Erestartsys:
        raise Eintr(msg=f"signal while waiting for {lock.name}") from None
    finally:
        if waiter in lock.waiters:
            lock.waiters.remove(waiter)
        if wait_id:
            trace.end("lock", "wait", wait_id, lock=lock.name, died=died)
    if died:
        ctx.contending_lock = lock
        task.runtime.log(f"ww: -EDEADLK for {ctx.name} on {lock.name}")
        raise Edeadlk(msg=f"{ctx.name} must back off from {lock.name}")
    if ctx is not None and lock.waiters:
        wq.wake_up_all()


def lock(lock: WwMutex, ctx: WwAcquireCtx | None) -> None:
    """Acquire ``lock`` in transaction ``ctx`` (or as a plain mutex when ctx is None).

    Kernel: ww_mutex_lock() [kernel/locking/ww_mutex.h, kernel/locking/mutex.c]

    Raises:
        Ealready: ``ctx`` already holds ``lock``.
        Edeadlk: ``ctx`` holds other locks and must back off: release them all, then
            :func:`lock_slow` this lock (``ctx.contending_lock``).
    """
    _lock(lock, ctx, False, "lock")


def lock_interruptible(lock: WwMutex, ctx: WwAcquireCtx | None) -> None:
    """As :func:`lock`, but a pending signal aborts the wait.

    Kernel: ww_mutex_lock_interruptible()

    Raises:
        Ealready, Edeadlk: as :func:`lock`.
        Eintr: a signal is pending while waiting.
    """
    _lock(lock, ctx, True, "lock")


def lock_slow(lock: WwMutex, ctx: WwAcquireCtx) -> None:
    """After -EDEADLK and releasing everything, sleep until the contended lock is ours.

    Kernel: ww_mutex_lock_slow() [include/linux/ww_mutex.h]

    Cannot fail: a context holding nothing never dies.
    """
    if ctx.contending_lock is None:
        _misuse(f"lock_slow {lock.name} without a preceding -EDEADLK on context {ctx.name}")
    _lock(lock, ctx, False, "lock_slow")


def lock_slow_interruptible(lock: WwMutex, ctx: WwAcquireCtx) -> None:
    """Kernel: ww_mutex_lock_slow_interruptible()

    Raises:
        Eintr: a signal is pending while waiting.
    """
    if ctx.contending_lock is None:
        _misuse(f"lock_slow {lock.name} without a preceding -EDEADLK on context {ctx.name}")
    _lock(lock, ctx, True, "lock_slow")


def trylock(lock: WwMutex, ctx: WwAcquireCtx | None = None) -> bool:
    """Take ``lock`` if it is free; never sleeps, never dies.

    Kernel: ww_mutex_trylock() [kernel/locking/mutex.c]

    Returns False when the lock is held, including by ``ctx`` itself.
    """
    task = current()
    preempt(f"trylock {lock.name}")
    if ctx is not None:
        if ctx.task is not task:
            _misuse(f"{task.name} trylocks {lock.name} with {ctx.task.name}'s acquire context")
        if lock.ww_class is not ctx.ww_class:
            _misuse(
                f"trylock {lock.name} of class {lock.ww_class.name} with a context of class "
                f"{ctx.ww_class.name}"
            )
        if ctx.acquired == 0:
            ctx.wounded = False
    wq = lock.wq
    if wq is None:
        with _UNCONTENDED:
            wq = lock.wq
            if wq is None:
                if lock.owner is not None:
                    return False
                _take(lock, task, ctx)
    if wq is not None:
        with wq.lock:
            if lock.owner is not None:
                return False
            _take(lock, task, ctx)
    lockdep.acquire(lock, lock.ww_class.mutex_class, trylock=True, nest=ctx)
    if ctx is not None and lock.waiters:
        wq.wake_up_all()
    return True


def unlock(lock: WwMutex) -> None:
    """Release ``lock``; the holder's context counts one lock fewer.

    Kernel: ww_mutex_unlock() [kernel/locking/mutex.c]
    """
    task = current()
    owner = lock.owner
    if owner is None:
        _misuse(f"{task.name} unlocks {lock.name} which is not locked")
        return
    if owner is not task:
        _misuse(f"{task.name} unlocks {lock.name} held by {owner.name}")
    wq = lock.wq
    if wq is None:
        with _UNCONTENDED:
            wq = lock.wq
            if wq is None:
                _release_owner(lock)
    if wq is not None:
        with wq.lock:
            _release_owner(lock)
    lockdep.release(lock, task=owner)
    if lock.waiters:
        wq.wake_up_all()
    preempt(f"unlock {lock.name}")


def _release_owner(lock: WwMutex) -> None:
    ctx = lock.ctx
    if ctx is not None:
        ctx.acquired -= 1
    lock.ctx = None
    lock.owner = None


def is_locked(lock: WwMutex) -> bool:
    """Kernel: ww_mutex_is_locked()."""
    return lock.owner is not None
