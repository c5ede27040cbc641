"""``gemu demo`` (what ``make demo`` runs): the curated example scripts on one fresh machine."""

from __future__ import annotations

import os
import subprocess

from tests.support.device import gemu_executable

T = 120 * float(os.environ.get("GEMU_TIMEOUT_MULT", "1"))


def test_demo_runs_the_curated_scripts_and_summarises():
    """Every curated script passes (exit 0), the VM_BIND one on a second machine in driver
    mode vm-bind, and the summary reports jobs, bytes moved, evictions, swap-ins, purges,
    faults handled and checks passed, with progress lines."""
    proc = subprocess.run([*gemu_executable(), "demo"], capture_output=True, text=True, timeout=T)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "[1/8] hello.job" in out and "[7/8] tasks.job" in out
    assert "[8/8] vm-bind/larger-than-ram.job: three VMs sharing two external BOs" in out
    assert "driver mode per-bo (" in out and "driver mode vm-bind (" in out  # two machines
    assert "... filling 12 BOs" in out  # progress of the long step
    assert "... three VMs, two shared BOs" in out
    assert "scripts         8 of 8 passed" in out
    for label in (
        "jobs run",
        "bytes moved",
        "evictions",
        "swap-ins",
        "purges",
        "faults handled",
        "checks passed",
    ):
        assert label in out
    assert "(0 failed)" in out and "FAIL" not in out
