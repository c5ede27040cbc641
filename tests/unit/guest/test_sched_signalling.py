"""drm_sched's run_job is on the way from a pushed job to its finished fence's signal: it runs
inside a dma_fence signalling section, so a driver's run_job that may enter reclaim is
reported, and one that allocates without reclaim (GFP_ATOMIC, as amdgpu_fence_emit) is not."""

from __future__ import annotations

import pytest

from gemu.guest.dma_buf import dma_fence
from gemu.guest.drm import sched as drm_sched
from gemu.guest.drm.sched import DrmSchedPriority
from gemu.guest.locking import lockdep
from gemu.guest.locking.lockdep import LockdepError
from gemu.guest.mm.gfp import GFP_ATOMIC, GFP_KERNEL
from tests.unit.guest.test_drm_sched import Driver, Job, run_with_sched, submit


class AllocatingDriver(Driver):
    """A driver whose run_job allocates its hardware fence with ``gfp``."""

    def __init__(self, gfp) -> None:
        super().__init__()
        self.gfp = gfp
        self.in_section: list[bool] = []

    def run_job(self, job: Job):
        self.in_section.append(lockdep.in_signalling())
        lockdep.might_alloc(self.gfp)
        return super().run_job(job)


def one_job(sched, driver) -> None:
    entity = drm_sched.entity_init(DrmSchedPriority.NORMAL, [sched])
    finished = submit(entity, Job("j"))
    dma_fence.wait(finished, False)
    dma_fence.put(finished)
    drm_sched.entity_destroy(entity)


def test_run_job_runs_in_a_signalling_section_and_may_allocate_atomically():
    """run_job sees itself inside a signalling section; a GFP_ATOMIC allocation there is
    clean and the job completes."""
    driver = run_with_sched(one_job, driver=AllocatingDriver(GFP_ATOMIC))
    assert driver.in_section == [True]
    assert driver.ran == ["j"] and driver.freed == ["j"]


def test_run_job_that_may_reclaim_is_reported():
    """A GFP_KERNEL allocation in run_job: reclaim may wait for the fence this job is to
    signal, so it is a lockdep signalling report, with the section's start in the scheduler."""
    with pytest.raises(LockdepError, match="inside a dma_fence signalling") as info:
        run_with_sched(one_job, driver=AllocatingDriver(GFP_KERNEL))
    assert info.value.report.kind == "signalling"
    assert any("_run_one" in s for s in info.value.report.stacks)
