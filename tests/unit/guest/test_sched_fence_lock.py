"""A job's two scheduler fences are initialised with one lock, as drm_sched_fence_init() does
(the drm_sched_fence's lock), while every other fence has its own; both fences still signal,
count references and take callbacks independently."""

from __future__ import annotations

from gemu.guest.dma_buf import dma_fence
from gemu.guest.dma_buf.dma_fence import DmaFence
from gemu.guest.drm import sched as drm_sched
from gemu.guest.drm.sched import DrmSchedJob, DrmSchedPriority


class _Ops(drm_sched.DrmSchedBackendOps):
    def run_job(self, job):
        return None


def test_scheduled_and_finished_share_their_drm_sched_fence_lock():
    sched = drm_sched.init(_Ops(), name="lock-ring", credit_limit=4)
    entity = drm_sched.entity_init(DrmSchedPriority.NORMAL, [sched])
    jobs = []
    try:
        for _ in range(2):
            job = DrmSchedJob()
            drm_sched.job_init(job, entity, 1, owner=None)
            drm_sched.job_arm(job)
            jobs.append(job)
        a, b = (job.s_fence for job in jobs)
        assert a.scheduled.lock is a.finished.lock
        assert a.finished.lock is not b.finished.lock
        assert DmaFence().lock is not DmaFence().lock  # the inline per-fence lock otherwise
        seen = []
        cb = dma_fence.DmaFenceCb()
        dma_fence.add_callback(a.finished, cb, lambda f, _cb: seen.append(f.seqno))
        ref = dma_fence.get(a.finished)
        assert not dma_fence.check_and_signal(a.scheduled)
        assert not a.finished.flags & dma_fence.DmaFenceFlag.SIGNALED
        assert not dma_fence.check_and_signal(a.finished)
        assert seen == [a.finished.seqno]
        dma_fence.put(ref)
        assert a.finished.refcount == 1 and a.scheduled.refcount == 1
    finally:
        for job in jobs:
            drm_sched.entity_push_job(job)
        drm_sched.entity_destroy(entity)
        drm_sched.fini(sched)
