"""DOC: extents, the run-length form of frame and slot bookkeeping.

An *extent* is ``(start, length)``: the numbers ``start .. start + length - 1`` (frames of
guest RAM, slots of a swap device). The page allocator's free frames, the swap device's free
slots and a shmem file's frames or slots while the whole file is in one place are lists of
extents, so that allocating, freeing, checking and copying a GEM-sized object costs one
Python step per run of consecutive numbers, not one per page. Memory that comes in long runs
(the steady state after boot) moves in a few steps whatever its size; a fully fragmented
object (no two pages consecutive) costs what the per-page design cost.

:class:`RunStack` is a last-in-first-out free list kept as extents. Its order is exactly the
order of a stack of single numbers onto which each freed batch is pushed so that its first
number ends on top: :meth:`RunStack.pop` hands out the same numbers, in the same order, as
popping that per-number stack would. The allocators keep that order because explore's
schedules (and their pinned event logs) depend on which frames and slots objects get.

The per-number state (free, in use, reserved) stays a ``bytearray`` beside the stack: a whole
extent is checked with one ``bytearray.count`` and set with one slice assignment.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from itertools import accumulate, chain
from operator import add, eq, itemgetter

Extent = tuple[int, int]


def runs_of(numbers: Iterable[int]) -> list[Extent]:
    """Split ``numbers`` into runs of consecutive numbers: ``[(first, length), ...]`` in order."""
    runs: list[Extent] = []
    start = prev = None
    for p in numbers:
        if prev is not None and p == prev + 1:
            prev = p
            continue
        if start is not None:
            runs.append((start, prev - start + 1))
        start = prev = p
    if start is not None:
        runs.append((start, prev - start + 1))
    return runs


def expand(runs: Iterable[Extent]) -> list[int]:
    """Every number of ``runs``, in order (the inverse of :func:`runs_of`)."""
    return list(chain.from_iterable(range(s, s + n) for s, n in runs))


def total(runs: Iterable[Extent]) -> int:
    """How many numbers ``runs`` hold."""
    return sum(n for _, n in runs)


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
