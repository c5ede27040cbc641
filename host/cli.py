"""DOC: the ``gemu`` command line.

A thin layer over the library: each subcommand parses its options, builds the objects the
library provides and runs them. Bad arguments are argparse errors (exit status 2) that name
the bad value::

    gemu device --listen unix:/tmp/gpu.sock          # the device model, QEMU-style
    gemu device --listen tcp:127.0.0.1:0 --stepped   # port 0: the ready line says which
    gemu boot -m 256M --serial pty                   # the machine, its shell on a pty
    gemu run examples/jobs/hello.job                 # boot, run job scripts, power off
    gemu demo                                        # a curated run with a summary

``gemu device`` prints one ready line on stdout once it listens, for whoever spawned it::

    gemu-device: listening on unix:/tmp/gpu.sock

and logs on stderr. SIGINT and SIGTERM stop it cleanly (the UNIX socket file is removed).

Every number on the command line is range-checked by its type function (:func:`int_in`,
:func:`seconds_in`, the size parsers), so a value out of range is a usage error naming the
option and the value, also when the value starts with ``-`` (``-m -5M``). ``--help`` shows each
option's default (:class:`HelpFormatter`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Sequence

LOG_LEVELS = ("debug", "info", "warning", "error")

# Each subcommand lives in its own module with ``register(subparsers)``; the module imports
# what it needs inside its command function, so ``gemu --help`` and start-up stay cheap.
COMMAND_MODULES = (
    "gemu.host.cmd_boot",
    "gemu.host.cmd_device",
    "gemu.host.cmd_demo",
    "gemu.host.cmd_gdb",
    "gemu.host.cmd_explore",
)
# The commands each module registers: running one command imports and builds only its
# module's parsers (``gemu device`` and ``gemu boot`` start faster); ``gemu --help`` and an
# unknown command build them all. tests/hil/test_boot_path.py compares this table with
# what the modules register.
COMMANDS = {
    "boot": "gemu.host.cmd_boot",
    "run": "gemu.host.cmd_boot",
    "device": "gemu.host.cmd_device",
    "demo": "gemu.host.cmd_demo",
    "coredump": "gemu.host.cmd_gdb",
    "gdbinit": "gemu.host.cmd_gdb",
    "explore": "gemu.host.cmd_explore",
}
READY_LINE = "gemu-device: listening on {address}"


def _log_level(text: str) -> int:
    level = text.lower()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"invalid log level {text!r} (choose from {', '.join(LOG_LEVELS)})"
        )
    return getattr(logging, level.upper())


def _transport_spec(text: str) -> str:
    from gemu.device import transport

    try:
        transport.parse_spec(text)
    except transport.SpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _listen_spec(text: str) -> str:
    from gemu.device import transport

    try:
        transport.check_listen(text)
    except transport.SpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def int_in(what: str, low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number (decimal or 0x..) in ``low..high``."""

    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid {what} {text!r}: not a whole number"
            ) from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"invalid {what} {text!r}: must be {low} to {high}")
        return value

    parse.__name__ = what  # argparse names the type in its own messages
    return parse


def seconds_in(low_exclusive: float, high: float, unit: str = "s") -> Callable[[str], float]:
    """An argparse type: a finite time above ``low_exclusive`` and at most ``high``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid time {text!r}: not a number") from None
        if not math.isfinite(value) or not low_exclusive < value <= high:
            raise argparse.ArgumentTypeError(
                f"invalid time {text!r}: must be above {low_exclusive:g} and at most "
                f"{high:.15g} {unit}"
            )
        return value

    parse.__name__ = "time"
    return parse


_ROLE = re.compile(r":[a-z]+:`~?(?:[\w.]*\.)?([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``|`([^`]+)`")


def plain_text(text: str) -> str:
    """rST/Markdown markup as a terminal shows it: ``:class:`~a.B``` becomes B, ````x```` and
    ```x``` become 'x'."""
    text = _ROLE.sub(r"\1", text)
    return _LITERAL.sub(lambda m: f"'{m.group(1) or m.group(2)}'", text)


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` of every gemu command: markup from docstrings and help strings shown as
    plain text, and each option's default at the end of its help (taken from the parser, so
    it is the value the command really uses)."""

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain_text(text))

    def _expand_help(self, action: argparse.Action) -> str:
        return plain_text(super()._expand_help(action))

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or not action.option_strings
            or default is None
            or default is argparse.SUPPRESS
            or isinstance(default, bool)
            or action.nargs == 0
        ):
            return text
        return f"{text} (default: %(default)s)"


def _options(parser: argparse.ArgumentParser) -> tuple[set[str], set[str]]:
    """(options that take exactly one value, every option string), in every subcommand."""
    values, every = set(), set()
    parsers = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += list(action.choices.values())
    for p in parsers:
        for action in p._actions:
            every.update(action.option_strings)
            if action.option_strings and action.nargs is None:
                values.update(action.option_strings)
    return values, every


def _attach_dash_values(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``-m -5M`` as ``-m-5M`` (``--memory=-5M``): argparse takes a value that starts with
    ``-`` and is not a plain negative number for an option, and would say "expected one
    argument" instead of naming the value its type function rejects. A word that is itself
    an option (``-m -q``) stays one."""
    values, every = _options(parser)
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            out += argv[i:]
            break
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if (
            tok in values
            and nxt is not None
            and nxt.startswith("-")
            and nxt != "--"
            and len(nxt) > 1
            and nxt.split("=", 1)[0] not in every
        ):
            out.append(f"{tok}={nxt}" if tok.startswith("--") else tok + nxt)
            i += 2
            continue
        out.append(tok)
        i += 1
    return out


def setup_logging(level: int, prog: str) -> None:
    """QEMU-style log lines on stderr: ``prog: logger: message``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prog}: %(name)s: %(levelname)s: %(message)s"))
    root = logging.getLogger("gemu")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``gemu`` parser: with every command, or with only the module of ``command``."""
    parser = argparse.ArgumentParser(
        prog="gemu",
        description="Hardware-in-the-loop emulator for GPU memory management.",
        formatter_class=HelpFormatter,
    )
    parser.allow_abbrev = False
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in (COMMANDS[command],) if command in COMMANDS else COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for p in sub.choices.values():
        p.formatter_class = HelpFormatter
        # no prefix matching: QEMU's single-dash long options (-monitor, -serial) must not
        # read as a prefix of another option or as -m with the value "onitor"
        p.allow_abbrev = False
    return parser


class _VersionAction(argparse.Action):
    """``--version``: the installed version, looked up only when asked for (importlib.metadata
    reads the package metadata and costs more than the rest of the command line to import)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(
            option_strings,
            dest=dest,
            default=argparse.SUPPRESS,
            nargs=0,
            help="show program's version number and exit",
        )

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"gemu version {_version()}")
        parser.exit()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gemu")
    except PackageNotFoundError:
        return "unknown (not installed)"


EXIT_INTERNAL = 70
"""A bug in gemu itself (BSD's EX_SOFTWARE): an exception no command turned into a message."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(_attach_dash_values(argv, parser))
    subparser = parser._subparsers._group_actions[0].choices[args.command]
    try:
        return args.func(args, subparser)
    except Exception as exc:
        # Every mistake a user can make has its own message; what is left is gemu's bug.
        # It gets one line, not a traceback, unless the user asks for the traceback.
        if os.environ.get("GEMU_DEBUG"):
            raise
        print(
            f"gemu {args.command}: internal error: {type(exc).__name__}: {exc} "
            "(run again with GEMU_DEBUG=1 for the traceback, and please report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
