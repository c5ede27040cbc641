"""``gemu demo``: the curated emulator run (or, with ``--device-tour``, the device-level tour)."""

from __future__ import annotations

import argparse
import logging
import sys

from gemu.host.cli import _log_level, _transport_spec, setup_logging


def _size(text: str) -> int:
    from gemu.host.cmd_boot import _size_arg

    return _size_arg(text)


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo",
        help="boot a machine and run a curated set of example job scripts, with a summary",
        description="Boot a fresh machine (the GPU in its own process) and run the curated "
        "examples/jobs scripts: a copy, the validation sequence, purgeable BOs, a GPU fault, "
        "a working set three times guest RAM, a hang, concurrent tasks; then, on a second machine "
        "in driver mode vm-bind, VM_BIND with VMs sharing BOs larger than RAM. Prints progress "
        "and a summary (jobs, "
        "bytes moved, evictions, swap-ins, purges, faults handled, checks passed); exit 0 "
        "when every check held. --device-tour instead drives the device registers directly "
        "(page tables, ring, FILL/COPY/CRC32/ATOMIC/WAIT_MEM, a fault and RESUME).",
    )
    demo.add_argument(
        "-m",
        "--memory",
        type=_size,
        default=None,
        metavar="SIZE",
        help="guest RAM (default: 16M for the run, 64M for the tour)",
    )
    demo.add_argument(
        "--device",
        type=_transport_spec,
        metavar="SPEC",
        help="use a device already listening on SPEC instead of spawning one",
    )
    demo.add_argument(
        "--device-tour",
        action="store_true",
        help="the device-level tour (no guest kernel): registers, page tables, ring",
    )
    demo.add_argument(
        "--log",
        type=_log_level,
        default=None,
        metavar="LEVEL",
        help="log level on stderr (default: quiet; the faults the demo provokes are expected)",
    )
    demo.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Exit status as ``gemu run``'s: 0, 1 (a check failed), 2, 3 (device unreachable or
    lost), 130 (Ctrl-C)."""
    from gemu.host import demo

    setup_logging(args.log or logging.CRITICAL + 1, "gemu")
    device = args.device or "spawn"
    try:
        if args.device_tour:
            mib = (args.memory or 64 << 20) >> 20
            return demo.main(memory_mib=mib, device=args.device)
        ram = args.memory or 16 << 20
        return demo.run_curated(ram_size=ram, swap_size=4 * ram, device=device)
    except KeyboardInterrupt:
        print("gemu demo: interrupted", file=sys.stderr)
        return 130
    except (ConnectionError, RuntimeError) as exc:  # DeviceGone, no ready line
        print(f"gemu demo: device {device} unreachable or failing: {exc}", file=sys.stderr)
        return 3
