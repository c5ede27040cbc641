"""The page-by-page batch routines of fragmented objects against per-page references
(Hypothesis, derandomized), each with the C page copy and with the Python one.

A GEM object whose frames and slots are all single pages (no two consecutive) is written out
and swapped in with numbers rather than extents: ``copy_page_views``, ``mark_numbers``,
``RunStack.pop_numbers``/``push_singles``, ``SwapDevice.write_pages``/``read_pages`` and the
shmem paths built on them. Each must do exactly what the simple per-page loop does: the same
bytes, the same states, the same numbers handed out in the same order, and the same errors.
"""

from __future__ import annotations

import random
from array import array
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import rule

from gemu.guest.errors import Efault, Einval, Eio, KernelWarning
from gemu.guest.mm import extents
from gemu.guest.mm.extents import (
    LazyPageViews,
    RunStack,
    copy_page_views,
    expand,
    mark,
    mark_numbers,
    no_neighbours,
    page_views,
    runs_of,
)
from gemu.guest.mm.page_alloc import PAGE_SIZE, PageAllocator, PhysMem
from gemu.guest.mm.shmem import ShmemFile
from gemu.guest.mm.swap import SwapDevice
from tests.property.test_extents_machine import ShmemExtentsMachine

DET = settings(derandomize=True, max_examples=200, deadline=None, database=None)


@pytest.fixture(scope="module", params=["C copy", "Python copy"])
def page_copy(request):
    """A test that copies pages (marked ``both_copies``) runs twice: with the compiled page
    copy, and with the Python copy between page views that runs where it is not built
    (GEMU_PAGECOPY=python)."""
    native = extents.native_copy_pages
    if request.param == "Python copy":
        extents.native_copy_pages = None
    yield request.param
    extents.native_copy_pages = native


both_copies = pytest.mark.usefixtures("page_copy")


def reference_runs_of(numbers: list[int]) -> list[tuple[int, int]]:
    """One Python step per number: the form runs_of replaced."""
    runs: list[list[int]] = []
    for p in numbers:
        if runs and p == runs[-1][0] + runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    return [(s, n) for s, n in runs]


@DET
@given(st.lists(st.integers(-3, 40), max_size=30))
def test_runs_of_is_the_per_number_split(numbers) -> None:
    """Runs found from the neighbours' differences are the per-number split, for any
    numbers (repeats, negatives, descending), and expand is its inverse."""
    got = runs_of(numbers)
    assert got == reference_runs_of(numbers)
    assert expand(got) == numbers
    assert no_neighbours(numbers) == all(b != a + 1 for a, b in pairwise(numbers))


@DET
@given(st.integers(0, 12), st.data())
def test_copy_page_views_is_the_per_page_copy(nr_pages, data) -> None:
    """Copying between page views moves the same bytes as a per-page slice loop, in order,
    for any number of pages (none, one, or a batch where a page listed twice as destination
    ends with the last copy)."""
    shift = 4  # 16-byte pages keep the buffers small
    size = 1 << shift
    src_pages = data.draw(st.lists(st.integers(0, 15), min_size=nr_pages, max_size=nr_pages))
    dst_pages = data.draw(st.lists(st.integers(0, 15), min_size=nr_pages, max_size=nr_pages))
    rnd = random.Random(data.draw(st.integers(0, 1 << 16)))
    src = bytearray(rnd.randbytes(16 * size))
    dst = bytearray(rnd.randbytes(16 * size))
    expect = bytearray(dst)
    for d, s in zip(dst_pages, src_pages, strict=True):
        expect[d * size : (d + 1) * size] = src[s * size : (s + 1) * size]
    dst_views = page_views(memoryview(dst), shift)
    assert len(dst_views) == 16 and all(len(v) == size for v in dst_views)
    copy_page_views(dst_views, dst_pages, page_views(memoryview(src), shift), src_pages)
    assert dst == expect
    # a buffer beyond PAGE_VIEWS_MAX pages gets its views made on demand: the same copies
    lazy_dst = bytearray(rnd.randbytes(16 * size))
    expect = bytearray(lazy_dst)
    for d, s in zip(dst_pages, src_pages, strict=True):
        expect[d * size : (d + 1) * size] = src[s * size : (s + 1) * size]
    lazy = LazyPageViews(memoryview(lazy_dst), shift)
    copy_page_views(lazy, dst_pages, LazyPageViews(memoryview(src), shift), src_pages)
    assert lazy_dst == expect


def test_page_views_beyond_the_bound_are_made_on_demand(monkeypatch) -> None:
    """Over PAGE_VIEWS_MAX pages, page_views cuts nothing up front; its views are the same
    pages, and an index outside them (negative included) is an IndexError."""
    monkeypatch.setattr(extents, "PAGE_VIEWS_MAX", 4)
    buf = memoryview(bytearray(range(80)))  # five 16-byte pages
    views = extents.page_views(buf, 4)
    assert isinstance(views, LazyPageViews) and len(views) == 5
    assert [bytes(views[i]) for i in range(5)] == [
        bytes(range(16 * i, 16 * i + 16)) for i in range(5)
    ]
    for bad in (-1, 5):
        with pytest.raises(IndexError):
            views[bad]
    assert isinstance(extents.page_views(buf[:64], 4), list)


@DET
@given(
    st.lists(st.sampled_from([0, 1, 2]), min_size=1, max_size=24),
    st.lists(st.integers(-2, 26), max_size=12),
)
def test_mark_numbers_is_the_per_number_update(state, numbers) -> None:
    """mark_numbers sets every number or nothing, exactly as mark of one-number extents
    (out of range, in another state or repeated: nothing changes)."""
    a, b = bytearray(state), bytearray(state)
    ok = mark(a, [(p, 1) for p in numbers], 1, 2)
    assert mark_numbers(b, numbers, 1, 2) is ok
    assert a == b


@DET
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 9)), max_size=25), st.randoms())
def test_numbers_of_a_run_stack_are_a_stack_of_numbers(ops, rnd) -> None:
    """pop_numbers/push_singles hand out the same numbers in the same order as a stack of
    single numbers, mixed with pop/push of extents."""
    stack = RunStack(5, 40)
    ref = list(range(44, 4, -1))  # 5 on top
    out: list[int] = []
    for use_numbers, nr in ops:
        if rnd.random() < 0.5 and out:  # push some back
            k = rnd.randint(1, len(out))
            batch = rnd.sample(out, k)
            for p in batch:
                out.remove(p)
            if use_numbers:  # consecutive neighbours too: each stays an extent of one
                stack.push_singles(batch)
            else:
                stack.push(runs_of(batch))
            ref += batch[::-1]
        nr = min(nr, len(ref))
        if not nr:
            continue
        got = stack.pop_numbers(nr) if use_numbers else expand(stack.pop(nr))
        expect = ref[len(ref) - nr :][::-1]
        del ref[len(ref) - nr :]
        assert got == expect
        out += got
        assert len(stack) == len(ref)
        assert expand(stack.extents()) == ref[::-1]


def _fragmented_machine(nr: int = 24):
    """RAM and swap of ``nr`` pages each where every other frame and slot is held."""
    alloc = PageAllocator(PhysMem(bytearray(nr * PAGE_SIZE)), watermarks=(0, 0, 0))
    swap = SwapDevice(nr)
    frames = alloc.alloc_pages(nr)
    alloc.free_pages(frames[::2])
    slots = swap.alloc_slots(nr)
    swap.free_slots(slots[::2])
    return alloc, swap, frames[1::2], slots[1::2]


@both_copies
@DET
@given(st.integers(5, 12), st.data())
def test_write_pages_and_read_pages_are_the_paired_copies(nr, data) -> None:
    """write_pages/read_pages of single pages copy the bytes and count the pages as
    write_frames/read_frames of the one-page pairs do."""
    alloc, swap, _, _ = _fragmented_machine()
    ram = alloc.physmem
    pfns = alloc.alloc_pages(nr)
    slots = swap.alloc_slots(nr)
    order = data.draw(st.permutations(range(nr)))
    slots = [slots[i] for i in order]
    rnd = random.Random(data.draw(st.integers(0, 1 << 16)))
    for p in pfns:
        ram.write(p * PAGE_SIZE, rnd.randbytes(PAGE_SIZE))
    before = {p: ram.read(p * PAGE_SIZE, PAGE_SIZE) for p in pfns}
    swap.write_pages(ram, pfns, slots)
    assert [swap.read_slot(s) for s in slots] == [before[p] for p in pfns]
    for p in pfns:
        ram.write(p * PAGE_SIZE, bytes(PAGE_SIZE))
    swap.read_pages(ram, pfns, slots)
    assert [ram.read(p * PAGE_SIZE, PAGE_SIZE) for p in pfns] == [before[p] for p in pfns]
    stats = swap.statistics()
    assert (stats.pswpout, stats.bytes_out) == (nr, nr * PAGE_SIZE)
    assert (stats.pswpin, stats.bytes_in) == (2 * nr, 2 * nr * PAGE_SIZE)  # + read_slot


@both_copies
def test_write_pages_names_the_first_bad_frame_or_slot() -> None:
    """A frame outside RAM or a slot not in use sends the batch down the per-pair path:
    the same errors, at the same pair, as write_frames."""
    alloc, swap, _, held_slots = _fragmented_machine()
    pfns = alloc.alloc_pages(6)
    slots = swap.alloc_slots(6)
    with pytest.raises(Efault, match="outside RAM"):
        swap.write_pages(alloc.physmem, pfns[:5] + [10_000], slots)
    free_slot = 1 + max(held_slots + slots)  # beyond every slot handed out: free
    assert not swap.is_allocated(free_slot)
    with pytest.raises(KernelWarning, match=f"read of slots {free_slot}..{free_slot}: not all"):
        swap.read_pages(alloc.physmem, pfns, slots[:5] + [free_slot])
    with pytest.raises(Einval, match="6 frames for 5 slots"):
        swap.write_pages(alloc.physmem, pfns, slots[:5])


def _twins(nr: int = 6):
    """Two fragmented machines built alike, each with ``nr`` frames allocated and filled
    with the same bytes."""
    out = []
    for _ in range(2):
        alloc, swap, _, _ = _fragmented_machine()
        pfns = alloc.alloc_pages(nr)
        rnd = random.Random(11)
        for p in pfns:
            alloc.physmem.write(p * PAGE_SIZE, rnd.randbytes(PAGE_SIZE))
        out.append((alloc, swap, pfns))
    return out


def _swap_view(swap: SwapDevice) -> tuple:
    st_ = swap.statistics()
    return (
        swap._free.extents(),
        bytes(swap._state),
        (st_.pswpout, st_.bytes_out, st_.pswpin, st_.bytes_in, st_.high_water),
    )


@both_copies
def test_alloc_and_write_pages_is_alloc_slots_then_write_pages() -> None:
    """The one-step write-out takes the slots alloc_slots would (same numbers, same order,
    same free list after), writes the same bytes and counts the same statistics."""
    (alloc_a, swap_a, pfns_a), (alloc_b, swap_b, pfns_b) = _twins()
    slots_a = swap_a.alloc_and_write_pages(alloc_a.physmem, pfns_a)
    slots_b = swap_b.alloc_slots(len(pfns_b))
    swap_b.write_pages(alloc_b.physmem, pfns_b, slots_b)
    assert slots_a == slots_b
    assert _swap_view(swap_a) == _swap_view(swap_b)
    assert [swap_a.read_slot(s) for s in slots_a] == [
        alloc_a.physmem.read(p * PAGE_SIZE, PAGE_SIZE) for p in pfns_a
    ]


@both_copies
def test_alloc_and_write_pages_declines_and_takes_nothing() -> None:
    """Where the one-step path is not open it returns None and leaves the device as it was:
    a frame outside RAM, too few free slots, an injected error armed, a single page."""
    alloc, swap, _, _ = _fragmented_machine()
    ram = alloc.physmem
    pfns = alloc.alloc_pages(6)
    before = _swap_view(swap)
    assert swap.alloc_and_write_pages(ram, pfns[:5] + [ram.nr_frames]) is None
    assert swap.alloc_and_write_pages(ram, pfns[:5] + [-1]) is None
    assert swap.alloc_and_write_pages(ram, pfns * 3) is None  # 18 pages, 12 slots free
    assert swap.alloc_and_write_pages(ram, pfns[:1]) is None
    swap.inject(write_errors=1)
    assert swap.alloc_and_write_pages(ram, pfns) is None
    assert _swap_view(swap) == before
    with pytest.raises(Eio, match="injected write error"):  # the caller's step-by-step path
        swap.write_pages(ram, pfns, swap.alloc_slots(6))


@both_copies
def test_read_and_free_pages_is_read_pages_then_free_singles() -> None:
    """The one-step swap-in reads the same bytes, frees the slots to the same free list and
    counts the same statistics as read_pages then free_singles."""
    twins = _twins()
    slots = []
    for alloc, swap, pfns in twins:
        got = swap.alloc_slots(len(pfns))
        swap.write_pages(alloc.physmem, pfns, got)
        for p in pfns:
            alloc.physmem.write(p * PAGE_SIZE, bytes(PAGE_SIZE))
        slots.append(got)
    (alloc_a, swap_a, pfns_a), (alloc_b, swap_b, pfns_b) = twins
    assert swap_a.read_and_free_pages(alloc_a.physmem, pfns_a, slots[0]) is True
    swap_b.read_pages(alloc_b.physmem, pfns_b, slots[1])
    swap_b.free_singles(slots[1])
    assert _swap_view(swap_a) == _swap_view(swap_b)
    assert bytes(alloc_a.physmem.mem) == bytes(alloc_b.physmem.mem)


@both_copies
def test_read_and_free_pages_declines_on_a_bad_batch_and_changes_nothing() -> None:
    """A slot not in use or named twice, or a frame outside RAM: False, with every slot's
    state, the free list and RAM as they were (the caller's read_pages names the fault)."""
    alloc, swap, _, held_slots = _fragmented_machine()
    ram = alloc.physmem
    pfns = alloc.alloc_pages(6)
    slots = swap.alloc_slots(6)
    swap.write_pages(ram, pfns, slots)
    free_slot = 1 + max(held_slots + slots)
    before = (_swap_view(swap), bytes(ram.mem))
    assert swap.read_and_free_pages(ram, pfns, slots[:5] + [free_slot]) is False
    assert swap.read_and_free_pages(ram, pfns, slots[:5] + slots[:1]) is False
    assert swap.read_and_free_pages(ram, pfns[:5] + [ram.nr_frames], slots) is False
    assert swap.read_and_free_pages(ram, pfns, slots[:5]) is False
    assert (_swap_view(swap), bytes(ram.mem)) == before
    with pytest.raises(KernelWarning, match=f"read of slots {free_slot}..{free_slot}"):
        swap.read_pages(ram, pfns, slots[:5] + [free_slot])


def test_page_views_do_not_keep_ram_or_swap_from_closing() -> None:
    """RAM in a memfd and a memory swap device close after their page views were made
    (each view holds the mapping exported until close drops them)."""
    ram = PhysMem.from_memfd(8 * PAGE_SIZE)
    assert len(ram.frame_views()) == 8
    ram.close()
    assert ram.fd is None
    swap = SwapDevice(8)
    mapping = swap._mem.obj
    assert len(swap._slot_views()) == 8
    swap.close()
    mapping.close()  # BufferError while a view of it lives


@both_copies
def test_a_fragmented_object_round_trips_page_by_page() -> None:
    """A 64 KiB object on every other frame and slot goes out and back through the
    page-by-page path: the bytes survive, frames and slots are freed and handed out in the
    order of the per-page stacks, and nothing leaks."""
    alloc, swap, held_frames, held_slots = _fragmented_machine(48)
    f = ShmemFile(alloc, swap, 16 * PAGE_SIZE)
    pfns = f.get_pages()
    assert no_neighbours(pfns)
    data = random.Random(7).randbytes(16 * PAGE_SIZE)
    f.write(0, data)
    free_slots_top = swap._free.extents()[:16]
    assert f.writeout() == 16
    assert f._singles() == expand(free_slots_top)  # the slots on top, in hand-out order
    assert type(f._packed) is array  # kept as numbers, not as 16 one-page extents
    assert [f.page_state(i) for i in range(16)] == [("swapped", s) for s, _ in free_slots_top]
    assert alloc._free.extents()[:16] == [(p, 1) for p in pfns]  # first frame on top
    again = f.get_pages()
    assert again == pfns  # last freed, first handed out
    assert f.read(0, len(data)) == data
    f.release()
    alloc.free_pages(held_frames)
    swap.free_slots(held_slots)
    alloc.assert_no_leaks()
    swap.assert_no_leaks()


class FragmentedShmemMachine(ShmemExtentsMachine):
    """The extents machine's per-page model, on RAM and swap where every other frame and
    slot starts held, with files large enough (5 to 12 pages) for the page-by-page paths."""

    SIZES_HERE = (5, 6, 8, 12)

    def __init__(self) -> None:
        super().__init__()
        for f in self.files:
            f.release()
        nr = 64
        self.alloc = PageAllocator(
            PhysMem(bytearray(nr * PAGE_SIZE)), watermarks=(0, 0, 0), poison_on_free=True
        )
        self.swap = SwapDevice(nr)
        self.files = [ShmemFile(self.alloc, self.swap, n * PAGE_SIZE) for n in self.SIZES_HERE]
        self.pages = [[("unpopulated", None)] * n for n in self.SIZES_HERE]
        self.data = [bytearray(n * PAGE_SIZE) for n in self.SIZES_HERE]
        frames = self.alloc.alloc_pages(nr)
        self.alloc.free_pages(frames[::2])
        self.free_frames = frames[::2][::-1]
        self.hog = frames[1::2]
        slots = self.swap.alloc_slots(nr)
        self.swap.free_slots(slots[::2])
        self.free_slots = slots[::2][::-1]
        self.held_slots = slots[1::2]

    @rule()
    def free_a_held_slot(self) -> None:
        """Give back a held slot (a later write-out may get a run of two)."""
        if self.held_slots:
            slot = self.held_slots.pop()
            self.swap.free_slots([slot])
            self.free_slots.append(slot)

    def teardown(self) -> None:
        self.swap.free_slots(self.held_slots)
        self.held_slots = []
        super().teardown()


class FragmentedShmemMachinePythonCopy(FragmentedShmemMachine):
    """The same machine with the Python page copy (as GEMU_PAGECOPY=python runs)."""

    def __init__(self) -> None:
        self._native = extents.native_copy_pages
        extents.native_copy_pages = None
        super().__init__()

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            extents.native_copy_pages = self._native


_MACHINE = settings(
    derandomize=True, max_examples=60, stateful_step_count=40, deadline=None, database=None
)
TestFragmentedShmemMachine = FragmentedShmemMachine.TestCase
TestFragmentedShmemMachine.settings = _MACHINE
TestFragmentedShmemMachinePythonCopy = FragmentedShmemMachinePythonCopy.TestCase
TestFragmentedShmemMachinePythonCopy.settings = _MACHINE
