"""A device process that stops answering (SIGSTOP) or dies (SIGKILL) in the middle of a run is
reported as lost, with exit status 3 and one message naming what timed out and after how long,
under ``gemu run``, ``gemu boot`` with a script on stdin and ``gemu boot`` at an interactive
console, within the bound docs/emulator.md states: ``--device-timeout`` after the request the
device does not answer (``--job-timeout`` more when only GPU jobs were outstanding).

The device is found as the child process of ``gemu`` whose command line is ``gemu device``.
Every wait below is a deadline on a condition, scaled by ``GEMU_TIMEOUT_MULT``; a host that
hangs fails the test at the deadline instead of hanging it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pexpect
import psutil
import pytest

from tests.support.device import gemu_executable

ROOT = Path(__file__).resolve().parents[2]
PRESSURE = ROOT / "examples" / "jobs" / "pressure.job"
MULT = float(os.environ.get("GEMU_TIMEOUT_MULT", "1"))
DEVICE_TIMEOUT = 2.0  # --device-timeout for these runs (seconds)
JOB_TIMEOUT = 2.0  # the default --job-timeout
SLACK = 3.0 * MULT  # process start-up and scheduling on a loaded runner
BOUND = DEVICE_TIMEOUT + JOB_TIMEOUT + SLACK
LOST = re.compile(r"device lost: .*(no answer from the device within 2 s|exited with status -9)")


def _device_child(pid: int, deadline: float) -> psutil.Process:
    """The ``gemu device`` process ``gemu`` (pid) spawned."""
    while time.monotonic() < deadline:
        for child in psutil.Process(pid).children():
            try:
                if "device" in child.cmdline():
                    return child
            except psutil.NoSuchProcess:
                continue
    raise AssertionError(f"gemu (pid {pid}) has no `gemu device` child")


@pytest.fixture
def reap():
    """Kill whatever a test leaves behind (a stopped device, a hung host) by pid."""
    procs: list[psutil.Process | subprocess.Popen | pexpect.spawn] = []
    yield procs.append
    for p in procs:
        if isinstance(p, pexpect.spawn):
            if p.isalive():
                p.terminate(force=True)
            continue
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            p.kill()


def _read_until(stream, pattern: re.Pattern | str, deadline: float) -> tuple[str, str]:
    """Lines of ``stream`` up to the first matching one (deadline: the caller's timer)."""
    seen = []
    for line in stream:
        seen.append(line)
        if re.search(pattern, line):
            return line, "".join(seen)
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"no line matching {pattern!r}:\n" + "".join(seen))


def _start_run(reap) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            *gemu_executable(),
            "run",
            "--device-timeout",
            str(DEVICE_TIMEOUT),
            str(PRESSURE),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    reap(proc)
    return proc


def _finish(proc: subprocess.Popen, t_signal: float, seen: str) -> tuple[int, str, float]:
    """Wait (bounded) for the host to report the loss and exit; (status, output, seconds
    from the signal to the device-lost line)."""
    deadline = t_signal + BOUND
    lost_at = None
    out = [seen]
    for line in proc.stdout:
        out.append(line)
        if lost_at is None and LOST.search(line):
            lost_at = time.monotonic() - t_signal
        if time.monotonic() > deadline + SLACK:
            break
    proc.wait(timeout=SLACK)
    text = "".join(out)
    assert lost_at is not None, text
    return proc.returncode, text, lost_at


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL], ids=["SIGSTOP", "SIGKILL"])
def test_run_reports_a_stopped_or_killed_device_as_lost(sig, reap):
    """`gemu run` of the pressure script: the device stopped or killed while BOs are filled
    ends the run with exit 3 and "device lost: ..." within the bound, not a hang."""
    proc = _start_run(reap)
    _, seen = _read_until(proc.stdout, "filling 12 BOs", time.monotonic() + 60 * MULT)
    device = _device_child(proc.pid, time.monotonic() + 10 * MULT)
    reap(device)
    t0 = time.monotonic()
    os.kill(device.pid, sig)
    status, out, lost_after = _finish(proc, t0, seen)
    assert status == 3, out
    assert lost_after < BOUND, f"device loss reported after {lost_after:.1f} s:\n{out}"
    if sig == signal.SIGSTOP:
        assert re.search(r"(REG_\w+ 0x[0-9a-f]+|\w+): (reply|send): no answer", out), out
    assert "Traceback" not in out


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL], ids=["SIGSTOP", "SIGKILL"])
def test_boot_with_a_script_on_stdin_reports_the_lost_device(sig, reap):
    """`gemu boot` reading a script from a pipe: after the device is stopped or killed, the
    next lines that reach it end the boot with exit 3 and the device-lost message."""
    proc = subprocess.Popen(
        [*gemu_executable(), "boot", "-m", "16M", "--device-timeout", str(DEVICE_TIMEOUT)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    reap(proc)
    proc.stdin.write("a = bo 1M\n")
    proc.stdin.flush()
    _, seen = _read_until(proc.stdout, r"a: handle \d+", time.monotonic() + 60 * MULT)
    device = _device_child(proc.pid, time.monotonic() + 10 * MULT)
    reap(device)
    t0 = time.monotonic()
    os.kill(device.pid, sig)
    proc.stdin.write("b = bo 1M\nf = submit copy a b\nwait f\nfill a random 1\n")
    proc.stdin.flush()
    status, out, lost_after = _finish(proc, t0, seen)
    assert status == 3, out
    assert lost_after < BOUND, f"device loss reported after {lost_after:.1f} s:\n{out}"
    assert "Traceback" not in out


def test_interactive_boot_reports_a_stopped_device(reap):
    """At the console: the device is stopped while gemu waits at the prompt; without another
    line typed, gemu reports "device lost: REG_READ ...: no answer ... within 2 s" (the idle
    console probes the device once a second) and exits 3."""
    exe, *pre = gemu_executable()
    child = pexpect.spawn(
        exe,
        [*pre, "boot", "-m", "16M", "--device-timeout", str(DEVICE_TIMEOUT)],
        timeout=60 * MULT,
        encoding="utf-8",
        codec_errors="replace",
        echo=False,
    )
    reap(child)
    child.expect_exact("gemu# ")
    device = _device_child(child.pid, time.monotonic() + 10 * MULT)
    reap(device)
    t0 = time.monotonic()
    os.kill(device.pid, signal.SIGSTOP)
    child.expect(LOST.pattern, timeout=BOUND)
    lost_after = time.monotonic() - t0
    child.expect(pexpect.EOF, timeout=BOUND)
    child.close()
    assert child.exitstatus == 3, child.before
    assert lost_after < BOUND
    assert "Traceback" not in child.before


def test_machine_api_reports_a_stopped_device_as_device_lost(reap):
    """The Python API: with the device stopped, the next request raises DeviceLost (its
    DeviceTimeout subclass) naming the register and the limit, ``device_lost()`` says the
    same from then on, and shutdown does not wait for the stopped process."""
    from gemu.device.abi import regs
    from gemu.host.machine import DeviceLost, DeviceTimeout, Machine

    m = Machine(ram_size=16 << 20, swap_size=0, device_timeout=0.5)
    try:
        assert m.probe_device() is None
        reap(psutil.Process(m._proc.pid))
        os.kill(m._proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(DeviceLost) as info:
            m.client.readl(regs.IRQ_STATUS.offset)
        took = time.monotonic() - t0
        assert isinstance(info.value, DeviceTimeout)
        assert f"REG_READ {regs.IRQ_STATUS.offset:#x}" in str(info.value)
        assert "within 0.5 s" in str(info.value)
        assert 0.4 < took < 0.5 + SLACK
        assert m.device_lost() == str(info.value)
        assert m.probe_device() == str(info.value)  # no second wait once lost
    finally:
        t0 = time.monotonic()
        m.shutdown()
        assert time.monotonic() - t0 < 0.5 + SLACK
