"""Purge and the fake mmap offset, as drm_gem_shmem_purge_locked() does them: the offset is
freed (drm_gem_free_mmap_offset: a new mmap of the object finds nothing), mappings made before
SIGBUS, and v19 skips the CPU-mapping zap (drm_vma_node_unmap) for an evicted object, whose
eviction already zapped them (drm_gem_shmem_shrinker_put_pages_locked returns early)."""

from __future__ import annotations

import pytest

from gemu.guest.drm import gem, gem_shmem
from gemu.guest.drm.gem_shmem_shrinker import default_evict
from gemu.guest.errors import Einval
from gemu.guest.kernel import trace
from gemu.guest.locking import lockdep
from gemu.guest.mm.page_alloc import PAGE_SIZE
from tests.support.gem import assert_nothing_left, locked, release_shmem_device, shmem_device

FUNCS = gem_shmem.FUNCS.replace(evict=default_evict)


@pytest.fixture(params=["v19", "mainline"])
def dev(request):
    lockdep.reset()
    d = shmem_device(64, 32, semantics=request.param)
    yield d
    release_shmem_device(d)
    assert_nothing_left(d)


@pytest.fixture
def zaps():
    """The objects whose CPU mappings were zapped (drm_vma_node_unmap), in order."""
    seen: list[str] = []

    def record(ev):
        if (ev.category, ev.name) == ("gem", "vma_node_unmap"):
            seen.append(ev.args["obj"])

    trace.subscribe(record)
    yield seen
    trace.unsubscribe(record)


def purgeable(dev, pages=2):
    obj = gem_shmem.create(dev, pages * PAGE_SIZE, FUNCS)
    with locked(obj):
        if dev.v19:
            gem_shmem.get_pages_locked(obj)
        gem_shmem.get_pages_sgt_locked(obj)  # mainline: takes the page reference, and
        # its purgeable test needs the table
        gem_shmem.madvise_locked(obj, 1)
    return obj


def drop(obj):
    if obj.pages_use_count and obj.dev.v19:
        gem_shmem.put_pages(obj)
    gem.put(obj)


def test_objects_get_an_offset_and_mmap_finds_them_by_it(dev):
    """Every shmem object gets a fake offset at creation (__drm_gem_shmem_create); mmap of
    that offset maps the object; an unknown or misaligned offset is -EINVAL; freeing the
    object frees the offset."""
    obj = purgeable(dev)
    offset = gem.mmap_offset(obj)
    assert offset >= gem.DRM_FILE_PAGE_OFFSET_START * PAGE_SIZE
    vma = gem.mmap(dev, offset)
    vma.write(0, b"gemu")
    assert vma.read(0, 4) == b"gemu"
    with pytest.raises(Einval, match="no GEM object at mmap offset"):
        gem.mmap(dev, offset + 123)
    with pytest.raises(Einval, match="no GEM object at mmap offset"):
        gem.mmap(dev, 0x1000)
    gem_shmem.vm_close(vma)
    drop(obj)
    assert gem.mmap_offset(obj) == 0 and len(dev.vma_offset_manager) == 0


def test_purge_frees_the_mmap_offset(dev):
    """After a purge the object's offset is gone: a new mmap of it fails with -EINVAL, while
    a mapping made before stays and SIGBUSes; the purge zapped that mapping."""
    obj = purgeable(dev)
    offset = gem.mmap_offset(obj)
    vma = gem.mmap(dev, offset)
    assert vma.read(0, 4) == b"\0\0\0\0"
    with locked(obj):
        gem_shmem.purge_locked(obj)
    assert obj.madv < 0 and gem.mmap_offset(obj) == 0
    assert offset >> 12 not in dev.vma_offset_manager
    with pytest.raises(Einval, match=f"no GEM object at mmap offset {offset:#x}"):
        gem.mmap(dev, offset)
    assert vma.ptes == {}
    with pytest.raises(gem_shmem.SigBus, match="purged"):
        vma.read(0, 4)
    gem_shmem.vm_close(vma)
    drop(obj)


def test_v19_purge_skips_the_zap_of_an_evicted_object(dev, zaps):
    """v19: purging a resident object zaps its CPU mappings; purging an evicted one does not
    (its eviction did). Mainline has no eviction here and always zaps."""
    resident = purgeable(dev)
    with locked(resident):
        gem_shmem.purge_locked(resident)
    assert zaps == [resident.resv.lock.name]
    if not dev.v19:
        drop(resident)
        return
    evicted = gem_shmem.create(dev, 2 * PAGE_SIZE, FUNCS)
    gem_shmem.get_pages(evicted)
    with locked(evicted):
        gem_shmem.evict_locked(evicted)
        assert zaps[-1] == evicted.resv.lock.name
        zaps.clear()
        gem_shmem.madvise_locked(evicted, 1)
        gem_shmem.purge_locked(evicted)
    assert zaps == [] and evicted.madv < 0 and not evicted.evicted
    assert gem.mmap_offset(evicted) == 0
    drop(resident)
    drop(evicted)
