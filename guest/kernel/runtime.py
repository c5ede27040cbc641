"""DOC: tasks, wait queues, the clock and the scheduler of the guest kernel model.

Every piece of guest code runs in a :class:`Task` (the model's ``task_struct``) of a runtime:

- :class:`FreeRunning` runs tasks as real threads. Preemption points cost nothing and the clock
  is the host's monotonic clock. Threads that no runtime spawned (a unit test calling a lock
  directly, a console thread) are adopted into a process-wide default free-running runtime, so
  the locking API needs no setup.
- :class:`Deterministic` runs one task at a time. Tasks are greenlets in the calling thread
  (or, with ``backend="threads"``, pooled threads handing a baton to each other: the same
  decisions, five to ten times the cost of a switch); at every preemption point (lock, unlock, fence operation, allocation, device step) a
  seeded strategy picks who runs next, CHESS/Loom style, so the same seed replays the same
  interleaving step for step. The clock is virtual: it moves only by :func:`advance` or, when
  every task is blocked and some wait has a timeout, by jumping to the earliest deadline (trio's
  autojump clock). A state where nothing can run and nothing can time out is a deadlock and
  raises :class:`DeadlockError` naming every task, the locks it holds and what it waits for.

Blocking always goes through :class:`WaitQueue.wait_event` (the kernel's ``wait_event()``), so a
blocked task hands the baton over instead of spinning, and its ``wait_reason`` says why it sleeps.

Usage::

    from gemu.guest.kernel import runtime

    def main():
        done = runtime.Completion("worker done")
        runtime.spawn(lambda: done.complete(), name="worker")
        done.wait_for_completion()
        return runtime.now_ns()

    rt = runtime.Deterministic(seed=7)
    rt.run(main)             # same seed, same rt.event_log, byte for byte
    again = runtime.Deterministic(seed=0, replay=rt.schedule)   # replays rt's decisions

A failed deterministic run (a task exception, a lockdep report in strict mode, a deadlock)
re-raises the error from :meth:`Runtime.run` with ``seed`` and ``replay_hint`` attributes and a
note naming the command that reproduces it.
"""

from __future__ import annotations

import itertools
import os
import random
import threading
import time
from bisect import insort
from collections import deque
from collections.abc import Callable
from operator import attrgetter
from typing import Any

import greenlet

from gemu.guest import errors
from gemu.guest.errors import Erestartsys

_local = threading.local()
_tids = itertools.count(1)

CLOCK = "clock"
"""What a transition that reads or moves the deterministic runtime's clock touches (as it
touches the wait queues it uses): the explore bus's GPU task moves the clock while other
tasks can run, so a step reading it (a deadline, a timeout) and a step moving it do not
commute, and a systematic search must not take them for independent."""

TaskExitHook = Callable[["Task"], None]
_task_exit_hooks: list[TaskExitHook] = []


def add_task_exit_hook(hook: TaskExitHook) -> None:
    """Run ``hook(task)`` in every task that returns normally, as it exits (lockdep's
    "lock held when returning to user space" check uses this)."""
    if hook not in _task_exit_hooks:
        _task_exit_hooks.append(hook)


class DeadlockError(RuntimeError):
    """No task can run and no timed wait is pending; the message lists every task."""

    seed: int | None = None
    replay_hint: str = ""


class LivelockError(RuntimeError):
    """A deterministic run went past ``max_steps`` preemption points."""

    seed: int | None = None
    replay_hint: str = ""


class ReplayDivergence(RuntimeError):
    """A replayed schedule names a task that cannot run: the program is not deterministic."""


class RunAbandoned(BaseException):
    """Raised by a :attr:`Deterministic.chooser` to give up the run (a search found that
    what follows was already explored); :meth:`Deterministic.run` unwinds every task and
    re-raises it."""


class _Killed(BaseException):
    """Unwinds the tasks of an aborted deterministic run; never escapes the runtime."""


class Task:
    """A guest kernel thread. Kernel: struct task_struct.

    ``held_locks`` is lockdep's stack of the locks this task holds (newest last). The lockdep
    fields ``fence_signalling_depth`` (explicit dma_fence signalling sections),
    ``published_fences`` (id -> fence this task published and has not handed off) and
    ``signalling_stack`` (where the current signalling section started) belong to
    :mod:`gemu.guest.locking.lockdep`.
    """

    def __init__(
        self,
        runtime: Runtime,
        name: str,
        tid: int,
        fn: Callable[..., Any] | None = None,
        args: tuple = (),
        kwargs: dict | None = None,
    ) -> None:
        self.name = name
        self.tid = tid
        self.runtime = runtime
        self.held_locks: list = []
        self.signal_pending = False
        self.fence_signalling_depth = 0
        self.published_fences: dict[int, object] = {}
        self.signalling_stack: object = None
        self.signalling_mark = 0
        self.atomic_depth = 0
        self.done = False
        self.result: Any = None
        self.exception: BaseException | None = None
        self._fn = fn
        self._args = args
        self._kwargs = kwargs or {}
        self._wait_reason: str | Callable[[], str] | None = None
        self._waiting_on: WaitQueue | None = None
        self._exit_wq = WaitQueue(f"exit of {name}")
        # Deterministic runtime only: the thread backend's baton or the greenlet backend's
        # greenlet (made when the task first runs).
        self._baton: threading.Lock | None = None
        self._glet: greenlet.greenlet | None = None
        self._blocked = False
        self._deadline: int | None = None
        self._priority = 0.0
        # What the task's current transition (its run since its last preemption point) began
        # with and touched; kept only while a Deterministic.recorder is set.
        self._label = "start"
        self._touched: set[str] | None = None
        self._next_on: object = None  # preempt()'s ``on`` for the transition that follows

    def __repr__(self) -> str:
        state = "done" if self.done else ("blocked" if self._blocked else "runnable")
        return f"<Task {self.tid} {self.name!r} {state}>"

    def __lt__(self, other: Task) -> bool:  # run queues are kept in tid order
        return self.tid < other.tid

    @property
    def wait_reason(self) -> str | None:
        """What the task sleeps on, or None when it is not waiting."""
        reason = self._wait_reason
        return reason() if callable(reason) else reason

    @wait_reason.setter
    def wait_reason(self, reason: str | Callable[[], str] | None) -> None:
        self._wait_reason = reason

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the task has finished; True if it did. ``timeout`` is in seconds of the
        runtime clock (virtual seconds in deterministic mode)."""
        timeout_ns = None if timeout is None else int(timeout * 1e9)
        return self._exit_wq.wait_event(
            lambda: self.done, timeout_ns=timeout_ns, reason=f"join {self.name}"
        )

    def send_signal(self) -> None:
        """Make a signal pending and wake the task's current wait. Kernel: send_sig()."""
        self.runtime.signal(self)

    def clear_signal(self) -> None:
        """Forget the pending signal (the model's return to user space)."""
        self.signal_pending = False


def current() -> Task:
    """The running guest task. Kernel: current.

    A thread that no runtime spawned is adopted as a task of the default free-running runtime.
    """
    try:
        return _local.task
    except AttributeError:
        task = Task(_DEFAULT, threading.current_thread().name, next(_tids))
        _local.task = task
        return task


def current_runtime() -> Runtime:
    """The runtime of the running task."""
    return current().runtime


def default_runtime() -> FreeRunning:
    """The free-running runtime that adopts threads no runtime spawned."""
    return _DEFAULT


def preempt(reason: str, on: object = None) -> None:
    """A preemption point; ``reason`` names the operation for the event log.

    Free-running: nothing. Deterministic: the scheduler may switch to another runnable task.
    ``on`` is the object the operation after the point works on (a fence, a reservation
    object) when ``reason`` does not name it; a systematic search (its recorder) uses it to
    tell independent steps apart. It never reaches the event log.
    """
    try:  # current(), inline: the hottest caller
        task = _local.task
    except AttributeError:
        task = current()
    if on is not None and task._touched is not None:
        task._next_on = on
    task.runtime._preempt(task, reason)


def now_ns() -> int:
    """The runtime clock in nanoseconds. Kernel: ktime_get_ns()."""
    try:  # current(), inline
        task = _local.task
    except AttributeError:
        task = current()
    return task.runtime.now_ns()


def timestamp_ns() -> int:
    """The runtime clock for a timestamp the model records and never compares (a fence's
    signal time, a job's submit time). Unlike :func:`now_ns`, a systematic search does not
    count it as reading the clock (:data:`CLOCK`): the order of such a read and the GPU's
    time passing changes only a value that no decision, invariant or outcome reads, so the
    two steps still commute. A value anything compares must come from :func:`now_ns`.
    Kernel: ktime_get_ns()."""
    try:  # current(), inline
        task = _local.task
    except AttributeError:
        task = current()
    return task.runtime.timestamp_ns()


def shared(name: str) -> None:
    """The step in progress reads or changes ``name``, state shared between tasks that no
    lock, wait queue or named preemption point covers (a test harness's list of submitted
    fences, appended by every submitter and read in order at the end). A systematic search
    then counts the steps that name it as dependent (:mod:`gemu.host.explore.exhaustive`);
    nothing else changes. No kernel counterpart: the kernel's data races are what KCSAN
    reports."""
    try:  # current(), inline
        task = _local.task
    except AttributeError:
        return  # a thread no runtime adopted: nothing records its steps
    if task._touched is not None:
        task._touched.add(name)


def spawn(fn: Callable[..., Any], *args: Any, name: str, **kwargs: Any) -> Task:
    """Start ``fn(*args, **kwargs)`` as a new task of the current runtime. Kernel: kthread_run()."""
    return current().runtime.spawn(fn, *args, name=name, **kwargs)


def advance(ns: int) -> None:
    """Let ``ns`` nanoseconds of runtime clock pass, then reach a preemption point."""
    task = current()
    task.runtime.advance(ns)
    task.runtime._preempt(task, f"advance {ns}")


def sleep_ns(ns: int) -> None:
    """Sleep for ``ns`` nanoseconds of runtime clock; other tasks run meanwhile. Kernel:
    schedule_timeout_uninterruptible()."""
    WaitQueue("sleep").wait_event(lambda: False, timeout_ns=ns, reason=f"sleep {ns} ns")


def log(event: str) -> None:
    """Append ``event`` to the current runtime's event log."""
    current().runtime.log(event)


class WaitQueue:
    """Tasks sleeping until a condition holds. Kernel: wait_queue_head_t with wait_event().

    ``lock`` guards the state the waiters test: change that state under ``lock``, then call
    :meth:`wake_up_all` (with or without ``lock`` held). Never reach a preemption point while
    holding ``lock``.
    """

    __slots__ = ("_cond", "_det_waiters", "_free_waiters", "lock", "name")

    def __init__(self, name: str = "waitqueue") -> None:
        self.name = name
        self.lock = threading.RLock()
        self._det_waiters: list[Task] = []
        self._free_waiters = 0
        self._cond: threading.Condition | None = None

    def __repr__(self) -> str:
        return f"<WaitQueue {self.name!r}>"

    def wait_event(
        self,
        cond: Callable[[], bool],
        timeout_ns: int | None = None,
        interruptible: bool = False,
        reason: str | Callable[[], str] | None = None,
    ) -> bool:
        """Sleep until ``cond()`` is true; call without ``lock`` held.

        Kernel: wait_event_timeout() / wait_event_interruptible_timeout()
        [include/linux/wait.h]

        ``cond`` is evaluated with ``lock`` held (it may claim what it waited for, as a lock's
        slow path does). Returns True once ``cond()`` was true, False when ``timeout_ns`` of
        runtime clock passed first (``0`` polls once). ``reason`` (a string, or a callable
        producing one) becomes the task's ``wait_reason``; by default the queue's name.

        Raises:
            Erestartsys: ``interruptible`` and the task has a signal pending.
        """
        try:  # current(), inline
            task = _local.task
        except AttributeError:
            task = current()
        # the runtime makes the default reason only if the task sleeps
        return task.runtime._wait_event(task, self, cond, timeout_ns, interruptible, reason)

    def wake_up_all(self) -> None:
        """Wake every task sleeping on this queue; each re-tests its condition.
        Kernel: wake_up_all()."""
        if _recording:
            # A search's recorder: waking is a write the waiters' next test reads, whether or
            # not anyone sleeps here yet.
            waker = getattr(_local, "task", None)
            if waker is not None and waker._touched is not None:
                waker._touched.add(self.name)
        if self._det_waiters:
            waiters, self._det_waiters = self._det_waiters, []
            for task in waiters:
                task.runtime._wake(task)
        if self._free_waiters:
            self._notify_threads()

    def _notify_threads(self) -> None:
        with self.lock:
            if self._cond is not None:
                self._cond.notify_all()

    def has_sleepers(self) -> bool:
        """Whether any task sleeps here. Kernel: wq_has_sleeper()."""
        return bool(self._det_waiters or self._free_waiters)


_recording = 0
"""Deterministic runs with a recorder in progress (in this thread's process)."""

_COMPLETE_ALL = 1 << 62


class Completion:
    """A one-way "it happened" event tasks can wait for. Kernel: struct completion.

    ``done`` counts completions not yet consumed by a waiter (``complete_all`` makes it
    unbounded until :meth:`reinit`).
    """

    def __init__(self, name: str = "completion") -> None:
        self.name = name
        self.done = 0
        self.wq = WaitQueue(name)

    def complete(self) -> None:
        """Let one waiter through. Kernel: complete()."""
        with self.wq.lock:
            if self.done != _COMPLETE_ALL:
                self.done += 1
        self.wq.wake_up_all()

    def complete_all(self) -> None:
        """Let every current and future waiter through. Kernel: complete_all()."""
        with self.wq.lock:
            self.done = _COMPLETE_ALL
        self.wq.wake_up_all()

    def reinit(self) -> None:
        """Kernel: reinit_completion()."""
        with self.wq.lock:
            self.done = 0

    def _consume(self) -> bool:
        if not self.done:
            return False
        if self.done != _COMPLETE_ALL:
            self.done -= 1
        return True

    def wait_for_completion(self) -> None:
        """Kernel: wait_for_completion()."""
        self.wq.wait_event(self._consume, reason=f"completion {self.name}")

    def wait_for_completion_timeout(self, timeout_ns: int) -> bool:
        """True if completed within ``timeout_ns``. Kernel: wait_for_completion_timeout()."""
        return self.wq.wait_event(
            self._consume, timeout_ns=timeout_ns, reason=f"completion {self.name}"
        )

    def wait_for_completion_interruptible(self) -> None:
        """Kernel: wait_for_completion_interruptible().

        Raises:
            Erestartsys: a signal is pending.
        """
        self.wq.wait_event(self._consume, interruptible=True, reason=f"completion {self.name}")

    def try_wait_for_completion(self) -> bool:
        """Consume a completion if one is available. Kernel: try_wait_for_completion()."""
        with self.wq.lock:
            return self._consume()

    def completion_done(self) -> bool:
        """Whether a waiter would pass without sleeping. Kernel: completion_done()."""
        return bool(self.done)


class Runtime:
    """What both runtimes share; use :class:`FreeRunning` or :class:`Deterministic`."""

    deterministic = False
    seed: int | None = None
    strategy = "free"

    def __init__(self, strict: bool | None = None) -> None:
        self._strict = strict
        self.lockdep: Any = None  # gemu.guest.locking.lockdep owns this slot
        self.tasks: list[Task] = []
        self.steps = 0
        self.schedule: list[int] = []
        self._stamps: dict[object, itertools.count] = {}

    @property
    def strict(self) -> bool:
        """Violations raise (True) or are counted (False); defaults to errors.is_strict()."""
        return errors.is_strict() if self._strict is None else self._strict

    @strict.setter
    def strict(self, value: bool | None) -> None:
        self._strict = value

    @property
    def replay_hint(self) -> str:
        return ""

    def next_stamp(self, key: object) -> int:
        """A per-runtime increasing counter per ``key`` (ww acquire stamps)."""
        counter = self._stamps.get(key)
        if counter is None:
            counter = self._stamps[key] = itertools.count(1)
        return next(counter)

    def _task_name(self) -> str:
        task = getattr(_local, "task", None)
        return task.name if task is not None and task.runtime is self else "-"

    def _run_exit_hooks(self, task: Task) -> None:
        for hook in _task_exit_hooks:
            hook(task)

    def timestamp_ns(self) -> int:
        """:func:`timestamp_ns`."""
        return self.now_ns()

    # Overridden by both runtimes.
    def now_ns(self) -> int:
        raise NotImplementedError

    def _preempt(self, task: Task, reason: str) -> None:
        raise NotImplementedError

    def _wait_event(self, task, wq, cond, timeout_ns, interruptible, reason) -> bool:
        raise NotImplementedError

    def _wake(self, task: Task) -> None:
        raise NotImplementedError

    def wake_task(self, task: Task) -> None:
        """Make ``task`` re-test the condition it sleeps on. Kernel: wake_up_process()."""
        raise NotImplementedError

    def signal(self, task: Task) -> None:
        """Make a signal pending on ``task`` and wake its wait."""
        task.signal_pending = True
        self.wake_task(task)


class FreeRunning(Runtime):
    """Tasks are real threads; preemption points are free; the clock is the host's.

    ``event_log`` keeps the last ``log_size`` events.
    """

    def __init__(
        self, seed: int | None = None, *, strict: bool | None = None, log_size: int = 10_000
    ) -> None:
        super().__init__(strict)
        self.seed = seed
        self.rng = random.Random(seed)
        self.event_log: deque[str] = deque(maxlen=log_size)
        self._failure: BaseException | None = None
        self._failure_lock = threading.Lock()

    def now_ns(self) -> int:
        return time.monotonic_ns()

    def _preempt(self, task: Task, reason: str) -> None:
        pass

    def log(self, event: str) -> None:
        self.event_log.append(f"{self._task_name()} {event}")

    def advance(self, ns: int) -> None:
        """The host clock cannot be moved: sleep for ``ns`` instead."""
        time.sleep(ns / 1e9)

    def spawn(self, fn: Callable[..., Any], *args: Any, name: str, **kwargs: Any) -> Task:
        task = Task(self, name, next(_tids), fn, args, kwargs)
        self.tasks.append(task)
        thread = threading.Thread(target=self._thread_main, args=(task,), name=name, daemon=True)
        thread.start()
        return task

    def _thread_main(self, task: Task) -> None:
        _local.task = task
        try:
            task.result = task._fn(*task._args, **task._kwargs)
            self._run_exit_hooks(task)
        except BaseException as exc:
            task.exception = exc
            with self._failure_lock:
                if self._failure is None:
                    self._failure = exc
        finally:
            with task._exit_wq.lock:
                task.done = True
            task._exit_wq.wake_up_all()

    def run(self, main_fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``main_fn(*args)`` as task "main" in the calling thread, then wait for every
        task it spawned; re-raise the first task exception."""
        main = Task(self, "main", next(_tids), main_fn, args)
        self.tasks.append(main)
        saved = getattr(_local, "task", None)
        _local.task = main
        try:
            main.result = main_fn(*args)
            self._run_exit_hooks(main)
        except BaseException as exc:
            main.exception = exc
            with self._failure_lock:
                if self._failure is None:
                    self._failure = exc
        finally:
            main.done = True
            if saved is None:
                del _local.task
            else:
                _local.task = saved
        i = 0
        while i < len(self.tasks):  # tasks may spawn tasks while we join
            self.tasks[i].join()
            i += 1
        if self._failure is not None:
            raise self._failure
        return main.result

    def _wait_event(self, task, wq, cond, timeout_ns, interruptible, reason) -> bool:
        with wq.lock:
            if cond():
                return True
            if timeout_ns == 0:
                return False
            if interruptible and task.signal_pending:
                raise Erestartsys(msg=f"signal pending while waiting on {wq.name}")
            if wq._cond is None:
                wq._cond = threading.Condition(wq.lock)
            deadline = None if timeout_ns is None else time.monotonic_ns() + timeout_ns
            wq._free_waiters += 1
            task._waiting_on = wq
            task._wait_reason = reason or f"wait {wq.name}"
            try:
                while True:
                    if deadline is None:
                        wq._cond.wait()
                    else:
                        remaining = deadline - time.monotonic_ns()
                        if remaining <= 0:
                            return bool(cond())
                        wq._cond.wait(remaining / 1e9)
                    if cond():
                        return True
                    if interruptible and task.signal_pending:
                        raise Erestartsys(msg=f"signal pending while waiting on {wq.name}")
            finally:
                wq._free_waiters -= 1
                task._waiting_on = None
                task._wait_reason = None

    def _wake(self, task: Task) -> None:
        self.wake_task(task)

    def wake_task(self, task: Task) -> None:
        wq = task._waiting_on
        if wq is not None:
            wq._notify_threads()


_ALL_CPUS = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
_task_cpu: int | None = None


def pin_tasks(cpu: int | None) -> None:
    """Run the threads of deterministic tasks on CPU ``cpu`` from their next task on (None:
    on any CPU, the default).

    Only one task of a :class:`Deterministic` runtime runs at a time and every preemption
    point hands a baton from one thread to another. When the two threads sit on different
    CPUs each hand-off is a cross-CPU wake-up; on one CPU it is a plain context switch, about
    twice as fast in practice. ``gemu explore`` pins each of its worker processes to its own CPU.
    Schedules do not depend on it. A no-op where the OS has no thread affinity."""
    global _task_cpu
    if _ALL_CPUS is None:
        return
    if cpu is not None and cpu not in _ALL_CPUS:
        raise ValueError(f"CPU {cpu} is not one this process may use ({sorted(_ALL_CPUS)})")
    _task_cpu = cpu


def current_cpu() -> int | None:
    """The CPU the calling thread runs on now (None if the OS does not say)."""
    try:
        with open("/proc/thread-self/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2 :].split()[36])
    except (OSError, ValueError, IndexError):
        return None


class _Worker:
    """A pooled thread that runs deterministic tasks one after another."""

    def __init__(self) -> None:
        self.baton = threading.Lock()
        self.baton.acquire()
        self.job: tuple[Deterministic, Task] | None = None
        self.cpu: int | None = None  # what this thread is pinned to
        self.thread = threading.Thread(target=self._loop, name="gemu-task", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            self.baton.acquire()
            if self.job is None:
                return
            rt, task = self.job
            self.job = None
            if _task_cpu != self.cpu:
                self.cpu = _task_cpu
                os.sched_setaffinity(0, _ALL_CPUS if self.cpu is None else {self.cpu})
            _local.task = task
            nxt = rt._run_task(task)
            handoff = rt._done if nxt is None else nxt._baton
            keep = _POOL.put(self)
            handoff.release()
            if not keep:
                return


class _Pool:
    MAX_IDLE = 64

    def __init__(self) -> None:
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()

    def get(self) -> _Worker:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return _Worker()

    def put(self, worker: _Worker) -> bool:
        with self._lock:
            if len(self._idle) < self.MAX_IDLE:
                self._idle.append(worker)
                return True
        return False


_POOL = _Pool()


#: How a :class:`Deterministic` runtime's tasks take turns (see its ``backend`` argument).
BACKENDS = ("greenlet", "threads")


class Deterministic(Runtime):
    """One task runs at a time; a seeded strategy picks the next at every preemption point.

    Args:
        seed: seeds every choice (schedule, PCT priorities, injected faults).
        strategy: ``"random"`` picks uniformly among runnable tasks; ``"pct"`` runs the
            highest-priority runnable task, with ``pct_depth - 1`` priority drops at steps
            drawn uniformly from ``1..pct_steps`` (Probabilistic Concurrency Testing).
        pct_depth: bug depth PCT targets.
        replay: task ids to pick at the first scheduling decisions (a recorded
            ``rt.schedule``); the strategy takes over when it runs out.
        max_steps: raise :class:`LivelockError` past this many preemption points.
        pct_steps: PCT's estimate of the run's length in steps (measure one run's
            ``rt.steps``); default 64.
        backend: how tasks take turns. ``"greenlet"`` (the default) runs every task as a
            greenlet in the calling thread, so a switch is a stack swap of about a
            microsecond; ``"threads"`` runs each task in a pooled OS thread and hands a baton
            (a lock) between them, about 10 us a switch plus the GIL hand-over. Both make
            exactly the same decisions: same seed, same event log (the test suite compares
            them over many seeds), so ``"threads"`` serves as the reference the greenlet
            backend is checked and benchmarked against.

    A runtime runs once: ``rt.event_log`` (``"<step> <task> <event>"`` lines),
    ``rt.schedule`` (the task id picked at every decision with more than one runnable task)
    and ``rt.steps`` describe that run.
    """

    deterministic = True

    def __init__(
        self,
        seed: int,
        strategy: str = "random",
        pct_depth: int = 3,
        replay: list[int] | None = None,
        max_steps: int | None = None,
        *,
        pct_steps: int | None = None,
        strict: bool | None = None,
        backend: str = "greenlet",
    ) -> None:
        super().__init__(strict)
        if strategy not in ("random", "pct"):
            raise ValueError(f"unknown strategy {strategy!r}: use 'random' or 'pct'")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
        self.backend = backend
        self._greenlets = backend == "greenlet"
        self._hub: greenlet.greenlet | None = None
        self.seed = seed
        self.strategy = strategy
        self.pct_depth = pct_depth
        self.max_steps = max_steps
        self.rng = random.Random(seed)
        self._random = self.rng.random
        # (step, task name, event) per event; the lines of event_log are made when read
        self._events: list[tuple[int, str, str]] = []
        self._event_lines: list[str] = []
        self._replay = list(replay) if replay else None
        self._replay_pos = 0
        self._now = 0
        self._runnable: list[Task] = []
        self._timed: list[Task] = []
        self._by_tid: dict[int, Task] = {}
        self._alive = 0
        self._next_tid = 1
        self._failure: BaseException | None = None
        self._aborting = False
        self._started = False
        self._done = threading.Lock()
        self._pct = strategy == "pct"
        self._change_points: dict[int, float] = {}
        self._plain = False
        self.quiet = False
        """While True, no decision is made: the task at a preemption point goes on, and one
        that blocks or exits hands over to the next runnable task in tid order (a scenario's
        set-up phase, which is not part of the race it explores). Not recorded in
        ``schedule``: a replay is quiet at the same points."""
        self.chooser: Callable[[Deterministic, list[Task]], Task] | None = None
        """Makes every decision the replay does not (a systematic search): called with the
        runtime and the runnable tasks (tid order); ``current()`` is the task that reached the
        preemption point, itself among them unless it blocked or exited. May raise
        :class:`RunAbandoned`."""
        self.recorder: Callable[[Task, str | None], None] | None = None
        """Called when a task's transition ends (at a preemption point, when it blocks, when it
        exits) with the task and the label of its next transition (None: it exited). The
        task's ``_label`` and ``_touched`` (wait queues it used or woke) describe the
        transition that ended, ``_next_on`` the object :func:`preempt` named for the next one;
        the recorder resets them."""
        if self._pct:
            span = max(1, pct_steps or 64)
            points = self.rng.sample(range(1, span + 1), min(max(pct_depth - 1, 0), span))
            # Priorities below every task's initial one (which is >= pct_depth).
            self._change_points = {step: pct_depth - 1 - i for i, step in enumerate(points)}

    @property
    def replay_hint(self) -> str:
        hint = f"gemu explore --replay {self.seed} --strategy {self.strategy}"
        if self._pct:
            hint += f" --pct-depth {self.pct_depth}"
        return hint

    @property
    def event_log(self) -> list[str]:
        """The run's events, ``"<step> <task> <event>"`` per line, oldest first. The lines
        are formatted when first read: most schedules of a search are never looked at."""
        lines, events = self._event_lines, self._events
        if len(lines) < len(events):
            lines += [f"{s} {n} {e}" for s, n, e in events[len(lines) :]]
        return lines

    def forget_events(self) -> None:
        """Drop the run's event records and lines, once its caller has copied what it keeps:
        a tuple per preemption point that the cyclic collector would otherwise walk with the
        rest of the finished runtime (a task and the runtime refer to each other)."""
        self._events = []
        self._event_lines = []

    def now_ns(self) -> int:
        shared(CLOCK)
        return self._now

    def timestamp_ns(self) -> int:
        return self._now

    def log(self, event: str) -> None:
        self._events.append((self.steps, self._task_name(), event))

    def advance(self, ns: int) -> None:
        """Move the virtual clock forward by ``ns``; waits whose deadline passed time out."""
        shared(CLOCK)
        now = self._now = self._now + ns
        for t in self._timed:  # a few tasks (the watchdog's, a sleeper's): look before sorting
            if t._deadline <= now:
                for task in sorted(t for t in self._timed if t._deadline <= now):
                    self._wake(task)
                return

    # Running.

    def run(self, main_fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``main_fn(*args)`` as task "main" until every task has finished.

        Raises:
            DeadlockError: nothing can run and no wait can time out.
            LivelockError: more than ``max_steps`` preemption points.
            BaseException: the first exception a task raised, with ``seed`` and
                ``replay_hint`` attributes.
        """
        if self._started:
            raise RuntimeError("a Deterministic runtime runs once; make a new one")
        self._started = True
        # decisions from the random strategy alone, nothing to record or change per step:
        # _preempt's fast path (a search installs its chooser and recorder before the run)
        self._plain = (
            not self._pct
            and self._replay is None
            and self.chooser is None
            and self.recorder is None
        )
        main = self._new_task(main_fn, args, {}, "main")
        global _recording
        recording = self.recorder is not None
        _recording += recording
        try:
            if self._greenlets:
                self._run_greenlets(main)
            else:
                self._done.acquire()
                main._baton.release()
                self._done.acquire()  # released by the last task to finish
                self._done.release()
        finally:
            _recording -= recording
        if self._failure is not None:
            raise self._failure
        return main.result

    def _run_greenlets(self, main: Task) -> None:
        """The greenlet backend's hub: every task is a child greenlet of the caller's. Tasks
        switch to each other directly; a task that finishes returns to the hub with the task
        to run next (None once every task is done)."""
        saved = getattr(_local, "task", None)
        self._hub = greenlet.getcurrent()
        nxt: Task | None = main
        try:
            while nxt is not None:
                glet = self._greenlet_of(nxt)
                if glet.dead:
                    # its greenlet ended without finishing the task (below): it cannot run
                    # again, and switching to it would return at once, forever
                    self._reap(nxt)
                    nxt = self._kill_next()
                    continue
                try:
                    nxt = glet.switch()
                except BaseException as exc:
                    # The scheduler itself failed inside a task's exit (a replay that
                    # diverges), or an exception such as a Ctrl-C landed in the runtime's
                    # own bookkeeping: unwind every other task before reporting it.
                    self._fail(exc)
                    nxt = self._kill_next()
        finally:
            self._hub = None
            if saved is None:
                _local.__dict__.pop("task", None)
            else:
                _local.task = saved

    def _reap(self, task: Task) -> None:
        """Count as gone a task whose greenlet ended before :meth:`_exit` marked it done."""
        if not task.done:
            task.done = True
            self._alive -= 1
            if task in self._runnable:
                self._runnable.remove(task)

    def _greenlet_of(self, task: Task) -> greenlet.greenlet:
        glet = task._glet
        if glet is None:
            glet = task._glet = greenlet.greenlet(self._greenlet_main, self._hub)
            glet.gemu_task = task
        return glet

    def _greenlet_main(self) -> Task | None:
        task = greenlet.getcurrent().gemu_task
        _local.task = task
        return self._run_task(task)

    def spawn(self, fn: Callable[..., Any], *args: Any, name: str, **kwargs: Any) -> Task:
        task = self._new_task(fn, args, kwargs, name)
        parent = current()
        if parent.runtime is self:
            self._preempt(parent, f"spawn {name}")
        return task

    def _new_task(self, fn, args, kwargs, name) -> Task:
        task = Task(self, name, self._next_tid, fn, args, kwargs)
        self._next_tid += 1
        task._priority = self.pct_depth + self._random()
        if not self._greenlets:
            worker = _POOL.get()
            worker.job = (self, task)
            task._baton = worker.baton
        self.tasks.append(task)
        self._by_tid[task.tid] = task
        self._alive += 1
        insort(self._runnable, task, key=_TID)
        return task

    def _run_task(self, task: Task) -> Task | None:
        """Run one task to its end; returns the task to run next (None: the run is over)."""
        if not self._aborting:
            try:
                task.result = task._fn(*task._args, **task._kwargs)
                self._run_exit_hooks(task)
            except _Killed:
                pass
            except BaseException as exc:
                task.exception = exc
                self._fail(exc)
        return self._exit(task)

    def _exit(self, task: Task) -> Task | None:
        task.done = True
        self._alive -= 1
        if task in self._runnable:
            self._runnable.remove(task)
        task._exit_wq.wake_up_all()
        if self.recorder is not None and not self._aborting:
            self.recorder(task, None)
        if self._aborting:
            return self._kill_next()
        if self._alive == 0:
            return None
        try:
            nxt = self._pick_or_advance()
        except _Killed:  # the decision abandoned the run
            return self._kill_next()
        if nxt is None:
            self._fail(self._deadlock())
            return self._kill_next()
        return nxt

    def _kill_next(self) -> Task | None:
        for task in self.tasks:
            if not task.done:
                return task
        return None

    def _fail(self, exc: BaseException) -> None:
        self._aborting = True
        if self._failure is not None:
            return
        self._failure = exc
        try:
            exc.seed = self.seed
            exc.replay_hint = self.replay_hint
        except AttributeError:  # exceptions with __slots__
            pass
        exc.add_note(
            f"gemu: deterministic run failed at step {self.steps} "
            f"(seed {self.seed}, strategy {self.strategy}); replay: {self.replay_hint}"
        )

    # Scheduling.

    def _pick(self) -> Task | None:
        runnable = self._runnable
        if len(runnable) <= 1:
            return runnable[0] if runnable else None
        if self.quiet:
            return round_robin(current(), runnable)
        if self._replay is not None and self._replay_pos < len(self._replay):
            tid = self._replay[self._replay_pos]
            self._replay_pos += 1
            task = self._by_tid.get(tid)
            if task is None or task not in runnable:
                task = self._replay_diverges(runnable)
        elif self.chooser is not None:
            try:
                task = self.chooser(self, runnable)
            except (RunAbandoned, ReplayDivergence) as exc:
                self._abandon(exc)
        elif self._pct:
            task = max(runnable, key=_priority)
        else:
            task = runnable[int(self._random() * len(runnable))]
        self.schedule.append(task.tid)
        return task

    def _replay_diverges(self, runnable: list[Task]) -> Task:
        """The task to run when the replayed decision just read names one that cannot run
        (one of ``runnable``): by default none, the run ends with :class:`ReplayDivergence`."""
        pos = self._replay_pos - 1
        self._fail(
            ReplayDivergence(
                f"replay decision {pos} picks task {self._replay[pos]}, but only "
                f"{[t.tid for t in runnable]} can run"
            )
        )
        raise _Killed  # as _abandon does

    def _abandon(self, exc: BaseException) -> None:
        """End the run with ``exc`` from inside a scheduling decision. The task that asked
        may sit half-way into blocking (off the run queue), so its own code must not go on:
        it unwinds like every other task, and :meth:`run` raises ``exc``."""
        self._fail(exc)
        raise _Killed

    def _pick_or_advance(self) -> Task | None:
        if not self._runnable and self._timed:
            self._now = max(self._now, min(t._deadline for t in self._timed))
            for task in sorted(t for t in self._timed if t._deadline <= self._now):
                self._wake(task)
        return self._pick()

    def _switch(self, task: Task, nxt: Task) -> None:
        if self._greenlets:
            (nxt._glet or self._greenlet_of(nxt)).switch()
            _local.task = task
        else:
            nxt._baton.release()
            task._baton.acquire()
        if self._aborting:
            raise _Killed

    def _preempt(self, task: Task, reason: str) -> None:
        # the path every lock, unlock and fence operation takes: kept free of allocations
        # but the event record, and of calls when the task is alone or a decision keeps it
        if self._aborting:
            raise _Killed
        steps = self.steps = self.steps + 1
        self._events.append((steps, task.name, reason))
        if self._plain:
            # _pick's random strategy inline: the same draws, the same decisions recorded
            if self.max_steps is not None and steps > self.max_steps:
                self._livelock()
            runnable = self._runnable
            if len(runnable) > 1:
                if self.quiet:
                    nxt = round_robin(current(), runnable)
                else:
                    nxt = runnable[int(self._random() * len(runnable))]
                    self.schedule.append(nxt.tid)
                if nxt is not task:
                    self._switch(task, nxt)
            elif runnable[0] is not task:
                self._switch(task, runnable[0])
            return
        if self.recorder is not None:
            self.recorder(task, reason)
        if self.max_steps is not None and steps > self.max_steps:
            self._livelock()
        if self._change_points:
            low = self._change_points.get(steps)
            if low is not None:
                task._priority = low
        runnable = self._runnable
        nxt = self._pick() if len(runnable) > 1 else runnable[0]
        if nxt is not task:
            self._switch(task, nxt)

    def _livelock(self) -> None:
        self._fail(
            LivelockError(
                f"no end after {self.max_steps} steps (seed {self.seed}, strategy "
                f"{self.strategy}); last events:\n  " + "\n  ".join(self.event_log[-10:])
            )
        )
        raise _Killed

    def _block(self, task: Task, deadline: int | None) -> None:
        task._blocked = True
        self._runnable.remove(task)
        if self.recorder is not None:
            wq = task._waiting_on
            self.recorder(task, f"wake {wq.name if wq is not None else '?'}")
        if deadline is not None:
            task._deadline = deadline
            self._timed.append(task)
        nxt = self._pick_or_advance()
        if nxt is None:
            self._fail(self._deadlock())
            raise _Killed
        if nxt is not task:
            self._switch(task, nxt)

    def _wake(self, task: Task) -> None:
        if task._blocked and not task.done:
            task._blocked = False
            task._wait_reason = None
            if task._deadline is not None:
                self._timed.remove(task)
                task._deadline = None
            insort(self._runnable, task, key=_TID)

    def wake_task(self, task: Task) -> None:
        self._wake(task)

    def _wait_event(self, task, wq, cond, timeout_ns, interruptible, reason) -> bool:
        # The greenlet backend tests ``cond`` without the queue's lock: its tasks share one
        # OS thread, which already owns that (reentrant) lock whichever task takes it, and
        # no task runs but the one testing.
        lock = None if self._greenlets else wq.lock
        if task._touched is not None:
            task._touched.add(wq.name)
        if lock is None:
            if cond():
                return True
        else:
            with lock:
                if cond():
                    return True
        if timeout_ns == 0:
            return False
        if interruptible and task.signal_pending:
            raise Erestartsys(msg=f"signal pending while waiting on {wq.name}")
        if self._aborting:
            raise _Killed
        if timeout_ns is None:
            deadline = None
        else:
            deadline = self._now + timeout_ns
            if task._touched is not None:
                task._touched.add(CLOCK)
        task._waiting_on = wq
        reason = reason or f"wait {wq.name}"
        try:
            while True:
                task._wait_reason = reason
                wq._det_waiters.append(task)
                self._block(task, deadline)
                if deadline is not None and task._touched is not None:
                    # the step after a timed wait depends on the clock: the clock passing
                    # its deadline (advance(), or the jump when every task was blocked) may
                    # be what woke it, and it compares the two
                    task._touched.add(CLOCK)
                if lock is None:
                    if cond():
                        return True
                else:
                    with lock:
                        if cond():
                            return True
                if interruptible and task.signal_pending:
                    raise Erestartsys(msg=f"signal pending while waiting on {wq.name}")
                if deadline is not None and self._now >= deadline:
                    return False
        finally:
            task._wait_reason = None
            task._waiting_on = None
            if task in wq._det_waiters:
                wq._det_waiters.remove(task)

    # Reports.

    def _deadlock(self) -> DeadlockError:
        lines = [
            f"deadlock: no task can run and no timed wait is pending "
            f"(step {self.steps}, seed {self.seed}, strategy {self.strategy})"
        ]
        lines += [describe_task(t) for t in self.tasks if not t.done]
        lines.append(f"replay: {self.replay_hint}")
        return DeadlockError("\n".join(lines))


def round_robin(cur: Task, runnable: list[Task]) -> Task:
    """``cur`` if it can go on, else the runnable task after it in tid order (wrapping)."""
    if cur in runnable:
        return cur
    return next((t for t in runnable if t.tid > cur.tid), runnable[0])


def _priority(task: Task) -> float:
    return task._priority


_TID = attrgetter("tid")


def describe_task(task: Task) -> str:
    """One line: the task, the locks it holds (oldest first) and what it waits for."""
    # A lock's lockdep entry is pushed before its owner blocks on it; that one is waited for.
    waiting_on = task._waiting_on
    held = (
        ", ".join(
            _lock_name(h.lock)
            for h in task.held_locks
            if waiting_on is None or getattr(h.lock, "wq", None) is not waiting_on
        )
        or "nothing"
    )
    state = f"waits for {task.wait_reason}" if task.wait_reason else "runnable"
    return f"  task {task.tid} {task.name!r}: holds {held}; {state}"


def _lock_name(lock: object) -> str:
    return getattr(lock, "name", None) or repr(lock)


_DEFAULT = FreeRunning()
