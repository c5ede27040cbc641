"""A user's mistake on the ``gemu`` command line gets a message naming what was wrong and a
documented exit status, never a traceback: ``--trace`` into a missing folder (refused before
the boot), ``explore --replay`` of a bad or foreign file, ``explore --cluster`` with nothing
listening (a bounded connect, exit 3 and not 1, which means "violation found"), Ctrl-C during
``explore`` (the partial report, exit 130), and numbers out of range (``-m 99T``, ``-m -5M``:
exit 2 naming the value, not a failed boot). Everything goes through the installed ``gemu``
script; waits are deadlines, scaled by ``GEMU_TIMEOUT_MULT``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.device import gemu_executable

ROOT = Path(__file__).resolve().parents[2]
HELLO = ROOT / "examples" / "jobs" / "hello.job"
MULT = float(os.environ.get("GEMU_TIMEOUT_MULT", "1"))
T = 60 * MULT


def gemu(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*gemu_executable(), *args], capture_output=True, text=True, timeout=T, cwd=cwd
    )


def _no_traceback(proc) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_trace_into_a_missing_folder_is_refused_before_boot(tmp_path):
    """`gemu run --trace missing/run.json` exits 2 naming the folder, and boots nothing."""
    target = tmp_path / "missing" / "run.json"
    proc = gemu("run", "--trace", str(target), str(HELLO))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert str(target.parent) in proc.stderr
    assert "booting" not in proc.stdout
    _no_traceback(proc)


def test_trace_naming_a_directory_is_refused(tmp_path):
    proc = gemu("boot", "--trace", str(tmp_path))
    assert proc.returncode == 2
    assert "is a directory" in proc.stderr
    _no_traceback(proc)


FOREIGN = {
    "not-json": b"this is not JSON\n",
    "binary": b"\xff\xfe\x00\x01",
    "trace-json": b'{"traceEvents": []}',
    "json-list": b"[1, 2, 3]",
    "bad-scenario": b'{"config": {"scenario": {"no_such_field": 1}}, "seed": 1, "schedule": []}',
    "bad-schedule": b'{"config": {"scenario": {}}, "seed": 1, "schedule": "abc"}',
}


@pytest.mark.parametrize("content", FOREIGN.values(), ids=FOREIGN.keys())
def test_replay_of_a_bad_or_foreign_file(tmp_path, content):
    """`explore --replay FILE` of something that is not a repro.json: exit 2, the file and
    the reason on stderr."""
    path = tmp_path / "repro.json"
    path.write_bytes(content)
    proc = gemu("explore", "--replay", str(path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert str(path) in proc.stderr and "not a repro.json" in proc.stderr
    _no_traceback(proc)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cluster_with_nothing_listening(tmp_path):
    """`explore --cluster tcp://127.0.0.1:PORT` with no scheduler there: after
    --connect-timeout, exit 3 (documented: could not run) with the address in the message."""
    address = f"tcp://127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    proc = gemu(
        "explore", "--cluster", address, "--connect-timeout", "1", "--schedules", "2", cwd=tmp_path
    )
    took = time.monotonic() - t0
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert address in proc.stderr and "within 1 s" in proc.stderr
    assert took < 1 + 15 * MULT
    _no_traceback(proc)


CTRL_C = {
    "random-2-workers": ["small", "--schedules", "1000000", "--workers", "2"],
    "random-in-process": ["small", "--schedules", "1000000", "--workers", "1"],
    "exhaustive-in-process": [
        "--strategy",
        "exhaustive",
        "--preemption-bound",
        "3",
        "--workers",
        "1",
    ],
}


@pytest.mark.parametrize("options", CTRL_C.values(), ids=CTRL_C.keys())
def test_ctrl_c_during_explore_prints_the_partial_report(tmp_path, options):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) once the first
    progress line is out: the partial report on stdout, no traceback from the campaign or
    its worker processes, no schedule reported as crashed by the interrupt, exit 130."""
    proc = subprocess.Popen(
        [*gemu_executable(), "explore", *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + T
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if "schedules/s" in line or time.monotonic() > deadline:
                break
        assert any("schedules/s" in line for line in seen), "".join(seen)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=T)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, out + err
    assert "explore: interrupted:" in out and "schedules" in out
    assert "Traceback" not in out + err, err
    assert "VIOLATION" not in out and "KeyboardInterrupt" not in out, out


NUMBERS = [
    (["run", "-m", "99T"], "'99T'"),
    (["run", "-m", "-5M"], "'-5M'"),
    (["boot", "--memory", "-5M"], "'-5M'"),
    (["run", "--swap", "99T"], "'99T'"),
    (["run", "--swap", "-1M"], "'-1M'"),
    (["run", "--job-timeout", "inf"], "'inf'"),
    (["run", "--job-timeout", "-5"], "'-5'"),
    (["boot", "--device-timeout", "nan"], "'nan'"),
    (["boot", "--device-timeout", "0"], "'0'"),
    (["demo", "-m", "99T"], "'99T'"),
    (["gdbinit", "--port", "70000"], "'70000'"),
    (["gdbinit", "--port", "-1"], "'-1'"),
    (["explore", "--seed", "-1"], "'-1'"),
    (["explore", "--workers", "0"], "'0'"),
    (["explore", "--tasks", "100000"], "'100000'"),
    (["explore", "--schedules", "0x"], "'0x'"),
    (["explore", "--connect-timeout", "-3"], "'-3'"),
]


@pytest.mark.parametrize("argv,named", NUMBERS, ids=[" ".join(a) for a, _ in NUMBERS])
def test_numbers_out_of_range_are_usage_errors(argv, named):
    """Each numeric option refuses a value out of range: exit 2, the option and the value
    named on stderr, nothing booted or run."""
    extra = [str(HELLO)] if argv[0] == "run" else []
    proc = gemu(*argv, *extra)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert named in proc.stderr and argv[1] in proc.stderr, proc.stderr
    assert "booting" not in proc.stdout
    _no_traceback(proc)


def test_coredump_of_a_directory(tmp_path):
    proc = gemu("coredump", str(tmp_path))
    assert proc.returncode == 2 and "Is a directory" in proc.stderr, proc.stderr
    _no_traceback(proc)


def test_serial_socket_in_a_missing_folder_names_it(tmp_path):
    spec = f"unix:{tmp_path}/missing/console.sock"
    proc = gemu("boot", "--serial", spec)
    assert proc.returncode == 2 and spec in proc.stderr, proc.stderr
    _no_traceback(proc)


def test_explore_out_naming_a_file_is_refused_before_the_search(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    proc = gemu("explore", "--out", str(afile), "--schedules", "1")
    assert proc.returncode == 2 and "not a directory" in proc.stderr, proc.stderr
    assert "schedules" not in proc.stdout
    _no_traceback(proc)


def test_explore_violation_whose_reproduction_cannot_be_written(tmp_path):
    """A violation found while --out cannot be created (under /proc): exit 1 (the
    violation), the reason and the replay-by-seed command, no traceback."""
    proc = gemu(
        "explore",
        "--mutant",
        "no-tlb-flush",
        "--strategy",
        "pct",
        "--schedules",
        "50",
        "--workers",
        "1",
        "--quiet",
        "--no-shrink",
        "--out",
        "/proc/gemu-no-such-dir",
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "VIOLATION" in proc.stdout
    assert "cannot write the reproduction" in proc.stderr and "--replay" in proc.stderr
    _no_traceback(proc)
