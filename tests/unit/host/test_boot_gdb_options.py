"""gemu boot/run pass --gdb, -S and --coredump-dir to the device process they spawn."""

import pytest

from gemu.host.cli import build_parser, main
from gemu.host.cmd_boot import _device_options


def parse(*argv):
    return build_parser().parse_args(list(argv))


def test_options_reach_the_spawned_device_command_line():
    """The device process gets exactly the gdb and core-dump options given to boot, with
    tcp::PORT spelled out on loopback."""
    args = parse("boot", "--gdb", "tcp::1234", "-S", "--coredump-dir", "/tmp/cores")
    assert _device_options(args) == [
        "--gdb",
        "tcp:127.0.0.1:1234",
        "-S",
        "--coredump-dir",
        "/tmp/cores",
    ]
    assert _device_options(parse("run", "x.job")) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["boot", "-S"], "-S: needs --gdb or --qmp"),
        (["run", "-S", "x.job"], "-S: needs --gdb or --qmp"),
        (
            ["boot", "--device", "inproc", "--gdb", "tcp::1"],
            "configure the device gemu boot spawns",
        ),
        (["boot", "--gdb", "tcp:10.0.0.1:5"], "not a loopback address"),
        (["boot", "--gdb", "unix:/tmp/x"], "gdb connects over TCP"),
    ],
)
def test_bad_combinations_are_argument_errors(argv, message, capsys):
    """Misused debugger options exit 2 naming the option and the problem, before anything
    is started."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
