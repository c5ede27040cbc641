"""DOC: drm_sched, the GPU job scheduler: dependencies in, ordered hardware submission out.

A driver owns one :class:`DrmGpuScheduler` per hardware ring and one :class:`DrmSchedEntity`
per submission queue of a client. A job's life:

1. :func:`job_init` binds it to an entity; the job may still be abandoned with
   :func:`job_cleanup`.
2. Dependencies are added (:func:`job_add_dependency`, :func:`job_add_implicit_dependencies`
   while the buffers' reservation locks are held).
3. :func:`job_arm` is the point of no return: it assigns the seqno and creates the
   ``scheduled`` and ``finished`` fences. ``finished`` is what goes into every ``dma_resv``.
4. :func:`entity_push_job` queues it. Arm and push must run under one per-entity lock, so
   that queue order is seqno order.

Usage::

    sched = drm_sched.init(ops, name="ring0", credit_limit=16, timeout_ns=500_000_000)
    entity = drm_sched.entity_init(DrmSchedPriority.NORMAL, [sched])
    job = MyJob()
    drm_sched.job_init(job, entity, 1, owner=None)
    with entity_lock:
        drm_sched.job_arm(job)
        dma_resv.add_fence(bo.resv, job.s_fence.finished, DmaResvUsage.WRITE)
        drm_sched.entity_push_job(job)
    ...
    drm_sched.entity_destroy(entity)
    drm_sched.fini(sched)

The scheduler runs a worker task. It picks the entity whose head job was pushed first (the
kernel's FIFO policy, highest priority first), waits for the job's dependencies, calls
``ops.run_job(job)`` and ties the returned hardware fence to ``finished``. When no hardware
fence signals within ``timeout_ns`` of the oldest running job, it calls
``ops.timedout_job(job)``, the driver's reset path; finished jobs are handed to
``ops.free_job(job)``, in which the driver calls :func:`job_cleanup`.

The model checks the submission contract: an armed job that is cleaned up instead of pushed,
jobs pushed out of arm order, two tasks arming or pushing on one entity at the same time, and a
push to a killed entity all warn.

Model differences from the kernel: a dependency on another job of the same scheduler waits for
its ``finished`` fence (the kernel only waits for ``scheduled`` and relies on in-order rings);
jobs of a killed entity are cancelled in queue order without waiting for their dependencies; a
job the timeout handler took off the pending list and that the driver neither restarted nor
freed is put back at the head so that ``free_job`` still runs once it finishes.
"""

from __future__ import annotations

import errno
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from enum import IntEnum
from typing import Any

from gemu.guest.dma_buf import dma_fence, dma_resv
from gemu.guest.dma_buf.dma_fence import MAX_SCHEDULE_TIMEOUT, DmaFence, DmaFenceCb
from gemu.guest.dma_buf.dma_resv import DmaResv, DmaResvUsage
from gemu.guest.errors import Einval, Enoent, Enomem, KernelError, warn_on
from gemu.guest.kernel import runtime
from gemu.guest.locking import lockdep
from gemu.guest.mm.gfp import GFP_KERNEL

log = logging.getLogger(__name__)

_SIGNALED = int(dma_fence.DmaFenceFlag.SIGNALED)


class DrmSchedPriority(IntEnum):
    """Entity priorities; lower is served first. Kernel: enum drm_sched_priority"""

    KERNEL = 0
    HIGH = 1
    NORMAL = 2
    LOW = 3


DRM_SCHED_PRIORITY_COUNT = 4
_PRIORITY_NORMAL = DrmSchedPriority.NORMAL


class DrmGpuSchedStat(IntEnum):
    """What ``timedout_job`` reports. Kernel: enum drm_gpu_sched_stat"""

    NONE = 0
    RESET = 1
    """The GPU was reset (named NOMINAL before v6.17)."""
    ENODEV = 2
    """The device is gone; the timeout is not rearmed."""
    NO_HANG = 3
    """False alarm: the job is still running and goes back on the pending list."""


DrmGpuSchedStat.NOMINAL = DrmGpuSchedStat.RESET


class DrmSchedBackendOps:
    """The driver's side of the scheduler. Kernel: struct drm_sched_backend_ops

    ``run_job`` returns the hardware fence (None: already done) or raises a
    :class:`KernelError` to fail the job with that errno. ``prepare_job`` may return one more
    fence to wait for before running.
    """

    def prepare_job(self, job: DrmSchedJob, entity: DrmSchedEntity) -> DmaFence | None:
        return None

    def run_job(self, job: DrmSchedJob) -> DmaFence | None:
        raise NotImplementedError

    def timedout_job(self, job: DrmSchedJob) -> DrmGpuSchedStat:
        raise NotImplementedError

    def free_job(self, job: DrmSchedJob) -> None:
        job_cleanup(job)


class _SchedFenceOps(dma_fence.DmaFenceOps):
    def __init__(self, sched: DrmGpuScheduler, kind: str) -> None:
        self.sched = sched
        self.kind = kind

    def get_driver_name(self, fence: DmaFence) -> str:
        return "drm_sched"

    def get_timeline_name(self, fence: DmaFence) -> str:
        return f"{self.sched.name}:{self.kind}"


class DrmSchedFence:
    """The two fences of a job. Kernel: struct drm_sched_fence

    ``scheduled`` signals when the job is handed to the hardware, ``finished`` when it
    completes; both are None until :func:`job_arm`. ``parent`` is the hardware fence.
    """

    __slots__ = ("finished", "owner", "parent", "sched", "scheduled")

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.scheduled: DmaFence | None = None
        self.finished: DmaFence | None = None
        self.parent: DmaFence | None = None
        self.sched: DrmGpuScheduler | None = None


class _JobState(IntEnum):
    NEW = 0
    INITIALIZED = 1
    ARMED = 2
    PUSHED = 3
    CLEANED = 4


# Enum members as module constants for the per-job paths: reading a member through its class
# costs several times a global's lookup, and a job passes these checks a dozen times.
_NEW = _JobState.NEW
_INITIALIZED = _JobState.INITIALIZED
_ARMED = _JobState.ARMED
_PUSHED = _JobState.PUSHED
_CLEANED = _JobState.CLEANED


class DrmSchedJob(DmaFenceCb):
    """A unit of GPU work; drivers subclass it. Kernel: struct drm_sched_job

    ``dependencies`` maps a fence context to the one fence of that context the job waits for
    (the latest added). ``credits`` is the ring space it needs while running. The job is its
    own fence callback slot :attr:`cb`, as the kernel embeds ``struct dma_fence_cb cb`` in
    the job and its callbacks find the job with container_of(): a callback's ``cb`` is the
    job.
    """

    def __init__(self) -> None:
        self.func = None  # the callback slot's fields (DmaFenceCb.__init__, spelled out)
        self.queued = False
        self.sched: DrmGpuScheduler | None = None
        self.entity: DrmSchedEntity | None = None
        self.s_fence: DrmSchedFence | None = None
        self.credits = 0
        self.id = 0
        self.s_priority = _PRIORITY_NORMAL
        self.karma = 0
        self.submit_ts = 0
        self.dependencies: dict[int, DmaFence] = {}
        self._state = _NEW
        self._armed_by: runtime.Task | None = None
        self._submit_seq = 0

    def __repr__(self) -> str:
        seq = self.s_fence.finished.seqno if self.s_fence and self.s_fence.finished else "-"
        return f"<{type(self).__name__} id={self.id} seq={seq} {self._state.name}>"

    @property
    def cb(self) -> DrmSchedJob:
        """The job's fence callback slot (``&job->cb``): the job itself."""
        return self


class DrmSchedRq:
    """The entities of one priority on one scheduler. Kernel: struct drm_sched_rq"""

    def __init__(self, sched: DrmGpuScheduler, priority: int) -> None:
        self.sched = sched
        self.priority = priority
        self.entities: list[DrmSchedEntity] = []


class DrmSchedEntity:
    """A submission queue feeding one scheduler. Kernel: struct drm_sched_entity

    Invariants: ``job_queue`` holds pushed, not yet run jobs in push order, which is seqno
    order; ``fence_context`` is the ``scheduled`` timeline and ``fence_context + 1`` the
    ``finished`` one; ``fence_seq`` is the seqno of the last armed job; ``dependency`` is the
    fence the head job is waiting for, if any.
    """

    def __init__(
        self,
        priority: DrmSchedPriority,
        sched_list: Sequence[DrmGpuScheduler],
        guilty: list[int] | None = None,
    ) -> None:
        self.priority = priority
        self.sched_list = list(sched_list)
        self.rq: DrmSchedRq | None = None
        self.guilty = guilty
        self.job_queue: deque[DrmSchedJob] = deque()
        self.fence_context = dma_fence.context_alloc(2)
        self.fence_seq = 0
        self.dependency: DmaFence | None = None
        self.cb = DmaFenceCb()
        self.last_scheduled: DmaFence | None = None
        self.stopped = False
        self._armed: list[DrmSchedJob] = []
        self._pushing: runtime.Task | None = None
        self._last_pushed_seq = 0

    def __repr__(self) -> str:
        return f"<DrmSchedEntity ctx={self.fence_context} queued={len(self.job_queue)}>"


class DrmGpuScheduler:
    """One hardware ring's scheduler. Kernel: struct drm_gpu_scheduler

    Invariants: ``pending_list`` holds the jobs handed to the hardware and not yet freed, in
    run order; ``credit_count`` is the sum of credits of the jobs running on the hardware and
    never exceeds ``credit_limit``.
    """

    def __init__(
        self,
        ops: DrmSchedBackendOps,
        *,
        name: str,
        credit_limit: int,
        timeout_ns: int = MAX_SCHEDULE_TIMEOUT,
        hang_limit: int = 0,
        num_rqs: int = DRM_SCHED_PRIORITY_COUNT,
    ) -> None:
        self.ops = ops
        self.name = name
        self.credit_limit = credit_limit
        self.credit_count = 0
        self.timeout = timeout_ns
        self.hang_limit = hang_limit
        self.num_rqs = num_rqs
        self.sched_rq = [DrmSchedRq(self, p) for p in range(num_rqs)]
        self.pending_list: list[DrmSchedJob] = []
        self.job_list_lock = threading.Lock()
        self.job_id_count = itertools.count(1)
        # one ops object per timeline kind, shared by every job's fences (as the kernel's
        # drm_sched_fence_ops_scheduled/_finished are static)
        self.scheduled_ops = _SchedFenceOps(self, "scheduled")
        self.finished_ops = _SchedFenceOps(self, "finished")
        self.pause_submit = False
        self.free_guilty = False
        self.ready = False
        self.wake = runtime.WaitQueue(f"{name}.wake")
        self.job_scheduled = runtime.WaitQueue(f"{name}.job_scheduled")
        self._tdr_deadline: int | None = None
        self._tdr_work: list[Callable[[], None]] = []
        """Work queued on the timeout workqueue (:func:`queue_tdr_work`), run in order with
        the job timeouts."""
        self._stop_requested = False
        self._worker: runtime.Task | None = None
        # Historical variants of drm_sched a driver mutant switches back on (never in normal
        # use; gemu.guest.gemu_drv.job.Mutant, host/explore/bugs.py).
        self.reinsert_on_false_timeout = True
        """A job whose timedout_job said NO_HANG goes back on the pending list (v6.17's
        drm_sched_job_reinsert_on_false_timeout(); before it each driver had to re-add it)."""
        self.kill_waits_for_deps = True
        """A killed job waits for its dependencies before its fences signal (0b10ab80695d
        "drm/sched: Avoid data corruptions")."""
        self.kill_signals_scheduled = True
        """A killed job's scheduled fence is signalled too (471db2c2d4f8 "drm/scheduler:
        signal scheduled fence when kill job")."""
        self.kill_puts_failed_prev = True
        """drm_sched_entity_kill() puts the previous fence when adding the kill callback to it
        failed (a952f1ab6968 "drm/sched: Fix fence reference count leak")."""
        self.resv_dep_error_puts = False
        """drm_sched_job_add_resv_dependencies() puts the fence again when adding it failed
        (before 5801e65206b0): a double put."""

    def __repr__(self) -> str:
        return f"<DrmGpuScheduler {self.name} pending={len(self.pending_list)}>"


_submit_counter = itertools.count(1)


def _wake(wq: runtime.WaitQueue) -> None:
    # the queue's lock taken and dropped (a waiter between its test and its sleep has it),
    # by acquire()/release(): a with-block binds __enter__/__exit__ each time, and the worker
    # is woken about twice per job
    lock = wq.lock
    lock.acquire()
    lock.release()
    wq.wake_up_all()


def wakeup(sched: DrmGpuScheduler) -> None:
    """Kick the worker. Kernel: drm_sched_wakeup() [drivers/gpu/drm/scheduler/sched_main.c]"""
    _wake(sched.wake)


# --- scheduler lifecycle -------------------------------------------------------------------


def init(
    ops: DrmSchedBackendOps,
    *,
    name: str,
    credit_limit: int,
    timeout_ns: int = MAX_SCHEDULE_TIMEOUT,
    hang_limit: int = 0,
    num_rqs: int = DRM_SCHED_PRIORITY_COUNT,
) -> DrmGpuScheduler:
    """Create a scheduler and start its worker task.

    Kernel: drm_sched_init() [drivers/gpu/drm/scheduler/sched_main.c]

    Raises:
        Einval: ``num_rqs`` is out of range or ``credit_limit`` is not positive.
    """
    if not 0 < num_rqs <= DRM_SCHED_PRIORITY_COUNT or credit_limit <= 0:
        raise Einval(msg=f"num_rqs={num_rqs} credit_limit={credit_limit}")
    sched = DrmGpuScheduler(
        ops,
        name=name,
        credit_limit=credit_limit,
        timeout_ns=timeout_ns,
        hang_limit=hang_limit,
        num_rqs=num_rqs,
    )
    sched.ready = True
    sched._worker = runtime.spawn(_worker, sched, name=f"sched-{name}")
    return sched


def fini(sched: DrmGpuScheduler) -> None:
    """Stop the worker, detach every entity and free the jobs that finished.

    Unfinished jobs are cancelled through ``ops.cancel_job`` if the driver has it (v6.17),
    otherwise reported and left pending.

    Kernel: drm_sched_fini() [drivers/gpu/drm/scheduler/sched_main.c]
    """
    sched._stop_requested = True
    wakeup(sched)
    if sched._worker is not None:
        sched._worker.join()
        sched._worker = None
    for rq in sched.sched_rq:
        for entity in rq.entities:
            entity.stopped = True
    _wake(sched.job_scheduled)
    sched._tdr_deadline = None
    sched.ready = False
    # Finished jobs whose free work had not run yet are freed here; unfinished ones are
    # cancelled when the driver has cancel_job (v6.17), else reported and left alone.
    cancel = getattr(sched.ops, "cancel_job", None)
    with sched.job_list_lock:
        jobs, sched.pending_list = sched.pending_list, []
    leaked = []
    for job in reversed(jobs):
        if not dma_fence.test_signaled_flag(job.s_fence.finished):
            if cancel is None:
                leaked.append(job)
                continue
            cancel(job)
        sched.ops.free_job(job)
    if leaked:
        sched.pending_list = leaked[::-1]
        log.warning("%s: tearing down scheduler while jobs are pending", sched.name)


def wqueue_stop(sched: DrmGpuScheduler) -> None:
    """Stop running and freeing jobs. Kernel: drm_sched_wqueue_stop()"""
    sched.pause_submit = True


def wqueue_start(sched: DrmGpuScheduler) -> None:
    """Resume running and freeing jobs. Kernel: drm_sched_wqueue_start()"""
    sched.pause_submit = False
    wakeup(sched)


def stop(sched: DrmGpuScheduler, bad: DrmSchedJob | None) -> None:
    """Park the scheduler for a reset: detach hardware fences, keep unfinished jobs pending.

    Kernel: drm_sched_stop() [drivers/gpu/drm/scheduler/sched_main.c]

    Jobs whose hardware fence had not signaled lose it (their credits are returned); jobs that
    did finish are freed, except ``bad``, which the driver may still need.
    """
    wqueue_stop(sched)
    with sched.job_list_lock:
        if bad is not None and bad.sched is sched and bad not in sched.pending_list:
            sched.pending_list.insert(0, bad)
        jobs = list(reversed(sched.pending_list))
    for job in jobs:
        parent = job.s_fence.parent
        if parent is not None and dma_fence.remove_callback(parent, job.cb):
            dma_fence.put(parent)
            job.s_fence.parent = None
            _add_credits(sched, -job.credits)
            continue
        with sched.job_list_lock:
            sched.pending_list.remove(job)
        dma_fence.wait(job.s_fence.finished, False)
        if job is not bad:
            sched.ops.free_job(job)
        else:
            sched.free_guilty = True
    sched._tdr_deadline = None


def start(sched: DrmGpuScheduler, errno_: int = 0) -> None:
    """Restart after a reset: pending jobs without a hardware fence finish with an error.

    Kernel: drm_sched_start() [drivers/gpu/drm/scheduler/sched_main.c]

    ``errno_`` is the negative errno for the jobs the reset killed (-ECANCELED if 0); a job
    whose hardware fence already signalled finishes with that fence's own error.
    """
    with sched.job_list_lock:
        jobs = list(sched.pending_list)
    for job in jobs:
        _add_credits(sched, job.credits)
        parent = job.s_fence.parent
        if parent is None:
            _job_done(job, errno_ or -errno.ECANCELED)
            continue
        try:
            dma_fence.add_callback(parent, job.cb, _job_done_cb)
        except Enoent:
            # The hardware finished it before the reset: its own fence error is the truth (a
            # job that completed is innocent, whatever killed its neighbours).
            _job_done(job, parent.error)
    with sched.job_list_lock:
        _start_timeout(sched)
    wqueue_start(sched)


# --- entities ------------------------------------------------------------------------------


def entity_init(
    priority: DrmSchedPriority,
    sched_list: Sequence[DrmGpuScheduler],
    guilty: list[int] | None = None,
) -> DrmSchedEntity:
    """Create an entity feeding the first scheduler of ``sched_list``.

    Kernel: drm_sched_entity_init() [drivers/gpu/drm/scheduler/sched_entity.c]

    An empty ``sched_list`` gives an entity without a run queue (jobs fail with -ENOENT).
    ``guilty`` is a one-element list the driver sets to nonzero to cancel the entity's jobs.

    Raises:
        Einval: a scheduler in ``sched_list`` is None.
    """
    if any(s is None for s in sched_list):
        raise Einval(msg="sched_list holds None")
    entity = DrmSchedEntity(priority, sched_list, guilty)
    if entity.sched_list:
        sched = entity.sched_list[0]
        if priority >= sched.num_rqs:
            log.error("entity priority %d above num_rqs %d, using lowest", priority, sched.num_rqs)
            entity.priority = DrmSchedPriority(sched.num_rqs - 1)
        entity.rq = sched.sched_rq[entity.priority]
        entity.rq.entities.append(entity)
    return entity


def entity_is_idle(entity: DrmSchedEntity) -> bool:
    """Whether the entity has nothing queued. Kernel: drm_sched_entity_is_idle()"""
    return not entity.job_queue or entity.stopped


def entity_flush(entity: DrmSchedEntity, timeout_ns: int) -> int:
    """Wait up to ``timeout_ns`` for the entity's queued jobs to be handed to the hardware.

    Kernel: drm_sched_entity_flush() [drivers/gpu/drm/scheduler/sched_entity.c]

    Returns the time left (0 on timeout or without a run queue).
    """
    if entity.rq is None:
        return 0
    sched = entity.rq.sched
    start_ns = runtime.now_ns()
    forever = timeout_ns >= MAX_SCHEDULE_TIMEOUT
    ok = sched.job_scheduled.wait_event(
        lambda: entity_is_idle(entity), timeout_ns=None if forever else timeout_ns
    )
    if not ok:
        return 0
    return timeout_ns if forever else max(1, timeout_ns - (runtime.now_ns() - start_ns))


def _kill_job(job: DrmSchedJob) -> None:
    """Finish a killed job with -ESRCH once every dependency it still has signalled.

    Kernel: drm_sched_entity_kill_jobs_work() [drivers/gpu/drm/scheduler/sched_entity.c]:
    one dependency at a time, re-armed as a callback on the next until none is left, then
    scheduled and finished are signalled and the job freed. It runs as a work item (a task
    of its own, :func:`_kill_job_cb`), never inside the fence callback that woke it.
    """
    sched = job.sched
    if sched.kill_waits_for_deps:
        deps = job.dependencies
        while deps:
            f = deps.pop(next(iter(deps)))
            try:
                dma_fence.add_callback(f, job.cb, _kill_job_cb)
                return
            except Enoent:
                dma_fence.put(f)
    s_fence = job.s_fence
    if sched.kill_signals_scheduled:
        dma_fence.check_and_signal(s_fence.scheduled)
    if not dma_fence.test_signaled_flag(s_fence.finished):
        dma_fence.set_error(s_fence.finished, -errno.ESRCH)
    dma_fence.check_and_signal(s_fence.finished)
    sched.ops.free_job(job)


def _kill_job_cb(fence: DmaFence | None, cb: DmaFenceCb) -> None:
    """The fence a killed job waited for signalled (None: nothing to wait for): queue the
    kill work. Kernel: drm_sched_entity_kill_jobs_cb() (INIT_WORK + schedule_work)."""
    dma_fence.put(fence)
    runtime.spawn(_kill_job, cb, name="kill-jobs")  # cb is the job (container_of)


def entity_kill(entity: DrmSchedEntity) -> None:
    """Stop the entity and cancel its queued jobs with -ESRCH, in order, each once the job
    before it finished and its own dependencies signalled.

    Kernel: drm_sched_entity_kill() [drivers/gpu/drm/scheduler/sched_entity.c]
    """
    entity.stopped = True
    if entity.rq is not None and entity in entity.rq.entities:
        entity.rq.entities.remove(entity)
    if entity.job_queue and entity.dependency is not None:
        # The head job was waiting for this one: the kernel keeps every dependency in the
        # job's xarray until the job is freed, so the kill waits for it like the others.
        dep = entity.dependency
        entity.job_queue[0].dependencies.setdefault(-1, dma_fence.get(dep))
    prev = dma_fence.get(entity.last_scheduled)
    while entity.job_queue:
        job = entity.job_queue.popleft()
        finished = dma_fence.get(job.s_fence.finished)
        if prev is None:
            _kill_job_cb(None, job.cb)
        else:
            try:
                dma_fence.add_callback(prev, job.cb, _kill_job_cb)
            except Enoent:
                # before a952f1ab6968 ("drm/sched: Fix fence reference count leak") the
                # reference on prev was not put here
                _kill_job_cb(prev if job.sched.kill_puts_failed_prev else None, job.cb)
        prev = finished
    dma_fence.put(prev)


def entity_fini(entity: DrmSchedEntity) -> None:
    """Tear the entity down, cancelling what is still queued.

    Kernel: drm_sched_entity_fini() [drivers/gpu/drm/scheduler/sched_entity.c]
    """
    entity_kill(entity)
    dep = entity.dependency
    if dep is not None:
        # the reference is the callback's: dropped here only if the callback will not run
        # (it may have run, and put it, while remove_callback waited for the fence's lock)
        if dma_fence.remove_callback(dep, entity.cb):
            dma_fence.put(dep)
        entity.dependency = None
    dma_fence.put(entity.last_scheduled)
    entity.last_scheduled = None
    warn_on(entity._armed, f"entity torn down with armed, unpushed jobs {entity._armed!r}")


MAX_WAIT_SCHED_ENTITY_Q_EMPTY_NS = 1_000_000_000
"""How long an exiting process's file close waits for its entity's queue to drain before the
rest is killed. Kernel: MAX_WAIT_SCHED_ENTITY_Q_EMPTY, msecs_to_jiffies(1000)."""


def entity_destroy(entity: DrmSchedEntity, exiting: bool = False) -> None:
    """Flush, then tear down. Kernel: drm_sched_entity_destroy()

    A live process's close waits until every queued job was handed to the hardware (the
    kernel's wait_event_killable); ``exiting`` (the process is being killed: PF_EXITING)
    waits at most :data:`MAX_WAIT_SCHED_ENTITY_Q_EMPTY_NS`, and entity_fini kills what is
    still queued.
    """
    entity_flush(entity, MAX_WAIT_SCHED_ENTITY_Q_EMPTY_NS if exiting else MAX_SCHEDULE_TIMEOUT)
    entity_fini(entity)


# --- jobs ----------------------------------------------------------------------------------


MODEL_CHECK = "gemu model check, not a kernel WARN: "
"""Prefix of the contract checks the kernel states in kernel-doc but does not check itself
(drm_sched_entity_push_job(): arm and push under one per-entity lock, never in parallel):
gemu warns where a kernel would silently misorder the entity's timeline."""

LIFETIME_CHECK = "gemu lifetime check (KASAN's role): "
"""Prefix of the reports of a job used after ``free_job`` freed it: the kernel would read
freed memory (KASAN: slab-use-after-free); gemu warns and carries on without the job.
``gemu explore`` files these under the ``lifetime`` invariant."""

FENCE_ORDER_CHECK = "gemu fence-order check: "
"""Prefix of the reports of a job's fences signalled out of their order: ``finished``
before ``scheduled``, or before a dependency of the job (what a waiter on the job's
``scheduled`` fence, or on the memory its dependencies write, relies on). ``gemu explore``
files these under the ``fence-order`` invariant."""


def job_init(
    job: DrmSchedJob, entity: DrmSchedEntity, credits: int, owner: Any, drm_client_id: int = 0
) -> None:
    """Bind ``job`` to ``entity``; the job can still be abandoned with :func:`job_cleanup`.

    Kernel: drm_sched_job_init() [drivers/gpu/drm/scheduler/sched_main.c]

    Raises:
        Enoent: the entity has no run queue.
        Einval: ``credits`` is 0, or the entity is stopped.
    """
    if entity.rq is None:
        log.error("job_init: entity has no rq!")
        raise Enoent(msg="entity has no rq")
    if entity.stopped:
        raise Einval(msg="entity is stopped")
    if credits == 0:
        log.error("job_init: credits cannot be 0!")
        raise Einval(msg="credits cannot be 0")
    lockdep.might_alloc(GFP_KERNEL)
    job.entity = entity
    job.credits = credits
    job.s_fence = DrmSchedFence(owner)
    job.dependencies = {}
    job.sched = None
    job.id = 0
    job._state = _INITIALIZED


def job_arm(job: DrmSchedJob) -> None:
    """Assign the seqno and create the job's fences: the point of no return.

    Kernel: drm_sched_job_arm() [drivers/gpu/drm/scheduler/sched_main.c]
    Locking: the per-entity submission lock that :func:`entity_push_job` also runs under.

    After this the job must be pushed. The current task becomes the signal owner of
    ``finished`` until the push.
    """
    # The warnings' messages are formatted only when they fire: a job's repr costs more than
    # the rest of arm.
    if job.entity is None:
        warn_on(True, "job_arm without an entity (job_init failed or not called)")
    if job._state != _INITIALIZED:
        warn_on(True, f"job_arm on {job!r}: arm exactly once after init")
    runtime.preempt("drm_sched.job_arm")
    entity = job.entity
    me = runtime.current()
    if entity._armed:
        others = [j for j in entity._armed if j._armed_by is not me]
        if others:
            warn_on(
                True,
                MODEL_CHECK + f"job_arm on {entity!r} while another task has armed, unpushed "
                f"jobs {others!r}: arm and push must run under one per-entity lock",
            )
    sched = entity.rq.sched
    job.sched = sched
    job.s_priority = entity.priority
    job.id = next(sched.job_id_count)
    entity.fence_seq = (entity.fence_seq + 1) & 0xFFFFFFFF
    seq = entity.fence_seq
    s_fence = job.s_fence
    s_fence.sched = sched
    # drm_sched_fence_init(): both fences are initialised with one lock (the drm_sched_fence's
    # ``lock``; with inline fence locks, the scheduled fence's, dma_fence_spinlock())
    lock = threading.Lock()
    s_fence.scheduled = DmaFence(sched.scheduled_ops, entity.fence_context, seq, lock=lock)
    s_fence.finished = DmaFence(sched.finished_ops, entity.fence_context + 1, seq, lock=lock)
    s_fence.finished.signal_owner = me
    job._state = _ARMED
    job._armed_by = me
    entity._armed.append(job)


def entity_push_job(job: DrmSchedJob) -> None:
    """Queue an armed job; after this it may run, finish and be freed at any time.

    Kernel: drm_sched_entity_push_job() [drivers/gpu/drm/scheduler/sched_entity.c]
    Locking: the per-entity lock :func:`job_arm` ran under. Pushing out of arm order or from
    two tasks at once on one entity warns.
    """
    if job._state != _ARMED:
        warn_on(True, f"entity_push_job on {job!r}: push an armed job once")
    entity = job.entity
    me = runtime.current()
    if entity._pushing is not None and entity._pushing is not me:
        warn_on(
            True,
            MODEL_CHECK
            + f"entity_push_job: tasks {entity._pushing!r} and {me!r} push on {entity!r} in "
            "parallel",
        )
    entity._pushing = me
    try:
        runtime.preempt("drm_sched.entity_push_job")
        finished = job.s_fence.finished
        expected = (entity._last_pushed_seq + 1) & 0xFFFFFFFF
        if finished.seqno != expected:
            warn_on(
                True,
                MODEL_CHECK + f"entity_push_job: seqno {finished.seqno} pushed, {expected} "
                "expected: push out of arm order (arm and push must run under one per-entity "
                "lock)",
            )
        entity._last_pushed_seq = finished.seqno
        armed = entity._armed
        if armed:
            if armed[0] is job:
                del armed[0]
            elif job in armed:
                armed.remove(job)
        lockdep.fence_handed_off(finished)
        finished.signal_owner = None
        job.submit_ts = me.runtime.timestamp_ns()
        job._submit_seq = next(_submit_counter)
        job._state = _PUSHED
        if entity.stopped:
            warn_on(True, f"Trying to push to a killed entity {entity!r}")
            return
        entity.job_queue.append(job)
        # The kernel wakes the scheduler only for the first job of the queue
        # (spsc_queue_push() == 1): a job behind others changes nothing the worker waits for,
        # which is each entity's head. Checked after the append, so a head popped meanwhile
        # leaves this job first and it wakes the worker. Deterministic runs wake on every
        # push, as they always did: explore's schedules for a seed, and what its exhaustive
        # search counts as dependent, stay as they were.
        behind = len(entity.job_queue) > 1 and not me.runtime.deterministic
    finally:
        if entity._pushing is me:
            entity._pushing = None
    if not behind:
        wakeup(entity.rq.sched)


def job_cleanup(job: DrmSchedJob) -> None:
    """Release the job's fences and dependencies (from ``free_job``, or to abandon it).

    Kernel: drm_sched_job_cleanup() [drivers/gpu/drm/scheduler/sched_main.c]

    Abandoning an armed job that was never pushed is a contract violation: its ``finished``
    fence may already be in a reservation object and would never signal.
    """
    state = job._state
    if state == _CLEANED:
        warn_on(True, f"job_cleanup twice on {job!r}")
    s_fence = job.s_fence
    if s_fence is not None and s_fence.finished is not None:
        if s_fence.finished.flags & _SIGNALED:
            _check_fence_order(job, s_fence)
        dma_fence.put(s_fence.finished)
    deps = job.dependencies
    if deps:
        for fence in deps.values():
            dma_fence.put(fence)
        job.dependencies = {}
    job.s_fence = None if state != _ARMED else job.s_fence
    if job.entity is not None and job in job.entity._armed:
        job.entity._armed.remove(job)
    job._state = _CLEANED
    if state == _ARMED:
        warn_on(
            True,
            f"job_cleanup on {job!r}: an armed job must be pushed "
            "(drm_sched_job_arm() is the point of no return)",
        )


def _check_fence_order(job: DrmSchedJob, s_fence: DrmSchedFence) -> None:
    """A job freed with ``finished`` signalled: ``scheduled`` and every dependency it still
    holds must have signalled first."""
    if not s_fence.scheduled.flags & _SIGNALED:
        warn_on(
            True,
            FENCE_ORDER_CHECK + f"{job!r} freed with its finished fence signalled and its "
            "scheduled fence never signalled: a waiter on scheduled waits forever",
        )
    for dep in job.dependencies.values():
        if not dep.flags & _SIGNALED:
            warn_on(
                True,
                FENCE_ORDER_CHECK + f"{job!r} finished (error {s_fence.finished.error}) "
                f"before its dependency {dep!r}: what the job's fence protects may still "
                "be in use by that work",
            )
            return


#: Fault injection for the dependency table (True → -ENOMEM).
should_fail_alloc = None


def job_add_dependency(job: DrmSchedJob, fence: DmaFence | None) -> None:
    """Make the job wait for ``fence``; consumes the caller's reference.

    Kernel: drm_sched_job_add_dependency() [drivers/gpu/drm/scheduler/sched_main.c]

    One fence per context is kept, the later one.

    Raises:
        Enomem: the dependency table could not grow (the reference is dropped).
    """
    if fence is None:
        return
    entry = job.dependencies.get(fence.context)
    if entry is not None:
        if dma_fence.is_later(fence, entry):
            dma_fence.put(entry)
            job.dependencies[fence.context] = fence
        else:
            dma_fence.put(fence)
        return
    lockdep.might_alloc(GFP_KERNEL)
    hook = should_fail_alloc
    if hook is not None and hook(job):
        dma_fence.put(fence)
        raise Enomem(msg="job dependency table")
    job.dependencies[fence.context] = fence


def job_add_resv_dependencies(job: DrmSchedJob, resv: DmaResv, usage: DmaResvUsage) -> None:
    """Add every fence of ``resv`` with usage <= ``usage`` as a dependency.

    Kernel: drm_sched_job_add_resv_dependencies() [drivers/gpu/drm/scheduler/sched_main.c]
    Locking: caller holds ``resv`` (asserted).
    """
    dma_resv.assert_held(resv)
    for fence in dma_resv.for_each_fence(resv, usage):
        ref = dma_fence.get(fence)
        try:
            job_add_dependency(job, ref)
        except Enomem:
            if job.entity.rq.sched.resv_dep_error_puts:
                # before 5801e65206b0 ("drm/sched: Fix potential double free in
                # drm_sched_job_add_resv_dependencies"): a put of the reference the failed
                # drm_sched_job_add_dependency() already consumed
                dma_fence.put(ref)
            raise


def job_add_implicit_dependencies(job: DrmSchedJob, obj: Any, write: bool) -> None:
    """Add the implicit-sync fences of ``obj.resv``: a writer waits for readers too.

    Kernel: drm_sched_job_add_implicit_dependencies() [drivers/gpu/drm/scheduler/sched_main.c]
    Locking: caller holds ``obj.resv`` (asserted); call before adding the job's own fence.
    """
    job_add_resv_dependencies(job, obj.resv, dma_resv.usage_rw(write))


# --- the worker ----------------------------------------------------------------------------


def _can_queue(sched: DrmGpuScheduler, job: DrmSchedJob) -> bool:
    if job.credits > sched.credit_limit:
        # The kernel truncates oversized jobs so they still make progress.
        warn_on(True, f"{job!r}: credits {job.credits} exceed the limit {sched.credit_limit}")
        job.credits = sched.credit_limit
    return sched.credit_limit - sched.credit_count >= job.credits


def _entity_is_ready(entity: DrmSchedEntity) -> bool:
    if not entity.job_queue:
        return False
    dep = entity.dependency
    return dep is None or bool(dep.flags & _SIGNALED)


def _select_entity(sched: DrmGpuScheduler, peek: bool) -> DrmSchedEntity | None:
    """FIFO policy: the ready entity whose head job was pushed first, by priority.

    A ready entity that does not fit in the free credits blocks the others (fairness).
    """
    for rq in sched.sched_rq:
        best = None
        for entity in rq.entities:
            if entity.stopped or not _entity_is_ready(entity):
                continue
            if best is None or entity.job_queue[0]._submit_seq < best.job_queue[0]._submit_seq:
                best = entity
        if best is not None:
            head = best.job_queue[0]
            if peek:
                fits = sched.credit_limit - sched.credit_count >= min(
                    head.credits, sched.credit_limit
                )
                return best if fits else None
            return best if _can_queue(sched, head) else None
    return None


def _timeout_due(sched: DrmGpuScheduler) -> bool:
    deadline = sched._tdr_deadline
    return deadline is not None and runtime.now_ns() >= deadline


def _has_work(sched: DrmGpuScheduler) -> bool:
    # the clock is read last: with jobs to free or run it is not needed
    if sched._stop_requested or sched._tdr_work:
        return True
    if not sched.pause_submit:
        pending = sched.pending_list
        if pending and pending[0].s_fence.finished.flags & _SIGNALED:
            return True
        if _select_entity(sched, peek=True) is not None:
            return True
    return _timeout_due(sched)


def _worker(sched: DrmGpuScheduler) -> None:
    free_running = not runtime.current().runtime.deterministic

    def has_work() -> bool:
        return _has_work(sched)

    while True:
        # Free-running, work found already is taken without wait_event (whose first test
        # would find it) and without reading the clock for its timeout; deterministic runs
        # always wait_event, which records the queue for a search's dependencies.
        if not (free_running and _has_work(sched)):
            deadline = sched._tdr_deadline
            timeout = None if deadline is None else max(0, deadline - runtime.now_ns())
            sched.wake.wait_event(has_work, timeout_ns=timeout)
        if sched._stop_requested:
            return
        while sched._tdr_work:
            sched._tdr_work.pop(0)()
        if _timeout_due(sched):
            _job_timedout(sched)
        if sched.pause_submit:
            continue
        _free_finished_job(sched)
        _run_one(sched)


def resume_timeout(sched: DrmGpuScheduler, remaining_ns: int) -> None:
    """Re-arm the job timeout with ``remaining_ns`` left instead of a whole timeout; from a
    ``timedout_job`` that returns NO_HANG, the timer then fires once that time is up.

    Kernel: drm_sched_resume_timeout() [drivers/gpu/drm/scheduler/sched_main.c]
    """
    with sched.job_list_lock:
        sched._tdr_deadline = runtime.now_ns() + max(0, remaining_ns)


def queue_tdr_work(sched: DrmGpuScheduler, work: Callable[[], None]) -> None:
    """Run ``work`` on the scheduler's timeout workqueue: after the job timeout handler that
    may be running, never concurrently with one, even while the scheduler is stopped.

    Kernel: queue_work(sched->timeout_wq, ...): drivers share that ordered workqueue for
    their own resets, as panfrost_device_schedule_reset() queues panfrost_reset_work on
    pfdev->reset.wq, the timeout_wq it gives drm_sched_init().
    """
    sched._tdr_work.append(work)
    wakeup(sched)


def _entity_wakeup(entity: DrmSchedEntity, fence: DmaFence) -> None:
    """The dependency ``fence`` signalled. Kernel: drm_sched_entity_wakeup(), which puts the
    fence it was called for (the worker may already have moved on to the next dependency
    when a callback runs late, so ``entity.dependency`` is cleared only if it is this one)."""
    if entity.dependency is fence:
        entity.dependency = None
    dma_fence.put(fence)
    if entity.rq is not None:
        wakeup(entity.rq.sched)


def _job_dependency(job: DrmSchedJob, entity: DrmSchedEntity) -> DmaFence | None:
    if job.dependencies:
        context = next(iter(job.dependencies))
        return job.dependencies.pop(context)
    return job.sched.ops.prepare_job(job, entity)


def _entity_pop_job(entity: DrmSchedEntity) -> DrmSchedJob | None:
    if not entity.job_queue:
        return None
    job = entity.job_queue[0]
    while True:
        dep = _job_dependency(job, entity)
        if dep is None:
            break
        entity.dependency = dep
        try:
            dma_fence.add_callback(dep, entity.cb, lambda f, _cb, e=entity: _entity_wakeup(e, f))
        except Enoent:
            entity.dependency = None
            dma_fence.put(dep)
            continue
        return None
    if entity.guilty is not None and entity.guilty[0]:
        dma_fence.set_error(job.s_fence.finished, -errno.ECANCELED)
    dma_fence.put(entity.last_scheduled)
    entity.last_scheduled = dma_fence.get(job.s_fence.finished)
    entity.job_queue.popleft()
    return job


def _start_timeout(sched: DrmGpuScheduler) -> None:
    if sched.timeout != MAX_SCHEDULE_TIMEOUT and sched.pending_list and sched._tdr_deadline is None:
        sched._tdr_deadline = runtime.now_ns() + sched.timeout


def _run_one(sched: DrmGpuScheduler) -> None:
    """Pop one ready job and run it. Kernel: drm_sched_run_job_work() / drm_sched_main().

    ``ops.run_job`` runs inside a dma_fence signalling section: everything it does is needed
    to signal the job's finished fence (the DOC of dma_fence_begin_signalling), so an
    allocation, a reservation lock or a fence wait in a driver's run_job is reported. Mainline
    drm_sched does not annotate this path (Daniel Vetter's "use dma-fence annotations in main
    thread" patch was posted, the scheduler carries no annotation); gemu's stricter choice
    catches what that patch would have.
    """
    entity = _select_entity(sched, peek=False)
    if entity is None:
        return
    job = _entity_pop_job(entity)
    if job is None:
        return
    s_fence = job.s_fence
    lock = sched.job_list_lock
    lock.acquire()  # not a with-block: see _wake()
    try:
        sched.credit_count += job.credits
        sched.pending_list.append(job)
        _start_timeout(sched)
    finally:
        lock.release()
    # run_job is on the way from the pushed job to its finished fence's signal: annotated as a
    # signalling section (see _run_one's docstring for how this differs from mainline).
    cookie = lockdep.dma_fence_begin_signalling()
    try:
        error = 0
        try:
            fence = sched.ops.run_job(job)
        except KernelError as e:
            fence, error = None, -e.errno
        if fence is not None:
            s_fence.parent = dma_fence.get(fence)
        dma_fence.check_and_signal(s_fence.scheduled)
        if fence is not None:
            try:
                dma_fence.add_callback(fence, job, _job_done_cb)  # &job->cb: the job
            except Enoent:
                _job_done(job, fence.error)
        else:
            _job_done(job, error)
    finally:
        lockdep.dma_fence_end_signalling(cookie)
    _wake(sched.job_scheduled)


def _add_credits(sched: DrmGpuScheduler, delta: int) -> None:
    # The kernel's atomic_add/atomic_sub: hardware-fence callbacks run in other tasks.
    lock = sched.job_list_lock
    lock.acquire()  # not a with-block: see _wake()
    try:
        sched.credit_count += delta
    finally:
        lock.release()


def _job_done_cb(fence: DmaFence, cb: DmaFenceCb) -> None:
    _job_done(cb, fence.error)  # cb is the job (container_of)


def _job_done(job: DrmSchedJob, result: int) -> None:
    s_fence = job.s_fence
    sched = s_fence.sched
    lock = sched.job_list_lock  # _add_credits(sched, -job.credits), once per job
    lock.acquire()
    try:
        sched.credit_count -= job.credits
    finally:
        lock.release()
    finished = s_fence.finished
    if result and not finished.flags & _SIGNALED:
        dma_fence.set_error(finished, result)
    dma_fence.check_and_signal(finished)
    _wake(sched.wake)  # wakeup(sched)


def _free_finished_job(sched: DrmGpuScheduler) -> None:
    lock = sched.job_list_lock
    lock.acquire()  # not a with-block: see _wake()
    try:
        pending = sched.pending_list
        if not pending or not pending[0].s_fence.finished.flags & _SIGNALED:
            return
        job = pending.pop(0)
        sched._tdr_deadline = None
        if pending:
            pending[0].s_fence.scheduled.timestamp = job.s_fence.finished.timestamp
            _start_timeout(sched)
    finally:
        lock.release()
    sched.ops.free_job(job)


def _job_timedout(sched: DrmGpuScheduler) -> None:
    sched._tdr_deadline = None
    status = DrmGpuSchedStat.NONE
    with sched.job_list_lock:
        job = sched.pending_list.pop(0) if sched.pending_list else None
    if job is not None:
        job.karma += 1
        status = sched.ops.timedout_job(job)
        if job._state is _CLEANED:
            # the driver freed the job it was handed (only free_job may): everything below
            # and the scheduler's pending list would use freed memory
            warn_on(
                True,
                LIFETIME_CHECK + f"drm_sched_job_timedout: {job!r} used after the driver's "
                "timedout_job freed it",
            )
            with sched.job_list_lock:
                if job in sched.pending_list:
                    sched.pending_list.remove(job)
        elif sched.free_guilty:
            sched.free_guilty = False
            sched.ops.free_job(job)
        elif status != DrmGpuSchedStat.NO_HANG or sched.reinsert_on_false_timeout:
            with sched.job_list_lock:
                if job not in sched.pending_list:
                    sched.pending_list.insert(0, job)
    if status != DrmGpuSchedStat.ENODEV:
        with sched.job_list_lock:
            _start_timeout(sched)
    wakeup(sched)
