"""GEM objects: reference counting, handles, and the idle check of evict_locked."""

from __future__ import annotations

import pytest

from gemu.guest.dma_buf import dma_fence, dma_resv
from gemu.guest.dma_buf.dma_resv import DmaResvUsage
from gemu.guest.drm import gem, gem_shmem
from gemu.guest.errors import Ebusy, Einval, KernelWarning
from gemu.guest.kernel import runtime
from gemu.guest.locking import lockdep
from gemu.guest.locking.lockdep import LockdepError
from gemu.guest.mm.page_alloc import PAGE_SIZE, PageAllocator, PhysMem
from gemu.guest.mm.swap import SwapDevice
from tests.support.gem import fence_on, locked


@pytest.fixture
def mem():
    """A 64-frame guest with 32 swap slots; no frame or slot may leak."""
    lockdep.reset()
    alloc = PageAllocator(PhysMem(bytearray(64 * PAGE_SIZE)), watermarks=(0, 0, 0))
    swap = SwapDevice(32)
    yield alloc, swap
    alloc.assert_no_leaks()
    swap.assert_no_leaks()
    assert not runtime.current().held_locks
    assert not lockdep.reports()


@pytest.fixture
def dev(mem):
    d = gem.DrmDevice(*mem)
    yield d
    assert d.object_count == 0 and not d.leaked


class Recorder:
    """Object callbacks that record what ran."""

    def __init__(self) -> None:
        self.freed: list[gem.DrmGemObject] = []
        self.evicted: list[gem.DrmGemObject] = []

    def free(self, obj: gem.DrmGemObject) -> None:
        self.freed.append(obj)
        gem.object_release(obj)

    def evict(self, obj: gem.DrmGemObject) -> None:
        self.evicted.append(obj)

    def funcs(self) -> gem.DrmGemObjectFuncs:
        return gem.DrmGemObjectFuncs(free=self.free, evict=self.evict)


def new_object(dev: gem.DrmDevice, rec: Recorder, pages: int = 1) -> gem.DrmGemObject:
    obj = gem.DrmGemObject()
    gem.object_init(dev, obj, pages * PAGE_SIZE)
    obj.funcs = rec.funcs()
    return obj


def test_device_rejects_unknown_semantics(mem):
    """Only the two modelled helper versions can be chosen."""
    with pytest.raises(ValueError, match="semantics"):
        gem.DrmDevice(*mem, semantics="v20")
    assert gem.DrmDevice(*mem, semantics="mainline").semantics == "mainline"


def test_object_init_gives_one_reference_and_a_shmem_file(dev):
    """A new object has one reference, its own unlocked resv, a shmem file of its size and no
    LRU; the last put calls free exactly once."""
    rec = Recorder()
    obj = new_object(dev, rec, pages=3)
    assert (obj.refcount, obj.handle_count, obj.size, obj.npages) == (1, 0, 3 * PAGE_SIZE, 3)
    assert obj.filp.nr_pages == 3 and obj.lru is None and obj.base is obj
    assert not dma_resv.is_locked(obj.resv)
    gem.get(obj)
    gem.put(obj)
    assert rec.freed == []
    gem.put(obj)
    assert rec.freed == [obj] and dev.object_count == 0 and obj.filp is None


def test_object_size_must_be_whole_pages(dev):
    """A size that is not whole pages is a driver bug: warned, -EINVAL."""
    with pytest.raises(KernelWarning, match="not whole pages"):
        gem.private_object_init(dev, gem.DrmGemObject(), 100)


def test_get_after_free_and_double_put_warn(dev):
    """Using a freed object is loud instead of resurrecting it."""
    rec = Recorder()
    obj = new_object(dev, rec)
    gem.put(obj)
    with pytest.raises(KernelWarning, match="freed"):
        gem.get(obj)
    with pytest.raises(KernelWarning, match="underflow"):
        gem.put(obj)
    assert gem.get_unless_zero(obj) is False


def test_handles_lowest_free_first_and_hold_references(dev):
    """Handles start at 1, reuse the lowest freed number, each hold a reference and a
    handle_count; lookup adds a reference; deleting the last handle frees the object."""
    rec = Recorder()
    file = gem.DrmFile(dev)
    a, b = new_object(dev, rec), new_object(dev, rec)
    ha, hb = gem.handle_create(file, a), gem.handle_create(file, b)
    assert (ha, hb) == (1, 2)
    gem.put(a)
    gem.put(b)
    assert (a.refcount, a.handle_count) == (1, 1)
    found = gem.object_lookup(file, ha)
    assert found is a and a.refcount == 2
    gem.put(found)
    assert gem.object_lookup(file, 99) is None
    gem.handle_delete(file, ha)
    assert rec.freed == [a]
    c = new_object(dev, rec)
    assert gem.handle_create(file, c) == 1
    gem.put(c)
    with pytest.raises(Einval, match="no GEM handle 7"):
        gem.handle_delete(file, 7)
    gem.release(file)
    assert rec.freed == [a, c, b] and not file.object_idr  # in handle order


def test_evict_locked_asserts_the_resv(dev):
    """evict_locked without the reservation lock is a lockdep report."""
    rec = Recorder()
    obj = new_object(dev, rec)
    with pytest.raises(LockdepError, match="must hold"):
        gem.evict_locked(obj)
    lockdep.reset()
    gem.put(obj)


def test_evict_locked_calls_evict_when_idle(dev):
    """An idle object goes to funcs.evict; one without the callback is left alone."""
    rec = Recorder()
    obj = new_object(dev, rec)
    with locked(obj):
        gem.evict_locked(obj)
    assert rec.evicted == [obj]
    obj.funcs = gem.DrmGemObjectFuncs(free=rec.free)
    with locked(obj):
        gem.evict_locked(obj)
    assert rec.evicted == [obj]
    gem.put(obj)


@pytest.mark.parametrize(
    ("idle_usage", "fence_usage", "busy"),
    [
        (DmaResvUsage.READ, DmaResvUsage.KERNEL, True),
        (DmaResvUsage.READ, DmaResvUsage.WRITE, True),
        (DmaResvUsage.READ, DmaResvUsage.READ, True),
        (DmaResvUsage.READ, DmaResvUsage.BOOKKEEP, False),
        (DmaResvUsage.BOOKKEEP, DmaResvUsage.READ, True),
        (DmaResvUsage.BOOKKEEP, DmaResvUsage.BOOKKEEP, True),
    ],
)
def test_evict_locked_is_busy_until_fences_up_to_idle_usage_signal(
    mem, idle_usage, fence_usage, busy
):
    """An unsignalled fence at or below the device's idle usage makes evict_locked -EBUSY
    without calling the driver; READ (the kernel's choice) ignores BOOKKEEP fences, BOOKKEEP
    (what panthor asked for) does not. Once the fence signals the object is evicted."""
    dev = gem.DrmDevice(*mem, idle_usage=idle_usage)
    rec = Recorder()
    obj = new_object(dev, rec)
    fence = fence_on(obj, fence_usage)
    with locked(obj):
        if busy:
            with pytest.raises(Ebusy, match=idle_usage.name):
                gem.evict_locked(obj)
            assert rec.evicted == []
        else:
            gem.evict_locked(obj)
            assert rec.evicted == [obj]
    dma_fence.signal(fence)
    with locked(obj):
        gem.evict_locked(obj)
    assert rec.evicted[-1] is obj
    dma_fence.put(fence)
    gem.put(obj)


def test_funcs_replace_keeps_the_other_callbacks():
    """A driver wrapping one callback keeps the helper's others."""
    base = gem_shmem.FUNCS
    wrapped = base.replace(evict=lambda obj: None)
    assert wrapped.free is base.free and wrapped.print_info is base.print_info
    assert wrapped.evict is not None and base.evict is None
