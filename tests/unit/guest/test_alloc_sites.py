"""Every allocation is an allocation: the guest's allocation sites that do not go through the
page allocator (sg tables, fence arrays, job structures, reservation fence lists, drm_sched's
dependency table, drm_exec's object table) carry the kernel's might_alloc(gfp), so lockdep
sees them inside a fence signalling section and under locks reclaim takes."""

from __future__ import annotations

import pytest

from gemu.guest.dma_buf import dma_fence, dma_resv
from gemu.guest.drm import gem_shmem
from gemu.guest.kernel.runtime import Deterministic
from gemu.guest.locking import lockdep
from gemu.guest.locking.lockdep import LockdepError
from gemu.guest.mm.page_alloc import PAGE_SIZE
from tests.support.gem import locked, release_shmem_device, shmem_device


def in_section(fn):
    """Run ``fn`` inside an explicit signalling section in a strict deterministic run."""

    def main():
        cookie = lockdep.dma_fence_begin_signalling()
        try:
            fn()
        finally:
            lockdep.dma_fence_end_signalling(cookie)

    Deterministic(0, strict=True).run(main)


def test_building_an_sg_table_in_a_signalling_section_is_reported():
    """drm_gem_shmem_get_sg_table() builds the table with GFP_KERNEL (drm_prime_pages_to_sg):
    with the pages already resident and pinned there is no page allocation at all, yet the
    table's own allocation inside a signalling section is the signalling report. Outside a
    section it is fine."""
    holder = {}

    def setup_and_build(in_sec: bool):
        dev = shmem_device()
        obj = gem_shmem.create(dev, 2 * PAGE_SIZE)
        gem_shmem.pin(obj)
        holder["dev"], holder["obj"] = dev, obj
        with locked(obj):
            if in_sec:
                cookie = lockdep.dma_fence_begin_signalling()
                try:
                    gem_shmem.get_sg_table(obj)
                finally:
                    lockdep.dma_fence_end_signalling(cookie)
            else:
                assert list(gem_shmem.get_sg_table(obj).pfns) == list(obj.pages)
        gem_shmem.unpin(obj)
        gem_shmem.object_free(obj)
        release_shmem_device(dev)

    Deterministic(0, strict=True).run(setup_and_build, False)
    with pytest.raises(LockdepError, match="inside a dma_fence signalling") as info:
        Deterministic(0, strict=True).run(setup_and_build, True)
    assert info.value.report.kind == "signalling"
    assert any("get_sg_table" in s for s in info.value.report.stacks)


def test_creating_a_fence_array_in_a_signalling_section_is_reported():
    """dma_fence_array_create() allocates the array (GFP_KERNEL)."""

    def build():
        fences = [dma_fence.DmaFence(None, dma_fence.context_alloc(1), 1) for _ in range(2)]
        dma_fence.array_create(fences, dma_fence.context_alloc(1), 1)

    with pytest.raises(LockdepError, match="inside a dma_fence signalling") as info:
        in_section(build)
    assert any("array_create" in s for s in info.value.report.stacks)


def test_reserving_fence_slots_in_a_signalling_section_is_reported():
    """dma_resv_reserve_fences() grows the fence list with kmalloc (GFP_KERNEL)."""

    def reserve():
        obj = dma_resv.init()
        assert dma_resv.trylock(obj)  # a trylock is allowed in the section; the list is not
        try:
            dma_resv.reserve_fences(obj, 2)
        finally:
            dma_resv.unlock(obj)

    with pytest.raises(LockdepError, match=r"reclaimable allocation .* inside a dma_fence"):
        in_section(reserve)
