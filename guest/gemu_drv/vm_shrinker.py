"""DOC: per-VM reclaim of the VM_BIND flavour, after Panthor's 2026 GEM shrinker.

Reclaim decides per BO and per VM. Every BO has a *reclaim state*, recomputed under its resv
and its gpuva lock whenever an input changes (bind, unbind cleanup, pin/unpin, validate,
eviction), and sits on the LRU of that state::

    UNUSED                 no GPU mapping               reclaim.unused
    GPU_MAPPED_SINGLE_VM   mapped (not evicted) in 1 VM  vm.reclaim_lru  (the VM on reclaim.vms)
    GPU_MAPPED_MULTI_VM    mapped in 2 or more VMs       reclaim.gpu_mapped_shared
    UNRECLAIMABLE          no pages, or pinned          no LRU

The scan walks ``unused``, then the VMs' LRUs in VM order (``reclaim.vms``: the least recently
active VM first; :func:`vm_active` moves a VM to the tail when it runs a job), then
``gpu_mapped_shared``. Each object is offered to :func:`try_evict` with its resv trylocked by
``drm_gem_lru_scan``; it trylocks the object's gpuva lock and the resv of every VM it is
external to (a VM-private object's resv *is* its VM's, so it is evicted under its VM's resv),
marks it evicted in every VM that maps it (``drm_gpuvm_bo_gem_evict``), clears its PTEs in
every VM with a TLB flush, and writes it to swap. The next exec on each VM revalidates it
(:mod:`.vm_exec`). An object whose eviction failed without a decision (a contended trylock)
counts as remaining ("drm/gem: Consider GEM object reclaimable if shrinking fails"), and the
scan returns 0 instead of SHRINK_STOP so reclaim comes back, at most twice in a row::

    reclaim = VmReclaim(dev)                       # panthor_gem_shrinker_init()
    reclaim.register()
    ...
    freed = dev.allocator.direct_reclaim(nr)       # scan_objects: unused, per VM, shared
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from gemu.guest.dma_buf import dma_resv
from gemu.guest.dma_buf.dma_resv import DmaResvUsage
from gemu.guest.drm import drm_gpuvm, gem, gem_lru, gem_shmem
from gemu.guest.drm.gem_lru import DrmGemLru
from gemu.guest.errors import KernelError, warn_on
from gemu.guest.gemu_drv.job import Mutant
from gemu.guest.locking.lockdep import LockClass
from gemu.guest.locking.mutex import Mutex
from gemu.guest.mm.shrinker import (
    SHRINK_EMPTY,
    SHRINK_STOP,
    ShrinkControl,
    Shrinker,
    register_shrinker,
    unregister_shrinker,
)

if TYPE_CHECKING:
    from gemu.guest.gemu_drv.vm_bind import GemuVm

GEM_LRU_LOCK_CLASS = LockClass("&dev->gem_lru_mutex")

__all__ = [
    "ReclaimState",
    "VmReclaim",
    "evaluate_reclaim_state_locked",
    "try_evict",
    "update_reclaim_state_locked",
    "vm_active",
]


class ReclaimState(enum.IntEnum):
    """Kernel: enum panthor_gem_reclaim_state (the merged names; easiest to reclaim first,
    so ``old < new`` means the object became harder to reclaim)."""

    UNUSED = 0
    GPU_MAPPED_SINGLE_VM = 1
    GPU_MAPPED_MULTI_VM = 2
    UNRECLAIMABLE = 3


class VmReclaimStats:
    """Counters: scans, objects evicted, objects skipped (busy, contended, harder now),
    ``last_scan`` (pages reclaimed by the last scan: debugfs ``nr_pages_reclaimed_on_last_scan``),
    ``swapped_in`` (evicted objects brought back, by validate or a CPU fault)."""

    __slots__ = (
        "contended",
        "evicted",
        "harder",
        "last_scan",
        "scans",
        "skipped_busy",
        "swapped_in",
    )

    def __init__(self) -> None:
        self.scans = self.evicted = self.contended = self.harder = self.skipped_busy = 0
        self.last_scan = self.swapped_in = 0

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


class VmReclaim:
    """The device's reclaim state. Kernel: ``panthor_device::reclaim`` with the LRU lock of
    "drm/gem: Make the GEM LRU lock part of drm_device" (``dev->gem_lru_mutex``): one mutex
    guards every LRU and the VM list.

    ``vms`` holds the VMs with private reclaimable BOs, least recently active first.
    ``retry_count`` caps how often a scan that freed nothing but met contention asks reclaim
    to come back (``panthor_gem_shrinker_scan``).
    """

    def __init__(self, dev: gem.DrmDevice) -> None:
        self.dev = dev
        self.lock = Mutex(f"{dev.unique}:gem_lru_mutex", GEM_LRU_LOCK_CLASS)
        self.unused = DrmGemLru(self.lock, "unused")
        self.gpu_mapped_shared = DrmGemLru(self.lock, "gpu_mapped_shared")
        self.vms: list[GemuVm] = []
        self.records: dict = {}
        """shmem object -> the driver's record of it (``reclaim_state``, ``reclaimed_count``)."""
        self.retry_count = 0
        self.mutant = Mutant.NONE
        """The driver's :class:`~.job.Mutant` (``evict-marks-one-vm`` acts here)."""
        self.stats = VmReclaimStats()
        self.shrinker = Shrinker(
            f"{dev.unique}-vm-bind", self.count_objects, self.scan_objects, private_data=self
        )

    def register(self) -> None:
        """Kernel: panthor_gem_shrinker_init() (shrinker_alloc + shrinker_register)."""
        register_shrinker(self.dev.allocator, self.shrinker)

    def unregister(self) -> None:
        """Kernel: panthor_gem_shrinker_unplug() (shrinker_free)."""
        if self.shrinker.allocator is not None:
            unregister_shrinker(self.dev.allocator, self.shrinker)

    def _lrus(self) -> list[DrmGemLru]:
        return [self.unused, self.gpu_mapped_shared, *(vm.reclaim_lru for vm in self.vms)]

    def _can_swap(self) -> bool:
        swap = self.dev.swap
        return swap is not None and swap.get_nr_swap_pages() > 0

    def count_objects(self, sc: ShrinkControl) -> int:
        """Pages on every LRU, or SHRINK_EMPTY. Kernel: panthor_gem_shrinker_count().

        Like the kernel's, the read is a hint taken without the BO locks. Without swap
        nothing is reclaimable: Panthor has no discard flag (no purge).
        """
        if not self._can_swap():
            return SHRINK_EMPTY
        with self.lock:
            count = sum(lru.count for lru in self._lrus())
        return min(count, SHRINK_EMPTY - 1) if count else SHRINK_EMPTY

    def scan_objects(self, sc: ShrinkControl) -> int:
        """Evict up to ``sc.nr_to_scan`` pages: unused BOs, then each VM's private BOs (least
        recently active VM first), then BOs mapped in several VMs.

        Kernel: panthor_gem_shrinker_scan() (stages 1, 4 and 5; gemu has no MMAPPED state,
        and every caller may block, so the GPU-mapped stages always run).

        Returns the pages freed; 0 (come back) when nothing was freed but some objects were
        contended, at most twice in a row; otherwise SHRINK_STOP.
        """
        self.stats.scans += 1
        nr = sc.nr_to_scan
        remaining = gem_lru.Remaining()
        freed = 0
        if self._can_swap():
            freed += gem_lru.scan(self.unused, nr, remaining, self._shrink(remaining))
            if freed < nr:
                freed += self._reclaim_priv_bos(nr - freed, remaining)
            if freed < nr:
                freed += gem_lru.scan(
                    self.gpu_mapped_shared, nr - freed, remaining, self._shrink(remaining)
                )
        self.stats.last_scan = freed
        if freed == 0 and remaining.pages > 0:
            self.retry_count += 1
            if self.retry_count < 2:
                return 0
        self.retry_count = 0
        return freed if freed else SHRINK_STOP

    def _shrink(self, remaining: gem_lru.Remaining):
        """The scan callback, with "Consider GEM object reclaimable if shrinking fails": a
        refusal that left the object on the scan's private list (it neither moved to another
        LRU nor left them) counts its pages as remaining.

        The kernel puts that test in drm_gem_lru_scan(); gemu's :func:`gem_lru.scan` is shared
        with the shmem helper's v19 shrinker, which predates it, so the flavour applies it in
        its own callback with the same condition.
        """

        def shrink(obj, ctx) -> bool:
            if try_evict(self, obj):
                return True
            lru = obj.lru
            if lru is not None and lru not in self._lrus():
                remaining.pages += obj.size >> gem.PAGE_SHIFT
            return False

        return shrink

    def _reclaim_priv_bos(self, nr: int, remaining: gem_lru.Remaining) -> int:
        """Scan each VM's LRU of private BOs, least recently active VM first.

        Kernel: panthor_mmu_reclaim_priv_bos(): the VM list is taken, each VM is held by a
        reference while its LRU is scanned without the LRU lock, VMs still reclaimable are
        put back at the head in the order met (a VM that became active meanwhile moved itself
        to the tail).
        """
        freed = 0
        with self.lock:
            todo = list(self.vms)
        done: list[GemuVm] = []
        for vm in todo:
            if freed >= nr:
                break
            if vm.dead:
                continue
            drm_gpuvm.get(vm)
            try:
                freed += gem_lru.scan(
                    vm.reclaim_lru, nr - freed, remaining, self._shrink(remaining)
                )
            finally:
                done.append(vm)
                drm_gpuvm.put(vm)
        with self.lock:
            for vm in done:
                if vm in self.vms and vm.reclaim_lru.count == 0:
                    self.vms.remove(vm)
        return freed


def vm_active(vm: GemuVm) -> None:
    """The VM runs a job: reclaim its private BOs last. Kernel: panthor_vm_active() (the
    reclaim part: list_move_tail of the VM on ``reclaim.vms`` if it has reclaimable BOs)."""
    reclaim = vm.drv.reclaim
    with reclaim.lock:
        if vm.reclaim_lru.count and vm in reclaim.vms:
            reclaim.vms.remove(vm)
            reclaim.vms.append(vm)


def _mapped_vm_bos(obj) -> list:
    return [vb for vb in drm_gpuvm.gem_for_each_gpuvm_bo(obj) if not vb.evicted and vb.gpuva]


def evaluate_reclaim_state_locked(obj) -> ReclaimState:
    """The state the object's LRU should reflect.

    Kernel: panthor_gem_evaluate_reclaim_state_locked(); evicted vm_bos do not count as GPU
    mappings (v4: "skip evicted vm_bos").
    Locking: the object's resv and gpuva lock.
    """
    dma_resv.assert_held(obj.resv)
    if obj.pages is None or obj.evicted or obj.pages_pin_count:
        return ReclaimState.UNRECLAIMABLE
    n = len(_mapped_vm_bos(obj))
    if n == 1:
        return ReclaimState.GPU_MAPPED_SINGLE_VM
    if n > 1:
        return ReclaimState.GPU_MAPPED_MULTI_VM
    return ReclaimState.UNUSED


def update_reclaim_state_locked(reclaim: VmReclaim, obj) -> ReclaimState:
    """Move the object to the LRU of its state; a BO mapped in one VM goes to the tail of
    that VM's LRU and the VM joins ``reclaim.vms`` (at the head) if it was not on it.

    Kernel: panthor_gem_update_reclaim_state_locked() +
    panthor_vm_update_bo_reclaim_lru_locked().
    Locking: the object's resv and gpuva lock.
    """
    state = evaluate_reclaim_state_locked(obj)
    with reclaim.lock:
        if state is ReclaimState.UNUSED:
            gem_lru.move_tail_locked(reclaim.unused, obj)
        elif state is ReclaimState.GPU_MAPPED_MULTI_VM:
            gem_lru.move_tail_locked(reclaim.gpu_mapped_shared, obj)
        elif state is ReclaimState.GPU_MAPPED_SINGLE_VM:
            vm = _mapped_vm_bos(obj)[0].vm
            gem_lru.move_tail_locked(vm.reclaim_lru, obj)
            if vm not in reclaim.vms:
                reclaim.vms.insert(0, vm)
        else:
            gem_lru.remove_locked(obj)
    rec = reclaim.records.get(obj)
    if rec is not None:
        rec.reclaim_state = state
    return state


def try_evict(reclaim: VmReclaim, obj) -> bool:
    """Evict one object the scan offers with its resv held.

    Kernel: panthor_gem_try_evict() / panthor_gem_try_evict_no_resv_wait():

    1. ``mutex_trylock(gpuva.lock)``;
    2. ``dma_resv_trylock()`` of every VM the object is external to (a private object's VM
       resv is the object's, already held);
    3. recompute the state: if it became harder to reclaim, skip (the LRU of its new state
       will offer it);
    4. idle test on the object's resv (every usage up to BOOKKEEP signalled). Panthor waits
       up to 10 jiffies here for GPU-mapped states; gemu only tests: a wait of a fixed time
       in reclaim is a timing heuristic, and the model's outcome must not depend on timing;
    5. panthor_vm_evict_bo_mappings_locked(): per vm_bo not yet evicted, trylock the VM's
       op_lock, ``drm_gpuvm_bo_evict(vm_bo, true)``, clear the PTEs of each mapping (TLB
       flush) and mark it evicted;
    6. panthor_gem_evict_locked(): write the pages to swap (the shmem helper's evict).

    Returns whether the pages were freed. Every lock is a trylock: reclaim holds fs_reclaim,
    and the bind and exec paths take these locks in the other order.
    """
    dma_resv.assert_held(obj.resv)
    g = drm_gpuvm.gem_gpuva(obj)
    if not g.lock.trylock():
        reclaim.stats.contended += 1
        return False
    locked_vms: list = []
    try:
        for vm_bo in drm_gpuvm.gem_for_each_gpuvm_bo(obj):
            vm_resv = drm_gpuvm.resv(vm_bo.vm)
            if vm_resv is obj.resv or vm_resv in locked_vms:
                continue
            if not dma_resv.trylock(vm_resv):
                reclaim.stats.contended += 1
                return False
            locked_vms.append(vm_resv)
        rec = reclaim.records.get(obj)
        old = rec.reclaim_state if rec is not None else ReclaimState.UNRECLAIMABLE
        new = evaluate_reclaim_state_locked(obj)
        if new != old:
            update_reclaim_state_locked(reclaim, obj)
        if new > old or new is ReclaimState.UNRECLAIMABLE:
            reclaim.stats.harder += 1
            return False
        if not dma_resv.test_signaled(obj.resv, DmaResvUsage.BOOKKEEP):
            reclaim.stats.skipped_busy += 1
            return False
        if not _evict_bo_mappings_locked(obj, reclaim.mutant is Mutant.EVICT_MARKS_ONE_VM):
            reclaim.stats.contended += 1
            return False
        try:
            obj.pages_mark_dirty_on_put = True
            gem_shmem.evict_locked(obj)
        except KernelError:
            return False
        finally:
            update_reclaim_state_locked(reclaim, obj)
        reclaim.stats.evicted += 1
        if rec is not None:
            rec.reclaimed_count += 1
        return True
    finally:
        for vm_resv in reversed(locked_vms):
            dma_resv.unlock(vm_resv)
        g.lock.unlock()


def _evict_bo_mappings_locked(obj, one_vm: bool = False) -> bool:
    """Kernel: panthor_vm_evict_bo_mappings_locked(). False if a VM's op_lock is contended
    (the mappings of VMs done before stay evicted: they are revalidated like any other).

    A vm_bo already marked evicted is skipped only if none of its mappings has PTEs: a bind
    between two evictions pins the BO back in and writes the PTEs of its new mapping while the
    vm_bo stays marked until the next exec validates it, and skipping that vm_bo as a whole
    (as the description of Panthor's loop, "for each vm_bo not already evicted", reads) left
    those PTEs on frames the eviction then freed (gemu explore, ``gpuvm`` scenario).

    ``one_vm`` is the ``evict-marks-one-vm`` mutant: only the first VM that maps the object
    has it marked evicted and its PTEs cleared, and the check that every vm_bo is evicted is
    gone with the walk it checks."""
    for vm_bo in drm_gpuvm.gem_for_each_gpuvm_bo(obj):
        if vm_bo.evicted and all(va.evicted for va in vm_bo.gpuva):
            continue
        vm = vm_bo.vm
        if not vm.op_lock.trylock():
            return False
        try:
            if not vm_bo.evicted:
                drm_gpuvm.bo_evict(vm_bo, True)
            for va in vm_bo.gpuva:
                if not va.evicted:
                    vm.pt.unmap_pages(va.va.addr, va.va.range >> gem.PAGE_SHIFT)
                    va.evicted = True
        finally:
            vm.op_lock.unlock()
        if one_vm:
            return True
    warn_on(
        any(
            not vb.evicted or any(not va.evicted for va in vb.gpuva)
            for vb in drm_gpuvm.gem_for_each_gpuvm_bo(obj)
        ),
        f"{obj!r} still mapped after evicting its mappings",
    )
    return True
