"""An allocation whose reclaim meets contended objects retries instead of failing: a shrinker
that frees nothing but says "come back" (scan_objects returns 0, not SHRINK_STOP, because
its objects are locked or busy for the moment) makes the page allocator try another pass,
as the kernel's should_reclaim_retry() keeps going while reclaimable memory remains; one
that says SHRINK_STOP ends the attempt with -ENOMEM as before."""

from __future__ import annotations

import pytest

from gemu.guest.errors import Enomem
from gemu.guest.mm.page_alloc import GFP_KERNEL, PAGE_SIZE, PageAllocator, PhysMem
from gemu.guest.mm.shrinker import SHRINK_STOP, Shrinker, register_shrinker, unregister_shrinker


class Busy:
    """Holds ``frames``, busy during the first ``busy_passes`` reclaim passes (each pass
    counts the shrinker once): its scans then free nothing and ask to come back (or stop,
    with ``stop``); after that it frees what it holds."""

    def __init__(self, alloc: PageAllocator, frames: list[int], busy_passes: int, stop: bool):
        self.alloc, self.frames, self.busy, self.stop = alloc, frames, busy_passes, stop
        self.passes = 0
        self.shrinker = Shrinker("busy", self.count, self.scan)

    def count(self, sc) -> int:
        self.passes += 1
        return len(self.frames)

    def scan(self, sc) -> int:
        if self.passes <= self.busy:
            return SHRINK_STOP if self.stop else 0
        n = len(self.frames)
        self.alloc.free_pages(self.frames)
        self.frames = []
        return n


def _setup(stop: bool):
    alloc = PageAllocator(PhysMem(bytearray(16 * PAGE_SIZE)), watermarks=(0, 0, 0))
    held = alloc.alloc_pages(alloc.nr_free, GFP_KERNEL)
    cache = Busy(alloc, held, busy_passes=3, stop=stop)
    register_shrinker(alloc, cache.shrinker)
    return alloc, cache


def test_contended_reclaim_is_retried_until_the_objects_are_free():
    alloc, cache = _setup(stop=False)
    try:
        got = alloc.alloc_pages(4, GFP_KERNEL)
        assert len(got) == 4 and cache.passes == 4
        alloc.free_pages(got)
    finally:
        unregister_shrinker(alloc, cache.shrinker)


def test_a_shrinker_that_stops_ends_the_attempt():
    alloc, cache = _setup(stop=True)
    try:
        with pytest.raises(Enomem, match="reclaimed 0 in 1 passes"):
            alloc.alloc_pages(4, GFP_KERNEL)
    finally:
        unregister_shrinker(alloc, cache.shrinker)
        alloc.free_pages(cache.frames)
