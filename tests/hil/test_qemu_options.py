"""QEMU's spellings for logs, tracing and running in the background, through the real CLI:
``-D FILE`` (the log, the device's included, in a file as it happens), ``-d`` (= --log),
``-trace PATTERN`` (tracepoints by name to the log), ``-pidfile`` and ``-daemonize``."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from gemu.host.machine import _gemu_command
from gemu.host.tracefile import EVENTS, event_names

ROOT = Path(__file__).resolve().parents[2]
PRESSURE = str(ROOT / "examples" / "jobs" / "pressure.job")
HELLO = str(ROOT / "examples" / "jobs" / "hello.job")


def _run(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*_gemu_command(), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _wait_for(cond, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_trace_help_lists_every_tracepoint():
    r = _run("run", "-trace", "help", HELLO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == event_names()
    assert len(event_names()) == sum(2 if kind == "b" else 1 for _, _, kind in EVENTS)


def test_trace_patterns_print_matching_events_to_the_log_file(tmp_path):
    """-trace globs enable events in order (a later -PATTERN disables), an events= file
    adds patterns; with -D the lines go to the file in QEMU's log-backend shape; stdout and
    stderr carry none of them; the device's own log (-d device) is in the same file."""
    log = tmp_path / "gemu.log"
    events = tmp_path / "events"
    events.write_text("# swap-in spans\ngem_swapin_*\n")
    r = _run(
        "run",
        "-m",
        "16M",
        "-D",
        str(log),
        "-d",
        "guest_errors,device",
        "-trace",
        "gem_*",
        "-trace",
        "enable=-gem_vma_node_unmap",
        "-trace",
        f"events={events}",
        PRESSURE,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    text = log.read_text()
    names = {ln.split(":", 1)[1].split()[0] for ln in text.splitlines() if "@" in ln.split(":")[0]}
    assert {"gem_evict", "gem_swapin_begin", "gem_swapin_end"} <= names
    assert "gem_vma_node_unmap" not in names and "job_begin" not in names
    assert "gemu.device.server: INFO: client connected" in text
    assert "gem_evict" not in r.stdout + r.stderr
    assert "gemu.device.server" not in r.stderr


def test_trace_file_option_and_the_json_trace_keep_only_enabled_events(tmp_path):
    out = tmp_path / "events.txt"
    js = tmp_path / "trace.json"
    r = _run("run", "--device", "inproc", "--trace", str(js), "-trace", f"job_*,file={out}", HELLO)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = out.read_text().splitlines()
    assert lines and all(":job_begin " in ln or ":job_end " in ln for ln in lines)
    import json

    cats = {e["cat"] for e in json.loads(js.read_text())["traceEvents"] if "cat" in e}
    assert cats == {"job"}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nosuch_*", "'nosuch_*' matches no trace event"),
        ("job_*,colour=red", "option 'colour' is not supported"),
        ("events=/nonexistent/x", "events=/nonexistent/x: No such file or directory"),
    ],
)
def test_bad_trace_specs_are_usage_errors(spec, message):
    r = _run("run", "-trace", spec, HELLO)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_pidfile_is_written_locked_and_removed(tmp_path):
    """A second gemu with the same -pidfile is refused while the first runs; the file names
    the running process and is gone after it exits."""
    pid = tmp_path / "gemu.pid"
    sock = tmp_path / "q.sock"
    first = subprocess.Popen(
        [*_gemu_command(), "boot", "--device", "inproc", "-pidfile", str(pid)]
        + ["--qmp", f"unix:{sock}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(sock.exists, "the first machine")
        assert int(pid.read_text()) == first.pid
        r = _run("run", "--device", "inproc", "-pidfile", str(pid), HELLO)
        assert r.returncode == 2
        assert f"is locked by another gemu (pid {first.pid})" in r.stderr
        first.stdin.close()  # end of console input: power off
        assert first.wait(60) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(30)
    assert not pid.exists()


def test_daemonize_detaches_after_boot_and_qmp_quits_it(tmp_path):
    """The parent exits 0 once the machine has booted; the machine runs on in its own session
    (pid in -pidfile), answers QMP, and quit powers it off and removes the pidfile."""
    pid = tmp_path / "gemu.pid"
    sock = tmp_path / "q.sock"
    log = tmp_path / "gemu.log"
    r = _run(
        "boot",
        "-daemonize",
        "-pidfile",
        str(pid),
        "--serial",
        "pty",
        "-qmp",
        f"unix:{sock},server,nowait",
        "-D",
        str(log),
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "char device redirected to /dev/pts/" in r.stderr
    child = int(pid.read_text())
    assert child != os.getpid() and os.getsid(child) == child  # a session of its own
    assert sock.exists()  # QMP listened before the parent was released

    async def session() -> dict:
        c = QMPClient("test")
        await c.connect(str(sock))
        status = await c.execute("query-status")
        await c.execute("quit")
        await c.disconnect()
        return status

    assert asyncio.run(session()) == {"running": True, "status": "running"}

    def gone() -> bool:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return True
        return False

    _wait_for(gone, "the daemon to power off")
    _wait_for(lambda: not pid.exists(), "the pidfile to go")


def test_daemonize_refuses_a_stdio_console():
    r = _run("boot", "--device", "inproc", "-daemonize")
    assert r.returncode == 2
    assert "-daemonize: the console is stdio" in r.stderr


def test_serial_client_mode_connects_to_a_listening_terminal(tmp_path):
    """``-serial unix:PATH`` without ``server``: gemu connects to the terminal server there
    (as QEMU's client chardev does), boots on it, and powers off when told to; with nothing
    listening it is an error naming the socket, not a hang."""
    import socket

    path = tmp_path / "term.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    server.settimeout(60)
    proc = subprocess.Popen(
        [*_gemu_command(), "boot", "--device", "inproc", "-serial", f"unix:{path}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        conn, _ = server.accept()
        conn.settimeout(60)
        seen = b""
        while b"gemu# " not in seen:
            chunk = conn.recv(4096)
            assert chunk, seen
            seen += chunk
        conn.sendall(b"poweroff\r")
        while b"Power down" not in seen:
            chunk = conn.recv(4096)
            if not chunk:
                break
            seen += chunk
        assert proc.wait(60) == 0
        assert b"boot done" in seen and b"reboot: Power down" in seen
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
        server.close()
    r = _run("boot", "--device", "inproc", "-serial", f"unix:{tmp_path / 'nobody'}")
    assert r.returncode == 2
    assert "cannot connect" in r.stderr and "add ,server" in r.stderr, r.stderr
