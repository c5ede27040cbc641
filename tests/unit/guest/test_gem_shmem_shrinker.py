"""The shmem shrinker: set-up, count, purge-then-evict, what is never reclaimed (pinned, busy,
locked, no swap room), the return-value rule, the driver's evict hook ordering, reclaim from
the page allocator, and a submit-versus-reclaim race under the deterministic runtime."""

from __future__ import annotations

import pytest

from gemu.guest.dma_buf import dma_fence, dma_resv
from gemu.guest.dma_buf.dma_fence import DmaFence
from gemu.guest.dma_buf.dma_resv import DmaResvUsage
from gemu.guest.drm import gem, gem_shmem
from gemu.guest.drm.gem_shmem_shrinker import (
    default_evict,
    drmm_gem_shmem_init,
    drmm_gem_shmem_release,
)
from gemu.guest.errors import Ebusy, Enomem, KernelWarning
from gemu.guest.kernel import runtime
from gemu.guest.locking import lockdep
from gemu.guest.mm.page_alloc import GFP_KERNEL, PAGE_SIZE
from gemu.guest.mm.shrinker import SHRINK_EMPTY, SHRINK_STOP, ShrinkControl
from tests.support.gem import (
    assert_nothing_left,
    fence_on,
    locked,
    release_shmem_device,
    shmem_device,
)

FUNCS = gem_shmem.FUNCS.replace(evict=default_evict)


def machine(frames=64, slots=32, **dev_kw):
    return shmem_device(frames, slots, poison_on_free=True, **dev_kw)


def finish(dev):
    """Every object gone, nothing on an LRU, no frame or slot or lock or report left."""
    release_shmem_device(dev)
    assert_nothing_left(dev)


@pytest.fixture
def dev():
    lockdep.reset()
    d = machine()
    yield d
    finish(d)


def bo(dev, pages=1, madv=0, funcs=FUNCS, fill=b""):
    """An object with pages got (reclaimable when idle), optionally madvised and filled."""
    obj = gem_shmem.create(dev, pages * PAGE_SIZE, funcs)
    gem_shmem.get_pages(obj)
    if fill:
        obj.filp.write(0, fill)
    if madv:
        gem_shmem.madvise(obj, madv)
    return obj


def drop(*objs):
    for obj in objs:
        if obj.pages_use_count:
            gem_shmem.put_pages(obj)
        gem.put(obj)


def scan(dev, nr):
    return dev.shmem_mm.scan_objects(ShrinkControl(gfp_mask=int(GFP_KERNEL), nr_to_scan=nr))


def test_init_twice_is_ebusy_and_release_unregisters(dev):
    """A device gets one shrinker; a second init is -EBUSY; release unregisters it."""
    mm = dev.shmem_mm
    assert mm.shrinker in dev.allocator.shrinkers
    with pytest.raises(Ebusy, match="already"):
        drmm_gem_shmem_init(dev)
    drmm_gem_shmem_release(dev)
    assert mm.shrinker not in dev.allocator.shrinkers and dev.shmem_mm is None
    drmm_gem_shmem_init(dev)


def test_count_is_the_evictable_pages(dev):
    """count_objects reports the pages on lru_evictable, SHRINK_EMPTY when there are none;
    pinned pages do not count."""
    sc = ShrinkControl(gfp_mask=int(GFP_KERNEL))
    mm = dev.shmem_mm
    assert mm.count_objects(sc) == SHRINK_EMPTY
    a, b = bo(dev, 2), bo(dev, 3)
    gem_shmem.pin(b)
    assert mm.count_objects(sc) == 2
    gem_shmem.unpin(b)
    assert mm.count_objects(sc) == 5
    drop(a, b)


def test_purges_before_evicting(dev):
    """The purge pass runs first over the whole LRU: a purgeable object behind an evictable
    one is purged and the evictable one left alone while that is enough; asked for more,
    the evict pass writes the other to swap."""
    keep = bo(dev, 2, fill=b"keep")
    junk = bo(dev, 2, madv=1)
    other = bo(dev, 1)
    assert list(dev.shmem_mm.lru_evictable) == [keep, junk, other]
    stats = dev.shmem_mm.stats
    scan(dev, 2)
    assert junk.madv == -1 and junk.lru is None and stats.purged == 1
    assert not keep.evicted and not other.evicted and stats.evicted == 0
    scan(dev, 2)
    assert keep.evicted and other.evicted and stats.evicted == 2 and keep.lru.name == "evicted"
    swapin_and_check(keep, b"keep")
    drop(keep, junk, other)


def swapin_and_check(obj, data):
    with locked(obj):
        gem_shmem.swapin_locked(obj)
    assert obj.filp.read(0, len(data)) == data


def test_scan_returns_stop_unless_it_freed_and_something_remains(dev):
    """The v19 rule: return the freed pages only when some were freed and some objects were
    skipped as locked; otherwise SHRINK_STOP (also when everything it found was freed)."""
    a = bo(dev, 1)
    assert scan(dev, 8) == SHRINK_STOP and a.evicted  # freed 1, nothing remaining
    b, c = bo(dev, 1), bo(dev, 1)
    with locked(b):
        assert scan(dev, 8) == 1  # c freed, b remaining
    with locked(b):
        assert scan(dev, 8) == SHRINK_STOP  # nothing freed, b remaining
    assert dev.shmem_mm.stats.skipped_locked == 4  # both passes of both scans met b locked
    drop(a, b, c)


def test_evict_pass_needs_swap_room_for_the_whole_object():
    """An object larger than the free swap is not evicted (purging needs no swap)."""
    lockdep.reset()
    dev = machine(slots=3)
    big, small, junk = bo(dev, 4), bo(dev, 2), bo(dev, 4, madv=1)
    scan(dev, 100)
    assert junk.madv == -1 and small.evicted and not big.evicted
    assert dev.shmem_mm.stats.skipped_no_swap >= 1 and big.lru.name == "evictable"
    drop(big, small, junk)
    finish(dev)


def test_pinned_objects_are_never_reclaimed(dev):
    """Pinned objects (also vmapped ones) are not on the walked list: reclaim leaves them,
    and an allocation that needs their frames fails."""
    a = bo(dev, 4, madv=1)
    gem_shmem.pin(a)
    b = gem_shmem.create(dev, 4 * PAGE_SIZE, FUNCS)
    vaddr = gem_shmem.vmap(b)
    assert scan(dev, 100) == SHRINK_STOP
    with pytest.raises(Enomem):
        dev.allocator.alloc_pages(dev.allocator.nr_free + 1)
    assert a.pages is not None and a.madv == 1 and b.pages is not None and not b.evicted
    gem_shmem.vunmap(b, vaddr)
    gem_shmem.unpin(a)
    drop(a, b)


@pytest.mark.parametrize(
    ("idle_usage", "fence_usage", "reclaimed"),
    [
        (DmaResvUsage.READ, DmaResvUsage.WRITE, False),
        (DmaResvUsage.READ, DmaResvUsage.READ, False),
        (DmaResvUsage.READ, DmaResvUsage.BOOKKEEP, True),
        (DmaResvUsage.BOOKKEEP, DmaResvUsage.BOOKKEEP, False),
    ],
)
@pytest.mark.parametrize("madv", [0, 1], ids=["evict", "purge"])
def test_busy_objects_are_never_reclaimed(idle_usage, fence_usage, reclaimed, madv):
    """An object with an unsignalled fence up to the device's idle usage is skipped by both
    passes (counted as busy) and reclaimed once the fence signals; with the kernel's READ a
    BOOKKEEP fence does not protect it, with BOOKKEEP (R4) it does."""
    lockdep.reset()
    dev = machine(idle_usage=idle_usage)
    obj = bo(dev, 2, madv=madv)
    fence = fence_on(obj, fence_usage)
    scan(dev, 100)
    done = obj.evicted or obj.madv < 0
    assert done == reclaimed
    if not reclaimed:
        assert dev.shmem_mm.stats.skipped_busy >= 1 and obj.pages is not None
        dma_fence.signal(fence)
        scan(dev, 100)
        assert obj.evicted or obj.madv < 0
    dma_fence.signal(fence) if not dma_fence.is_signaled(fence) else None
    dma_fence.put(fence)
    drop(obj)
    finish(dev)


def test_driver_evict_hook_runs_before_the_frames_are_freed(dev):
    """The driver's wrapper around default_evict sees the frames still allocated and
    holding the object's data (it unmaps the GPU VM and flushes the TLB there); right after,
    the frames are free."""
    seen = []

    def driver_evict(obj):
        alloc = dev.allocator
        frames = list(obj.pages)
        seen.append(
            (
                all(alloc.is_allocated(p) for p in frames),
                alloc.physmem.read(frames[0] * PAGE_SIZE, 4),
                dma_resv.held(obj.resv),
            )
        )
        default_evict(obj)
        seen.append(any(alloc.is_allocated(p) for p in frames))

    obj = bo(dev, 2, funcs=gem_shmem.FUNCS.replace(evict=driver_evict), fill=b"data")
    scan(dev, 2)
    assert seen == [(True, b"data", True), False] and obj.evicted
    drop(obj)


def test_direct_reclaim_evicts_idle_objects_for_an_allocation(dev):
    """An allocation that does not fit makes the page allocator run the shrinker: idle
    objects are evicted, the allocation succeeds, and the evicted contents come back."""
    objs = [bo(dev, 8, fill=bytes([i]) * 64) for i in range(6)]
    hog = dev.allocator.alloc_pages(dev.allocator.nr_free + 20)
    assert sum(o.evicted for o in objs) >= 3
    dev.allocator.free_pages(hog)
    for i, o in enumerate(objs):
        swapin_and_check(o, bytes([i]) * 64)
    drop(*objs)


def test_mainline_shrinker_only_purges():
    """With mainline semantics nothing is evictable: the shrinker purges purgeable objects
    (those with an sgt) and leaves the rest resident."""
    lockdep.reset()
    dev = machine(semantics="mainline")
    keep = bo(dev, 2)
    junk = gem_shmem.create(dev, 2 * PAGE_SIZE, FUNCS)
    gem_shmem.get_pages_sgt(junk)
    gem_shmem.madvise(junk, 1)
    scan(dev, 100)
    assert junk.madv == -1 and junk.pages_use_count == 0
    assert keep.pages is not None and not keep.evicted and keep.lru.name == "pinned"
    drop(keep, junk)
    finish(dev)


def test_swapin_is_counted(dev):
    """Statistics count evictions and swap-ins."""
    obj = bo(dev, 1)
    scan(dev, 1)
    swapin_and_check(obj, b"\0")
    s = dev.shmem_mm.stats.as_dict()
    assert (s["scans"], s["evicted"], s["swapped_in"]) == (1, 1, 1)
    drop(obj)


# --- submit versus reclaim ------------------------------------------------------------------


def _submit_vs_reclaim(seed: int, strategy: str, fence_before_unlock: bool) -> bool:
    """One schedule of a job submission racing direct reclaim. Returns whether the "GPU"
    read the right data through the table the submitter built (False also when the table
    went stale under the job, which the model reports at the read)."""
    dev = machine(frames=32, slots=32)
    data = bytes(range(256)) * 16
    obj = bo(dev, 2, fill=data + data)
    ok = {}
    in_flight = runtime.Completion("submission in flight")

    def submitter():
        fence = DmaFence(None, dma_fence.context_alloc(1), 1)
        dma_resv.lock(obj.resv, None)
        dma_resv.reserve_fences(obj.resv, 1)
        gem_shmem.swapin_locked(obj)
        sgt = gem_shmem.get_pages_sgt_locked(obj)
        in_flight.complete()
        if fence_before_unlock:
            dma_resv.add_fence(obj.resv, fence, DmaResvUsage.WRITE)
            dma_resv.unlock(obj.resv)
        else:  # the bug: the object is idle between unlock and the fence
            dma_resv.unlock(obj.resv)
            dma_resv.lock(obj.resv, None)
            dma_resv.reserve_fences(obj.resv, 1)
            dma_resv.add_fence(obj.resv, fence, DmaResvUsage.WRITE)
            dma_resv.unlock(obj.resv)
        runtime.preempt("job runs")
        phys = dev.allocator.physmem
        try:
            pfns = sgt.pfns
        except KernelWarning as exc:  # the table went stale under the job: reported at the use
            assert "use of a stale sg table" in str(exc)
            ok["gpu"] = False
        else:
            ok["gpu"] = all(phys.read(p * PAGE_SIZE, PAGE_SIZE) == data for p in pfns)
        dma_fence.signal(fence)
        dma_fence.put(fence)

    def reclaimer():
        in_flight.wait_for_completion()  # reclaim while the submission is in flight
        for _ in range(3):
            dev.allocator.direct_reclaim(2)
            runtime.preempt("between reclaims")

    def main():
        tasks = [runtime.spawn(submitter, name="submit"), runtime.spawn(reclaimer, name="kswapd")]
        for t in tasks:
            t.join()

    runtime.Deterministic(seed, strategy=strategy).run(main)
    swapin_and_check(obj, data + data)
    drop(obj)
    finish(dev)
    return ok["gpu"]


@pytest.mark.parametrize("strategy", ["random", "pct"])
def test_fenced_objects_survive_reclaim_under_every_schedule(strategy):
    """Adding the job fence before unlocking keeps the object resident while the job runs:
    over 40 seeded schedules of a submission racing reclaim, the frames in the job's table
    always hold the object's data."""
    lockdep.reset()
    assert all(_submit_vs_reclaim(seed, strategy, True) for seed in range(40))


def test_fence_after_unlock_is_caught():
    """The same race with the fence added after the unlock: PCT schedules find the window in
    which the shrinker evicts the object under the running job, whose table of frames is
    then stale (its use is reported)."""
    lockdep.reset()
    results = [_submit_vs_reclaim(seed, "pct", False) for seed in range(40)]
    assert results.count(False) >= 5, "PCT no longer exposes the missing fence"


@pytest.mark.parametrize("blocking", [False, True])
def test_the_shrinker_trylocks_because_reclaim_nests_inside_reservations(blocking):
    """Allocating under a reservation lock (a swap-in does) records reservation ->
    fs_reclaim. The shrinker's trylock keeps reclaim from adding the reverse order; the
    ``shrinker-blocking-lock`` mutant's blocking lock does, and lockdep reports the inversion
    at once, in a single interleaving (the object is evicted either way)."""
    out = {}

    def main():
        dev = machine()
        dev.shmem_mm.blocking_lock = blocking
        victim = bo(dev, 8)
        with locked(victim):
            dev.allocator.free_pages(dev.allocator.alloc_pages(1))
        out["freed"] = dev.allocator.direct_reclaim(8)
        out["evicted"] = victim.evicted
        out["reports"] = [(r.kind, r.message.splitlines()[0]) for r in lockdep.reports()]
        drop(victim)
        release_shmem_device(dev)

    runtime.Deterministic(seed=1, strict=False).run(main)
    assert out["freed"] == 8 and out["evicted"]
    if not blocking:
        assert out["reports"] == []
    else:
        [(kind, message)] = out["reports"]
        assert kind == "inversion"
        assert "takes bo" in message and "while holding fs_reclaim" in message
        assert "reservation_ww_class_mutex -> fs_reclaim is a recorded order" in message
