"""shmem files: population, writeout to swap and back into other frames, purge, errors, leaks."""

from __future__ import annotations

import sys
import tracemalloc

import pytest

from gemu.guest.errors import Efault, Einval, Eio, Enomem, Enospc, KernelWarning
from gemu.guest.mm.page_alloc import GFP_NOWAIT, PAGE_SHIFT, PAGE_SIZE, PageAllocator, PhysMem
from gemu.guest.mm.shmem import ShmemFile
from gemu.guest.mm.shrinker import SHRINK_EMPTY, SHRINK_STOP, Shrinker
from gemu.guest.mm.swap import SwapDevice


@pytest.fixture
def mm():
    """A 64-frame allocator (no reserve) and a 32-slot swap device; both must end leak-free."""
    alloc = PageAllocator(PhysMem(bytearray(64 * PAGE_SIZE)), watermarks=(0, 0, 0))
    swap = SwapDevice(32)
    yield alloc, swap
    alloc.assert_no_leaks()
    swap.assert_no_leaks()
    swap.close()


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def test_a_new_file_is_unpopulated_and_reads_zero_once_resident(mm):
    """A fresh file holds no frame and no slot; get_pages gives one zeroed frame per page even
    when the frames held old data."""
    alloc, swap = mm
    dirty = alloc.alloc_pages(3)
    for p in dirty:
        alloc.physmem.write(p << PAGE_SHIFT, b"\xee" * PAGE_SIZE)
    alloc.free_pages(dirty)
    f = ShmemFile(alloc, swap, 2 * PAGE_SIZE + 1)
    assert (f.nr_pages, f.resident_pages, f.swapped_pages) == (3, 0, 0)
    assert f.size == 3 * PAGE_SIZE
    pfns = f.get_pages()
    assert len(set(pfns)) == 3 and alloc.nr_used == 3
    assert f.read(0, f.size) == bytes(f.size)
    assert f.get_pages() == pfns  # already resident: same frames, nothing allocated
    assert alloc.nr_used == 3
    f.release()


def test_contents_survive_writeout_and_swapin_into_different_frames(mm):
    """Data written through the frames is in swap after writeout (frames freed) and back
    byte for byte after get_pages, although the pages now sit in other frames."""
    alloc, swap = mm
    f = ShmemFile(alloc, swap, 5 * PAGE_SIZE)
    before = f.get_pages()
    data = pattern(f.size, 3)
    f.write(0, data)
    assert f.writeout() == 5
    assert (f.resident_pages, f.swapped_pages) == (0, 5)
    assert alloc.nr_used == 0 and swap.nr_used_slots == 5
    spacer = alloc.alloc_pages(5)  # takes the frames just freed
    after = f.get_pages()
    assert set(after).isdisjoint(before)
    assert f.read(0, f.size) == data
    for i, pfn in enumerate(after):  # and it is really in guest RAM, in those frames
        chunk = data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
        assert alloc.physmem.read(pfn << PAGE_SHIFT, PAGE_SIZE) == chunk
    assert swap.nr_used_slots == 0 and (f.resident_pages, f.swapped_pages) == (5, 0)
    alloc.free_pages(spacer)
    f.release()


def test_scattered_frames_and_slots_round_trip(mm):
    """With fragmented frames and slots (no long runs), writeout and get_pages still move
    every page to the right place."""
    alloc, swap = mm
    holes = alloc.alloc_pages(20)
    alloc.free_pages(holes[::2])
    slot_holes = swap.alloc_slots(10)
    swap.free_slots(slot_holes[1::2])
    f = ShmemFile(alloc, swap, 9 * PAGE_SIZE)
    f.get_pages()
    data = pattern(f.size, 11)
    f.write(0, data)
    f.writeout()
    alloc.free_pages(holes[1::2])
    swap.free_slots(slot_holes[::2])
    f.get_pages()
    assert f.read(0, f.size) == data
    f.release()


def test_single_page_population_mixes_states(mm):
    """get_page makes one page resident; writeout then moves only resident pages and
    get_pages brings back swapped ones and zero-fills untouched ones."""
    alloc, swap = mm
    f = ShmemFile(alloc, swap, 4 * PAGE_SIZE)
    pfn = f.get_page(2)
    assert f.page_state(2) == ("resident", pfn) and f.page_state(0) == ("unpopulated", None)
    f.write(2 * PAGE_SIZE + 5, b"two")
    assert f.writeout() == 1
    assert f.page_state(2)[0] == "swapped" and f.swapped_pages == 1
    f.get_page(0)
    f.write(0, b"zero")
    f.get_pages()
    assert f.read(0, 4) == b"zero"
    assert f.read(2 * PAGE_SIZE + 5, 3) == b"two"
    assert f.read(PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE)
    with pytest.raises(Einval, match="page 4 beyond 4 pages"):
        f.get_page(4)
    f.release()


def test_truncate_loses_the_contents_and_frees_everything(mm):
    """truncate frees every frame and slot; the file reads as zeros afterwards."""
    alloc, swap = mm
    f = ShmemFile(alloc, swap, 4 * PAGE_SIZE)
    f.get_page(0)
    f.get_page(1)
    f.write(0, b"\x55" * (2 * PAGE_SIZE))
    f.writeout()
    f.get_page(3)
    f.write(3 * PAGE_SIZE, b"gone")
    assert f.truncate() == 1
    assert (f.resident_pages, f.swapped_pages) == (0, 0)
    assert alloc.nr_used == 0 and swap.nr_used_slots == 0
    f.get_pages()
    assert f.read(0, f.size) == bytes(f.size)
    f.release()


def test_swap_write_error_keeps_every_page_resident(mm):
    """An -EIO during writeout frees the slots it took and leaves every page resident in
    the same frames with the same data."""
    alloc, swap = mm
    f = ShmemFile(alloc, swap, 3 * PAGE_SIZE)
    pfns = f.get_pages()
    data = pattern(f.size, 1)
    f.write(0, data)
    swap.inject(write_errors=1)
    with pytest.raises(Eio):
        f.writeout()
    assert f.get_pages() == pfns and f.resident_pages == 3
    assert swap.nr_used_slots == 0
    assert f.read(0, f.size) == data
    f.release()


def test_swap_read_error_keeps_the_pages_in_swap(mm):
    """An -EIO during get_pages frees the new frames and leaves the pages in their slots; a
    retry then reads them back intact."""
    alloc, swap = mm
    f = ShmemFile(alloc, swap, 3 * PAGE_SIZE)
    f.get_pages()
    data = pattern(f.size, 2)
    f.write(0, data)
    f.writeout()
    swap.inject(read_errors=1)
    with pytest.raises(Eio):
        f.get_pages()
    assert (f.resident_pages, f.swapped_pages) == (0, 3)
    assert alloc.nr_used == 0 and swap.nr_used_slots == 3
    f.get_pages()
    assert f.read(0, f.size) == data
    f.release()


def test_read_error_with_mixed_pages_frees_every_new_frame(mm):
    """A file with one swapped and one never-touched page: a read error while making both
    resident frees both new frames (the zero-filled one too) and leaves the file as it was."""
    alloc, swap = mm
    f = ShmemFile(alloc, swap, 2 * PAGE_SIZE)
    f.get_page(0)
    f.write(0, b"kept")
    f.writeout()
    swap.inject(read_errors=1)
    with pytest.raises(Eio):
        f.get_pages()
    assert alloc.nr_used == 0
    assert f.page_state(0)[0] == "swapped" and f.page_state(1) == ("unpopulated", None)
    f.get_pages()
    assert f.read(0, 4) == b"kept"
    f.release()


def test_whole_evicted_file_reports_its_slots(mm):
    """An evicted file (every page in swap) reports each page's slot, and single-page access
    to it works as for any other file."""
    alloc, swap = mm
    f = ShmemFile(alloc, swap, 3 * PAGE_SIZE)
    f.get_pages()
    f.write(PAGE_SIZE, b"mid")
    f.writeout()
    states = [f.page_state(i) for i in range(3)]
    assert [s for s, _ in states] == ["swapped"] * 3
    assert all(swap.is_allocated(slot) for _, slot in states)
    f.get_page(1)
    assert f.read(PAGE_SIZE, 3) == b"mid" and f.swapped_pages == 2
    with pytest.raises(Efault, match="page 0, which is swapped"):
        f.read(0, 1)
    f.release()


def test_full_swap_is_enospc_and_changes_nothing(mm):
    """writeout needs a slot for every resident page: without enough it raises -ENOSPC and
    the pages stay resident."""
    alloc, swap = mm
    hog = swap.alloc_slots(30)
    f = ShmemFile(alloc, swap, 3 * PAGE_SIZE)
    pfns = f.get_pages()
    with pytest.raises(Enospc):
        f.writeout()
    assert f.get_pages() == pfns and swap.nr_used_slots == 30
    swap.free_slots(hog)
    f.release()


def test_out_of_memory_get_pages_changes_nothing(mm):
    """When frames cannot be allocated, get_pages raises -ENOMEM and the swapped pages stay
    where they were."""
    alloc, swap = mm
    f = ShmemFile(alloc, swap, 4 * PAGE_SIZE)
    f.get_pages()
    f.write(0, b"keep")
    f.writeout()
    hog = alloc.alloc_pages(62)
    with pytest.raises(Enomem):
        f.get_pages(GFP_NOWAIT)
    assert (f.resident_pages, f.swapped_pages) == (0, 4) and alloc.nr_used == 62
    alloc.free_pages(hog)
    f.get_pages()
    assert f.read(0, 4) == b"keep"
    f.release()


def test_cpu_access_needs_resident_pages(mm):
    """read and write go through the frames: a page that is not resident is -EFAULT (and a
    write touches nothing), a range past the end is -EINVAL."""
    alloc, swap = mm
    f = ShmemFile(alloc, swap, 2 * PAGE_SIZE)
    with pytest.raises(Efault, match="page 0, which is unpopulated"):
        f.read(0, 1)
    f.get_page(0)
    with pytest.raises(Efault, match="page 1, which is unpopulated"):
        f.write(PAGE_SIZE - 2, b"abcd")
    assert f.read(PAGE_SIZE - 2, 2) == b"\0\0"
    f.get_pages()
    f.write(PAGE_SIZE - 2, b"abcd")  # across the page boundary
    assert f.read(PAGE_SIZE - 2, 4) == b"abcd"
    f.writeout()
    with pytest.raises(Efault, match="which is swapped"):
        f.read(0, 1)
    with pytest.raises(Einval):
        f.read(2 * PAGE_SIZE - 1, 2)
    f.release()


def test_release_frees_everything_and_the_file_is_dead(mm):
    """release frees frames and slots; using or releasing the file again warns."""
    alloc, swap = mm
    f = ShmemFile(alloc, swap, 2 * PAGE_SIZE)
    f.get_page(0)
    f.writeout()
    f.get_page(1)
    f.release()
    assert alloc.nr_used == 0 and swap.nr_used_slots == 0
    with pytest.raises(KernelWarning, match="get_pages after release"):
        f.get_pages()
    with pytest.raises(KernelWarning, match="released twice"):
        f.release()


def test_reclaim_touching_the_file_being_populated_is_caught(mm):
    """If reclaim (run by get_pages' own allocation) writes out the file that is being made
    resident, the broken serialization is reported instead of corrupting the page table."""
    alloc, swap = mm
    f = ShmemFile(alloc, swap, 4 * PAGE_SIZE)
    f.get_page(0)

    def count(sc):
        return f.resident_pages or SHRINK_EMPTY

    def scan(sc):
        return f.writeout() or SHRINK_STOP

    alloc.register_shrinker(Shrinker("bad", count, scan))
    hog = alloc.alloc_pages(61)
    with pytest.raises(KernelWarning, match="callers must serialize"):
        f.get_pages()
    alloc.free_pages(hog)
    f.release()


def test_hundred_thousand_small_files_fit_in_the_memory_budget():
    """100k one-page files cost well under 150 MiB of host memory beyond guest RAM: the
    per-page state is one array slot, not a Python object."""
    alloc = PageAllocator(PhysMem(bytearray(16 * PAGE_SIZE)), watermarks=(0, 0, 0))
    swap = SwapDevice(0)
    tracemalloc.start()
    files = [ShmemFile(alloc, swap, PAGE_SIZE) for _ in range(100_000)]
    used, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    per_file = used / len(files)
    assert used < 150 * 2**20 / 4, f"{used / 2**20:.1f} MiB for 100k files"
    assert per_file < 400, f"{per_file:.0f} bytes per file"
    assert sys.getsizeof(files[0]) < 200
