"""``gemu boot`` driven through its real console with pexpect, the way CI drives QEMU.

Each test spawns the installed ``gemu`` console script, waits for the boot log and the
``gemu# `` prompt, types commands and checks what comes back and the exit status: on the
process's own pty (``--serial stdio``), on a new pty (``--serial pty``, path read from the
"char device redirected to" notice) and on a UNIX socket (``--serial unix:``). Failure paths:
a failing expectation, bad input lines, Ctrl-C, a device killed mid-run, a device that is
not there. Timeouts are deadlines scaled by ``GEMU_TIMEOUT_MULT`` (slow CI runners), never
sleeps.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess

import pexpect
import pexpect.fdpexpect
import pytest

from tests.support.device import gemu_executable, spawn_device

MULT = float(os.environ.get("GEMU_TIMEOUT_MULT", "1"))
T = 20 * MULT  # seconds, for one expect
PROMPT = "gemu# "
RAM = ["-m", "16M"]


def _spawn(*args: str) -> pexpect.spawn:
    exe, *pre = gemu_executable()
    child = pexpect.spawn(
        exe, [*pre, *args], timeout=T, encoding="utf-8", codec_errors="replace", echo=False
    )
    child.delaybeforesend = None
    return child


def _exit_status(child: pexpect.spawn) -> int:
    child.expect(pexpect.EOF, timeout=T)
    child.close()
    return child.exitstatus if child.exitstatus is not None else 128 + child.signalstatus


@pytest.fixture
def booted():
    """``gemu boot -m 16M`` on a pty (stdio console), at its first prompt."""
    child = _spawn("boot", *RAM)
    child.expect_exact(PROMPT)
    yield child
    if child.isalive():
        child.terminate(force=True)


def _run(child, line: str) -> str:
    """Send a line, return the output up to the next prompt."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    return child.before


def test_boot_log_then_commands_then_poweroff_exits_0(booted):
    """The boot log names the device, memory, swap and ring; commands create a BO, run a
    copy job and check it; poweroff prints the summary and exits 0."""
    log = booted.before
    assert "GPU_ID 0x67656d75" in log and "16 MiB guest RAM" in log and "swap" in log
    out = _run(booted, "src = bo 64K")
    assert re.search(r"src: handle \d+, 64 KiB, GPU VA 0x", out)
    _run(booted, "dst = bo 64K")
    _run(booted, "fill src random 1")
    assert "submitted (copy 64 KiB src -> dst)" in _run(booted, "f1 = submit copy src dst")
    assert "f1: signaled" in _run(booted, "wait f1")
    _run(booted, "expect crc dst == src")
    assert re.search(r"dst +\d+ +64 KiB resident", _run(booted, "info objects"))
    booted.sendline("poweroff")
    booted.expect("checks passed")
    booted.expect("Power down")
    assert _exit_status(booted) == 0


def test_bad_input_lines_are_reported_and_the_shell_goes_on(booted):
    """Unknown commands, wrong argument counts, unknown names and bad values each print
    one error naming the problem and the prompt comes back; each is a failed line, so the
    session exits 1 with a FAIL line naming each (the one rule of docs/job-scripts.md)."""
    assert "unknown command 'frobnicate'" in _run(booted, "frobnicate 1 2")
    assert "bo: takes 1 to 3 arguments, got 0" in _run(booted, "bo")
    assert "no BO named 'nosuch'" in _run(booted, "read nosuch")
    assert "bo: SIZE '12Q' is not a number" in _run(booted, "bo 12Q")
    assert "usage: expect WHAT" in _run(booted, "help expect")
    booted.sendline("poweroff")
    booted.expect("4 failed;")
    for line in (1, 2, 3, 4):
        booted.expect_exact(f"FAIL: <console>:{line}: ")
    assert _exit_status(booted) == 1


def test_task_block_typed_at_the_console_runs_concurrently(booted):
    """`task NAME` switches to the block prompt until `end`, which starts the task; its
    lines come back prefixed with [NAME]; `join` waits for it; the session exits 0."""
    _run(booted, "src = bo 64K")
    _run(booted, "fill src random 2")
    booted.sendline("task bg")
    booted.expect_exact("...> ")
    booted.sendline("dst = bo 64K")
    booted.expect_exact("...> ")
    booted.sendline("f = submit copy src dst")
    booted.expect_exact("...> ")
    booted.sendline("wait f")
    booted.expect_exact("...> ")
    out = _run(booted, "end")
    out += _run(booted, "join bg")
    assert "task bg: started (3 lines)" in out
    assert "[bg] f: job" in out and "[bg] f: signaled" in out
    _run(booted, "expect crc dst == src")
    booted.sendline("poweroff")
    booted.expect("checks passed")
    assert _exit_status(booted) == 0


def test_failing_expectation_makes_the_exit_status_1(booted):
    """An expectation that does not hold is reported with its line and makes the session
    fail: exit status 1 after poweroff, with FAIL in the summary."""
    _run(booted, "a = bo 4K")
    out = _run(booted, "expect crc a == 0x1234")
    assert "<console>:2: expect crc a: got 0x" in out
    booted.sendline("poweroff")
    booted.expect("1 failed;")
    booted.expect_exact("FAIL: <console>:2: expect crc a: got 0x")
    assert _exit_status(booted) == 1


def test_unexpected_gpu_fault_makes_the_exit_status_1(booted):
    """A job that faulted and that no expectation accounted for fails the session."""
    _run(booted, "f = submit fault")
    booted.sendline("poweroff")
    booted.expect("unexpected GPU fault: f ")
    assert _exit_status(booted) == 1


def test_ctrl_c_powers_off_cleanly_with_130(booted):
    """Ctrl-C at the prompt powers the machine off (summary, Power down) and exits 130."""
    booted.sendintr()
    booted.expect("interrupted")
    booted.expect("Power down")
    assert _exit_status(booted) == 130


def test_eof_powers_off_with_0(booted):
    """End of input (Ctrl-D) powers off like poweroff."""
    booted.sendeof()
    booted.expect("Power down")
    assert _exit_status(booted) == 0


def test_serial_pty_prints_its_path_and_serves_the_shell():
    """--serial pty prints QEMU's "char device redirected to /dev/pts/N" and serves the
    console there (raw line: the guest echoes and ends lines with CRLF)."""
    child = _spawn("boot", *RAM, "--serial", "pty")
    try:
        child.expect(r"char device redirected to (/dev/pts/\d+) \(label serial0\)")
        fd = os.open(child.match.group(1), os.O_RDWR | os.O_NOCTTY)
        con = pexpect.fdpexpect.fdspawn(fd, timeout=T, encoding="utf-8")
        con.expect_exact(PROMPT)
        con.send("echo hello over the pty\r")
        con.expect_exact("hello over the pty\r\n")
        con.expect_exact(PROMPT)
        con.send("poweroff\r")
        con.expect("Power down")
        os.close(fd)
        assert _exit_status(child) == 0
    finally:
        if child.isalive():
            child.terminate(force=True)


def test_serial_unix_socket_waits_for_a_client(tmp_path):
    """--serial unix:PATH waits for one client, then boots with the console on it; the
    client closing the connection (EOF) powers the machine off."""
    path = tmp_path / "console.sock"
    child = _spawn("boot", *RAM, "--serial", f"unix:{path}")
    try:
        child.expect("waiting for connection on unix:")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        con = pexpect.fdpexpect.fdspawn(sock.fileno(), timeout=T, encoding="utf-8")
        con.expect("ring ready")
        con.expect_exact(PROMPT)
        con.send("a = bo 8K\r")
        con.expect(r"a: handle \d+, 8 KiB")
        con.expect_exact(PROMPT)
        sock.shutdown(socket.SHUT_WR)
        con.expect("Power down")
        sock.close()
        assert _exit_status(child) == 0
    finally:
        if child.isalive():
            child.terminate(force=True)


def test_device_killed_mid_run_is_reported_and_exits_3():
    """A `gemu device` started separately and killed while the guest runs: the guest
    reports the lost device on its console by itself and the emulator exits 3 without
    hanging."""
    with spawn_device(log_level="warning") as dev:
        child = _spawn("boot", *RAM, "--device", dev.spec)
        try:
            child.expect_exact(PROMPT)
            _run(child, "a = bo 4K")
            dev.proc.kill()
            dev.proc.wait(10 * MULT)
            child.expect("device lost")
            child.expect("Power down")
            assert _exit_status(child) == 3
        finally:
            if child.isalive():
                child.terminate(force=True)


def test_unreachable_device_is_a_clear_error_with_status_3(tmp_path):
    """--device naming a socket nobody listens on: a boot error naming it, exit 3."""
    proc = subprocess.run(
        [*gemu_executable(), "run", "--device", f"unix:{tmp_path}/none.sock", "/dev/null"],
        capture_output=True,
        text=True,
        timeout=T,
    )
    assert proc.returncode == 3
    assert f"device unix:{tmp_path}/none.sock unreachable" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["boot", "-m", "12X"], "invalid size '12X': unknown suffix 'X' (use K, M or G)"),
        (["boot", "--swap", "1Q"], "unknown suffix 'Q'"),
        (["boot", "--serial", "carrier-pigeon"], "unknown console 'carrier-pigeon'"),
        (["boot", "--serial", "tcp:0.0.0.0:5555"], "refusing to listen on 0.0.0.0"),
        (["boot", "--device", "udp:1"], "unknown transport 'udp'"),
        (["boot", "--log", "loud"], "invalid log item 'loud'"),
        (["run"], "the following arguments are required: SCRIPT"),
    ],
)
def test_bad_options_exit_2_naming_the_value(args, message):
    """Bad command lines are argparse errors (status 2) quoting the bad value."""
    proc = subprocess.run([*gemu_executable(), *args], capture_output=True, text=True, timeout=T)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_run_missing_or_bad_script_exits_2_naming_file_and_line(tmp_path):
    """`gemu run` parses every script before booting: a missing file or a bad line is
    reported as file:line and the status is 2."""
    proc = subprocess.run(
        [*gemu_executable(), "run", str(tmp_path / "nope.job")],
        capture_output=True,
        text=True,
        timeout=T,
    )
    assert proc.returncode == 2
    assert f"{tmp_path}/nope.job:0: no such file" in proc.stderr
    bad = tmp_path / "bad.job"
    bad.write_text("a = bo 4K\n\n# fine\nsubmit\n")
    proc = subprocess.run(
        [*gemu_executable(), "run", str(bad)], capture_output=True, text=True, timeout=T
    )
    assert proc.returncode == 2
    assert f"{bad}:4: submit: takes at least 1 arguments, got 0" in proc.stderr


def test_run_failing_script_stops_at_the_line_and_exits_1(tmp_path):
    """A script whose expectation fails stops there (later lines do not run), names
    file:line, and `gemu run` exits 1."""
    script = tmp_path / "fail.job"
    script.write_text("a = bo 4K\nfill a 7\nexpect value a == 8\necho not reached\n")
    proc = subprocess.run(
        [*gemu_executable(), "run", str(script)], capture_output=True, text=True, timeout=T
    )
    assert proc.returncode == 1, proc.stdout
    assert f"{script}:3: expect value a: got 7, expected == 8" in proc.stdout
    assert "not reached\n" not in proc.stdout.replace("echo not reached", "")


def test_serial_tcp_loopback_console():
    """--serial tcp:127.0.0.1:0 picks a port, announces it, and serves the shell to the
    first client."""
    child = _spawn("boot", *RAM, "--serial", "tcp:127.0.0.1:0")
    try:
        child.expect(r"waiting for connection on tcp:127\.0\.0\.1:(\d+)")
        sock = socket.create_connection(("127.0.0.1", int(child.match.group(1))), timeout=T)
        con = pexpect.fdpexpect.fdspawn(sock.fileno(), timeout=T, encoding="utf-8")
        con.expect_exact(PROMPT)
        con.send("info mem\r")
        con.expect(r"mem: \d+ of \d+ pages free")
        con.expect_exact(PROMPT)
        con.send("poweroff\r")
        con.expect("Power down")
        sock.close()
        assert _exit_status(child) == 0
    finally:
        if child.isalive():
            child.terminate(force=True)


def test_serial_pyserial_url_console():
    """--serial serial:socket://HOST:PORT goes through pyserial (as a serial port would):
    the emulator connects out and the shell runs over that line."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(T)
    port = listener.getsockname()[1]
    child = _spawn("boot", *RAM, "--serial", f"serial:socket://127.0.0.1:{port}")
    try:
        conn, _ = listener.accept()
        con = pexpect.fdpexpect.fdspawn(conn.fileno(), timeout=T, encoding="utf-8")
        con.expect("ring ready")
        con.expect_exact(PROMPT)
        con.send("echo over pyserial\r")
        con.expect_exact("over pyserial\r\n")
        con.send("poweroff\r")
        con.expect("Power down")
        assert _exit_status(child) == 0
        conn.close()
    finally:
        listener.close()
        if child.isalive():
            child.terminate(force=True)


def test_sigterm_powers_off_cleanly_with_143(booted):
    """SIGTERM (a CI job cancelled) powers the machine off like QEMU ("terminating on
    signal 15") and exits 143."""
    booted.kill(15)
    booted.expect("terminating on signal 15")
    booted.expect("Power down")
    assert _exit_status(booted) == 143
