"""A Hypothesis state machine over a few GEM shmem objects and their shrinker: random get/put,
pin/unpin, vmap/vunmap with writes, madvise, fences, shrinking, swap-in and purge, checked
after every step against the v19 rules and a plain model of what each object must hold."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gemu.guest.dma_buf import dma_fence, dma_resv
from gemu.guest.dma_buf.dma_fence import DmaFence
from gemu.guest.dma_buf.dma_resv import DmaResvUsage
from gemu.guest.drm import gem, gem_shmem
from gemu.guest.drm.gem_shmem_shrinker import (
    default_evict,
    drmm_gem_shmem_init,
    drmm_gem_shmem_release,
)
from gemu.guest.errors import Enomem
from gemu.guest.kernel import runtime
from gemu.guest.locking import lockdep
from gemu.guest.mm.page_alloc import GFP_KERNEL, PAGE_SIZE, PageAllocator, PhysMem
from gemu.guest.mm.shrinker import ShrinkControl
from gemu.guest.mm.swap import SwapDevice

SIZES = (1, 2, 3)  # pages of the three objects
TAG = 16  # bytes the model tracks at the start of each object
FUNCS = gem_shmem.FUNCS.replace(evict=default_evict)
OBJ = st.integers(0, len(SIZES) - 1)


class Model:
    """What the test did to one object: references it holds and the contents it wrote."""

    def __init__(self) -> None:
        self.gets = 0
        self.pins = 0
        self.vmaps: list[gem_shmem.IosysMap] = []
        self.purged = False
        self.tag = bytes(TAG)
        self.fence: DmaFence | None = None


class GemShmemMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        lockdep.reset()
        self.alloc = PageAllocator(PhysMem(bytearray(48 * PAGE_SIZE)), watermarks=(0, 0, 0))
        self.swap = SwapDevice(4)
        self.dev = gem.DrmDevice(self.alloc, self.swap)
        self.mm = drmm_gem_shmem_init(self.dev)
        self.objs = [gem_shmem.create(self.dev, n * PAGE_SIZE, FUNCS) for n in SIZES]
        self.model = [Model() for _ in SIZES]

    def _locked(self, i, fn, *args):
        obj = self.objs[i]
        dma_resv.lock(obj.resv, None)
        try:
            return fn(obj, *args)
        finally:
            dma_resv.unlock(obj.resv)

    # --- references ---

    @rule(i=OBJ)
    def get_pages(self, i):
        m = self.model[i]
        if m.purged:
            try:
                self._locked(i, gem_shmem.get_pages_locked)
            except Enomem:
                return
            raise AssertionError("got pages of a purged object")
        gem_shmem.get_pages(self.objs[i])
        m.gets += 1

    @precondition(lambda self: any(m.gets for m in self.model))
    @rule(i=OBJ)
    def put_pages(self, i):
        if self.model[i].gets:
            gem_shmem.put_pages(self.objs[i])
            self.model[i].gets -= 1

    @rule(i=OBJ)
    def pin(self, i):
        m = self.model[i]
        if m.purged:
            try:
                gem_shmem.pin(self.objs[i])
            except Enomem:
                return
            raise AssertionError("pinned a purged object")
        gem_shmem.pin(self.objs[i])
        m.pins += 1
        self._check_tag(i)

    @precondition(lambda self: any(m.pins for m in self.model))
    @rule(i=OBJ)
    def unpin(self, i):
        if self.model[i].pins:
            gem_shmem.unpin(self.objs[i])
            self.model[i].pins -= 1

    @rule(i=OBJ, data=st.binary(min_size=TAG, max_size=TAG))
    def vmap_and_write(self, i, data):
        m = self.model[i]
        if m.purged:
            return
        vaddr = gem_shmem.vmap(self.objs[i])
        assert vaddr.read(0, TAG) == m.tag, "contents lost"
        vaddr.write(0, data)
        m.tag = data
        m.vmaps.append(vaddr)

    @precondition(lambda self: any(m.vmaps for m in self.model))
    @rule(i=OBJ)
    def vunmap(self, i):
        m = self.model[i]
        if m.vmaps:
            vaddr = m.vmaps.pop()
            gem_shmem.vunmap(self.objs[i], vaddr)
            assert vaddr.is_null == (not m.vmaps)

    # --- advice, fences, reclaim ---

    @rule(i=OBJ, madv=st.sampled_from([0, 1]))
    def madvise(self, i, madv):
        assert gem_shmem.madvise(self.objs[i], madv) == (not self.model[i].purged)

    @precondition(lambda self: any(m.fence is None for m in self.model))
    @rule(i=OBJ, usage=st.sampled_from([DmaResvUsage.WRITE, DmaResvUsage.READ]))
    def add_fence(self, i, usage):
        m = self.model[i]
        if m.fence is not None:
            return
        m.fence = DmaFence(None, dma_fence.context_alloc(1), 1)

        def publish(obj):
            dma_resv.reserve_fences(obj.resv, 1)
            dma_resv.add_fence(obj.resv, m.fence, usage)

        self._locked(i, publish)

    @precondition(lambda self: any(m.fence is not None for m in self.model))
    @rule(i=OBJ)
    def signal(self, i):
        m = self.model[i]
        if m.fence is not None:
            dma_fence.signal(m.fence)
            dma_fence.put(m.fence)
            m.fence = None

    @rule(nr=st.integers(1, 8))
    def shrink(self, nr):
        before = [(o.evicted, o.madv, o.pages) for o in self.objs]
        self.mm.scan_objects(ShrinkControl(gfp_mask=int(GFP_KERNEL), nr_to_scan=nr))
        for o, m, (evicted, madv, pages) in zip(self.objs, self.model, before):
            if o.madv < 0 and madv >= 0:
                assert madv > 0, "purged an object userspace still needs"
                m.purged = True
            if m.fence is not None or o.pages_pin_count:
                assert (o.evicted, o.madv, o.pages) == (evicted, madv, pages), (
                    f"reclaimed busy or pinned {o!r}"
                )

    @rule(i=OBJ)
    def swapin(self, i):
        was = self.objs[i].evicted
        self._locked(i, gem_shmem.swapin_locked)
        if was:
            self._check_tag(i)

    @rule(i=OBJ)
    def purge(self, i):
        obj = self.objs[i]
        if not gem_shmem.is_purgeable(obj):
            return
        self._locked(i, gem_shmem.purge_locked)
        self.model[i].purged = True

    # --- invariants ---

    def _check_tag(self, i):
        obj, m = self.objs[i], self.model[i]
        if obj.pages is not None and not m.purged:
            assert obj.filp.read(0, TAG) == m.tag, f"contents of {obj!r} changed"

    @invariant()
    def counters_match_the_model(self):
        for obj, m in zip(self.objs, self.model):
            pins = m.pins + (1 if m.vmaps else 0)
            assert obj.pages_pin_count == pins
            assert obj.pages_use_count == m.gets + (1 if pins else 0)
            assert obj.vmap_use_count == len(m.vmaps)
            assert (obj.vaddr is None) == (not m.vmaps)
            assert (obj.madv == -1) == m.purged, "madv must stay -1 once purged"

    @invariant()
    def pages_follow_the_state(self):
        for obj in self.objs:
            held = obj.pages_use_count > 0 and not obj.evicted and obj.madv >= 0
            assert (obj.pages is not None) == held, f"pages of {obj!r}"
            if obj.pages_pin_count:
                assert obj.pages is not None and not obj.evicted, "pinned but not resident"
            if obj.evicted:
                assert obj.pages_use_count > 0 and obj.madv >= 0
            if obj.sgt is not None:
                assert obj.sgt.pfns == tuple(obj.pages)
            if obj.pages is not None:
                assert len(obj.pages) == obj.npages
                assert all(self.alloc.is_allocated(p) for p in obj.pages)
            self._check_tag(self.objs.index(obj))

    @invariant()
    def lru_membership_follows_the_rules(self):
        for obj in self.objs:
            if obj.madv < 0:
                want = None
            elif gem_shmem.is_evictable(obj) or gem_shmem.is_purgeable(obj):
                want = self.mm.lru_evictable
            elif obj.evicted:
                want = self.mm.lru_evicted
            elif obj.pages is None:
                want = None
            else:
                want = self.mm.lru_pinned
            assert obj.lru is want, f"{obj!r} on {obj.lru}, expected {want}"
        for lru in (self.mm.lru_pinned, self.mm.lru_evictable, self.mm.lru_evicted):
            assert lru.count == sum(o.npages for o in lru)

    @invariant()
    def frames_and_slots_are_conserved(self):
        files = [o.filp for o in self.objs]
        assert self.alloc.nr_used == sum(f.resident_pages for f in files)
        assert self.swap.nr_used_slots == sum(f.swapped_pages for f in files)

    def teardown(self):
        for i, (obj, m) in enumerate(zip(self.objs, self.model)):
            while m.vmaps:
                gem_shmem.vunmap(obj, m.vmaps.pop())
            for _ in range(m.pins):
                gem_shmem.unpin(obj)
            for _ in range(m.gets):
                gem_shmem.put_pages(obj)
            self.signal(i)
            gem.put(obj)
        assert self.dev.object_count == 0 and not self.dev.leaked
        counts = (self.mm.lru_pinned.count, self.mm.lru_evictable.count, self.mm.lru_evicted.count)
        assert counts == (0, 0, 0)
        drmm_gem_shmem_release(self.dev)
        self.alloc.assert_no_leaks()
        self.swap.assert_no_leaks()
        assert not runtime.current().held_locks
        assert not lockdep.reports()


GemShmemMachine.TestCase.settings = settings(
    derandomize=True, max_examples=150, stateful_step_count=60, deadline=None
)
TestGemShmemMachine = GemShmemMachine.TestCase
