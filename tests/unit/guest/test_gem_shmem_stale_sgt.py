"""A scatter-gather table lives exactly as long as the pages it lists. In the kernel, the sgt of
a shmem object is freed (and DMA-unmapped) with its pages by eviction, purge and the last put,
so reading one fetched before that is a use after free. The model reports the use itself,
naming the object and the call that freed its pages, instead of letting a GPU page table map
the freed frames."""

from __future__ import annotations

import re

import pytest

from gemu.guest.dma_buf import dma_resv
from gemu.guest.drm import gem, gem_shmem
from gemu.guest.drm.gem_shmem_shrinker import default_evict
from gemu.guest.errors import Efault, KernelWarning
from gemu.guest.locking import lockdep
from gemu.guest.mm.page_alloc import PAGE_SIZE
from gemu.host.machine import Machine
from tests.support.gem import assert_nothing_left, locked, release_shmem_device, shmem_device

FUNCS = gem_shmem.FUNCS.replace(evict=default_evict)
STALE = (KernelWarning, Efault)  # strict runs raise the warning, others Efault after counting it


@pytest.fixture
def dev():
    lockdep.reset()
    d = shmem_device(64, 32, poison_on_free=True)
    yield d
    release_shmem_device(d)
    assert_nothing_left(d)


def held_bo(dev, pages=2, madv=0):
    obj = gem_shmem.create(dev, pages * PAGE_SIZE, FUNCS)
    gem_shmem.get_pages(obj)
    if madv:
        gem_shmem.madvise(obj, madv)
    return obj


def drop(obj):
    if obj.pages_use_count:
        gem_shmem.put_pages(obj)
    gem.put(obj)


def table_of(obj):
    with locked(obj):
        gem_shmem.swapin_locked(obj)
        return gem_shmem.get_pages_sgt_locked(obj)


def label(obj) -> str:
    return obj.resv.lock.name


def test_table_fetched_before_eviction_is_stale_after_it(dev):
    """Every read of an sgt's segments after the object was evicted is reported with the
    object's name and the kernel function that freed the pages; a table fetched after the
    swap-in is valid and lists the new frames."""
    obj = held_bo(dev)
    sgt = table_of(obj)
    assert sgt.stale is None and len(sgt) == 2
    with locked(obj):
        gem.evict_locked(obj)
    assert obj.evicted
    msg = rf"stale sg table of {label(obj)}: .*drm_gem_shmem_evict_locked"
    for use in (lambda: sgt.pfns, sgt.dma_segments, lambda: sgt.nents, lambda: len(sgt)):
        with pytest.raises(STALE, match=msg):
            use()
    fresh = table_of(obj)
    assert fresh is not sgt and fresh.stale is None and len(fresh.pfns) == 2
    assert "drm_gem_shmem_evict_locked" in sgt.stale and "STALE" in repr(sgt)
    drop(obj)


def test_table_is_stale_after_purge_and_after_the_last_put(dev):
    """Purge and the last put free the pages too; so does it for an uncached table from
    drm_gem_shmem_get_sg_table()."""
    purged = held_bo(dev, madv=1)
    cached = table_of(purged)
    with locked(purged):
        gem_shmem.purge_locked(purged)
    with pytest.raises(STALE, match="drm_gem_shmem_purge_locked"):
        cached.dma_segments()

    put = held_bo(dev)
    with locked(put):
        uncached = gem_shmem.get_sg_table(put)
    gem_shmem.put_pages(put)
    with pytest.raises(STALE, match=rf"{label(put)}: its pages were freed by drm_gem_shmem_put"):
        uncached.pfns  # noqa: B018 - the read is the use being tested
    drop(purged)
    drop(put)


def test_pinned_and_imported_tables_stay_valid(dev):
    """A pinned object's table survives reclaim (the object is never evicted), and an
    imported table belongs to its exporter: neither is ever stale."""
    pinned = held_bo(dev)
    gem_shmem.pin(pinned)
    sgt = table_of(pinned)
    dev.allocator.direct_reclaim(64)
    assert not pinned.evicted and sgt.stale is None and len(sgt.pfns) == 2
    imported = gem_shmem.prime_import_sg_table(dev, gem_shmem.SgTable(sgt.pfns))
    assert imported.sgt.stale is None
    gem.put(imported)
    gem_shmem.unpin(pinned)
    drop(pinned)


@pytest.fixture
def machine():
    lockdep.reset()
    with Machine(ram_size=8 << 20, swap_size=16 << 20, device="inproc") as m:
        yield m


def test_driver_mapping_a_table_kept_across_an_unlock_is_reported(machine):
    """Through the driver: a table fetched while validating, kept after the reservation lock
    is dropped, is stale once the shrinker evicts the idle BO; mapping it into the GPU VM is
    reported at that point, naming the BO and the eviction (before, the VM silently mapped
    freed, poisoned frames). Re-validating (swap-in + a new table) maps the BO's data."""
    f = machine.open()
    h = f.create_bo(2 * PAGE_SIZE)
    va = f.vm_bind(h)
    f.write(h, 0, b"\x5a" * (2 * PAGE_SIZE))
    bo = f.bo(h)
    obj = bo.obj
    sgt = table_of(obj)  # validate, then (the bug) drop the lock without publishing a fence
    machine.reclaim(machine.allocator.totalram_pages)
    assert obj.evicted
    mapping = bo.mapping(f.vm)
    with locked(obj), pytest.raises(STALE) as exc:
        gem_shmem.swapin_locked(obj)
        f.vm.map_pages(va, [pfn << 12 for pfn in sgt.pfns], mapping.prot)
    assert re.search(
        rf"stale sg table of {label(obj)}: .*drm_gem_shmem_evict_locked", str(exc.value)
    )
    assert not mapping.mapped and f.vm.lookup(va) == 0
    assert f.read(h, 0, 8) == b"\x5a" * 8  # the data survived in swap; a fresh table maps it
    with locked(obj):
        dma_resv.assert_held(obj.resv)
        assert len(gem_shmem.get_pages_sgt_locked(obj).pfns) == 2
    f.close_bo(h)
    f.close()
    machine.check_clean()
