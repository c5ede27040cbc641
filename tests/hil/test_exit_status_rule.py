"""One exit-status rule for `gemu run` and `gemu boot` with a script on stdin: a failed line
(a command error or a failed expectation, not followed by `expect error` naming it) fails the
run with status 1, the power-off summary counts it among the failed, and a FAIL line names it
with file:line. A line whose error an `expect error` accepted is no failure."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.support.device import gemu_executable

T = 60 * float(os.environ.get("GEMU_TIMEOUT_MULT", "1"))


def _gemu(how: str, script, tmp_path) -> tuple[int, str]:
    """Run the script through the real CLI: `gemu run FILE` or `gemu boot < FILE`."""
    path = tmp_path / "t.job"
    path.write_text(script)
    if how == "run":
        cmd, stdin = [*gemu_executable(), "run", "-m", "16M", "--device", "inproc", str(path)], None
    else:
        cmd, stdin = [*gemu_executable(), "boot", "-m", "16M", "--device", "inproc"], script
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=T, cwd=tmp_path)
    return proc.returncode, proc.stdout + proc.stderr


def _where(how: str, tmp_path, line: int) -> str:
    return f"{tmp_path / 't.job'}:{line}" if how == "run" else f"<console>:{line}"


@pytest.mark.parametrize("how", ["run", "boot"])
def test_a_failed_command_line_fails_the_run(how, tmp_path):
    """`read a -1 4` fails: exit 1, "1 failed" in the summary, a FAIL line naming it."""
    status, out = _gemu(how, "a = bo 4K\nread a -1 4\n", tmp_path)
    assert status == 1, out
    assert re.search(r"summary: .*, 0 checks passed, 1 failed;", out), out
    assert f"FAIL: {_where(how, tmp_path, 2)}: read: " in out, out


@pytest.mark.parametrize("how", ["run", "boot"])
def test_a_failed_expectation_fails_the_run(how, tmp_path):
    """A failed `expect` is counted once and named by its FAIL line."""
    status, out = _gemu(how, "a = bo 4K\nexpect value a == 5\n", tmp_path)
    assert status == 1, out
    assert re.search(r"summary: .*, 0 checks passed, 1 failed;", out), out
    assert f"FAIL: {_where(how, tmp_path, 2)}: expect value a: got 0, expected == 5" in out


@pytest.mark.parametrize("how", ["run", "boot"])
def test_an_expected_error_is_not_a_failure(how, tmp_path):
    """The same failing line followed by `expect error EINVAL` passes: exit 0, 0 failed."""
    status, out = _gemu(how, "a = bo 4K\nread a -1 4\nexpect error EINVAL\n", tmp_path)
    assert status == 0, out
    assert re.search(r"summary: .*, 1 checks passed, 0 failed;", out), out
    assert "FAIL" not in out


def test_boot_counts_every_failed_line(tmp_path):
    """At the console the session goes on after a failure; each failed line is counted
    and named (an unknown command too)."""
    status, out = _gemu(
        "boot", "a = bo 4K\nread a -1 4\nfrobnicate\nexpect value a == 1\n", tmp_path
    )
    assert status == 1, out
    assert re.search(r"summary: .*, 0 checks passed, 3 failed;", out), out
    for line in (2, 3, 4):
        assert f"FAIL: <console>:{line}: " in out, out
