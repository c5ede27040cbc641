"""Property tests of the console (Hypothesis, derandomized): random lines of every command,
with numbers of every size and shape (huge, negative, hex, suffixed, fractional, nan, inf,
not numbers at all) where the command wants a number, only ever end in the shell's own
outcome: the line runs, or fails with a message that names ``file:line`` and no Python
exception. A value the shell accepts is stored exactly, never truncated."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemu.host.shell import PowerOff, Shell
from tests.support.machine import emulator_machine

DETERMINISTIC = settings(
    derandomize=True,
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
PYTHON_ERROR = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception)\b|Traceback|internal error")
# Commands whose outcome may take seconds (hang, waitmem + wait) and poweroff stay out.
COMMANDS = sorted(set(Shell.COMMANDS) - {"poweroff", "task", "end", "join", "include"})
KINDS = ["nop", "copy", "fill", "crc", "atomic", "fault"]

ints = st.one_of(
    st.integers(-(2**70), 2**70),
    st.integers(0, 2**33),
    st.sampled_from([0, 1, 4, 4095, 4096, 2**32 - 1, 2**32, 2**48, 2**64 - 1, 2**64]),
)
numbers = st.one_of(
    ints.map(str),
    ints.map(lambda n: hex(n) if n >= 0 else "-" + hex(-n)),
    st.builds(lambda n, u: f"{n}{u}", st.integers(0, 2**40), st.sampled_from("KMGTkQ")),
    st.sampled_from(["nan", "inf", "-inf", "1e9", "0.5", "1e-9", "", "0x", "--1", "1_0"]),
    st.text("0123456789abcdefxKMG.-+_", min_size=1, max_size=12),
)
names = st.sampled_from(["a", "b", "f", "a+4", "a+4096", "b+0x10", "zz"])
words = st.one_of(numbers, names, st.sampled_from(["random", "timeout", "==", "after", "on"]))


def _line(cmd: str, args: list[str]) -> str:
    return " ".join([cmd, *args])


lines = st.one_of(
    st.builds(_line, st.sampled_from(COMMANDS), st.lists(words, max_size=4)),
    st.builds(
        lambda k, a: f"f = submit {k} {' '.join(a)}",
        st.sampled_from(KINDS),
        st.lists(words, max_size=3),
    ),
    st.builds(lambda n: f"b = bo {n}", numbers),
)


@pytest.fixture(scope="module")
def machine():
    with emulator_machine(ram_size=8 << 20, swap_size=16 << 20) as m:
        yield m


def _session(machine) -> tuple[Shell, list[str]]:
    out: list[str] = []
    sh = Shell(machine, out.append)
    assert sh.run_text("a = bo 4K\nb = bo 8K\nf = submit nop\nwait f\n", "setup")
    out.clear()
    return sh, out


@DETERMINISTIC
@given(st.lists(lines, min_size=1, max_size=6))
def test_random_console_lines_end_in_the_shells_own_outcome(machine, typed):
    """Whatever is typed, run_line returns (or the shell powers off); every failure names
    its line; no output names a Python exception."""
    sh, out = _session(machine)
    try:
        for i, text in enumerate(typed, 1):
            before = len(out)
            try:
                ok = sh.run_line(text, "t", i)
            except PowerOff:
                break
            if not ok:
                assert any(line.startswith(f"t:{i}: ") for line in out[before:]), out[before:]
        bad = [line for line in out if PYTHON_ERROR.search(line)]
        assert not bad, bad
    finally:
        sh.poweroff()


@DETERMINISTIC
@given(ints)
def test_a_value_is_stored_exactly_or_refused(machine, value):
    """`fill a V` stores V exactly when 0 <= V <= 0xffffffff and refuses it otherwise,
    naming the range; the BO keeps its contents then."""
    sh, out = _session(machine)
    try:
        assert sh.run_line("fill a 5", "t", 1)
        ok = sh.run_line(f"fill a {value}", "t", 2)
        assert ok == (0 <= value <= 0xFFFFFFFF), out
        want = value if ok else 5
        assert sh.run_line(f"expect value a+4092 == {want}", "t", 3), out
        if not ok:
            assert f"t:2: fill: VALUE {value} is out of range (0 to 0xffffffff)" in out
    finally:
        sh.poweroff()
