"""DOC: shrinkers, the callbacks through which reclaim asks caches to give memory back.

A :class:`Shrinker` pairs ``count_objects(sc)`` (how much could be freed now) with
``scan_objects(sc)`` (free up to ``sc.nr_to_scan``; return how much was freed, or
:data:`SHRINK_STOP` when nothing more can be done now, e.g. every object is busy).
Registered shrinkers run inside every reclaim pass of their page allocator: direct reclaim in
an allocating task, and kswapd. The GEM shmem shrinker is the one that matters here: it counts
the pages of evictable objects and evicts them to swap.

Usage::

    def count(sc):
        return cache.nr_pages or SHRINK_EMPTY

    def scan(sc):
        freed = cache.drop(sc.nr_to_scan)
        return freed if freed else SHRINK_STOP

    shrinker = Shrinker("my-cache", count, scan)
    register_shrinker(allocator, shrinker)
    ...
    unregister_shrinker(allocator, shrinker)   # waits for passes that are running it

Modelled on ``mm/shrinker.c`` (``shrinker_alloc``/``shrinker_register``/``shrinker_free``,
``do_shrink_slab``, ``shrink_slab``). Choices the model makes:

- Guest memory has no page cache, so shrinkers are the only reclaimable memory and reclaim is
  *targeted*: :func:`shrink_slab` asks for exactly the pages the allocator is short, instead
  of the kernel's pressure scaled by priority and ``nr_deferred``. Shrinkers run in
  registration order (the kernel's list order), each in batches of at most ``batch`` until
  the target is reached, it returns :data:`SHRINK_STOP`, or its scan budget for the pass is
  spent. The budget is ``count * DEFAULT_SEEKS / seeks`` objects (``2 * count`` for
  ``seeks == 0``), so an expensive-to-recreate cache (high ``seeks``) gives up less per pass.
- ``nr_to_scan`` is ``min(batch, budget left, pages still wanted)``: the GEM shrinkers count
  and scan in pages and stop once they freed ``nr_to_scan``.
- Unregistering waits until no reclaim pass is using the shrinker (the kernel's SRCU grace
  period), so its owner may free its data right after :func:`unregister_shrinker` returns.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gemu.guest.errors import warn_on
from gemu.guest.kernel import runtime

if TYPE_CHECKING:
    from gemu.guest.mm.page_alloc import Gfp, PageAllocator

SHRINK_STOP = (1 << 64) - 1
"""``scan_objects`` return: nothing can be freed now, stop asking. Kernel: SHRINK_STOP (~0UL)."""
SHRINK_EMPTY = (1 << 64) - 2
"""``count_objects`` return: the cache is empty. Kernel: SHRINK_EMPTY (~0UL - 1)."""
DEFAULT_SEEKS = 2
"""Cost of recreating an object. Kernel: DEFAULT_SEEKS."""
SHRINK_BATCH = 128
"""Default scan batch. Kernel: SHRINK_BATCH."""


@dataclass(slots=True)
class ShrinkControl:
    """What reclaim asks of one shrinker call. Kernel: struct shrink_control.

    ``nr_to_scan``: how many objects (pages, for the GEM shrinkers) to scan. ``nr_scanned``:
    preset to ``nr_to_scan``; a shrinker that scanned a different number writes it back.
    ``gfp_mask``: the allocation that triggered reclaim (a shrinker may refuse work that
    could recurse into the filesystem or I/O it needs).
    """

    gfp_mask: int
    nr_to_scan: int = 0
    nr_scanned: int = 0


@dataclass
class ShrinkerStats:
    """Counters of one shrinker: calls to count/scan, objects scanned, pages freed, STOPs."""

    count_calls: int = 0
    scan_calls: int = 0
    nr_scanned: int = 0
    nr_freed: int = 0
    nr_stopped: int = 0


class Shrinker:
    """A reclaimable cache. Kernel: struct shrinker / shrinker_alloc() [mm/shrinker.c]

    ``count_objects(sc) -> int`` returns the freeable amount or :data:`SHRINK_EMPTY`;
    ``scan_objects(sc) -> int`` frees up to ``sc.nr_to_scan`` and returns the amount freed or
    :data:`SHRINK_STOP`. Both run in the reclaiming task inside fs_reclaim: they must not
    block on anything that waits for memory (use trylocks), and they must not allocate with
    reclaim allowed. ``private_data`` is for the owner.
    """

    __slots__ = (
        "_active",
        "_wq",
        "allocator",
        "batch",
        "count_objects",
        "name",
        "private_data",
        "scan_objects",
        "seeks",
        "stats",
    )

    def __init__(
        self,
        name: str,
        count_objects: Callable[[ShrinkControl], int],
        scan_objects: Callable[[ShrinkControl], int],
        seeks: int = DEFAULT_SEEKS,
        batch: int = 0,
        private_data: object = None,
    ) -> None:
        if seeks < 0 or batch < 0:
            raise ValueError("seeks and batch must be >= 0")
        self.name = name
        self.count_objects = count_objects
        self.scan_objects = scan_objects
        self.seeks = seeks
        self.batch = batch or SHRINK_BATCH
        self.private_data = private_data
        #: The allocator it is registered with, or None.
        self.allocator: PageAllocator | None = None
        self.stats = ShrinkerStats()
        self._active = 0  # reclaim passes using it now (under _wq.lock)
        self._wq = runtime.WaitQueue(f"shrinker {name}")

    def __repr__(self) -> str:
        state = "registered" if self.allocator is not None else "unregistered"
        return f"<Shrinker {self.name!r} {state}>"

    def statistics(self) -> ShrinkerStats:
        """A snapshot of the counters."""
        s = self.stats
        return ShrinkerStats(s.count_calls, s.scan_calls, s.nr_scanned, s.nr_freed, s.nr_stopped)


# Tasks running shrink_slab(); unregistering from inside a scan would wait for itself.
_shrinking: set[runtime.Task] = set()


def register_shrinker(allocator: PageAllocator, shrinker: Shrinker) -> None:
    """Make reclaim of ``allocator`` call ``shrinker``. Kernel: shrinker_register()."""
    if warn_on(shrinker.allocator is not None, f"{shrinker!r} registered twice"):
        return
    with allocator.shrinker_lock:
        allocator.shrinkers.append(shrinker)
        shrinker.allocator = allocator


def unregister_shrinker(allocator: PageAllocator, shrinker: Shrinker) -> None:
    """Stop calling ``shrinker`` and wait until no reclaim pass still runs it.

    Kernel: shrinker_free() [mm/shrinker.c] (unlink, then synchronize_srcu()).
    """
    if warn_on(shrinker.allocator is not allocator, f"{shrinker!r} is not registered here"):
        return
    warn_on(
        runtime.current() in _shrinking,
        f"unregistering {shrinker!r} from inside reclaim would wait for itself",
    )
    with allocator.shrinker_lock:
        allocator.shrinkers.remove(shrinker)
        shrinker.allocator = None
    shrinker._wq.wait_event(lambda: shrinker._active == 0, reason=f"unregister {shrinker.name}")


_came_back: weakref.WeakSet = weakref.WeakSet()
"""Tasks whose reclaim met a shrinker that freed nothing but asked to be called again (its
objects were locked or busy at that moment): :func:`met_contention`. Weak: a task whose
reclaim never asks again must not keep its runtime and machine alive (gemu explore runs
thousands of machines in one process)."""


def met_contention() -> bool:
    """Whether the calling task's reclaim, since it last asked, met a shrinker that freed
    nothing but said to come back (``scan_objects`` returned 0, not SHRINK_STOP: reclaimable
    objects were contended). Clears the mark. The page allocator retries such a reclaim
    instead of failing the allocation, as the kernel's should_reclaim_retry() keeps retrying
    while reclaimable memory remains."""
    task = runtime.current()
    if task in _came_back:
        _came_back.discard(task)
        return True
    return False


def do_shrink_slab(sc: ShrinkControl, shrinker: Shrinker, nr_wanted: int) -> int:
    """Ask one shrinker for up to ``nr_wanted`` pages; return what it freed.

    Kernel: do_shrink_slab() [mm/shrinker.c] (targeted; see the module DOC).
    """
    stats = shrinker.stats
    stats.count_calls += 1
    freeable = shrinker.count_objects(sc)
    if freeable == 0 or freeable == SHRINK_EMPTY:
        return 0
    if shrinker.seeks:
        budget = max(freeable * DEFAULT_SEEKS // shrinker.seeks, 1)
    else:
        budget = 2 * freeable
    freed = 0
    while budget > 0 and freed < nr_wanted:
        nr_to_scan = min(shrinker.batch, budget, nr_wanted - freed)
        sc.nr_to_scan = nr_to_scan
        sc.nr_scanned = nr_to_scan
        runtime.preempt(f"shrinker {shrinker.name} scan")
        ret = shrinker.scan_objects(sc)
        stats.scan_calls += 1
        if ret == SHRINK_STOP:
            stats.nr_stopped += 1
            break
        if ret == 0:
            _came_back.add(runtime.current())
        if warn_on(ret < 0, f"{shrinker!r} scan_objects returned {ret}"):
            break
        freed += ret
        scanned = max(sc.nr_scanned, 1)
        stats.nr_scanned += scanned
        budget -= scanned
    stats.nr_freed += freed
    return freed


def shrink_slab(allocator: PageAllocator, nr_to_reclaim: int, gfp: Gfp) -> int:
    """Run the shrinkers of ``allocator`` until ``nr_to_reclaim`` pages are freed or all were
    asked; return the pages freed (as the shrinkers report them).

    Kernel: shrink_slab() [mm/shrinker.c]. The caller is inside fs_reclaim (the allocator's
    reclaim passes take care of that).
    """
    with allocator.shrinker_lock:
        shrinkers = list(allocator.shrinkers)
    for s in shrinkers:
        with s._wq.lock:
            s._active += 1
    task = runtime.current()
    nested = task in _shrinking
    _shrinking.add(task)
    freed = 0
    try:
        for s in shrinkers:
            if freed >= nr_to_reclaim:
                break
            if s.allocator is not allocator:  # unregistered while we ran the others
                continue
            freed += do_shrink_slab(ShrinkControl(gfp_mask=int(gfp)), s, nr_to_reclaim - freed)
    finally:
        if not nested:
            _shrinking.discard(task)
        for s in shrinkers:
            with s._wq.lock:
                s._active -= 1
            s._wq.wake_up_all()
    return freed
