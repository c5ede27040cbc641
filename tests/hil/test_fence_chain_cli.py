"""The fence chain of the bug report, through the real command line: a fence passed as a
dependency after its job signalled and was freed. `gemu run` exits 0 with no kernel warning
and `gemu explore` finds no violation (both printed WARNING: dma_fence_get on a released
fence before out-fences held their own reference)."""

from __future__ import annotations

import os
import subprocess

from tests.support.device import gemu_executable

T = 120 * float(os.environ.get("GEMU_TIMEOUT_MULT", "1"))
SCRIPT = """\
src = bo 64K
dst = bo 64K
fill src random 7
f1 = submit copy src dst
wait f1
expect crc dst == src
f2 = submit fill dst 0xdeadbeef after f1
wait f2
expect value dst+8 == 0xdeadbeef
wait f1
f1 = submit nop after f1 f2
close f2
wait f1
"""


def _gemu(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*gemu_executable(), *args], capture_output=True, text=True, timeout=T, cwd=cwd
    )


def test_gemu_run_chains_on_a_signalled_fence_without_warning(tmp_path):
    (tmp_path / "chain.job").write_text(SCRIPT)
    proc = _gemu("run", "chain.job", cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "WARNING" not in out and "FAIL" not in out, out
    assert ", 2 checks passed, 0 failed;" in out, out


def test_gemu_explore_finds_no_violation_in_the_chain(tmp_path):
    (tmp_path / "chain.job").write_text(SCRIPT)
    proc = _gemu(
        "explore", "chain.job", "--schedules", "6", "--workers", "1", "--out", "out", cwd=tmp_path
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "0 violations" in out, out
