"""External (vgem-style) fences: attach with read or write usage, the conflict rule, signal,
expiry after VGEM_FENCE_TIMEOUT on the runtime clock, close; and what they are for: a buffer
with a pending external fence is busy, so the shrinker leaves it alone until it signals. All
under the deterministic runtime, whose clock jumps to the timer's deadline at no cost."""

from __future__ import annotations

import pytest

from gemu.guest.dma_buf import dma_fence, dma_resv
from gemu.guest.dma_buf.dma_resv import DmaResvUsage
from gemu.guest.drm import gem, gem_shmem, vgem_fence
from gemu.guest.drm.gem_shmem_shrinker import default_evict
from gemu.guest.drm.vgem_fence import VGEM_FENCE_TIMEOUT_NS, VGEM_FENCE_WRITE, VgemFenceTable
from gemu.guest.errors import Ebusy, Einval, Enoent, Etimedout
from gemu.guest.kernel import runtime
from gemu.guest.locking import lockdep
from gemu.guest.mm.page_alloc import PAGE_SIZE
from tests.support.gem import assert_nothing_left, locked, release_shmem_device, shmem_device

FUNCS = gem_shmem.FUNCS.replace(evict=default_evict)


def run(fn, seed=0):
    """Run ``fn(dev, obj)`` in a deterministic runtime with one idle, evictable 4-page BO; the
    runtime only returns once every task (fence timers included) has finished."""
    lockdep.reset()
    dev = shmem_device(64, 32)
    obj = gem_shmem.create(dev, 4 * PAGE_SIZE, FUNCS)
    gem_shmem.get_pages(obj)
    out = {}

    def main():
        out["result"] = fn(dev, obj)

    runtime.Deterministic(seed).run(main)
    gem_shmem.put_pages(obj)
    gem.put(obj)
    release_shmem_device(dev)
    assert_nothing_left(dev)
    return out["result"]


def busy(obj, usage=DmaResvUsage.READ) -> bool:
    return not dma_resv.test_signaled(obj.resv, usage)


def test_write_fence_keeps_the_bo_busy_and_unevictable_until_signalled():
    """A pending external write fence makes the BO busy for readers and writers: waits time
    out, the shrinker skips it (counted as busy); after the signal it is idle and the
    shrinker evicts it."""

    def body(dev, obj):
        table = VgemFenceTable("file1")
        fid = table.attach(obj, VGEM_FENCE_WRITE)
        assert fid == 1 and busy(obj, DmaResvUsage.WRITE) and busy(obj, DmaResvUsage.READ)
        assert dma_resv.wait_timeout(obj.resv, DmaResvUsage.READ, True, 5_000_000) == 0
        with locked(obj), pytest.raises(Ebusy):
            gem.evict_locked(obj)
        skipped = dev.shmem_mm.stats.skipped_busy
        dev.allocator.direct_reclaim(4)
        assert not obj.evicted and dev.shmem_mm.stats.skipped_busy > skipped
        table.signal(fid)
        assert not busy(obj)
        dev.allocator.direct_reclaim(4)
        assert obj.evicted and dev.shmem_mm.stats.evicted == 1
        table.close()

    run(body)


def test_read_fence_blocks_writers_only_and_attach_conflicts():
    """A reader fence is a READ usage fence: writers wait for it, readers do not; attaching
    a writer over it (or anything over a writer) is -EBUSY; the reader still keeps the BO
    from being evicted (the shrinker's idle test looks at READ)."""

    def body(dev, obj):
        table = VgemFenceTable("file1")
        r1 = table.attach(obj, 0)
        r2 = table.attach(obj, 0)  # readers share
        assert not busy(obj, DmaResvUsage.WRITE) and busy(obj, DmaResvUsage.READ)
        with pytest.raises(Ebusy, match="pending fence"):
            table.attach(obj, VGEM_FENCE_WRITE)
        dev.allocator.direct_reclaim(4)
        assert not obj.evicted
        table.signal(r1)
        table.signal(r2)
        w = table.attach(obj, VGEM_FENCE_WRITE)
        with pytest.raises(Ebusy, match="pending writer"):
            table.attach(obj, 0)
        assert w == 3  # ids are never reused; a refused attach takes none
        table.signal(w)
        table.close()

    run(body)


def test_unsignalled_fence_expires_after_the_timeout_on_the_runtime_clock():
    """An external fence nobody signals is signalled by its timer exactly
    VGEM_FENCE_TIMEOUT (10 s) of runtime clock after the attach, without an error on the
    fence; the BO is idle from then on; signalling it afterwards reports -ETIMEDOUT and
    forgets it (a second signal is -ENOENT)."""
    assert VGEM_FENCE_TIMEOUT_NS == 10 * 10**9

    def body(dev, obj):
        table = VgemFenceTable("file1")
        t0 = runtime.now_ns()
        fid = table.attach(obj, VGEM_FENCE_WRITE)
        fence = table.fence(fid)
        runtime.sleep_ns(VGEM_FENCE_TIMEOUT_NS - 1)
        assert busy(obj) and not fence.expired
        timer = fence.timer
        timer.join()  # the timer task ends once it signalled the fence
        assert not busy(obj) and fence.expired and fence.error == 0
        assert fence.signaled and "expired" in fence.message
        assert fence.timestamp - t0 == VGEM_FENCE_TIMEOUT_NS
        with pytest.raises(Etimedout, match="had expired"):
            table.signal(fid)
        with pytest.raises(Enoent):
            table.signal(fid)
        table.close()
        return runtime.now_ns() - t0

    assert run(body) >= VGEM_FENCE_TIMEOUT_NS


def test_close_signals_what_is_left_and_the_timers_end():
    """Closing the table signals every pending fence (vgem_fence_close); their timers end
    at once, so the runtime finishes long before any timeout."""

    def body(dev, obj):
        table = VgemFenceTable("file1")
        fences = [table.fence(table.attach(obj, 0)) for _ in range(3)]
        table.close()
        assert all(dma_fence.is_signaled(f) and not f.expired for f in fences)
        with pytest.raises(Einval, match="after close"):
            table.attach(obj, 0)
        runtime.sleep_ns(1)
        assert all(f.timer.done for f in fences)
        return runtime.now_ns()

    assert run(body) < VGEM_FENCE_TIMEOUT_NS


def test_bad_flags_and_unknown_ids():
    """Unknown attach flags and non-zero signal flags are -EINVAL; an unknown id is -ENOENT."""

    def body(dev, obj):
        table = VgemFenceTable("file1")
        with pytest.raises(Einval, match="unknown flags 0x2"):
            table.attach(obj, 2)
        with pytest.raises(Enoent, match="no pending external fence 7"):
            table.signal(7)
        fid = table.attach(obj, 0)
        with pytest.raises(Einval, match="flags must be 0"):
            table.signal(fid, 1)
        assert repr(table.fence(fid)).startswith("<VgemFence file1.f1 pending")
        assert not table.fence(fid).signaled and table.fence(fid).message == ""
        assert table.id_of(table.fence(fid)) == fid
        fence = table.fence(fid)
        table.signal(fid)
        assert table.id_of(fence) is None and table.fence(fid) is None
        assert not busy(obj)
        table.close()

    run(body)


def test_fence_describes_itself_as_vgem():
    """Driver and timeline names are vgem's ("vgem", "unbound")."""

    def body(dev, obj):
        fence = vgem_fence.fence_create("x", timeout_ns=1000)
        assert dma_fence.driver_name(fence) == "vgem"
        assert dma_fence.timeline_name(fence) == "unbound"
        fence.timer.join()
        assert fence.expired and runtime.now_ns() == 1000
        dma_fence.put(fence)

    run(body)
