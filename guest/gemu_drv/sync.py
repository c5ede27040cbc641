"""DOC: the driver's short internal locks, aware of the guest runtime and tracked by lockdep.

The ring, the AS slots and each VM's page table are guarded by short locks that may be held
across a preemption point (signalling a fence, writing a register). A ``threading`` lock would
block the real thread behind a deterministic run's baton and hang it; :class:`SpinLock` waits
through the runtime's :class:`~gemu.guest.kernel.runtime.WaitQueue` instead, so it works
unchanged under :class:`~gemu.guest.kernel.runtime.FreeRunning` (real threads, a condition
variable) and :class:`~gemu.guest.kernel.runtime.Deterministic` (the waiter hands the baton
over; a deadlock is reported with who holds the lock).

Every lock belongs to a lockdep :class:`~gemu.guest.locking.lockdep.LockClass` (one per kind of
lock: all VMs' page-table locks share one class, as a ``mutex_init()`` call site does), so its
order against reservations, fs_reclaim and the fence signalling section is checked like any
other lock's: a page-table lock held while allocating with ``GFP_KERNEL`` and also taken by the
shrinker's evict path is a reported inversion. It is not recursive: taking it again is
lockdep's "possible recursive locking" report (and, outside strict mode, an error instead of
a silent self-deadlock)::

    PGTABLE_CLASS = lockdep.LockClass("gemu_vm.pgtable_lock")
    lock = SpinLock("file0.pgtable", PGTABLE_CLASS)
    with lock:
        ...

Kernel: the driver locks of the same places (panfrost's ``as_lock``, a VM's page-table or
``op_lock`` mutex). Lockdep treats them as sleeping locks here: gemu has no atomic context for
them, so sleeping while holding one is not reported (see docs/guest.md).
"""

from __future__ import annotations

from gemu.guest.kernel import runtime
from gemu.guest.locking import lockdep
from gemu.guest.locking.lockdep import LockClass


class SpinLock:
    """A short, non-recursive driver lock whose waiters sleep in the guest runtime."""

    __slots__ = ("_held", "cls", "name", "owner", "wq")

    def __init__(self, name: str, cls: LockClass) -> None:
        self.name = name
        self.cls = cls
        self.owner: runtime.Task | None = None
        self.wq = runtime.WaitQueue(name)
        self._held = lockdep.HeldLock(self, cls, False, False, None)  # lockdep.acquire_held()

    def __repr__(self) -> str:
        owner = self.owner.name if self.owner else None
        return f"<SpinLock {self.name} owner={owner}>"

    def acquire(self) -> None:
        """Take the lock, waiting in the runtime. Kernel: spin_lock() / mutex_lock()."""
        task = runtime.current()
        # lockdep first, as lock_acquire() runs before contending: an inversion or recursion
        # is reported even when this acquisition would deadlock.
        lockdep.acquire_held(self._held, task)
        if self.owner is task:
            lockdep.release(self)
            raise RuntimeError(f"{task.name} takes {self.name} which it already holds")
        if not task.runtime.deterministic:
            # What wait_event's first test does, without making its condition: a free lock
            # is taken under the queue's lock. Deterministic runs go through wait_event, which
            # also records the queue for a search's dependencies. (acquire()/release(), not a
            # with-block: a with-block binds __enter__ and __exit__ each time, twice the cost
            # of the lock, and a job takes a driver lock five times.)
            lock = self.wq.lock
            lock.acquire()
            try:
                if self.owner is None:
                    self.owner = task
                    return
            finally:
                lock.release()

        def granted() -> bool:
            if self.owner is None:
                self.owner = task
                return True
            return False

        try:
            self.wq.wait_event(granted, reason=self._reason)
        except BaseException:
            if self.owner is not task:
                lockdep.release(self)
            raise

    def _reason(self) -> str:
        holder = self.owner.name if self.owner else "nobody"
        return f"lock {self.name} held by {holder}"

    def release(self) -> None:
        """Kernel: spin_unlock() / mutex_unlock()."""
        owner = self.owner
        wq = self.wq
        lock = wq.lock
        lock.acquire()
        try:
            self.owner = None
        finally:
            lock.release()
        lockdep.release(self, task=owner)
        if wq.has_sleepers():
            wq.wake_up_all()

    def locked(self) -> bool:
        return self.owner is not None

    def __enter__(self) -> SpinLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
