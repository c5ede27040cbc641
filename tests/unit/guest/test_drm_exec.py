"""drm_exec: the kernel's drm_exec_test cases, the retry loop under real contention, and
cleanup on every exit path."""

from __future__ import annotations

import pytest

from gemu.guest.dma_buf import dma_resv
from gemu.guest.drm import drm_exec
from gemu.guest.drm.drm_exec import DRM_EXEC_IGNORE_DUPLICATES, DRM_EXEC_INTERRUPTIBLE_WAIT
from gemu.guest.errors import Ealready, Edeadlk, Eintr, Enomem
from gemu.guest.kernel import runtime


class Obj:
    """The smallest lockable object: a name and a reservation object (GEM comes later)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.resv = dma_resv.init(name=name)

    def __repr__(self) -> str:
        return f"<Obj {self.name}>"


@pytest.fixture
def objs():
    """Four unlocked objects; the test fails if one is left locked."""
    made = [Obj(f"bo{i}") for i in range(4)]
    yield made
    assert not [o for o in made if dma_resv.is_locked(o.resv)], "object left locked"


def test_sanity():
    """An exec can be initialised and finalised without locking anything."""
    ex = drm_exec.init(DRM_EXEC_INTERRUPTIBLE_WAIT, 0)
    drm_exec.fini(ex)


def test_lock(objs):
    """lock_obj inside the loop locks the object and tracks it until fini."""
    obj = objs[0]
    with drm_exec.init(DRM_EXEC_INTERRUPTIBLE_WAIT, 0) as ex:
        for attempt in drm_exec.until_all_locked(ex):
            with attempt:
                drm_exec.lock_obj(ex, obj)
        assert dma_resv.is_locked(obj.resv)
        assert ex.objects == [obj]
    assert not dma_resv.is_locked(obj.resv)


def test_lock_unlock(objs):
    """An object unlocked with unlock_obj is untracked and can be locked again."""
    obj = objs[0]
    with drm_exec.init(DRM_EXEC_INTERRUPTIBLE_WAIT, 0) as ex:
        for attempt in drm_exec.until_all_locked(ex):
            with attempt:
                drm_exec.lock_obj(ex, obj)
                drm_exec.unlock_obj(ex, obj)
                assert ex.num_objects == 0 and not dma_resv.is_locked(obj.resv)
                drm_exec.lock_obj(ex, obj)
        assert ex.objects == [obj]


def test_duplicates(objs):
    """With IGNORE_DUPLICATES locking an object twice succeeds and tracks it once."""
    obj = objs[0]
    with drm_exec.init(DRM_EXEC_INTERRUPTIBLE_WAIT | DRM_EXEC_IGNORE_DUPLICATES, 0) as ex:
        for attempt in drm_exec.until_all_locked(ex):
            with attempt:
                drm_exec.lock_obj(ex, obj)
                drm_exec.lock_obj(ex, obj)
        assert ex.objects == [obj]


def test_duplicates_without_flag(objs):
    """Without IGNORE_DUPLICATES the second lock of an object is -EALREADY, and fini still
    unlocks it."""
    obj = objs[0]
    with drm_exec.init(DRM_EXEC_INTERRUPTIBLE_WAIT, 0) as ex:
        with pytest.raises(Ealready):
            for attempt in drm_exec.until_all_locked(ex):
                with attempt:
                    drm_exec.lock_obj(ex, obj)
                    drm_exec.lock_obj(ex, obj)
        assert ex.objects == [obj]


def test_prepare(objs):
    """prepare_obj locks the object and reserves its fence slots."""
    obj = objs[0]
    with drm_exec.init(DRM_EXEC_INTERRUPTIBLE_WAIT, 0) as ex:
        for attempt in drm_exec.until_all_locked(ex):
            with attempt:
                drm_exec.prepare_obj(ex, obj, 1)
        assert obj.resv.fences.max_fences - obj.resv.fences.num_fences >= 1


def test_prepare_array(objs):
    """prepare_array locks and reserves every object of the array."""
    with drm_exec.init(DRM_EXEC_INTERRUPTIBLE_WAIT, 0) as ex:
        for attempt in drm_exec.until_all_locked(ex):
            with attempt:
                drm_exec.prepare_array(ex, objs[:2], 1)
        assert ex.objects == objs[:2]
        assert all(o.resv.fences.max_fences >= 1 for o in objs[:2])


def test_multiple_loops():
    """Two exec transactions one after the other, each leaving its loop early, both clean up."""
    for _ in range(2):
        ex = drm_exec.init(DRM_EXEC_INTERRUPTIBLE_WAIT, 0)
        for _attempt in drm_exec.until_all_locked(ex):
            break
        drm_exec.fini(ex)


def test_iteration_forward_and_reverse(objs):
    """Locked objects iterate in locking order and in reverse, and obj() indexes them."""
    with drm_exec.init(0, 0) as ex:
        for attempt in drm_exec.until_all_locked(ex):
            with attempt:
                drm_exec.prepare_array(ex, objs, 1)
        assert list(drm_exec.for_each_locked_object(ex)) == list(enumerate(objs))
        assert list(drm_exec.for_each_locked_object_reverse(ex)) == list(enumerate(objs))[::-1]
        assert drm_exec.obj(ex, 2) is objs[2] and drm_exec.obj(ex, 4) is None


def test_kernel_literal_loop(objs):
    """The kernel's shape also works: while cleanup(), body catching -EDEADLK, then fini."""
    ex = drm_exec.init(0, 0)
    while drm_exec.cleanup(ex):
        try:
            drm_exec.prepare_array(ex, objs, 1)
        except Edeadlk:
            continue
    assert ex.objects == objs
    drm_exec.fini(ex)


def test_table_growth_enomem(objs, monkeypatch):
    """When the object table cannot grow the lock fails with -ENOMEM and the object is not
    left locked."""
    monkeypatch.setattr(drm_exec, "should_fail_alloc", lambda ex: True)
    with drm_exec.init(0, 1) as ex:
        with pytest.raises(Enomem):
            for attempt in drm_exec.until_all_locked(ex):
                with attempt:
                    drm_exec.lock_obj(ex, objs[0])
                    drm_exec.lock_obj(ex, objs[1])
        assert ex.objects == [objs[0]] and not dma_resv.is_locked(objs[1].resv)


def test_prepare_reserve_failure_unlocks(objs, monkeypatch):
    """A failed reservation in prepare_obj unlocks the object again and reports the error."""
    monkeypatch.setattr(dma_resv, "should_fail_alloc", lambda obj, n: True)
    with drm_exec.init(0, 0) as ex:
        with pytest.raises(Enomem):
            for attempt in drm_exec.until_all_locked(ex):
                with attempt:
                    drm_exec.prepare_obj(ex, objs[0], 1)
        assert ex.objects == [] and not dma_resv.is_locked(objs[0].resv)


def test_interrupted_lock_releases_everything(objs):
    """A signal while waiting for a lock (INTERRUPTIBLE_WAIT) fails with -EINTR and leaving the
    exec unlocks what the transaction held."""
    a, b = objs[0], objs[1]

    def main():
        dma_resv.lock(b.resv, None)

        def submitter():
            with drm_exec.init(DRM_EXEC_INTERRUPTIBLE_WAIT, 0) as ex, pytest.raises(Eintr):
                for attempt in drm_exec.until_all_locked(ex):
                    with attempt:
                        drm_exec.lock_obj(ex, a)
                        runtime.current().send_signal()
                        drm_exec.lock_obj(ex, b)
            assert not dma_resv.is_locked(a.resv)
            runtime.current().clear_signal()

        runtime.spawn(submitter, name="submitter").join()
        dma_resv.unlock(b.resv)

    runtime.Deterministic(0).run(main)


def _contention_run(seed: int, strategy: str, flags: int) -> list[str]:
    shared = [Obj(f"shared{i}") for i in range(3)]
    inside: list[str] = []
    log: list[str] = []

    def submitter(name: str, order: list[Obj]) -> None:
        with drm_exec.init(flags, 0) as ex:
            for attempt in drm_exec.until_all_locked(ex):
                contended = ex.contended
                with attempt:
                    first = True
                    for obj in order:
                        drm_exec.prepare_obj(ex, obj, 1)
                        if first and contended is not None:
                            # The slow path locks the contended object before anything else.
                            assert ex.objects[0] is contended
                        first = False
                        drm_exec.retry_on_contention(ex)
            assert sorted(o.name for o in ex.objects) == sorted(o.name for o in order)
            inside.append(name)
            assert len(inside) == 1, "two transactions own the same objects"
            runtime.preempt("critical section")
            inside.remove(name)
            log.append(name)

    def main():
        tasks = [
            runtime.spawn(submitter, "t0", shared, name="t0"),
            runtime.spawn(submitter, "t1", shared[::-1], name="t1"),
            runtime.spawn(submitter, "t2", [shared[1], shared[0], shared[2]], name="t2"),
        ]
        for t in tasks:
            t.join()

    runtime.Deterministic(seed, strategy=strategy).run(main)
    assert not [o for o in shared if dma_resv.is_locked(o.resv)]
    return log


@pytest.mark.parametrize("strategy", ["random", "pct"])
@pytest.mark.parametrize("flags", [0, DRM_EXEC_INTERRUPTIBLE_WAIT], ids=["plain", "intr"])
def test_contention_always_completes(strategy, flags):
    """Three tasks locking the same objects in different orders always all finish, under 100
    seeded schedules each, with mutual exclusion and the contended object locked first on
    every retry."""
    finished = set()
    for seed in range(100):
        log = _contention_run(seed, strategy, flags)
        assert sorted(log) == ["t0", "t1", "t2"]
        finished.add(tuple(log))
    assert len(finished) > 1, "the schedules never reordered the submitters"


def test_contention_replays_from_seed():
    """The same seed gives the same completion order (a failing schedule is reproducible)."""
    assert _contention_run(7, "random", 0) == _contention_run(7, "random", 0)
