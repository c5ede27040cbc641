"""The VM_BIND example scripts (examples/jobs/vm-bind/) through the real CLI: ``gemu run``
boots the driver mode their ``driver-mode`` line names and exits 0; asking for another mode,
mixing modes in one run, or an unknown mode is a usage error (exit 2) naming the file and
line, or the option, and the modes that exist."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support.device import gemu_executable

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "jobs" / "vm-bind").glob("*.job"))
T = 120 * float(os.environ.get("GEMU_TIMEOUT_MULT", "1"))


def gemu(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*gemu_executable(), *args], capture_output=True, text=True, timeout=T, cwd=ROOT
    )


def test_there_are_vm_bind_examples():
    """The basic bind/exec/unbind script and the larger-than-RAM one exist."""
    assert {"basic", "larger-than-ram"} <= {p.stem for p in EXAMPLES}


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_vm_bind_example_passes(script):
    """`gemu run -m 16M SCRIPT` boots driver mode vm-bind (from the script's driver-mode line),
    runs it and exits 0 with every check passed and no FAIL line."""
    proc = gemu("run", "-m", "16M", str(script.relative_to(ROOT)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gemu0: driver mode vm-bind" in proc.stdout
    assert "FAIL" not in proc.stdout and " 0 failed;" in proc.stdout


def test_larger_than_ram_evicts_and_swaps_in():
    """The larger-than-RAM script really works under pressure: its summary counts evictions
    and swap-ins (the per-VM shrinker's), and the GPU read every BO back."""
    proc = gemu("run", "-q", "examples/jobs/vm-bind/larger-than-ram.job")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = next(line for line in proc.stdout.splitlines() if line.startswith("summary:"))
    fields = dict(part.strip().rsplit(" ", 1) for part in summary.split(";")[1].split(","))
    assert int(fields["evictions"]) >= 12 and int(fields["swap-ins"]) >= 6, summary


def test_explicit_driver_mode_runs_the_script():
    """--driver-mode vm-bind agrees with the script's line: it runs."""
    proc = gemu("run", "-q", "--driver-mode", "vm-bind", "examples/jobs/vm-bind/basic.job")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_another_driver_mode_is_refused_at_the_scripts_line():
    """--driver-mode per-bo against a vm-bind script: exit 2 before booting, naming the
    script's line and both modes."""
    proc = gemu("run", "--driver-mode", "per-bo", "examples/jobs/vm-bind/basic.job")
    assert proc.returncode == 2
    assert (
        "examples/jobs/vm-bind/basic.job:4: driver-mode vm-bind: the machine is asked to run "
        "per-bo (--driver-mode per-bo)" in proc.stderr
    )
    assert "booting" not in proc.stdout


def test_scripts_of_two_modes_are_refused(tmp_path):
    """A per-bo script naming its mode and a vm-bind one in one run: exit 2 naming both."""
    legacy = tmp_path / "legacy.job"
    legacy.write_text("driver-mode per-bo\na = bo 4K\n")
    proc = gemu("run", str(legacy), "examples/jobs/vm-bind/basic.job")
    assert proc.returncode == 2
    assert "basic.job:4: driver-mode vm-bind:" in proc.stderr
    assert f"{legacy}:1 asks for per-bo" in proc.stderr


def test_unknown_driver_mode_is_a_usage_error():
    """--driver-mode frob: exit 2 naming the value and the modes that exist; --help lists
    the option with both modes."""
    proc = gemu("run", "--driver-mode", "frob", "examples/jobs/hello.job")
    assert proc.returncode == 2
    assert "unknown driver mode 'frob' (known: per-bo, vm-bind)" in proc.stderr
    assert "Traceback" not in proc.stderr
    for cmd in ("run", "boot"):
        helptext = gemu(cmd, "--help").stdout
        assert "--driver-mode MODE" in helptext and "vm-bind" in helptext and "per-bo" in helptext


def test_a_vm_bind_command_on_a_per_bo_machine_names_the_mode(tmp_path):
    """A VM_BIND command in a machine of driver mode per-bo fails its line (exit 1) with a
    message naming both modes and how to boot the other; with expect error EOPNOTSUPP after
    it the script passes."""
    bad = tmp_path / "bad.job"
    bad.write_text("v = vm create\n")
    proc = gemu("run", "-q", str(bad))
    assert proc.returncode == 1
    assert (
        f"{bad}:1: vm: a command of driver mode vm-bind, and this machine runs per-bo "
        "(boot with --driver-mode vm-bind" in proc.stdout
    )
    ok = tmp_path / "ok.job"
    ok.write_text("v = vm create\nexpect error EOPNOTSUPP\n")
    assert gemu("run", "-q", str(ok)).returncode == 0


def test_console_of_a_vm_bind_machine():
    """gemu boot --driver-mode vm-bind: the console takes the VM_BIND commands, help marks
    each command's mode, info vms shows a partial unbind, and a clean session exits 0."""
    lines = (
        "help\n"
        "v = vm create\n"
        "x = bo 16K\n"
        "fill x 7\n"
        "b = bind v 0x200000 x\n"
        "u = unbind v 0x201000 4K after b\n"
        "wait b u\n"
        "expect crc v 0x202000 8K == x+0x2000\n"
        "info vms\n"
        "poweroff\n"
    )
    proc = subprocess.run(
        [*gemu_executable(), "boot", "-m", "16M", "--driver-mode", "vm-bind"],
        input=lines,
        capture_output=True,
        text=True,
        timeout=T,
        cwd=ROOT,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "gemu0: driver mode vm-bind" in out
    assert (
        "[NAME =] bind VM VA BO [OFFSET [SIZE]] [ro] [after FENCE...]  [driver mode vm-bind]" in out
    )
    assert "[NAME =] submit KIND ARGS... [after FENCE...]  [driver mode per-bo]" in out
    assert "0x000000200000     4 KiB x+0x0 rwx" in out
    assert "0x000000202000     8 KiB x+0x2000 rwx" in out
    assert "1 checks passed, 0 failed" in out
