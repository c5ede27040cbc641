"""``gemu device``: run the GPU device model and serve it on a transport."""

from __future__ import annotations

import argparse
import logging
import signal

from gemu.host.cli import LOG_LEVELS, READY_LINE, _listen_spec, _log_level, setup_logging


def register(sub: argparse._SubParsersAction) -> None:
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
