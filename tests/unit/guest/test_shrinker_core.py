"""Shrinker registration and shrink_slab: order, batching, SHRINK_STOP/EMPTY, seeks, unregister."""

from __future__ import annotations

import pytest

from gemu.guest.errors import KernelWarning
from gemu.guest.kernel import runtime
from gemu.guest.mm.page_alloc import GFP_KERNEL, GFP_NOFS, PAGE_SIZE, PageAllocator, PhysMem
from gemu.guest.mm.shrinker import (
    DEFAULT_SEEKS,
    SHRINK_BATCH,
    SHRINK_EMPTY,
    SHRINK_STOP,
    Shrinker,
    register_shrinker,
    shrink_slab,
    unregister_shrinker,
)


def make_alloc(frames: int = 32) -> PageAllocator:
    return PageAllocator(PhysMem(bytearray(frames * PAGE_SIZE)), watermarks=(0, 0, 0))


class Cache:
    """A fake cache of ``size`` pages; records the calls reclaim made to it."""

    def __init__(self, name: str, size: int, log: list, *, stop: bool = False, **kw) -> None:
        self.name = name
        self.size = size
        self.log = log
        self.stop = stop
        self.shrinker = Shrinker(name, self.count, self.scan, **kw)

    def count(self, sc) -> int:
        return self.size or SHRINK_EMPTY

    def scan(self, sc) -> int:
        self.log.append((self.name, sc.nr_to_scan, sc.gfp_mask))
        if self.stop:
            return SHRINK_STOP
        n = min(sc.nr_to_scan, self.size)
        self.size -= n
        return n


def test_constants_match_the_kernel():
    """SHRINK_STOP is ~0UL, SHRINK_EMPTY is ~0UL - 1, DEFAULT_SEEKS 2, SHRINK_BATCH 128."""
    assert SHRINK_STOP == 2**64 - 1 and SHRINK_EMPTY == 2**64 - 2
    assert (DEFAULT_SEEKS, SHRINK_BATCH) == (2, 128)


def test_shrinkers_run_in_registration_order_until_the_target_is_met():
    """shrink_slab asks each shrinker in registration order for what is still missing and
    stops as soon as the target is reached; the gfp mask is passed through."""
    log: list = []
    alloc = make_alloc()
    a, b, c = Cache("a", 3, log), Cache("b", 10, log), Cache("c", 10, log)
    for cache in (a, b, c):
        register_shrinker(alloc, cache.shrinker)
    assert shrink_slab(alloc, 8, GFP_NOFS) == 8
    assert log == [("a", 3, int(GFP_NOFS)), ("b", 5, int(GFP_NOFS))]
    assert (a.size, b.size, c.size) == (0, 5, 10)
    st = b.shrinker.statistics()
    assert (st.count_calls, st.scan_calls, st.nr_scanned, st.nr_freed) == (1, 1, 5, 5)


def test_empty_caches_are_counted_but_never_scanned():
    """A shrinker whose count is 0 or SHRINK_EMPTY is skipped without a scan call."""
    log: list = []
    alloc = make_alloc()
    empty = Cache("empty", 0, log)
    register_shrinker(alloc, empty.shrinker)
    assert shrink_slab(alloc, 4, GFP_KERNEL) == 0
    assert log == [] and empty.shrinker.stats.count_calls == 1


def test_scans_are_batched():
    """A large request is split into scan calls of at most ``batch``."""
    log: list = []
    alloc = make_alloc()
    big = Cache("big", 100, log, batch=32)
    register_shrinker(alloc, big.shrinker)
    assert shrink_slab(alloc, 70, GFP_KERNEL) == 70
    assert [n for _, n, _ in log] == [32, 32, 6]


def test_shrink_stop_moves_on_to_the_next_shrinker():
    """SHRINK_STOP ends the work of that shrinker for the pass; the next one is asked."""
    log: list = []
    alloc = make_alloc()
    busy, ok = Cache("busy", 10, log, stop=True), Cache("ok", 10, log)
    register_shrinker(alloc, busy.shrinker)
    register_shrinker(alloc, ok.shrinker)
    assert shrink_slab(alloc, 4, GFP_KERNEL) == 4
    assert log == [("busy", 4, int(GFP_KERNEL)), ("ok", 4, int(GFP_KERNEL))]
    assert busy.shrinker.stats.nr_stopped == 1


def test_seeks_bound_what_one_pass_takes():
    """The scan budget of a pass is count * DEFAULT_SEEKS / seeks: a cache with seeks=4
    gives at most half of itself per pass, one with seeks=0 all of it."""
    log: list = []
    alloc = make_alloc()
    costly = Cache("costly", 40, log, seeks=4, batch=8)
    register_shrinker(alloc, costly.shrinker)
    assert shrink_slab(alloc, 40, GFP_KERNEL) == 20
    cheap = Cache("cheap", 40, log, seeks=0, batch=8)
    unregister_shrinker(alloc, costly.shrinker)
    register_shrinker(alloc, cheap.shrinker)
    assert shrink_slab(alloc, 40, GFP_KERNEL) == 40


def test_a_shrinker_that_scans_nothing_cannot_loop_forever():
    """A scan that reports nr_scanned = 0 and frees nothing still uses up the pass budget."""
    calls = []

    def scan(sc):
        calls.append(sc.nr_to_scan)
        sc.nr_scanned = 0
        return 0

    alloc = make_alloc()
    register_shrinker(alloc, Shrinker("lazy", lambda sc: 5, scan))
    assert shrink_slab(alloc, 3, GFP_KERNEL) == 0
    assert len(calls) == 5


def test_registration_misuse_warns():
    """Registering twice, or unregistering from another allocator, is a loud warning."""
    alloc, other = make_alloc(), make_alloc()
    s = Shrinker("s", lambda sc: 0, lambda sc: 0)
    alloc.register_shrinker(s)
    with pytest.raises(KernelWarning, match="registered twice"):
        register_shrinker(other, s)
    with pytest.raises(KernelWarning, match="not registered here"):
        unregister_shrinker(other, s)
    alloc.unregister_shrinker(s)
    assert alloc.shrinkers == [] and s.allocator is None


def test_unregister_waits_for_a_running_pass():
    """unregister_shrinker returns only after a reclaim pass that is inside the shrinker has
    finished with it (the kernel's SRCU grace period), so the owner may free its data."""
    events = []

    def main():
        alloc = make_alloc()
        entered = runtime.Completion("scan entered")
        release = runtime.Completion("scan may finish")

        def scan(sc):
            events.append("scan start")
            entered.complete()
            release.wait_for_completion()
            events.append("scan end")
            return 1

        s = Shrinker("slow", lambda sc: 1, scan)
        register_shrinker(alloc, s)
        reclaimer = runtime.spawn(shrink_slab, alloc, 1, GFP_KERNEL, name="reclaimer")
        entered.wait_for_completion()

        def unregister():
            unregister_shrinker(alloc, s)
            events.append("unregistered")

        t = runtime.spawn(unregister, name="owner")
        runtime.sleep_ns(1000)
        events.append("release")
        release.complete()
        t.join()
        reclaimer.join()

    runtime.Deterministic(seed=5).run(main)
    assert events == ["scan start", "release", "scan end", "unregistered"]


def test_unregister_from_inside_reclaim_warns():
    """A shrinker unregistering (itself or another) from its own scan would wait for itself:
    warned about."""
    alloc = make_alloc()
    other = Shrinker("other", lambda sc: 0, lambda sc: 0)
    alloc.register_shrinker(other)

    def scan(sc):
        unregister_shrinker(alloc, other)
        return 0

    alloc.register_shrinker(Shrinker("bad", lambda sc: 1, scan))
    with pytest.raises(KernelWarning, match="would wait for itself"):
        shrink_slab(alloc, 1, GFP_KERNEL)
