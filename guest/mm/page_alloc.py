"""DOC: physical memory and the page allocator of the guest kernel model.

Guest RAM is one real buffer (:class:`PhysMem`): a ``bytearray`` in unit tests, the mapping of
a memfd that the device maps too in the emulator. A *frame* is a 4 KiB page of it, named by
its page frame number (pfn); physical address ``pa = pfn << PAGE_SHIFT``. What the guest writes
into a frame is what the device reads by DMA.

:class:`PageAllocator` hands out frames with the accounting of one kernel zone: ``nr_free``,
``totalram_pages`` and the min/low/high watermarks. An allocation that would leave fewer
than ``min`` pages free enters *direct reclaim* in the caller's task: it runs the registered
shrinkers (:mod:`gemu.guest.mm.shrinker`) inside an fs_reclaim section, retries a bounded
number of times, and raises :class:`~gemu.guest.errors.Enomem` naming what it asked for,
what was free and what reclaim got back. A free count below ``low`` wakes *kswapd*, a task
that reclaims in the background until ``high`` pages are free.

Usage::

    ram = PhysMem(bytearray(64 * PAGE_SIZE))
    alloc = PageAllocator(ram, watermarks=Watermarks(min=4, low=8, high=12))
    pfns = alloc.alloc_pages(3, GFP_KERNEL | Gfp.ZERO)
    ram.write(pfns[0] << PAGE_SHIFT, b"hello")
    alloc.free_pages(pfns)
    alloc.assert_no_leaks()

Modelled on ``mm/page_alloc.c`` and ``mm/vmscan.c``. Choices the model makes:

- ``alloc_pages(n, gfp)`` returns ``n`` frames that need not be contiguous (the kernel's
  ``alloc_pages_bulk``); :meth:`PageAllocator.alloc_contig` serves the few contiguous needs.
  Frames are reused last-freed-first, so a free followed by an allocation of the same size
  gets the same frames back; tests that need different frames allocate a spacer in between.
- The only reclaimable memory is what shrinkers free (there is no page cache LRU), so
  reclaim asks the shrinkers for exactly the deficit (see :func:`~gemu.guest.mm.shrinker.shrink_slab`).
- Watermark reserves follow ``__zone_watermark_ok()``: ``__GFP_HIGH`` may use half of the min
  reserve, a non-blocking ``__GFP_HIGH`` (``GFP_ATOMIC``) a further quarter of what is left,
  and a task inside reclaim (``PF_MEMALLOC``) all of it and never recurses into reclaim.
- Flags and per-task scopes come from :mod:`gemu.guest.mm.gfp`: an allocation's mask goes
  through ``current_gfp_context()`` (a ``memalloc_nofs_save()`` scope drops ``__GFP_FS``), is
  annotated with ``lockdep.might_alloc(gfp)`` (``fs_reclaim`` only for ``__GFP_FS``), and
  direct reclaim hands that mask to the shrinkers. Reclaim itself runs under
  ``memalloc_noreclaim_save()`` (``PF_MEMALLOC``).
- Fault injection is ``fail-nth`` per allocator rather than per task: :meth:`set_fail_nth`.
- Inside a class body, spell ``__GFP_ZERO`` as ``Gfp.ZERO``: Python mangles names that start
  with two underscores there.
"""

from __future__ import annotations

import fcntl
import logging
import math
import mmap
import os
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from itertools import repeat
from operator import add

from gemu.guest.errors import Efault, Einval, Enomem, KernelError, warn_on
from gemu.guest.kernel import runtime, trace
from gemu.guest.locking import lockdep
from gemu.guest.mm import shrinker as _shrinker
from gemu.guest.mm.extents import (
    Extent,
    RunStack,
    expand,
    mark,
    mark_numbers,
    no_neighbours,
    page_views,
    runs_of,
    set_numbers,
    set_states,
    singles,
    total,
)
from gemu.guest.mm.gfp import (
    Gfp,
    current_gfp_context,
    current_is_memalloc,
    gfpflags_allow_blocking,
    memalloc_noreclaim_restore,
    memalloc_noreclaim_save,
)

log = logging.getLogger(__name__)

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
_ZERO_PAGE = bytes(PAGE_SIZE)

MAX_RECLAIM_RETRIES = 16
"""Direct reclaim passes before an allocation gives up. Kernel: MAX_RECLAIM_RETRIES."""

RECLAIM_RETRY_WAIT_NS = 1_000_000
"""How long an allocation whose reclaim pass freed nothing sleeps while another task's reclaim
is still running (one jiffy at HZ=1000). Kernel: should_reclaim_retry() →
schedule_timeout_uninterruptible(1)."""

PAGE_POISON = 0xAA
"""Byte written over freed frames when ``poison_on_free`` is set. Kernel: PAGE_POISON."""
_POISON_PAGE = bytes((PAGE_POISON,)) * PAGE_SIZE

_FILL_PAGES = 16
"""Runs up to this many frames are zeroed or poisoned from a view of one buffer made once per
process (a fresh ``bytes`` of the run's size on every free was about 1% of an explored
schedule); longer runs make theirs."""
_ZEROS = memoryview(bytes(_FILL_PAGES << PAGE_SHIFT))
_POISON = memoryview(bytes((PAGE_POISON,)) * (_FILL_PAGES << PAGE_SHIFT))


def _fill_run(buf: memoryview, value: int, nr: int):
    """``nr`` frames' worth of the byte ``value``: a view of ``buf`` when it is long enough."""
    if nr <= _FILL_PAGES:
        return buf[: nr << PAGE_SHIFT]
    return bytes((value,)) * (nr << PAGE_SHIFT)


# Physical memory.


class PhysMem:
    """Guest RAM: one writable buffer cut into 4 KiB frames.

    ``mem`` is a flat byte memoryview over the whole buffer; ``nr_frames`` whole frames fit in
    it (a trailing partial page is unused). Addresses outside RAM raise :class:`Efault`.
    """

    __slots__ = ("_mmap", "_views", "fd", "mem", "nr_frames", "size")

    def __init__(self, buf) -> None:
        mem = memoryview(buf)
        if mem.readonly:
            raise ValueError("guest RAM must be writable")
        if mem.format != "B" or mem.ndim != 1:
            mem = mem.cast("B")
        self.mem = mem
        self.nr_frames = len(mem) >> PAGE_SHIFT
        self.size = self.nr_frames << PAGE_SHIFT
        self.fd: int | None = None
        self._mmap: mmap.mmap | None = None
        self._views: Sequence[memoryview] | None = None

    @classmethod
    def from_memfd(cls, size: int, name: str = "gemu-ram") -> PhysMem:
        """RAM in a new memfd of ``size`` bytes, mapped shared; ``fd`` can be passed to the
        device so that both sides see the same frames (sealed against shrinking, as the device
        requires). :meth:`close` unmaps and closes it."""
        size = -(-size // PAGE_SIZE) * PAGE_SIZE
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        ram = cls(mapping)
        ram.fd = fd
        ram._mmap = mapping
        return ram

    def frame_views(self) -> Sequence[memoryview]:
        """A view of every frame, indexed by pfn; made on the first call (about 30 ms and
        48 MiB for 1 GiB of RAM: 192 bytes per frame), which comes with the first swap I/O of
        a fragmented object (:meth:`SwapDevice.write_pages`): copying between these views
        makes no slice or view object per page. RAM over 1 GiB gets views made on demand
        instead (:func:`~gemu.guest.mm.extents.page_views`), so this never costs more."""
        views = self._views
        if views is None:
            views = self._views = page_views(self.mem, PAGE_SHIFT)
        return views

    def close(self) -> None:
        """Release a memfd-backed RAM (for a caller-owned buffer, only this object's views of
        it, so that the owner can close it)."""
        self._views = None  # each frame view holds the buffer exported
        self.mem.release()
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _range(self, pa: int, n: int) -> slice:
        if pa < 0 or n < 0 or pa + n > self.size:
            raise Efault(msg=f"physical range {pa:#x}+{n:#x} outside RAM of {self.size:#x} bytes")
        return slice(pa, pa + n)

    def frame_view(self, pfn: int) -> memoryview:
        """A writable view of one frame. Kernel: page_address() / kmap_local_page()."""
        return self.mem[self._range(pfn << PAGE_SHIFT, PAGE_SIZE)]

    def frames_view(self, pfn: int, nr: int) -> memoryview:
        """A writable view of ``nr`` consecutive frames starting at ``pfn``."""
        return self.mem[self._range(pfn << PAGE_SHIFT, nr << PAGE_SHIFT)]

    def read(self, pa: int, n: int) -> bytes:
        """Copy ``n`` bytes at physical address ``pa``."""
        return bytes(self.mem[self._range(pa, n)])

    def write(self, pa: int, data) -> None:
        """Store ``data`` (any bytes-like object) at physical address ``pa``."""
        data = memoryview(data).cast("B")
        self.mem[self._range(pa, len(data))] = data

    def zero(self, pfn: int) -> None:
        """Fill a frame with zeros. Kernel: clear_page()."""
        self.mem[self._range(pfn << PAGE_SHIFT, PAGE_SIZE)] = _ZERO_PAGE

    def zero_frames(self, pfns: Iterable[int]) -> None:
        """Zero every frame of ``pfns``, a consecutive run at a time."""
        self.zero_extents(runs_of(pfns))

    def zero_extents(self, runs: Iterable[tuple[int, int]]) -> None:
        """Zero every frame of the extents ``runs``."""
        mem = self.mem
        for start, nr in runs:
            sl = self._range(start << PAGE_SHIFT, nr << PAGE_SHIFT)
            mem[sl] = _ZERO_PAGE if nr == 1 else _fill_run(_ZEROS, 0, nr)

    def fill(self, pfn: int, value: int) -> None:
        """Fill a frame with the byte ``value`` (page poisoning)."""
        self.mem[self._range(pfn << PAGE_SHIFT, PAGE_SIZE)] = bytes((value,)) * PAGE_SIZE

    def copy_frame(self, dst: int, src: int) -> None:
        """Copy frame ``src`` into frame ``dst``. Kernel: copy_highpage()."""
        mem = self.mem
        mem[self._range(dst << PAGE_SHIFT, PAGE_SIZE)] = mem[
            self._range(src << PAGE_SHIFT, PAGE_SIZE)
        ]


def frame_runs(pfns: Iterable[int]) -> list[tuple[int, int]]:
    """Split ``pfns`` into runs of consecutive numbers: ``[(first, length), ...]`` in order."""
    return runs_of(pfns)


# Allocation flags.


# The flags live in gemu.guest.mm.gfp (lockdep needs them too); the allocator's users import
# them from here as well.
from gemu.guest.mm.gfp import (  # noqa: E402, F401
    __GFP_DIRECT_RECLAIM,
    __GFP_FS,
    __GFP_HIGH,
    __GFP_IO,
    __GFP_KSWAPD_RECLAIM,
    __GFP_NOMEMALLOC,
    __GFP_NORETRY,
    __GFP_NOWARN,
    __GFP_RECLAIM,
    __GFP_ZERO,
    GFP_ATOMIC,
    GFP_KERNEL,
    GFP_NOFS,
    GFP_NOIO,
    GFP_NOWAIT,
)

# Watermarks and statistics.


@dataclass(frozen=True)
class Watermarks:
    """Free-page thresholds of the zone, in pages; ``min <= low <= high``.

    Below ``min`` only reserve users (``__GFP_HIGH``, reclaim itself) allocate and everybody
    else reclaims directly; below ``low`` kswapd is woken; kswapd sleeps again at ``high``.
    Kernel: zone->_watermark[WMARK_MIN/LOW/HIGH].
    """

    min: int
    low: int
    high: int

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.low <= self.high:
            raise ValueError(f"watermarks must satisfy 0 <= min <= low <= high, got {self}")

    @classmethod
    def default(cls, managed_pages: int) -> Watermarks:
        """The kernel's proportions for ``managed_pages`` of RAM.

        Kernel: calculate_min_free_kbytes() and __setup_per_zone_wmarks() [mm/page_alloc.c]:
        ``min_free_kbytes = sqrt(16 * KiB)`` clamped to [128 KiB, 256 MiB]; the low/high
        steps are ``max(min/4, managed * watermark_scale_factor / 10000)`` with the default
        scale factor 10. For a small machine the 128 KiB floor would reserve a large share of
        RAM, so the model also caps ``min`` at 1/32 of it, and keeps each step at least 1.
        """
        kbytes = managed_pages * (PAGE_SIZE // 1024)
        min_kbytes = min(max(math.isqrt(kbytes * 16), 128), 262144)
        wmin = min(min_kbytes // (PAGE_SIZE // 1024), managed_pages // 32)
        step = max(wmin // 4, managed_pages * 10 // 10000, 1)
        return cls(wmin, wmin + step, wmin + 2 * step)


@dataclass
class PageAllocStats:
    """Counters of a :class:`PageAllocator` (a snapshot from :meth:`PageAllocator.statistics`).

    ``allocs``/``frees`` count calls; ``pages_allocated``/``pages_freed`` count frames;
    ``direct_reclaims`` counts direct-reclaim passes and ``kswapd_runs`` kswapd wake-ups that
    reclaimed; ``pages_reclaimed`` is what shrinkers reported freed (direct + kswapd);
    ``reclaim_waits`` counts allocations that slept for another task's reclaim to finish;
    ``failures`` counts allocations that raised ``-ENOMEM`` (``injected_failures`` of them by
    fault injection); ``high_water`` is the most frames ever in use at once; ``drop_slab``
    counts :meth:`PageAllocator.drop_slab` calls (the kernel's ``drop_slab`` vm event).
    """

    allocs: int = 0
    frees: int = 0
    pages_allocated: int = 0
    pages_freed: int = 0
    direct_reclaims: int = 0
    direct_reclaimed: int = 0
    kswapd_wakeups: int = 0
    kswapd_runs: int = 0
    kswapd_reclaimed: int = 0
    reclaim_waits: int = 0
    pages_reclaimed: int = 0
    failures: int = 0
    injected_failures: int = 0
    high_water: int = 0
    drop_slab: int = 0


DROP_SLAB_MAX_PASSES = 64
"""Bound on :meth:`PageAllocator.drop_slab`'s passes (the shift rule ends it long before:
a pass would have to free more than ``2**64`` pages to reach it)."""

_FREE = 0
_USED = 1
_RESERVED = 2
_GFP_ZERO = int(Gfp.ZERO)


# The allocator.


@dataclass
class _FailNth:
    countdown: int = 0
    times: int = 0


class PageAllocator:
    """The frames of one :class:`PhysMem` as a single zone.

    Kernel: struct zone + the buddy allocator [mm/page_alloc.c]

    Frames ``0 .. reserved_frames-1`` are never handed out (firmware, the boot image).
    Invariant: ``nr_free + nr_used == totalram_pages``, and every frame is exactly one of
    free, in use or reserved.

    Args:
        physmem: guest RAM.
        reserved_frames: frames at the bottom of RAM kept out of the allocator.
        watermarks: a :class:`Watermarks` or ``(min, low, high)``; default
            :meth:`Watermarks.default`.
        poison_on_free: fill freed frames with :data:`PAGE_POISON`, so that a stale mapping
            (a GPU page table left pointing at a freed frame) reads garbage that tests notice.
    """

    def __init__(
        self,
        physmem: PhysMem,
        *,
        reserved_frames: int = 0,
        watermarks: Watermarks | tuple[int, int, int] | None = None,
        poison_on_free: bool = False,
    ) -> None:
        if not 0 <= reserved_frames <= physmem.nr_frames:
            raise ValueError(f"reserved_frames {reserved_frames} outside 0..{physmem.nr_frames}")
        self.physmem = physmem
        self.nr_frames = physmem.nr_frames
        self.reserved_frames = reserved_frames
        self.totalram_pages = physmem.nr_frames - reserved_frames
        if watermarks is None:
            watermarks = Watermarks.default(self.totalram_pages)
        elif not isinstance(watermarks, Watermarks):
            watermarks = Watermarks(*watermarks)
        if watermarks.high > self.totalram_pages:
            raise ValueError(f"{watermarks} above the {self.totalram_pages} managed pages")
        self.watermarks = watermarks
        self.poison_on_free = poison_on_free
        self._lock = threading.Lock()  # zone->lock: short, never held across a preemption
        self._state = bytearray([_RESERVED]) * reserved_frames + bytearray(self.totalram_pages)
        # Free frames as a stack of extents; the top is handed out first, lowest pfns first
        # on a fresh allocator.
        self._free = RunStack(reserved_frames, self.totalram_pages)
        self._stats = PageAllocStats()
        self._fail_nth = _FailNth()
        #: Registered shrinkers, kept by :mod:`gemu.guest.mm.shrinker`.
        self.shrinkers: list[_shrinker.Shrinker] = []
        self.shrinker_lock = threading.Lock()
        self._kswapd: runtime.Task | None = None
        self._kswapd_wait = runtime.WaitQueue("kswapd_wait")
        self._kswapd_wanted = False
        self._kswapd_should_stop = False
        self._reclaimers = 0  # reclaim passes running now (direct and kswapd), under _lock

    def __repr__(self) -> str:
        return (
            f"<PageAllocator {self.nr_free}/{self.totalram_pages} free, "
            f"wmark {self.watermarks.min}/{self.watermarks.low}/{self.watermarks.high}>"
        )

    # Accounting.

    @property
    def nr_free(self) -> int:
        """Free frames. Kernel: zone_page_state(zone, NR_FREE_PAGES)."""
        return len(self._free)

    @property
    def nr_used(self) -> int:
        """Frames handed out and not yet freed."""
        return self.totalram_pages - len(self._free)

    def nr_free_pages(self) -> int:
        """Kernel: nr_free_pages() [mm/page_alloc.c]"""
        return len(self._free)

    def is_allocated(self, pfn: int) -> bool:
        """Whether ``pfn`` is a frame of this allocator that is currently handed out."""
        return 0 <= pfn < self.nr_frames and self._state[pfn] == _USED

    def used_frames(self) -> list[int]:
        """Every frame currently handed out, in pfn order (for leak reports)."""
        st = self._state
        return [p for p in range(self.reserved_frames, self.nr_frames) if st[p] == _USED]

    def statistics(self) -> PageAllocStats:
        """A snapshot of the counters."""
        return replace(self._stats)

    def assert_no_leaks(self, expected_used: int = 0) -> None:
        """Raise AssertionError unless exactly ``expected_used`` frames are in use.

        The check the end of every test and every emulator run makes: a frame that nobody
        freed is a leaked page.
        """
        used = self.nr_used
        if used != expected_used:
            frames = self.used_frames()
            shown = ", ".join(map(str, frames[:16])) + (" ..." if len(frames) > 16 else "")
            raise AssertionError(
                f"page allocator: {used} frames in use, expected {expected_used} (in use: {shown})"
            )

    def watermark_ok(self, nr_pages: int, mark: int) -> bool:
        """Whether taking ``nr_pages`` leaves at least ``mark`` free.
        Kernel: zone_watermark_ok() [mm/page_alloc.c]"""
        return len(self._free) - nr_pages >= mark

    def _min_mark(self, gfp: Gfp) -> int:
        """The reserve floor for ``gfp``. Kernel: gfp_to_alloc_flags() + __zone_watermark_ok()."""
        if current_is_memalloc() and not gfp & Gfp.NOMEMALLOC:
            return 0  # ALLOC_NO_WATERMARKS
        wmin = self.watermarks.min
        if gfp & Gfp.HIGH:
            wmin -= wmin // 2  # ALLOC_MIN_RESERVE
            if not gfp & Gfp.DIRECT_RECLAIM and not gfp & Gfp.NOMEMALLOC:
                wmin -= wmin // 4  # ALLOC_NON_BLOCK
        return wmin

    # Fault injection.

    def set_fail_nth(self, nth: int, times: int = 1) -> None:
        """Make the ``nth`` allocation from now fail with ``-ENOMEM`` (1 = the next one), and
        the ``times - 1`` allocations after it too; ``nth=0`` disarms.

        Kernel: /proc/<pid>/fail-nth with fail_page_alloc [mm/fail_page_alloc.c]. Injected
        failures skip reclaim, as ``should_fail_alloc_page()`` does.
        """
        if nth < 0 or times < 1:
            raise ValueError("nth must be >= 0 and times >= 1")
        self._fail_nth = _FailNth(nth, times if nth else 0)

    def _should_fail(self) -> bool:
        fn = self._fail_nth
        if fn.countdown <= 0:
            return False
        fn.countdown -= 1
        if fn.countdown:
            return False
        fn.times -= 1
        if fn.times:
            fn.countdown = 1
        return True

    # Allocation.

    def _rmqueue(self, nr: int, mark: int) -> list[Extent] | None:
        """Take ``nr`` frames if ``mark`` pages stay free. Kernel: rmqueue_bulk()."""
        with self._lock:
            free = self._free
            if len(free) - nr < mark:
                return None
            got = free.pop(nr)
            set_states(self._state, got, _USED)
            s = self._stats
            s.pages_allocated += nr
            used = self.totalram_pages - len(free)
            if used > s.high_water:
                s.high_water = used
            return got

    def _rmqueue_numbers(self, nr: int, mark: int) -> list[int] | None:
        """:meth:`_rmqueue` with every frame as a number (``alloc_pages``)."""
        with self._lock:
            free = self._free
            if free.nr - nr < mark:  # RunStack.nr: len() is a Python-level call
                return None
            got = free.pop_numbers(nr)
            set_numbers(self._state, got, _USED)
            s = self._stats
            s.pages_allocated += nr
            used = self.totalram_pages - free.nr
            if used > s.high_water:
                s.high_water = used
            return got

    def _rmqueue_contig(self, nr: int, mark: int) -> list[Extent] | None:
        with self._lock:
            if len(self._free) - nr < mark:
                return None
            start = self._state.find(bytes(nr), self.reserved_frames)
            if start < 0:
                return None
            self._state[start : start + nr] = bytes([_USED]) * nr
            self._free.remove(start, nr)
            s = self._stats
            s.pages_allocated += nr
            s.high_water = max(s.high_water, self.nr_used)
            return [(start, nr)]

    def alloc_pages(self, nr_pages: int, gfp: Gfp = GFP_KERNEL) -> list[int]:
        """Allocate ``nr_pages`` frames (not necessarily contiguous); return their pfns.

        Kernel: alloc_pages_bulk() / __alloc_pages() [mm/page_alloc.c]

        The fast path takes frames while ``low`` pages stay free. Otherwise kswapd is woken
        (``__GFP_KSWAPD_RECLAIM``) and the allocation may go down to the min reserve for its
        ``gfp``; below that a caller with ``__GFP_DIRECT_RECLAIM`` reclaims in its own task
        (at most :data:`MAX_RECLAIM_RETRIES` passes, one with ``__GFP_NORETRY``), and
        everybody else fails. Frames come zeroed with ``__GFP_ZERO``; otherwise they hold
        whatever was last written to them.

        Raises:
            Enomem: not enough memory, even after reclaim; or an injected failure.
        """
        return self._alloc(nr_pages, gfp, self._rmqueue_numbers, "alloc_pages")

    def alloc_extents(self, nr_pages: int, gfp: Gfp = GFP_KERNEL) -> list[Extent]:
        """:meth:`alloc_pages` with the frames as extents ``[(first_pfn, nr), ...]`` in the
        same order (consecutive frames joined): the same frames, without a number per page."""
        return self._alloc(nr_pages, gfp, self._rmqueue, "alloc_pages")

    def alloc_contig(self, nr_pages: int, gfp: Gfp = GFP_KERNEL) -> list[int]:
        """Allocate ``nr_pages`` physically consecutive frames (a ring, a page-table pool).

        Kernel: alloc_contig_pages() [mm/page_alloc.c]. Reclaim frees frames wherever they
        are, so under fragmentation this can fail with frames free; there is no compaction.
        """
        return expand(self._alloc(nr_pages, gfp, self._rmqueue_contig, "alloc_contig"))

    def alloc_page(self, gfp: Gfp = GFP_KERNEL) -> int:
        """One frame. Kernel: alloc_page()."""
        return self.alloc_pages(1, gfp)[0]

    def _alloc(self, nr: int, gfp: Gfp, take, what: str) -> list:
        """The allocation path: ``take(nr, mark)`` takes the frames (as extents, or as
        numbers for :meth:`_rmqueue_numbers`) once the watermarks allow."""
        if nr <= 0:
            raise Einval(msg=f"{what}: cannot allocate {nr} pages")
        runtime.preempt(what)
        self._stats.allocs += 1
        gfp = current_gfp_context(gfp)
        lockdep.might_alloc(gfp)
        if self._fail_nth.countdown > 0 and self._should_fail():
            self._stats.injected_failures += 1
            raise self._fail(what, nr, gfp, 0, 0, "injected failure (fail-nth)")
        if nr > self.totalram_pages:
            raise self._fail(what, nr, gfp, 0, 0, "more than all of RAM")

        pfns = take(nr, self.watermarks.low)
        if pfns is None:
            if gfp & Gfp.KSWAPD_RECLAIM:
                self.wakeup_kswapd()
            min_mark = self._min_mark(gfp)
            pfns = take(nr, min_mark)
            if pfns is None:
                if not gfpflags_allow_blocking(gfp) or current_is_memalloc():
                    raise self._fail(what, nr, gfp, 0, 0, "no reclaim allowed")
                pfns = self._alloc_slowpath(nr, gfp, take, min_mark, what)
        elif self._free.nr < self.watermarks.low and gfp & Gfp.KSWAPD_RECLAIM:
            self.wakeup_kswapd()
        if int(gfp) & _GFP_ZERO:  # the int: an IntFlag & makes a new flag object
            if take == self._rmqueue_numbers:
                self.physmem.zero_frames(pfns)
            else:
                self.physmem.zero_extents(pfns)
        return pfns

    def _alloc_slowpath(self, nr: int, gfp: Gfp, take, min_mark: int, what: str) -> list[Extent]:
        """Direct reclaim then retry. Kernel: __alloc_pages_slowpath() /
        __alloc_pages_direct_reclaim() / should_reclaim_retry() [mm/page_alloc.c]

        At most :data:`MAX_RECLAIM_RETRIES` passes (one with ``__GFP_NORETRY``). A pass that
        freed nothing ends the attempt, unless another task's reclaim is running at that
        moment: what it is writing to swap will come back to the free pool, so the allocation
        sleeps for :data:`RECLAIM_RETRY_WAIT_NS` and tries again (a task that finds every
        object isolated by a concurrent reclaimer must not fail with -ENOMEM); likewise when a
        shrinker met reclaimable objects it could not take at that moment (locked or busy)
        and asked to be called again (:func:`shrinker.met_contention`)."""
        passes = MAX_RECLAIM_RETRIES if not gfp & Gfp.NORETRY else 1
        reclaimed_total = done = 0
        _shrinker.met_contention()  # only this allocation's reclaim counts
        while done < passes:
            done += 1
            deficit = max(min_mark + nr - len(self._free), 1)
            reclaimed = self.direct_reclaim(deficit, gfp)
            reclaimed_total += reclaimed
            pfns = take(nr, min_mark)
            if pfns is not None:
                return pfns
            if reclaimed == 0:
                # another pass could only find something if a reclaimer is running (what it
                # writes to swap comes back), or if a shrinker met objects locked or busy for
                # the moment and asked to be called again
                contended = _shrinker.met_contention()
                if (not self._reclaimers and not contended) or done >= passes:
                    break
                runtime.sleep_ns(RECLAIM_RETRY_WAIT_NS)
                self._stats.reclaim_waits += 1
                pfns = take(nr, min_mark)
                if pfns is not None:
                    return pfns
        raise self._fail(what, nr, gfp, reclaimed_total, done, "reclaim did not free enough")

    def direct_reclaim(self, nr_to_reclaim: int, gfp: Gfp = GFP_KERNEL) -> int:
        """One direct reclaim pass in the calling task; returns the pages shrinkers freed.

        Kernel: __perform_reclaim() / try_to_free_pages() [mm/vmscan.c]
        """
        self._stats.direct_reclaims += 1
        if trace.enabled:
            trace.begin("mm", "direct_reclaim", runtime.current().tid, nr_to_reclaim=nr_to_reclaim)
        reclaimed = self._reclaim_pass(nr_to_reclaim, gfp, direct=True)
        self._stats.direct_reclaimed += reclaimed
        if trace.enabled:
            trace.end("mm", "direct_reclaim", runtime.current().tid, reclaimed=reclaimed)
            trace.counter("mm", "free_pages", free=len(self._free))
        return reclaimed

    def drop_slab(self) -> int:
        """Reclaim everything the shrinkers can give back now; returns the pages freed.

        Kernel: drop_slab() [mm/vmscan.c], behind ``echo 2 > /proc/sys/vm/drop_caches``:
        shrink_slab() passes over every shrinker, repeated while a pass freed more than a
        shrinking amount (``(freed >> shift++) > 1``), so a cache that refills while the loop
        runs cannot keep it going forever.

        Progress is measured, as in every reclaim pass here, by the pages that came back to
        the free pool. The kernel sums what ``scan_objects`` returns, and a v19-style GEM
        shrinker returns SHRINK_STOP after any batch that met no lock contention, which
        do_shrink_slab() counts as nothing: the kernel's loop would end after the first batch
        (a single object, when objects are larger than a batch). So each pass here asks for
        every page and calls the shrinkers again until a call frees nothing; a pass is
        bounded by the RAM size (every call frees at least one page), the passes by the
        kernel's shift rule.
        """
        self._stats.drop_slab += 1
        tid = runtime.current().tid
        if trace.enabled:
            trace.begin("mm", "drop_slab", tid)
        total = 0
        for shift in range(DROP_SLAB_MAX_PASSES):
            freed = 0
            while freed < self.totalram_pages:
                got = self._reclaim_pass(self.totalram_pages - freed, GFP_KERNEL, direct=True)
                if got <= 0:
                    break
                freed += got
            total += freed
            if freed >> shift <= 1:
                break
        if trace.enabled:
            trace.end("mm", "drop_slab", tid, freed=total)
            trace.counter("mm", "free_pages", free=len(self._free))
        return total

    def _reclaim_pass(self, nr_to_reclaim: int, gfp: Gfp, *, direct: bool = False) -> int:
        # Progress is what came back to the free pool, not only what shrinkers say: a v19-style
        # GEM shrinker answers SHRINK_STOP after a pass that freed everything it could, and the
        # kernel's reclaim judges progress by watermarks, not by that return value.
        freed_before = self._stats.pages_freed
        # Kernel: __perform_reclaim() annotates with the allocation's own mask (a GFP_NOFS
        # reclaim runs its shrinkers outside the fs_reclaim map); kswapd always holds it.
        if direct:
            lockdep.fs_reclaim_acquire(gfp)
        else:
            lockdep.fs_reclaim_map_acquire()
        with self._lock:
            self._reclaimers += 1
        try:
            noreclaim = memalloc_noreclaim_save()
            try:
                reported = _shrinker.shrink_slab(self, nr_to_reclaim, gfp)
            finally:
                memalloc_noreclaim_restore(noreclaim)
        finally:
            with self._lock:
                self._reclaimers -= 1
            if direct:
                lockdep.fs_reclaim_release(gfp)
            else:
                lockdep.fs_reclaim_map_release()
        reclaimed = max(reported, self._stats.pages_freed - freed_before)
        self._stats.pages_reclaimed += reclaimed
        return reclaimed

    def _fail(
        self, what: str, nr: int, gfp: Gfp, reclaimed: int, passes: int, why: str
    ) -> KernelError:
        self._stats.failures += 1
        msg = (
            f"{what}: cannot allocate {nr} pages (gfp {Gfp(gfp).name}): {why}; "
            f"free {self.nr_free} of {self.totalram_pages}, min {self.watermarks.min}, "
            f"reclaimed {reclaimed} in {passes} passes"
        )
        if not gfp & Gfp.NOWARN:
            log.warning("page allocation failure: %s", msg)  # Kernel: warn_alloc()
        return Enomem(msg=msg)

    # Freeing.

    def free_pages(self, pfns: Sequence[int]) -> None:
        """Return frames to the allocator.

        Kernel: free_pages_bulk / __free_pages() [mm/page_alloc.c]

        A frame that is not in use (double free) or not managed by this allocator (reserved,
        outside RAM) is a loud :func:`~gemu.guest.errors.warn_on`; in a non-strict run the bad
        frames are skipped and the others freed.
        """
        if len(pfns) > 4 and no_neighbours(pfns):  # fragmented: free them as numbers
            self.free_singles(pfns)
            return
        self.free_extents(runs_of(pfns))

    def free_singles(self, pfns: Sequence[int]) -> None:
        """:meth:`free_pages` of frames no two of which are consecutive neighbours (the
        caller knows: e.g. a fragmented object's frames), as numbers; the same checks."""
        runtime.preempt("free_pages")
        with self._lock:
            if mark_numbers(self._state, pfns, _USED, _FREE):
                if self.poison_on_free:
                    self._poison(list(zip(pfns, repeat(1))))
                self._free.push_singles(pfns)
                self._stats.frees += 1
                self._stats.pages_freed += len(pfns)
                return
        self._free_bad(runs_of(pfns))

    def free_extents(self, runs: Sequence[Extent]) -> None:
        """:meth:`free_pages` of the frames of the extents ``runs`` (in that order: the first
        frame of ``runs[0]`` is the next one handed out); the same checks, one step per extent."""
        runtime.preempt("free_pages")
        if not runs:
            return
        with self._lock:
            if mark(self._state, runs, _USED, _FREE):
                if self.poison_on_free:
                    self._poison(runs)
                self._free.push(runs)
                self._stats.frees += 1
                self._stats.pages_freed += total(runs)
                return
        self._free_bad(runs)

    def _free_bad(self, runs: Sequence[Extent]) -> None:
        """A free with a frame not in use or not ours: warn, free the good ones."""
        pfns = expand(runs)
        if self.poison_on_free:
            for p in pfns:
                if self.is_allocated(p):
                    self.physmem.fill(p, PAGE_POISON)
        good = self._check_bad_free(pfns)
        if good:
            self.free_pages(good)

    def _poison(self, runs: Sequence[Extent]) -> None:
        mem = self.physmem.mem
        if len(runs) > 4 and (pfns := singles(runs)) is not None:
            # a fragmented batch: one C-level pass, not a Python step per frame
            offs = [p << PAGE_SHIFT for p in pfns]
            deque(
                map(
                    mem.__setitem__,
                    map(slice, offs, map(add, offs, repeat(PAGE_SIZE))),
                    repeat(_POISON_PAGE),
                ),
                0,
            )
            return
        for p, n in runs:
            mem[p << PAGE_SHIFT : (p + n) << PAGE_SHIFT] = (
                _POISON_PAGE if n == 1 else _fill_run(_POISON, PAGE_POISON, n)
            )

    def _check_bad_free(self, pfns: Sequence[int]) -> list[int]:
        seen: set[int] = set()
        good, problems = [], []
        for p in pfns:
            if not self.reserved_frames <= p < self.nr_frames:
                problems.append(f"pfn {p} is not a frame of this allocator")
            elif self._state[p] == _FREE or p in seen:
                problems.append(f"pfn {p} freed twice")
            else:
                good.append(p)
                seen.add(p)
        warn_on(problems, "free_pages: " + "; ".join(problems))
        return good

    def free_page(self, pfn: int) -> None:
        """Kernel: __free_page()."""
        self.free_pages([pfn])

    # Shrinkers.

    def register_shrinker(self, shrinker: _shrinker.Shrinker) -> None:
        """Kernel: shrinker_register(); see :func:`gemu.guest.mm.shrinker.register_shrinker`."""
        _shrinker.register_shrinker(self, shrinker)

    def unregister_shrinker(self, shrinker: _shrinker.Shrinker) -> None:
        """Kernel: shrinker_free(); see :func:`gemu.guest.mm.shrinker.unregister_shrinker`."""
        _shrinker.unregister_shrinker(self, shrinker)

    # kswapd.

    def start_kswapd(self) -> runtime.Task:
        """Start the background reclaim task of the current runtime. Kernel: kswapd_run()."""
        if warn_on(self._kswapd is not None and not self._kswapd.done, "kswapd already runs"):
            return self._kswapd
        self._kswapd_should_stop = False
        self._kswapd_wanted = len(self._free) < self.watermarks.low
        self._kswapd = runtime.spawn(self._kswapd_main, name="kswapd0")
        return self._kswapd

    def stop_kswapd(self) -> None:
        """Ask kswapd to exit and wait until it has. Kernel: kswapd_stop()."""
        task = self._kswapd
        if task is None:
            return
        with self._kswapd_wait.lock:
            self._kswapd_should_stop = True
        self._kswapd_wait.wake_up_all()
        task.join()
        self._kswapd = None

    @property
    def kswapd(self) -> runtime.Task | None:
        """The kswapd task while it runs."""
        return self._kswapd

    def wakeup_kswapd(self) -> None:
        """Wake kswapd if it sleeps. Kernel: wakeup_kswapd() [mm/vmscan.c]"""
        if self._kswapd is None:
            return
        with self._kswapd_wait.lock:
            if self._kswapd_wanted:
                return
            self._kswapd_wanted = True
            self._stats.kswapd_wakeups += 1
        self._kswapd_wait.wake_up_all()

    def _kswapd_main(self) -> None:
        """Kernel: kswapd() [mm/vmscan.c]"""
        wait = self._kswapd_wait
        while True:
            wait.wait_event(
                lambda: self._kswapd_wanted or self._kswapd_should_stop, reason="kswapd sleeps"
            )
            if self._kswapd_should_stop:
                return
            with wait.lock:
                self._kswapd_wanted = False  # a wake-up during the pass asks for another
            self.balance_pgdat()

    def balance_pgdat(self) -> int:
        """Reclaim until ``high`` pages are free or reclaim stops making progress; return the
        pages freed. kswapd runs this; tests may call it directly. Kernel: balance_pgdat()."""
        self._stats.kswapd_runs += 1
        total = 0
        for _ in range(MAX_RECLAIM_RETRIES):
            if self._kswapd_should_stop:
                break
            deficit = self.watermarks.high - len(self._free)
            if deficit <= 0:
                break
            reclaimed = self._reclaim_pass(deficit, GFP_KERNEL)
            total += reclaimed
            if reclaimed == 0:
                break
        self._stats.kswapd_reclaimed += total
        if trace.enabled:
            trace.instant("mm", "kswapd", reclaimed=total, free=len(self._free))
            trace.counter("mm", "free_pages", free=len(self._free))
        return total
