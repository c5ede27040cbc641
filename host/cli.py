"""DOC: the ``gemu`` command line.

A thin layer over the library: each subcommand parses its options, builds the objects the
library provides and runs them. Bad arguments are argparse errors (exit status 2) that name
the bad value::

    gemu device --listen unix:/tmp/gpu.sock          # the device model, QEMU-style
    gemu device --listen tcp:127.0.0.1:0 --stepped   # port 0: the ready line says which
    gemu demo                                        # spawn a device and run jobs on it

``gemu device`` prints one ready line on stdout once it listens, for whoever spawned it::

    gemu-device: listening on unix:/tmp/gpu.sock

and logs on stderr. SIGINT and SIGTERM stop it cleanly (the UNIX socket file is removed).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

LOG_LEVELS = ("debug", "info", "warning", "error")
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

    dev = sub.add_parser(
        "device",
        help="run the GPU device model and serve it on a transport",
        description="Run the GPU device model as a server (one client at a time).",
    )
    dev.add_argument(
        "--listen",
        required=True,
        type=_listen_spec,
        metavar="SPEC",
        help="unix:PATH, tcp:HOST:PORT (loopback only; port 0 picks one) or "
        "serial:PORT-or-pyserial-URL",
    )
    dev.add_argument(
        "--stepped",
        action="store_true",
        help="start in STEPPED clock mode: the command processor runs only on STEP requests",
    )
    dev.add_argument(
        "--log",
        type=_log_level,
        default=logging.INFO,
        metavar="LEVEL",
        help=f"log level on stderr: {', '.join(LOG_LEVELS)} (default: info)",
    )
    dev.add_argument(
        "--gdb",
        metavar="SPEC",
        help="serve the GDB remote protocol on SPEC (not available yet)",
    )
    dev.set_defaults(func=cmd_device)

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
    return parser


def cmd_device(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gemu.device import transport
    from gemu.device.gpu import Gpu
    from gemu.device.server import DeviceServer

    if args.gdb is not None:
        parser.error(f"argument --gdb: the gdb stub is not available yet (got {args.gdb!r})")
    setup_logging(args.log, "gemu-device")
    try:
        server = DeviceServer(Gpu(stepped=args.stepped), args.listen)
    except transport.SpecError as exc:
        parser.error(f"argument --listen: {exc}")

    def _stop(signum, _frame) -> None:
        logging.getLogger("gemu.device.server").info(
            "%s: shutting down", signal.Signals(signum).name
        )
        server.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(READY_LINE.format(address=server.address), flush=True)
    server.serve_forever()
    return 0


def cmd_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gemu.host import demo

    setup_logging(args.log, "gemu")
    return demo.main(memory_mib=args.memory, device=args.device)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    subparser = parser._subparsers._group_actions[0].choices[args.command]
    return args.func(args, subparser)


if __name__ == "__main__":
    sys.exit(main())
