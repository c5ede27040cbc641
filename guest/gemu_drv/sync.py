"""DOC: the driver's short internal locks, aware of the guest runtime.

The ring, the AS slots and each VM's page table are guarded by short locks that may be held
across a preemption point (signalling a fence, allocating a page-table frame). A
``threading`` lock would block the real thread behind a deterministic run's baton and hang it;
:class:`SpinLock` waits through the runtime's :class:`~gemu.guest.kernel.runtime.WaitQueue`
instead, so it works unchanged under :class:`~gemu.guest.kernel.runtime.FreeRunning` (real
threads, a condition variable) and :class:`~gemu.guest.kernel.runtime.Deterministic` (the
waiter hands the baton over; a deadlock is reported with who holds the lock).

It is not a lockdep-tracked lock (the kernel's raw spinlocks of the same places are not
ordered against the sleeping locks either); it may be taken again by its owner (``recursive``,
like the ``RLock`` it replaces)::

    lock = SpinLock("gemu0.ring", recursive=True)
    with lock:
        ...

Kernel: spinlock_t (panfrost's ``job_lock``, ``as_lock``) in spirit.
"""

from __future__ import annotations

from gemu.guest.kernel import runtime


class SpinLock:
    """A short lock whose waiters sleep in the guest runtime."""

    __slots__ = ("_count", "name", "owner", "recursive", "wq")

    def __init__(self, name: str, *, recursive: bool = False) -> None:
        self.name = name
        self.recursive = recursive
        self.owner: runtime.Task | None = None
        self._count = 0
        self.wq = runtime.WaitQueue(name)

    def __repr__(self) -> str:
        owner = self.owner.name if self.owner else None
        return f"<SpinLock {self.name} owner={owner}>"

    def acquire(self) -> None:
        task = runtime.current()
        if self.owner is task:
            if not self.recursive:
                raise RuntimeError(f"{task.name} takes {self.name} which it already holds")
            self._count += 1
            return

        def granted() -> bool:
            if self.owner is None:
                self.owner = task
                self._count = 1
                return True
            return False

        self.wq.wait_event(granted, reason=self._reason)

    def _reason(self) -> str:
        holder = self.owner.name if self.owner else "nobody"
        return f"lock {self.name} held by {holder}"

    def release(self) -> None:
        with self.wq.lock:
            self._count -= 1
            if self._count:
                return
            self.owner = None
        if self.wq.has_sleepers():
            self.wq.wake_up_all()

    def locked(self) -> bool:
        return self.owner is not None

    def __enter__(self) -> SpinLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
