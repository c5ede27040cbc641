"""DOC: exec on a VM: the drm_gpuvm validation sequence of the VM_BIND flavour.

A job names a VM, not a BO list. Its submit locks what the VM maps, brings back what reclaim
took, and publishes its fence on all of it, in this order (docs/gpuvm.md explains each step)::

    1. drm_sched_job_init                   on the VM's exec entity; deps: the in-fences
    2. drm_gpuvm_exec_lock                  the VM's resv (every private BO with it), then
         drm_gpuvm_prepare_vm               every external BO; evicted extobjs join the
         drm_gpuvm_prepare_objects          VM's evict list here (RESV_PROTECTED)
    3. drm_gpuvm_validate                   vm_bo_validate() per evicted vm_bo of this VM:
                                            swap in, rewrite the PTEs of its evicted
                                            mappings (tables preallocated outside op_lock),
                                            TLB flush, drm_gpuvm_bo_evict(vm_bo, false)
    4. under the VM's submit lock:
         drm_sched_job_arm                  point of no return
         drm_gpuvm_resv_add_fence           BOOKKEEP on the VM's resv (private BOs) and on
                                            every external BO
         drm_sched_entity_push_job
    5. drm_gpuvm_exec_unlock                drm_exec_fini
    6. panthor_vm_active                    the VM's private BOs are reclaimed last

    job, fence = submit(file, vm, cmd_va, cmd_dwords, in_fences)

The flavour's deliberately wrong orders are :class:`~.job.Mutant` values
(``VmBindDriver(mutant=...)``): ``gpuvm-fence-before-validate`` (arm and add the fence, then
validate), ``gpuvm-arm-before-validate`` (arm, then a validation that may fail),
``gpuvm-fence-after-unlock`` (push and unlock, then add the fence), ``fence-vm-resv-only``
(the fence on the VM's resv only); docs/validation.md ("The drm_gpuvm flow") says what each
breaks.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from gemu.guest.dma_buf import dma_fence, dma_resv
from gemu.guest.dma_buf.dma_fence import DmaFence
from gemu.guest.dma_buf.dma_resv import DmaResvUsage
from gemu.guest.drm import drm_exec, drm_gpuvm, gem_shmem
from gemu.guest.drm import sched as drm_sched
from gemu.guest.drm.drm_gpuvm import DrmGpuvmExec
from gemu.guest.errors import Einval
from gemu.guest.gemu_drv import vm_shrinker
from gemu.guest.gemu_drv.job import GemuJob, Mutant
from gemu.guest.gemu_drv.vm import PAGE_SHIFT
from gemu.guest.locking import lockdep

if TYPE_CHECKING:
    from gemu.guest.gemu_drv.vm_bind import GemuVm, VmBindFile

__all__ = ["submit", "vm_bo_validate"]


def _arm(job: GemuJob) -> None:
    """drm_sched_job_arm(), and the submit's own reference to the finished fence (the job may
    be freed once pushed)."""
    drm_sched.job_arm(job)
    job.fence = dma_fence.get(job.s_fence.finished)


def _add_fence_relocking(vm: GemuVm, job: GemuJob) -> None:
    """The ``gpuvm-fence-after-unlock`` mutant: lock each object again, the VM's resv first
    (which protects the extobj list), to add the fence, too late."""
    objs = [vm.r_obj]
    dma_resv.lock(drm_gpuvm.resv(vm), None)
    try:
        objs += [vm_bo.obj for vm_bo in vm.extobj]
    finally:
        dma_resv.unlock(drm_gpuvm.resv(vm))
    for obj in objs:
        dma_resv.lock(obj.resv, None)
        try:
            dma_resv.reserve_fences(obj.resv, 1)
            dma_resv.add_fence(obj.resv, job.fence, DmaResvUsage.BOOKKEEP)
        finally:
            dma_resv.unlock(obj.resv)


def _add_fence(vm: GemuVm, vm_exec: DrmGpuvmExec, job: GemuJob, mutant: Mutant) -> None:
    """drm_gpuvm_exec_resv_add_fence(): BOOKKEEP on the VM's resv and every external BO.

    Kernel: panthor_vm_update_resvs(). The ``fence-vm-resv-only`` mutant adds it to the VM's
    resv alone (dma_resv_add_fence(drm_gpuvm_resv(vm), ...)): the external BOs stay idle.
    """
    if mutant is Mutant.FENCE_VM_RESV_ONLY:
        dma_resv.add_fence(drm_gpuvm.resv(vm), job.fence, DmaResvUsage.BOOKKEEP)
        return
    drm_gpuvm.exec_resv_add_fence(vm_exec, job.fence, DmaResvUsage.BOOKKEEP, DmaResvUsage.BOOKKEEP)


class _EvictedVmas:
    """The evicted mappings of one vm_bo, handed out one at a time in the order of its
    gpuva list: the mapping panthor_vm_restore_vmas()'s select_evicted_vma() picks, the
    first evicted one from the head of the list.

    The kernel walks from the head at every pick, past every mapping already restored: a
    BO with a mapping per page costs a walk per page. This keeps the evicted mappings one
    walk found, in list order, and resumes after the last one handed out; once they are used
    up it walks again, and an empty walk ends. It picks the kernel's mapping because, while
    validate holds the BO's resv, nothing marks a linked mapping evicted (reclaim evicts
    under that resv), a mapping joins at the list's tail (drm_gpuva_link(): one linked after
    the walk, such as an evicted mapping's piece a bind split off, comes after every mapping
    the walk saw, so the next walk finds it in turn), and a mapping unlinked since the walk
    is skipped.
    Locking: the VM's ``op_lock`` and the BO's gpuva lock around each :meth:`next`.
    """

    __slots__ = ("found", "pos", "vm_bo")

    def __init__(self, vm_bo) -> None:
        self.vm_bo = vm_bo
        self.found: list = []
        self.pos = 0

    def next(self):
        vm_bo = self.vm_bo
        while True:
            while self.pos < len(self.found):
                va = self.found[self.pos]
                self.pos += 1
                if va.vm_bo is vm_bo and va.evicted:
                    return va
            self.found = [va for va in vm_bo.gpuva if va.evicted]
            self.pos = 0
            if not self.found:
                return None


def vm_bo_validate(vm_bo, ex) -> None:
    """Bring one evicted BO back into one VM.

    Kernel: panthor_vm_bo_validate(): panthor_gem_swapin_locked(), then
    panthor_vm_restore_vmas(), per evicted mapping: select it under ``op_lock``
    (select_evicted_vma(): the first evicted one of the vm_bo's list, which
    :class:`_EvictedVmas` finds without walking the restored ones again), preallocate its
    page tables *without* ``op_lock`` because the bind job takes ``op_lock`` in the
    signalling path, retake it, check the mapping is still there and still evicted, write
    its PTEs, clear ``evicted``; then drm_gpuvm_bo_evict(vm_bo, false) and the reclaim state
    under the gpuva lock.
    Locking: the BO's resv (held by drm_gpuvm_exec_lock).
    """
    from gemu.guest.gemu_drv.vm_bind import pt_map_reserved

    obj = vm_bo.obj
    vm: GemuVm = vm_bo.vm
    dma_resv.assert_held(obj.resv)
    if obj.madv < 0:
        raise Einval(msg=f"{obj!r} was purged: it cannot be mapped again")
    g = drm_gpuvm.gem_gpuva(obj)
    if vm.drv.mutant is Mutant.VALIDATE_SKIPS_OTHER_VM and not obj.evicted:
        # wrong: "another VM's exec swapped it in already" is no reason to skip this VM's
        # mappings, whose PTEs reclaim cleared
        drm_gpuvm.bo_evict(vm_bo, False)
        with g.lock:
            vm_shrinker.update_reclaim_state_locked(vm.drv.reclaim, obj)
        return
    if obj.evicted:
        gem_shmem.swapin_locked(obj)
        vm.drv.reclaim.stats.swapped_in += 1
    evicted = _EvictedVmas(vm_bo)
    for _ in range(len(vm_bo.gpuva) + 1):  # each pass restores one mapping or ends
        with vm.op_lock, g.lock:
            va = evicted.next()
            if va is None:
                break
            addr, npages = va.va.addr, va.va.range >> PAGE_SHIFT
        reserve = vm.pt._prealloc_tables(addr, npages)
        try:
            with vm.op_lock, g.lock:
                if va in vm_bo.gpuva and va.evicted:  # not unmapped meanwhile (no walk)
                    first = va.gem.offset >> PAGE_SHIFT
                    pas = [pfn << PAGE_SHIFT for pfn in obj.pages[first : first + npages]]
                    pt_map_reserved(vm.pt, addr, pas, va.prot, reserve)
                    va.evicted = False
        finally:
            vm.pt._return_tables(reserve)
    drm_gpuvm.bo_evict(vm_bo, False)
    with g.lock:
        vm_shrinker.update_reclaim_state_locked(vm.drv.reclaim, obj)


def submit(
    file: VmBindFile, vm: GemuVm, cmd_va: int, cmd_dwords: int, deps: list[DmaFence]
) -> tuple[GemuJob, DmaFence]:
    """Validate everything ``vm`` maps and push one job on it; returns the job and its
    finished fence with a reference the caller owns.

    Kernel: panthor_ioctl_group_submit() (panthor_vm_prepare_mapped_bos_resvs =
    drm_gpuvm_prepare_vm + drm_gpuvm_prepare_objects + drm_gpuvm_validate, then
    panthor_submit_ctx_add_deps_and_arm_jobs, panthor_submit_ctx_push_jobs with
    panthor_vm_update_resvs = drm_gpuvm_resv_add_fence); xe_exec_ioctl() has the same order.
    Both usages are BOOKKEEP, as Xe passes them (explicit sync: jobs order through fences, and
    reclaim's idle test looks at every usage).

    On failure before arm nothing was published and the job is cleaned up.
    """
    drv = file.drv.gpu_drv
    mutant = file.drv.mutant
    job = GemuJob(file, [], cmd_va, cmd_dwords, None)
    job.vm = vm.pt
    with file.inflight_lock:
        file.inflight += 1
    try:
        drm_sched.job_init(job, vm.exec_entity, 1, owner=file)
    except BaseException:
        drv.release_job_resources(job)
        raise
    # the wrong orders that arm before validating hold the submit lock from arm to push, as
    # a driver must around arm + push
    early = mutant in (Mutant.GPUVM_FENCE_BEFORE_VALIDATE, Mutant.GPUVM_ARM_BEFORE_VALIDATE)
    armed = False
    section = None
    try:
        for fence in deps:
            drm_sched.job_add_dependency(job, dma_fence.get(fence))
        with DrmGpuvmExec(vm, drm_exec.DRM_EXEC_INTERRUPTIBLE_WAIT, num_fences=1) as vm_exec:
            drm_gpuvm.exec_lock(vm_exec)
            if early:
                vm.submit_lock.lock()
            try:
                if early:
                    _arm(job)
                    armed = True
                    if mutant is Mutant.GPUVM_FENCE_BEFORE_VALIDATE:
                        section = lockdep.dma_fence_begin_signalling()
                        _add_fence(vm, vm_exec, job, mutant)
                drm_gpuvm.exec_validate(vm_exec)
                with contextlib.nullcontext() if early else vm.submit_lock:
                    if not armed:
                        _arm(job)
                        armed = True
                    if section is None and mutant is not Mutant.GPUVM_FENCE_AFTER_UNLOCK:
                        section = lockdep.dma_fence_begin_signalling()
                        _add_fence(vm, vm_exec, job, mutant)
                    drm_sched.entity_push_job(job)
                    if section is not None:  # the submitter's part ends with the push
                        lockdep.dma_fence_end_signalling(section)
                        section = None
            finally:
                if section is not None:
                    lockdep.dma_fence_end_signalling(section)
                if early:
                    vm.submit_lock.unlock()
        # drm_gpuvm_exec_unlock (drm_exec_fini): every resv unlocked here
        if mutant is Mutant.GPUVM_FENCE_AFTER_UNLOCK:
            for hook in drv.hooks.after_unlock:  # the window this order opens (tests)
                hook(job)
            _add_fence_relocking(vm, job)
    except BaseException:
        if not armed or mutant is Mutant.GPUVM_ARM_BEFORE_VALIDATE:
            # the mutant abandons an armed job as if it had not been armed: drm_sched's
            # job_cleanup reports it (an armed job must be pushed)
            drv.release_job_resources(job)
            drm_sched.job_cleanup(job)
            dma_fence.put(job.fence)
            job.fence = None
        raise
    vm_shrinker.vm_active(vm)
    return job, job.fence
