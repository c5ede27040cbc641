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
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

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


def _positive_mib(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: not a whole number") from None
    if not 1 <= value <= 4096:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be 1..4096 MiB")
    return value


def setup_logging(level: int, prog: str) -> None:
    """QEMU-style log lines on stderr: ``prog: logger: message``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prog}: %(name)s: %(levelname)s: %(message)s"))
    root = logging.getLogger("gemu")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemu",
        description="Hardware-in-the-loop emulator for GPU memory management.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    subparser = parser._subparsers._group_actions[0].choices[args.command]
    return args.func(args, subparser)


if __name__ == "__main__":
    sys.exit(main())
