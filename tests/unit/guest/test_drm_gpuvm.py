"""drm_gpuvm: the split/merge steps of the kerneldoc's "Split and Merge" cases and worked
examples, op by op; the VA index queries; vm_bo lifetime; the extobj and evict lists in both
locking modes; the exec helpers (prepare, validate, resv_add_fence); lockdep on every lock
the kernel asserts.

The kernel has no KUnit suite for drm_gpuvm (drivers/gpu/drm/tests/ holds none), so these
port the kerneldoc's examples and the behaviour of drivers/gpu/drm/drm_gpuvm.c.
"""

from __future__ import annotations

import errno

import pytest

from gemu.guest.dma_buf import dma_fence, dma_resv
from gemu.guest.dma_buf.dma_fence import DmaFence
from gemu.guest.dma_buf.dma_resv import DmaResvUsage
from gemu.guest.drm import drm_exec, drm_gpuvm, gem
from gemu.guest.drm.drm_gpuvm import (
    DRM_GPUVM_IMMEDIATE_MODE,
    DRM_GPUVM_RESV_PROTECTED,
    DrmGpuva,
    DrmGpuvaOpType,
    DrmGpuvmExec,
    DrmGpuvmMapReq,
)
from gemu.guest.errors import Eexist, Einval, Enomem, KernelError, KernelWarning
from gemu.guest.kernel import runtime
from gemu.guest.locking import lockdep
from gemu.guest.locking.lockdep import LockdepError
from gemu.guest.locking.mutex import Mutex
from tests.support.gpuvm import (
    Driver,
    describe,
    locked_all,
    make_device,
    make_private,
    map_range,
    mappings,
    new_bo,
    new_vm,
    teardown_vm,
)

P = 0x1000  # one page: the unit of the kerneldoc's diagrams
N = 0x10000  # "bo_offset=n"
M = 0x20000  # "bo_offset=m"
MODES = [0, DRM_GPUVM_RESV_PROTECTED]


@pytest.fixture
def dev():
    """A device; every object must be freed and no lock held or report left at the end."""
    lockdep.reset()
    d = make_device()
    yield d
    assert not runtime.current().held_locks
    assert not lockdep.reports()
    assert d.object_count == 0, f"{d.object_count} GEM objects leaked"


@pytest.fixture
def driver():
    return Driver()


def bos(dev, *labels):
    return [new_bo(dev, label) for label in labels]


def put_all(*objs):
    for obj in objs:
        gem.put(obj)


def sm_map(vm, addr, end, obj, offset, *locked):
    """drm_gpuvm_sm_map() of ``[addr, end)``, holding the locks the driver's steps need."""
    with locked_all(vm.r_obj, *locked):
        map_range(vm, DrmGpuvmMapReq(addr, end - addr, obj, offset))


def sm_unmap(vm, addr, end, *locked):
    with locked_all(vm.r_obj, *locked):
        drm_gpuvm.sm_unmap(vm, vm, addr, end - addr)


# --- DOC: Split and Merge, cases 1..15 --------------------------------------------------------
# Each case: the old mappings, the request, the steps in order, the mappings afterwards.
# "a" and "b" are the kerneldoc's backing BOs, positions are in pages, n/m the BO offsets.

CASES = {
    "1-identical": (
        [(0, 1, "a", N)],
        (0, 1, "a", N),
        [("unmap", (0, 1, "a", N), True), ("map", 0, 1, "a", N)],
        [(0, 1, "a", N)],
    ),
    "2-other-offset": (
        [(0, 1, "a", N)],
        (0, 1, "a", M),
        [("unmap", (0, 1, "a", N), False), ("map", 0, 1, "a", M)],
        [(0, 1, "a", M)],
    ),
    "3-other-bo": (
        [(0, 1, "a", N)],
        (0, 1, "b", N),
        [("unmap", (0, 1, "a", N), False), ("map", 0, 1, "b", N)],
        [(0, 1, "b", N)],
    ),
    "4-old-left-aligned-subset": (
        [(0, 1, "a", N)],
        (0, 2, "a", N),
        [("unmap", (0, 1, "a", N), True), ("map", 0, 2, "a", N)],
        [(0, 2, "a", N)],
    ),
    "5-req-left-aligned-subset-other-bo": (
        [(0, 2, "a", N)],
        (0, 1, "b", N),
        [
            ("remap", None, (1, 2, "a", N + P), (0, 2, "a", N), False),
            ("map", 0, 1, "b", N),
        ],
        [(0, 1, "b", N), (1, 2, "a", N + P)],
    ),
    "6-old-superset-same-bo": (
        [(0, 2, "a", N)],
        (0, 1, "a", N),
        [
            ("remap", None, (1, 2, "a", N + P), (0, 2, "a", N), True),
            ("map", 0, 1, "a", N),
        ],
        [(0, 1, "a", N), (1, 2, "a", N + P)],
    ),
    "7-req-right-aligned-subset-other-bo": (
        [(0, 2, "a", N)],
        (1, 2, "b", M),
        [
            ("remap", (0, 1, "a", N), None, (0, 2, "a", N), False),
            ("map", 1, 2, "b", M),
        ],
        [(0, 1, "a", N), (1, 2, "b", M)],
    ),
    "8-req-right-aligned-subset-same-bo": (
        [(0, 2, "a", N)],
        (1, 2, "a", N + P),
        [
            ("remap", (0, 1, "a", N), None, (0, 2, "a", N), True),
            ("map", 1, 2, "a", N + P),
        ],
        [(0, 1, "a", N), (1, 2, "a", N + P)],
    ),
    "9-overlap-at-end-other-bo": (
        [(0, 2, "a", N)],
        (1, 3, "b", M),
        [
            ("remap", (0, 1, "a", N), None, (0, 2, "a", N), False),
            ("map", 1, 3, "b", M),
        ],
        [(0, 1, "a", N), (1, 3, "b", M)],
    ),
    "10-overlap-at-end-same-bo-contiguous": (
        [(0, 2, "a", N)],
        (1, 3, "a", N + P),
        [
            ("remap", (0, 1, "a", N), None, (0, 2, "a", N), True),
            ("map", 1, 3, "a", N + P),
        ],
        [(0, 1, "a", N), (1, 3, "a", N + P)],
    ),
    "11-centered-subset-other-bo": (
        [(0, 3, "a", N)],
        (1, 2, "b", M),
        [
            ("remap", (0, 1, "a", N), (2, 3, "a", N + 2 * P), (0, 3, "a", N), False),
            ("map", 1, 2, "b", M),
        ],
        [(0, 1, "a", N), (1, 2, "b", M), (2, 3, "a", N + 2 * P)],
    ),
    "12-centered-subset-same-bo-contiguous": (
        [(0, 3, "a", N)],
        (1, 2, "a", N + P),
        [
            ("remap", (0, 1, "a", N), (2, 3, "a", N + 2 * P), (0, 3, "a", N), True),
            ("map", 1, 2, "a", N + P),
        ],
        [(0, 1, "a", N), (1, 2, "a", N + P), (2, 3, "a", N + 2 * P)],
    ),
    "13-old-right-aligned-subset": (
        [(1, 2, "a", N + P)],
        (0, 2, "a", N),
        [("unmap", (1, 2, "a", N + P), True), ("map", 0, 2, "a", N)],
        [(0, 2, "a", N)],
    ),
    "14-old-centered-subset": (
        [(1, 2, "a", N + P)],
        (0, 3, "a", N),
        [("unmap", (1, 2, "a", N + P), True), ("map", 0, 3, "a", N)],
        [(0, 3, "a", N)],
    ),
    # The diagram gives the kept part a'.bo_offset=n+2; the code computes
    # offset + req_end - addr = n + (2 - 1) pages, which is the consistent value.
    "15-overlap-at-start-other-bo": (
        [(1, 3, "a", N)],
        (0, 2, "b", M),
        [
            ("remap", None, (2, 3, "a", N + P), (1, 3, "a", N), False),
            ("map", 0, 2, "b", M),
        ],
        [(0, 2, "b", M), (2, 3, "a", N + P)],
    ),
}


def _pages(entry, objs):
    start, end, label, offset = entry
    return (start * P, end * P, objs[label], offset)


def _resolve(step, objs):
    """Turn a case's page-unit step into the byte-unit tuple :func:`describe` makes."""
    kind = step[0]
    if kind == "map":
        return ("map", *_pages(step[1:], objs))
    if kind == "unmap":
        return ("unmap", _pages(step[1], objs), step[2])
    prev, nxt, old, keep = step[1:]
    return (
        "remap",
        _pages(prev, objs) if prev else None,
        _pages(nxt, objs) if nxt else None,
        _pages(old, objs),
        keep,
    )


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("mode", MODES, ids=["spinlocks", "resv-protected"])
def test_split_merge_doc_case(dev, driver, name, mode):
    """Each "DOC: Split and Merge" case gives exactly the kernel's steps, in order, with the
    kernel's keep flags; sm_map_ops_create lists the same steps; applying them leaves the
    documented mappings, each linked to the vm_bo of its object."""
    old, req, steps, after = CASES[name]
    a, b = bos(dev, "a", "b")
    objs = {"a": a, "b": b}
    vm = new_vm(dev, driver, mode)
    for entry in old:
        sm_map(vm, *_pages(entry, objs), a, b)
    driver.steps.clear()

    start, end, obj, offset = _pages(req, objs)
    req_ = DrmGpuvmMapReq(start, end - start, obj, offset)
    ops = drm_gpuvm.sm_map_ops_create(vm, req_)
    listed = [describe(op) for op in ops]
    drm_gpuvm.gpuva_ops_free(vm, ops)
    sm_map(vm, start, end, obj, offset, a, b)

    expected = [_resolve(step, objs) for step in steps]
    assert driver.steps == expected
    assert listed == expected
    assert mappings(vm) == [_pages(entry, objs) for entry in after]
    for va in drm_gpuvm.for_each_va(vm):
        assert va.vm_bo.obj is va.gem.obj and va in va.vm_bo.gpuva
    teardown_vm(vm, a, b)
    put_all(a, b)


# --- worked examples (reference gpuvm.md section 2.4) -----------------------------------------


def test_example_split_in_the_middle(dev, driver):
    """A=[0,0x4000) X@0; map [0x1000,0x2000) Y@0x10000: one REMAP with both kept parts
    (keep false), then the MAP; three mappings afterwards."""
    x, y = bos(dev, "X", "Y")
    vm = new_vm(dev, driver)
    sm_map(vm, 0, 0x4000, x, 0, x, y)
    driver.steps.clear()
    sm_map(vm, 0x1000, 0x2000, y, 0x10000, x, y)
    assert driver.steps == [
        ("remap", (0, 0x1000, x, 0), (0x2000, 0x4000, x, 0x2000), (0, 0x4000, x, 0), False),
        ("map", 0x1000, 0x2000, y, 0x10000),
    ]
    assert mappings(vm) == [
        (0, 0x1000, x, 0),
        (0x1000, 0x2000, y, 0x10000),
        (0x2000, 0x4000, x, 0x2000),
    ]
    teardown_vm(vm, x, y)
    put_all(x, y)


def test_example_contiguous_remap_keeps_but_never_merges(dev, driver):
    """The same split with X@0x1000 (contiguous with A): keep is true, and GPUVM still
    leaves three mappings, never merging neighbours into one."""
    (x,) = bos(dev, "X")
    vm = new_vm(dev, driver)
    sm_map(vm, 0, 0x4000, x, 0, x)
    driver.steps.clear()
    sm_map(vm, 0x1000, 0x2000, x, 0x1000, x)
    assert driver.steps[0] == (
        "remap",
        (0, 0x1000, x, 0),
        (0x2000, 0x4000, x, 0x2000),
        (0, 0x4000, x, 0),
        True,
    )
    assert len(mappings(vm)) == 3
    teardown_vm(vm, x)
    put_all(x)


def test_example_three_mappings_covered(dev, driver):
    """A=[0,0x2000) X@0, B=[0x2000,0x3000) Y@0, C=[0x3000,0x5000) Z@0x100; map
    [0x1000,0x4000) W@0: REMAP(prev of A), UNMAP(B), REMAP(next of C at Z@0x1100), MAP."""
    x, y, z, w = bos(dev, "X", "Y", "Z", "W")
    vm = new_vm(dev, driver)
    sm_map(vm, 0, 0x2000, x, 0, x)
    sm_map(vm, 0x2000, 0x3000, y, 0, y)
    sm_map(vm, 0x3000, 0x5000, z, 0x100, z)
    driver.steps.clear()
    sm_map(vm, 0x1000, 0x4000, w, 0, x, y, z, w)
    assert driver.steps == [
        ("remap", (0, 0x1000, x, 0), None, (0, 0x2000, x, 0), False),
        ("unmap", (0x2000, 0x3000, y, 0), False),
        ("remap", None, (0x4000, 0x5000, z, 0x1100), (0x3000, 0x5000, z, 0x100), False),
        ("map", 0x1000, 0x4000, w, 0),
    ]
    assert mappings(vm) == [(0, 0x1000, x, 0), (0x1000, 0x4000, w, 0), (0x4000, 0x5000, z, 0x1100)]
    teardown_vm(vm, x, y, z, w)
    put_all(x, y, z, w)


def test_example_unmap_middle_and_hole(dev, driver):
    """A=[0,0x4000) X@0x100; sm_unmap(0x1000, 0x1000): one REMAP keeping both ends (X@0x100,
    X@0x2100), keep false; remap_to_unmap_range gives the hole (0x1000, 0x1000)."""
    (x,) = bos(dev, "X")
    vm = new_vm(dev, driver)
    sm_map(vm, 0, 0x4000, x, 0x100, x)
    ops = drm_gpuvm.sm_unmap_ops_create(vm, 0x1000, 0x1000)
    (op,) = ops
    assert describe(op) == (
        "remap",
        (0, 0x1000, x, 0x100),
        (0x2000, 0x4000, x, 0x2100),
        (0, 0x4000, x, 0x100),
        False,
    )
    assert drm_gpuvm.gpuva_op_remap_to_unmap_range(op.remap) == (0x1000, 0x1000)
    drm_gpuvm.gpuva_ops_free(vm, ops)
    teardown_vm(vm, x)
    put_all(x)


def test_example_unmap_wide_range_and_kernel_node(dev, driver):
    """A=[0x2000,0x3000) X@0; sm_unmap(0, 0x10000) is one UNMAP; an unmap of nothing gives
    no step; a map overlapping the kernel's reserved node is -EINVAL before any step."""
    (x,) = bos(dev, "X")
    vm = new_vm(dev, driver, reserve_offset=0x100000, reserve_range=0x1000)
    sm_map(vm, 0x2000, 0x3000, x, 0, x)
    driver.steps.clear()
    sm_unmap(vm, 0x20000, 0x30000)
    assert driver.steps == []
    sm_unmap(vm, 0, 0x10000, x)
    assert driver.steps == [("unmap", (0x2000, 0x3000, x, 0), False)]
    with pytest.raises(Einval, match="not a valid range"):
        sm_map(vm, 0x100800, 0x101800, x, 0, x)
    assert driver.steps == [("unmap", (0x2000, 0x3000, x, 0), False)]
    teardown_vm(vm, x)
    put_all(x)


def test_unmap_across_mappings_and_gaps(dev, driver):
    """An unmap range covering a cut mapping, a whole one, a gap and another cut one gives
    REMAP(prev), UNMAP, REMAP(next) in address order."""
    x, y, z = bos(dev, "X", "Y", "Z")
    vm = new_vm(dev, driver)
    sm_map(vm, 0, 0x2000, x, 0, x)
    sm_map(vm, 0x2000, 0x3000, y, 0, y)
    sm_map(vm, 0x5000, 0x8000, z, 0, z)
    driver.steps.clear()
    sm_unmap(vm, 0x1000, 0x6000, x, y, z)
    assert driver.steps == [
        ("remap", (0, 0x1000, x, 0), None, (0, 0x2000, x, 0), False),
        ("unmap", (0x2000, 0x3000, y, 0), False),
        ("remap", None, (0x6000, 0x8000, z, 0x1000), (0x5000, 0x8000, z, 0), False),
    ]
    assert mappings(vm) == [(0, 0x1000, x, 0), (0x6000, 0x8000, z, 0x1000)]
    teardown_vm(vm, x, y, z)
    put_all(x, y, z)


def test_sparse_mapping_never_keeps_and_is_not_linked(dev, driver):
    """A mapping with no object (sparse) is inserted but not linked, and an identical sparse
    request does not mark it keep (merge starts false without an object)."""
    vm = new_vm(dev, driver)
    sm_map(vm, 0, 0x2000, None, 0)
    (va,) = drm_gpuvm.for_each_va(vm)
    assert va.vm_bo is None
    driver.steps.clear()
    sm_map(vm, 0, 0x2000, None, 0)
    assert driver.steps == [("unmap", (0, 0x2000, None, 0), False), ("map", 0, 0x2000, None, 0)]
    teardown_vm(vm)


def test_sm_map_needs_all_step_callbacks_and_valid_range(dev, driver):
    """sm_map without sm_step_map is -EINVAL; so are ranges that overflow u64 or leave the VM."""
    (x,) = bos(dev, "X")
    vm = new_vm(dev, driver, start=0x1000, size=0x10000)
    with pytest.raises(Einval, match="not a valid"):
        sm_map(vm, 0, 0x2000, x, 0, x)
    with pytest.raises(Einval, match="not a valid"):
        sm_map(vm, 0x10000, 0x12000, x, 0, x)
    with pytest.raises(Einval, match="not a valid"):
        drm_gpuvm.sm_unmap(vm, vm, drm_gpuvm.U64_MAX, 2)
    driver.ops.sm_step_map = None
    with pytest.raises(Einval, match="sm_step_map"):
        sm_map(vm, 0x1000, 0x2000, x, 0, x)
    drm_gpuvm.sm_unmap(vm, vm, 0x1000, 0x1000)  # unmap needs no map callback
    assert driver.steps == []
    teardown_vm(vm, x)
    put_all(x)


def test_callback_error_stops_the_walk(dev, driver):
    """A step callback raising stops sm_map: later steps (and the MAP) never run; the steps
    before it stay applied, as the kernel returns the first error with no rollback."""
    x, y, z = bos(dev, "X", "Y", "Z")
    vm = new_vm(dev, driver)
    sm_map(vm, 0, 0x1000, x, 0, x)
    sm_map(vm, 0x1000, 0x2000, y, 0, y)
    driver.steps.clear()
    real = driver.ops.sm_step_unmap
    calls = []

    def failing_unmap(op, priv):
        calls.append(op)
        if len(calls) == 2:
            raise Enomem(msg="driver page tables")
        real(op, priv)

    driver.ops.sm_step_unmap = failing_unmap
    with pytest.raises(Enomem, match="driver page tables"):
        sm_map(vm, 0, 0x2000, z, 0, x, y, z)
    assert [d[0] for d in driver.steps] == ["unmap"]
    assert mappings(vm) == [(0x1000, 0x2000, y, 0)]
    driver.ops.sm_step_unmap = real
    teardown_vm(vm, x, y, z)
    put_all(x, y, z)


def test_ops_create_enomem_frees_the_partial_list(dev, driver):
    """An allocation failure inside sm_map_ops_create raises -ENOMEM, frees what was
    allocated (op_free per op) and leaves the tree untouched."""
    (x,) = bos(dev, "X")
    vm = new_vm(dev, driver)
    sm_map(vm, 0, 0x4000, x, 0, x)
    freed = []
    driver.ops.op_free = freed.append
    count = {"n": 0}

    def fail_third(what):
        count["n"] += 1
        return count["n"] == 3

    drm_gpuvm.should_fail_alloc = fail_third
    try:
        with pytest.raises(Enomem):
            drm_gpuvm.sm_map_ops_create(vm, DrmGpuvmMapReq(0x1000, 0x1000, x, 0))
    finally:
        drm_gpuvm.should_fail_alloc = None
    assert len(freed) == 1  # the remap op whose copy failed
    assert mappings(vm) == [(0, 0x4000, x, 0)]
    teardown_vm(vm, x)
    put_all(x)


def test_prefetch_and_bo_unmap_ops(dev, driver):
    """prefetch_ops_create lists one PREFETCH per mapping in the range; bo_unmap_ops_create
    one UNMAP per mapping of the vm_bo (under the object's gpuva lock)."""
    x, y = bos(dev, "X", "Y")
    vm = new_vm(dev, driver)
    sm_map(vm, 0, 0x1000, x, 0, x)
    sm_map(vm, 0x1000, 0x2000, y, 0, y)
    sm_map(vm, 0x3000, 0x4000, x, 0x1000, x)
    ops = drm_gpuvm.prefetch_ops_create(vm, 0x800, 0x3000)
    assert [describe(op) for op in ops] == [
        ("prefetch", (0, 0x1000, x, 0)),
        ("prefetch", (0x1000, 0x2000, y, 0)),
        ("prefetch", (0x3000, 0x4000, x, 0x1000)),
    ]
    drm_gpuvm.gpuva_ops_free(vm, ops)
    with locked_all(x):
        vm_bo = drm_gpuvm.bo_find(vm, x)
        ops = drm_gpuvm.bo_unmap_ops_create(vm_bo)
        drm_gpuvm.bo_put(vm_bo)
    assert [op.op for op in ops] == [DrmGpuvaOpType.UNMAP] * 2
    assert [op.unmap.va.va.addr for op in ops] == [0, 0x3000]
    drm_gpuvm.gpuva_ops_free(vm, ops)
    teardown_vm(vm, x, y)
    put_all(x, y)


# --- the VA index --------------------------------------------------------------------------


def _va(addr, size, obj=None, offset=0):
    va = DrmGpuva()
    drm_gpuvm.gpuva_init(va, addr, size, obj, offset)
    return va


def test_insert_rejects_overlap_range_and_kernel_node(dev, driver):
    """gpuva_insert: -EEXIST on any overlap, -EINVAL outside the VM, across the kernel's
    node or past u64; each insert holds one VM reference, the kernel node none, and
    removing the kernel node is refused with a WARN."""
    vm = new_vm(dev, driver, start=0, size=0x100000, reserve_offset=0x80000, reserve_range=0x1000)
    assert vm.kref == 1
    a = _va(0x1000, 0x2000)
    drm_gpuvm.gpuva_insert(vm, a)
    assert vm.kref == 2
    for bad in (_va(0x2000, 0x1000), _va(0, 0x1001), _va(0x2FFF, 1)):
        with pytest.raises(Eexist):
            drm_gpuvm.gpuva_insert(vm, bad)
    for bad in (_va(0xFF000, 0x2000), _va(0x7F000, 0x2000), _va(drm_gpuvm.U64_MAX, 1)):
        with pytest.raises(Einval):
            drm_gpuvm.gpuva_insert(vm, bad)
    assert vm.kref == 2
    b = _va(0x3000, 0x1000)  # adjacent: no overlap
    drm_gpuvm.gpuva_insert(vm, b)
    assert vm.kref == 3
    with pytest.raises(KernelWarning, match="kernel reserved node"):
        drm_gpuvm.gpuva_remove(vm.kernel_alloc_node)
    drm_gpuvm.gpuva_remove(a)
    drm_gpuvm.gpuva_remove(b)
    assert vm.kref == 1
    drm_gpuvm.put(vm)
    assert driver.freed_vms == [vm]


def test_find_queries(dev, driver):
    """find_first finds the lowest overlap, find only an exact match, find_prev/find_next an
    adjacent neighbour (None across a gap, with the kernel's closed-interval edge cases),
    interval_empty the absence of overlap."""
    vm = new_vm(dev, driver, start=0, size=0x100000)
    a, b, c = _va(0x1000, 0x1000), _va(0x2000, 0x2000), _va(0x6000, 0x1000)
    for va in (c, a, b):
        drm_gpuvm.gpuva_insert(vm, va)
    assert drm_gpuvm.gpuva_find_first(vm, 0, 0x1800) is a
    assert drm_gpuvm.gpuva_find_first(vm, 0x1FFF, 0x10000) is a
    assert drm_gpuvm.gpuva_find_first(vm, 0x4000, 0x2000) is None
    assert drm_gpuvm.gpuva_find_first(vm, 0x3FFF, 1) is b
    assert drm_gpuvm.gpuva_find(vm, 0x2000, 0x2000) is b
    assert drm_gpuvm.gpuva_find(vm, 0x2000, 0x1000) is None
    assert drm_gpuvm.gpuva_find_prev(vm, 0x2000) is a
    assert drm_gpuvm.gpuva_find_prev(vm, 0x5000) is None  # gap before 0x5000
    assert drm_gpuvm.gpuva_find_prev(vm, 0) is None  # below the VM
    assert drm_gpuvm.gpuva_find_next(vm, 0x2000) is b
    assert drm_gpuvm.gpuva_find_next(vm, 0x4000) is None
    assert drm_gpuvm.gpuva_find_next(vm, 0x100000) is None  # past the VM
    # The kernel searches the closed intervals [start - 1, start] and [end, end + 1]: a
    # mapping starting at ``start`` itself, or one unit after ``end``, is found across a gap.
    assert drm_gpuvm.gpuva_find_prev(vm, 0x6000) is c
    assert drm_gpuvm.gpuva_find_next(vm, 0x5FFF) is c
    assert drm_gpuvm.interval_empty(vm, 0x4000, 0x2000)
    assert not drm_gpuvm.interval_empty(vm, 0x4000, 0x2001)
    assert list(drm_gpuvm.for_each_va_range(vm, 0x1800, 0x6000)) == [a, b]
    assert list(drm_gpuvm.for_each_va_range(vm, 0x1800, 0x6001)) == [a, b, c]
    for va in drm_gpuvm.for_each_va_range(vm, 0, 0x100000):
        drm_gpuvm.gpuva_remove(va)  # safe against removal of the current one
    assert drm_gpuvm.interval_empty(vm, 0, 0x100000)
    drm_gpuvm.put(vm)


def test_range_iteration_includes_kernel_node(dev, driver):
    """for_each_va_range does not skip the kernel's reserved node (as the kernel's macro)."""
    vm = new_vm(dev, driver, start=0, size=0x10000, reserve_offset=0x4000, reserve_range=0x1000)
    assert list(drm_gpuvm.for_each_va_range(vm, 0, 0x10000)) == [vm.kernel_alloc_node]
    drm_gpuvm.put(vm)


# --- vm_bo lifetime ------------------------------------------------------------------------


def test_vm_bo_unique_and_refcounted(dev, driver):
    """obtain twice gives the same vm_bo with two references; find adds one; each holds a VM
    and a GEM reference only once; the last put frees it (vm_bo_free) and drops both."""
    (x,) = bos(dev, "X")
    vm = new_vm(dev, driver)
    with locked_all(x):
        base = x.refcount  # the caller's and the exec's
        v1 = drm_gpuvm.bo_obtain(vm, x)
        v2 = drm_gpuvm.bo_obtain(vm, x)
        assert v1 is v2 and v1.kref == 2
        assert drm_gpuvm.bo_find(vm, x) is v1 and v1.kref == 3
        assert list(drm_gpuvm.gem_for_each_gpuvm_bo(x)) == [v1]
        assert vm.kref == 2 and x.refcount == base + 1
        assert not drm_gpuvm.bo_put(v1)
        assert not drm_gpuvm.bo_put(v1)
        assert drm_gpuvm.bo_put(v1)
        assert driver.freed_vm_bos == [v1]
        assert list(drm_gpuvm.gem_for_each_gpuvm_bo(x)) == []
        assert drm_gpuvm.bo_find(vm, x) is None
    assert vm.kref == 1 and x.refcount == 1
    drm_gpuvm.put(vm)
    put_all(x)


def test_vm_bo_prealloc_duplicate_is_dropped(dev, driver):
    """obtain_prealloc links a preallocated vm_bo when there is none, and frees it in favour
    of the existing one (with a new reference) when there is."""
    (x,) = bos(dev, "X")
    vm = new_vm(dev, driver)
    first = drm_gpuvm.bo_create(vm, x)  # allocation outside any lock, as in the ioctl
    second = drm_gpuvm.bo_create(vm, x)
    with locked_all(x):
        assert drm_gpuvm.bo_obtain_prealloc(first) is first
        assert drm_gpuvm.bo_obtain_prealloc(second) is first
        assert driver.freed_vm_bos == [second] and first.kref == 2
        drm_gpuvm.bo_put(first)
        drm_gpuvm.bo_put(first)
    assert driver.freed_vm_bos == [second, first]
    assert vm.kref == 1 and x.refcount == 1
    drm_gpuvm.put(vm)
    put_all(x)


@pytest.mark.parametrize("mode", MODES, ids=["spinlocks", "resv-protected"])
def test_vm_bo_freed_with_last_unlink(dev, driver, mode):
    """A vm_bo lives as long as one of its mappings is linked: unmapping one of two keeps
    it; unmapping the last frees it and takes it off the extobj and evict lists."""
    (x,) = bos(dev, "X")
    vm = new_vm(dev, driver, mode)
    sm_map(vm, 0, 0x1000, x, 0, x)
    sm_map(vm, 0x2000, 0x3000, x, 0x1000, x)
    with locked_all(vm.r_obj, x):
        vm_bo = drm_gpuvm.bo_find(vm, x)
        drm_gpuvm.bo_extobj_add(vm_bo)
        drm_gpuvm.bo_evict(vm_bo, True)
        drm_gpuvm.bo_put(vm_bo)
    assert vm_bo.kref == 2 and vm_bo in vm.extobj
    assert (vm_bo in vm.evict) == (mode == 0)  # protected: an extobj is only marked
    sm_unmap(vm, 0, 0x1000, x)
    assert vm_bo.kref == 1 and driver.freed_vm_bos == []
    sm_unmap(vm, 0x2000, 0x3000, x)
    assert driver.freed_vm_bos == [vm_bo]
    assert vm_bo not in vm.extobj and vm_bo not in vm.evict
    assert vm.kref == 1 and x.refcount == 1
    drm_gpuvm.put(vm)
    put_all(x)


def test_vm_last_put_frees_and_warns_on_leftovers(dev, driver):
    """The last VM put releases r_obj and calls vm_free; a VM freed with a mapping still in
    its tree WARNs (drm_gpuvm_fini)."""
    vm = new_vm(dev, driver)
    r_obj = vm.r_obj
    drm_gpuvm.put(vm)
    assert driver.freed_vms == [vm] and r_obj.refcount == 0
    leaky = new_vm(dev, driver)
    va = _va(0, 0x1000)
    drm_gpuvm.gpuva_insert(leaky, va)
    leaky.kref = 1  # the driver lost the reference the mapping holds
    with pytest.raises(KernelWarning, match="not empty"):
        drm_gpuvm.put(leaky)
    gem.put(leaky.r_obj)


def test_vm_bo_not_held_across_sm_map_loses_evicted_state(dev, driver):
    """Re-mapping an evicted object over its only mapping: UNMAP drops the last reference
    and frees the vm_bo (off the evict list), so a driver that obtains the vm_bo only in its
    MAP step links the new mapping to a fresh vm_bo that is not evicted: validate would skip
    it. Holding the vm_bo across sm_map (the kerneldoc's examples) keeps the state."""
    (x,) = bos(dev, "X")
    vm = new_vm(dev, driver)
    sm_map(vm, 0, 0x1000, x, 0, x)
    for hold in (False, True):
        with locked_all(vm.r_obj, x):
            vm_bo = drm_gpuvm.bo_find(vm, x)
            drm_gpuvm.bo_evict(vm_bo, True)
            if not hold:
                drm_gpuvm.bo_put(vm_bo)
            drm_gpuvm.sm_map(vm, vm, DrmGpuvmMapReq(0, 0x1000, x, 0))  # obtains in the step
            now = drm_gpuvm.bo_find(vm, x)
            assert (now is vm_bo) == hold and now.evicted == hold
            assert list(vm.evict) == ([now] if hold else [])
            drm_gpuvm.bo_evict(now, False)
            drm_gpuvm.bo_put(now)
            if hold:
                drm_gpuvm.bo_put(vm_bo)
    teardown_vm(vm, x)
    put_all(x)


# --- extobj and evict lists -----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES, ids=["spinlocks", "resv-protected"])
def test_extobj_list_holds_external_objects_once(dev, driver, mode):
    """extobj_add lists an external object's vm_bo once however often it is called, and a
    VM-private object's never; is_extobj agrees."""
    ext, priv = bos(dev, "ext", "priv")
    vm = new_vm(dev, driver, mode)
    make_private(priv, vm)
    assert drm_gpuvm.is_extobj(vm, ext) and not drm_gpuvm.is_extobj(vm, priv)
    assert not drm_gpuvm.is_extobj(vm, None)
    sm_map(vm, 0, 0x1000, ext, 0, ext)
    sm_map(vm, 0x1000, 0x2000, priv, 0, priv)
    with locked_all(vm.r_obj, ext):
        for obj in (ext, priv, ext):
            vm_bo = drm_gpuvm.bo_find(vm, obj)
            drm_gpuvm.bo_extobj_add(vm_bo)
            drm_gpuvm.bo_put(vm_bo)
    assert [v.obj for v in vm.extobj] == [ext]
    teardown_vm(vm, ext, priv)
    put_all(ext, priv)


def test_extobj_add_needs_vm_resv_when_protected(dev, driver):
    """With RESV_PROTECTED, extobj_add without the VM's resv is a lockdep report."""
    (ext,) = bos(dev, "ext")
    vm = new_vm(dev, driver, DRM_GPUVM_RESV_PROTECTED)
    sm_map(vm, 0, 0x1000, ext, 0, ext)
    with locked_all(ext):
        vm_bo = drm_gpuvm.bo_find(vm, ext)
        with pytest.raises(LockdepError, match="must hold"):
            drm_gpuvm.bo_extobj_add(vm_bo)
        drm_gpuvm.bo_put(vm_bo)
    assert len(vm.extobj) == 0
    lockdep.reset()
    teardown_vm(vm, ext)
    put_all(ext)


def test_evict_list_spinlock_mode(dev, driver):
    """Without RESV_PROTECTED, bo_evict puts private and external vm_bos on the evict list
    at once (under the spinlock) and takes them off again; the object's resv is required."""
    ext, priv = bos(dev, "ext", "priv")
    vm = new_vm(dev, driver)
    make_private(priv, vm)
    sm_map(vm, 0, 0x1000, ext, 0, ext)
    sm_map(vm, 0x1000, 0x2000, priv, 0, priv)
    with locked_all(vm.r_obj, ext):
        v_ext, v_priv = drm_gpuvm.bo_find(vm, ext), drm_gpuvm.bo_find(vm, priv)
        drm_gpuvm.bo_evict(v_ext, True)
        drm_gpuvm.bo_evict(v_priv, True)
        drm_gpuvm.bo_evict(v_priv, True)
        assert list(vm.evict) == [v_ext, v_priv] and v_ext.evicted and v_priv.evicted
        drm_gpuvm.bo_evict(v_ext, False)
        assert list(vm.evict) == [v_priv] and not v_ext.evicted
        drm_gpuvm.bo_evict(v_priv, False)
    with pytest.raises(LockdepError, match="must hold"):
        drm_gpuvm.bo_evict(v_ext, True)  # the object's resv is not held
    lockdep.reset()
    with locked_all(vm.r_obj, ext):
        drm_gpuvm.bo_evict(v_ext, False)
        drm_gpuvm.bo_put(v_ext)
        drm_gpuvm.bo_put(v_priv)
    teardown_vm(vm, ext, priv)
    put_all(ext, priv)


def test_evict_list_resv_protected_mode(dev, driver):
    """With RESV_PROTECTED, an external object evicted under its own resv is only marked;
    prepare_objects moves it onto the evict list. A private object goes on at once (its resv
    is the VM's)."""
    ext, priv = bos(dev, "ext", "priv")
    vm = new_vm(dev, driver, DRM_GPUVM_RESV_PROTECTED)
    make_private(priv, vm)
    sm_map(vm, 0, 0x1000, ext, 0, ext)
    sm_map(vm, 0x1000, 0x2000, priv, 0, priv)
    with locked_all(vm.r_obj, ext):
        v_ext, v_priv = drm_gpuvm.bo_find(vm, ext), drm_gpuvm.bo_find(vm, priv)
        drm_gpuvm.bo_extobj_add(v_ext)
    with locked_all(ext):  # the shrinker's view: only the BO's resv
        drm_gpuvm.bo_evict(v_ext, True)
    assert v_ext.evicted and len(vm.evict) == 0
    with locked_all(vm.r_obj):
        drm_gpuvm.bo_evict(v_priv, True)
    assert list(vm.evict) == [v_priv]
    with DrmGpuvmExec(vm, num_fences=1) as vm_exec:
        drm_gpuvm.exec_lock(vm_exec)
        assert list(vm.evict) == [v_priv, v_ext]
        drm_gpuvm.validate(vm, vm_exec.exec)
        assert driver.validated == [v_priv, v_ext] and len(vm.evict) == 0
        drm_gpuvm.bo_put(v_ext)
        drm_gpuvm.bo_put(v_priv)
    teardown_vm(vm, ext, priv)
    put_all(ext, priv)


def test_bo_gem_evict_marks_every_vm(dev, driver):
    """bo_gem_evict marks the object evicted in every VM that maps it."""
    (ext,) = bos(dev, "ext")
    vms = [new_vm(dev, driver, name=f"vm{i}") for i in range(3)]
    for vm in vms:
        sm_map(vm, 0, 0x1000, ext, 0, ext)
    with locked_all(ext):
        drm_gpuvm.bo_gem_evict(ext, True)
    assert all(len(vm.evict) == 1 and next(iter(vm.evict)).evicted for vm in vms)
    with locked_all(ext):
        drm_gpuvm.bo_gem_evict(ext, False)
    for vm in vms:
        assert len(vm.evict) == 0
        teardown_vm(vm, ext)
    put_all(ext)


def test_lockless_walk_survives_removal_and_insertion(dev, driver):
    """The spinlock-mode walk of prepare_objects tolerates a vm_bo leaving the list (its last
    mapping unmapped) and another joining it meanwhile, and restores the list afterwards."""
    a, b, c = bos(dev, "a", "b", "c")
    vm = new_vm(dev, driver)
    for i, obj in enumerate((a, b)):
        sm_map(vm, i * 0x1000, (i + 1) * 0x1000, obj, 0, obj)
    with locked_all(vm.r_obj, a, b):
        for obj in (a, b):
            vm_bo = drm_gpuvm.bo_find(vm, obj)
            drm_gpuvm.bo_extobj_add(vm_bo)
            drm_gpuvm.bo_put(vm_bo)
    seen = []
    with drm_exec.init(0) as ex:
        for attempt in drm_exec.until_all_locked(ex):
            with attempt:
                seen.clear()
                walk = drm_gpuvm._for_each_vm_bo_in_list(vm, vm.extobj)
                first = next(walk)
                seen.append(first.obj)
                drm_exec.lock_obj(ex, first.obj)
                # meanwhile b loses its mapping and c gains one
                drm_exec.lock_obj(ex, b)
                drm_exec.lock_obj(ex, c)
                drm_gpuvm.sm_unmap(vm, vm, 0x1000, 0x1000)
                drm_gpuvm.sm_map(vm, vm, DrmGpuvmMapReq(0x4000, 0x1000, c, 0))
                v_c = drm_gpuvm.bo_find(vm, c)
                drm_gpuvm.bo_extobj_add(v_c)
                drm_gpuvm.bo_put(v_c)
                seen.extend(v.obj for v in walk)
    assert seen == [a, c]
    assert [v.obj for v in vm.extobj] == [a, c] and vm.extobj.local_list is None
    teardown_vm(vm, a, b, c)
    put_all(a, b, c)


# --- exec helpers ---------------------------------------------------------------------------


def _vm_with_objects(dev, driver, mode, n_ext=3, n_priv=2):
    vm = new_vm(dev, driver, mode)
    ext = bos(dev, *[f"ext{i}" for i in range(n_ext)])
    priv = [make_private(bo, vm) for bo in bos(dev, *[f"priv{i}" for i in range(n_priv)])]
    for i, obj in enumerate(ext + priv):
        sm_map(vm, i * 0x1000, (i + 1) * 0x1000, obj, 0, obj)
    with locked_all(vm.r_obj, *ext):
        for obj in ext + priv:
            vm_bo = drm_gpuvm.bo_find(vm, obj)
            drm_gpuvm.bo_extobj_add(vm_bo)
            drm_gpuvm.bo_put(vm_bo)
    return vm, ext, priv


@pytest.mark.parametrize("mode", MODES, ids=["spinlocks", "resv-protected"])
def test_exec_lock_locks_vm_and_each_extobj_once(dev, driver, mode):
    """exec_lock locks the VM's resv and every external object exactly once, with the fence
    slots reserved; private objects are covered by the VM's resv (never locked separately);
    exec_unlock releases all."""
    vm, ext, priv = _vm_with_objects(dev, driver, mode)
    with DrmGpuvmExec(vm, drm_exec.DRM_EXEC_INTERRUPTIBLE_WAIT, num_fences=2) as vm_exec:
        drm_gpuvm.exec_lock(vm_exec)
        locked = [obj for _, obj in drm_exec.for_each_locked_object(vm_exec.exec)]
        assert locked == [vm.r_obj, *ext]
        for obj in locked:
            assert dma_resv.held(obj.resv)
            assert obj.resv.fences.max_fences - obj.resv.fences.num_fences >= 2
        assert all(dma_resv.held(p.resv) for p in priv)
    assert not any(dma_resv.is_locked(o.resv) for o in [vm.r_obj, *ext])
    teardown_vm(vm, *ext, *priv)
    put_all(*ext, *priv)


def test_exec_lock_extra_and_array_and_range(dev, driver):
    """extra.fn locks more objects in the same transaction; exec_lock_array is that with a
    list; exec_lock_range locks only the objects mapped in the range (not the VM's resv)."""
    vm, ext, priv = _vm_with_objects(dev, driver, DRM_GPUVM_RESV_PROTECTED, n_ext=2, n_priv=1)
    (other,) = bos(dev, "other")
    calls = []

    def extra(vm_exec):
        calls.append(vm_exec)
        drm_exec.prepare_obj(vm_exec.exec, vm_exec.extra.priv, 1)

    with DrmGpuvmExec(vm, num_fences=1, fn=extra, priv=other) as vm_exec:
        drm_gpuvm.exec_lock(vm_exec)
        assert calls == [vm_exec] and dma_resv.held(other.resv)
    with DrmGpuvmExec(vm, num_fences=1) as vm_exec:
        drm_gpuvm.exec_lock_array(vm_exec, [other])
        assert [o for _, o in drm_exec.for_each_locked_object(vm_exec.exec)][-1] is other
    with DrmGpuvmExec(vm) as vm_exec:
        drm_gpuvm.exec_lock_range(vm_exec, 0x1000, 0x1000)  # ext[1] only
        assert [o for _, o in drm_exec.for_each_locked_object(vm_exec.exec)] == [ext[1]]
        assert not dma_resv.held(vm.r_obj.resv)
    teardown_vm(vm, *ext, *priv)
    put_all(*ext, *priv, other)


def test_exec_lock_failure_unlocks_everything(dev, driver):
    """An error from extra.fn leaves exec_lock with nothing locked (drm_exec_fini on error)."""
    vm, ext, _ = _vm_with_objects(dev, driver, 0, n_ext=2, n_priv=0)

    def extra(vm_exec):
        raise Enomem(msg="driver object table")

    vm_exec = DrmGpuvmExec(vm, num_fences=1, fn=extra)
    with pytest.raises(Enomem, match="driver object table"):
        drm_gpuvm.exec_lock(vm_exec)
    assert not any(dma_resv.is_locked(o.resv) for o in [vm.r_obj, *ext])
    teardown_vm(vm, *ext)
    put_all(*ext)


@pytest.mark.parametrize("mode", MODES, ids=["spinlocks", "resv-protected"])
def test_validate_revalidates_exactly_the_evicted(dev, driver, mode):
    """validate calls vm_bo_validate for each evicted vm_bo of this VM and no other, and the
    evict list is empty afterwards; a second validate calls nothing."""
    vm, ext, priv = _vm_with_objects(dev, driver, mode)
    evicted = [ext[0], ext[2], priv[1]]
    with locked_all(vm.r_obj, *ext):
        for obj in evicted:
            vm_bo = drm_gpuvm.bo_find(vm, obj)
            drm_gpuvm.bo_evict(vm_bo, True)
            drm_gpuvm.bo_put(vm_bo)
    with DrmGpuvmExec(vm, num_fences=1) as vm_exec:
        drm_gpuvm.exec_lock(vm_exec)
        drm_gpuvm.exec_validate(vm_exec)
        assert sorted(v.obj.label for v in driver.validated) == sorted(o.label for o in evicted)
        assert len(vm.evict) == 0 and not any(v.evicted for v in driver.validated)
        driver.validated.clear()
        drm_gpuvm.validate(vm, vm_exec.exec)
        assert driver.validated == []
    teardown_vm(vm, *ext, *priv)
    put_all(*ext, *priv)


def test_validate_stops_at_first_error_and_keeps_uncleared(dev, driver):
    """RESV_PROTECTED validate stops at the first failing callback; an entry whose callback
    did not clear ``evicted`` stays on the list; without the callback it is -EOPNOTSUPP."""
    vm, _, priv = _vm_with_objects(dev, driver, DRM_GPUVM_RESV_PROTECTED, n_ext=0, n_priv=3)
    with locked_all(vm.r_obj):
        for obj in priv:
            vm_bo = drm_gpuvm.bo_find(vm, obj)
            drm_gpuvm.bo_evict(vm_bo, True)
            drm_gpuvm.bo_put(vm_bo)
    order = list(vm.evict)

    def hook(vm_bo):
        if vm_bo is order[1]:
            return  # leaves it evicted
        if vm_bo is order[2]:
            raise Enomem(msg="swap-in")
        drm_gpuvm.bo_evict(vm_bo, False)

    driver.validate_hook = hook
    with DrmGpuvmExec(vm, num_fences=1) as vm_exec:
        drm_gpuvm.exec_lock(vm_exec)
        with pytest.raises(Enomem, match="swap-in"):
            drm_gpuvm.validate(vm, vm_exec.exec)
        assert list(vm.evict) == order[1:]
        driver.validate_hook = None
        drm_gpuvm.validate(vm, vm_exec.exec)
        assert len(vm.evict) == 0
        driver.ops.vm_bo_validate = None
        with pytest.raises(KernelError) as err:
            drm_gpuvm.validate(vm, vm_exec.exec)
        assert err.value.errno == errno.EOPNOTSUPP
    teardown_vm(vm, *priv)
    put_all(*priv)


def test_validate_protected_needs_vm_resv(dev, driver):
    """RESV_PROTECTED validate and prepare_objects assert the VM's resv."""
    vm = new_vm(dev, driver, DRM_GPUVM_RESV_PROTECTED)
    with drm_exec.init(0) as ex:
        with pytest.raises(LockdepError, match="must hold"):
            drm_gpuvm.validate(vm, ex)
        lockdep.reset()
        with pytest.raises(LockdepError, match="must hold"):
            drm_gpuvm.prepare_objects(vm, ex, 1)
    lockdep.reset()
    drm_gpuvm.put(vm)


@pytest.mark.parametrize("mode", MODES, ids=["spinlocks", "resv-protected"])
def test_resv_add_fence_private_and_extobj_usage(dev, driver, mode):
    """resv_add_fence adds the fence to the VM's resv with the private usage (which private
    objects see, sharing it) and to every external object with the extobj usage."""
    vm, ext, priv = _vm_with_objects(dev, driver, mode)
    fence = DmaFence(None, dma_fence.context_alloc(1), 1)
    with DrmGpuvmExec(vm, num_fences=1) as vm_exec:
        drm_gpuvm.exec_lock(vm_exec)
        drm_gpuvm.exec_resv_add_fence(vm_exec, fence, DmaResvUsage.WRITE, DmaResvUsage.BOOKKEEP)

    def entries(obj):
        return [(f, u) for f, u in obj.resv.fences.table[: obj.resv.fences.num_fences]]

    assert entries(vm.r_obj) == [(fence, DmaResvUsage.WRITE)]
    for obj in priv:
        assert entries(obj) == [(fence, DmaResvUsage.WRITE)]
    for obj in ext:
        assert entries(obj) == [(fence, DmaResvUsage.BOOKKEEP)]
    dma_fence.signal(fence)
    dma_fence.put(fence)
    teardown_vm(vm, *ext, *priv)
    put_all(*ext, *priv)


def test_sm_map_exec_lock_locks_the_victims(dev, driver):
    """sm_map_exec_lock locks the object to map and every object a REMAP/UNMAP would touch,
    without changing the tree."""
    x, y, z, w = bos(dev, "X", "Y", "Z", "W")
    vm = new_vm(dev, driver)
    sm_map(vm, 0, 0x2000, x, 0, x)
    sm_map(vm, 0x2000, 0x3000, y, 0, y)
    sm_map(vm, 0x8000, 0x9000, z, 0, z)
    before = mappings(vm)
    with drm_exec.init(drm_exec.DRM_EXEC_IGNORE_DUPLICATES) as ex:
        for attempt in drm_exec.until_all_locked(ex):
            with attempt:
                drm_gpuvm.sm_map_exec_lock(vm, ex, 1, DrmGpuvmMapReq(0x1000, 0x2000, w, 0))
                drm_gpuvm.sm_unmap_exec_lock(vm, ex, 0, 0x1000)
        assert [o for _, o in drm_exec.for_each_locked_object(ex)] == [w, x, y]
    assert mappings(vm) == before
    teardown_vm(vm, x, y, z, w)
    put_all(x, y, z, w)


# --- lockdep on the gpuva lock ----------------------------------------------------------------


def test_link_without_gpuva_lock_is_reported(dev, driver):
    """Linking (and obtaining) needs the object's gpuva lock, its resv by default: without it
    lockdep reports the missing lock."""
    (x,) = bos(dev, "X")
    vm = new_vm(dev, driver)
    with pytest.raises(LockdepError, match="must hold"):
        drm_gpuvm.bo_obtain(vm, x)
    lockdep.reset()
    va = _va(0, 0x1000, x, 0)
    drm_gpuvm.gpuva_insert(vm, va)  # the tree is the driver's to lock, not the object's
    with locked_all(x):
        vm_bo = drm_gpuvm.bo_obtain(vm, x)
    with pytest.raises(LockdepError, match="must hold"):
        drm_gpuvm.gpuva_link(va, vm_bo)
    lockdep.reset()
    assert va not in vm_bo.gpuva
    with locked_all(x):
        drm_gpuvm.gpuva_link(va, vm_bo)
    with pytest.raises(LockdepError, match="must hold"):
        drm_gpuvm.gpuva_unlink(va)
    lockdep.reset()
    with locked_all(x):
        drm_gpuvm.gpuva_unlink(va)
        drm_gpuvm.gpuva_remove(va)
        drm_gpuvm.bo_put(vm_bo)
        assert list(drm_gpuvm.gem_for_each_gpuvm_bo(x)) == []
    drm_gpuvm.put(vm)
    put_all(x)


def test_immediate_mode_uses_the_gem_gpuva_mutex(dev, driver):
    """In DRM_GPUVM_IMMEDIATE_MODE the gpuva list is protected by the object's gpuva.lock
    mutex: the resv alone is reported, the mutex alone suffices."""
    (x,) = bos(dev, "X")
    vm = new_vm(dev, driver, DRM_GPUVM_IMMEDIATE_MODE)
    prealloc = drm_gpuvm.bo_create(vm, x)
    with locked_all(x), pytest.raises(LockdepError, match=r"gpuva\.lock"):
        drm_gpuvm.bo_obtain_prealloc(prealloc)
    lockdep.reset()
    lock = drm_gpuvm.gem_gpuva(x).lock
    with lock:
        vm_bo = drm_gpuvm.bo_obtain_prealloc(prealloc)
        drm_gpuvm.bo_put(vm_bo)
    assert driver.freed_vm_bos == [vm_bo]
    drm_gpuvm.put(vm)
    put_all(x)


def test_gpuva_set_lock_names_a_driver_lock(dev, driver):
    """drm_gem_gpuva_set_lock: a driver lock replaces the resv for the assertion; setting it
    twice WARNs."""
    (x,) = bos(dev, "X")
    vm = new_vm(dev, driver)
    driver_lock = Mutex("x.driver_gpuva_lock")
    drm_gpuvm.gem_gpuva_set_lock(x, driver_lock)
    with pytest.raises(KernelWarning, match="set twice"):
        drm_gpuvm.gem_gpuva_set_lock(x, driver_lock)
    with driver_lock:
        vm_bo = drm_gpuvm.bo_obtain(vm, x)
        drm_gpuvm.bo_put(vm_bo)
    with locked_all(x), pytest.raises(LockdepError, match=r"x\.driver_gpuva_lock"):
        drm_gpuvm.bo_obtain(vm, x)
    lockdep.reset()
    drm_gpuvm.put(vm)
    put_all(x)


def test_obtain_in_signalling_path_is_reported(dev, driver):
    """bo_obtain allocates (GFP_KERNEL): in the fence signalling critical section lockdep
    reports it, which is why bind jobs preallocate with bo_create + bo_obtain_prealloc."""
    (x,) = bos(dev, "X")
    vm = new_vm(dev, driver)
    prealloc = drm_gpuvm.bo_create(vm, x)
    with locked_all(x):
        cookie = lockdep.dma_fence_begin_signalling()
        try:
            with pytest.raises(LockdepError):
                drm_gpuvm.bo_obtain(vm, x)
            lockdep.reset()
            vm_bo = drm_gpuvm.bo_obtain_prealloc(prealloc)  # no allocation: quiet
        finally:
            lockdep.dma_fence_end_signalling(cookie)
        drm_gpuvm.bo_put(vm_bo)
    assert not lockdep.reports()
    drm_gpuvm.put(vm)
    put_all(x)


def test_list_spinlock_is_atomic_context(dev, driver):
    """The extobj/evict spinlocks put their holder in atomic context: sleeping there (here a
    vm_bo put, which may sleep) is reported."""
    (x,) = bos(dev, "X")
    vm = new_vm(dev, driver)
    with locked_all(x):
        vm_bo = drm_gpuvm.bo_obtain(vm, x)
        with pytest.raises(LockdepError, match="atomic"), vm.evict.lock:
            drm_gpuvm.bo_put(vm_bo)
        lockdep.reset()
        assert drm_gpuvm.bo_put(vm_bo)  # outside the spinlock: fine
    drm_gpuvm.put(vm)
    put_all(x)
