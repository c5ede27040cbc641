"""The swap device: slot accounting, data round trips (memory and file), errors and misuse."""

from __future__ import annotations

import pytest

from gemu.guest.errors import Einval, Eio, Enospc, KernelWarning
from gemu.guest.mm.page_alloc import PAGE_SIZE
from gemu.guest.mm.swap import SwapDevice


@pytest.fixture(params=["memory", "file"])
def swap(request, tmp_path):
    """A 16-slot device, memory-backed and file-backed; closed after the test."""
    backing = "memory" if request.param == "memory" else tmp_path / "swapfile"
    dev = SwapDevice(16, backing)
    yield dev
    dev.close()


def page(tag: int) -> bytes:
    return bytes([tag]) * (PAGE_SIZE - 4) + tag.to_bytes(4, "little")


def test_slot_accounting(swap):
    """get_nr_swap_pages + used == nr_slots through allocations and frees; a fresh device
    hands out consecutive slots; statistics keep the high-water mark."""
    assert swap.get_nr_swap_pages() == swap.total_swap_pages == 16
    a = swap.alloc_slots(5)
    assert a == [0, 1, 2, 3, 4]
    b = swap.alloc_slot()
    assert swap.nr_used_slots == 6 and swap.nr_free_slots == 10
    swap.free_slots(a)
    assert swap.get_nr_swap_pages() == 15
    swap.free_slot(b)
    assert swap.statistics().high_water == 6
    swap.assert_no_leaks()


def test_full_device_is_enospc_and_takes_nothing(swap):
    """Asking for more slots than are free raises -ENOSPC with the numbers, and no slot is
    taken."""
    held = swap.alloc_slots(14)
    with pytest.raises(Enospc, match="3 slots wanted, 2 of 16 free"):
        swap.alloc_slots(3)
    assert swap.nr_free_slots == 2 and swap.statistics().alloc_failures == 1
    swap.free_slots(held)


def test_pages_round_trip_byte_for_byte(swap):
    """What write_slot(s) stores, read_slot and read_slots_into return, per slot and for a
    run of consecutive slots; statistics count pages and bytes both ways."""
    slots = swap.alloc_slots(3)
    swap.write_slots(slots[0], page(1) + page(2) + page(3))
    assert swap.read_slot(slots[1]) == page(2)
    out = bytearray(2 * PAGE_SIZE)
    swap.read_slots_into(slots[1], memoryview(out))
    assert bytes(out) == page(2) + page(3)
    swap.write_slot(slots[2], page(9))
    frame = bytearray(PAGE_SIZE)
    swap.read_slot_into(slots[2], frame)
    assert bytes(frame) == page(9)
    st = swap.statistics()
    assert (st.pswpout, st.pswpin, st.bytes_out, st.bytes_in) == (
        4,
        4,
        4 * PAGE_SIZE,
        4 * PAGE_SIZE,
    )
    swap.free_slots(slots)


def test_file_backing_is_a_file_of_the_device_size(tmp_path):
    """A file-backed device is a file of nr_slots pages holding the written data at slot
    offsets."""
    path = tmp_path / "swapfile"
    with SwapDevice(4, path) as dev:
        (s,) = dev.alloc_slots(1)
        dev.write_slot(s, page(7))
        dev.free_slot(s)
    data = path.read_bytes()
    assert len(data) == 4 * PAGE_SIZE and data[s * PAGE_SIZE : (s + 1) * PAGE_SIZE] == page(7)


def test_counted_errors_fail_whole_calls_and_keep_the_data(swap):
    """inject(read_errors=1, write_errors=1): the next write and the next read raise -EIO
    naming the slot; the failed read leaves the slot's data intact for a retry."""
    (s,) = swap.alloc_slots(1)
    swap.write_slot(s, page(5))
    swap.inject(read_errors=1, write_errors=1)
    with pytest.raises(Eio, match=f"injected write error at slot {s}"):
        swap.write_slot(s, page(6))
    with pytest.raises(Eio, match="injected read error"):
        swap.read_slot(s)
    assert swap.read_slot(s) == page(5)
    st = swap.statistics()
    assert (st.write_errors, st.read_errors) == (1, 1)
    swap.free_slot(s)


def test_error_rate_is_seeded_and_reproducible(swap):
    """With a rate, which pages fail is a pure function of the seed."""
    slots = swap.alloc_slots(16)

    def outcome(seed):
        swap.inject(rate=0.3, seed=seed)
        fails = []
        for s in slots:
            try:
                swap.write_slot(s, page(s))
            except Eio:
                fails.append(s)
        swap.inject()
        return fails

    first = outcome(42)
    assert first == outcome(42) and 0 < len(first) < 16
    swap.free_slots(slots)


def test_misuse_is_loud(swap):
    """Double free, a foreign slot, I/O to a free slot, or a partial page are errors."""
    (s,) = swap.alloc_slots(1)
    swap.free_slot(s)
    with pytest.raises(KernelWarning, match=f"slot {s} freed twice"):
        swap.free_slot(s)
    with pytest.raises(KernelWarning, match="slot 99 is not on swap0"):
        swap.free_slots([99])
    with pytest.raises(KernelWarning, match="not all in use"):
        swap.write_slot(s, page(1))
    (t,) = swap.alloc_slots(1)
    with pytest.raises(Einval, match="not whole pages"):
        swap.write_slot(t, b"short")
    with pytest.raises(Einval):
        swap.alloc_slots(0)
    swap.free_slot(t)
    swap.assert_no_leaks()


def test_assert_no_leaks_names_the_slots(swap):
    """assert_no_leaks fails with the count and the slot numbers still in use."""
    slots = swap.alloc_slots(2)
    with pytest.raises(AssertionError, match=r"2 slots in use, expected 0 \(in use: 0, 1\)"):
        swap.assert_no_leaks()
    swap.free_slots(slots)
