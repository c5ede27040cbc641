"""The MMU remembers ranges whose TLB entries form one physically contiguous run, so a COPY
that translates the same buffer again costs one lookup per window instead of one per page.
What it answers must be exactly what the TLB would answer page by page: a PTE changed without
an invalidation is not seen (the TLB holds the old one), and an invalidation, an AS UPDATE or
a TLB eviction makes the next access see the tables again."""

from __future__ import annotations

import pytest

from gemu.device.abi import packets as pk
from gemu.device.abi.enums import AccessType, MmuCommand
from gemu.device.abi.regs import PAGE_SIZE
from tests.support.device_rig import DATA, Rig

VA = 0x4000_0000
N = 64 * PAGE_SIZE
OTHER = DATA + 2 * N  # where the changed PTE points


def _setup(rig: Rig):
    pt = rig.address_space(1)
    pt.map(VA, DATA, N)
    mmu = rig.gpu.mmu
    assert mmu.translate_range(1, VA, N, AccessType.READ) == [(DATA, N)]  # fills the TLB
    assert mmu.translate_range(1, VA, N, AccessType.READ) == [(DATA, N)]  # remembered
    assert (VA >> 12, N >> 12) in mmu.spaces[1].runs
    pt.map(VA + 5 * PAGE_SIZE, OTHER, PAGE_SIZE)  # no invalidation yet
    return pt, mmu


def test_a_remembered_run_answers_as_the_tlb_does_and_counts_every_page():
    rig = Rig()
    _pt, mmu = _setup(rig)
    hits = mmu.hits
    assert mmu.translate_range(1, VA, N, AccessType.READ) == [(DATA, N)]  # stale, as the TLB
    assert mmu.hits - hits == N // PAGE_SIZE


@pytest.mark.parametrize("how", ["range", "all", "update"])
def test_an_invalidation_drops_the_run(how):
    rig = Rig()
    _pt, mmu = _setup(rig)
    if how == "range":
        mmu.invalidate(1, VA + 5 * PAGE_SIZE, PAGE_SIZE)
    elif how == "all":
        rig.mmu(1, MmuCommand.FLUSH_PT)
    else:
        rig.mmu(1, MmuCommand.UPDATE)
    assert mmu.translate_range(1, VA, N, AccessType.READ) == [
        (DATA, 5 * PAGE_SIZE),
        (OTHER, PAGE_SIZE),
        (DATA + 6 * PAGE_SIZE, N - 6 * PAGE_SIZE),
    ]


def test_a_tlb_eviction_drops_the_run():
    """Other pages filling a small TLB push the run's entries out; the next access walks."""
    rig = Rig(tlb_capacity=128)
    pt, mmu = _setup(rig)
    pt.map(VA + N, DATA + N, 128 * PAGE_SIZE)
    mmu.translate_range(1, VA + N, 128 * PAGE_SIZE, AccessType.READ)
    assert not mmu.spaces[1].runs or (VA >> 12, N >> 12) not in mmu.spaces[1].runs
    ext = mmu.translate_range(1, VA, N, AccessType.READ)
    assert (OTHER, PAGE_SIZE) in ext


def test_a_copy_through_a_remembered_run_moves_the_data():
    """Through packets: the second COPY over the same buffers uses the remembered runs."""
    rig = Rig()
    pt = rig.address_space(1)
    src, dst = DATA, DATA + N
    pt.map(VA, src, N)
    pt.map(VA + N, dst, N, write=True)
    rig.start_ring()
    for value in (1, 2):
        rig.buf[src : src + N] = bytes([value]) * N
        rig.run(pk.set_as(1), pk.copy(VA, VA + N, N))
        assert rig.buf[dst : dst + N] == bytes([value]) * N
    assert rig.gpu.mmu.spaces[1].runs
