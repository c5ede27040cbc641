"""QEMU's command-line spellings where they mean the same in gemu: --version, -s,
-nographic, -serial and -monitor with QEMU's chardev syntax; no prefix matching, so
``-monitor stdio`` is never ``-m onitor``."""

from __future__ import annotations

import subprocess

import pytest

from gemu.host.cli import _attach_dash_values, build_parser
from gemu.host.machine import _gemu_command


def _parse(*argv: str):
    parser = build_parser()
    return parser.parse_args(_attach_dash_values(list(argv), parser))


def test_monitor_stdio_is_the_console_not_a_memory_size():
    """``-monitor stdio`` parses as the monitor option, -m keeps its default."""
    args = _parse("boot", "-monitor", "stdio")
    assert args.monitor == "stdio" and args.memory == 64 << 20


def test_abbreviated_long_options_are_refused(capsys):
    """``--ser stdio`` is not taken for --serial (no prefix matching, as in QEMU)."""
    with pytest.raises(SystemExit) as e:
        _parse("boot", "--ser", "stdio")
    assert e.value.code == 2
    assert "unrecognized arguments: --ser stdio" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("chardev", "spec"),
    [
        ("stdio", "stdio"),
        ("pty", "pty"),
        ("unix:/tmp/gemu-con.sock,server,nowait", "unix:/tmp/gemu-con.sock"),
        ("unix:/tmp/gemu-con.sock,server=on,wait=off", "unix:/tmp/gemu-con.sock"),
        ("tcp:127.0.0.1:4444,server,nowait", "tcp:127.0.0.1:4444"),
    ],
)
def test_qemu_chardev_syntax_names_a_console(chardev, spec):
    """QEMU's server chardevs are gemu's listening consoles."""
    assert _parse("boot", "-serial", chardev).serial == spec
    assert _parse("boot", "-monitor", chardev).monitor == spec


def test_a_chardev_without_server_connects_out():
    """QEMU's client chardevs: without ``server`` gemu connects to a listening terminal."""
    assert _parse("boot", "-serial", "unix:/tmp/x").serial == "connect:unix:/tmp/x"
    assert _parse("boot", "-serial", "tcp:127.0.0.1:4444").serial == "connect:tcp:127.0.0.1:4444"


@pytest.mark.parametrize(
    ("chardev", "message"),
    [
        ("telnet::4444,server", "gemu's console is stdio, pty, unix:PATH,server"),
        ("tcp:127.0.0.1:4444,server,mux=on", "option 'mux' is not supported by gemu"),
        ("tcp:127.0.0.1:4444,server=maybe", "server=maybe: use on or off"),
    ],
)
def test_chardevs_gemu_cannot_honour_are_refused(chardev, message, capsys):
    """A chardev gemu cannot serve is a usage error naming it and why."""
    with pytest.raises(SystemExit) as e:
        _parse("boot", "-serial", chardev)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument -serial" in err and message in err


def test_s_is_gdb_on_port_1234_and_nographic_is_accepted():
    """-s is QEMU's --gdb tcp::1234; -nographic is accepted (gemu has no display)."""
    args = _parse("boot", "-s", "-nographic")
    assert args.gdb == "tcp::1234" and args.nographic
    assert _parse("run", "-s", "x.job").gdb == "tcp::1234"


def test_version_and_a_monitor_boot_through_the_real_cli():
    """``gemu --version`` prints the version; ``gemu boot -monitor stdio`` boots with its
    console on stdio; -monitor and a different -serial are refused."""
    r = subprocess.run([*_gemu_command(), "--version"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("gemu version ")
    r = subprocess.run(
        [*_gemu_command(), "boot", "-monitor", "stdio", "-m", "16M", "--device", "inproc"],
        input="info mem\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert "mem: " in r.stdout and "pages free" in r.stdout
    r = subprocess.run(
        [
            *_gemu_command(),
            *("boot", "-monitor", "pty", "-serial", "unix:/tmp/gemu-x.sock,server"),
            *("--device", "inproc"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "gemu has one console, its monitor: -monitor pty and -serial unix:" in r.stderr
