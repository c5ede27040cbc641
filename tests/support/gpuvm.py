"""Helpers shared by the drm_gpuvm tests: GEM objects that can become VM-private, a driver
whose split/merge callbacks apply each step at once (the kerneldoc's "Examples" 2), and
readable descriptions of steps and mappings."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from gemu.guest.dma_buf import dma_resv
from gemu.guest.drm import drm_exec, drm_gpuvm, gem
from gemu.guest.drm.drm_exec import DRM_EXEC_IGNORE_DUPLICATES
from gemu.guest.drm.drm_gpuvm import (
    DrmGpuva,
    DrmGpuvaOp,
    DrmGpuvaOpMap,
    DrmGpuvaOpType,
    DrmGpuvm,
    DrmGpuvmBo,
    DrmGpuvmOps,
)
from gemu.guest.drm.gem import DrmGemObject
from gemu.guest.mm.page_alloc import PAGE_SIZE, PageAllocator, PhysMem


def make_device() -> gem.DrmDevice:
    """A device over 16 frames of RAM; the objects here never allocate pages."""
    return gem.DrmDevice(PageAllocator(PhysMem(bytearray(16 * PAGE_SIZE)), watermarks=(0, 0, 0)))


class Bo(DrmGemObject):
    """A GEM object with no backing storage. ``own_resv`` is its embedded reservation object
    (the kernel's ``obj->_resv``): a VM-private object points ``resv`` at the VM's instead,
    and its free puts its own one back before releasing, as only ``_resv`` is finalised."""

    __slots__ = ("freed", "label", "own_resv")

    def __repr__(self) -> str:
        return f"<Bo {self.label}>"


def _bo_free(obj: Bo) -> None:
    obj.resv = obj.own_resv
    gem.object_release(obj)
    obj.freed = True


BO_FUNCS = gem.DrmGemObjectFuncs(free=_bo_free)


def new_bo(dev: gem.DrmDevice, label: str, npages: int = 64) -> Bo:
    """An external object (its own resv), one reference held by the caller."""
    bo = Bo()
    bo.funcs = BO_FUNCS
    gem.private_object_init(dev, bo, npages * PAGE_SIZE)
    bo.own_resv = bo.resv
    bo.label = label
    bo.freed = False
    return bo


def make_private(bo: Bo, vm: DrmGpuvm) -> Bo:
    """Share the VM's resv, as Panthor does for a BO created for one VM
    (``bo->base.resv = vm_root_gem->resv``)."""
    bo.resv = drm_gpuvm.resv(vm)
    return bo


@contextmanager
def locked_all(*objs) -> Iterator[drm_exec.DrmExec]:
    """Hold the reservation locks of ``objs`` (duplicates allowed: private objects share the
    VM's) in one drm_exec transaction for the block."""
    with drm_exec.init(DRM_EXEC_IGNORE_DUPLICATES) as ex:
        for attempt in drm_exec.until_all_locked(ex):
            with attempt:
                for obj in objs:
                    drm_exec.lock_obj(ex, obj)
        yield ex


def describe_map(m: DrmGpuvaOpMap | None):
    """``(start, end, obj, offset)`` of a map step, or None."""
    if m is None:
        return None
    return (m.va.addr, m.va.addr + m.va.range, m.gem.obj, m.gem.offset)


def describe_va(va: DrmGpuva):
    return (va.va.addr, va.va.addr + va.va.range, va.gem.obj, va.gem.offset)


def describe(op: DrmGpuvaOp):
    """A step as a tuple that tests compare: ``("map", start, end, obj, offset)``,
    ``("unmap", old mapping, keep)``, ``("remap", prev, next, old mapping, keep)``,
    ``("prefetch", mapping)``."""
    if op.op == DrmGpuvaOpType.MAP:
        return ("map", *describe_map(op.map))
    if op.op == DrmGpuvaOpType.UNMAP:
        return ("unmap", describe_va(op.unmap.va), op.unmap.keep)
    if op.op == DrmGpuvaOpType.REMAP:
        r = op.remap
        return (
            "remap",
            describe_map(r.prev),
            describe_map(r.next),
            describe_va(r.unmap.va),
            r.unmap.keep,
        )
    return ("prefetch", describe_va(op.prefetch.va))


def mappings(vm: DrmGpuvm) -> list[tuple]:
    """Every mapping but the kernel's node, in address order."""
    return [describe_va(va) for va in drm_gpuvm.for_each_va(vm) if va is not vm.kernel_alloc_node]


class Driver:
    """A driver's drm_gpuvm callbacks that apply every split/merge step at once and record
    it; ``vm_bo_validate`` calls ``validate_hook(vm_bo)`` (default: mark it not evicted as
    Panthor does, through ``drm_gpuvm_bo_evict(vm_bo, false)``).

    Callers hold the gpuva lock (the resv) of every object whose mappings change."""

    def __init__(self) -> None:
        self.steps: list[tuple] = []
        self.freed_vms: list[DrmGpuvm] = []
        self.freed_vm_bos: list[DrmGpuvmBo] = []
        self.validated: list[DrmGpuvmBo] = []
        self.validate_hook = None
        self.ops = DrmGpuvmOps(
            vm_free=self.freed_vms.append,
            vm_bo_free=self.freed_vm_bos.append,
            vm_bo_validate=self.vm_bo_validate,
            sm_step_map=self.step_map,
            sm_step_remap=self.step_remap,
            sm_step_unmap=self.step_unmap,
        )

    def step_map(self, op: DrmGpuvaOp, vm: DrmGpuvm) -> None:
        self.steps.append(describe(op))
        va = DrmGpuva()
        drm_gpuvm.gpuva_map(vm, va, op.map)
        if op.map.gem.obj is not None:
            vm_bo = drm_gpuvm.bo_obtain(vm, op.map.gem.obj)
            drm_gpuvm.gpuva_link(va, vm_bo)
            drm_gpuvm.bo_put(vm_bo)

    def step_remap(self, op: DrmGpuvaOp, vm: DrmGpuvm) -> None:
        self.steps.append(describe(op))
        old = op.remap.unmap.va
        prev = DrmGpuva() if op.remap.prev is not None else None
        nxt = DrmGpuva() if op.remap.next is not None else None
        drm_gpuvm.gpuva_remap(prev, nxt, op.remap)
        for piece in (prev, nxt):
            if piece is not None and old.vm_bo is not None:
                drm_gpuvm.gpuva_link(piece, old.vm_bo)
        drm_gpuvm.gpuva_unlink(old)

    def step_unmap(self, op: DrmGpuvaOp, vm: DrmGpuvm) -> None:
        self.steps.append(describe(op))
        drm_gpuvm.gpuva_unlink(op.unmap.va)
        drm_gpuvm.gpuva_unmap(op.unmap)

    def vm_bo_validate(self, vm_bo: DrmGpuvmBo, ex) -> None:
        self.validated.append(vm_bo)
        if self.validate_hook is not None:
            self.validate_hook(vm_bo)
        else:
            drm_gpuvm.bo_evict(vm_bo, False)


def new_vm(
    dev: gem.DrmDevice,
    driver: Driver,
    flags=0,
    start: int = 0,
    size: int = 1 << 32,
    reserve_offset: int = 0,
    reserve_range: int = 0,
    name: str = "vm",
) -> DrmGpuvm:
    """A VM with its own dummy resv object, one reference held by the caller."""
    vm = DrmGpuvm()
    r_obj = drm_gpuvm.resv_object_alloc(dev)
    drm_gpuvm.init(
        vm, name, flags, dev, r_obj, start, size, reserve_offset, reserve_range, driver.ops
    )
    gem.put(r_obj)
    return vm


def map_range(vm: DrmGpuvm, req: drm_gpuvm.DrmGpuvmMapReq) -> None:
    """drm_gpuvm_sm_map() as the kerneldoc's examples drive it: the vm_bo of the object to map
    is obtained before the walk and held across it, so that an UNMAP step of the same object
    cannot free it (and lose its ``evicted`` state) before the MAP step links to it. Callers
    hold the gpuva locks."""
    obj = req.map.gem.obj
    vm_bo = drm_gpuvm.bo_obtain(vm, obj) if obj is not None else None
    try:
        drm_gpuvm.sm_map(vm, vm, req)
    finally:
        drm_gpuvm.bo_put(vm_bo)


def teardown_vm(vm: DrmGpuvm, *objs) -> None:
    """Unmap everything (holding the VM's and ``objs``' locks) and drop the caller's VM
    reference; the VM must then be freed."""
    with locked_all(vm.r_obj, *objs):
        for va in drm_gpuvm.for_each_va(vm):
            if va is not vm.kernel_alloc_node:
                drm_gpuvm.sm_unmap(vm, vm, va.va.addr, va.va.range)
    assert vm.kref == 1, f"{vm!r} still referenced"
    drm_gpuvm.put(vm)


def held_resv(obj) -> bool:
    return dma_resv.held(obj.resv)
