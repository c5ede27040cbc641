"""The boot path stays lean, checked on the real processes (structure, not timing):

- ``gemu device`` imports only the device model and the command line: no guest, no construct
  (the formats are built on first use), no tools of other commands;
- ``gemu boot`` imports no construct, no other command's module, no test or packaging tool;
- ``gemu boot`` starts its device process before it imports the guest kernel model, so the
  two start-ups overlap;
- ``cli.COMMANDS`` names the module of every command (running one command builds only that
  module's parsers).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from gemu.host import cli
from gemu.host.cmd_device import wait_ready
from tests.support.device import gemu_executable

TIMEOUT_S = 60

# Modules that no boot-path process may import: heavy libraries the hot path replaced with
# struct codecs, tools of other commands, test and packaging tools.
NEVER = (
    "construct",
    "elftools",
    "hypothesis",
    "pexpect",
    "pytest",
    "importlib.metadata",
    "gemu.host.cmd_demo",
    "gemu.host.cmd_gdb",
    "gemu.host.cmd_explore",
    "gemu.host.explore",
    "gemu.host.qmp",
    "gemu.host.tracefile",
    "gemu.host.report",
    "gemu.device.coredump",
    "gemu.device.gdbstub",
    "gemu.device.abi.docgen",
)
# ... and what the device process in particular must not need.
NEVER_IN_DEVICE = (
    "gemu.guest",
    "gemu.host.shell",
    "gemu.host.machine",
    "gemu.host.console",
    "gemu.host.cmd_boot",
    "subprocess",
)


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _imported(stderr: str) -> set[str]:
    """Module names from the ``python -X importtime`` lines of a process's stderr."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.add(name)
    return names


def _offenders(names: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names for f in forbidden if n == f or n.startswith(f + "."))


def _gemu_script() -> list[str]:
    """What follows ``python -X importtime`` to run gemu: its console script, or ``-m
    gemu.host`` where none is installed (the same entry point either way)."""
    exe = gemu_executable()
    return exe if len(exe) == 1 else ["-m", "gemu.host"]


def test_gemu_device_imports_only_the_device(tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-X",
            "importtime",
            *_gemu_script(),
            "device",
            "--listen",
            f"unix:{tmp_path}/d.sock",
            "--log",
            "error",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=_env(),
    )
    try:
        wait_ready(proc, TIMEOUT_S)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT_S)
    names = _imported(err)
    assert "gemu.device.server" in names and "gemu.device.gpu" in names
    assert _offenders(names, NEVER + NEVER_IN_DEVICE) == []


def test_gemu_boot_imports_no_construct_nor_other_commands():
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *_gemu_script(), "boot", "-m", "16M"],
        input="poweroff\n",
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=_env(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "reboot: Power down" in done.stdout
    names = _imported(done.stderr)
    assert "gemu.host.shell" in names and "gemu.guest.gemu_drv.uapi" in names
    assert _offenders(names, NEVER) == []


SPAWN_ORDER = textwrap.dedent(
    """
    import subprocess, sys
    from gemu.host import cli

    seen = []
    real = subprocess.Popen.__init__

    def spy(self, args, *rest, **kw):
        if "device" in list(args):
            seen.append(sorted(m for m in sys.modules if m.startswith("gemu.guest")))
        real(self, args, *rest, **kw)

    subprocess.Popen.__init__ = spy
    status = cli.main(["boot", "-m", "16M"])
    print("SPAWNS", len(seen), "GUEST-MODULES-AT-SPAWN", *seen[0] if seen else [], flush=True)
    sys.exit(status)
    """
)


def test_gemu_boot_spawns_its_device_before_importing_the_guest():
    done = subprocess.run(
        [sys.executable, "-c", SPAWN_ORDER],
        input="poweroff\n",
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=_env(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("SPAWNS"))
    assert line == "SPAWNS 1 GUEST-MODULES-AT-SPAWN"


def test_commands_table_names_each_commands_module():
    full = cli.build_parser()
    every = full._subparsers._group_actions[0].choices
    assert set(cli.COMMANDS) == set(every)
    assert set(cli.COMMANDS.values()) == set(cli.COMMAND_MODULES)
    for command, module in cli.COMMANDS.items():
        one = cli.build_parser(command)._subparsers._group_actions[0].choices
        assert command in one
        assert {c for c, m in cli.COMMANDS.items() if m == module} == set(one)
        assert one[command].format_help() == every[command].format_help()


@pytest.mark.parametrize(
    "module", ["gemu.device.abi.protocol", "gemu.device.abi.packets", "gemu.device.abi.pte"]
)
def test_abi_modules_build_construct_formats_only_on_first_use(module):
    """Importing an ABI module does not import construct; its formats still resolve."""
    code = (
        f"import sys, {module} as m; assert 'construct' not in sys.modules, 'imported'; "
        "name = {'protocol': 'VERSION_REQ', 'packets': 'BODIES', 'pte': 'PTE_FORMAT'}"
        f"['{module.rsplit('.', 1)[1]}']; getattr(m, name); "
        "assert 'construct' in sys.modules"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT_S, env=_env()
    )
    assert done.returncode == 0, done.stderr[-2000:]
