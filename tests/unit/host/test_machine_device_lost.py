"""``Machine.device_lost()`` names how a spawned device died, even when the host sees the
closed connection before the device process has been reaped.

A device killed by a signal closes its socket while the kernel is still tearing the process
down: the client's read returns end-of-file a moment before ``waitpid`` can report the
status. The reason given then must still be the exit status ("exited with status -9"), not
"the device closed the connection"; a CI run once reported the latter.
"""

from __future__ import annotations

import subprocess
import sys
import types

from gemu.device.abi.client import DeviceGone, DeviceTimeout
from gemu.host.machine import Machine

# waits for end-of-file on stdin, then kills itself with SIGKILL
_DIES_ON_EOF = "import os, signal, sys; sys.stdin.read(); os.kill(os.getpid(), signal.SIGKILL)"


def _machine(proc: subprocess.Popen, gone: Exception | None) -> Machine:
    m = Machine.__new__(Machine)  # only the fields device_lost() reads
    m.client = types.SimpleNamespace(_gone=gone)
    m._proc = proc
    m._down = False
    m._exit_waited = False
    m.device_timeout = 2.0
    return m


def _dying_device() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _DIES_ON_EOF], stdin=subprocess.PIPE)


def test_a_closed_connection_reports_the_exit_status_of_the_dying_device():
    proc = _dying_device()
    try:
        m = _machine(proc, DeviceGone("the device closed the connection"))
        proc.stdin.close()  # the device starts dying now; it has not exited yet
        assert m.device_lost() == "gemu device process exited with status -9 (killed by SIGKILL)"
    finally:
        proc.kill()
        proc.wait()


def test_a_timeout_does_not_wait_for_the_device_to_exit():
    """A stopped device never exits by itself: the timeout is the reason, at once."""
    proc = _dying_device()
    try:
        m = _machine(proc, DeviceTimeout("REG_READ 0x0: reply: no answer within 2 s"))
        assert m.device_lost() == "REG_READ 0x0: reply: no answer within 2 s"
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_a_live_device_that_closed_the_connection_is_waited_for_once_and_boundedly():
    """A device that closed the connection but keeps running: the reason is the closed
    connection, after one wait bounded by ``device_timeout``; later calls do not wait."""
    proc = _dying_device()
    waits: list[float | None] = []
    real_wait = proc.wait

    def counted_wait(timeout=None):
        waits.append(timeout)
        return real_wait(timeout)

    proc.wait = counted_wait
    try:
        m = _machine(proc, DeviceGone("the device closed the connection"))
        m.device_timeout = 0.05
        assert m.device_lost() == "the device closed the connection"
        assert m.device_lost() == "the device closed the connection"
        assert waits == [0.05]
    finally:
        proc.kill()
        real_wait()
