"""DOC: the swap device that evicted guest pages are written to.

A :class:`SwapDevice` is ``nr_slots`` page-sized slots, held in one preallocated buffer
(``backing="memory"``) or in a file of ``nr_slots * PAGE_SIZE`` bytes read and written with
``os.pread``/``os.pwrite`` (``backing=<path>``). Slots are allocated and freed like frames; a
slot's contents are only meaningful between a successful write and the slot's free.

Usage::

    swap = SwapDevice(1024)
    slots = swap.alloc_slots(2)
    swap.write_slots(slots[0], frames_view)     # two consecutive slots at once
    data = swap.read_slot(slots[1])
    swap.free_slots(slots)
    swap.assert_no_leaks()

I/O errors can be injected (:meth:`SwapDevice.inject`): a counted number of failing reads or
writes, or a seeded per-page failure rate. A failing call raises :class:`~gemu.guest.errors.Eio`
before touching anything, so the caller keeps its data: a page whose write-out failed stays
resident, a page whose read failed stays in its slot and can be read again.

Modelled on ``mm/swapfile.c`` and ``mm/page_io.c``. The model writes no swap header (every slot
holds data), has one device and no priorities, and allocates slots last-freed-first, lowest
first on a fresh device, so a batch of slots is usually consecutive (the kernel's swap
clusters) and a run of pages moves in one copy.
"""

from __future__ import annotations

import mmap
import os
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from operator import itemgetter

from gemu.guest.errors import Einval, Eio, Enospc, warn_on
from gemu.guest.kernel import runtime
from gemu.guest.mm import extents as _extents
from gemu.guest.mm.extents import (
    Extent,
    RunStack,
    copy_page_views,
    expand,
    mark,
    mark_numbers,
    no_neighbours,
    page_views,
    paired_runs,
    runs_of,
    set_numbers,
    set_states,
)
from gemu.guest.mm.page_alloc import PAGE_SHIFT, PAGE_SIZE

_FREE = 0
_USED = 1


@dataclass
class SwapStats:
    """Counters of a :class:`SwapDevice`.

    ``pswpout``/``pswpin``: pages written/read (the kernel's vmstat names); ``bytes_out``/
    ``bytes_in`` the same in bytes; ``write_errors``/``read_errors``: calls that failed with
    ``-EIO``; ``alloc_failures``: ``-ENOSPC`` returns; ``high_water``: most slots ever in use.
    """

    pswpout: int = 0
    pswpin: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    write_errors: int = 0
    read_errors: int = 0
    alloc_failures: int = 0
    high_water: int = 0


def _in_ram(physmem, pfns: Sequence[int]) -> bool:
    """Whether every frame of ``pfns`` (not empty) is a frame of ``physmem``, in two C-level
    passes: the check every batched copy makes before indexing RAM by frame."""
    return min(pfns) >= 0 and max(pfns) < physmem.nr_frames


class SwapDevice:
    """A swap area of ``nr_slots`` page slots. Kernel: struct swap_info_struct.

    Invariant: every slot is exactly one of free or in use, and
    ``get_nr_swap_pages() + nr_used_slots == nr_slots``.

    Args:
        nr_slots: size in pages.
        backing: ``"memory"`` for a buffer in this process, or a file path (created or
            truncated to size; the caller owns the file).
        name: for messages ("swap0").
    """

    __slots__ = (
        "_fd",
        "_free",
        "_inject_read",
        "_inject_write",
        "_lock",
        "_mem",
        "_rate",
        "_rng",
        "_state",
        "_stats",
        "_views",
        "backing",
        "name",
        "nr_slots",
    )

    def __init__(
        self, nr_slots: int, backing: str | os.PathLike = "memory", *, name: str = "swap0"
    ):
        if nr_slots < 0:
            raise ValueError(f"nr_slots must be >= 0, got {nr_slots}")
        self.name = name
        self.nr_slots = nr_slots
        self.backing = backing
        self._fd: int | None = None
        self._mem: memoryview | None = None
        self._views: Sequence[memoryview] | None = None  # _slot_views()
        if backing == "memory" and nr_slots:
            # anonymous pages are zero until written: bytearray(n) would zero (touch) all of
            # them now, 64 MiB at every boot of a 16 MiB machine
            self._mem = memoryview(mmap.mmap(-1, nr_slots << PAGE_SHIFT, flags=mmap.MAP_PRIVATE))
        elif backing == "memory":
            self._mem = memoryview(bytearray(0))
        else:
            fd = os.open(backing, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, nr_slots << PAGE_SHIFT)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
        self._lock = threading.Lock()
        self._state = bytearray(nr_slots)
        # Free slots as a stack of extents; lowest first on a fresh device.
        self._free = RunStack(0, nr_slots)
        self._stats = SwapStats()
        self._inject_read = 0
        self._inject_write = 0
        self._rate = 0.0
        self._rng = random.Random(0)

    def __repr__(self) -> str:
        return f"<SwapDevice {self.name} {len(self._free)}/{self.nr_slots} free>"

    def close(self) -> None:
        """Release the backing buffer or close the file. Kernel: swapoff (without swap-in)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._views = None  # each slot view holds the mapping exported
        if self._mem is not None:
            self._mem.release()
            self._mem = None

    def __enter__(self) -> SwapDevice:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # Accounting.

    def get_nr_swap_pages(self) -> int:
        """Free slots. Kernel: get_nr_swap_pages() [include/linux/swap.h]"""
        return len(self._free)

    @property
    def nr_free_slots(self) -> int:
        return len(self._free)

    @property
    def nr_used_slots(self) -> int:
        return self.nr_slots - len(self._free)

    @property
    def total_swap_pages(self) -> int:
        """Kernel: total_swap_pages."""
        return self.nr_slots

    def is_allocated(self, slot: int) -> bool:
        return 0 <= slot < self.nr_slots and self._state[slot] == _USED

    def used_slots(self) -> list[int]:
        st = self._state
        return [s for s in range(self.nr_slots) if st[s] == _USED]

    def statistics(self) -> SwapStats:
        """A snapshot of the counters."""
        return replace(self._stats)

    def assert_no_leaks(self, expected_used: int = 0) -> None:
        """Raise AssertionError unless exactly ``expected_used`` slots are in use."""
        used = self.nr_used_slots
        if used != expected_used:
            slots = self.used_slots()
            shown = ", ".join(map(str, slots[:16])) + (" ..." if len(slots) > 16 else "")
            raise AssertionError(
                f"{self.name}: {used} slots in use, expected {expected_used} (in use: {shown})"
            )

    # Error injection.

    def inject(
        self, read_errors: int = 0, write_errors: int = 0, *, rate: float = 0.0, seed: int = 0
    ) -> None:
        """Make the next ``read_errors`` reads and ``write_errors`` writes fail with ``-EIO``;
        with ``rate``, every page read or written also fails with that probability, drawn
        from ``random.Random(seed)``. ``inject()`` with no arguments clears everything.

        Counted errors apply per call (a run of slots fails as one); the rate per page.
        """
        if read_errors < 0 or write_errors < 0 or not 0.0 <= rate <= 1.0:
            raise ValueError("error counts must be >= 0 and rate in [0, 1]")
        self._inject_read = read_errors
        self._inject_write = write_errors
        self._rate = rate
        self._rng = random.Random(seed)

    def _injected(self, write: bool, slot: int, nr: int) -> None:
        if write and self._inject_write:
            self._inject_write -= 1
        elif not write and self._inject_read:
            self._inject_read -= 1
        elif self._rate:
            rnd = self._rng.random
            for i in range(nr):
                if rnd() < self._rate:
                    slot += i
                    break
            else:
                return
        else:
            return
        if write:
            self._stats.write_errors += 1
        else:
            self._stats.read_errors += 1
        what = "write" if write else "read"
        raise Eio(msg=f"{self.name}: injected {what} error at slot {slot}")

    # Slots.

    def alloc_slot(self) -> int:
        """One free slot. Kernel: folio_alloc_swap() [mm/swapfile.c]

        Raises:
            Enospc: the device is full.
        """
        return self.alloc_slots(1)[0]

    def alloc_slots(self, nr: int) -> list[int]:
        """``nr`` free slots, all or none; consecutive when the free list allows.

        Kernel: get_swap_pages() [mm/swapfile.c]

        Raises:
            Enospc: fewer than ``nr`` slots are free (none is taken).
        """
        return self._alloc(nr, True)

    def alloc_extents(self, nr: int) -> list[Extent]:
        """:meth:`alloc_slots` with the slots as extents ``[(first_slot, nr), ...]``."""
        return self._alloc(nr, False)

    def _alloc(self, nr: int, numbers: bool) -> list:
        if nr <= 0:
            raise Einval(msg=f"{self.name}: cannot allocate {nr} slots")
        runtime.preempt("swap alloc")
        with self._lock:
            free = self._free
            if free.nr < nr:  # RunStack.nr: len() would be a Python-level call
                self._stats.alloc_failures += 1
                raise Enospc(
                    msg=f"{self.name}: {nr} slots wanted, {len(free)} of {self.nr_slots} free"
                )
            return self._take(nr, numbers)

    def _take(self, nr: int, numbers: bool) -> list:
        """Take ``nr`` slots off the free list and mark them in use, as numbers or as
        extents; the caller holds the lock and checked that ``nr`` are free."""
        free = self._free
        if numbers:
            got = free.pop_numbers(nr)
            set_numbers(self._state, got, _USED)
        else:
            got = free.pop(nr)
            set_states(self._state, got, _USED)
        used = self.nr_slots - free.nr
        if used > self._stats.high_water:
            self._stats.high_water = used
        return got

    def free_slot(self, slot: int) -> None:
        """Kernel: swap_free() [mm/swapfile.c]"""
        self.free_slots([slot])

    def free_slots(self, slots: Sequence[int]) -> None:
        """Return slots to the device; their contents are gone.

        Kernel: swap_free_nr() / free_swap_and_cache() [mm/swapfile.c]

        Freeing a slot that is not in use is a loud :func:`~gemu.guest.errors.warn_on`; in a
        non-strict run the bad slots are skipped.
        """
        if len(slots) > 4 and no_neighbours(slots):  # fragmented: free them as numbers
            self.free_singles(slots)
            return
        self.free_extents(runs_of(slots))

    def free_singles(self, slots: Sequence[int]) -> None:
        """:meth:`free_slots` of slots no two of which are consecutive neighbours (the caller
        knows: e.g. a fragmented object's slots), as numbers; the same checks."""
        runtime.preempt("swap free")
        with self._lock:
            if mark_numbers(self._state, slots, _USED, _FREE):
                self._free.push_singles(slots)
                return
        self._free_bad(runs_of(slots))

    def free_extents(self, runs: Sequence[Extent]) -> None:
        """:meth:`free_slots` of the slots of the extents ``runs``, one step per extent."""
        runtime.preempt("swap free")
        if not runs:
            return
        with self._lock:
            if mark(self._state, runs, _USED, _FREE):
                self._free.push(runs)
                return
        self._free_bad(runs)

    def _free_bad(self, runs: Sequence[Extent]) -> None:
        """A free with a slot not in use or not on this device: warn, free the good ones."""
        problems, good, seen = [], [], set()
        for s in expand(runs):
            if not 0 <= s < self.nr_slots:
                problems.append(f"slot {s} is not on {self.name}")
            elif self._state[s] != _USED or s in seen:
                problems.append(f"slot {s} freed twice")
            else:
                good.append(s)
                seen.add(s)
        warn_on(problems, "free_slots: " + "; ".join(problems))
        if good:
            self.free_slots(good)

    def _check_run(self, slot: int, nr: int, what: str) -> None:
        if slot < 0 or slot + nr > self.nr_slots or self._state.count(_USED, slot, slot + nr) != nr:
            warn_on(True, f"{self.name}: {what} of slots {slot}..{slot + nr - 1}: not all in use")
            raise Einval(msg=f"{self.name}: {what} of unallocated slots {slot}+{nr}")

    # I/O.

    def write_slot(self, slot: int, data) -> None:
        """Write one page. Kernel: swap_writepage() [mm/page_io.c]"""
        self.write_slots(slot, data)

    def _begin_io(self, view: memoryview, first_slot: int, write: bool) -> tuple[int, int, int]:
        """The checks every slot I/O starts with (whole pages, a valid run of allocated slots,
        injected errors) and its preemption point; returns (bytes, pages, byte offset)."""
        what = "write" if write else "read"
        nbytes = len(view)
        nr = nbytes >> PAGE_SHIFT
        if nbytes != nr << PAGE_SHIFT or not nr:
            raise Einval(msg=f"{self.name}: {what} of {nbytes} bytes is not whole pages")
        runtime.preempt("swap_writepage" if write else "swap_read_folio")
        self._check_run(first_slot, nr, what)
        self._injected(write, first_slot, nr)
        return nbytes, nr, first_slot << PAGE_SHIFT

    def write_slots(self, first_slot: int, data) -> None:
        """Write ``len(data) // PAGE_SIZE`` pages into consecutive slots from ``first_slot``.

        Kernel: swap_writepage() / __swap_writepage() [mm/page_io.c]

        Raises:
            Eio: an injected write error; no slot was written.
        """
        view = memoryview(data).cast("B")
        nbytes, nr, off = self._begin_io(view, first_slot, True)
        if self._mem is not None:
            self._mem[off : off + nbytes] = view
        else:
            self._file_write(off, view)
        s = self._stats
        s.pswpout += nr
        s.bytes_out += nbytes

    def write_frames(self, physmem, pairs: Sequence[tuple[int, int, int]]) -> None:
        """Write frames of ``physmem`` to slots: for each ``(pfn, slot, nr)`` of ``pairs``,
        frames ``pfn ..`` into slots ``slot ..``, as :meth:`write_slots` of each pair would
        (the same checks, injected errors and preemption point per pair, in order), without
        a view object per pair. Kernel: swap_writepage() for each folio.

        Raises:
            Efault: a frame outside RAM. Eio: an injected write error (the pairs before it
            were written).
        """
        mem, own = physmem.mem, self._mem
        for pa, off, nbytes in self._checked_pairs(physmem, pairs, write=True):
            if own is not None:
                own[off : off + nbytes] = mem[pa : pa + nbytes]
            else:
                self._file_write(off, mem[pa : pa + nbytes])

    def read_frames(self, physmem, pairs: Sequence[tuple[int, int, int]]) -> None:
        """Read slots into frames of ``physmem``: for each ``(pfn, slot, nr)`` of ``pairs``,
        slots ``slot ..`` into frames ``pfn ..``, as :meth:`read_slots_into` of each pair
        would (same checks, injected errors, preemption points). Kernel: swap_read_folio().

        Raises:
            Efault: a frame outside RAM. Eio: an injected read error (the pairs before it were
            read; the slots keep their data).
        """
        mem, own = physmem.mem, self._mem
        for pa, off, nbytes in self._checked_pairs(physmem, pairs, write=False):
            if own is not None:
                mem[pa : pa + nbytes] = own[off : off + nbytes]
            else:
                self._file_read(off, mem[pa : pa + nbytes])

    def _file_write(self, off: int, view: memoryview) -> None:
        """Write ``view`` to the backing file at byte ``off``, all of it."""
        done, nbytes = 0, len(view)
        while done < nbytes:
            done += os.pwrite(self._fd, view[done:], off + done)

    def _file_read(self, off: int, view: memoryview) -> None:
        """Fill ``view`` from the backing file at byte ``off``; Eio on a short read."""
        done, nbytes = 0, len(view)
        while done < nbytes:
            got = os.preadv(self._fd, [view[done:]], off + done)
            if got <= 0:
                raise Eio(msg=f"{self.name}: short read at slot {off >> PAGE_SHIFT}")
            done += got

    def _checked_pairs(self, physmem, pairs: Sequence[tuple[int, int, int]], *, write: bool):
        """The ``(pfn, slot, nr)`` pairs of :meth:`write_frames` or :meth:`read_frames`, each
        checked (frames inside RAM, slots in use), its preemption point taken and an injected
        error applied before it is handed out as ``(pa, off, nbytes)`` for the copy; a pair
        is counted in the statistics once the caller asks for the next one (a copy that
        failed is not counted)."""
        size = physmem.size
        state = self._state
        stats = self._stats
        task = runtime.current()  # runtime.preempt() per pair, looked up once
        preempt = task.runtime._preempt
        nslots = self.nr_slots
        what, point = ("write", "swap_writepage") if write else ("read", "swap_read_folio")
        for pfn, slot, nr in pairs:
            pa, nbytes = pfn << PAGE_SHIFT, nr << PAGE_SHIFT
            if pfn < 0 or nr <= 0 or pa + nbytes > size:
                physmem.frames_view(pfn, nr)  # raises the Efault naming the range
                raise Einval(msg=f"{self.name}: {what} of {nr} pages is not whole pages")
            preempt(task, point)
            if nr == 1:
                if not 0 <= slot < nslots or state[slot] != _USED:
                    self._check_run(slot, nr, what)
            elif slot < 0 or slot + nr > nslots or state.count(_USED, slot, slot + nr) != nr:
                self._check_run(slot, nr, what)
            if (self._inject_write if write else self._inject_read) or self._rate:
                self._injected(write, slot, nr)
            yield pa, slot << PAGE_SHIFT, nbytes
            if write:
                stats.pswpout += nr
                stats.bytes_out += nbytes
            else:
                stats.pswpin += nr
                stats.bytes_in += nbytes

    def batched_io(self) -> bool:
        """Whether :meth:`write_pages` and :meth:`read_pages` copy their pages in one step.

        They do on a memory-backed device with no injected error armed, in a free-running
        runtime. Otherwise they take the per-pair path of :meth:`write_frames` and
        :meth:`read_frames`: counted injected errors apply per call and the injected rate
        draws per page in order, which that path keeps exact, and a deterministic runtime
        logs one preemption point per pair (a free-running one has none to keep).
        """
        return (
            self._mem is not None
            and not (self._inject_write or self._inject_read or self._rate)
            and not runtime.current().runtime.deterministic
        )

    def _slot_views(self) -> Sequence[memoryview]:
        """A view of every slot of a memory-backed device, made on first use (192 bytes per
        slot), as :meth:`PhysMem.frame_views` is for frames."""
        views = self._views
        if views is None:
            views = self._views = page_views(self._mem, PAGE_SHIFT)
        return views

    def _copy_to_slots(self, physmem, slots: Sequence[int], pfns: Sequence[int]) -> None:
        """Copy frame ``pfns[i]`` into slot ``slots[i]`` for every ``i`` (the caller checked
        frames and slots): in C where ``_pagecopy`` is built (0.61 us per scattered 4 KiB
        page, against 0.88 for the page views; no views are made), else with
        :func:`~gemu.guest.mm.extents.copy_page_views`."""
        native = _extents.native_copy_pages
        if native is not None:
            native(self._mem, slots, physmem.mem, pfns, PAGE_SHIFT)
        else:
            copy_page_views(self._slot_views(), slots, physmem.frame_views(), pfns)

    def _copy_to_frames(self, physmem, pfns: Sequence[int], slots: Sequence[int]) -> None:
        """Copy slot ``slots[i]`` into frame ``pfns[i]`` for every ``i``, as
        :meth:`_copy_to_slots` copies the other way."""
        native = _extents.native_copy_pages
        if native is not None:
            native(physmem.mem, pfns, self._mem, slots, PAGE_SHIFT)
        else:
            copy_page_views(physmem.frame_views(), pfns, self._slot_views(), slots)

    def _pages_ok(self, physmem, pfns: Sequence[int], slots: Sequence[int]) -> bool:
        """Whether every frame is in RAM and every slot is in use, checked in C-level passes
        (a batch that fails takes the per-pair path, which names the first bad pair)."""
        n = len(pfns)
        if not n or len(slots) != n or not _in_ram(physmem, pfns):
            return False
        if n == 1:
            return 0 <= slots[0] < self.nr_slots and self._state[slots[0]] == _USED
        try:
            used = itemgetter(*slots)(self._state).count(_USED)
        except (IndexError, TypeError):
            return False
        return used == n and min(slots) >= 0

    def write_pages(self, physmem, pfns: Sequence[int], slots: Sequence[int]) -> None:
        """Write frame ``pfns[i]`` of ``physmem`` into slot ``slots[i]`` for every ``i``: a
        fragmented batch (few consecutive pages), page by page without a Python step per
        page when :meth:`batched_io` allows; otherwise, or for a bad frame or slot, exactly
        :meth:`write_frames` of the paired runs. Kernel: swap_writepage() for each folio.

        Raises:
            Efault: a frame outside RAM. Einval: a slot not in use. Eio: an injected write
            error (the pairs before it were written).
        """
        if len(pfns) != len(slots):
            raise Einval(msg=f"{self.name}: {len(pfns)} frames for {len(slots)} slots")
        if self.batched_io() and self._pages_ok(physmem, pfns, slots):
            self._copy_to_slots(physmem, slots, pfns)
            s = self._stats
            s.pswpout += len(pfns)
            s.bytes_out += len(pfns) << PAGE_SHIFT
            return
        self.write_frames(physmem, paired_runs(runs_of(pfns), runs_of(slots)))

    def read_pages(self, physmem, pfns: Sequence[int], slots: Sequence[int]) -> None:
        """Read slot ``slots[i]`` into frame ``pfns[i]`` of ``physmem`` for every ``i``, as
        :meth:`write_pages` writes. Kernel: swap_read_folio() for each folio.

        Raises:
            Efault: a frame outside RAM. Einval: a slot not in use. Eio: an injected read
            error (the pairs before it were read; the slots keep their data).
        """
        if len(pfns) != len(slots):
            raise Einval(msg=f"{self.name}: {len(pfns)} frames for {len(slots)} slots")
        if self.batched_io() and self._pages_ok(physmem, pfns, slots):
            self._copy_to_frames(physmem, pfns, slots)
            s = self._stats
            s.pswpin += len(pfns)
            s.bytes_in += len(pfns) << PAGE_SHIFT
            return
        self.read_frames(physmem, paired_runs(runs_of(pfns), runs_of(slots)))

    def alloc_and_write_pages(self, physmem, pfns: Sequence[int]) -> list[int] | None:
        """:meth:`alloc_slots` then :meth:`write_pages` of a fragmented batch in one step:
        new slots, slot ``i`` written with frame ``pfns[i]``; returns the slots.

        Kernel: folio_alloc_swap() then swap_writepage() for each folio.

        The batched path of the two (:meth:`batched_io`), under one hold of the device lock
        with the frames checked first; the slots it takes are in use by construction, so
        write_pages' check of them is not repeated. Returns None, having done nothing, when
        that path is not open (no batched I/O, a frame outside RAM, too few free slots):
        the caller then takes the steps one by one, with their preemption points and
        errors.
        """
        nr = len(pfns)
        if nr < 2 or not self.batched_io() or not _in_ram(physmem, pfns):
            return None
        with self._lock:
            if self._free.nr < nr:
                return None
            slots = self._take(nr, True)
            self._copy_to_slots(physmem, slots, pfns)
            s = self._stats
            s.pswpout += nr
            s.bytes_out += nr << PAGE_SHIFT
        return slots

    def read_and_free_pages(self, physmem, pfns: Sequence[int], slots: Sequence[int]) -> bool:
        """:meth:`read_pages` then :meth:`free_singles` of a fragmented batch in one step:
        slot ``slots[i]`` read into frame ``pfns[i]``, then every slot freed.

        Kernel: swap_read_folio() then swap_free() for each folio.

        The batched path of the two, under one hold of the device lock: freeing's check of
        the slots (each in use, none twice) is made first and stands for read_pages' check
        of them. Returns False, having done nothing, when that path is not open (no
        batched I/O, a bad frame or slot): the caller then reads and frees one step after
        the other, and the per-pair path names what was wrong.
        """
        nr = len(pfns)
        if nr < 2 or len(slots) != nr or not self.batched_io() or not _in_ram(physmem, pfns):
            return False
        with self._lock:
            if not mark_numbers(self._state, slots, _USED, _FREE):
                return False
            self._copy_to_frames(physmem, pfns, slots)
            self._free.push_singles(slots)
            s = self._stats
            s.pswpin += nr
            s.bytes_in += nr << PAGE_SHIFT
        return True

    def read_slot(self, slot: int) -> bytes:
        """Read one page. Kernel: swap_read_folio() [mm/page_io.c]"""
        buf = bytearray(PAGE_SIZE)
        self.read_slots_into(slot, buf)
        return bytes(buf)

    def read_slot_into(self, slot: int, buf) -> None:
        """Read one page into a writable buffer (a frame view: no intermediate copy)."""
        self.read_slots_into(slot, buf)

    def read_slots_into(self, first_slot: int, buf) -> None:
        """Read consecutive slots from ``first_slot`` into ``buf`` (whole pages).

        Kernel: swap_read_folio() [mm/page_io.c]

        Raises:
            Eio: an injected read error; ``buf`` is untouched and the slots keep their data.
        """
        view = memoryview(buf).cast("B")
        nbytes, nr, off = self._begin_io(view, first_slot, False)
        if self._mem is not None:
            view[:] = self._mem[off : off + nbytes]
        else:
            self._file_read(off, view)
        s = self._stats
        s.pswpin += nr
        s.bytes_in += nbytes
