"""DOC: the gemu driver as a guest program sees it: BOs, CPU maps, VM binds, submits, waits.

:class:`GemuDriver` is the device-level driver state (``struct panfrost_device`` plus
``drm_driver``): the GEM device, the GPU core (:mod:`.gpu`), the scheduler, the shrinker glue.
:meth:`GemuDriver.open` gives a :class:`GemuFile`, one per client (``struct drm_file`` +
``panfrost_file_priv``), with its own GPU VM and scheduler entity. Its methods are the ioctls::

    f = machine.open()
    h = f.create_bo(64 << 10)                     # DRM_IOCTL_GEMU_CREATE_BO
    va = f.vm_bind(h)                             # DRM_IOCTL_GEMU_VM_BIND
    f.write(h, 0, b"\\x01" * 4096)                  # mmap + CPU store
    out = f.create_bo(4096); out_va = f.vm_bind(out)
    cmd = pk.crc32(va, 4096, out_va)
    fence = f.submit(cmd, bos=[(h, READ), (out, WRITE)])   # DRM_IOCTL_GEMU_SUBMIT
    f.wait(fence, timeout=5.0)                    # raises with the GPU's error if the job failed
    crc = int.from_bytes(f.read(out, 0, 4), "little")
    f.madvise(h, willneed=False)                  # purgeable from now on
    f.close_bo(h)

BO memory comes from the GEM shmem helper (v19 shrinker API). BOs get their pages at
creation (``drm_gem_shmem_get_pages``: allocated, *not* pinned), so the shrinker may evict
idle ones to swap and purge DONTNEED ones; every submit validates its BOs again
(:mod:`.job`). The driver wraps the shrinker's evict callback so an evicted or purged BO is
unmapped from every GPU VM (with a TLB flush) before its frames are freed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from gemu.device.abi import regs
from gemu.guest.dma_buf import dma_fence, dma_resv
from gemu.guest.dma_buf.dma_fence import DmaFence
from gemu.guest.drm import gem, gem_lru, gem_shmem, gem_shmem_shrinker, vgem_fence
from gemu.guest.drm import sched as drm_sched
from gemu.guest.errors import Ebusy, Einval, Enoent, Etimedout, KernelError
from gemu.guest.gemu_drv import job as gjob
from gemu.guest.gemu_drv.gpu import GemuGpu, KernelFrames
from gemu.guest.gemu_drv.job import BoAccess, BoRef, GemuJob, Mutant, SubmitHooks, SubmitOrder
from gemu.guest.gemu_drv.vm import PAGE_SIZE, GpuVm, Prot
from gemu.guest.kernel import runtime, trace
from gemu.guest.locking import lockdep
from gemu.guest.locking.lockdep import LockClass
from gemu.guest.locking.mutex import Mutex
from gemu.guest.mm import page_alloc

log = logging.getLogger("gemu.guest.gemu_drv")
_STATUS_HALTED = regs.STATUS.field("HALTED").mask

READ = BoAccess.READ
WRITE = BoAccess.WRITE
FENCE_WRITE = vgem_fence.VGEM_FENCE_WRITE
"""fence_attach flag: the external fence is a writer (vgem's VGEM_FENCE_WRITE)."""
DEFAULT_TIMEOUT_NS = 2_000_000_000
"""Job timeout before a hang is declared: panfrost's 500 ms, times four for an emulated GPU
that shares the host's cores with everything else."""
HOLD_SLACK_NS = 1_000_000  # guest and device clocks read apart by up to a round trip
CMD_POOL_SIZE = 256 << 10
SCHED_LOCK_CLASS = LockClass("gemu_file.sched_lock")
"""Lock class of every file's submit lock (arm + add fences + push run under it)."""


@dataclass(slots=True, eq=False)
class VmMapping:
    """A BO bound into a VM. Kernel: struct drm_gpuva (with panfrost_gem_mapping's is_mapped).

    ``mapped`` is True while the PTEs point at the BO's current frames; eviction clears it.
    ``next`` links the BO's mappings (panfrost_gem_mapping's ``node`` in the BO's
    ``mappings.list``).
    """

    vm: GpuVm
    va: int
    npages: int
    prot: Prot
    mapped: bool = False
    next: VmMapping | None = field(default=None, repr=False)


class GemuBo(gem_shmem.DrmGemShmemObject):
    """A BO of the gemu driver: the shmem object with the driver's fields added. Kernel:
    struct panfrost_gem_object, which embeds its drm_gem_shmem_object (made through the
    driver's gem_create_object hook, panfrost_gem_create_object()).

    ``mappings`` lists the VMs it is bound in (usually one), linked from ``mappings_head``;
    ``serial`` names it in messages unless it has a ``label``; ``pinned`` is set while the
    driver holds a pin of its own. ``label`` and ``pinned`` are rare fields
    (:class:`~gemu.guest.drm.gem.RareField`): a machine may hold 100k BOs.
    """

    __slots__ = ("gems_next", "gems_prev", "mappings_head", "serial")

    label: str | None = gem.RareField()
    pinned: bool = gem.RareField(False)

    def __init__(self) -> None:
        super().__init__()
        self.mappings_head: VmMapping | None = None
        self.serial = 0
        self.gems_prev: GemuBo | None = None  # links in the driver's BoList
        self.gems_next: GemuBo | None = None

    @property
    def obj(self) -> GemuBo:
        """The BO's GEM shmem object: the BO itself (the kernel's ``&bo->base``)."""
        return self

    @property
    def name(self) -> str:
        return self.label or f"bo{self.serial}"

    @property
    def mappings(self) -> tuple[VmMapping, ...]:
        """The BO's mappings, oldest first (a snapshot)."""
        out = []
        m = self.mappings_head
        while m is not None:
            out.append(m)
            m = m.next
        return tuple(out)

    def mapping(self, vm: GpuVm) -> VmMapping | None:
        m = self.mappings_head
        while m is not None and m.vm is not vm:
            m = m.next
        return m

    def add_mapping(self, m: VmMapping) -> None:
        """Link ``m`` last. Kernel: panfrost_gem_open()'s list_add_tail(&mapping->node, ...)"""
        m.next = None
        if self.mappings_head is None:
            self.mappings_head = m
            return
        last = self.mappings_head
        while last.next is not None:
            last = last.next
        last.next = m

    def remove_mapping(self, m: VmMapping) -> None:
        """Unlink ``m``. Kernel: panfrost_gem_close()'s list_del(&mapping->node)"""
        if self.mappings_head is m:
            self.mappings_head = m.next
        else:
            prev = self.mappings_head
            while prev is not None and prev.next is not m:
                prev = prev.next
            if prev is not None:
                prev.next = m.next
        m.next = None


class BoList:
    """The driver's live BOs in creation order, linked through the BOs themselves.

    Kernel: panfrost_device's ``debugfs.gems_list`` (panfrost_gem_debugfs_bo_add() and
    _rm() link each BO's list_head under ``gems_lock``). Two pointers a BO, where a dict
    costs an entry and its share of the table, about 50 bytes a BO at 100k BOs.

    Iterating (or ``values()``, as for the dict this replaces) gives a snapshot, so BOs may
    come and go meanwhile; ``bos[bo]`` and ``get(bo)`` give ``bo`` back if it is listed.
    """

    __slots__ = ("_count", "_head", "_lock", "_tail")

    def __init__(self) -> None:
        self._head: GemuBo | None = None
        self._tail: GemuBo | None = None
        self._count = 0
        self._lock = threading.Lock()  # gems_lock; no guest code runs under it

    def add(self, bo: GemuBo) -> None:
        """Link ``bo`` last. Kernel: panfrost_gem_debugfs_bo_add()"""
        with self._lock:
            bo.gems_prev, bo.gems_next = self._tail, None
            if self._tail is None:
                self._head = bo
            else:
                self._tail.gems_next = bo
            self._tail = bo
            self._count += 1

    def pop(self, bo: GemuBo, default: GemuBo | None = None) -> GemuBo | None:
        """Unlink ``bo``; return it, or ``default`` when it was not listed. Kernel:
        panfrost_gem_debugfs_bo_rm()"""
        with self._lock:
            if not self._listed(bo):
                return default
            prev, nxt = bo.gems_prev, bo.gems_next
            if prev is None:
                self._head = nxt
            else:
                prev.gems_next = nxt
            if nxt is None:
                self._tail = prev
            else:
                nxt.gems_prev = prev
            bo.gems_prev = bo.gems_next = None
            self._count -= 1
            return bo

    def _listed(self, bo: object) -> bool:
        return isinstance(bo, GemuBo) and (bo.gems_prev is not None or self._head is bo)

    def get(self, bo: object, default: GemuBo | None = None) -> GemuBo | None:
        with self._lock:
            return bo if self._listed(bo) else default

    def __getitem__(self, bo: object) -> GemuBo:
        found = self.get(bo)
        if found is None:
            raise KeyError(bo)
        return found

    def __contains__(self, bo: object) -> bool:
        return self.get(bo) is not None

    def values(self) -> list[GemuBo]:
        """The BOs, oldest first."""
        out = []
        with self._lock:
            bo = self._head
            for _ in range(self._count):  # the links cannot loop: count bounds the walk
                out.append(bo)
                bo = bo.gems_next
        return out

    def __iter__(self) -> Iterator[GemuBo]:
        return iter(self.values())

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"<BoList {self._count} BOs>"


_OUT_FENCE_LOCK = threading.Lock()
"""Orders closing an out-fence against taking a reference through it (every out-fence: the
kernel's syncobj table lock is per file, and these sections are a few instructions long)."""


class FreedJob:
    """What an out-fence tells of its job once the driver freed it (in the kernel the job's
    memory is gone then): where its command buffer was, for gdb's symbols, and why it failed,
    if it did (``message``; ``hw_fence`` is gone)."""

    __slots__ = ("ib_dwords", "ib_va", "message")
    hw_fence = None

    def __init__(self, ib_va: int, ib_dwords: int, message: str) -> None:
        self.ib_va = ib_va
        self.ib_dwords = ib_dwords
        self.message = message

    def __repr__(self) -> str:
        return f"<FreedJob ib_va={self.ib_va:#x} dwords={self.ib_dwords}>"


_JOB_FREED = object()
"""``GemuJob.out_fence`` once the job was freed (release_job_resources)."""


class JobFence:
    """The out-fence of a submit: its own reference on the job's finished fence, plus why the
    job failed, if it did.

    Kernel: the drm_syncobj or sync_file a submit ioctl fills in. drm_syncobj_replace_fence()
    and sync_file_create() take their own reference (dma_fence_get) and hold it until the
    object is destroyed: drm_syncobj_destroy() -> drm_syncobj_free() ->
    drm_syncobj_replace_fence(syncobj, NULL), or sync_file_release() -> dma_fence_put().
    :meth:`close` is that destruction; :meth:`GemuFile.close` closes the ones still open, as
    drm_syncobj_release() does for a file's handles.

    Invariant: while ``closed`` is False the fence has a reference from this object, so
    waiting for it or passing it as a dependency is always safe, however long ago the job was
    freed. A closed out-fence is refused like a destroyed handle (-ENOENT); ``signaled``,
    ``error`` and ``message`` then tell the state it had when it was closed.

    ``job`` is the job while the driver has it, then a :class:`FreedJob`: the out-fence keeps
    (command-buffer VA, dwords, message) of a freed GEM driver job, not the job (a client that
    never closes its out-fences would keep every job it ever submitted).
    """

    __slots__ = ("_error", "_job", "_signaled", "closed", "fence", "file", "seqno")

    def __init__(self, file: GemuFile | None, job: GemuJob, fence: DmaFence) -> None:
        self.file = file
        self._job: GemuJob | tuple[int, int, str] = job
        self.fence: DmaFence = dma_fence.get(fence)
        self.seqno = fence.seqno
        self.closed = False
        self._signaled = False
        self._error = 0

    def acquire(self) -> DmaFence:
        """A new reference on the fence, for the caller to put. Kernel:
        drm_syncobj_find_fence() (-ENOENT for a destroyed handle)."""
        with _OUT_FENCE_LOCK:
            if self.closed:
                raise Enoent(msg=f"out-fence of job {self.seqno} is closed")
            return dma_fence.get(self.fence)

    @property
    def signaled(self) -> bool:
        if self.closed:
            return self._signaled
        return dma_fence.is_signaled(self.fence)

    @property
    def error(self) -> int:
        return self._error if self.closed else self.fence.error

    @property
    def job(self) -> GemuJob | FreedJob:
        """The job, or what is left of it once freed (:class:`FreedJob`)."""
        job = self._job
        return FreedJob(*job) if type(job) is tuple else job

    def job_freed(self, job: GemuJob) -> None:
        """The driver freed ``job``: keep its command buffer's place and message only (a
        plain tuple, which the cyclic collector stops tracking)."""
        self._job = (job.ib_va, job.ib_dwords, gjob.job_error_message(job))

    @property
    def message(self) -> str:
        return gjob.job_error_message(self.job)

    def close(self) -> None:
        """Drop the out-fence's reference. Kernel: drm_syncobj_destroy()
        (DRM_IOCTL_SYNCOBJ_DESTROY) / sync_file_release().

        Raises:
            Enoent: already closed (a destroyed handle).
        """
        signaled = dma_fence.is_signaled(self.fence) if not self.closed else self._signaled
        with _OUT_FENCE_LOCK:
            if self.closed:
                raise Enoent(msg=f"out-fence of job {self.seqno} is already closed")
            self._signaled, self._error = signaled, self.fence.error
            self.closed = True
        if self.file is not None:
            with self.file.inflight_lock:
                self.file.out_fences.pop(self, None)
        dma_fence.put(self.fence)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "signaled" if self.signaled else "pending"
        return f"<JobFence {self.seqno} {state}>"


class AllocatorFrames:
    """Kernel memory (page tables, ring, fence page) from the page allocator.

    Kernel: alloc_page(GFP_KERNEL | __GFP_ZERO) for io-pgtable's tables, dma_alloc_coherent()
    for the ring (physically contiguous: alloc_contig).
    """

    def __init__(self, allocator) -> None:
        self.pa = page_alloc
        self.allocator = allocator
        self.mem = allocator.physmem.mem
        self.frames = 0

    def alloc_table_frame(self) -> int:
        pfn = self.allocator.alloc_page(self.pa.GFP_KERNEL | self.pa.Gfp.ZERO)
        self.frames += 1
        return pfn << 12

    def free_table_frame(self, pa: int) -> None:
        self.allocator.free_page(pa >> 12)
        self.frames -= 1

    def alloc_contiguous(self, npages: int) -> int | None:
        try:
            pfns = self.allocator.alloc_contig(npages, self.pa.GFP_KERNEL | self.pa.Gfp.ZERO)
        except KernelError:
            return None
        self.frames += npages
        return pfns[0] << 12

    def free_contiguous(self, pa: int, npages: int) -> None:
        first = pa >> 12
        self.allocator.free_pages(list(range(first, first + npages)))
        self.frames -= npages


class GemuDriver:
    """The gemu DRM driver bound to one GPU. Kernel: panfrost_device + panfrost_drm_driver.

    ``order`` picks the submit order (:class:`~.job.SubmitOrder`, CORRECT unless a test wants
    a wrong one); ``hooks`` lets tests act in the middle of a submit.
    """

    def __init__(
        self,
        dev: gem.DrmDevice,
        bus,
        frames: KernelFrames | None = None,
        *,
        order: SubmitOrder = SubmitOrder.CORRECT,
        timeout_ns: int = DEFAULT_TIMEOUT_NS,
        name: str = "gemu0",
        mutant: Mutant = Mutant.NONE,
        cmd_pool_size: int = CMD_POOL_SIZE,
    ) -> None:
        self.dev = dev
        self.frames = frames or AllocatorFrames(dev.allocator)
        self.gpu = GemuGpu(bus, self.frames, name=name)
        self.order = SubmitOrder.CORRECT
        self.mutant = Mutant.NONE
        self.cmd_pool_size = cmd_pool_size
        self.timeout_ns = timeout_ns
        self._tdr_job: GemuJob | None = None  # the job whose GPU time _tdr_left counts
        self._tdr_left = 0
        self.hooks = SubmitHooks()
        self.sched: drm_sched.DrmGpuScheduler | None = None
        self.files: list[GemuFile] = []
        self.bos = BoList()
        self.funcs = gem_shmem.FUNCS.replace(evict=self._evict, free=self._free)
        self._bo_serial = 0
        self.lock = threading.Lock()
        self.skip_reset_on_progress = False
        """v3d's and etnaviv's timeout policy: a job that times out while the GPU executed
        packets since the previous timeout is left running (NO_HANG) and the timer
        re-armed, instead of resetting the GPU. Off: panfrost's, every timeout resets."""
        self._timedout_packets = 0
        self.set_order(order)
        if mutant is not Mutant.NONE:
            self.set_mutant(mutant)

    def set_order(self, order: SubmitOrder) -> None:
        """Choose the submit order (the validation-order tests' switch)."""
        self.order = SubmitOrder(order)
        self.gpu.mmu.skip_flush = self.order is SubmitOrder.NO_TLB_FLUSH

    def set_mutant(self, mutant: Mutant) -> None:
        """Switch the driver to a deliberately wrong variant (``gemu explore --mutant``);
        :attr:`Mutant.NONE` is the working driver. Call before the first file is opened."""
        self.mutant = Mutant(mutant)
        self.set_order(self.mutant.order)
        if self.mutant is Mutant.IDLE_READ_FENCES_BOOKKEEP:
            self.dev.idle_usage = dma_resv.DmaResvUsage.READ
        self.gpu.mmu.alloc_tables_under_lock = self.mutant is Mutant.PT_ALLOC_UNDER_LOCK
        self.gpu.capture_may_reclaim = self.mutant is Mutant.RESET_ALLOCATES
        self._apply_shrinker_mutant()
        self._apply_sched_mutant()

    def _apply_shrinker_mutant(self) -> None:
        mm = self.dev.shmem_mm
        if mm is not None:
            mm.skip_busy_test = self.mutant is Mutant.SHRINKER_SKIPS_BUSY
            mm.blocking_lock = self.mutant is Mutant.SHRINKER_BLOCKING_LOCK
            mm.madvise_list_add = self.mutant is Mutant.MADVISE_LIST_ADD
            mm.scan_ticket = self.mutant is Mutant.SHRINKER_SCAN_TICKET
            mm.vunmap_clears_vaddr = self.mutant is Mutant.VUNMAP_CLEARS_VADDR
            mm.mmap_errant_put = self.mutant is Mutant.MMAP_ERRANT_PUT
        # Process-wide switches of the generic helpers: every probe sets them for its own
        # mutant (one machine at a time uses them: gemu explore).
        gem_lru.remove_reads_lru_unlocked = self.mutant is Mutant.GEM_LRU_REMOVE_UNLOCKED
        dma_resv.set_replaces_older(self.mutant is Mutant.RESV_REPLACE_OLDER)

    def _apply_sched_mutant(self) -> None:
        """The historical drm_sched variants (host/explore/bugs.py) on this driver's
        scheduler."""
        sched = self.sched
        if sched is not None:
            m = self.mutant
            sched.reinsert_on_false_timeout = m is not Mutant.NO_HANG_DROPS_JOB
            sched.kill_signals_scheduled = m is not Mutant.KILL_SKIPS_SCHEDULED
            sched.kill_waits_for_deps = m is not Mutant.KILL_SKIPS_DEPS
            sched.resv_dep_error_puts = m is Mutant.DEP_ERROR_DOUBLE_PUT
            sched.kill_puts_failed_prev = m is not Mutant.KILL_LEAKS_PREV

    # -- probe / remove --------------------------------------------------------------------
    def probe(self) -> None:
        """Kernel: panfrost_probe() — GPU up, scheduler up, shrinker registered."""
        self.gpu.probe()
        self.sched = drm_sched.init(
            gjob.GemuSchedOps(self),
            name=f"{self.gpu.name}-js0",
            credit_limit=self.gpu.ring_slots - 2,
            timeout_ns=self.timeout_ns,
        )
        if self.dev.shmem_mm is None:
            gem_shmem_shrinker.drmm_gem_shmem_init(self.dev)
        self._apply_shrinker_mutant()
        self._apply_sched_mutant()

    def remove(self) -> None:
        """Close every file, stop the scheduler and the GPU. Kernel: panfrost_remove()."""
        for f in list(self.files):
            f.close()
        if self.sched is not None:
            drm_sched.fini(self.sched)
            self.sched = None
        self.gpu.remove()

    def open(self) -> GemuFile:
        """Kernel: panfrost_open()."""
        f = GemuFile(self)
        self.files.append(f)
        return f

    # -- BO glue ---------------------------------------------------------------------------
    def _unmap_all(self, bo: GemuBo) -> None:
        for m in bo.mappings:
            if m.mapped:
                m.vm.unmap_pages(m.va, m.npages)  # TLB flush inside
                m.mapped = False

    def _evict(self, obj) -> None:
        """The shrinker's evict callback, wrapped: unmap from every VM (with TLB flush)
        before the helper frees the frames. Kernel: panfrost_gem_evict() / the v19 driver
        evict callback (panfrost_gem_shrinker: panfrost_gem_teardown_mappings_locked)."""
        bo = self.bos.get(obj)
        if self.mutant is Mutant.EVICT_FREES_BEFORE_UNMAP:
            gem_shmem_shrinker.default_evict(obj)  # wrong: frames freed while still mapped
            if bo is not None:
                self._unmap_all(bo)
            return
        if bo is not None:
            self._unmap_all(bo)
        gem_shmem_shrinker.default_evict(obj)

    def _free(self, obj) -> None:
        """Kernel: panfrost_gem_free_object() — unmap and give back VA, then the helper's free."""
        bo = self.bos.pop(obj, None)
        if bo is not None:
            self._unmap_all(bo)
            for m in bo.mappings:
                m.vm.free_va(m.va, m.npages * PAGE_SIZE)
            bo.mappings_head = None
            if bo.pinned:
                gem_shmem.unpin(obj)
                bo.pinned = False
            if obj.pages_use_count:
                gem_shmem.put_pages(obj)  # the reference new_bo took
        gem_shmem.object_free(obj)

    def new_bo(self, size: int, name: str | None = None) -> GemuBo:
        """Create a shmem BO with its pages (allocated, not pinned). Kernel:
        panfrost_gem_create() + drm_gem_shmem_get_pages()."""
        bo = gem_shmem.create(self.dev, gem.page_align(size), self.funcs, GemuBo)
        self._bo_serial += 1
        bo.serial = self._bo_serial
        bo.label = name
        self.bos.add(bo)
        try:
            gem_shmem.get_pages(bo)
        except BaseException:
            gem.put(bo)
            raise
        return bo

    # -- jobs ------------------------------------------------------------------------------
    def release_job_resources(self, job: GemuJob) -> None:
        """Give back what a job held: AS user, command space, BO references."""
        f = job.file
        if job.as_held:
            self.gpu.mmu.as_put(job.vm)
            job.as_held = False
        if job.cmd_chunk is not None:
            job.file.cmd_pool.free(job.cmd_chunk)
            job.cmd_chunk = None
        for ref in job.refs:
            gem.put(ref.bo.obj)
        job.refs = ()
        lock = f.inflight_lock
        lock.acquire()  # (not a with-block, which binds __enter__/__exit__ on every use)
        try:
            f.inflight -= 1
            # the out-fence keeps what it needs of the job from now on (or, made later, is
            # told so by the submit: see GemuFile._submit)
            out, job.out_fence = job.out_fence, _JOB_FREED
            if type(out) is JobFence:
                out.job_freed(job)
        finally:
            lock.release()
        f.idle_wq.wake_up_all()

    def recover(self, job: GemuJob) -> drm_sched.DrmGpuSchedStat:
        """A job timed out: reset the GPU, fail it, resubmit the innocent ones.

        Kernel: panfrost_job_timedout() → panfrost_reset(): drm_sched_stop, GPU soft reset,
        re-emit the jobs that were queued behind the hung one, drm_sched_start. Everything
        after drm_sched_stop is needed to signal the pending jobs' fences: it runs in a fence
        signalling section (no reclaimable allocation, no resv lock, no fence wait there).
        """
        hw = job.hw_fence
        if hw is not None and dma_fence.is_signaled(hw):
            return drm_sched.DrmGpuSchedStat.NO_HANG
        try:
            halted = self.gpu.bus.readl(regs.STATUS.offset) & _STATUS_HALTED
        except (ConnectionError, OSError) as exc:  # DeviceGone: the interrupt task fails the jobs
            log.error("%s: job %d timed out and the device is lost: %s", self.gpu.name, job.id, exc)
            return drm_sched.DrmGpuSchedStat.ENODEV
        left = self._gpu_time_left(job)
        if halted or left > 0:
            # a debugger holds (or held) the command processor: the time it held does not
            # count, the job gets what is left of its timeout in GPU time
            if left > 0:
                drm_sched.resume_timeout(self.sched, left)
            return drm_sched.DrmGpuSchedStat.NO_HANG
        if self.skip_reset_on_progress:
            # v3d_gpu_reset_for_timeout() / etnaviv_sched_timedout_job(): the GPU made
            # progress since the last timeout, so give the job more time
            packets = self.gpu.bus.readl(regs.CP_PACKETS.offset)
            if packets != self._timedout_packets:
                self._timedout_packets = packets
                return drm_sched.DrmGpuSchedStat.NO_HANG
        sched = self.sched
        ms = self.timeout_ns // 1_000_000
        message = f"job {job.id} timed out after {ms} ms (GPU hang): GPU reset"
        if trace.enabled:
            trace.instant("sched", "timeout", job=job.id, timeout_ms=ms)
        job.message = message
        drm_sched.stop(sched, job)
        cookie = lockdep.dma_fence_begin_signalling()
        try:
            return self._reset_and_restart(job, hw, message)
        except (ConnectionError, OSError) as exc:
            # the device went away during the reset (DeviceGone): nothing can run again, so
            # every job stopped above finishes with -ENODEV (drm_dev_unplug's outcome)
            log.error("%s: %s failed, the device is lost: %s", self.gpu.name, message, exc)
            drm_sched.start(sched, -errno.ENODEV)
            return drm_sched.DrmGpuSchedStat.ENODEV
        finally:
            lockdep.dma_fence_end_signalling(cookie)

    def _gpu_time_left(self, job: GemuJob) -> int:
        """Nanoseconds of GPU time the timed-out ``job`` still has (<= 0: it is hung).

        The device clock (TIMESTAMP) stops while a debugger holds the command processor, so
        the guest clock running ahead of it is time held. A job's first expiry charges it a
        whole timeout less the time held since the last reading (readings are taken after
        each reset and at each expiry, so a hold that ended before the job started can only
        make it more lenient once); a later expiry of the same job charges the device time
        since the previous one. Deterministic runs have no debugger and keep the plain
        timeout (their device clock is stepped).
        """
        anchor = self.gpu.clock_anchor
        if anchor is None:
            return 0
        now = self.gpu.device_clock()
        self.gpu.clock_anchor = now
        ran = now[1] - anchor[1]
        if self._tdr_job is job:
            left = self._tdr_left - ran
        else:
            held = (now[0] - anchor[0]) - ran
            left = min(held, self.timeout_ns) if held > HOLD_SLACK_NS else 0
        self._tdr_job, self._tdr_left = job, left
        return left

    def schedule_reset(self, message: str, done: Callable[[], None] | None = None) -> None:
        """Reset the GPU with no job to blame (a host's system_reset): queued on the
        scheduler's timeout workqueue, so it never runs beside a job timeout's reset.
        ``done`` is called once the GPU runs again.

        Kernel: panfrost_device_schedule_reset() → panfrost_reset_work() →
        panfrost_reset(pfdev, NULL): drm_sched_stop, soft reset, re-emit every job that had
        not finished, drm_sched_start.
        """

        def work() -> None:
            drm_sched.stop(self.sched, None)
            cookie = lockdep.dma_fence_begin_signalling()
            try:
                self._reset_and_restart(None, None, message)
            except (ConnectionError, OSError) as exc:  # DeviceGone, as in recover()
                log.error("%s: %s failed, the device is lost: %s", self.gpu.name, message, exc)
                drm_sched.start(self.sched, -errno.ENODEV)
            finally:
                lockdep.dma_fence_end_signalling(cookie)
            if done is not None:
                done()

        drm_sched.queue_tdr_work(self.sched, work)

    def _reset_and_restart(
        self, job: GemuJob | None, hw, message: str
    ) -> drm_sched.DrmGpuSchedStat:
        sched = self.sched
        with sched.job_list_lock:
            pending = list(sched.pending_list)
        for j in pending:
            j.as_held = False
        self.gpu.crashstate_capture(hw, message)
        self.gpu.reset(hw, message)
        resubmitted = 0
        for j in pending:
            if j is job or j.s_fence.parent is not None:
                continue
            try:
                fence = sched.ops.run_job(j)
            except KernelError as exc:
                j.message = f"lost in GPU reset and could not be resubmitted: {exc}"
                continue
            if fence is not None:
                j.s_fence.parent = dma_fence.get(fence)
                resubmitted += 1
        self.gpu.stats.resubmitted += resubmitted
        log.error("%s: %s; %d innocent job(s) resubmitted", self.gpu.name, message, resubmitted)
        if hw is not None:
            # the reset signalled the hung job's ring fence with -ETIMEDOUT; drm_sched_start
            # hands that error to its finished fence
            job.s_fence.parent = dma_fence.get(hw)
        drm_sched.start(sched, 0)
        return drm_sched.DrmGpuSchedStat.RESET

    def cpu_access(self, bo: GemuBo, offset: int, size: int, data: bytes | None) -> bytes:
        """Read (``data`` None) or write a BO through its CPU mapping.

        Kernel: drm_gem_shmem_fault() behind the mmap: the fault swaps an evicted BO in
        (or raises SIGBUS when it was purged); the copy then runs with the resv held, so the
        shrinker cannot take the frames in the middle of it (it would zap the mapping and the
        access would fault again, which is the retry here).
        """
        obj = bo.obj
        if offset < 0 or size < 0 or offset + size > obj.size:
            raise Einval(msg=f"access {offset}+{size} outside {bo.name} ({obj.size} bytes)")
        mem = self.frames.mem
        while True:
            gem_shmem.fault(obj, offset & ~(PAGE_SIZE - 1))  # swap-in; SigBus when purged
            dma_resv.lock(obj.resv, None)
            try:
                pages = obj.pages
                if pages is None or obj.evicted:
                    continue  # reclaimed between the fault and the lock: fault again
                out = bytearray()
                pos, end = offset, offset + size
                while pos < end:
                    page, in_page = divmod(pos, PAGE_SIZE)
                    k = min(end - pos, PAGE_SIZE - in_page)
                    pa = (pages[page] << 12) + in_page
                    if data is None:
                        out += mem[pa : pa + k]
                    else:
                        mem[pa : pa + k] = data[pos - offset : pos - offset + k]
                    pos += k
                return bytes(out)
            finally:
                dma_resv.unlock(obj.resv)


class CmdPool:
    """Command-buffer space of a file: one pinned BO mapped read+exec in the file's VM,
    handed out first-in first-out (jobs of one file finish in order). Kernel: amdgpu's IB
    suballocator (amdgpu_sa) in spirit."""

    def __init__(self, f: GemuFile, size: int | None = None) -> None:
        self.file = f
        drv = f.drv
        self.bo = drv.new_bo(size or drv.cmd_pool_size, name=f"{f.name}-cmdpool")
        obj = self.bo.obj
        if drv.mutant is not Mutant.CPU_MAP_GET_PAGES:
            gem_shmem.pin(obj)
            self.bo.pinned = True
        # else (the mutant): only new_bo's get_pages holds the pages, which does not keep
        # them in place; the CPU keeps writing to the frames looked up below
        self.size = obj.size
        self.va = f.vm.alloc_va(self.size)
        m = VmMapping(f.vm, self.va, obj.npages, Prot.READ | Prot.EXEC)
        self.bo.add_mapping(m)
        dma_resv.lock(obj.resv, None)
        try:
            pfns = gem_shmem.get_pages_sgt_locked(obj).pfns
        finally:
            dma_resv.unlock(obj.resv)
        self.pas = [pfn << 12 for pfn in pfns]
        f.vm.map_pages(self.va, self.pas, m.prot)
        m.mapped = True
        self.mem = drv.frames.mem
        self.head = 0  # oldest live byte
        self.tail = 0  # next free byte
        self.used = 0
        self.chunks: deque[list] = deque()  # [start, size, freed]
        self.wq = runtime.WaitQueue(f"{f.name}.cmdpool")
        self.lock = threading.Lock()

    def alloc(self, data: bytes) -> tuple[list, int]:
        """Copy ``data`` into the pool; returns (chunk, GPU VA). Waits for old jobs if full."""
        n = (len(data) + 3) & ~3
        if n > self.size // 2:
            raise Einval(msg=f"command buffer of {len(data)} bytes exceeds {self.size // 2}")
        lock = self.lock
        while True:
            lock.acquire()  # (not a with-block, which binds __enter__/__exit__ on every use)
            try:
                start = self.tail
                if start + n > self.size:
                    waste = self.size - start
                    start = 0
                else:
                    waste = 0
                if self.used + waste + n <= self.size:
                    if waste:
                        self.chunks.append([self.tail, waste, True])
                    chunk = [start, n, False]
                    self.chunks.append(chunk)
                    self.used += waste + n
                    self.tail = (start + n) % self.size
                    break
            finally:
                lock.release()
            self.wq.wait_event(lambda: self._room(n), timeout_ns=5_000_000_000)
        self._copy(start, data)
        return chunk, self.va + start

    def _room(self, n: int) -> bool:
        with self.lock:
            return self.used + 2 * n <= self.size or not self.chunks

    def _copy(self, off: int, data: bytes) -> None:
        mem, pas = self.mem, self.pas
        in_page = off & (PAGE_SIZE - 1)
        if in_page + len(data) <= PAGE_SIZE:  # one page: most command buffers
            pa = pas[off // PAGE_SIZE] + in_page
            mem[pa : pa + len(data)] = data
            return
        pos = 0
        while pos < len(data):
            page, in_page = divmod(off + pos, PAGE_SIZE)
            k = min(len(data) - pos, PAGE_SIZE - in_page)
            pa = pas[page] + in_page
            mem[pa : pa + k] = data[pos : pos + k]
            pos += k

    def free(self, chunk: list) -> None:
        lock = self.lock
        lock.acquire()
        try:
            chunk[2] = True
            chunks = self.chunks
            while chunks and chunks[0][2]:
                self.used -= chunks.popleft()[1]
            if not chunks:
                self.used = 0
        finally:
            lock.release()
        self.wq.wake_up_all()

    def destroy(self) -> None:
        obj = self.bo.obj
        gem.put(obj)


class CpuMap:
    """A CPU mapping of a BO (mmap of the fake offset). Every access goes through the fault
    path: a page that was evicted is swapped in first; a purged BO raises SIGBUS.

    Kernel: drm_gem_shmem_fault() behind the mmap.
    """

    def __init__(self, f: GemuFile, bo: GemuBo) -> None:
        self.file = f
        self.bo = bo

    def read(self, offset: int, size: int) -> bytes:
        return self.file.drv.cpu_access(self.bo, offset, size, None)

    def write(self, offset: int, data: bytes) -> None:
        self.file.drv.cpu_access(self.bo, offset, len(data), data)


class GemuFile:
    """An open file of the gemu driver: handles, a GPU VM, a scheduler entity.

    Kernel: struct drm_file + struct panfrost_file_priv. Every public method models one ioctl
    (or the mmap of a BO).
    """

    _serial = 0

    def __init__(self, drv: GemuDriver) -> None:
        GemuFile._serial += 1
        self.drv = drv
        self.name = f"file{GemuFile._serial}"
        self.drm = gem.DrmFile(drv.dev)
        self.vm = GpuVm(drv.gpu.mmu, self.name)
        self.entity = drm_sched.entity_init(drm_sched.DrmSchedPriority.NORMAL, [drv.sched])
        self.submit_lock = Mutex(f"{self.name}.sched_lock", SCHED_LOCK_CLASS)
        self.inflight = 0
        self.inflight_lock = threading.Lock()
        self.idle_wq = runtime.WaitQueue(f"{self.name}.idle")
        self.cmd_pool = CmdPool(self)
        self.ext_fences = vgem_fence.VgemFenceTable(self.name)
        # a dict, not a set: close() walks it, and its order must not depend on addresses
        # (a schedule is a pure function of its seed)
        self.out_fences: dict[JobFence, None] = {}
        """The out-fences not closed yet (the file's syncobj handles), under inflight_lock."""
        self.closed = False

    # -- BOs -------------------------------------------------------------------------------
    def _lookup(self, handle: int) -> GemuBo:
        obj = gem.object_lookup(self.drm, handle)
        if obj is None:
            raise Enoent(msg=f"no BO handle {handle} in {self.name}")
        gem.put(obj)
        return self.drv.bos[obj]

    def create_bo(self, size: int, name: str | None = None) -> int:
        """DRM_IOCTL_GEMU_CREATE_BO: a new shmem BO; returns its handle."""
        bo = self.drv.new_bo(size, name)
        handle = gem.handle_create(self.drm, bo.obj)
        gem.put(bo.obj)
        return handle

    def bo(self, handle: int) -> GemuBo:
        return self._lookup(handle)

    def close_bo(self, handle: int) -> None:
        """DRM_IOCTL_GEM_CLOSE. A BO still used by a job lives until the job is freed."""
        self._lookup(handle)
        gem.handle_delete(self.drm, handle)

    def mmap(self, handle: int) -> CpuMap:
        """mmap of the BO: every access faults pages in (swap-in) or SIGBUSes (purged)."""
        return CpuMap(self, self._lookup(handle))

    def write(self, handle: int, offset: int, data: bytes) -> None:
        self.mmap(handle).write(offset, data)

    def read(self, handle: int, offset: int, size: int) -> bytes:
        return self.mmap(handle).read(offset, size)

    def madvise(self, handle: int, willneed: bool) -> bool:
        """DRM_IOCTL_GEMU_MADVISE: returns whether the BO still has its contents (retained).

        Kernel: panfrost_ioctl_madvise() → drm_gem_shmem_madvise().
        """
        bo = self._lookup(handle)
        return bool(gem_shmem.madvise(bo.obj, 0 if willneed else 1))

    def pin(self, handle: int) -> None:
        """Pin the BO's pages (never evicted or purged until unpinned). Kernel:
        drm_gem_shmem_pin()."""
        bo = self._lookup(handle)
        gem_shmem.pin(bo.obj)
        bo.pinned = True

    def unpin(self, handle: int) -> None:
        bo = self._lookup(handle)
        gem_shmem.unpin(bo.obj)
        bo.pinned = False

    # -- VM --------------------------------------------------------------------------------
    def vm_bind(self, handle: int, va: int | None = None, prot: Prot | None = None) -> int:
        """DRM_IOCTL_GEMU_VM_BIND: reserve a GPU VA range for the BO; returns the VA. The
        pages are mapped by the next submit that lists the BO (validation)."""
        bo = self._lookup(handle)
        if bo.mapping(self.vm) is not None:
            raise Einval(msg=f"{bo.name} is already bound in {self.name}")
        obj = bo.obj
        addr = self.vm.alloc_va(obj.size, va)
        prot = Prot.READ | Prot.WRITE | Prot.EXEC if prot is None else Prot(prot)
        bo.add_mapping(VmMapping(self.vm, addr, obj.npages, prot))
        return addr

    def vm_unbind(self, handle: int) -> None:
        """DRM_IOCTL_GEMU_VM_UNBIND: unmap (with TLB flush) and free the VA. The BO must be
        idle in this VM (no unsignalled fence)."""
        bo = self._lookup(handle)
        m = bo.mapping(self.vm)
        if m is None:
            raise Einval(msg=f"{bo.name} is not bound in {self.name}")
        obj = bo.obj
        dma_resv.lock(obj.resv, None)
        try:
            if not dma_resv.test_signaled(obj.resv, dma_resv.DmaResvUsage.BOOKKEEP):
                from gemu.guest.errors import Ebusy

                raise Ebusy(msg=f"{bo.name} is still used by a job")
            if m.mapped:
                self.vm.unmap_pages(m.va, m.npages)
            bo.remove_mapping(m)
            self.vm.free_va(m.va, m.npages * PAGE_SIZE)
        finally:
            dma_resv.unlock(obj.resv)

    def va_of(self, handle: int) -> int:
        m = self._lookup(handle).mapping(self.vm)
        if m is None:
            raise Einval(msg=f"handle {handle} is not bound")
        return m.va

    # -- submit / wait ---------------------------------------------------------------------
    def submit(
        self,
        cmd: bytes | tuple[int, int, int],
        bos: Iterable[tuple[int, BoAccess | int]] = (),
        in_fences: Sequence[JobFence | DmaFence] = (),
    ) -> JobFence:
        """DRM_IOCTL_GEMU_SUBMIT: run a command buffer on the GPU.

        ``cmd`` is packet bytes (copied into the file's command pool) or ``(handle, offset,
        size)`` of a BO that holds them (the BO is validated like the others, for READ).
        ``bos`` lists every BO the commands touch with READ and/or WRITE. ``in_fences`` are
        waited for before the job runs. Returns the out-fence.
        """
        if self.closed:
            raise Einval(msg=f"{self.name} is closed")
        deps = self._lookup_in_fences(in_fences) if in_fences else ()
        try:
            return self._submit(cmd, bos, deps)
        finally:
            for f in deps:  # job_add_dependency took references of its own
                dma_fence.put(f)

    def _lookup_in_fences(self, in_fences: Sequence[JobFence | DmaFence]) -> list[DmaFence]:
        """A reference on each in-fence. Kernel: panfrost_copy_in_sync()'s
        drm_syncobj_find_fence() (-ENOENT for a closed out-fence)."""
        deps: list[DmaFence] = []
        try:
            for f in in_fences:
                deps.append(f.acquire() if isinstance(f, JobFence) else dma_fence.get(f))
        except BaseException:
            for f in deps:
                dma_fence.put(f)
            raise
        return deps

    def _submit(self, cmd, bos, deps: list[DmaFence]) -> JobFence:
        refs: list[BoRef] = []
        seen: dict[int, BoRef] = {}
        try:
            for handle, access in bos:
                self._add_ref(refs, seen, handle, BoAccess(access))
            chunk = None
            if isinstance(cmd, (bytes, bytearray, memoryview)):
                data = bytes(cmd)
                if not data or len(data) % 4:
                    raise Einval(msg=f"command buffer must be whole dwords, not {len(data)} bytes")
                chunk, ib_va = self.cmd_pool.alloc(data)
                ib_dwords = len(data) // 4
            else:
                handle, offset, size = cmd
                if size <= 0 or size % 4 or offset % 4:
                    raise Einval(msg="command buffer offset and size must be whole dwords")
                ref = self._add_ref(refs, seen, handle, BoAccess.READ)
                if offset + size > ref.bo.obj.size:
                    raise Einval(msg=f"command buffer {offset}+{size} outside {ref.bo.name}")
                m = ref.bo.mapping(self.vm)
                if m is None:
                    raise Einval(msg=f"command BO {ref.bo.name} is not bound (vm_bind it)")
                ib_va, ib_dwords = m.va + offset, size // 4
        except BaseException:
            for r in refs:
                gem.put(r.bo.obj)
            raise
        job = GemuJob(self, refs, ib_va, ib_dwords, chunk)
        lock = self.inflight_lock
        lock.acquire()  # (not a with-block, which binds __enter__/__exit__ on every use)
        try:
            self.inflight += 1
        finally:
            lock.release()
        job.in_fences = deps
        finished = gjob.submit(self.drv, job)
        job.in_fences = ()
        out = JobFence(self, job, finished)
        # the end of panfrost_ioctl_submit(): the out-fence holds its own reference now, the
        # submit's (render_done_fence, put with the job) goes
        dma_fence.put(finished)
        lock.acquire()
        try:
            self.out_fences[out] = None
            if job.out_fence is _JOB_FREED:  # the job ran and was freed meanwhile
                out.job_freed(job)
            else:
                job.out_fence = out
        finally:
            lock.release()
        return out

    def _add_ref(self, refs, seen, handle: int, access: BoAccess) -> BoRef:
        if not access or access & ~(BoAccess.READ | BoAccess.WRITE):
            raise Einval(msg=f"bad access flags {int(access):#x} for handle {handle}")
        obj = gem.object_lookup(self.drm, handle)
        if obj is None:
            raise Enoent(msg=f"no BO handle {handle} in {self.name}")
        if id(obj) in seen:
            gem.put(obj)
            ref = seen[id(obj)]
            ref.access |= access
            return ref
        ref = BoRef(self.drv.bos[obj], access)
        refs.append(ref)
        seen[id(obj)] = ref
        return ref

    def wait(self, fence: JobFence | DmaFence, timeout: float | None = 10.0) -> None:
        """DRM_IOCTL_GEMU_WAIT: wait for a job. Raises Etimedout when it did not finish in
        ``timeout`` seconds, or the job's error (with the GPU's message) when it failed."""
        f = fence.acquire() if isinstance(fence, JobFence) else dma_fence.get(fence)
        try:
            ns = dma_fence.MAX_SCHEDULE_TIMEOUT if timeout is None else int(timeout * 1e9)
            if dma_fence.wait_timeout(f, True, ns) == 0:
                raise Etimedout(msg=f"job fence {f.seqno} not signalled within {timeout} s")
            error = f.error
        finally:
            dma_fence.put(f)
        if error:
            msg = fence.message if isinstance(fence, JobFence) else ""
            raise KernelError(-error, msg or f"job failed with {error}")

    # -- external fences (vgem's fence ioctls) ----------------------------------------------
    def fence_attach(self, handle: int, flags: int = 0) -> int:
        """DRM_IOCTL_GEMU_FENCE_ATTACH: make the BO busy from outside the GPU with a new
        fence, a writer with :data:`FENCE_WRITE` (readers and writers wait for it), else a
        reader (writers wait); returns the fence's id in this file. The fence signals with
        :meth:`fence_signal`, or by itself after 10 s of guest time.

        Kernel: vgem_fence_attach_ioctl() (DRM_IOCTL_VGEM_FENCE_ATTACH).

        Raises:
            Enoent: no such handle. Einval: unknown flags.
            Ebusy: a conflicting fence is pending (a writer, or any fence for a writer).
        """
        bo = self._lookup(handle)
        return self.ext_fences.attach(bo.obj, flags)

    def fence_signal(self, fence_id: int) -> None:
        """DRM_IOCTL_GEMU_FENCE_SIGNAL: signal (and forget) an external fence.

        Kernel: vgem_fence_signal_ioctl() (DRM_IOCTL_VGEM_FENCE_SIGNAL).

        Raises:
            Enoent: no such fence (or already signalled through this call).
            Etimedout: it had expired before (its 10 s timer signalled it).
        """
        self.ext_fences.signal(fence_id)

    def wait_bo(self, handle: int, timeout: float = 10.0) -> None:
        """DRM_IOCTL_GEMU_WAIT_BO: wait until no fence (GPU job or external) of the BO is
        pending, readers and writers alike. ``timeout`` 0 only asks whether it is busy.

        Kernel: panfrost_ioctl_wait_bo() (dma_resv_wait_timeout with DMA_RESV_USAGE_READ;
        0 left becomes -ETIMEDOUT, or -EBUSY for a zero timeout).

        Raises:
            Enoent: no such handle.
            Ebusy: ``timeout`` is 0 and the BO is busy.
            Etimedout: still busy after ``timeout`` seconds.
        """
        bo = self._lookup(handle)
        ns = int(timeout * 1e9)
        if ns < 0:
            raise Einval(msg=f"wait_bo: negative timeout {timeout}")
        usage = dma_resv.DmaResvUsage.READ
        if dma_resv.wait_timeout(bo.obj.resv, usage, True, ns) == 0:
            if ns == 0:
                raise Ebusy(msg=f"{bo.name} is busy")
            raise Etimedout(msg=f"{bo.name} still busy after {timeout} s")

    def close(self, exiting: bool = False) -> None:
        """Kernel: panfrost_postclose() — flush the entity, drop handles, destroy the VM.

        ``exiting``: the last close of a process being killed (SIGKILL, PF_EXITING): the
        entity's queue gets drm_sched_entity_flush()'s bounded wait and the jobs still queued
        are killed (-ESRCH) instead of run.
        """
        if self.closed:
            return
        self.closed = True
        self.ext_fences.close()  # vgem_fence_close(): jobs may wait on them (implicit deps)
        drm_sched.entity_destroy(self.entity, exiting)
        self.idle_wq.wait_event(lambda: self.inflight == 0)
        with self.inflight_lock:
            still_open = list(self.out_fences)
        for out in still_open:  # drm_syncobj_release(): the handles the file still has
            with contextlib.suppress(Enoent):  # closed meanwhile by its owner
                out.close()
        gem.release(self.drm)
        self.cmd_pool.destroy()
        # BOs still referenced elsewhere (other files) keep their mapping objects of this VM;
        # drop those before the page tables go.
        for bo in list(self.drv.bos.values()):
            m = bo.mapping(self.vm)
            if m is not None:
                bo.remove_mapping(m)
        self.vm.fini()
        if self in self.drv.files:
            self.drv.files.remove(self)


__all__ = [
    "FENCE_WRITE",
    "READ",
    "WRITE",
    "BoAccess",
    "CpuMap",
    "GemuBo",
    "GemuDriver",
    "GemuFile",
    "JobFence",
    "Mutant",
    "SubmitOrder",
]
