"""What a finished job leaves behind while its out-fence stays open (a client that never
closes its out-fences, as the NOP benchmark is): the out-fence, which keeps of the freed job
only its command buffer's place and message (for gdb's symbols and the error), the finished
fence and that fence's lock. Nothing else: not the job, no hardware fence, no callback slot,
no lists, and no reference cycle that only the cyclic garbage collector could free (it would
walk every one of them again and again: the cost per job then grows with the jobs kept)."""

from __future__ import annotations

import collections
import gc

import pytest

from gemu.device.abi import packets as pk
from gemu.guest import errors
from gemu.guest.gemu_drv.uapi import FreedJob
from gemu.guest.locking import lockdep
from gemu.host.machine import Machine

JOBS = 200


@pytest.fixture
def machine():
    lockdep.reset()
    errors.reset_warn_stats()
    with Machine(ram_size=8 << 20, swap_size=0, device="inproc") as m:
        yield m
    assert not errors.warn_stats().counts


def _tracked() -> collections.Counter:
    gc.collect()
    return collections.Counter(type(o).__name__ for o in gc.get_objects())


def test_a_freed_job_kept_by_its_out_fence_holds_three_tracked_objects(machine):
    f = machine.open()
    nop = pk.nop()
    f.wait(f.submit(nop))  # first-use allocations are not per job
    # the scheduler worker frees that job after its fence signals: counting before it is
    # freed took its hardware fence and that fence's lock for growth (0.995 per job, in
    # about one run in eight)
    assert f.idle_wq.wait_event(lambda: f.inflight == 0, timeout_ns=10_000_000_000)
    before = _tracked()
    fences = [f.submit(nop) for _ in range(JOBS)]
    f.wait(fences[-1])
    # every job freed (the scheduler worker frees each after its signal)
    assert f.idle_wq.wait_event(lambda: f.inflight == 0, timeout_ns=10_000_000_000)
    grown = _tracked() - before
    per_job = {name: n / JOBS for name, n in grown.items() if n >= JOBS // 2}
    assert per_job == pytest.approx({"JobFence": 1, "DmaFence": 1, "lock": 1})
    freed = [fence.job for fence in fences]
    assert all(type(job) is FreedJob and job.hw_fence is None for job in freed)
    assert [job.ib_va for job in freed] == sorted({job.ib_va for job in freed})
    assert {(job.ib_dwords, job.message) for job in freed} == {(1, "")}
    gc.disable()
    try:
        collected = gc.collect()
    finally:
        gc.enable()
    assert collected == 0  # nothing was left for the cyclic collector
    f.close()
