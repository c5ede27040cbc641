"""Numbers out of range are errors naming the line, the command, the argument and the
allowed range; none is truncated, clamped or leaks a Python exception."""

from __future__ import annotations

import pytest

from gemu.host.shell import Shell
from tests.support.machine import emulator_machine


@pytest.fixture(scope="module")
def machine():
    with emulator_machine(ram_size=8 << 20, swap_size=16 << 20) as m:
        yield m


@pytest.fixture
def shell(machine):
    out: list[str] = []
    sh = Shell(machine, out.append)
    sh.out = out
    assert sh.run_text("a = bo 4K\nfill a 7\nf = submit nop\nwait f\n", "setup")
    yield sh
    sh.poweroff()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("fill a 0x1ffffffff", "fill: VALUE 0x1ffffffff is out of range (0 to 0xffffffff)"),
        ("fill a -1", "fill: VALUE -1 is out of range (0 to 0xffffffff)"),
        ("fill a random 0x10000000000000000", "fill: SEED 0x10000000000000000 is out of range"),
        ("read a 0 999999999999", "read: LENGTH 999999999999 is out of range (1 to 4096)"),
        ("read a 4096", "read: OFFSET 4096 is out of range (0 to 4095)"),
        ("read a 4000 200", "read: LENGTH 200 is out of range (1 to 96)"),
        ("b = bo 99999999999999999999G", "bo: SIZE 99999999999999999999G is out of range"),
        ("b = bo 0", "bo: SIZE 0 is out of range (1 byte to 4 GiB)"),
        ("b = bo 0x100000001", "bo: SIZE 0x100000001 is out of range (1 byte to 4 GiB)"),
        ("map a 0x1000000000000", "map: VA 0x1000000000000 is out of range"),
        ("write a 4095 0011", "write: OFFSET 4095 is out of range (0 to 4094)"),
        ("poke a+4 0x100000000", "poke: VALUE 0x100000000 is out of range (0 to 0xffffffff)"),
        ("poke a+4096 1", "poke: OFFSET 4096 is out of range (0 to 4092)"),
        ("g = submit fill a 0x100000000", "submit fill: VALUE 0x100000000 is out of range"),
        ("g = submit atomic a -1", "submit atomic: ADD -1 is out of range"),
        ("g = submit waitmem a 1T", "submit waitmem: VALUE 1T is out of range"),
        ("wait f timeout nan", "wait: SECONDS nan is out of range (0 to 3600)"),
        ("wait f timeout 1e9", "wait: SECONDS 1e9 is out of range (0 to 3600)"),
        ("job-timeout inf", "job-timeout: MILLISECONDS inf is out of range"),
        ("job-timeout 0", "job-timeout: MILLISECONDS 0 is out of range"),
        ("pressure 999999999999T", "pressure: SIZE 999999999999T is out of range"),
        ("events show 99999999999999999999", "events: N 99999999999999999999 is out of range"),
        ("expect value a == 0x100000007", "expect value: VALUE 0x100000007 is out of range"),
        ("expect crc a == -5", "expect crc: VALUE -5 is out of range (0 to 0xffffffff)"),
        ("expect lockdep -1", "expect lockdep: N -1 is out of range"),
        ("fill a 12Q", "fill: VALUE '12Q' is not a number"),
    ],
)
def test_out_of_range_numbers_are_errors_naming_the_line(shell, line, message):
    """Each line fails (nothing stored, nothing clamped) with file:line and the range."""
    before = shell.file.read(shell.bos["a"].handle, 0, 4096)
    assert not shell.run_text(line + "\n", "t.job")
    assert any(out.startswith(f"t.job:1: {message}") for out in shell.out), shell.out[-3:]
    assert not any("Error" in out for out in shell.out), shell.out[-3:]
    assert shell.file.read(shell.bos["a"].handle, 0, 4096) == before


def test_the_edges_of_each_range_are_accepted(shell):
    """The largest value of each range works and is stored exactly."""
    assert shell.run_text(
        "fill a 0xffffffff\nexpect value a+4092 == 0xffffffff\nread a 0 4096\nread a 4095 1\n"
        "poke a+4092 0\nexpect value a+4092 == 0\nfill a random 0xffffffffffffffff\n"
        "wait f timeout 3600\njob-timeout 2000\nevents show 0\n",
        "t.job",
    ), shell.out[-3:]
