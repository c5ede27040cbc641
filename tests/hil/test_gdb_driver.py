"""The guest driver and a device held by gdb: a hold is not a hang.

The machine's device is started with ``--gdb ... -S``, so its command processor is held
(STATUS.HALTED) from the start. A job submitted meanwhile outlives several job timeouts;
the driver's timeout handler must re-arm (DRM_GPU_SCHED_STAT_NO_HANG) instead of resetting
the GPU, and the job completes once gdb lets the device run. A real hang, reset by the
driver, leaves a post-mortem core when the device has a --coredump-dir.
"""

from __future__ import annotations

import socket
import threading

import pytest

from gemu.device.abi import packets as pk
from gemu.device.abi.enums import CpState, WaitFunc
from gemu.device.coredump import read_core, read_segment
from gemu.guest.drm import sched as drm_sched
from gemu.guest.errors import Etimedout
from gemu.guest.gemu_drv.job import BoAccess
from gemu.host.machine import Machine
from tests.support.gdb import gdb_batch, needs_gdb

pytestmark = needs_gdb


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_job_timeout_while_gdb_holds_the_gpu_rearms_instead_of_resetting():
    """Two job timeouts pass while the CP is held: each returns NO_HANG, no reset happens
    and the job is not failed; after gdb detaches the job finishes without error."""
    port = _free_port()
    with Machine(
        ram_size=8 << 20,
        swap_size=0,
        device="spawn",
        timeout_ns=200_000_000,
        device_args=("--gdb", f"tcp:127.0.0.1:{port}", "-S"),
    ) as m:
        ops = m.driver.sched.ops
        handled, verdicts = threading.Event(), []
        timedout_job = ops.timedout_job

        def counting(job):
            verdicts.append(timedout_job(job))
            if len(verdicts) >= 2:
                handled.set()
            return verdicts[-1]

        ops.timedout_job = counting
        f = m.open()
        released = False
        try:
            bo = f.create_bo(4096)
            va = f.vm_bind(bo)
            fence = f.submit(pk.fill(va, 4096, 0x5A5A5A5A), bos=[(bo, BoAccess.WRITE)])
            assert handled.wait(timeout=30), "the job timeout never fired"
            assert verdicts[:2] == [drm_sched.DrmGpuSchedStat.NO_HANG] * 2
            assert m.driver.gpu.stats.resets == 0
            assert not fence.fence.error
            out = gdb_batch(port, "detach")
            released = "detached" in out
            assert released, out
            f.wait(fence, 10)
            assert f.read(bo, 0, 4) == bytes.fromhex("5a5a5a5a")
        finally:
            if not released:  # never leave the machine's shutdown waiting on a held GPU
                gdb_batch(port, "detach")
        f.close()
        m.check_clean()


def test_hang_recovered_by_reset_leaves_a_core(tmp_path):
    """With --coredump-dir, the guest's reset of a hung GPU (a WAIT_MEM nobody releases,
    past the job timeout) leaves a HANG_RESET core whose pc is the waiting packet."""
    cores = tmp_path / "cores"
    with Machine(
        ram_size=8 << 20,
        swap_size=0,
        device="spawn",
        timeout_ns=200_000_000,
        device_args=("--coredump-dir", str(cores)),
    ) as m:
        f = m.open()
        sem = f.create_bo(4096)
        va = f.vm_bind(sem)
        wait = pk.wait_mem(va, 1, function=WaitFunc.EQ)
        hang = f.submit(wait, bos=[(sem, BoAccess.READ)])
        with pytest.raises(Etimedout, match="GPU reset"):
            f.wait(hang, 10)
        f.close()
        m.check_clean()
    (core,) = cores.iterdir()
    assert core.name.endswith("-HANG_RESET.core")
    info = read_core(core)
    assert info.signal == 6 and info.state.cp_state == CpState.WAITING
    assert read_segment(core, info.pc, len(wait)) == wait
