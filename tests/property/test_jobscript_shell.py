"""Property test of the shell at run time (Hypothesis, derandomized): any sequence of lines
that parses, run against a live machine, only ever ends in a handled outcome: success, a
located failure message, or an expected error. The shell never crashes, and powering off
gives every BO, frame and swap slot back."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemu.host.jobscript import ScriptError, parse_line
from gemu.host.shell import Shell
from tests.support.machine import emulator_machine

DETERMINISTIC = settings(
    derandomize=True,
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
NAMES = ["a", "b", "c", "f1", "zz"]
VALUES = ["0", "1", "0x10", "4K", "64K", "3M", "1G", "-1", "x", "random", "a+4", "b+99999"]
# Commands whose outcome can take seconds (hang, waitmem + wait, timeouts) stay out.
LINES = st.one_of(
    st.builds(lambda n, s: f"{n} = bo {s}", st.sampled_from(NAMES), st.sampled_from(VALUES)),
    st.builds(
        lambda n, k, x, y: f"{n} = submit {k} {x} {y}".rstrip(),
        st.sampled_from(NAMES),
        st.sampled_from(["nop", "copy", "fill", "crc", "atomic", "fault", "frob"]),
        st.sampled_from([*NAMES, *VALUES, ""]),
        st.sampled_from([*NAMES, *VALUES, ""]),
    ),
    st.builds(
        lambda c, x, y: f"{c} {x} {y}".rstrip(),
        st.sampled_from(
            [
                "fill",
                "write",
                "poke",
                "read",
                "crc",
                "verify",
                "madvise",
                "pin",
                "unpin",
                "close",
                "map",
                "unmap",
                "wait",
                "info",
                "expect",
                "pressure",
                "echo",
                "set",
            ]
        ),
        st.sampled_from([*NAMES, *VALUES, "dontneed", "objects", "stats", "crc", ""]),
        st.sampled_from([*NAMES, *VALUES, "willneed", "==", "00ff", ""]),
    ),
    st.sampled_from(
        [
            "drop-caches",
            "info mmu",
            "info fences",
            "expect lockdep 0",
            "expect error EINVAL",
            "expect fault",
            "events on",
            "events show 3",
        ]
    ),
)


@DETERMINISTIC
@given(st.lists(LINES, min_size=1, max_size=8))
def test_any_parsed_lines_end_in_a_handled_outcome(machine, lines):
    """Each line either runs, or fails with a message naming <t>:LINE; power-off leaves the
    machine clean (no BO, frame or swap slot left)."""
    out: list[str] = []
    sh = Shell(machine, out.append)
    try:
        for i, text in enumerate(lines, 1):
            try:
                st_ = parse_line(text, "t", i, Shell.COMMANDS)
            except ScriptError as exc:
                assert str(exc).startswith(f"t:{i}: ")
                continue
            if st_ is None:
                continue
            before = len(out)
            if not sh.run_statements([st_]):
                assert any(line.startswith(f"t:{i}: ") for line in out[before:]), out[before:]
    finally:
        sh.poweroff()
    machine.check_clean()


CONSOLE = st.one_of(
    LINES,
    st.sampled_from(["task t", "task u", "end", "join", "join t", "join zz", "info tasks"]),
)


@DETERMINISTIC
@given(st.lists(CONSOLE, min_size=1, max_size=10))
def test_console_lines_with_task_blocks_end_in_a_handled_outcome(machine, lines):
    """Typed at the console, lines that open, fill, close and join task blocks (in any
    order, nested, unbalanced) only ever run or fail with a located message; the tasks run
    concurrently; power-off joins them and leaves the machine clean."""
    out: list[str] = []
    sh = Shell(machine, out.append)
    try:
        for i, text in enumerate(lines, 1):
            before = len(out)
            if not sh.run_line(text, "t", i):
                assert any(line.startswith("t:") for line in out[before:]), out[before:]
    finally:
        sh.poweroff()
    assert all(t.ok is not None and t.joined for t in sh.tasks.values())
    machine.check_clean()


@pytest.fixture(scope="module")
def machine():
    """One in-process machine for every example, in the emulator's non-strict mode."""
    with emulator_machine(ram_size=8 << 20, swap_size=16 << 20) as m:
        yield m
