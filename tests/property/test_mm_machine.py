"""A Hypothesis state machine over guest memory: several shmem files under memory pressure,
with a shrinker that evicts them to a small, sometimes failing swap device.

Random writes, get_pages, writeouts, truncates, frame hogging and injected swap errors are
checked against a plain model (the bytes each file must hold) and against conservation: every
frame in use belongs to exactly one resident page or to the hog, every used slot to exactly one
swapped page, and nothing leaks at the end.
"""

from __future__ import annotations

import contextlib

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gemu.guest.errors import Efault, Eio, Enomem, Enospc
from gemu.guest.mm.page_alloc import (
    GFP_KERNEL,
    GFP_NOWAIT,
    PAGE_SIZE,
    Gfp,
    PageAllocator,
    PhysMem,
)
from gemu.guest.mm.shmem import ShmemFile
from gemu.guest.mm.shrinker import SHRINK_EMPTY, SHRINK_STOP, Shrinker
from gemu.guest.mm.swap import SwapDevice

SIZES = [1, 2, 3, 5, 6]  # pages per file: 17 pages in all
NR_FRAMES = 24
NR_SLOTS = 14
FILES = st.integers(0, len(SIZES) - 1)


class MmMachine(RuleBasedStateMachine):
    """The model is ``ref[i]``, the bytes file ``i`` must hold. A file's contents change only
    by write and truncate, whatever reclaim, swap errors and allocation failures do."""

    def __init__(self) -> None:
        super().__init__()
        self.alloc = PageAllocator(PhysMem(bytearray(NR_FRAMES * PAGE_SIZE)), watermarks=(2, 3, 4))
        self.swap = SwapDevice(NR_SLOTS)
        self.files = [
            ShmemFile(self.alloc, self.swap, n * PAGE_SIZE, name=f"f{i}")
            for i, n in enumerate(SIZES)
        ]
        self.ref = [bytearray(f.size) for f in self.files]
        self.hog: list[int] = []
        self.busy: int | None = None  # the file whose get_pages runs (the shrinker skips it)
        self.alloc.register_shrinker(Shrinker("files", self._count, self._scan))

    # The shrinker: evict whole files in index order, like the GEM shrinker's LRU walk.

    def _count(self, sc) -> int:
        n = sum(f.resident_pages for i, f in enumerate(self.files) if i != self.busy)
        return n or SHRINK_EMPTY

    def _scan(self, sc) -> int:
        freed = 0
        for i, f in enumerate(self.files):
            if freed >= sc.nr_to_scan:
                break
            if i == self.busy or not f.resident_pages:
                continue
            try:
                freed += f.writeout()
            except (Enospc, Eio):
                continue
        return freed or SHRINK_STOP

    def _counts(self, i: int) -> tuple[int, int]:
        f = self.files[i]
        return f.resident_pages, f.swapped_pages

    def _check_contents(self, i: int) -> None:
        f = self.files[i]
        assert f.read(0, f.size) == self.ref[i], f"{f.name} lost or corrupted data"

    # Rules.

    @rule(i=FILES, nowait=st.booleans())
    def get_pages(self, i: int, nowait: bool) -> None:
        before = self._counts(i)
        self.busy = i
        try:
            pfns = self.files[i].get_pages(GFP_NOWAIT if nowait else GFP_KERNEL)
        except (Enomem, Eio):
            assert self._counts(i) == before, "a failed get_pages changed the file"
            return
        finally:
            self.busy = None
        assert all(self.alloc.is_allocated(p) for p in pfns)
        self._check_contents(i)

    @rule(i=FILES, page=st.integers(0, max(SIZES) - 1))
    def get_page(self, i: int, page: int) -> None:
        f = self.files[i]
        page %= f.nr_pages
        self.busy = i
        try:
            pfn = f.get_page(page)
        except (Enomem, Eio):
            return
        finally:
            self.busy = None
        assert f.page_state(page) == ("resident", pfn)
        offset = page * PAGE_SIZE
        assert f.read(offset, PAGE_SIZE) == self.ref[i][offset : offset + PAGE_SIZE]

    @rule(
        i=FILES,
        offset=st.integers(0, max(SIZES) * PAGE_SIZE - 1),
        data=st.binary(min_size=1, max_size=300),
    )
    def write(self, i: int, offset: int, data: bytes) -> None:
        f = self.files[i]
        offset %= f.size
        data = data[: f.size - offset]
        first, last = offset // PAGE_SIZE, (offset + len(data) - 1) // PAGE_SIZE
        resident = all(f.page_state(p)[0] == "resident" for p in range(first, last + 1))
        try:
            f.write(offset, data)
        except Efault:
            assert not resident
            return
        assert resident
        self.ref[i][offset : offset + len(data)] = data

    @rule(i=FILES)
    def writeout(self, i: int) -> None:
        f = self.files[i]
        before = self._counts(i)
        try:
            freed = f.writeout()
        except (Enospc, Eio):
            assert self._counts(i) == before, "a failed writeout changed the file"
            return
        assert freed == before[0]
        assert f.resident_pages == 0 and f.swapped_pages == before[0] + before[1]

    @rule(i=FILES)
    def truncate(self, i: int) -> None:
        self.files[i].truncate()
        self.ref[i][:] = bytes(len(self.ref[i]))

    @rule(n=st.integers(1, 8))
    def hog_frames(self, n: int) -> None:
        with contextlib.suppress(Enomem):
            self.hog += self.alloc.alloc_pages(n, GFP_KERNEL | Gfp.NOWARN)

    @precondition(lambda self: self.hog)
    @rule(n=st.integers(1, 8))
    def free_frames(self, n: int) -> None:
        victims, self.hog = self.hog[:n], self.hog[n:]
        self.alloc.free_pages(victims)

    @rule(read=st.integers(0, 2), write=st.integers(0, 2), rate=st.sampled_from([0.0, 0.2]))
    def swap_errors(self, read: int, write: int, rate: float) -> None:
        self.swap.inject(read_errors=read, write_errors=write, rate=rate, seed=read * 3 + write)

    # Invariants.

    @invariant()
    def frames_are_conserved(self) -> None:
        resident = [
            f.page_state(j)[1]
            for f in self.files
            for j in range(f.nr_pages)
            if f.page_state(j)[0] == "resident"
        ]
        owned = resident + self.hog
        assert len(set(owned)) == len(owned), "a frame is owned twice"
        assert self.alloc.nr_used == len(owned), "frame accounting differs from the owners"
        assert all(self.alloc.is_allocated(p) for p in owned)
        assert sum(f.resident_pages for f in self.files) == len(resident)

    @invariant()
    def slots_are_conserved(self) -> None:
        slots = [
            f.page_state(j)[1]
            for f in self.files
            for j in range(f.nr_pages)
            if f.page_state(j)[0] == "swapped"
        ]
        assert len(set(slots)) == len(slots), "a slot is owned twice"
        assert self.swap.nr_used_slots == len(slots) == sum(f.swapped_pages for f in self.files)

    def teardown(self) -> None:
        """With the hog gone and swap healthy, every file comes back intact; then nothing
        may be left allocated."""
        self.swap.inject()
        self.alloc.free_pages(self.hog)
        for i, f in enumerate(self.files):
            self.busy = i
            f.get_pages()
            self._check_contents(i)
            f.release()
        self.alloc.assert_no_leaks()
        self.swap.assert_no_leaks()


MmMachine.TestCase.settings = settings(
    derandomize=True, max_examples=200, stateful_step_count=50, deadline=None
)
TestMmMachine = MmMachine.TestCase
