"""DOC: gemu GPU jobs and the submit path, which is the validation sequence.

A submit turns a command buffer plus a list of BOs into a :class:`GemuJob` pushed to the
driver's drm_sched scheduler. The order of the steps is the whole point (``docs/validation.md``
explains each step and what breaks when it moves)::

    1. drm_sched_job_init                     sched.job_init          may fail, still abortable
    2. drm_exec: lock every BO, reserve one   drm_exec.prepare_obj    may back off (-EDEADLK)
       fence slot on each
    3. validate each BO (resv held):          validate_bo()
         purged (madv < 0)  -> fail (-EINVAL) before anything is published
         evicted            -> drm_gem_shmem_swapin_locked   (allocates frames)
         drm_gem_shmem_get_pages_sgt_locked                  (frames for the page table)
         map into the GPU VM + TLB flush      vm.map_pages         (may allocate tables)
       add implicit dependencies              sched.job_add_implicit_dependencies
    4. under the entity's submit lock:
         drm_sched_job_arm                    point of no return: seqno, finished fence
         dma_fence_begin_signalling           the fence is about to be visible: from here
                                              nothing may allocate, lock a resv or wait
         dma_resv_add_fence(finished)         WRITE for written BOs, READ for read ones
         drm_sched_entity_push_job            the scheduler's run_job and the interrupt
         dma_fence_end_signalling             handler carry the section on to the signal
    5. drm_exec_fini                          unlock every BO

Deliberately wrong orders for the validation-order tests are chosen with :class:`SubmitOrder`
on the driver (``GemuDriver.order``); the default is :attr:`SubmitOrder.CORRECT` and nothing
but a test should change it. :class:`Mutant` (``GemuDriver(mutant=...)``, ``gemu explore
--mutant``) covers those orders plus wrong shrinker, idle-test, pinning and eviction variants.

``run_job`` binds the VM to an AS slot and writes the job's ring slot (SET_AS,
INDIRECT_BUFFER, FENCE) with a posted doorbell; ``free_job`` releases the slot, the command
buffer space and the BO references; ``timedout_job`` is the reset path.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum, IntFlag
from typing import TYPE_CHECKING, Any

from gemu.guest.dma_buf import dma_fence, dma_resv
from gemu.guest.dma_buf.dma_resv import DmaResvUsage
from gemu.guest.drm import drm_exec, gem_shmem
from gemu.guest.drm import sched as drm_sched
from gemu.guest.errors import Einval, Enodev, KernelError
from gemu.guest.locking import lockdep
from gemu.guest.mm.gfp import GFP_KERNEL

if TYPE_CHECKING:
    from gemu.guest.gemu_drv.uapi import GemuBo, GemuDriver, GemuFile

log = logging.getLogger("gemu.guest.gemu_drv")


class BoAccess(IntFlag):
    """How a job uses a BO (the uAPI's per-BO flags)."""

    READ = 1
    WRITE = 2


class SubmitOrder(Enum):
    """Where the submit path puts its steps. Only :attr:`CORRECT` is a working driver; the
    other values are the deliberately wrong orders the validation-order tests run."""

    CORRECT = "correct"
    FENCE_BEFORE_SWAPIN = "fence-before-swapin"
    """Arm and add the finished fence to the resvs before validating (Boris's draft order):
    swapin then allocates inside the fence signalling critical section."""
    FENCE_AFTER_UNLOCK = "fence-after-unlock"
    """Push and unlock first, add the fences afterwards: between unlock and the fence the BOs
    look idle and the shrinker may evict them under the running job."""
    ARM_BEFORE_FAILING_STEP = "arm-before-failing-step"
    """Arm before validating: a validation failure leaves an armed job that cannot be pushed."""
    NO_TLB_FLUSH = "no-tlb-flush"
    """Rewrite page tables without flushing the TLB (unmap at eviction, remap at swap-in)."""
    PUSH_OUTSIDE_ENTITY_LOCK = "push-outside-entity-lock"
    """Arm and add the fences under the entity's submit lock, push after dropping it: two
    tasks submitting on one entity can push out of arm order."""


class Mutant(Enum):
    """A deliberately wrong driver, for ``gemu explore`` and the validation-order tests.

    ``GemuDriver(mutant=...)`` (or ``Machine(mutant=...)``) switches one on; the default is
    :attr:`NONE`, the working driver. The submit-order mutants are the :class:`SubmitOrder`
    values of the same name; the others break the shrinker, its idle test or the driver's
    memory handling. docs/validation.md lists which invariant catches each.
    """

    NONE = "none"
    FENCE_AFTER_UNLOCK = "fence-after-unlock"
    FENCE_BEFORE_SWAPIN = "fence-before-swapin"
    ARM_BEFORE_FAILING_STEP = "arm-before-failing-step"
    PUSH_OUTSIDE_ENTITY_LOCK = "push-outside-entity-lock"
    NO_TLB_FLUSH = "no-tlb-flush"
    SHRINKER_SKIPS_BUSY = "shrinker-skips-busy"
    """The shrinker evicts without testing the object's fences (busy objects too)."""
    IDLE_READ_FENCES_BOOKKEEP = "idle-read-fences-bookkeep"
    """The idle test looks at fences up to READ (drm_gem_evict's default) while the driver
    adds its job fences as BOOKKEEP: a running job's BOs look idle."""
    CPU_MAP_GET_PAGES = "cpu-map-get-pages"
    """The command pool, written by the CPU through the frames it looked up once, takes its
    pages with get_pages where pin is needed: the shrinker may move them."""
    EVICT_FREES_BEFORE_UNMAP = "evict-frees-before-unmap"
    """The evict callback frees the frames first and unmaps them from the GPU VMs after."""
    SHRINKER_BLOCKING_LOCK = "shrinker-blocking-lock"
    """The shrinker's LRU walk takes each reservation lock with a blocking lock instead of a
    trylock: reclaim entered with a reservation held (a submit's swap-in) waits on locks
    whose holders may be waiting for memory."""
    PT_ALLOC_UNDER_LOCK = "pt-alloc-under-lock"
    """The GPU VM allocates page-table frames (GFP_KERNEL, may enter reclaim) while holding
    its page-table lock instead of preallocating them; the shrinker's evict path takes the
    same lock inside reclaim to unmap: a lock-order inversion against fs_reclaim."""
    RESET_ALLOCATES = "reset-allocates"
    """The reset path captures the GPU's crash state with a GFP_KERNEL allocation that may
    enter reclaim, inside the fence signalling section (reclaim may wait for the very fences
    the reset must signal): msm's recover_worker before "forbid mem reclaim from reset"."""
    MADVISE_LIST_ADD = "madvise-list-add"
    """madvise(DONTNEED) links the object at the tail of the evictable LRU without taking it
    off the list it is on (list_add_tail where list_move_tail is needed): panfrost's madvise
    ioctl before 9fc33eaaa979 "drm/panfrost: Fix shrinker list corruption by madvise IOCTL"
    (host/explore/bugs.py)."""
    # Historical bugs of GEM shmem, the GEM LRU, shrinkers and dma_resv (host/explore/bugs.py)
    GEM_LRU_REMOVE_UNLOCKED = "gem-lru-remove-unlocked"
    """drm_gem_lru_remove() reads ``obj->lru`` without the LRU lock and only then takes the
    lock it reached through that pointer: a drm_gem_lru_scan() may meanwhile have returned,
    and the pointer was its on-stack ``still_in_lru`` list. Before 379e8f1ca5e9 "drm/gem: Make
    the GEM LRU lock part of drm_device"."""
    SHRINKER_SCAN_TICKET = "shrinker-scan-ticket"
    """The shrinker's LRU walk starts a ww acquire context (``ticket``) of the reservation
    class for each object, inside fs_reclaim: msm's shrinker before 3392291fc509 "drm/msm: Fix
    shrinker deadlock"."""
    RESV_REPLACE_OLDER = "resv-replace-older"
    """dma_resv_add_fence() replaces a fence of the same context without checking that the new
    one is later: an imported older fence hides a newer, unsignalled one. Before a3f7c10a269d
    "dma-buf/dma-resv: check if the new fence is really later"."""
    VUNMAP_CLEARS_VADDR = "vunmap-clears-vaddr"
    """drm_gem_shmem_vunmap_locked() clears ``vaddr`` on every call, not only on the last:
    the next nested vmap gets a NULL mapping. Before dd7177627618 "drm/shmem-helper: Fix
    unsetting shmem vaddr while vmap refcount > 0"."""
    MMAP_ERRANT_PUT = "mmap-errant-put"
    """drm_gem_shmem_mmap()'s error path (getting the pages failed) drops a GEM reference it
    does not own: the object is freed while a handle still names it. Before 24013314be6e
    "drm/shmem-helper: Remove errant put in error path"."""
    # end of GEM shmem, the GEM LRU, shrinkers and dma_resv
    # Historical bugs of drm_sched and reset paths (host/explore/bugs.py)
    TDR_FREES_JOB = "tdr-frees-job"
    """The driver's timedout_job frees the job it was handed once the reset is done, while
    the scheduler still holds it on its pending list: xe's TDR before 82926f52d7a0
    "drm/xe: Don't free job in TDR"."""
    NO_HANG_DROPS_JOB = "no-hang-drops-job"
    """A timeout the driver finds spurious (the job's hardware fence already signalled)
    returns NO_HANG without putting the job back on the pending list, on a scheduler that
    leaves that to the driver (before v6.17): free_job never runs for it. v3d's skipped reset
    before 35e4079bf1a2 "drm/v3d: Add job to pending list if the reset was skipped"."""
    KILL_SKIPS_SCHEDULED = "kill-skips-scheduled"
    """Killing an entity signals each queued job's finished fence but not its scheduled one:
    drm_sched_entity_kill_jobs_work() before 471db2c2d4f8 "drm/scheduler: signal scheduled
    fence when kill job"."""
    KILL_SKIPS_DEPS = "kill-skips-deps"
    """Killing an entity finishes its queued jobs without waiting for their dependencies:
    drm_sched_entity_kill_jobs_cb() before 0b10ab80695d "drm/sched: Avoid data
    corruptions"."""
    DEP_ERROR_DOUBLE_PUT = "dep-error-double-put"
    """When drm_sched_job_add_dependency() fails (the dependency table cannot grow) the resv
    walk puts the fence again, though the failed call already consumed that reference:
    drm_sched_job_add_resv_dependencies() before 5801e65206b0 "drm/sched: Fix potential
    double free in drm_sched_job_add_resv_dependencies"."""
    KILL_LEAKS_PREV = "kill-leaks-prev"
    """Killing an entity, when adding the kill callback to the previous job's finished fence
    (or the entity's last_scheduled) fails because it already signalled, the reference taken
    on it is never put: drm_sched_entity_kill() before a952f1ab6968 "drm/sched: Fix fence
    reference count leak"."""
    # end of drm_sched and reset paths
    # The VM_BIND flavour's mutants (drm_gpuvm, VM_BIND, the per-VM shrinker)
    BIND_ALLOCATES_PT = "bind-allocates-pt"
    """The bind ioctl does not preallocate the page tables a map needs
    (panthor_vm_op_ctx_prealloc_pts() left out): the bind job allocates them with GFP_KERNEL in
    its run_job, in the fence signalling path, under the VM's ``op_lock``, which reclaim takes
    too. Caught by ``lockdep``: fs_reclaim taken under ``&vm->op_lock`` against the
    dma_fence_map annotation of the signalling path (an ``inversion`` report); under memory
    pressure the allocation can also fail there: the bind's out-fence carries the error
    (``job-error``) and a later job faults on the range (``gpu-fault``)."""
    FENCE_VM_RESV_ONLY = "fence-vm-resv-only"
    """The exec adds its job fence to the VM's resv only (a dma_resv_add_fence() on
    drm_gpuvm_resv() where drm_gpuvm_resv_add_fence() is needed): the VM-private BOs are
    covered, the external BOs the job uses look idle, and reclaim evicts one under the running
    job. Caught by ``gpu-fault`` (the job reaches the unmapped range) or ``content``."""
    VALIDATE_SKIPS_OTHER_VM = "validate-skips-other-vm"
    """vm_bo_validate() skips a vm_bo whose BO is already resident again (swapped in by
    another VM's exec, or by a CPU fault, after an eviction) and only clears its ``evicted``
    flag: this VM's mappings of it keep no PTEs (panthor_vm_restore_vmas() not run). Caught by
    ``gpu-fault``: the next job on this VM faults on a VA it has bound."""
    EVICT_MARKS_ONE_VM = "evict-marks-one-vm"
    """Reclaim evicts a BO mapped in several VMs after marking it evicted and clearing its
    PTEs in one VM only (drm_gpuvm_bo_evict() on one vm_bo where drm_gpuvm_bo_gem_evict()
    walks them all): the other VMs' page tables still map the frames it frees. Caught by
    ``mapped-free`` (a frame freed while a GPU page table maps it), or by ``gpu-fault`` /
    ``content`` when the stale mapping is used."""
    GPUVM_FENCE_BEFORE_VALIDATE = "gpuvm-fence-before-validate"
    """drm_sched_job_arm() and drm_gpuvm_resv_add_fence() before drm_gpuvm_validate(): the
    swap-in of an evicted BO allocates frames inside the signalling section the published
    fence opened. Caught by ``signalling`` (a reclaimable allocation inside a dma_fence
    signalling critical section) once lockdep knows fs_reclaim -> dma_fence_map, or by
    ``kernel-warning`` when the validation fails after arm (the armed job is never pushed and
    the entity's next push is out of arm order)."""
    GPUVM_FENCE_AFTER_UNLOCK = "gpuvm-fence-after-unlock"
    """Push and drm_gpuvm_exec_unlock() first, drm_gpuvm_resv_add_fence() afterwards under a
    new lock: in between, the BOs the job uses look idle and reclaim evicts them under it.
    Caught by ``gpu-fault``, ``content`` or ``kernel-warning`` (the job already ran and was
    freed when its late fence is added)."""
    GPUVM_ARM_BEFORE_VALIDATE = "gpuvm-arm-before-validate"
    """drm_sched_job_arm() before drm_gpuvm_validate(): a swap-in that fails (-ENOMEM) after
    the point of no return leaves an armed job that cannot be pushed and is cleaned up
    anyway. Caught by ``kernel-warning`` (drm_sched's "an armed job must be pushed")."""
    # end of the VM_BIND flavour's mutants

    @property
    def order(self) -> SubmitOrder:
        """The submit order this mutant runs (CORRECT for the non-submit mutants)."""
        try:
            return SubmitOrder(self.value)
        except ValueError:
            return SubmitOrder.CORRECT


# Enum members as module constants for the submit path: reading a member through its class
# costs several times a global's lookup, and every submit tests the order half a dozen times.
_FENCE_BEFORE_SWAPIN = SubmitOrder.FENCE_BEFORE_SWAPIN
_FENCE_AFTER_UNLOCK = SubmitOrder.FENCE_AFTER_UNLOCK
_ARM_BEFORE_FAILING_STEP = SubmitOrder.ARM_BEFORE_FAILING_STEP
_PUSH_OUTSIDE_ENTITY_LOCK = SubmitOrder.PUSH_OUTSIDE_ENTITY_LOCK
_IDLE_READ_FENCES_BOOKKEEP = Mutant.IDLE_READ_FENCES_BOOKKEEP
_USAGE_BOOKKEEP = DmaResvUsage.BOOKKEEP
_USAGE_WRITE = DmaResvUsage.WRITE
_USAGE_READ = DmaResvUsage.READ


@dataclass
class BoRef:
    """One BO of a job and how the job uses it."""

    bo: GemuBo
    access: BoAccess

    @property
    def write(self) -> bool:
        return bool(self.access & BoAccess.WRITE)


class GemuJob(drm_sched.DrmSchedJob):
    """A gemu GPU job. Kernel: struct panfrost_job.

    ``ib_va``/``ib_dwords`` locate the command buffer in the file's VM; ``hw_fence`` is the
    ring fence once ``run_job`` ran; ``message`` says why the job failed.
    """

    def __init__(
        self, file: GemuFile, refs: list[BoRef], ib_va: int, ib_dwords: int, cmd_chunk: Any
    ) -> None:
        # panfrost_ioctl_submit(): kzalloc(sizeof(*job), GFP_KERNEL), and the BO and in-fence
        # arrays (drm_gem_objects_lookup's kvmalloc_array, GFP_KERNEL)
        lockdep.might_alloc(GFP_KERNEL)
        super().__init__()
        self.file = file
        self.vm = file.vm
        self.refs = refs
        self.ib_va = ib_va
        self.ib_dwords = ib_dwords
        self.cmd_chunk = cmd_chunk
        self.hw_fence = None
        self.message = ""
        self.pushed_failed: KernelError | None = None
        self.as_held = False
        self.in_fences: Sequence[dma_fence.DmaFence] = ()
        self.fence: dma_fence.DmaFence | None = None
        self.out_fence: Any = None  # the file's JobFence, told when the job is freed


@dataclass
class SubmitHooks:
    """Points where a test can act in the middle of a submit (fault injection, like the
    kernel's fail_function). Empty in normal use."""

    after_unlock: list[Callable[[GemuJob], None]] = field(default_factory=list)
    """Run by the FENCE_AFTER_UNLOCK order between unlock and the late fence (the window
    that order opens); the right order has no such point."""


def validate_bo(drv: GemuDriver, job: GemuJob, ref: BoRef) -> None:
    """Make one BO resident and mapped in the job's VM. Caller holds ``bo.resv``.

    Kernel: the validation step of a submit (panfrost_job_push's lookup + the v19 flow:
    drm_gem_shmem_swapin_locked, drm_gem_shmem_get_pages_sgt_locked, panfrost_mmu_map).
    """
    bo = ref.bo
    obj = bo.obj
    dma_resv.assert_held(obj.resv)
    if obj.madv < 0:
        raise Einval(
            msg=f"BO {bo.name} was purged by the shrinker (madvise DONTNEED): its contents are "
            "gone, it cannot be used by a job"
        )
    gem_shmem.swapin_locked(obj)
    pfns = gem_shmem.get_pages_sgt_locked(obj).pfns
    mapping = bo.mapping(job.vm)
    if mapping is None:
        raise Einval(msg=f"BO {bo.name} is not bound in this file's GPU VM (vm_bind it first)")
    if not mapping.mapped:
        job.vm.map_pages(mapping.va, [pfn << 12 for pfn in pfns], mapping.prot)
        mapping.mapped = True


def _usage(ref: BoRef, drv: GemuDriver | None = None) -> DmaResvUsage:
    if drv is not None and drv.mutant is _IDLE_READ_FENCES_BOOKKEEP:
        return _USAGE_BOOKKEEP
    return _USAGE_WRITE if ref.write else _USAGE_READ


def submit(drv: GemuDriver, job: GemuJob) -> dma_fence.DmaFence:
    """Run the validation sequence for ``job`` and push it; returns its finished fence with a
    reference the caller owns (drop it with ``dma_fence.put``).

    Kernel: panfrost_ioctl_submit() → panfrost_job_push(), with the steps in the order
    documented in docs/validation.md (or a deliberately wrong :class:`SubmitOrder`).
    On failure before arm the job is cleaned up and the error raised; nothing was published.
    """
    order = drv.order
    entity = job.file.entity
    try:
        drm_sched.job_init(job, entity, 1, owner=job.file)
    except BaseException:
        drv.release_job_resources(job)
        raise
    armed = False
    objs = [r.bo.obj for r in job.refs]
    # The orders that arm before validating hold the entity's submit lock from arm to push,
    # as a driver must around arm + push; it is dropped before any failure path runs.
    early = order is _FENCE_BEFORE_SWAPIN or order is _ARM_BEFORE_FAILING_STEP
    submit_lock = job.file.submit_lock
    section: bool | None = None  # the signalling cookie once the fences are published
    try:
        for fence in job.in_fences:
            drm_sched.job_add_dependency(job, dma_fence.get(fence))
        with drm_exec.init(drm_exec.DRM_EXEC_INTERRUPTIBLE_WAIT, len(objs)) as ex:
            for attempt in drm_exec.until_all_locked(ex):
                with attempt:
                    for obj in objs:
                        drm_exec.prepare_obj(ex, obj, 1)
                        drm_exec.retry_on_contention(ex)
            if early:
                submit_lock.lock()
            try:
                if early:
                    _arm(drv, job)
                    armed = True
                    if order is _FENCE_BEFORE_SWAPIN:
                        section = lockdep.dma_fence_begin_signalling()
                        _add_fences(drv, job)
                for ref in job.refs:
                    validate_bo(drv, job, ref)
                    drm_sched.job_add_implicit_dependencies(job, ref.bo.obj, ref.write)
                if order is _FENCE_AFTER_UNLOCK:
                    with submit_lock:
                        _arm(drv, job)
                        armed = True
                        drm_sched.entity_push_job(job)
                else:
                    if not early:  # (early: held since arm)
                        submit_lock.lock()
                    try:
                        if not armed:
                            _arm(drv, job)
                            armed = True
                        if order is not _FENCE_BEFORE_SWAPIN:
                            section = lockdep.dma_fence_begin_signalling()
                            _add_fences(drv, job)
                        if order is not _PUSH_OUTSIDE_ENTITY_LOCK:
                            drm_sched.entity_push_job(job)
                    finally:
                        if not early:
                            submit_lock.unlock()
                    if order is _PUSH_OUTSIDE_ENTITY_LOCK:
                        drm_sched.entity_push_job(job)
            finally:
                # The submitter's part of the section ends with the push: the job now
                # belongs to the scheduler, whose run_job path carries it on.
                if section is not None:
                    lockdep.dma_fence_end_signalling(section)
                    section = None
                if early:
                    submit_lock.unlock()
        # drm_exec_fini: every BO unlocked here
        if order is _FENCE_AFTER_UNLOCK:
            for hook in drv.hooks.after_unlock:
                hook(job)
            _add_fences_relocking(drv, job)
    except BaseException as exc:
        _submit_failed(drv, job, armed, exc)
        dma_fence.put(job.fence)  # the submit's reference: no out-fence will take it over
        job.fence = None
        raise
    # Not job.s_fence.finished: once pushed and unlocked the job may already have run and been
    # freed (free_job drops s_fence and its reference); job.fence is the submit's own.
    return job.fence


def _arm(drv: GemuDriver, job: GemuJob) -> None:
    drm_sched.job_arm(job)
    # panfrost_job_push(): job->render_done_fence = dma_fence_get(&s_fence->finished). The
    # submit holds this reference across the push (the job may be freed meanwhile) until its
    # out-fence has taken one of its own.
    job.fence = dma_fence.get(job.s_fence.finished)


def _add_fences(drv: GemuDriver, job: GemuJob) -> None:
    """dma_resv_add_fence(finished) on every BO; the slots were reserved while locking."""
    finished = job.s_fence.finished
    for ref in job.refs:
        dma_resv.add_fence(ref.bo.obj.resv, finished, _usage(ref, drv))


def _add_fences_relocking(drv: GemuDriver, job: GemuJob) -> None:
    """The FENCE_AFTER_UNLOCK mutant: lock each BO again to add the fence, too late."""
    finished = job.fence  # the job may already have run and been freed
    for ref in job.refs:
        resv = ref.bo.obj.resv
        dma_resv.lock(resv, None)
        try:
            dma_resv.reserve_fences(resv, 1)
            dma_resv.add_fence(resv, finished, _usage(ref, drv))
        finally:
            dma_resv.unlock(resv)


def _submit_failed(drv: GemuDriver, job: GemuJob, armed: bool, exc: BaseException) -> None:
    """Undo a failed submit. Before arm: drm_sched_job_cleanup and drop the references.

    After arm the job must still be pushed (arm is the point of no return); the correct order
    never fails there. The ARM_BEFORE_FAILING_STEP mutant does what a buggy driver does and
    cleans the armed job up, which drm_sched reports.
    """
    if armed and drv.order is not SubmitOrder.ARM_BEFORE_FAILING_STEP:
        if job._state == drm_sched._JobState.ARMED:
            # keep the scheduler consistent: push the job as failed
            job.pushed_failed = (
                exc if isinstance(exc, KernelError) else KernelError(errno.EIO, str(exc))
            )
            job.message = f"submit failed after arm: {exc}"
            with job.file.submit_lock:
                drm_sched.entity_push_job(job)
        return
    drv.release_job_resources(job)
    drm_sched.job_cleanup(job)


class GemuSchedOps(drm_sched.DrmSchedBackendOps):
    """The driver's scheduler backend. Kernel: panfrost_sched_ops."""

    def __init__(self, drv: GemuDriver) -> None:
        self.drv = drv

    def run_job(self, job: GemuJob) -> dma_fence.DmaFence | None:
        """Kernel: panfrost_job_run() — bind the AS and write the ring slot."""
        if job.pushed_failed is not None:
            raise job.pushed_failed
        finished = job.s_fence.finished
        if finished.error:
            return None  # cancelled (guilty entity, reset)
        drv = self.drv
        try:
            as_nr = drv.gpu.mmu.as_get(job.vm)
            job.as_held = True
            fence = drv.gpu.emit_job(as_nr, job.ib_va, job.ib_dwords)
        except (ConnectionError, OSError) as exc:  # the device is gone (DeviceGone)
            job.message = f"GPU device lost: {exc}"
            raise Enodev(msg=job.message) from exc
        job.hw_fence = fence
        return fence

    def timedout_job(self, job: GemuJob) -> drm_sched.DrmGpuSchedStat:
        """Kernel: panfrost_job_timedout() — reset the GPU, resubmit the innocent jobs."""
        status = self.drv.recover(job)
        if self.drv.mutant is Mutant.TDR_FREES_JOB and status == drm_sched.DrmGpuSchedStat.RESET:
            # xe's guc_exec_queue_timedout_job() before 82926f52d7a0 ("drm/xe: Don't free job
            # in TDR") freed the job here; only drm_sched's free_job may
            self.free_job(job)
        return status

    def free_job(self, job: GemuJob) -> None:
        """Kernel: panfrost_job_free()."""
        hw = job.hw_fence
        if hw is not None:
            if hw.message:
                job.message = hw.message
            # panfrost_job_cleanup(): the job lets go of its hardware fence (its out-fence may
            # keep the job itself for a long time; the message is copied above)
            job.hw_fence = None
        self.drv.release_job_resources(job)
        drm_sched.job_cleanup(job)


def job_error_message(job: GemuJob) -> str:
    if job.message:
        return job.message
    if job.hw_fence is not None and job.hw_fence.message:
        return job.hw_fence.message
    return ""


__all__ = [
    "BoAccess",
    "BoRef",
    "GemuJob",
    "GemuSchedOps",
    "Mutant",
    "SubmitHooks",
    "SubmitOrder",
    "submit",
    "validate_bo",
]
