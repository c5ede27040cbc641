"""``gemu demo``: the main demonstration run."""

from __future__ import annotations

import argparse
import logging

from gemu.host.cli import _log_level, _positive_mib, _transport_spec, setup_logging


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo",
        help="spawn a device and run a few GPU jobs through it",
        description="Spawn `gemu device` on a temporary UNIX socket, build page tables for two "
        "address spaces in shared guest memory and run FILL, COPY, CRC32, ATOMIC, FENCE, "
        "WAIT_MEM and a faulting job, then print what happened.",
    )
    demo.add_argument(
        "-m",
        "--memory",
        type=_positive_mib,
        default=64,
        metavar="MIB",
        help="guest memory in MiB (default: 64)",
    )
    demo.add_argument(
        "--device",
        type=_transport_spec,
        metavar="SPEC",
        help="use a device already listening on SPEC instead of spawning one",
    )
    demo.add_argument(
        "--log", type=_log_level, default=logging.WARNING, metavar="LEVEL", help="log level"
    )
    demo.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gemu.host import demo

    setup_logging(args.log, "gemu")
    return demo.main(memory_mib=args.memory, device=args.device)
