"""drm_gpuvm under the deterministic scheduler: a submitter (exec_lock + validate), a binder
(map/unmap of shared and private BOs) and a reclaimer (trylock + bo_gem_evict) interleaved by
seeded schedules, in both locking modes.

The property is the one a driver relies on: once exec_lock and validate have run, every BO
the VM maps is resident, so a job armed after them never reads an evicted BO. A second VM
maps the shared BOs too, so an eviction marks both VMs and each revalidates on its own
exec. Every run must end without a lockdep report or deadlock and with every object freed.
"""

from __future__ import annotations

import pytest

from gemu.guest.dma_buf import dma_resv
from gemu.guest.drm import drm_gpuvm, gem
from gemu.guest.drm.drm_gpuvm import DRM_GPUVM_RESV_PROTECTED, DrmGpuvmExec, DrmGpuvmMapReq
from gemu.guest.kernel import runtime
from gemu.guest.locking.mutex import Mutex
from tests.support.gpuvm import (
    Driver,
    locked_all,
    make_device,
    make_private,
    map_range,
    new_bo,
    new_vm,
    teardown_vm,
)

P = 0x1000
ROUNDS = 5


def _scenario(seed: int, flags: int) -> dict:
    dev = make_device()
    driver = Driver()
    vms = [new_vm(dev, driver, flags, name=f"vm{i}") for i in range(2)]
    shared = [new_bo(dev, f"shared{i}") for i in range(2)]
    private = make_private(new_bo(dev, "private"), vms[0])
    resident = {id(bo): True for bo in [*shared, private]}
    # The driver's VM lock (Xe's vm->lock, Panthor's op_lock): binds and execs of one VM
    # are serialised by it, as the kerneldoc requires for the VA tree and the list walks.
    vm_locks = {id(vm): Mutex(f"{vm.name}.lock") for vm in vms}
    stats = {"validated": 0, "evictions": 0, "execs": 0}

    def validate_hook(vm_bo):
        resident[id(vm_bo.obj)] = True  # swap-in; the PTEs would be rewritten here
        drm_gpuvm.bo_evict(vm_bo, False)
        stats["validated"] += 1

    driver.validate_hook = validate_hook

    def bind(vm, obj, page, unmap):
        with vm_locks[id(vm)], locked_all(vm.r_obj, obj):
            if unmap:
                drm_gpuvm.sm_unmap(vm, vm, page * P, P)
            else:
                resident[id(obj)] = True  # binding gets the pages (Panthor pins at map time)
                map_range(vm, DrmGpuvmMapReq(page * P, P, obj, 0))
                vm_bo = drm_gpuvm.bo_find(vm, obj)
                drm_gpuvm.bo_extobj_add(vm_bo)
                drm_gpuvm.bo_put(vm_bo)

    def binder():
        for r in range(ROUNDS):
            bind(vms[0], private, 0, unmap=r % 3 == 2)
            for i, obj in enumerate(shared):  # both shared BOs into both VMs
                bind(vms[(r + i) % 2], obj, 1 + i, unmap=r % 4 == 3)

    def reclaimer():
        for r in range(4 * ROUNDS):
            obj = [*shared, private][r % 3]
            if not dma_resv.trylock(obj.resv):
                runtime.preempt("reclaimer backs off")
                continue
            try:
                if list(drm_gpuvm.gem_for_each_gpuvm_bo(obj)):
                    drm_gpuvm.bo_gem_evict(obj, True)
                    resident[id(obj)] = False  # pages gone
                    stats["evictions"] += 1
            finally:
                dma_resv.unlock(obj.resv)

    def submitter(vm):
        for _ in range(ROUNDS):
            with vm_locks[id(vm)], DrmGpuvmExec(vm, num_fences=1) as vm_exec:
                drm_gpuvm.exec_lock(vm_exec)
                drm_gpuvm.validate(vm, vm_exec.exec)
                for va in drm_gpuvm.for_each_va(vm):
                    assert resident[id(va.gem.obj)], (
                        f"{vm.name} maps {va!r}, evicted, after validate"
                    )
                stats["execs"] += 1

    def main():
        tasks = [
            runtime.spawn(binder, name="binder"),
            runtime.spawn(reclaimer, name="reclaimer"),
            runtime.spawn(submitter, vms[1], name="submit1"),
        ]
        submitter(vms[0])
        for t in tasks:
            t.join()

    rt = runtime.Deterministic(seed=seed, strategy="pct")
    rt.run(main)
    teardown_vm(vms[0], *shared, private)
    teardown_vm(vms[1], *shared)
    for obj in [*shared, private]:
        gem.put(obj)
    assert dev.object_count == 0
    assert len(driver.freed_vms) == 2
    return stats


@pytest.mark.parametrize(
    "flags", [0, DRM_GPUVM_RESV_PROTECTED], ids=["spinlocks", "resv-protected"]
)
def test_validate_leaves_every_mapped_bo_resident(flags):
    """Over 40 seeded schedules per locking mode: after exec_lock + validate every BO the VM
    maps is resident; the runs evict and revalidate for real."""
    totals = {"validated": 0, "evictions": 0, "execs": 0}
    for seed in range(40):
        for key, value in _scenario(seed, flags).items():
            totals[key] += value
    assert totals["execs"] == 40 * 2 * ROUNDS
    assert totals["evictions"] > 0 and totals["validated"] > 0, totals
