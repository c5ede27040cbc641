"""DOC: shmem files, the swappable memory behind GEM shmem objects.

A :class:`ShmemFile` is ``size`` bytes of anonymous memory split into pages. Each page is in
one of three states:

- *unpopulated*: never touched, or truncated; reads as zeros once made resident;
- *resident*: held in a frame of guest RAM (what the GPU maps);
- *swapped*: its contents are in a swap slot and no frame holds it.

:meth:`ShmemFile.get_pages` makes every page resident and returns the frames, allocating
zeroed frames for unpopulated pages and reading swapped pages back, usually into *different*
frames than they had before (so the GPU page tables must be rewritten).
:meth:`ShmemFile.writeout` moves every resident page to swap and frees its frame: that is what
evicting a GEM object does. :meth:`ShmemFile.truncate` throws the contents away (purge).

Usage::

    f = ShmemFile(allocator, swap, 3 * PAGE_SIZE)
    pfns = f.get_pages()              # 3 zeroed frames
    f.write(100, b"data")
    f.writeout()                      # -> 3 frames freed, 3 slots used
    pfns = f.get_pages()              # contents back, perhaps in other frames
    assert f.read(100, 4) == b"data"
    f.release()

Modelled on ``mm/shmem.c``: ``shmem_file_setup``, ``shmem_read_mapping_page_gfp``,
``shmem_writeout`` and ``shmem_truncate_range``. Choices the model makes:

- Whole-object operations are all-or-nothing. ``get_pages`` allocates every frame it needs
  first and reads swap into them; on ``-ENOMEM`` or ``-EIO`` it frees the new frames and the
  file is unchanged (swapped pages stay in their slots). ``writeout`` allocates every slot
  first and writes every page; on ``-ENOSPC`` or ``-EIO`` it frees the new slots and the file
  is unchanged (pages stay resident). The kernel can write out part of a file; an evicted GEM
  object is all out or all in, which is what the callers here need.
- The file has no lock: its user serializes calls (the GEM object's reservation lock does).
  An allocation inside ``get_pages`` may run reclaim, and reclaim must not touch a file whose
  ``get_pages`` is in progress (the GEM shrinker only trylocks); the file checks this and
  warns.
- While the whole file is in one place (every page resident, or every page in swap: the
  states a GEM object lives in) it is a list of extents (:mod:`gemu.guest.mm.extents`): the
  frames, or the slots, of its pages in order, consecutive numbers joined. Evicting and
  restoring a whole object then costs one step per run of frames and slots, whatever its
  size, and a 100k small objects cost a few tens of MiB beyond guest RAM. A file with pages
  in several states (single pages faulted in, a partial write-out) keeps one signed 64-bit
  entry per page in an ``array('q')``: a frame number (>= 0), :data:`UNPOPULATED` (-1), or a
  swap slot ``s`` stored as ``-2 - s``; it goes back to extents once it is whole again.
"""

from __future__ import annotations

import struct
from array import array
from itertools import chain, repeat

from gemu.guest.errors import Efault, Einval, KernelError, warn_on
from gemu.guest.mm.extents import (
    Extent,
    cut,
    expand,
    no_neighbours,
    paired_runs,
    runs_of,
    total,
)
from gemu.guest.mm.page_alloc import GFP_KERNEL, PAGE_SHIFT, PAGE_SIZE, Gfp, PageAllocator
from gemu.guest.mm.swap import SwapDevice

_NOT_ZERO = ~Gfp.ZERO
_WITHOUT_ZERO: dict[Gfp, Gfp] = {}  # gfp & ~__GFP_ZERO by gfp: an IntFlag & makes an object
_EXTENT = struct.Struct("=qq")
UNPOPULATED = -1
"""Page entry of a page that has no frame and no slot."""


def _fragmented(frames: list[Extent], slots: list[Extent]) -> bool:
    """Whether a batch of more than four pages has runs so short (under 4 pages on average
    on one side) that copying it page by page (SwapDevice.write_pages/read_pages) beats a
    Python step per paired run."""
    runs = max(len(frames), len(slots))
    return runs > 1 and runs * 4 > total(frames) > 4


class ShmemFile:
    """The shmem file behind one GEM object. Kernel: shmem_file_setup() [mm/shmem.c]

    ``nr_resident + nr_swapped <= nr_pages`` always; each resident page owns one frame of
    ``allocator`` and each swapped page one slot of ``swap``, and nothing else does.

    The pages are in one of three forms: ``_runs`` (extents of frames when every page is
    resident, of slots when every page is swapped), ``_pages`` (one encoded entry per page,
    for a file in several states), or neither (nothing populated).

    Args:
        allocator: where frames come from.
        swap: where pages go on :meth:`writeout`.
        size: bytes; rounded up to whole pages.
        name: for messages.
    """

    __slots__ = (
        "_packed",
        "_pages",
        "allocator",
        "name",
        "nr_resident",
        "nr_swapped",
        "released",
        "size",
        "swap",
    )

    def __init__(
        self, allocator: PageAllocator, swap: SwapDevice, size: int, name: str = "shmem"
    ) -> None:
        if size < 0:
            raise Einval(msg=f"{name}: negative size {size}")
        self.allocator = allocator
        self.swap = swap
        self.name = name
        # whole pages already: keep the caller's int (the GEM object's size), not a copy
        self.size = size if not size & (PAGE_SIZE - 1) else -(-size // PAGE_SIZE) << PAGE_SHIFT
        self._pages: array | None = None
        self._packed: bytes | array | None = None  # _runs, packed (an array: the numbers)
        #: Pages held in frames.
        self.nr_resident = 0
        #: Pages held in swap slots.
        self.nr_swapped = 0
        self.released = False

    def __repr__(self) -> str:
        return (
            f"<ShmemFile {self.name} {self.nr_pages} pages: {self.nr_resident} resident, "
            f"{self.nr_swapped} swapped>"
        )

    @property
    def nr_pages(self) -> int:
        """Pages of the file."""
        return self.size >> PAGE_SHIFT

    @property
    def _runs(self) -> list[Extent] | None:
        """The extents of a whole file (frames, or slots), or None. Kept packed in one
        ``bytes``, two signed 64-bit numbers (start, length) per extent: a list of tuples
        costs about four times the memory of a one-extent file, an ``array('q')`` twice.
        A fragmented file (no two of its numbers consecutive) keeps its numbers instead, one
        per page in an ``array('q')`` (:meth:`_set_singles`)."""
        packed = self._packed
        if packed is None:
            return None
        if type(packed) is array:
            return list(zip(packed, repeat(1)))  # no two consecutive: an extent each
        return list(_EXTENT.iter_unpack(packed))

    @_runs.setter
    def _runs(self, runs: list[Extent] | None) -> None:
        # array('q') packs as _EXTENT does (native order, 8 bytes), in one C-level pass
        self._packed = None if runs is None else array("q", chain.from_iterable(runs)).tobytes()

    def _singles(self) -> list[int] | None:
        """The frames (or slots) of a whole file as numbers if every extent is one page (a
        fragmented object), else None."""
        raw = self._packed
        if type(raw) is array:
            return raw.tolist()
        if len(raw) != _EXTENT.size * self.nr_pages:  # fewer extents than pages
            return None
        packed = array("q")
        packed.frombytes(raw)
        return packed[::2].tolist()

    def _set_singles(self, numbers: list[int]) -> None:
        """``_runs = runs_of(numbers)``; when no two are consecutive, the numbers are kept as
        they are (the fragmented form: half the bytes of their extents, and read back by
        :meth:`_singles` in one step)."""
        if no_neighbours(numbers):
            self._packed = array("q", numbers)
        else:
            self._runs = runs_of(numbers)

    @property
    def resident_pages(self) -> int:
        """Pages held in frames."""
        return self.nr_resident

    @property
    def swapped_pages(self) -> int:
        """Pages held in swap slots."""
        return self.nr_swapped

    def page_state(self, index: int) -> tuple[str, int | None]:
        """``("resident", pfn)``, ``("swapped", slot)`` or ``("unpopulated", None)``; for dumps."""
        if not 0 <= index < self.nr_pages:
            raise IndexError(f"{self.name}: page {index} beyond {self.nr_pages} pages")
        if self._packed is not None:
            ((first, _),) = cut(self._runs, index, 1)
            return ("resident" if self.nr_resident else "swapped"), first
        if self._pages is None:
            return "unpopulated", None
        e = self._pages[index]
        if e >= 0:
            return "resident", e
        if e == UNPOPULATED:
            return "unpopulated", None
        return "swapped", -2 - e

    def _entries(self) -> array:
        """The pages as one encoded entry each (slots as ``-2 - s``), for a file about to be
        in several states."""
        if self._pages is None:
            runs = self._runs
            if runs is None:
                self._pages = array("q", [UNPOPULATED]) * self.nr_pages
            elif self.nr_resident:
                self._pages = array("q", expand(runs))
            else:
                self._pages = array("q", [-2 - slot for slot in expand(runs)])
            self._runs = None
        return self._pages

    def _settle(self) -> None:
        """Back to extents (or to nothing) once the file is whole again."""
        pages = self._pages
        n = self.nr_pages
        if pages is None:
            return
        if self.nr_resident == n:
            self._runs = runs_of(pages)
        elif self.nr_swapped == n:
            self._runs = runs_of([-2 - e for e in pages])
        elif self.nr_resident or self.nr_swapped:
            return
        self._pages = None

    def _check_live(self, what: str) -> None:
        if self.released:  # the message is only formatted when it is needed
            msg = f"{self.name}: {what} after release"
            warn_on(True, msg)
            raise Einval(msg=msg)

    # Making pages resident.

    def get_pages(self, gfp: Gfp = GFP_KERNEL) -> list[int]:
        """Make every page resident; return the frame of each page, in page order.

        Kernel: shmem_read_mapping_page_gfp() for each page (drm_gem_get_pages())

        Raises:
            Enomem: frames could not be allocated (after reclaim, as ``gfp`` allows).
            Eio: a page could not be read from swap.
            In both cases the file is unchanged.
        """
        if self.nr_resident == self.nr_pages:
            return expand(self._runs) if self._packed is not None else []
        pfns = self._make_resident(gfp)
        return pfns if pfns is not None else expand(self._runs)

    def get_extents(self, gfp: Gfp = GFP_KERNEL) -> list[Extent]:
        """:meth:`get_pages` with the frames as extents ``[(first_pfn, nr), ...]`` in page
        order: the same work, without a number per page."""
        if self.nr_resident != self.nr_pages:
            self._make_resident(gfp)
        return self._runs if self._packed is not None else []

    def _make_resident(self, gfp: Gfp) -> list[int] | None:
        """The work of :meth:`get_pages` for a file not all resident; returns the frames as
        numbers when it had them so (a fragmented object's swap-in), else None."""
        self._check_live("get_pages")
        if self._packed is not None:
            if self.nr_pages > 4 and (slots := self._singles()) is not None:
                return self._swapin_singles(slots, gfp)
            self._swapin_all(gfp)
        elif self._pages is None:
            frames = self._alloc_frames(self.nr_pages, gfp)
            self.allocator.physmem.zero_extents(frames)
            self._runs = frames
            self.nr_resident = self.nr_pages
        else:
            pages = self._pages
            self._populate([i for i, e in enumerate(pages) if e < 0], gfp)
        return None

    def get_page(self, index: int, gfp: Gfp = GFP_KERNEL) -> int:
        """Make page ``index`` resident; return its frame.

        Kernel: shmem_read_mapping_page_gfp() [mm/shmem.c]; errors as :meth:`get_pages`.
        """
        self._check_live("get_page")
        if not 0 <= index < self.nr_pages:
            raise Einval(msg=f"{self.name}: page {index} beyond {self.nr_pages} pages")
        state, where = self.page_state(index)
        if state == "resident":
            return where
        self._entries()
        self._populate([index], gfp)
        return self.page_state(index)[1]

    def _alloc_frames(self, nr: int, gfp: Gfp, numbers: bool = False) -> list:
        """``nr`` frames as extents (or as numbers), not zeroed: every one is overwritten."""
        before = (self.nr_resident, self.nr_swapped)
        flags = _WITHOUT_ZERO.get(gfp)
        if flags is None:
            flags = _WITHOUT_ZERO[gfp] = gfp & _NOT_ZERO
        if numbers:
            frames = self.allocator.alloc_pages(nr, flags)
        else:
            frames = self.allocator.alloc_extents(nr, flags)
        if (self.nr_resident, self.nr_swapped) != before:
            if numbers:
                self.allocator.free_pages(frames)
            else:
                self.allocator.free_extents(frames)
            msg = f"{self.name}: changed during its own get_pages (callers must serialize)"
            warn_on(True, msg)
            raise Einval(msg=msg)
        return frames

    def _swapin_singles(self, slots: list[int], gfp: Gfp) -> list[int]:
        """:meth:`_swapin_all` of a fragmented object (every slot an extent of its own):
        frames and slots as numbers, copied page by page (in one step with the slots' free
        where SwapDevice.read_and_free_pages can, else SwapDevice.read_pages, which takes
        the per-pair path where it must). Returns the frames."""
        nr = self.nr_pages
        pfns = self._alloc_frames(nr, gfp, numbers=True)
        swap = self.swap
        physmem = self.allocator.physmem
        freed = swap.read_and_free_pages(physmem, pfns, slots)
        if not freed:
            try:
                swap.read_pages(physmem, pfns, slots)
            except KernelError:
                self.allocator.free_pages(pfns)
                raise
        self._set_singles(pfns)
        self.nr_resident = nr
        self.nr_swapped = 0
        if not freed:
            swap.free_singles(slots)  # a file's extents are maximal: one per slot
        return pfns

    def _swapin_all(self, gfp: Gfp) -> None:
        """Bring back an object whose pages are all in swap (the evicted state)."""
        slots = self._runs
        frames = self._alloc_frames(self.nr_pages, gfp)
        self._read_swap(frames, slots, frames)
        self._runs = frames
        self.nr_resident = self.nr_pages
        self.nr_swapped = 0
        self.swap.free_extents(slots)

    def _read_swap(
        self, frames: list[Extent], slots: list[Extent], new_frames: list[Extent]
    ) -> None:
        """Read the pages of ``slots`` into ``frames`` (page by page, in order); on error free
        ``new_frames`` (all the frames this call allocated) and re-raise, leaving the slots
        as they were."""
        swap = self.swap
        try:
            if _fragmented(frames, slots) and swap.batched_io():
                swap.read_pages(self.allocator.physmem, expand(frames), expand(slots))
            else:
                swap.read_frames(self.allocator.physmem, paired_runs(frames, slots))
        except KernelError:
            self.allocator.free_extents(new_frames)
            raise

    def _populate(self, indices: list[int], gfp: Gfp) -> None:
        """Make the pages ``indices`` resident; the pages are in per-page form."""
        pages = self._pages
        nr = len(indices)
        frames = self._alloc_frames(nr, gfp)
        pfns = expand(frames)
        swap_pfns, slots, zero_pfns = [], [], []
        if self.nr_swapped == 0:
            zero_pfns = pfns
        else:
            for i, pfn in zip(indices, pfns):
                e = pages[i]
                if e == UNPOPULATED:
                    zero_pfns.append(pfn)
                else:
                    swap_pfns.append(pfn)
                    slots.append(-2 - e)
        slot_runs = runs_of(slots)
        if slots:
            self._read_swap(runs_of(swap_pfns), slot_runs, frames)
        if zero_pfns:
            self.allocator.physmem.zero_frames(zero_pfns)
        for i, pfn in zip(indices, pfns):
            pages[i] = pfn
        self.nr_resident += nr
        if slots:
            self.nr_swapped -= len(slots)
        self._settle()
        if slots:
            self.swap.free_extents(slot_runs)

    # Writing out to swap.

    def writeout(self) -> int:
        """Move every resident page to swap and free its frame; return the frames freed.

        Kernel: shmem_writeout() [mm/shmem.c] for each page, then the frames are freed as
        reclaim does once the pages are written.

        Raises:
            Enospc: not enough free swap slots for every resident page.
            Eio: a page could not be written.
            In both cases the file is unchanged: every page stays resident, nothing is lost.
        """
        nr = self.nr_resident
        if nr == 0:
            return 0
        self._check_live("writeout")
        whole = nr == self.nr_pages
        swap = self.swap
        if whole:
            if nr > 4 and (pfns := self._singles()) is not None:
                return self._writeout_singles(pfns)
            frames = self._runs
            indices = None
        else:
            pages = self._pages
            indices = [i for i, e in enumerate(pages) if e >= 0]
            frames = runs_of([pages[i] for i in indices])
        slots = swap.alloc_extents(nr)
        try:
            if _fragmented(frames, slots) and swap.batched_io():
                swap.write_pages(self.allocator.physmem, expand(frames), expand(slots))
            else:
                swap.write_frames(self.allocator.physmem, paired_runs(frames, slots))
        except KernelError:
            swap.free_extents(slots)
            raise
        if whole:
            self._runs = slots
        else:
            for i, slot in zip(indices, expand(slots)):
                pages[i] = -2 - slot
        self.nr_resident = 0
        self.nr_swapped += nr
        self._settle()
        self.allocator.free_extents(frames)
        return nr

    def _writeout_singles(self, pfns: list[int]) -> int:
        """:meth:`writeout` of a whole file whose frames are all single (fragmented):
        frames and slots as numbers, copied page by page in one call (with the slots'
        allocation where SwapDevice.alloc_and_write_pages can)."""
        swap = self.swap
        physmem = self.allocator.physmem
        nr = len(pfns)
        slots = swap.alloc_and_write_pages(physmem, pfns)
        if slots is None:
            slots = swap.alloc_slots(nr)
            try:
                swap.write_pages(physmem, pfns, slots)
            except KernelError:
                swap.free_slots(slots)
                raise
        self._set_singles(slots)
        self.nr_resident = 0
        self.nr_swapped = nr
        self.allocator.free_singles(pfns)  # a file's extents are maximal: one per frame
        return nr

    # Purging.

    def truncate(self) -> int:
        """Drop every page: free its frame or slot; the contents are gone (reads as zeros
        after the next :meth:`get_pages`). Return the frames freed.

        Kernel: shmem_truncate_range(inode, 0, -1) [mm/shmem.c]
        """
        if self.nr_resident == 0 and self.nr_swapped == 0:
            return 0
        freed = self.nr_resident
        if self._packed is not None:
            runs = self._runs
            frames, slots = (runs, []) if self.nr_resident else ([], runs)
        else:
            pages = self._pages
            frames = runs_of([e for e in pages if e >= 0])
            slots = runs_of([-2 - e for e in pages if e < UNPOPULATED])
        self._pages = None
        self._runs = None
        self.nr_resident = 0
        self.nr_swapped = 0
        if frames:
            self.allocator.free_extents(frames)
        if slots:
            self.swap.free_extents(slots)
        return freed

    def release(self) -> None:
        """Free everything the file holds; the file is unusable afterwards.

        Kernel: the last fput() of the file -> shmem_evict_inode() [mm/shmem.c]
        """
        if warn_on(self.released, f"{self.name}: released twice"):
            return
        self.truncate()
        self.released = True

    # CPU access through the frames.

    def _span(self, offset: int, n: int, what: str) -> list[Extent]:
        """The frames of the pages ``[offset, offset + n)`` touches, as extents."""
        if offset < 0 or n < 0 or offset + n > self.size:
            raise Einval(msg=f"{self.name}: {what} of {n} bytes at {offset} beyond {self.size}")
        first = offset >> PAGE_SHIFT
        last = (offset + n - 1) >> PAGE_SHIFT
        if self.nr_resident == self.nr_pages:
            return cut(self._runs, first, last - first + 1)
        pages = self._pages
        for i in range(first, last + 1):
            if pages is None or pages[i] < 0:
                state = self.page_state(i)[0]
                raise Efault(msg=f"{self.name}: {what} of page {i}, which is {state}")
        return runs_of(pages[first : last + 1])

    def read(self, offset: int, n: int) -> bytes:
        """Copy ``n`` bytes at ``offset`` out of the resident frames.

        Raises:
            Efault: a page in the range is not resident.
            Einval: the range is outside the file.
        """
        self._check_live("read")
        if n == 0:
            return b""
        mem = self.allocator.physmem.mem
        out = bytearray(n)
        done = 0
        in_page = offset & (PAGE_SIZE - 1)
        for pfn, k in self._span(offset, n, "read"):
            chunk = min((k << PAGE_SHIFT) - in_page, n - done)
            pa = (pfn << PAGE_SHIFT) + in_page
            out[done : done + chunk] = mem[pa : pa + chunk]
            done += chunk
            in_page = 0
        return bytes(out)

    def write(self, offset: int, data) -> None:
        """Store ``data`` at ``offset`` in the resident frames.

        Raises:
            Efault: a page in the range is not resident (nothing is written).
            Einval: the range is outside the file.
        """
        self._check_live("write")
        src = memoryview(data).cast("B")
        n = len(src)
        if n == 0:
            return
        mem = self.allocator.physmem.mem
        done = 0
        in_page = offset & (PAGE_SIZE - 1)
        for pfn, k in self._span(offset, n, "write"):
            chunk = min((k << PAGE_SHIFT) - in_page, n - done)
            pa = (pfn << PAGE_SHIFT) + in_page
            mem[pa : pa + chunk] = src[done : done + chunk]
            done += chunk
            in_page = 0
