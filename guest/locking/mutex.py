"""DOC: the sleeping mutex of the guest kernel model.

A :class:`Mutex` knows its owner: unlocking a mutex the task does not hold, or locking one it
already holds, is reported through lockdep instead of corrupting state or hanging silently.
Lock and unlock are preemption points, waiting goes through the runtime's wait queues (a
deterministic run schedules around it; a deadlock is reported with who holds what), and every
acquisition is ordered by lockdep under the mutex's :class:`~gemu.guest.locking.lockdep.LockClass`
(one class per mutex unless several mutexes share ``cls``).

Usage::

    from gemu.guest.locking.mutex import Mutex

    lru_lock = Mutex("gem_lru")
    with lru_lock:                 # lock() ... unlock()
        ...
    if lru_lock.trylock():
        lru_lock.unlock()

Kernel: include/linux/mutex.h, kernel/locking/mutex.c.
"""

from __future__ import annotations

import itertools

from gemu.guest.errors import Edeadlk, Eintr, Erestartsys
from gemu.guest.kernel import trace
from gemu.guest.kernel.runtime import Task, WaitQueue, current, preempt
from gemu.guest.locking import lockdep
from gemu.guest.locking.lockdep import LockClass

_wait_ids = itertools.count(1)


def next_wait_id() -> int:
    """A fresh id for a ``lock.wait`` trace span (one per contended acquisition, of a mutex
    or a ww_mutex)."""
    return next(_wait_ids)


class Mutex:
    """A sleeping lock with an owner. Kernel: struct mutex.

    ``owner`` is the holding task, None exactly when the mutex is free.
    """

    __slots__ = ("_held", "cls", "name", "owner", "wq")

    def __init__(self, name: str = "mutex", cls: LockClass | None = None) -> None:
        self.name = name
        self.cls = cls or LockClass(name)
        self.owner: Task | None = None
        self.wq = WaitQueue(name)
        self._held: lockdep.HeldLock | None = None  # for lockdep.acquire_held(), made on first lock

    def __repr__(self) -> str:
        owner = self.owner.name if self.owner else None
        return f"<Mutex {self.name} owner={owner}>"

    def __enter__(self) -> Mutex:
        self._lock(False)
        return self

    def __exit__(self, *exc: object) -> None:
        self.unlock()

    def statistics(self) -> dict:
        """Who holds it and whether anyone waits, for dumps and tests."""
        return {
            "locked": self.owner is not None,
            "owner": self.owner.name if self.owner else None,
            "has_waiters": self.wq.has_sleepers(),
        }

    def _lock(self, interruptible: bool) -> None:
        task = current()
        if self.owner is task:
            lockdep.report(
                "recursive",
                f"{task.name} locks mutex {self.name} which it already holds (AA deadlock)",
                key=("recursive", id(self)),
            )
            raise Edeadlk(msg=f"mutex {self.name} is already held by {task.name}")
        if task.atomic_depth:  # lockdep.might_sleep(), which reports only then
            lockdep.might_sleep()
        if task.runtime.deterministic:  # a free-running preemption point is nothing
            preempt(f"lock {self.name}")
        held = self._held
        if held is None:
            held = self._held = lockdep.HeldLock(self, self.cls, False, False, None)
        lockdep.acquire_held(held, task)
        wq = self.wq
        # acquire()/release() rather than a with-block, which binds __enter__ and __exit__
        # each time: a submit locks its file's submit lock once per job
        wq.lock.acquire()
        try:
            if self.owner is None:
                self.owner = task
                return
        finally:
            wq.lock.release()

        def granted() -> bool:
            if self.owner is None:
                self.owner = task
                return True
            return False

        def reason() -> str:
            holder = self.owner.name if self.owner else "nobody"
            return f"mutex {self.name} held by {holder}"

        wait_id = 0
        if trace.enabled:
            wait_id = next_wait_id()
            trace.begin("lock", "wait", wait_id, lock=self.name, holder=reason())
        try:
            wq.wait_event(granted, interruptible=interruptible, reason=reason)
        except Erestartsys:
            lockdep.release(self)
            raise Eintr(msg=f"signal while waiting for mutex {self.name}") from None
        except BaseException:
            lockdep.release(self)
            raise
        finally:
            if wait_id:
                trace.end("lock", "wait", wait_id, lock=self.name)

    def lock(self) -> None:
        """Sleep until the mutex is ours. Kernel: mutex_lock()."""
        self._lock(False)

    def lock_interruptible(self) -> None:
        """Kernel: mutex_lock_interruptible().

        Raises:
            Eintr: a signal is pending while waiting.
        """
        self._lock(True)

    def trylock(self) -> bool:
        """Take the mutex if it is free. Kernel: mutex_trylock()."""
        task = current()
        preempt(f"trylock {self.name}")
        with self.wq.lock:
            if self.owner is not None:
                return False
            self.owner = task
        lockdep.acquire(self, self.cls, trylock=True)
        return True

    def unlock(self) -> None:
        """Kernel: mutex_unlock()."""
        task = current()
        owner = self.owner
        if owner is None:
            lockdep.report("mutex-misuse", f"{task.name} unlocks mutex {self.name} which is free")
            return
        if owner is not task:
            lockdep.report(
                "mutex-misuse", f"{task.name} unlocks mutex {self.name} held by {owner.name}"
            )
        wq = self.wq
        wq.lock.acquire()
        try:
            self.owner = None
        finally:
            wq.lock.release()
        lockdep.release(self, task=owner)
        wq.wake_up_all()
        if task.runtime.deterministic:  # a free-running preemption point is nothing
            preempt(f"unlock {self.name}")

    def is_locked(self) -> bool:
        """Kernel: mutex_is_locked()."""
        return self.owner is not None

    def assert_held(self) -> None:
        """Kernel: lockdep_assert_held(&mutex)."""
        lockdep.assert_held(self)
