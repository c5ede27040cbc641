"""drm_exec holds a GEM reference on every object it has locked (and on the one it backed off
from), as the kernel's drm_exec_obj_locked() / drm_exec_lock_obj() take drm_gem_object_get()
and drm_exec_unlock_all() / drm_exec_fini() drop it: an object whose last user reference goes
while an exec holds its lock stays alive until the exec lets go."""

from __future__ import annotations

import pytest

from gemu.guest.dma_buf import dma_resv
from gemu.guest.drm import drm_exec, gem, gem_shmem
from gemu.guest.drm.drm_exec import DRM_EXEC_INTERRUPTIBLE_WAIT
from gemu.guest.errors import Edeadlk, Enomem
from gemu.guest.kernel import runtime
from gemu.guest.locking import lockdep, ww_mutex
from gemu.guest.mm.page_alloc import PAGE_SIZE
from tests.support.gem import assert_nothing_left, release_shmem_device, shmem_device


@pytest.fixture
def dev():
    lockdep.reset()
    d = shmem_device(32, 16)
    yield d
    release_shmem_device(d)
    assert_nothing_left(d)


def new_bo(dev, freed: list):
    """A shmem object whose free is recorded in ``freed`` (then done as usual)."""

    def free(obj):
        freed.append(obj)
        gem_shmem.free(obj)

    obj = gem_shmem.create(dev, 2 * PAGE_SIZE, gem_shmem.FUNCS.replace(free=free))
    gem_shmem.get_pages(obj)
    gem_shmem.put_pages(obj)
    return obj


def test_last_reference_dropped_while_locked_frees_at_fini(dev):
    """A BO whose last user reference is dropped while it is locked in an exec is still alive
    (not freed, reservation still usable) until drm_exec_fini, which frees it."""
    freed: list = []
    obj = new_bo(dev, freed)
    ex = drm_exec.init(DRM_EXEC_INTERRUPTIBLE_WAIT, 0)
    for attempt in drm_exec.until_all_locked(ex):
        with attempt:
            drm_exec.prepare_obj(ex, obj, 1)
    assert obj.refcount == 2
    gem.put(obj)  # the user's last reference
    assert freed == [] and obj.refcount == 1 and dev.object_count == 1
    assert dma_resv.is_locked(obj.resv)
    # the exec may still use the object it holds: publish a fence slot's worth of work
    for _, locked_obj in drm_exec.for_each_locked_object(ex):
        dma_resv.assert_held(locked_obj.resv)
    drm_exec.fini(ex)
    assert freed == [obj] and obj.refcount == 0 and dev.object_count == 0


def test_unlock_obj_drops_the_reference(dev):
    """drm_exec_unlock_obj() puts the reference it took; the object is freed right there."""
    freed: list = []
    obj = new_bo(dev, freed)
    with drm_exec.init(0, 0) as ex:
        for attempt in drm_exec.until_all_locked(ex):
            with attempt:
                drm_exec.lock_obj(ex, obj)
        gem.put(obj)
        assert freed == []
        drm_exec.unlock_obj(ex, obj)
        assert freed == [obj] and ex.num_objects == 0


class OlderHolder:
    """Another task holding ``obj`` under an older acquire context (it wins wait-die) until
    :meth:`release`; the exec that then locks ``obj`` while holding a lock backs off."""

    def __init__(self, obj) -> None:
        self.ready = runtime.Completion("holder ready")
        self.done = runtime.Completion("holder release")
        self.task = runtime.spawn(self._hold, obj, name="older")
        self.ready.wait_for_completion()

    def _hold(self, obj) -> None:
        ctx = ww_mutex.acquire_init(dma_resv.RESERVATION_WW_CLASS)
        dma_resv.lock(obj.resv, ctx)
        self.ready.complete()
        self.done.wait_for_completion()
        dma_resv.unlock(obj.resv)
        ww_mutex.acquire_fini(ctx)

    def release(self) -> None:
        self.done.complete()


def run(fn, *args):
    runtime.Deterministic(1).run(fn, *args)


def test_restart_drops_references_of_the_pass(dev):
    """A contended pass unlocks and puts every object it had locked (drm_exec_cleanup), and
    keeps a reference on the contended object until the next pass locks it (prelocked)."""
    freed: list = []
    a, b = new_bo(dev, freed), new_bo(dev, freed)

    def main():
        holder = OlderHolder(b)
        ex = drm_exec.init(0, 0)
        passes = 0
        for attempt in drm_exec.until_all_locked(ex):
            with attempt:
                passes += 1
                drm_exec.lock_obj(ex, a)
                if passes == 1:
                    with pytest.raises(Edeadlk):
                        drm_exec.lock_obj(ex, b)
                    # backed off from b: a locked and held, b held as the contended object
                    assert ex.contended is b and a.refcount == 2 and b.refcount == 2
                    holder.release()
                    drm_exec.retry_on_contention(ex)
                # second pass: b was locked first by the slow path and is held twice (the
                # table's reference and the contended one, now prelocked) until claimed
                assert ex.prelocked is b and b.refcount == 3
                drm_exec.lock_obj(ex, b)
        holder.task.join()
        assert passes == 2 and ex.prelocked is None
        assert a.refcount == 2 and b.refcount == 2
        gem.put(a)
        gem.put(b)
        assert freed == []
        drm_exec.fini(ex)
        assert {id(o) for o in freed} == {id(a), id(b)}

    run(main)


def test_fini_after_backoff_drops_the_contended_reference(dev):
    """An exec that backs off and is finalised before the next pass drops the contended
    object's reference in drm_exec_fini (exec->contended)."""
    freed: list = []
    a, seen = new_bo(dev, freed), new_bo(dev, freed)

    def main():
        holder = OlderHolder(a)
        ex = drm_exec.init(0, 0)
        with pytest.raises(Edeadlk):
            for _attempt in drm_exec.until_all_locked(ex):
                drm_exec.lock_obj(ex, seen)
                drm_exec.lock_obj(ex, a)
        assert ex.contended is a and a.refcount == 2
        holder.release()
        holder.task.join()
        gem.put(a)
        gem.put(seen)
        assert freed == []
        drm_exec.fini(ex)
        assert {id(o) for o in freed} == {id(a), id(seen)}

    run(main)


def test_failed_table_growth_takes_no_reference(dev, monkeypatch):
    """When the object table cannot grow (-ENOMEM) the object is unlocked again and holds no
    reference of the exec (drm_exec_obj_locked fails before drm_gem_object_get)."""
    freed: list = []
    a, b = new_bo(dev, freed), new_bo(dev, freed)
    monkeypatch.setattr(drm_exec, "should_fail_alloc", lambda ex: True)
    with drm_exec.init(0, 1) as ex:
        for attempt in drm_exec.until_all_locked(ex):
            with attempt:
                drm_exec.lock_obj(ex, a)
                with pytest.raises(Enomem):
                    drm_exec.lock_obj(ex, b)
        assert a.refcount == 2 and b.refcount == 1 and not dma_resv.is_locked(b.resv)
    gem.put(a)
    gem.put(b)
    assert {id(o) for o in freed} == {id(a), id(b)}


@pytest.mark.parametrize("strategy", ["random", "pct"])
def test_references_balance_under_contention(dev, strategy):
    """Three tasks lock the same three GEM objects in different orders (wait-die back-off,
    slow-path relocks) over 12 seeded schedules: while a task holds them each object carries
    the task's reference, and once every exec is finished every count is back to the
    owner's one (no reference leaked or dropped twice)."""
    freed: list = []
    shared = [new_bo(dev, freed) for _ in range(3)]
    orders = [shared, shared[::-1], [shared[1], shared[0], shared[2]]]
    passes = [0]

    def submitter(order):
        with drm_exec.init(DRM_EXEC_INTERRUPTIBLE_WAIT, 0) as ex:
            for attempt in drm_exec.until_all_locked(ex):
                passes[0] += 1
                with attempt:
                    for obj in order:
                        drm_exec.prepare_obj(ex, obj, 1)
                        drm_exec.retry_on_contention(ex)
            assert all(obj.refcount >= 2 for obj in order)
            runtime.preempt("holding all")

    def main():
        tasks = [runtime.spawn(submitter, o, name=f"t{i}") for i, o in enumerate(orders)]
        for t in tasks:
            t.join()

    for seed in range(12):
        runtime.Deterministic(seed, strategy=strategy).run(main)
        assert [obj.refcount for obj in shared] == [1, 1, 1] and freed == []
    assert passes[0] > 12 * 3, "no schedule backed off: the test lost its contention"
    for obj in shared:
        gem.put(obj)
    assert len(freed) == 3
