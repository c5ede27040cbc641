"""``gemu device``: run the GPU device model and serve it on a transport."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
from typing import TYPE_CHECKING

from gemu.host.cli import LOG_LEVELS, READY_LINE, _listen_spec, _log_level, setup_logging

if TYPE_CHECKING:
    import subprocess

GDB_READY_LINE = "gemu-device: gdb stub on {address}"
READY_PREFIX = READY_LINE.format(address="")
GDB_READY_PREFIX = GDB_READY_LINE.format(address="")


def wait_ready(proc: subprocess.Popen, timeout: float) -> str:
    """The address from the ready line of a spawned ``gemu device`` (stdout piped), read
    without consuming more than that line's chunk; RuntimeError if the process exits or stays
    silent for ``timeout`` seconds first."""
    return wait_lines(proc, timeout, 1)[0]


def wait_lines(proc: subprocess.Popen, timeout: float, count: int) -> list[str]:
    """The addresses of the first ``count`` lines a spawned ``gemu device`` prints: its ready
    line, then (with ``--gdb``) where the gdb stub listens. RuntimeError if the process exits
    or stays silent for ``timeout`` seconds first, or a line is not what the device prints."""
    import selectors  # the spawner's side: gemu device itself does not need it

    deadline = time.monotonic() + timeout
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while buf.count(b"\n") < count:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise RuntimeError(f"gemu device printed no ready line within {timeout} s")
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"gemu device exited with {proc.wait()} before it was ready")
            buf += chunk
    lines = [raw.decode(errors="replace") for raw in buf.split(b"\n")[:count]]
    out = []
    for i, line in enumerate(lines):
        prefix = READY_PREFIX if i == 0 else GDB_READY_PREFIX
        if not line.startswith(prefix):
            raise RuntimeError(f"unexpected line {i + 1} from gemu device: {line!r}")
        out.append(line[len(prefix) :].strip())
    return out


def _gdb_spec(text: str) -> str:
    from gemu.device import transport

    spec = "tcp:127.0.0.1:" + text[len("tcp::") :] if text.startswith("tcp::") else text
    try:
        parsed = transport.check_listen(spec)
    except transport.SpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if parsed.kind != "tcp":
        raise argparse.ArgumentTypeError(
            f"{text!r}: gdb connects over TCP: use tcp::PORT or tcp:127.0.0.1:PORT"
        )
    return spec


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
        default="info",
        metavar="LEVEL",
        help=f"log level on stderr: {', '.join(LOG_LEVELS)}",
    )
    dev.add_argument(
        "--gdb",
        type=_gdb_spec,
        metavar="SPEC",
        help="serve the GDB remote protocol on SPEC: tcp::PORT or tcp:HOST:PORT (loopback "
        "only; port 0 picks one, the gdb ready line says which); see docs/gdb.md",
    )
    dev.add_argument(
        "-S",
        dest="gdb_wait",
        action="store_true",
        help="hold the command processor until gdb continues (needs --gdb)",
    )
    dev.add_argument(
        "--coredump-dir",
        metavar="DIR",
        help="write an ELF core file of the GPU into DIR on each command-processor error and "
        "on each reset of a busy CP (none by default); read it with `gemu coredump FILE` or "
        "`gdb-multiarch -c FILE`",
    )
    dev.set_defaults(func=cmd_device)


EXIT_STOPPED, EXIT_USAGE = 0, 2
"""``gemu device`` exits 0 when SIGINT or SIGTERM stopped it, 2 (argparse) for a bad command
line, a transport or gdb address that cannot be opened, an unusable --coredump-dir."""


def cmd_device(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gemu.device import transport
    from gemu.device.gpu import Gpu
    from gemu.device.server import DeviceServer

    if args.gdb_wait and args.gdb is None:
        parser.error("argument -S: needs --gdb (there is no debugger to continue the device)")
    setup_logging(args.log, "gemu-device")
    gpu = Gpu(stepped=args.stepped)
    try:
        server = DeviceServer(gpu, args.listen)
    except transport.SpecError as exc:
        parser.error(f"argument --listen: {exc}")
    stub = None
    if args.gdb is not None:
        from gemu.device.gdbstub import GdbStub

        try:
            stub = GdbStub(gpu, args.gdb, wait=args.gdb_wait)
        except transport.SpecError as exc:
            parser.error(f"argument --gdb: {exc}")
        stub.attach(server)
    if args.coredump_dir is not None:
        from gemu.device.coredump import CoreDumper

        try:
            dumper = CoreDumper(gpu, args.coredump_dir)
        except OSError as exc:
            parser.error(f"argument --coredump-dir: {args.coredump_dir!r}: {exc.strerror}")
        dumper.attach(server)
        if stub is not None:  # cores carry the names gdb gave (monitor symbol-file)
            dumper.symbols = lambda: stub.command_buffers

    def _stop(signum, _frame) -> None:
        logging.getLogger("gemu.device.server").info(
            "%s: shutting down", signal.Signals(signum).name
        )
        server.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(READY_LINE.format(address=server.address), flush=True)
    if args.gdb is not None:
        # a second line, after the one spawners wait for: where gdb connects
        print(GDB_READY_LINE.format(address=stub.address), flush=True)
    try:
        server.serve_forever()
    finally:
        if args.gdb is not None:
            stub.close()
    return EXIT_STOPPED
