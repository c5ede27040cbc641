"""The machine's run state against the real device: stop and cont of the GPU (QMP ``stop`` /
``cont``, the device's RUN_STATE request) and a host-requested GPU reset (QMP
``system_reset``), with their interplay with a debugger's hold and the guest's job timeout."""

from __future__ import annotations

import threading
import time

import pytest

from gemu.device.abi import packets as pk
from gemu.device.abi import protocol as p
from gemu.device.gpu import Gpu
from gemu.guest.errors import Etimedout
from gemu.guest.gemu_drv.uapi import WRITE
from gemu.host.machine import Machine

# A bounded wait for something that must NOT happen while the GPU is held: long enough that
# a running CP would have finished the one-packet job many times over.
HELD_S = 1.0


@pytest.fixture
def machine():
    with Machine(ram_size=8 << 20, swap_size=16 << 20, device="spawn", timeout_ns=500_000_000) as m:
        yield m
        m.check_clean()


def test_stop_holds_jobs_and_cont_runs_them_without_a_timeout_reset(machine):
    """A job submitted while the machine is stopped stays unsignalled, longer than the job
    timeout (500 ms); after cont it completes with its data and no error, and the guest never
    took the stop for a hang (no reset)."""
    f = machine.open()
    out = f.create_bo(4096)
    va = f.vm_bind(out)
    machine.stop()
    assert machine.paused()
    fence = f.submit(pk.write_data(va, [0xC0FFEE]), bos=[(out, WRITE)])
    with pytest.raises(Etimedout):
        f.wait(fence, HELD_S)
    machine.cont()
    assert not machine.paused()
    f.wait(fence, 5)
    assert f.read(out, 0, 4) == (0xC0FFEE).to_bytes(4, "little")
    assert machine.driver.gpu.stats.resets == 0
    f.close()


def test_system_reset_resubmits_the_job_the_reset_lost(machine):
    """system_reset while a job sits in the ring (the GPU stopped): the driver's reset path
    re-emits it, and after cont it completes as if nothing happened; one reset counted."""
    f = machine.open()
    out = f.create_bo(4096)
    va = f.vm_bind(out)
    machine.stop()
    fence = f.submit(pk.write_data(va, [0x5EED]), bos=[(out, WRITE)])
    gpu = machine.driver.gpu
    deadline = time.monotonic() + 5
    while gpu.stats.jobs_emitted < 1:  # the scheduler put it in the ring (not yet run)
        assert time.monotonic() < deadline, "the job never reached the ring"
        time.sleep(0.001)
    done = threading.Event()
    machine.system_reset(done.set)
    assert done.wait(5)
    machine.cont()
    f.wait(fence, 5)
    assert f.read(out, 0, 4) == (0x5EED).to_bytes(4, "little")
    assert gpu.stats.resets == 1 and gpu.stats.resubmitted == 1
    f.close()


def test_run_state_request_errors_name_the_value(machine):
    from gemu.device.abi.client import DeviceError

    with pytest.raises(
        DeviceError, match=r"unknown run request 7 \(0 QUERY, 1 STOP, 2 CONT, 3 POWEROFF\)"
    ):
        machine.client.run_state(7)
    assert machine.client.run_state() == (False, False)


def test_a_debugger_hold_outlives_cont_and_a_stop_outlives_gdb_continue():
    """The machine's hold and a debugger's are separate: cont leaves gdb's halt (or a
    breakpoint stop) in place, and a debugger resume during a stop keeps the CP held."""
    gpu = Gpu()
    gpu.halt()  # gdb halted
    gpu.pause()  # QMP stop
    gpu.unpause()  # QMP cont
    assert gpu.cp.halted and not gpu.paused
    gpu.resume()  # gdb continue
    assert not gpu.cp.halted

    gpu.pause()
    gpu.resume()  # gdb continue while the machine is stopped
    assert gpu.cp.halted and gpu.paused
    gpu.unpause()
    assert not gpu.cp.halted

    gpu.cp.halted = True  # a breakpoint stop sets the CP's hold itself
    gpu.pause()
    gpu.unpause()
    assert gpu.cp.halted


def test_run_state_is_a_protocol_1_1_command():
    assert p.PROTOCOL_MINOR >= 1
    assert p.REQUESTS[p.Command.RUN_STATE] == (p.RUN_STATE_REQ, p.RUN_STATE_REPLY)
