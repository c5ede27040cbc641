"""Fuzzed command lines for ``gemu run/boot/explore/device/demo/gdbinit/coredump`` through the
in-process :func:`gemu.host.cli.main`: whatever the words, the parser ends in an exit status of
0 (``--help``) or 2 (a usage error with a message), or hands valid arguments to the command,
and never raises anything else (an OverflowError from ``inf``, a ValueError from ``nan``...).
The commands themselves are replaced by a stub, so each example costs one parse.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from unittest import mock

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gemu.host import cli

_build = cli.build_parser


def _parser_with_stub_commands(command: str | None = None) -> argparse.ArgumentParser:
    parser = _build(command)
    for sub in parser._subparsers._group_actions[0].choices.values():
        sub.set_defaults(func=lambda args, subparser: 0)
    return parser


PARSER = _build()
COMMANDS = PARSER._subparsers._group_actions[0].choices
OPTIONS = {
    name: sorted(opt for action in sub._actions for opt in action.option_strings)
    for name, sub in COMMANDS.items()
}
SUFFIXES = ["", "K", "M", "G", "T", "P", "B", "MiB", "x", "e3"]

numbers = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.integers(-(2**70), 2**70).map(hex),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.tuples(st.integers(-(2**40), 2**40), st.sampled_from(SUFFIXES)).map(
        lambda t: f"{t[0]}{t[1]}"
    ),
    st.sampled_from(["nan", "inf", "-inf", "-0", "0x", "1e400", "", " ", "-", "--", "=", "-5M"]),
)
words = st.one_of(numbers, st.text(max_size=12))


@st.composite
def command_lines(draw) -> list[str]:
    command = draw(st.sampled_from(sorted(COMMANDS)))
    options = st.sampled_from(OPTIONS[command])
    pieces = st.one_of(
        st.tuples(options, words),  # an option with a value, the common case
        st.tuples(options),
        st.tuples(words),
    )
    rest = draw(st.lists(pieces, max_size=5))
    return [command, *(word for piece in rest for word in piece)]


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(command_lines())
@example(["run", "--job-timeout", "inf", "x.job"])  # an OverflowError escaped argparse
@example(["boot", "--job-timeout", "nan"])
@example(["boot", "-m", "-5M"])
@example(["gdbinit", "--port", "-1"])
@example(["explore", "--seed", "1e400"])
def test_any_command_line_parses_or_is_a_usage_error(argv):
    """main(argv) returns the stub's 0 or exits 0/2 with its text on stdout/stderr; no
    other exception, no traceback."""
    out, err = io.StringIO(), io.StringIO()
    with (
        mock.patch.object(cli, "build_parser", _parser_with_stub_commands),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        try:
            status = cli.main(argv)
        except SystemExit as exc:
            status = exc.code
    assert status in (0, 2), (argv, status, err.getvalue())
    if status == 2:
        assert "error:" in err.getvalue(), (argv, err.getvalue())
    assert "Traceback" not in out.getvalue() + err.getvalue()


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.sampled_from(["run", "boot", "demo"]), numbers.filter(lambda v: v != "--"))
def test_memory_sizes_are_accepted_only_in_range(command, value):
    """-m VALUE: either a size of 1M..16G in whole pages, or exit 2 naming VALUE."""
    err = io.StringIO()
    seen = {}

    def capture(args, subparser):
        seen["memory"] = args.memory
        return 0

    def parser_capturing(command=None):
        parser = _build(command)
        for sub in parser._subparsers._group_actions[0].choices.values():
            sub.set_defaults(func=capture)
        return parser

    argv = [command, "-m", value] + (["x.job"] if command == "run" else [])
    with (
        mock.patch.object(cli, "build_parser", parser_capturing),
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        try:
            status = cli.main(argv)
        except SystemExit as exc:
            status = exc.code
    if status == 0:
        assert 1 << 20 <= seen["memory"] <= 16 << 30 and seen["memory"] % 4096 == 0
    else:
        assert status == 2 and repr(value) in err.getvalue(), (value, err.getvalue())
