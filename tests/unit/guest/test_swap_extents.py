"""Write-out and swap-in by extents (SwapDevice.write_frames/read_frames) on both backings:
the bytes come back, the counters count pages, and an injected error leaves the file as it
was."""

from __future__ import annotations

import pytest

from gemu.guest.errors import Eio
from gemu.guest.mm.page_alloc import PAGE_SIZE, PageAllocator, PhysMem
from gemu.guest.mm.shmem import ShmemFile
from gemu.guest.mm.swap import SwapDevice


@pytest.fixture(params=["memory", "file"])
def swap(request, tmp_path):
    dev = SwapDevice(64, "memory" if request.param == "memory" else tmp_path / "swap")
    yield dev
    dev.close()


def test_round_trip_through_fragmented_frames(swap):
    alloc = PageAllocator(PhysMem(bytearray(64 * PAGE_SIZE)), watermarks=(0, 0, 0))
    holes = alloc.alloc_pages(20)
    alloc.free_pages(holes[::2])  # the file gets every other frame: ten extents
    f = ShmemFile(alloc, swap, 10 * PAGE_SIZE)
    f.get_pages()
    data = bytes(range(256)) * (10 * PAGE_SIZE // 256)
    f.write(0, data)
    assert f.writeout() == 10
    stats = swap.statistics()
    assert (stats.pswpout, stats.bytes_out) == (10, 10 * PAGE_SIZE)
    swap.inject(read_errors=1)
    with pytest.raises(Eio):
        f.get_pages()
    assert (f.resident_pages, f.swapped_pages, alloc.nr_used) == (0, 10, 10)
    f.get_pages()
    assert f.read(0, len(data)) == data
    assert swap.statistics().pswpin == 10
    f.release()
    alloc.free_pages(holes[1::2])
    alloc.assert_no_leaks()
    swap.assert_no_leaks()


def test_a_write_error_keeps_every_page_resident(swap):
    alloc = PageAllocator(PhysMem(bytearray(16 * PAGE_SIZE)), watermarks=(0, 0, 0))
    f = ShmemFile(alloc, swap, 4 * PAGE_SIZE)
    pfns = f.get_pages()
    f.write(100, b"kept")
    swap.inject(write_errors=1)
    with pytest.raises(Eio):
        f.writeout()
    assert f.get_pages() == pfns and f.read(100, 4) == b"kept"
    assert swap.nr_used_slots == 0
    f.release()
    alloc.assert_no_leaks()
