"""DOC: extents, the run-length form of frame and slot bookkeeping.

An *extent* is ``(start, length)``: the numbers ``start .. start + length - 1`` (frames of
guest RAM, slots of a swap device). The page allocator's free frames, the swap device's free
slots and a shmem file's frames or slots while the whole file is in one place are lists of
extents, so that allocating, freeing, checking and copying a GEM-sized object costs one
Python step per run of consecutive numbers, not one per page. Memory that comes in long runs
(the steady state after boot) moves in a few steps whatever its size. A fully fragmented
object (no two pages consecutive) has one extent per page; it is handled as a list of numbers
instead (:meth:`RunStack.pop_numbers`, :meth:`RunStack.push_singles`, :func:`mark_numbers`,
:func:`copy_page_views`), each step one list operation or one short loop over the batch.

:class:`RunStack` is a last-in-first-out free list kept as extents. Its order is exactly the
order of a stack of single numbers onto which each freed batch is pushed so that its first
number ends on top: :meth:`RunStack.pop` hands out the same numbers, in the same order, as
popping that per-number stack would. The allocators keep that order because explore's
schedules (and their pinned event logs) depend on which frames and slots objects get.

The per-number state (free, in use, reserved) stays a ``bytearray`` beside the stack: a whole
extent is checked with one ``bytearray.count`` and set with one slice assignment.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Sequence
from itertools import accumulate, chain, compress, repeat
from operator import add, eq, itemgetter, ne, setitem, sub

Extent = tuple[int, int]

try:
    from gemu.guest.mm._pagecopy import copy_pages as native_copy_pages
except ImportError:  # built without a C compiler: copy_page_views does every copy
    native_copy_pages = None
if os.environ.get("GEMU_PAGECOPY") == "python":  # the Python copy, to compare or to debug
    native_copy_pages = None
"""``copy_pages(dst, dst_pages, src, src_pages, shift)`` from ``_pagecopy.c``: page
``src_pages[i]`` of the buffer ``src`` to page ``dst_pages[i]`` of ``dst``, in C, every page
number checked against both buffers before anything is copied; or None where the module is not
built or ``GEMU_PAGECOPY=python`` is set, and :func:`copy_page_views` copies instead."""
_LENGTH = itemgetter(1)


def runs_of(numbers: Iterable[int]) -> list[Extent]:
    """Split ``numbers`` into runs of consecutive numbers: ``[(first, length), ...]`` in order.

    The runs are found with C-level iteration (the differences of neighbours, the places
    where one is not 1), not a Python step per number: a fully fragmented batch is one
    run per number, and this is called on every such batch.
    """
    nums = numbers if isinstance(numbers, list) else list(numbers)
    n = len(nums)
    if n <= 1:
        return [(nums[0], 1)] if n else []
    # index of the first number of every run, then one past the last
    bounds = [0, *compress(range(1, n), map(ne, map(sub, nums[1:], nums), repeat(1))), n]
    if len(bounds) == n + 1:  # no two neighbours consecutive: all single numbers
        return list(zip(nums, repeat(1)))
    return list(zip(map(nums.__getitem__, bounds[:-1]), map(sub, bounds[1:], bounds)))


def no_neighbours(numbers: Sequence[int]) -> bool:
    """Whether no two neighbours of ``numbers`` are consecutive (``b == a + 1``): each is a
    run of its own, the fully fragmented case."""
    return 1 not in map(sub, numbers[1:], numbers)


def expand(runs: Iterable[Extent]) -> list[int]:
    """Every number of ``runs``, in order (the inverse of :func:`runs_of`)."""
    runs = runs if isinstance(runs, list) else list(runs)
    if len(runs) == 1:  # a whole object in one run
        s, n = runs[0]
        return list(range(s, s + n))
    if not runs:
        return []
    starts, lens = zip(*runs)
    if lens.count(1) == len(lens):  # all single numbers
        return list(starts)
    return list(chain.from_iterable(map(range, starts, map(add, starts, lens))))


def singles(runs: Sequence[Extent]) -> list[int] | None:
    """The numbers of ``runs`` if every extent is one number long (a fragmented batch),
    else None."""
    if not runs:
        return []
    starts, lens = zip(*runs)
    if lens.count(1) == len(lens):
        return list(starts)
    return None


def set_numbers(state: bytearray, numbers: Iterable[int], new: int) -> None:
    """``state[i] = new`` for every ``i`` of ``numbers`` (the caller checked them).

    A plain loop: for the batches of a few dozen numbers a GEM object brings, it is about
    three times faster than ``deque(map(state.__setitem__, ...))``, whose calls go through
    the method wrapper (timeit, 16 numbers: 0.32 vs 1.03 us)."""
    for i in numbers:
        state[i] = new


def set_states(state: bytearray, runs: Sequence[Extent], new: int) -> None:
    """``state[i] = new`` for every number of ``runs`` (the caller checked them): one slice
    per extent, or for extents of one number each, one C-level pass over the numbers."""
    if len(runs) > 4 and (numbers := singles(runs)) is not None:
        set_numbers(state, numbers, new)
        return
    fill = bytes((new,))
    for s, n in runs:
        if n == 1:
            state[s] = new
        else:
            state[s : s + n] = fill * n


PAGE_VIEWS_MAX = 1 << 18
"""Most pages :func:`page_views` cuts up front (1 GiB of 4 KiB pages, 48 MiB of views)."""


def page_views(buf: memoryview, shift: int) -> Sequence[memoryview]:
    """A view of every whole page of ``buf`` (pages of ``1 << shift`` bytes), indexed by page
    number: a list made in C-level passes, about 0.1 us and 192 bytes per page. A buffer of
    more than :data:`PAGE_VIEWS_MAX` pages gets :class:`LazyPageViews` instead, which makes
    each view when it is asked for: the memory stays bounded, and a copy between such views
    costs about 5% more (two Python calls per page; timeit, 64 KiB objects)."""
    size = 1 << shift
    nr = len(buf) >> shift
    if nr > PAGE_VIEWS_MAX:
        return LazyPageViews(buf, shift)
    end = nr << shift
    return list(map(buf.__getitem__, map(slice, range(0, end, size), range(size, end + 1, size))))


class LazyPageViews:
    """The page views of a large buffer (:func:`page_views`), each made on demand; an index
    outside the whole pages raises IndexError, as the list's would (a negative one too)."""

    __slots__ = ("_buf", "_nr", "_shift")

    def __init__(self, buf: memoryview, shift: int) -> None:
        self._buf = buf
        self._shift = shift
        self._nr = len(buf) >> shift

    def __len__(self) -> int:
        return self._nr

    def __getitem__(self, page: int) -> memoryview:
        if not 0 <= page < self._nr:
            raise IndexError(f"page {page} outside {self._nr} pages")
        start = page << self._shift
        return self._buf[start : start + (1 << self._shift)]


_WHOLE = slice(None)
_consume = deque(maxlen=0).extend


def copy_page_views(
    dst_views: Sequence[memoryview],
    dst_pages: Sequence[int],
    src_views: Sequence[memoryview],
    src_pages: Sequence[int],
) -> None:
    """Copy page ``src_pages[i]`` to page ``dst_pages[i]`` for every ``i``, in order, between
    buffers cut into page views (:func:`page_views`); the caller checked that every page
    number is in range and not negative (an index from the end would name another page) and
    that the lists have the same length.

    The views are picked with one ``itemgetter`` call per side and each copy is one
    ``setitem``, all C-level, with no slice or view object made per page: 0.88 us per
    scattered 4 KiB page here (timeit, memfd RAM), against 1.00 us for a plain loop of
    ``dst[d : d + size] = src[s : s + size]`` and 1.23 us for a C-level ``map`` making those
    slices and views."""
    n = len(dst_pages)
    if n == 1:
        dst_views[dst_pages[0]][:] = src_views[src_pages[0]]
    elif n:
        dst = itemgetter(*dst_pages)(dst_views)
        _consume(map(setitem, dst, repeat(_WHOLE, n), itemgetter(*src_pages)(src_views)))


def total(runs: Iterable[Extent]) -> int:
    """How many numbers ``runs`` hold."""
    return sum(map(_LENGTH, runs))


def cut(runs: Sequence[Extent], pos: int, nr: int) -> list[Extent]:
    """The extents of numbers ``pos .. pos + nr - 1`` of the sequence ``runs`` describes."""
    out: list[Extent] = []
    off = 0
    end = pos + nr
    for s, n in runs:
        if off + n > pos:
            lo, hi = max(pos, off), min(end, off + n)
            out.append((s + lo - off, hi - lo))
            if off + n >= end:
                break
        off += n
    return out


def paired_runs(a: Sequence[Extent], b: Sequence[Extent]) -> list[tuple[int, int, int]]:
    """Runs where two sequences of the same length count up by one together:
    ``[(first_a, first_b, length), ...]``, each as long as it can be.

    Both sequences hold distinct numbers (a frame or a slot has one owner). If every pair has
    the same difference and the numbers of ``a`` fill a range, the whole batch is one copy
    whatever the order of the runs: number ``x`` of ``a`` goes with ``x - d`` of ``b``.
    """
    if len(a) == len(b) and a:
        # Same run lengths (both sides allocated alike): pair the extents as they are, unless
        # a pair continues the one before (the runs are usually maximal). One loop: it is the
        # cheapest form for a batch of single pages, the fragmented case.
        out = []
        d = a[0][0] - b[0][0]
        same = True
        px = py = -(1 << 62)
        pk = 0
        for (x, k), (y, kb) in zip(a, b):
            if k != kb or (x == px + pk and y == py + pk):
                break
            if same and x - y != d:
                same = False
            out.append((x, y, k))
            px, py, pk = x, y, k
        else:
            return _one_copy(out) if same else out
    out = []
    bi = 0
    boff = 0
    for sa, na in a:
        aoff = 0
        while aoff < na:
            sb, nb = b[bi]
            k = min(na - aoff, nb - boff)
            x, y = sa + aoff, sb + boff
            if out and (last := out[-1])[0] + last[2] == x and last[1] + last[2] == y:
                out[-1] = (last[0], last[1], last[2] + k)
            else:
                out.append((x, y, k))
            aoff += k
            boff += k
            if boff == nb:
                bi, boff = bi + 1, 0
    return _one_copy(out)


def _one_copy(out: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """``out`` as one pair when every pair has the same difference and the firsts fill a
    range (then the whole batch is one copy whatever the order of its pairs)."""
    if len(out) > 1:
        d = out[0][0] - out[0][1]
        if [x - y for x, y, _ in out].count(d) == len(out):
            # the firsts are disjoint runs: the highest starting one ends highest
            low = min(out)[0]
            hx, _, hk = max(out)
            nr = sum(map(itemgetter(2), out))
            if hx + hk - low == nr:
                return [(low, low - d, nr)]
    return out


class RunStack:
    """A last-in-first-out free list of numbers, kept as extents.

    ``starts[i], lens[i]`` is one extent; the top of the stack is the last one, and within an
    extent ``start`` is handed out first. ``nr`` is how many numbers the stack holds.
    """

    __slots__ = ("lens", "nr", "starts")

    def __init__(self, first: int = 0, count: int = 0) -> None:
        # Two lists rather than arrays: a stack of single frames (a fragmented zone) is
        # pushed and popped an extent at a time, and lists do that about 1.6x faster.
        self.starts: list[int] = []
        self.lens: list[int] = []
        self.nr = 0
        if count > 0:
            self.starts.append(first)
            self.lens.append(count)
            self.nr = count

    def __len__(self) -> int:
        return self.nr

    def __repr__(self) -> str:
        return f"<RunStack {self.nr} in {len(self.starts)} extents>"

    def extents(self) -> list[Extent]:
        """The extents from the top down (the order :meth:`pop` hands them out)."""
        return list(zip(reversed(self.starts), reversed(self.lens)))

    def push(self, runs: Sequence[Extent]) -> None:
        """Push ``runs`` so that the first number of ``runs[0]`` is on top (handed out first).

        An extent that ends where the top one starts joins it. Joining only saves room: the
        order numbers are handed out in is the same either way, so only the junction with
        the old top is looked at and the rest goes on in one step.
        """
        if not runs:
            return
        starts, lens = self.starts, self.lens
        if len(runs) == 1:  # one run: joins the old top or goes on it
            s, n = runs[0]
            if starts and s + n == starts[-1]:
                starts[-1] = s
                lens[-1] += n
            else:
                starts.append(s)
                lens.append(n)
            self.nr += n
            return
        ss, ns = zip(*reversed(runs))
        s, n = ss[0], ns[0]
        if starts and s + n == starts[-1]:
            starts[-1] = s
            lens[-1] += n
            starts.extend(ss[1:])
            lens.extend(ns[1:])
        else:
            starts.extend(ss)
            lens.extend(ns)
        self.nr += sum(ns)

    def pop(self, nr: int) -> list[Extent]:
        """Take ``nr`` numbers off the top (the caller checked ``nr <= len(self)``), as
        extents in hand-out order, adjacent extents joined."""
        starts, lens = self.starts, self.lens
        self.nr -= nr
        top = lens[-1]
        if top >= nr:
            s = starts[-1]
            if top > nr:
                starts[-1] = s + nr
                lens[-1] = top - nr
            else:
                starts.pop()
                lens.pop()
            return [(s, nr)]
        # At most nr extents are needed: find how many from the running sums, in one step.
        tail = lens[-nr:]
        tail.reverse()
        k = bisect_left(list(accumulate(tail)), nr) + 1
        ss, ls = starts[-k:], lens[-k:]
        del starts[-k:], lens[-k:]
        ss.reverse()
        ls.reverse()
        over = sum(ls) - nr
        if over:  # the last extent taken is split: its tail stays on top
            ls[-1] -= over
            starts.append(ss[-1] + ls[-1])
            lens.append(over)
        out = list(zip(ss, ls))
        if any(map(eq, map(add, ss, ls), ss[1:])):
            joined = [out[0]]
            for x, n in out[1:]:
                if joined[-1][0] + joined[-1][1] == x:
                    joined[-1] = (joined[-1][0], joined[-1][1] + n)
                else:
                    joined.append((x, n))
            return joined
        return out

    def pop_numbers(self, nr: int) -> list[int]:
        """:meth:`pop` as every number taken, in hand-out order. When the top ``nr`` extents
        are single numbers (a fragmented free list) they are taken in one slice."""
        lens = self.lens
        if len(lens) >= nr and lens[-nr:].count(1) == nr:
            starts = self.starts
            out = starts[-nr:]
            del starts[-nr:], lens[-nr:]
            out.reverse()
            self.nr -= nr
            return out
        return expand(self.pop(nr))

    def push_singles(self, numbers: Sequence[int]) -> None:
        """:meth:`push` of numbers as extents of one each: ``numbers[0]`` is handed out
        first, in one step per list. Meant for numbers no two of which are consecutive
        neighbours (a fragmented batch); neighbours that are stay two extents, which costs
        room but not order (:meth:`pop` and :meth:`pop_numbers` hand them out the same)."""
        if not numbers:
            return
        starts, lens = self.starts, self.lens
        last = numbers[-1]  # goes on first, onto the old top
        if starts and last + 1 == starts[-1]:  # and joins it
            starts[-1] = last
            lens[-1] += 1
            starts.extend(reversed(numbers[:-1]))
            lens.extend(repeat(1, len(numbers) - 1))
        else:
            starts.extend(reversed(numbers))
            lens.extend(repeat(1, len(numbers)))
        self.nr += len(numbers)

    def remove(self, start: int, nr: int) -> None:
        """Take the numbers ``start .. start + nr - 1`` out of the stack wherever they are
        (the caller checked that every one of them is on it); the others keep their order."""
        end = start + nr
        starts: list[int] = []
        lens: list[int] = []
        for s, n in zip(self.starts, self.lens):
            e = s + n
            if e <= start or s >= end:
                starts.append(s)
                lens.append(n)
                continue
            # the lower piece is handed out first, so it goes nearer the top
            if e > end:
                starts.append(end)
                lens.append(e - end)
            if s < start:
                starts.append(s)
                lens.append(start - s)
        self.starts, self.lens = starts, lens
        self.nr -= nr


def mark(state: bytearray, runs: Sequence[Extent], old: int, new: int) -> bool:
    """Set ``state[i] = new`` for every number of ``runs`` if each is in range and ``old``
    (a number repeated within ``runs`` fails too); all or nothing. Returns whether it did."""
    if len(runs) > 4 and (numbers := singles(runs)) is not None:
        return mark_numbers(state, numbers, old, new)
    limit = len(state)
    count = state.count
    fill = bytes((new,))
    for i, (s, n) in enumerate(runs):
        if n == 1:
            if 0 <= s < limit and state[s] == old:
                state[s] = new
                continue
        elif n > 1 and s >= 0 and s + n <= limit and count(old, s, s + n) == n:
            state[s : s + n] = fill * n
            continue
        for s2, n2 in runs[:i]:
            state[s2 : s2 + n2] = bytes((old,)) * n2
        return False
    return True


def mark_numbers(state: bytearray, numbers: Sequence[int], old: int, new: int) -> bool:
    """:func:`mark` of single numbers (``old != new``): every number in range, each in state
    ``old``, none repeated; all or nothing.

    One loop that checks each number as it sets it: a repeated number finds its own
    ``new`` the second time, and a failure puts back what the loop had set (timeit, 16
    numbers: 1.07 us, against 1.27 for reading every state with ``itemgetter`` and finding
    repeats with a ``set`` first)."""
    if not numbers:
        return True
    done = 0
    try:
        if min(numbers) < 0:  # an index from the end would name another number
            return False
        for i in numbers:
            if state[i] != old:
                break
            state[i] = new
            done += 1
        else:
            return True
    except (IndexError, TypeError):
        pass
    for i in numbers[:done]:
        state[i] = old
    return False
