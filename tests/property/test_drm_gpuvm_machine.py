"""A Hypothesis state machine over drm_gpuvm: random map / unmap / evict / exec+validate
sequences on one VM, checked against a page-granular model of the address space.

After every step the VA space must say exactly what the model says (page -> object and
object page), no two mappings may overlap, the split/merge steps must have the kernel's shape
(UNMAP/REMAP in address order, at most two REMAPs, prev only on the first, next only on the
last, the MAP last) and keep flags, sm_map_ops_create must list the steps the callbacks got,
and the vm_bos, their references and the extobj/evict lists must match the mappings. Two
machines: the lists under spinlocks, and under the VM's resv (DRM_GPUVM_RESV_PROTECTED).
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from gemu.guest.dma_buf import dma_resv
from gemu.guest.drm import drm_exec, drm_gpuvm, gem
from gemu.guest.drm.drm_gpuvm import DRM_GPUVM_RESV_PROTECTED, DrmGpuvmExec, DrmGpuvmMapReq
from gemu.guest.errors import Einval
from gemu.guest.kernel import runtime
from gemu.guest.locking import lockdep
from tests.support.gpuvm import (
    Driver,
    describe,
    locked_all,
    make_device,
    make_private,
    map_range,
    new_bo,
    new_vm,
)

P = 0x1000
VM_PAGES = 64
KERNEL_NODE = (48, 52)  # pages reserved for the kernel: every request touching them is -EINVAL
OBJS = 3  # objects 0 and 1 are external, 2 is private to the VM
PAGES = st.integers(0, VM_PAGES - 1)
SIZES = st.integers(1, 16)
OBJ = st.one_of(st.none(), st.integers(0, OBJS - 1))  # None: a sparse mapping


class GpuvmMachine(RuleBasedStateMachine):
    """``model`` maps each mapped VM page to ``(object or None, object page)``."""

    flags = 0

    def __init__(self) -> None:
        super().__init__()
        lockdep.reset()
        self.dev = make_device()
        self.driver = Driver()
        self.vm = new_vm(
            self.dev,
            self.driver,
            self.flags,
            0,
            VM_PAGES * P,
            KERNEL_NODE[0] * P,
            (KERNEL_NODE[1] - KERNEL_NODE[0]) * P,
        )
        self.objs = [new_bo(self.dev, f"o{i}") for i in range(OBJS)]
        make_private(self.objs[2], self.vm)
        self.model: dict[int, tuple] = {}
        self.evicted: set[int] = set()

    def _valid(self, start: int, size: int) -> bool:
        end = start + size
        return end <= VM_PAGES and not (start < KERNEL_NODE[1] and KERNEL_NODE[0] < end)

    def _locked(self):
        return locked_all(self.vm.r_obj, *self.objs)

    def _vm_bo(self, obj):
        for vm_bo in drm_gpuvm.gem_for_each_gpuvm_bo(obj):
            if vm_bo.vm is self.vm:
                return vm_bo
        return None

    def _check_steps(self, steps, req=None) -> None:
        kinds = [s[0] for s in steps]
        body = steps
        if req is not None:
            assert steps[-1] == ("map", *req), steps
            body = steps[:-1]
            assert "map" not in kinds[:-1]
        else:
            assert "map" not in kinds
        assert sum(k == "remap" for k in kinds) <= 2, steps
        for i, step in enumerate(body):
            old = step[-2]
            if step[0] == "remap":
                assert step[1] is None or i == 0, f"prev on a later step: {steps}"
                assert step[2] is None or i == len(body) - 1, f"next on an earlier step: {steps}"
            if req is not None:
                r_start, _, r_obj, r_off = req
                keep = old[2] is not None and old[2] is r_obj and old[3] - old[0] == r_off - r_start
                assert step[-1] == keep, f"keep of {step} for request {req}"
            else:
                assert step[-1] is False
        starts = [s[-2][0] for s in body]
        assert starts == sorted(starts), f"steps out of address order: {steps}"

    # --- rules ---

    @rule(start=PAGES, size=SIZES, obj=OBJ, offset=st.integers(0, 32))
    def map(self, start: int, size: int, obj, offset: int) -> None:
        bo = self.objs[obj] if obj is not None else None
        req = DrmGpuvmMapReq(start * P, size * P, bo, offset * P)
        if not self._valid(start, size):
            with self._locked():
                try:
                    drm_gpuvm.sm_map(self.vm, self.vm, req)
                except Einval:
                    return
            raise AssertionError(f"map of pages [{start}, {start + size}) was accepted")
        ops = drm_gpuvm.sm_map_ops_create(self.vm, req)
        listed = [describe(op) for op in ops]
        drm_gpuvm.gpuva_ops_free(self.vm, ops)
        with drm_exec.init(drm_exec.DRM_EXEC_IGNORE_DUPLICATES) as ex:
            for attempt in drm_exec.until_all_locked(ex):
                with attempt:
                    drm_gpuvm.sm_map_exec_lock(self.vm, ex, 1, req)
            exec_locked = {id(o) for _, o in drm_exec.for_each_locked_object(ex)}
        touched = {id(step[-2][2]) for step in listed[:-1] if step[-2][2] is not None}
        assert exec_locked == touched | ({id(bo)} if bo is not None else set())
        self.driver.steps.clear()
        with self._locked():
            map_range(self.vm, req)
            if bo is not None:
                drm_gpuvm.bo_extobj_add(self._vm_bo(bo))
        assert self.driver.steps == listed
        self._check_steps(self.driver.steps, (start * P, (start + size) * P, bo, offset * P))
        for i in range(size):
            self.model[start + i] = (obj, offset + i)

    @rule(start=PAGES, size=SIZES)
    def unmap(self, start: int, size: int) -> None:
        if not self._valid(start, size):
            with self._locked():
                try:
                    drm_gpuvm.sm_unmap(self.vm, self.vm, start * P, size * P)
                except Einval:
                    return
            raise AssertionError(f"unmap of pages [{start}, {start + size}) was accepted")
        ops = drm_gpuvm.sm_unmap_ops_create(self.vm, start * P, size * P)
        listed = [describe(op) for op in ops]
        drm_gpuvm.gpuva_ops_free(self.vm, ops)
        self.driver.steps.clear()
        with self._locked():
            drm_gpuvm.sm_unmap(self.vm, self.vm, start * P, size * P)
        assert self.driver.steps == listed
        self._check_steps(self.driver.steps)
        for i in range(size):
            self.model.pop(start + i, None)
        self._forget_unmapped()

    @rule(obj=st.integers(0, OBJS - 1))
    def evict(self, obj: int) -> None:
        """What a shrinker does: under the object's resv only, mark it evicted in this VM."""
        bo = self.objs[obj]
        with locked_all(bo):
            vm_bo = self._vm_bo(bo)
            if vm_bo is None:
                return
            drm_gpuvm.bo_evict(vm_bo, True)
        self.evicted.add(obj)

    @rule()
    def exec_validate(self) -> None:
        self.driver.validated.clear()
        with DrmGpuvmExec(self.vm, num_fences=1) as vm_exec:
            drm_gpuvm.exec_lock(vm_exec)
            locked = [o for _, o in drm_exec.for_each_locked_object(vm_exec.exec)]
            mapped_ext = [o for i, o in enumerate(self.objs[:2]) if self._mapped(i)]
            assert locked[0] is self.vm.r_obj
            assert sorted(locked[1:], key=id) == sorted(mapped_ext, key=id), "not each extobj once"
            drm_gpuvm.validate(self.vm, vm_exec.exec)
        got = sorted(self.objs.index(v.obj) for v in self.driver.validated)
        assert got == sorted(self.evicted), f"validated {got}, evicted {sorted(self.evicted)}"
        self.evicted.clear()

    # --- invariants ---

    def _mapped(self, obj: int) -> bool:
        return any(o == obj for o, _ in self.model.values())

    def _forget_unmapped(self) -> None:
        self.evicted = {o for o in self.evicted if self._mapped(o)}

    @invariant()
    def address_space_matches_model(self) -> None:
        self._forget_unmapped()
        pages = {}
        prev_end = -1
        vas = [va for va in drm_gpuvm.for_each_va(self.vm) if va is not self.vm.kernel_alloc_node]
        for va in vas:
            assert va.va.addr >= prev_end, f"{va!r} overlaps its predecessor"
            prev_end = va.va.addr + va.va.range
            obj = self.objs.index(va.gem.obj) if va.gem.obj is not None else None
            for i in range(va.va.range // P):
                pages[va.va.addr // P + i] = (obj, va.gem.offset // P + i)
        assert pages == self.model
        assert self.vm.rb.starts == [va.va.addr for va in self.vm.rb.vas]

    @invariant()
    def vm_bos_match_mappings(self) -> None:
        vas = [va for va in drm_gpuvm.for_each_va(self.vm) if va is not self.vm.kernel_alloc_node]
        n_vm_bos = 0
        for i, bo in enumerate(self.objs):
            own = [va for va in vas if va.gem.obj is bo]
            vm_bos = [v for v in drm_gpuvm.gem_gpuva(bo).list if v.vm is self.vm]
            if not own:
                assert vm_bos == [], f"o{i} has a vm_bo without mappings"
                continue
            (vm_bo,) = vm_bos
            n_vm_bos += 1
            assert sorted(vm_bo.gpuva, key=id) == sorted(own, key=id)
            assert vm_bo.kref == len(own)
            assert (vm_bo in self.vm.extobj) == (i < 2)
            on_evict = vm_bo in self.vm.evict
            if self.flags & DRM_GPUVM_RESV_PROTECTED and i < 2:
                assert not on_evict or vm_bo.evicted  # extobjs join at prepare_objects
            else:
                assert on_evict == vm_bo.evicted
        assert self.vm.kref == 1 + len(vas) + n_vm_bos

    def teardown(self) -> None:
        with self._locked():
            for va in drm_gpuvm.for_each_va(self.vm):
                if va is not self.vm.kernel_alloc_node:
                    drm_gpuvm.sm_unmap(self.vm, self.vm, va.va.addr, va.va.range)
        assert self.vm.kref == 1 and len(self.vm.extobj) == 0 and len(self.vm.evict) == 0
        drm_gpuvm.put(self.vm)
        assert self.driver.freed_vms == [self.vm]
        for bo in self.objs:
            gem.put(bo)
        assert self.dev.object_count == 0
        assert not runtime.current().held_locks
        assert not lockdep.reports()
        assert not any(dma_resv.is_locked(bo.own_resv) for bo in self.objs)


class ResvProtectedGpuvmMachine(GpuvmMachine):
    flags = DRM_GPUVM_RESV_PROTECTED


SETTINGS = settings(derandomize=True, max_examples=120, stateful_step_count=30, deadline=None)
GpuvmMachine.TestCase.settings = SETTINGS
ResvProtectedGpuvmMachine.TestCase.settings = SETTINGS
TestGpuvmSpinlocks = GpuvmMachine.TestCase
TestGpuvmResvProtected = ResvProtectedGpuvmMachine.TestCase
