"""The VM_BIND flavour's work per mapping does not grow with the number of mappings.

One BO bound page by page at scattered VAs (a mapping per page, as sparse binding does), then
reclaim evicts it, an exec revalidates it (drm_gpuvm_validate -> vm_bo_validate, which
rewrites every mapping's PTEs) and every mapping is unbound again. At two mapping counts
(``SMALL`` and ``BIG``) the test counts what each phase does, deterministically:

- *inspections*: reads of a mapping's ``evicted`` flag and comparisons of a mapping with
  another one (what a walk of a vm_bo's gpuva list, a search for a mapping in it, or a
  removal from it costs per element);
- page-table work: PTE runs written, runs unmapped, TLB flushes, table preallocations.

Per mapping every count must stay the same at ``BIG`` as at ``SMALL`` (within
``SLACK``): a walk of all of a vm_bo's mappings per mapping shows as a count that grows with
the mapping count. Wall time is not measured (tests/bench/bench_gpuvm.py does that).
"""

from __future__ import annotations

import os
from collections import Counter

import pytest

from gemu.device.abi import packets as pk
from gemu.guest.gemu_drv import vm_bind
from gemu.guest.gemu_drv.vm import GpuVm
from gemu.guest.gemu_drv.vm_bind import GemuVma, VmBindDriver
from gemu.host.machine import Machine

PAGE = 4096
CMD_VA = 0x10_0000
DATA_VA = 0x1000_0000
SMALL, BIG = 300, 1200
SLACK = 1.15
"""Largest allowed growth of a per-mapping count from SMALL to BIG mappings (a count that
walks every mapping per mapping grows 4x)."""
WAIT_S = 60.0 * float(os.environ.get("GEMU_TIMEOUT_MULT", "1"))
"""A test's wait for a bind or a job it expects to finish (the machine may be loaded)."""

counts: Counter[str] = Counter()


class CountingVma(GemuVma):
    """A mapping that counts the reads of its ``evicted`` flag and its comparisons."""

    __slots__ = ("_evicted",)

    @property
    def evicted(self) -> bool:
        counts["inspections"] += 1
        return self._evicted

    @evicted.setter
    def evicted(self, value: bool) -> None:
        self._evicted = value

    def __eq__(self, other: object) -> bool:
        counts["inspections"] += 1
        return self is other

    __hash__ = object.__hash__


def _counting(name: str, fn):
    def wrapper(*args, **kwargs):
        counts[name] += 1
        return fn(*args, **kwargs)

    return wrapper


@pytest.fixture
def counted(monkeypatch):
    """Every mapping the driver makes counts its inspections; the page-table writer counts
    its runs, unmaps, flushes and preallocations."""
    monkeypatch.setattr(vm_bind, "GemuVma", CountingVma)
    for name in ("_write_run", "unmap_pages", "flush", "_prealloc_tables"):
        monkeypatch.setattr(GpuVm, name, _counting(name, getattr(GpuVm, name)))
    counts.clear()
    yield counts
    counts.clear()


def _phases(n: int) -> dict[str, Counter[str]]:
    """Bind ``n`` one-page mappings of one BO, evict it, exec (validate), unbind each
    (the newest first); the counts of each phase."""
    per_phase: dict[str, Counter[str]] = {}
    ram = max(16 << 20, n * PAGE * 3)
    with Machine(ram_size=ram, swap_size=ram, device="inproc") as m:
        drv = VmBindDriver(m.driver)
        f = drv.open()
        vm_id = f.vm_create()
        vm = f.vms[vm_id]
        cmd = f.bo_create(PAGE, vm_id=vm_id)
        nop = pk.nop()
        f.write(cmd, 0, nop)
        f.wait(f.map(vm_id, CMD_VA, PAGE, cmd), WAIT_S)
        bo = f.bo_create(n * PAGE, vm_id=vm_id)
        obj = f.bo(bo).obj
        vas = [DATA_VA + 2 * i * PAGE for i in range(n)]  # not contiguous: no merge

        def phase(name: str, run) -> None:
            counts.clear()
            run()
            per_phase[name] = Counter(counts)

        def bind() -> None:
            last = None
            for i, va in enumerate(vas):
                last = f.map(vm_id, va, PAGE, bo, offset=i * PAGE)
            f.wait(last, WAIT_S)
            vm.flush_cleanup()

        def mappings():
            vm_bo = next(vb for vb in vm.rb.vas if vb.gem.obj is obj).vm_bo
            return list(vm_bo.gpuva)

        phase("bind", bind)
        assert len(mappings()) == n
        phase("evict", lambda: m.reclaim(m.allocator.totalram_pages))
        assert obj.evicted, "reclaim should have evicted the BO"
        assert all(va._evicted for va in mappings()), "every mapping should be evicted"
        phase("validate", lambda: f.wait(f.exec(vm_id, CMD_VA, len(nop)), WAIT_S))
        assert not obj.evicted
        assert not any(va._evicted for va in mappings()), "validate restores every mapping"

        def unbind() -> None:
            last = None
            for va in reversed(vas):  # the last linked first: a search from the head is long
                last = f.unmap(vm_id, va, PAGE)
            f.wait(last, WAIT_S)
            vm.flush_cleanup()

        phase("unbind", unbind)
        f.close()
        drv.remove()
        m.check_clean()
    return per_phase


def test_per_mapping_work_of_one_bo_does_not_grow_with_its_mapping_count(counted):
    """Bind, evict, validate and unbind of a BO with many mappings are linear in the mapping
    count: the restore loop of vm_bo_validate picks each evicted mapping without walking the
    ones before it, and a mapping leaves its vm_bo's list without a search."""
    small, big = _phases(SMALL), _phases(BIG)
    grown = {}
    for phase in ("bind", "evict", "validate", "unbind"):
        for what in sorted(set(small[phase]) | set(big[phase])):
            per_small = small[phase][what] / SMALL
            per_big = big[phase][what] / BIG
            if per_big > per_small * SLACK + 0.01:
                grown[f"{phase}: {what}"] = (round(per_small, 2), round(per_big, 2))
    assert not grown, f"per mapping at {SMALL} vs {BIG} mappings: {grown}"
    # the work the test counts is there: each evicted mapping's PTEs written back, once
    assert big["validate"]["_write_run"] >= BIG
    assert big["evict"]["unmap_pages"] >= BIG
