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
- Per-page state is one signed 64-bit entry in an ``array('q')``: a frame number (>= 0),
  :data:`UNPOPULATED` (-1), or a swap slot ``s`` stored as ``-2 - s``. While *every* page is
  in swap (an evicted object) the entries are the slot numbers themselves, so evicting and
  restoring a whole object needs no per-page conversion. No Python object per page: 100k
  small objects cost a few tens of MiB beyond guest RAM.
"""

from __future__ import annotations

from array import array
from operator import sub

from gemu.guest.errors import Efault, Einval, KernelError, warn_on
from gemu.guest.mm.page_alloc import GFP_KERNEL, PAGE_SHIFT, PAGE_SIZE, Gfp, PageAllocator
from gemu.guest.mm.swap import SwapDevice

UNPOPULATED = -1
"""Page entry of a page that has no frame and no slot."""


def _paired_runs(firsts: list[int], seconds: list[int]) -> list[tuple[int, int, int]]:
    """Runs where both lists count up by one together: ``[(first, second, length), ...]``.

    Both lists hold distinct numbers (a frame or a slot has one owner). If every pair has
    the same difference and the firsts fill a range, the whole batch is one copy whatever the
    order: frame ``p`` goes to slot ``p - d`` for every pair.
    """
    n = len(firsts)
    if not n:
        return []
    a0, b0 = firsts[0], seconds[0]
    low = min(firsts)
    if max(firsts) - low == n - 1 and list(map(sub, firsts, seconds)).count(a0 - b0) == n:
        return [(low, low - (a0 - b0), n)]
    runs = []
    start_a, start_b, length = a0, b0, 1
    for a, b in zip(firsts[1:], seconds[1:]):
        if a == start_a + length and b == start_b + length:
            length += 1
        else:
            runs.append((start_a, start_b, length))
            start_a, start_b, length = a, b, 1
    runs.append((start_a, start_b, length))
    return runs


class ShmemFile:
    """The shmem file behind one GEM object. Kernel: shmem_file_setup() [mm/shmem.c]

    ``nr_resident + nr_swapped <= nr_pages`` always; each resident page owns one frame of
    ``allocator`` and each swapped page one slot of ``swap``, and nothing else does.

    Args:
        allocator: where frames come from.
        swap: where pages go on :meth:`writeout`.
        size: bytes; rounded up to whole pages.
        name: for messages.
    """

    __slots__ = (
        "_pages",
        "_raw_slots",
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
        nr_pages = -(-size // PAGE_SIZE)
        self.size = nr_pages << PAGE_SHIFT
        self._pages = array("q", [UNPOPULATED]) * nr_pages
        # True while every page is swapped and _pages holds plain slot numbers.
        self._raw_slots = False
        #: Pages held in frames.
        self.nr_resident = 0
        #: Pages held in swap slots.
        self.nr_swapped = 0
        self.released = False

    def __repr__(self) -> str:
        return (
            f"<ShmemFile {self.name} {len(self._pages)} pages: {self.nr_resident} resident, "
            f"{self.nr_swapped} swapped>"
        )

    @property
    def nr_pages(self) -> int:
        return len(self._pages)

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
        e = self._pages[index]
        if self._raw_slots:
            return "swapped", e
        if e >= 0:
            return "resident", e
        if e == UNPOPULATED:
            return "unpopulated", None
        return "swapped", -2 - e

    def _entries(self) -> array:
        """The page entries in the encoded form (slots as ``-2 - s``)."""
        if self._raw_slots:
            self._pages = array("q", [-2 - slot for slot in self._pages])
            self._raw_slots = False
        return self._pages

    def _check_live(self, what: str) -> None:
        if warn_on(self.released, f"{self.name}: {what} after release"):
            raise Einval(msg=f"{self.name}: {what} after release")

    # Making pages resident.

    def get_pages(self, gfp: Gfp = GFP_KERNEL) -> list[int]:
        """Make every page resident; return the frame of each page, in page order.

        Kernel: shmem_read_mapping_page_gfp() for each page (drm_gem_get_pages())

        Raises:
            Enomem: frames could not be allocated (after reclaim, as ``gfp`` allows).
            Eio: a page could not be read from swap.
            In both cases the file is unchanged.
        """
        pages = self._pages
        if self.nr_resident == len(pages):
            return pages.tolist()
        self._check_live("get_pages")
        if self._raw_slots:
            self._swapin_all(gfp)
        elif self.nr_resident == 0:
            self._populate(range(len(pages)), gfp)
        else:
            self._populate([i for i, e in enumerate(pages) if e < 0], gfp)
        return self._pages.tolist()

    def get_page(self, index: int, gfp: Gfp = GFP_KERNEL) -> int:
        """Make page ``index`` resident; return its frame.

        Kernel: shmem_read_mapping_page_gfp() [mm/shmem.c]; errors as :meth:`get_pages`.
        """
        self._check_live("get_page")
        if not 0 <= index < len(self._pages):
            raise Einval(msg=f"{self.name}: page {index} beyond {len(self._pages)} pages")
        if self._entries()[index] < 0:
            self._populate([index], gfp)
        return self._pages[index]

    def _alloc_frames(self, nr: int, gfp: Gfp) -> list[int]:
        before = (self.nr_resident, self.nr_swapped)
        pfns = self.allocator.alloc_pages(nr, gfp & ~Gfp.ZERO)
        if (self.nr_resident, self.nr_swapped) != before:
            self.allocator.free_pages(pfns)
            msg = f"{self.name}: changed during its own get_pages (callers must serialize)"
            warn_on(True, msg)
            raise Einval(msg=msg)
        return pfns

    def _swapin_all(self, gfp: Gfp) -> None:
        """Bring back an object whose pages are all in swap (the evicted state)."""
        slots = self._pages.tolist()
        pfns = self._alloc_frames(len(slots), gfp)
        self._read_swap(pfns, slots, pfns)
        self._pages = array("q", pfns)
        self._raw_slots = False
        self.nr_resident = len(pfns)
        self.nr_swapped = 0
        self.swap.free_slots(slots)

    def _read_swap(self, pfns: list[int], slots: list[int], new_frames: list[int]) -> None:
        """Read ``slots`` into the frames ``pfns``; on error free ``new_frames`` (all the
        frames this call allocated) and re-raise, leaving the slots as they were."""
        phys = self.allocator.physmem
        read = self.swap.read_slots_into
        try:
            for pfn, slot, n in _paired_runs(pfns, slots):
                read(slot, phys.frames_view(pfn, n))
        except KernelError:
            self.allocator.free_pages(new_frames)
            raise

    def _populate(self, indices, gfp: Gfp) -> None:
        """Make the pages ``indices`` resident; the entries are in encoded form."""
        pages = self._pages
        nr = len(indices)
        pfns = self._alloc_frames(nr, gfp)
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
        if slots:
            self._read_swap(swap_pfns, slots, pfns)
        if zero_pfns:
            self.allocator.physmem.zero_frames(zero_pfns)
        if nr == len(pages):
            self._pages = array("q", pfns)
        else:
            for i, pfn in zip(indices, pfns):
                pages[i] = pfn
        self.nr_resident += nr
        if slots:
            self.nr_swapped -= len(slots)
            self.swap.free_slots(slots)

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
        pages = self._pages
        whole = nr == len(pages)
        if whole:
            pfns = pages.tolist()
            indices = None
        else:
            indices = [i for i, e in enumerate(pages) if e >= 0]
            pfns = [pages[i] for i in indices]
        slots = self.swap.alloc_slots(nr)
        phys = self.allocator.physmem
        try:
            write = self.swap.write_slots
            for pfn, slot, n in _paired_runs(pfns, slots):
                write(slot, phys.frames_view(pfn, n))
        except KernelError:
            self.swap.free_slots(slots)
            raise
        if whole:
            self._pages = array("q", slots)
            self._raw_slots = True
        else:
            for i, s in zip(indices, slots):
                pages[i] = -2 - s
            if self.nr_swapped + nr == len(pages):
                self._pages = array("q", [-2 - e for e in pages])
                self._raw_slots = True
        self.nr_resident = 0
        self.nr_swapped += nr
        self.allocator.free_pages(pfns)
        return nr

    # Purging.

    def truncate(self) -> int:
        """Drop every page: free its frame or slot; the contents are gone (reads as zeros
        after the next :meth:`get_pages`). Return the frames freed.

        Kernel: shmem_truncate_range(inode, 0, -1) [mm/shmem.c]
        """
        pages = self._pages
        if self.nr_resident == 0 and self.nr_swapped == 0:
            return 0
        if self._raw_slots:
            pfns, slots = [], pages.tolist()
        else:
            pfns = [e for e in pages if e >= 0]
            slots = [-2 - e for e in pages if e < UNPOPULATED]
        self._pages = array("q", [UNPOPULATED]) * len(pages)
        self._raw_slots = False
        self.nr_resident = 0
        self.nr_swapped = 0
        if pfns:
            self.allocator.free_pages(pfns)
        if slots:
            self.swap.free_slots(slots)
        return len(pfns)

    def release(self) -> None:
        """Free everything the file holds; the file is unusable afterwards.

        Kernel: the last fput() of the file -> shmem_evict_inode() [mm/shmem.c]
        """
        if warn_on(self.released, f"{self.name}: released twice"):
            return
        self.truncate()
        self.released = True

    # CPU access through the frames.

    def _span(self, offset: int, n: int, what: str):
        if offset < 0 or n < 0 or offset + n > self.size:
            raise Einval(msg=f"{self.name}: {what} of {n} bytes at {offset} beyond {self.size}")
        first = offset >> PAGE_SHIFT
        last = (offset + n - 1) >> PAGE_SHIFT
        if self.nr_resident == len(self._pages):
            return first, last
        pages = self._entries()
        for i in range(first, last + 1):
            if pages[i] < 0:
                state = self.page_state(i)[0]
                raise Efault(msg=f"{self.name}: {what} of page {i}, which is {state}")
        return first, last

    def read(self, offset: int, n: int) -> bytes:
        """Copy ``n`` bytes at ``offset`` out of the resident frames.

        Raises:
            Efault: a page in the range is not resident.
            Einval: the range is outside the file.
        """
        self._check_live("read")
        if n == 0:
            return b""
        first, last = self._span(offset, n, "read")
        mem = self.allocator.physmem.mem
        pages = self._pages
        out = bytearray(n)
        done = 0
        pos = offset
        for i in range(first, last + 1):
            in_page = pos & (PAGE_SIZE - 1)
            chunk = min(PAGE_SIZE - in_page, n - done)
            pa = (pages[i] << PAGE_SHIFT) + in_page
            out[done : done + chunk] = mem[pa : pa + chunk]
            done += chunk
            pos += chunk
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
        first, last = self._span(offset, n, "write")
        mem = self.allocator.physmem.mem
        pages = self._pages
        done = 0
        pos = offset
        for i in range(first, last + 1):
            in_page = pos & (PAGE_SIZE - 1)
            chunk = min(PAGE_SIZE - in_page, n - done)
            pa = (pages[i] << PAGE_SHIFT) + in_page
            mem[pa : pa + chunk] = src[done : done + chunk]
            done += chunk
            pos += chunk
