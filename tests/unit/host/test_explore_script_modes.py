"""gemu explore runs job scripts on the per-bo driver: a script that asks for another driver
mode is refused up front, naming its line and the scenarios that explore that flavour,
rather than run and reported as a violation at its first command of that mode."""

from __future__ import annotations

import subprocess
from pathlib import Path

from gemu.host.machine import _gemu_command

ROOT = Path(__file__).resolve().parents[3]


def test_a_vm_bind_script_is_refused_naming_its_line():
    script = ROOT / "examples" / "jobs" / "vm-bind" / "basic.job"
    line = next(
        i
        for i, text in enumerate(script.read_text().splitlines(), 1)
        if text.strip().startswith("driver-mode")
    )
    r = subprocess.run(
        [*_gemu_command(), "explore", str(script), "--schedules", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 2
    assert f"basic.job:{line}: driver-mode vm-bind" in r.stderr
    assert "gemu explore gpuvm" in r.stderr


def test_a_per_bo_script_naming_its_mode_still_explores(tmp_path):
    script = tmp_path / "a.job"
    script.write_text("driver-mode per-bo\na = bo 4K\nfill a 3\nexpect value a == 3\n")
    r = subprocess.run(
        [*_gemu_command(), "explore", str(script), "--schedules", "3", "--seed", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stdout + r.stderr
