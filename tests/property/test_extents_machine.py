"""Extents against per-page reference models (Hypothesis).

The page allocator, the swap device and shmem files keep frames and slots as extents
(``gemu.guest.mm.extents``). These tests run random sequences of allocations, frees,
evictions and swap-ins against plain per-page models: a stack of single numbers for the free
lists, and one entry per page for a file. The extent forms must hand out the same numbers in
the same order (explore's schedules depend on which frames objects get), pair the same copies,
and keep the same per-page states.
"""

from __future__ import annotations

import random
from operator import sub

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gemu.guest.mm.extents import RunStack, expand, mark, paired_runs, runs_of
from gemu.guest.mm.page_alloc import GFP_KERNEL, PAGE_SIZE, PageAllocator, PhysMem
from gemu.guest.mm.shmem import ShmemFile
from gemu.guest.mm.swap import SwapDevice


def reference_paired_runs(firsts: list[int], seconds: list[int]) -> list[tuple[int, int, int]]:
    """The per-page pairing (one entry per page) that the extent form replaced."""
    n = len(firsts)
    if not n:
        return []
    a0, b0 = firsts[0], seconds[0]
    low = min(firsts)
    if max(firsts) - low == n - 1 and list(map(sub, firsts, seconds)).count(a0 - b0) == n:
        return [(low, low - (a0 - b0), n)]
    runs = []
    start_a, start_b, length = a0, b0, 1
    for a, b in zip(firsts[1:], seconds[1:], strict=True):
        if a == start_a + length and b == start_b + length:
            length += 1
        else:
            runs.append((start_a, start_b, length))
            start_a, start_b, length = a, b, 1
    runs.append((start_a, start_b, length))
    return runs


def _split(numbers: list[int], rnd: random.Random) -> list[tuple[int, int]]:
    """Extents of ``numbers``, maximal ones cut at random places (callers may hand those in)."""
    out = []
    for s, n in runs_of(numbers):
        while n > 1 and rnd.random() < 0.3:
            k = rnd.randint(1, n - 1)
            out.append((s, k))
            s, n = s + k, n - k
        out.append((s, n))
    return out


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_paired_runs_matches_the_per_page_pairing(data) -> None:
    """Paired extents are exactly the per-page pairing, also for batches whose runs come in
    any order and extents cut anywhere (one pairing per copy: the preemption points of a
    write-out follow it)."""
    n = data.draw(st.integers(1, 24))
    pool = data.draw(st.permutations(range(40)))
    firsts = list(pool[:n])
    if data.draw(st.booleans()):
        d = data.draw(st.integers(-5, 5))
        seconds = [x + d + 10 for x in firsts]
    else:
        seconds = list(data.draw(st.permutations(range(40)))[:n])
    if data.draw(st.booleans()):
        firsts.sort()
    rnd = random.Random(data.draw(st.integers(0, 1 << 16)))
    got = paired_runs(_split(firsts, rnd), _split(seconds, rnd))
    assert got == reference_paired_runs(firsts, seconds)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([0, 1, 2]), min_size=1, max_size=20),
    st.lists(st.tuples(st.integers(-2, 21), st.integers(1, 5)), max_size=6),
)
def test_mark_is_the_per_number_update(state, runs) -> None:
    """``mark`` sets every number of the extents or nothing, exactly as a per-number update
    that fails on a number out of range, in another state, or repeated."""
    state = bytearray(state)
    expect = bytearray(state)
    ok = True
    for s, n in runs:
        for p in range(s, s + n):
            if not 0 <= p < len(expect) or expect[p] != 1:
                ok = False
                break
            expect[p] = 2
        if not ok:
            break
    if not ok:
        expect = bytearray(state)
    assert mark(state, runs, 1, 2) is ok
    assert state == expect


class RunStackMachine(RuleBasedStateMachine):
    """A RunStack against a stack of single numbers (top = end of the list)."""

    def __init__(self) -> None:
        super().__init__()
        self.stack = RunStack(3, 30)
        self.ref = list(range(32, 2, -1))  # 3 on top
        self.out: list[int] = []  # taken off, not yet pushed back
        self.rnd = random.Random(0)

    @rule(nr=st.integers(1, 12))
    def pop(self, nr: int) -> None:
        nr = min(nr, len(self.ref))
        if not nr:
            return
        got = self.stack.pop(nr)
        expect = self.ref[len(self.ref) - nr :][::-1]
        del self.ref[len(self.ref) - nr :]
        assert expand(got) == expect
        assert got == runs_of(expect)  # adjacent extents joined
        self.out += expect

    @precondition(lambda self: self.out)
    @rule(data=st.data())
    def push(self, data) -> None:
        batch = data.draw(st.lists(st.sampled_from(self.out), unique=True, min_size=1))
        for p in batch:
            self.out.remove(p)
        self.stack.push(_split(batch, self.rnd))
        self.ref += batch[::-1]

    @rule(data=st.data())
    def remove_range(self, data) -> None:
        """alloc_contig's take: a range of numbers that are all on the stack."""
        on = set(self.ref)
        starts = [p for p in on if p + 1 in on] or sorted(on)
        if not starts:
            return
        start = data.draw(st.sampled_from(sorted(starts)))
        nr = 1
        while start + nr in on and nr < 4:
            nr += 1
        self.stack.remove(start, nr)
        self.ref = [p for p in self.ref if not start <= p < start + nr]
        self.out += range(start, start + nr)

    @invariant()
    def same_order(self) -> None:
        assert len(self.stack) == len(self.ref)
        assert expand(self.stack.extents()) == self.ref[::-1]


TestRunStackMachine = RunStackMachine.TestCase
TestRunStackMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


NR_FRAMES = 40
NR_SLOTS = 40
SIZES = [1, 3, 4, 6]


class ShmemExtentsMachine(RuleBasedStateMachine):
    """Allocator, swap and shmem files in extent form against a per-page model: a stack of
    frames, a stack of slots, one ``("resident", pfn) | ("swapped", slot) | ("unpopulated",
    None)`` entry per page, and the bytes each file holds."""

    def __init__(self) -> None:
        super().__init__()
        self.alloc = PageAllocator(
            PhysMem(bytearray(NR_FRAMES * PAGE_SIZE)), watermarks=(0, 0, 0), poison_on_free=True
        )
        self.swap = SwapDevice(NR_SLOTS)
        self.files = [ShmemFile(self.alloc, self.swap, n * PAGE_SIZE) for n in SIZES]
        self.free_frames = list(range(NR_FRAMES - 1, -1, -1))
        self.free_slots = list(range(NR_SLOTS - 1, -1, -1))
        self.pages = [[("unpopulated", None)] * n for n in SIZES]
        self.data = [bytearray(n * PAGE_SIZE) for n in SIZES]
        self.hog: list[int] = []
        self.rnd = random.Random(1)

    def _take(self, stack: list[int], nr: int) -> list[int]:
        got = stack[len(stack) - nr :][::-1]
        del stack[len(stack) - nr :]
        return got

    @rule(nr=st.integers(1, 6))
    def hog_frames(self, nr: int) -> None:
        """Take frames for something else (fragments what the files get next)."""
        if nr > len(self.free_frames):
            return
        got = self.alloc.alloc_pages(nr)
        assert got == self._take(self.free_frames, nr)
        self.hog += got

    @precondition(lambda self: self.hog)
    @rule(data=st.data())
    def free_hog(self, data) -> None:
        batch = data.draw(st.lists(st.sampled_from(self.hog), unique=True, min_size=1))
        for p in batch:
            self.hog.remove(p)
        self.alloc.free_pages(batch)
        self.free_frames += batch[::-1]

    @rule(i=st.integers(0, len(SIZES) - 1), seed=st.integers(0, 255))
    def get_pages_and_write(self, i: int, seed: int) -> None:
        """Swap in (or populate) a whole file, then write a stamp into it."""
        f, pages = self.files[i], self.pages[i]
        want = [j for j, (state, _) in enumerate(pages) if state != "resident"]
        if len(want) > len(self.free_frames):
            return
        pfns = f.get_pages(GFP_KERNEL)
        frames = self._take(self.free_frames, len(want))
        slots = [pages[j][1] for j in want if pages[j][0] == "swapped"]
        for j, pfn in zip(want, frames, strict=True):
            pages[j] = ("resident", pfn)
        self.free_slots += slots[::-1]
        assert pfns == [pfn for _, pfn in pages]
        stamp = bytes([seed]) * 100
        off = self.rnd.randrange(0, f.size - 100)
        f.write(off, stamp)
        self.data[i][off : off + 100] = stamp

    @rule(i=st.integers(0, len(SIZES) - 1), data=st.data())
    def get_page(self, i: int, data) -> None:
        """Fault in one page (a file in several states)."""
        f, pages = self.files[i], self.pages[i]
        j = data.draw(st.integers(0, len(pages) - 1))
        state, where = pages[j]
        if state != "resident" and not self.free_frames:
            return
        pfn = f.get_page(j)
        if state != "resident":
            (where2,) = self._take(self.free_frames, 1)
            if state == "swapped":
                self.free_slots.append(where)
            pages[j] = ("resident", where2)
        assert pfn == pages[j][1]

    @rule(i=st.integers(0, len(SIZES) - 1))
    def evict(self, i: int) -> None:
        f, pages = self.files[i], self.pages[i]
        resident = [j for j, (state, _) in enumerate(pages) if state == "resident"]
        if len(resident) > len(self.free_slots):
            return
        assert f.writeout() == len(resident)
        slots = self._take(self.free_slots, len(resident))
        frames = [pages[j][1] for j in resident]
        for j, slot in zip(resident, slots, strict=True):
            pages[j] = ("swapped", slot)
        self.free_frames += frames[::-1]
        for pfn in frames:  # poisoned on free
            assert self.alloc.physmem.read(pfn * PAGE_SIZE, 1) == b"\xaa"

    @rule(i=st.integers(0, len(SIZES) - 1))
    def truncate(self, i: int) -> None:
        f, pages = self.files[i], self.pages[i]
        frames = [w for s, w in pages if s == "resident"]
        slots = [w for s, w in pages if s == "swapped"]
        assert f.truncate() == len(frames)
        self.free_frames += frames[::-1]
        self.free_slots += slots[::-1]
        self.pages[i] = [("unpopulated", None)] * len(pages)
        self.data[i][:] = bytes(len(self.data[i]))

    @invariant()
    def same_pages(self) -> None:
        for f, pages in zip(self.files, self.pages, strict=True):
            assert [f.page_state(j) for j in range(f.nr_pages)] == pages
            assert f.resident_pages == sum(s == "resident" for s, _ in pages)
            assert f.swapped_pages == sum(s == "swapped" for s, _ in pages)
        assert expand(self.alloc._free.extents()) == self.free_frames[::-1]
        assert expand(self.swap._free.extents()) == self.free_slots[::-1]
        assert self.alloc.nr_free == len(self.free_frames)
        assert self.swap.nr_free_slots == len(self.free_slots)

    @invariant()
    def same_bytes(self) -> None:
        for f, pages, data in zip(self.files, self.pages, self.data, strict=True):
            if all(s == "resident" for s, _ in pages):
                assert f.read(0, f.size) == data

    def teardown(self) -> None:
        for f in self.files:
            f.release()
        self.alloc.free_pages(self.hog)
        self.alloc.assert_no_leaks()
        self.swap.assert_no_leaks()


TestShmemExtentsMachine = ShmemExtentsMachine.TestCase
TestShmemExtentsMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
