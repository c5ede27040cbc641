"""DOC: the VM_BIND flavour of the gemu driver: VMs on drm_gpuvm, a bind queue, exec on a VM.

Where the legacy flavour (:mod:`.uapi`) has one GPU VM per file and a BO list per submit, this
one follows Panthor and Xe: a file creates VMs, binds BO ranges into them at any VA and unbinds
any part of a mapping, and submits jobs that name only the VM. It shares the device plumbing of
:class:`~.uapi.GemuDriver` (ring, scheduler, IRQ, AS slots, the page-table writer of
:mod:`.vm`, the shmem helper for BO storage); its objects are these:

- :class:`GemuVm` is a :class:`~gemu.guest.drm.drm_gpuvm.DrmGpuvm` (``RESV_PROTECTED |
  IMMEDIATE_MODE``, as Panthor's) with a page table (:class:`~.vm.GpuVm`), an ``op_lock``
  serialising changes of its VA tree and page table, a bind queue (a drm_sched of its own with
  one entity, credit limit 1: binds run in order), an exec entity on the GPU's scheduler, and
  the LRU of its private BOs for :mod:`.vm_shrinker`.
- A BO created for one VM (``bo_create(size, vm_id)``) is *private*: its resv is the VM's, so
  locking the VM locks it; any other BO is *external* and sits on the VM's extobj list.
- A bind is a job on the VM's bind queue. Everything it needs is prepared in the ioctl, in
  process context: the BO pinned, its vm_bo created and linked (``drm_gpuvm_bo_create`` +
  ``drm_gpuvm_bo_obtain_prealloc`` under the VM's and the BO's resv and the BO's gpuva lock),
  three mappings per op (one new, prev and next of a split), and the page-table frames the
  range lacks. The job itself (``run_job``, the fence signalling path) walks
  ``drm_gpuvm_sm_map``/``sm_unmap`` under ``op_lock`` and never allocates, never takes a resv
  and never waits. What it unlinks is put later, in process context, as Panthor's deferred
  vm_bo cleanup does.

Usage (``vm_exec`` is the exec path, ``vm_shrinker`` the reclaim)::

    vdrv = VmBindDriver(machine.driver)            # takes over the device's reclaim
    f = vdrv.open()
    vm = f.vm_create()
    src = f.bo_create(64 << 10, vm_id=vm)         # private to vm
    dst = f.bo_create(64 << 10)                   # external
    b1 = f.vm_bind(vm, VmBindOp.map(0x200000, 0x4000, src, offset=0x1000))
    b2 = f.vm_bind(vm, VmBindOp.map(0x400000, 0x4000, dst))
    cmd = f.bo_create(4096, vm_id=vm)
    f.write(cmd, 0, pk.copy(0x200000, 0x400000, 0x4000))
    b3 = f.vm_bind(vm, VmBindOp.map(0x100000, 0x1000, cmd))
    done = f.exec(vm, 0x100000, len(packets), in_fences=[b1, b2, b3])
    f.wait(done)
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from gemu.guest.dma_buf import dma_fence, dma_resv
from gemu.guest.dma_buf.dma_fence import DmaFence
from gemu.guest.dma_buf.dma_resv import DmaResvUsage
from gemu.guest.drm import drm_exec, drm_gpuvm, gem, gem_shmem, gem_shmem_shrinker
from gemu.guest.drm import sched as drm_sched
from gemu.guest.drm.drm_gpuvm import (
    DRM_GPUVM_IMMEDIATE_MODE,
    DRM_GPUVM_RESV_PROTECTED,
    DrmGpuva,
    DrmGpuvaOp,
    DrmGpuvm,
    DrmGpuvmMapReq,
    DrmGpuvmOps,
)
from gemu.guest.drm.gem_lru import DrmGemLru
from gemu.guest.errors import Ebusy, Einval, Enoent, Enomem, Etimedout, KernelError, warn_on
from gemu.guest.gemu_drv import vm_shrinker
from gemu.guest.gemu_drv.job import Mutant
from gemu.guest.gemu_drv.uapi import GemuDriver, GemuFile, JobFence
from gemu.guest.gemu_drv.vm import PAGE_SHIFT, PAGE_SIZE, VA_END, VA_START, GpuVm, Prot, pte_bits
from gemu.guest.gemu_drv.vm_shrinker import ReclaimState, VmReclaim
from gemu.guest.kernel import runtime
from gemu.guest.locking.lockdep import LockClass
from gemu.guest.locking.mutex import Mutex

__all__ = [
    "GemuVm",
    "GemuVma",
    "VmBindBo",
    "VmBindDriver",
    "VmBindFile",
    "VmBindOp",
]

OP_LOCK_CLASS = LockClass("&vm->op_lock")
VM_SUBMIT_LOCK_CLASS = LockClass("gemu_vm.submit_lock")
VMAS_PER_OP = 3
"""Mappings preallocated per op: the new one plus prev and next of a split
(``panthor_vm_op_ctx::preallocated_vmas``)."""
IDLE_TIMEOUT_NS = 10_000_000_000
"""How long destroying a VM waits for its jobs (guest time)."""


class VmBindBo:
    """Driver data of one BO of this flavour. Kernel: struct panthor_gem_object (the
    reclaim fields: ``reclaim_state``, ``reclaimed_count``; ``exclusive_vm_root_gem``).

    ``own_resv`` is the object's embedded reservation object: a private BO points ``resv`` at
    its VM's and gets its own back at free, so only its own is finalised.
    """

    __slots__ = (
        "exclusive_vm",
        "label",
        "obj",
        "own_resv",
        "reclaim_state",
        "reclaimed_count",
        "serial",
    )

    def __init__(self, obj, serial: int, label: str | None) -> None:
        self.obj = obj
        self.serial = serial
        self.label = label
        self.own_resv = obj.resv
        self.exclusive_vm: GemuVm | None = None
        self.reclaim_state = ReclaimState.UNRECLAIMABLE
        self.reclaimed_count = 0

    @property
    def name(self) -> str:
        return self.label or f"bo{self.serial}"

    def __repr__(self) -> str:
        return f"<VmBindBo {self.name} {self.obj.size} bytes {self.reclaim_state.name}>"


class GemuVma(DrmGpuva):
    """A mapping of this flavour. Kernel: struct panthor_vma (``flags`` -> ``prot``,
    ``evicted``: its PTEs were cleared by reclaim and come back at the next validate)."""

    __slots__ = ("evicted", "prot")

    def __init__(self) -> None:
        super().__init__()
        self.evicted = False
        self.prot = Prot.READ | Prot.WRITE | Prot.EXEC


@dataclass(frozen=True)
class VmBindOp:
    """One op of the bind ioctl. Kernel: struct drm_panthor_vm_bind_op (MAP / UNMAP)."""

    kind: str
    va: int
    size: int
    handle: int = 0
    offset: int = 0
    prot: Prot = Prot.READ | Prot.WRITE | Prot.EXEC

    @classmethod
    def map(cls, va: int, size: int, handle: int, offset: int = 0, prot: Prot | None = None):
        return cls(
            "map",
            va,
            size,
            handle,
            offset,
            Prot.READ | Prot.WRITE | Prot.EXEC if prot is None else Prot(prot),
        )

    @classmethod
    def unmap(cls, va: int, size: int):
        return cls("unmap", va, size)


class OpCtx:
    """Everything a bind job needs, prepared in the ioctl. Kernel: struct panthor_vm_op_ctx.

    ``vm_bo`` (map) is linked and held until cleanup; ``obj`` is pinned until cleanup;
    ``rsvd_tables`` are the page-table frames the map may need; ``vmas`` the preallocated
    mappings; ``deferred`` the vm_bos whose mappings the job unlinked, put at cleanup
    (``drm_gpuva_unlink_defer``/``drm_gpuvm_bo_deferred_cleanup``).
    """

    __slots__ = ("deferred", "obj", "op", "rsvd_tables", "vm_bo", "vmas")

    def __init__(self, op: VmBindOp) -> None:
        self.op = op
        self.obj = None
        self.vm_bo = None
        self.rsvd_tables: list[int] = []
        self.vmas: list[GemuVma] = []
        self.deferred: list = []


class BindJob(drm_sched.DrmSchedJob):
    """A job of a VM's bind queue. Kernel: struct panthor_vm_bind_job."""

    def __init__(self, file: VmBindFile, vm: GemuVm, ctx: OpCtx) -> None:
        super().__init__()
        self.file = file
        self.vm = vm
        self.ctx = ctx
        self.message = ""
        self.hw_fence = None
        self.fence: DmaFence | None = None


class BindSchedOps(drm_sched.DrmSchedBackendOps):
    """Kernel: panthor_vm_bind_ops."""

    def run_job(self, job: BindJob) -> DmaFence | None:
        """Kernel: panthor_vm_bind_run_job(): the op under ``op_lock``, synchronously (no
        hardware fence). Runs in the fence signalling path."""
        if job.s_fence.finished.error:
            return None
        try:
            job.vm.exec_op(job.ctx)
        except KernelError as exc:
            job.message = f"bind {job.ctx.op.kind} {job.ctx.op.va:#x}+{job.ctx.op.size:#x}: {exc}"
            raise
        return None

    def timedout_job(self, job: BindJob) -> drm_sched.DrmGpuSchedStat:
        """Binds are synchronous, no timeout (``MAX_SCHEDULE_TIMEOUT`` in panthor)."""
        return drm_sched.DrmGpuSchedStat.NO_HANG

    def free_job(self, job: BindJob) -> None:
        """Kernel: panthor_vm_bind_job_cleanup(): the op ctx goes to the VM's cleanup list,
        emptied in process context (panthor queues ``cleanup_op_ctx_work``)."""
        vm = job.vm
        vm.defer_cleanup(job.ctx)
        drm_sched.job_cleanup(job)
        f = job.file
        with f.inflight_lock:
            f.inflight -= 1
        f.idle_wq.wake_up_all()


def pt_map_reserved(pt: GpuVm, va: int, pas: Sequence[int], prot: Prot, reserve: list[int]) -> None:
    """Write PTEs with table frames taken only from ``reserve``, then flush the TLB.

    Kernel: panthor_vm_map_pages() with the op ctx's ``rsvd_page_tables``: io-pgtable's
    allocator hands out preallocated tables in the signalling path. Uses :class:`GpuVm`'s
    page-table writer under its page-table lock.
    """
    bits = pte_bits(prot)
    with pt.lock:
        pt._write_run(va, [pa | bits for pa in pas], reserve=reserve)
        pt.mapped_pages += len(pas)
        pt.flush(va, len(pas) * PAGE_SIZE)


def _pas(obj, offset: int, size: int) -> list[int]:
    first = offset >> PAGE_SHIFT
    return [pfn << PAGE_SHIFT for pfn in obj.pages[first : first + (size >> PAGE_SHIFT)]]


class GemuVm(DrmGpuvm):
    """A VM of the VM_BIND flavour. Kernel: struct panthor_vm.

    ``alloc_in_bind_job`` is a deliberately wrong variant for the tests (the
    ``bind-allocates-pt`` mutant turns it on for every VM): the bind ioctl does not
    preallocate page tables, so the bind job allocates them in the signalling path (lockdep
    reports it). Never set in normal use.
    """

    _serial = itertools.count(1)

    def __init__(self, drv: VmBindDriver, name: str | None = None) -> None:
        super().__init__()
        self.drv = drv
        name = name or f"vm{next(GemuVm._serial)}"
        gdrv = drv.gpu_drv
        self.pt = GpuVm(gdrv.gpu.mmu, name)
        self.op_lock = Mutex(f"{name}.op_lock", OP_LOCK_CLASS)
        self.submit_lock = Mutex(f"{name}.submit_lock", VM_SUBMIT_LOCK_CLASS)
        self.reclaim_lru = DrmGemLru(drv.reclaim.lock, f"{name}-private")
        self.cleanup: list[OpCtx] = []
        self.cleanup_wq = runtime.WaitQueue(f"{name}.cleanup")
        self._cleaning = 0
        self._cleanup_stop = False
        self.dead = False
        self.alloc_in_bind_job = drv.mutant is Mutant.BIND_ALLOCATES_PT
        ops = DrmGpuvmOps(
            vm_free=GemuVm._vm_free,
            vm_bo_validate=_vm_bo_validate,
            sm_step_map=GemuVm._step_map,
            sm_step_remap=GemuVm._step_remap,
            sm_step_unmap=GemuVm._step_unmap,
        )
        r_obj = drm_gpuvm.resv_object_alloc(drv.dev)
        drm_gpuvm.init(
            self,
            name,
            DRM_GPUVM_RESV_PROTECTED | DRM_GPUVM_IMMEDIATE_MODE,
            drv.dev,
            r_obj,
            VA_START,
            VA_END - VA_START,
            0,
            0,
            ops,
        )
        gem.put(r_obj)
        # panthor_vm_create(): drm_sched_init(&vm->sched, &panthor_vm_bind_ops, ..., 1, 1, 0,
        # MAX_SCHEDULE_TIMEOUT, ...) and one entity: binds of a VM run in submission order
        self.bind_sched = drm_sched.init(BindSchedOps(), name=f"{name}-bind", credit_limit=1)
        self.bind_entity = drm_sched.entity_init(
            drm_sched.DrmSchedPriority.NORMAL, [self.bind_sched]
        )
        self.exec_entity = drm_sched.entity_init(drm_sched.DrmSchedPriority.NORMAL, [gdrv.sched])
        self._cleanup_task = runtime.spawn(_cleanup_worker, self, name=f"{name}-cleanup")

    def __repr__(self) -> str:
        return f"<GemuVm {self.name} vas={len(self.rb)}>"

    # -- drm_gpuvm callbacks -----------------------------------------------------------------
    @staticmethod
    def _vm_free(vm: DrmGpuvm) -> None:
        """Kernel: panthor_vm_free(): off the reclaim list, page tables and bind queue gone."""
        assert isinstance(vm, GemuVm)
        reclaim = vm.drv.reclaim
        with reclaim.lock:
            if vm in reclaim.vms:
                reclaim.vms.remove(vm)
        vm.pt.fini()
        drm_sched.fini(vm.bind_sched)

    def _take_vma(self, ctx: OpCtx) -> GemuVma:
        if warn_on(not ctx.vmas, f"{self.name}: bind op ran out of preallocated mappings"):
            raise Einval(msg="no preallocated mapping left")
        return ctx.vmas.pop()

    def _unlink_deferred(self, va: GemuVma, ctx: OpCtx) -> None:
        """drm_gpuva_unlink_defer(): unlink under the gpuva lock; the vm_bo's reference that
        may be the last is kept in ``ctx.deferred`` and put at cleanup (that put needs the
        VM's resv, which the signalling path may not take)."""
        vm_bo = va.vm_bo
        if vm_bo is None:
            return
        g = drm_gpuvm.gem_gpuva(vm_bo.obj)
        ctx.deferred.append(drm_gpuvm.bo_get(vm_bo))
        with g.lock:
            drm_gpuvm.gpuva_unlink(va)

    @staticmethod
    def _step_map(op: DrmGpuvaOp, ctx: OpCtx) -> None:
        """Kernel: panthor_gpuva_sm_step_map()."""
        vm = ctx.vm_bo.vm
        va = vm._take_vma(ctx)
        va.prot = ctx.op.prot
        pas = _pas(ctx.obj, op.map.gem.offset, op.map.va.range)
        if vm.alloc_in_bind_job:
            vm.pt.map_pages(op.map.va.addr, pas, va.prot)  # wrong: allocates tables here
        else:
            pt_map_reserved(vm.pt, op.map.va.addr, pas, va.prot, ctx.rsvd_tables)
        drm_gpuvm.gpuva_map(vm, va, op.map)
        with drm_gpuvm.gem_gpuva(ctx.obj).lock:
            drm_gpuvm.gpuva_link(va, ctx.vm_bo)

    @staticmethod
    def _step_remap(op: DrmGpuvaOp, ctx) -> None:
        """Kernel: panthor_gpuva_sm_step_remap(): the hole's PTEs go (unless the mapping was
        evicted: it has none), prev/next keep the old flags and the old ``evicted``."""
        old = op.remap.unmap.va
        vm: GemuVm = old.vm
        start, size = drm_gpuvm.gpuva_op_remap_to_unmap_range(op.remap)
        if not old.evicted:
            vm.pt.unmap_pages(start, size >> PAGE_SHIFT)
        pieces = []
        for part in (op.remap.prev, op.remap.next):
            piece = vm._take_vma(ctx) if part is not None else None
            if piece is not None:
                piece.prot = old.prot
                piece.evicted = old.evicted
            pieces.append(piece)
        vm_bo = old.vm_bo
        drm_gpuvm.gpuva_remap(pieces[0], pieces[1], op.remap)
        if vm_bo is not None:
            with drm_gpuvm.gem_gpuva(vm_bo.obj).lock:
                for piece in pieces:
                    if piece is not None:
                        drm_gpuvm.gpuva_link(piece, vm_bo)
        vm._unlink_deferred(old, ctx)

    @staticmethod
    def _step_unmap(op: DrmGpuvaOp, ctx) -> None:
        """Kernel: panthor_gpuva_sm_step_unmap()."""
        va = op.unmap.va
        vm: GemuVm = va.vm
        if not va.evicted:
            vm.pt.unmap_pages(va.va.addr, va.va.range >> PAGE_SHIFT)
        vm._unlink_deferred(va, ctx)
        drm_gpuvm.gpuva_unmap(op.unmap)

    # -- ops -------------------------------------------------------------------------------
    def exec_op(self, ctx: OpCtx) -> None:
        """Apply one prepared op. Kernel: panthor_vm_exec_op() (under ``op_lock``)."""
        op = ctx.op
        with self.op_lock:
            if op.kind == "map":
                drm_gpuvm.sm_map(self, ctx, DrmGpuvmMapReq(op.va, op.size, ctx.obj, op.offset))
            else:
                drm_gpuvm.sm_unmap(self, ctx, op.va, op.size)

    def defer_cleanup(self, ctx: OpCtx) -> None:
        """Queue the op ctx for the cleanup worker. Kernel: queue_work() of
        ``cleanup_op_ctx_work``."""
        with self.cleanup_wq.lock:
            self.cleanup.append(ctx)
        self.cleanup_wq.wake_up_all()

    def run_cleanup(self) -> None:
        """Put what bind jobs unlinked, unpin their BOs, give back unused tables.

        Kernel: panthor_vm_cleanup_op_ctx() run from ``cleanup_op_ctx_work`` +
        drm_gpuvm_bo_deferred_cleanup() (which takes the VM's resv), then the reclaim state of
        each BO is recomputed under its resv and gpuva lock (panthor_vm_bo_free's comment: it
        "couldn't" be done at unlink, in the signalling path).
        """
        with self.cleanup_wq.lock:
            todo, self.cleanup = self.cleanup, []
            self._cleaning += 1
        try:
            for ctx in todo:
                cleanup_op_ctx(self, ctx)
        finally:
            with self.cleanup_wq.lock:
                self._cleaning -= 1
            self.cleanup_wq.wake_up_all()

    def flush_cleanup(self, timeout_ns: int = IDLE_TIMEOUT_NS) -> None:
        """Wait until every queued op ctx was cleaned up. Kernel: flush_work().

        Raises:
            Etimedout: the cleanup worker did not get there within ``timeout_ns``.
        """
        done = self.cleanup_wq.wait_event(
            lambda: not self.cleanup and not self._cleaning,
            timeout_ns=timeout_ns,
            reason=f"{self.name}: bind cleanup",
        )
        if not done:
            raise Etimedout(msg=f"{self.name}: bind cleanup still pending")

    def stop_cleanup(self) -> None:
        """Finish the queued cleanups and end the worker (the VM is going away)."""
        with self.cleanup_wq.lock:
            self._cleanup_stop = True
        self.cleanup_wq.wake_up_all()
        self._cleanup_task.join()


def _cleanup_worker(vm: GemuVm) -> None:
    """The VM's cleanup work item: runs in process context, may take resv locks."""
    while True:
        vm.cleanup_wq.wait_event(
            lambda: bool(vm.cleanup) or vm._cleanup_stop, reason=f"{vm.name}: cleanup work"
        )
        if vm.cleanup:
            vm.run_cleanup()
        elif vm._cleanup_stop:
            return


def _lock_objs(*objs, interruptible: bool = True) -> drm_exec.DrmExec:
    flags = drm_exec.DRM_EXEC_IGNORE_DUPLICATES
    if interruptible:
        flags |= drm_exec.DRM_EXEC_INTERRUPTIBLE_WAIT
    ex = drm_exec.init(flags)
    ex.__enter__()
    try:
        for attempt in drm_exec.until_all_locked(ex):
            with attempt:
                for obj in objs:
                    drm_exec.prepare_obj(ex, obj, 1)
                    drm_exec.retry_on_contention(ex)
    except BaseException:
        ex.__exit__(None, None, None)
        raise
    return ex


def cleanup_op_ctx(vm: GemuVm, ctx: OpCtx) -> None:
    """Kernel: panthor_vm_cleanup_op_ctx() + the deferred vm_bo puts."""
    reclaim = vm.drv.reclaim
    objs = [vb.obj for vb in ctx.deferred]
    if ctx.vm_bo is not None:
        objs.append(ctx.obj)
    with _lock_objs(vm.r_obj, *objs, interruptible=False):
        for vm_bo in [*ctx.deferred, *([ctx.vm_bo] if ctx.vm_bo is not None else [])]:
            obj = vm_bo.obj
            gem.get(obj)
            g = drm_gpuvm.gem_gpuva(obj)
            with g.lock:
                drm_gpuvm.bo_put(vm_bo)
                if obj in reclaim.records:
                    vm_shrinker.update_reclaim_state_locked(reclaim, obj)
            gem.put(obj)
        ctx.deferred.clear()
        ctx.vm_bo = None
    vm.pt._return_tables(ctx.rsvd_tables)
    ctx.vmas.clear()
    if ctx.obj is not None:
        obj, ctx.obj = ctx.obj, None
        gem_shmem.unpin(obj)
        dma_resv.lock(obj.resv, None)
        try:
            with drm_gpuvm.gem_gpuva(obj).lock:
                vm_shrinker.update_reclaim_state_locked(reclaim, obj)
        finally:
            dma_resv.unlock(obj.resv)
        gem.put(obj)


def _vm_bo_validate(vm_bo, ex) -> None:
    from gemu.guest.gemu_drv import vm_exec

    vm_exec.vm_bo_validate(vm_bo, ex)


class VmBindDriver:
    """The VM_BIND flavour on a probed :class:`GemuDriver`. Kernel: the panthor_device side
    of VM_BIND and reclaim.

    Panthor parted ways with drm_gem_shmem_object and reclaims its BOs with its own shrinker;
    so does this flavour: it takes the device's reclaim over from the shmem helper's shrinker
    (``drmm_gem_shmem_release``) and registers :class:`~.vm_shrinker.VmReclaim`. BO storage
    still comes from the shmem helper (pages, swap-out, swap-in).

    ``mutant`` switches on one of the flavour's deliberately wrong variants
    (:class:`~.job.Mutant`, the section "The VM_BIND flavour's mutants"; ``gemu explore
    --mutant``); ``None`` takes the GPU driver's, :attr:`Mutant.NONE` (the working driver)
    unless one was asked for there.
    """

    def __init__(self, gpu_drv: GemuDriver, mutant: Mutant | str | None = None) -> None:
        if gpu_drv.sched is None:
            raise Einval(msg="the GPU driver is not probed")
        self.gpu_drv = gpu_drv
        self.dev = gpu_drv.dev
        self.mutant = Mutant(gpu_drv.mutant if mutant is None else mutant)
        gem_shmem_shrinker.drmm_gem_shmem_release(self.dev)
        self.reclaim = VmReclaim(self.dev)
        self.reclaim.mutant = self.mutant
        self.reclaim.register()
        self.records = self.reclaim.records
        self.funcs = gem_shmem.FUNCS.replace(evict=self._evict, free=self._free)
        self.files: list[VmBindFile] = []
        self._serial = itertools.count(1)

    def _evict(self, obj) -> None:
        """The object's evict callback (the helper's contract: resv held). Kernel:
        panthor_gem_try_evict_no_resv_wait() reached through the object."""
        if not vm_shrinker.try_evict(self.reclaim, obj):
            raise Ebusy(msg=f"{obj!r} could not be evicted now")

    def _free(self, obj) -> None:
        """Kernel: panthor_gem_free_object()."""
        rec = self.records.pop(obj, None)
        if rec is not None:
            obj.resv = rec.own_resv
            if obj.pages_use_count:
                gem_shmem.put_pages(obj)
            if rec.exclusive_vm is not None:
                gem.put(rec.exclusive_vm.r_obj)
        gem_shmem.object_free(obj)

    def new_bo(self, size: int, vm: GemuVm | None, name: str | None) -> VmBindBo:
        """Kernel: panthor_gem_create() (``exclusive_vm``: share its resv and hold its root
        GEM) + the pages (gemu allocates them at creation, as the legacy flavour does)."""
        obj = gem_shmem.create(self.dev, gem.page_align(size), self.funcs)
        rec = VmBindBo(obj, next(self._serial), name)
        self.records[obj] = rec
        try:
            # the pages come before the BO joins its VM's resv: reclaim entered from here
            # can then still take the VM's other private BOs (it only trylocks)
            gem_shmem.get_pages(obj)
            if vm is not None:
                rec.exclusive_vm = vm
                gem.get(vm.r_obj)
                obj.resv = drm_gpuvm.resv(vm)
            dma_resv.lock(obj.resv, None)
            try:
                with drm_gpuvm.gem_gpuva(obj).lock:
                    vm_shrinker.update_reclaim_state_locked(self.reclaim, obj)
            finally:
                dma_resv.unlock(obj.resv)
        except BaseException:
            gem.put(obj)
            raise
        return rec

    def cpu_access(self, rec: VmBindBo, offset: int, size: int, data: bytes | None) -> bytes:
        """Read (``data`` None) or write a BO through its CPU mapping.

        Kernel: panthor_gem_fault() behind the mmap, its blocking_page_setup(): under the
        BO's resv the pages come back (panthor_gem_backing_get_pages_locked(); VM_FAULT_OOM
        here when that fails) and, under the gpuva lock,
        panthor_gem_update_reclaim_state_locked() puts the BO on the LRU of its state again. The
        shmem helper's fault (drm_gem_shmem_fault) knows nothing of the flavour's LRUs: a BO
        it swapped in would stay UNRECLAIMABLE on no LRU, and once a few were read back the
        shrinker would count nothing and the next swap-in would be OOM. The copy runs with
        the resv still held, so reclaim cannot take the frames under it.
        """
        obj = rec.obj
        if offset < 0 or size < 0 or offset + size > obj.size:
            raise Einval(msg=f"access {offset}+{size} outside {rec.name} ({obj.size} bytes)")
        mem = self.gpu_drv.frames.mem
        dma_resv.lock(obj.resv, None)
        try:
            if obj.evicted:
                try:
                    gem_shmem.swapin_locked(obj)
                except KernelError as err:
                    raise Enomem(msg=f"VM_FAULT_OOM: swap-in of {rec.name} failed: {err}") from err
                self.reclaim.stats.swapped_in += 1
                with drm_gpuvm.gem_gpuva(obj).lock:
                    vm_shrinker.update_reclaim_state_locked(self.reclaim, obj)
            pages = obj.pages
            out = bytearray()
            pos, end = offset, offset + size
            while pos < end:
                page, in_page = divmod(pos, PAGE_SIZE)
                k = min(end - pos, PAGE_SIZE - in_page)
                pa = (pages[page] << PAGE_SHIFT) + in_page
                if data is None:
                    out += mem[pa : pa + k]
                else:
                    mem[pa : pa + k] = data[pos - offset : pos - offset + k]
                pos += k
            return bytes(out)
        finally:
            dma_resv.unlock(obj.resv)

    def open(self) -> VmBindFile:
        f = VmBindFile(self)
        self.files.append(f)
        return f

    def remove(self) -> None:
        """Close every file and unregister the shrinker."""
        for f in list(self.files):
            f.close()
        self.reclaim.unregister()


class VmBindFile:
    """An open file of the VM_BIND flavour: BO handles and VMs. Kernel: struct drm_file +
    struct panthor_file (its VM pool). Every public method models one ioctl.

    ``inflight``/``idle_wq``/``cmd_pool`` are what the GPU scheduler's job release expects of
    a file (:meth:`GemuDriver.release_job_resources`): exec jobs run on the same scheduler as
    the legacy flavour's.
    """

    vm = None  # GemuJob reads file.vm; an exec job names its VM's page table instead
    cmd_pool = None
    _serial = itertools.count(1)
    wait = GemuFile.wait

    def __init__(self, drv: VmBindDriver) -> None:
        self.drv = drv
        self.name = f"vmbind-file{next(VmBindFile._serial)}"
        self.drm = gem.DrmFile(drv.dev)
        self.vms: dict[int, GemuVm] = {}
        self._vm_ids = itertools.count(1)
        self.inflight = 0
        self.inflight_lock = threading.Lock()
        self.idle_wq = runtime.WaitQueue(f"{self.name}.idle")
        self.out_fences: dict[JobFence, None] = {}
        """Open out-fences in submit order (as :class:`GemuFile` keeps them)."""
        self.closed = False

    # -- BOs -------------------------------------------------------------------------------
    def _lookup(self, handle: int) -> VmBindBo:
        obj = gem.object_lookup(self.drm, handle)
        if obj is None:
            raise Enoent(msg=f"no BO handle {handle} in {self.name}")
        gem.put(obj)
        return self.drv.records[obj]

    def bo(self, handle: int) -> VmBindBo:
        return self._lookup(handle)

    def bo_create(self, size: int, vm_id: int | None = None, name: str | None = None) -> int:
        """DRM_IOCTL_PANTHOR_BO_CREATE: a BO, private to ``vm_id`` if given
        (``exclusive_vm_id``); returns its handle."""
        vm = self._vm(vm_id) if vm_id is not None else None
        rec = self.drv.new_bo(size, vm, name)
        handle = gem.handle_create(self.drm, rec.obj)
        gem.put(rec.obj)
        return handle

    def close_bo(self, handle: int) -> None:
        """DRM_IOCTL_GEM_CLOSE: the BO lives on while a mapping or a job holds it."""
        self._lookup(handle)
        gem.handle_delete(self.drm, handle)

    def write(self, handle: int, offset: int, data: bytes) -> None:
        """A CPU store through the BO's mmap (faults an evicted BO back in)."""
        self.drv.cpu_access(self._lookup(handle), offset, len(data), data)

    def read(self, handle: int, offset: int, size: int) -> bytes:
        """A CPU load through the BO's mmap (faults an evicted BO back in)."""
        return self.drv.cpu_access(self._lookup(handle), offset, size, None)

    # -- VMs -------------------------------------------------------------------------------
    def _vm(self, vm_id: int) -> GemuVm:
        vm = self.vms.get(vm_id)
        if vm is None:
            raise Enoent(msg=f"no VM {vm_id} in {self.name}")
        return vm

    def vm_create(self) -> int:
        """DRM_IOCTL_PANTHOR_VM_CREATE: returns the VM's id in this file."""
        vm = GemuVm(self.drv)
        vm_id = next(self._vm_ids)
        self.vms[vm_id] = vm
        return vm_id

    def vm_destroy(self, vm_id: int) -> None:
        """DRM_IOCTL_PANTHOR_VM_DESTROY: wait for the VM's binds and jobs, unmap everything,
        drop the file's reference. Kernel: panthor_vm_destroy() + panthor_vm_unmap_range()."""
        vm = self.vms.pop(vm_id, None)
        if vm is None:
            raise Enoent(msg=f"no VM {vm_id} in {self.name}")
        self._destroy(vm)

    def _destroy(self, vm: GemuVm) -> None:
        drm_sched.entity_destroy(vm.bind_entity)
        drm_sched.entity_destroy(vm.exec_entity)
        resv = drm_gpuvm.resv(vm)
        if dma_resv.wait_timeout(resv, DmaResvUsage.BOOKKEEP, False, IDLE_TIMEOUT_NS) == 0:
            raise Etimedout(msg=f"{vm.name}: jobs still running after 10 s")
        # the fences signalled; free_job (AS slot, bind op ctx) may still be on its way
        if not self.idle_wq.wait_event(lambda: self.inflight == 0, timeout_ns=IDLE_TIMEOUT_NS):
            raise Etimedout(msg=f"{vm.name}: jobs not freed after 10 s")
        vm.stop_cleanup()
        ctx = OpCtx(VmBindOp.unmap(vm.mm_start, vm.mm_range))
        ctx.vmas = [GemuVma() for _ in range(VMAS_PER_OP)]
        vm.exec_op(ctx)
        cleanup_op_ctx(vm, ctx)
        vm.dead = True
        drm_gpuvm.put(vm)

    # -- bind --------------------------------------------------------------------------------
    def _prepare(self, vm: GemuVm, op: VmBindOp) -> OpCtx:
        """Kernel: panthor_vm_prepare_map_op_ctx() / panthor_vm_prepare_unmap_op_ctx(): every
        allocation the op may need, in process context."""
        if op.kind not in ("map", "unmap"):
            raise Einval(msg=f"unknown bind op {op.kind!r}")
        if op.va % PAGE_SIZE or op.size % PAGE_SIZE or op.size <= 0:
            raise Einval(
                msg=f"bind {op.kind}: va {op.va:#x} and size {op.size:#x} must be whole pages"
            )
        if not drm_gpuvm.range_valid(vm, op.va, op.size):
            raise Einval(msg=f"bind {op.kind}: {op.va:#x}+{op.size:#x} is outside {vm.name}")
        ctx = OpCtx(op)
        ctx.vmas = [GemuVma() for _ in range(VMAS_PER_OP)]
        if op.kind == "unmap":
            return ctx
        rec = self._lookup(op.handle)
        obj = rec.obj
        if op.offset % PAGE_SIZE or op.offset < 0 or op.offset + op.size > obj.size:
            raise Einval(
                msg=f"bind map: {op.offset:#x}+{op.size:#x} is outside {rec.name} ({obj.size} bytes)"
            )
        if rec.exclusive_vm is not None and rec.exclusive_vm is not vm:
            raise Einval(msg=f"{rec.name} is private to {rec.exclusive_vm.name}, not {vm.name}")
        gem.get(obj)
        ctx.obj = obj
        try:
            gem_shmem.pin(obj)  # panthor_gem_pin(): resident until the job ran
        except BaseException:
            ctx.obj = None
            gem.put(obj)
            raise
        try:
            new_vm_bo = drm_gpuvm.bo_create(vm, obj)
            with _lock_objs(vm.r_obj, obj):
                with drm_gpuvm.gem_gpuva(obj).lock:
                    ctx.vm_bo = drm_gpuvm.bo_obtain_prealloc(new_vm_bo)
                    vm_shrinker.update_reclaim_state_locked(self.drv.reclaim, obj)
                if drm_gpuvm.is_extobj(vm, obj):
                    drm_gpuvm.bo_extobj_add(ctx.vm_bo)
            if not vm.alloc_in_bind_job:
                # panthor_vm_op_ctx_prealloc_pts()
                ctx.rsvd_tables = vm.pt._prealloc_tables(op.va, op.size >> PAGE_SHIFT)
        except BaseException:
            cleanup_op_ctx(vm, ctx)
            raise
        return ctx

    def vm_bind(
        self, vm_id: int, op: VmBindOp, in_fences: Sequence[JobFence | DmaFence] = ()
    ) -> JobFence:
        """DRM_IOCTL_PANTHOR_VM_BIND (asynchronous): queue one map or unmap on the VM's bind
        queue after ``in_fences``; returns its out-fence.

        Kernel: panthor_ioctl_vm_bind_async(): panthor_vm_bind_job_create() (the op ctx),
        drm_sched_job_init() on the VM's entity, the in-syncs as dependencies,
        panthor_vm_bind_job_prepare_resvs() (drm_gpuvm_prepare_vm + the mapped BO), arm,
        panthor_vm_bind_job_update_resvs() (drm_gpuvm_resv_add_fence, BOOKKEEP/BOOKKEEP),
        push, unlock.

        Raises:
            Einval: misaligned or out-of-range op, a BO private to another VM, a closed file.
            Enoent: no such VM or handle, or a closed in-fence.
        """
        if self.closed:
            raise Einval(msg=f"{self.name} is closed")
        vm = self._vm(vm_id)
        deps = GemuFile._lookup_in_fences(self, in_fences)
        try:
            ctx = self._prepare(vm, op)
            job = BindJob(self, vm, ctx)
            try:
                drm_sched.job_init(job, vm.bind_entity, 1, owner=self)
            except BaseException:
                cleanup_op_ctx(vm, ctx)
                raise
            with self.inflight_lock:
                self.inflight += 1  # until free_job: the VM outlives its bind jobs
            for f in deps:
                drm_sched.job_add_dependency(job, dma_fence.get(f))
            objs = [vm.r_obj] + ([ctx.obj] if ctx.obj is not None else [])
            with _lock_objs(*objs) as ex, vm.submit_lock:
                drm_sched.job_arm(job)
                job.fence = dma_fence.get(job.s_fence.finished)
                drm_gpuvm.resv_add_fence(
                    vm, ex, job.fence, DmaResvUsage.BOOKKEEP, DmaResvUsage.BOOKKEEP
                )
                drm_sched.entity_push_job(job)
        finally:
            for f in deps:
                dma_fence.put(f)
        return self._out_fence(job, job.fence)

    def _out_fence(self, job, fence: DmaFence) -> JobFence:
        out = JobFence(self, job, fence)
        dma_fence.put(fence)
        with self.inflight_lock:
            self.out_fences[out] = None
        return out

    def map(
        self, vm_id: int, va: int, size: int, handle: int, offset: int = 0, prot=None, in_fences=()
    ):
        """:meth:`vm_bind` of one MAP op."""
        return self.vm_bind(vm_id, VmBindOp.map(va, size, handle, offset, prot), in_fences)

    def unmap(self, vm_id: int, va: int, size: int, in_fences=()) -> JobFence:
        """:meth:`vm_bind` of one UNMAP op."""
        return self.vm_bind(vm_id, VmBindOp.unmap(va, size), in_fences)

    # -- exec --------------------------------------------------------------------------------
    def exec(
        self, vm_id: int, cmd_va: int, cmd_size: int, in_fences: Sequence[JobFence | DmaFence] = ()
    ) -> JobFence:
        """DRM_IOCTL_PANTHOR_GROUP_SUBMIT (one job): run ``cmd_size`` bytes of packets at
        ``cmd_va`` of the VM after ``in_fences``; every BO the VM maps is made resident and
        mapped first (:func:`.vm_exec.submit`). Returns the out-fence."""
        from gemu.guest.gemu_drv import vm_exec

        if self.closed:
            raise Einval(msg=f"{self.name} is closed")
        if cmd_size <= 0 or cmd_size % 4 or cmd_va % 4:
            raise Einval(msg=f"command buffer {cmd_va:#x}+{cmd_size} must be whole dwords")
        vm = self._vm(vm_id)
        deps = GemuFile._lookup_in_fences(self, in_fences)
        try:
            job, fence = vm_exec.submit(self, vm, cmd_va, cmd_size // 4, deps)
        finally:
            for f in deps:
                dma_fence.put(f)
        return self._out_fence(job, fence)

    def close(self) -> None:
        """Kernel: panthor_postclose(): destroy every VM, drop the handles."""
        if self.closed:
            return
        self.closed = True
        for vm_id in list(self.vms):
            self._destroy(self.vms.pop(vm_id))
        self.idle_wq.wait_event(lambda: self.inflight == 0, timeout_ns=IDLE_TIMEOUT_NS)
        with self.inflight_lock:
            still_open = list(self.out_fences)
        for out in still_open:
            with contextlib.suppress(Enoent):
                out.close()
        gem.release(self.drm)
        if self in self.drv.files:
            self.drv.files.remove(self)
