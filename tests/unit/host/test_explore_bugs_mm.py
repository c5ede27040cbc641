"""The corpus's GEM shmem, GEM LRU, shrinker and dma_resv entries: each found again with a fixed
seed through the path ``gemu explore --bug NAME`` takes, the working driver clean on each
entry's scenario, the CLI; and the invariants they need (vmap, resv-slots, resv-content,
lifetime of GEM objects and of a scan's LRU) firing on hand-made violations and quiet on
correct state."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gemu.guest import errors
from gemu.guest.dma_buf import dma_fence, dma_resv
from gemu.guest.dma_buf.dma_fence import DmaFence
from gemu.guest.dma_buf.dma_resv import DmaResvUsage
from gemu.guest.drm import gem, gem_lru, gem_shmem
from gemu.guest.errors import KernelWarning
from gemu.guest.gemu_drv.job import Mutant
from gemu.guest.locking.mutex import Mutex
from gemu.guest.mm.page_alloc import PageAllocator, PhysMem
from gemu.host.cli import main
from gemu.host.explore import bugs, engine
from gemu.host.explore.scenario import (
    KINDS,
    SCENARIOS,
    ExploreConfig,
    check_fence_slots,
    check_shmem_counts,
    warning_kind,
)
from gemu.host.explore.shmem_run import ShmemRun

AREA = (
    "gem-lru-lock-via-obj",
    "msm-shrinker-ticket",
    "resv-older-fence-replaces",
    "shmem-vunmap-clears-vaddr",
    "shmem-mmap-errant-put",
)

MINE = [b for b in bugs.BUGS if b.name in AREA]


def test_the_area_has_its_entries():
    names = {b.name for b in bugs.BUGS}
    assert set(AREA) <= names
    for b in MINE:
        assert Mutant(b.mutant) is not Mutant.NONE
        assert b.invariant in KINDS
        assert b.scenario in SCENARIOS
        assert len(b.fix) == 40 and int(b.fix, 16) >= 0
        assert b.verified and b.kernel and b.model


@pytest.mark.parametrize("bug", MINE, ids=lambda b: b.name)
def test_entry_found_with_a_fixed_seed(bug):
    """The campaign ``gemu explore --bug NAME --seed S --schedules 1`` runs."""
    cfg = ExploreConfig(scenario=SCENARIOS[bug.scenario], mutant=bug.mutant)
    rep = engine.run_campaign(cfg, 1, bug.seed, workers=1)
    assert rep.first is not None, bug.name
    assert bug.invariant in {v.kind for v in rep.first.violations}, rep.first.violations


@pytest.mark.parametrize("bug", MINE, ids=lambda b: b.name)
def test_working_driver_clean_on_entry_scenario(bug):
    cfg = ExploreConfig(scenario=SCENARIOS[bug.scenario])
    rep = engine.run_campaign(cfg, 6, bug.seed, workers=1)
    assert rep.first is None, rep.first.violations


def test_list_bugs_names_the_entries(capsys):
    assert main(["explore", "--list-bugs"]) == 0
    lines = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
    for b in MINE:
        assert lines[b.name] == b.fix[:12]


def test_bug_from_the_real_cli(tmp_path):
    """``gemu explore --bug`` in a process of its own: exit 1, the violation, a reproduction."""
    cmd = [
        sys.executable,
        "-m",
        "gemu.host.cli",
        "explore",
        "--bug",
        "shmem-vunmap-clears-vaddr",
        "--seed",
        "0",
        "--schedules",
        "2",
        "--workers",
        "1",
        "--no-shrink",
        "--quiet",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "bug shmem-vunmap-clears-vaddr: fixed by dd7177627618" in proc.stdout
    assert "VIOLATION vmap:" in proc.stdout
    assert (tmp_path / "seed-0" / "repro.json").is_file()


# -- the invariants on hand-made state -------------------------------------------------------


@pytest.fixture
def lax():
    was = errors.is_strict()
    errors.set_strict(False)
    errors.reset_warn_stats()
    yield errors.warn_stats()
    errors.set_strict(was)
    errors.reset_warn_stats()


@pytest.fixture
def dev():
    alloc = PageAllocator(PhysMem(bytearray(64 * 4096)), reserved_frames=1)
    return gem.DrmDevice(alloc, None, semantics="v19")


def test_vmap_invariant_quiet_through_nested_vmaps(dev):
    obj = gem_shmem.create(dev, 8192)
    assert check_shmem_counts(obj) is None
    a = gem_shmem.vmap(obj)
    b = gem_shmem.vmap(obj)
    assert check_shmem_counts(obj) is None
    gem_shmem.vunmap(obj, b)
    assert check_shmem_counts(obj) is None
    gem_shmem.vunmap(obj, a)
    assert check_shmem_counts(obj) is None
    gem.put(obj)


def test_vmap_invariant_fires_on_hand_made_violations(dev):
    obj = gem_shmem.create(dev, 8192)
    vaddr = gem_shmem.vmap(obj)
    gem_shmem.vmap(obj)
    obj.vaddr = None  # what the pre-dd7177627618 inner vunmap left
    assert "vmap_use_count 2 but vaddr is None" in check_shmem_counts(obj)
    obj.vaddr = vaddr
    obj.pages_pin_count = 0
    assert "vmapped (2) but not pinned" in check_shmem_counts(obj)
    obj.pages_pin_count = 1
    obj.madv = -1
    assert "pinned (1)" in check_shmem_counts(obj)
    obj.madv = 0
    obj.vmap_use_count = 0
    assert "set with vmap_use_count 0" in check_shmem_counts(obj)
    obj.vmap_use_count = -1
    assert "below 0" in check_shmem_counts(obj)


def test_vunmap_mutant_breaks_the_vmap_invariant(dev):
    from gemu.guest.drm import gem_shmem_shrinker

    gem_shmem_shrinker.drmm_gem_shmem_init(dev)
    dev.shmem_mm.vunmap_clears_vaddr = True
    obj = gem_shmem.create(dev, 8192)
    outer = gem_shmem.vmap(obj)
    inner = gem_shmem.vmap(obj)
    gem_shmem.vunmap(obj, inner)
    assert "vaddr is None" in check_shmem_counts(obj)
    assert outer.read(0, 4) == bytes(4)  # the outer user's mapping itself still works


def test_resv_slots_invariant(lax):
    resv = dma_resv.init(name="slots")
    dma_resv.lock(resv, None)
    dma_resv.reserve_fences(resv, 1)
    dma_resv.add_fence(resv, DmaFence(None, dma_fence.context_alloc(1), 1), DmaResvUsage.WRITE)
    assert check_fence_slots(resv) is None
    dma_resv.unlock(resv)  # the reservation is forgotten: max_fences == num_fences
    dma_resv.lock(resv, None)
    dma_resv.add_fence(resv, DmaFence(None, dma_fence.context_alloc(1), 1), DmaResvUsage.READ)
    dma_resv.unlock(resv)
    (msg,) = [m for m in lax.counts if "without a reserved slot" in m]
    assert warning_kind(msg) == "resv-slots"
    assert check_fence_slots(resv) is None  # the model grew the list to go on
    resv.fences.num_fences = resv.fences.max_fences + 1
    assert "fences in" in check_fence_slots(resv)
    resv.fences.num_fences -= 1
    resv.fences.table.append(resv.fences.table[0])
    assert "entries" in check_fence_slots(resv)


def test_gem_lifetime_warnings_are_lifetime(dev, lax):
    obj = gem_shmem.create(dev, 4096)
    obj.funcs = gem.DrmGemObjectFuncs(free=lambda o: None)
    gem.put(obj)
    gem.put(obj)
    gem.get(obj)
    kinds = {warning_kind(m) for m in lax.counts}
    assert kinds == {"lifetime"}, lax.counts


def test_scan_list_lock_after_the_scan_is_a_use_after_free(dev):
    lock = Mutex("lru-test")
    lru = gem_lru.DrmGemLru(lock, "evictable")
    obj = gem_shmem.create(dev, 4096)
    gem_lru.move_tail(lru, obj)
    seen = []

    def shrink(o, _ticket):
        seen.append(o.lru)  # the scan's still_in_lru while it looks at o
        return False

    gem_lru.scan(lru, 1, gem_lru.Remaining(), shrink)
    assert obj.lru is lru and seen[0] is not lru
    gem_lru.remove(obj)  # the right path: the lock reached through the live list
    with pytest.raises(KernelWarning, match="use after free: the lock of evictable:still_in_lru"):
        seen[0].lock.lock()


def test_resv_content_invariant():
    run = ShmemRun(ExploreConfig(scenario=SCENARIOS["shmem"]), 0)
    run.tracked = {}
    resv = dma_resv.init(name="content")
    obj = gem.DrmGemObject()
    obj.resv = resv
    obj.refcount = 1
    ctx = dma_fence.context_alloc(1)
    older, newer = DmaFence(None, ctx, 1), DmaFence(None, ctx, 2)
    dma_resv.lock(resv, None)
    dma_resv.reserve_fences(resv, 2)
    dma_resv.add_fence(resv, newer, DmaResvUsage.WRITE)
    dma_resv.add_fence(resv, older, DmaResvUsage.WRITE)  # kept apart: not later
    dma_resv.unlock(resv)
    run._track(obj, dma_fence.get(newer))
    run.check_resv_content()
    assert run.violations == []
    resv.fences.table = [(older, DmaResvUsage.WRITE)]  # what the pre-a3f7c10a269d add left
    resv.fences.num_fences = 1
    run.check_resv_content()
    assert [v.kind for v in run.violations] == ["resv-content"]
    assert f"{ctx}:2" in run.violations[0].message
    # a freed BO's reservation went with it: what was tracked on it is forgotten, unreported
    run.violations.clear()
    obj.refcount = 0
    run.check_resv_content()
    assert run.violations == [] and run.tracked == {}


def test_older_fence_replaces_newer_under_the_mutant():
    ctx = dma_fence.context_alloc(1)
    older, newer = DmaFence(None, ctx, 1), DmaFence(None, ctx, 2)
    resv = dma_resv.init(name="older")
    dma_resv.set_replaces_older(True)
    try:
        dma_resv.lock(resv, None)
        dma_resv.reserve_fences(resv, 2)
        dma_resv.add_fence(resv, newer, DmaResvUsage.WRITE)
        dma_resv.add_fence(resv, older, DmaResvUsage.WRITE)
        dma_resv.unlock(resv)
    finally:
        dma_resv.set_replaces_older(False)
    assert [f for f, _u in resv.fences.table[: resv.fences.num_fences]] == [older]


@pytest.mark.parametrize("seed", [801, 1012, 1374, 1522, 1662, 10085])
def test_working_driver_clean_where_the_scenario_once_was_wrong(seed):
    """PCT schedules of ``shmem`` that once reported the working driver: -ENOMEM when reclaim
    found nothing it could free (801, 10085, 1522, 1662: the scenario now leaves more free
    frames, holds its vmaps shorter and lets a task run at most two jobs before it waits) and
    resv-content for a freed BO whose reservation held an imported fence of a job that never
    used it (1012, 1374)."""
    cfg = ExploreConfig(scenario=SCENARIOS["shmem"], strategy="pct")
    rep = engine.run_campaign(cfg, 1, seed, workers=1)
    assert rep.first is None, rep.first.violations
