"""QMP against a booted machine with its device in its own process, driven by QEMU's own
client (qemu.qmp): stop/cont of the GPU with STOP/RESUME and query-status, system_reset with
its RESET event, query-chardev naming every port gemu chose (QMP, console, gdb) and the boot
log printing them; QEMU's -qmp chardev spelling with ``,server`` waiting for its client; and
``gemu run --qmp`` serving QMP between a script's lines."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time

import pytest
from qemu.qmp import QMPClient

from gemu.host.machine import _gemu_command


def _wait_for(cond, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


async def _event(c: QMPClient, name: str) -> dict:
    while True:
        ev = await asyncio.wait_for(c.events.get(), 20)
        if ev["event"] == name:
            return ev


@pytest.fixture
def booted(tmp_path):
    """``gemu boot --gdb tcp::0 -qmp unix:SOCK,server,nowait``, the console on a pipe."""
    sock = tmp_path / "qmp.sock"
    proc = subprocess.Popen(
        [
            *_gemu_command(),
            "boot",
            "-m",
            "16M",
            "--job-timeout",
            "300",
            "--gdb",
            "tcp::0",
            "-qmp",
            f"unix:{sock},server,nowait",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    _wait_for(sock.exists, "the QMP socket")
    yield proc, sock
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=30)


def test_stop_cont_system_reset_and_chardevs_through_qemus_client(booted):
    """stop holds the GPU (STOP event, status paused) for longer than the job timeout (300
    ms) while a job waits in the ring, and the guest takes no hang; system_reset during the
    stop gives RESET with QEMU's reason; cont (RESUME) runs the job to completion; every
    port is in query-chardev and the same gdb port is in the boot log."""
    proc, sock = booted

    async def session() -> dict:
        c = QMPClient("test")
        await c.connect(str(sock))
        chardevs = await c.execute("query-chardev")
        await c.execute("stop")
        assert (await _event(c, "STOP"))["event"] == "STOP"
        assert await c.execute("query-status") == {"running": False, "status": "paused"}
        hmp = "human-monitor-command"
        await c.execute(hmp, {"command-line": "b = bo 4K"})
        await c.execute(hmp, {"command-line": "j = submit fill b 0x5eed"})
        # longer than the job timeout: a held GPU is not a hung one
        await asyncio.sleep(1.0)
        fences = await c.execute("query-gemu-fences")
        assert [f["state"] for f in fences if f["name"] == "j"] == ["pending"], fences
        await c.execute("system_reset")
        reset = await _event(c, "GEMU_GPU_RESET")
        assert reset["data"]["message"] == "system reset requested by the host", reset
        ev = await _event(c, "RESET")
        assert ev["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
        await c.execute("cont")
        await _event(c, "RESUME")
        assert await c.execute("query-status") == {"running": True, "status": "running"}
        out = await c.execute(hmp, {"command-line": "wait j"})
        out += await c.execute(hmp, {"command-line": "expect value b == 0x5eed"})
        stats = await c.execute("query-gemu-stats")
        await c.execute("quit")
        await c.disconnect()
        return {"chardevs": chardevs, "out": out, "stats": stats}

    got = asyncio.run(session())
    out, _ = proc.communicate(timeout=30)
    log = out.decode()
    assert proc.returncode == 0, log
    assert got["stats"]["gpu"]["resets"] == 1, got["stats"]["gpu"]
    assert "j: signaled" in got["out"], got["out"]
    by_label = {d["label"]: d for d in got["chardevs"]}
    assert by_label["compat_monitor0"]["filename"] == f"unix:{sock},server=on"
    assert by_label["serial0"]["filename"] == "stdio"
    gdb = re.search(r"gdb stub listening on (tcp:127\.0\.0\.1:(\d+))", log)
    assert gdb and int(gdb.group(2)) > 0, log
    assert by_label["gdb"]["filename"] == f"{gdb.group(1)},server=on"


def test_qmp_server_without_nowait_waits_for_its_client_before_booting(tmp_path):
    """QEMU's ``-qmp unix:PATH,server`` blocks until a client connects: nothing boots (no
    device spawned, no boot log) until then; with -S the booted machine then waits in
    ``prelaunch`` for ``cont`` (RESUME) before its scripts run, and exits 0."""
    sock = tmp_path / "q.sock"
    script = tmp_path / "a.job"
    script.write_text("a = bo 4K\nfill a 7\nexpect value a == 7\n")
    proc = subprocess.Popen(
        [*_gemu_command(), "run", "--device", "inproc", "-S", "-qmp", f"unix:{sock},server"]
        + [str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        _wait_for(sock.exists, "the QMP socket")
        assert proc.poll() is None

        async def session() -> dict:
            c = QMPClient("test")
            await c.connect(str(sock))
            status = await c.execute("query-status")
            chardevs = await c.execute("query-chardev")
            await c.execute("cont")
            resumed = await _event(c, "RESUME")
            await c.disconnect()
            return {"status": status, "chardevs": chardevs, "resumed": resumed}

        got = asyncio.run(session())
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == 0, (out + err).decode()
    assert f"QMP waiting for connection on unix:{sock},server=on" in err.decode()
    assert got["status"] == {"running": False, "status": "prelaunch"}
    assert got["resumed"]["event"] == "RESUME"
    assert "-S: waiting for QMP cont before the scripts run" in out.decode()
    assert [d["label"] for d in got["chardevs"]] == ["compat_monitor0"]
    assert "QMP listening on unix:" in out.decode()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("unix:/tmp/x,server=off", "server=off is not supported"),
        ("unix:/tmp/x,server,telnet", "option 'telnet' is not supported"),
        ("unix:/tmp/x,wait=maybe", "wait=maybe: use on or off"),
    ],
)
def test_qmp_chardev_options_gemu_cannot_honour_are_refused(spec, message):
    r = subprocess.run(
        [*_gemu_command(), "run", "--device", "inproc", "-qmp", spec, "x.job"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 2
    assert "argument -qmp" in r.stderr and message in r.stderr, r.stderr
