"""``gemu coredump`` and ``gemu gdbinit``: post-mortem GPU cores and the gdb extension."""

from __future__ import annotations

import argparse
from pathlib import Path

from gemu.host.cli import int_in

EXTENSION = Path(__file__).resolve().with_name("gdb_extension.py")


def register(sub: argparse._SubParsersAction) -> None:
    core = sub.add_parser(
        "coredump",
        help="summarise a GPU core file written by `gemu device --coredump-dir`",
        description="Print why the core was written, the command processor's registers, the "
        "failing packet, latched MMU faults and the memory segments it holds. "
        "`gdb-multiarch -c FILE` opens the same file as an aarch64 core.",
    )
    core.add_argument("file", metavar="FILE", help="a core file (gemu-*.core)")
    core.set_defaults(func=cmd_coredump)

    init = sub.add_parser(
        "gdbinit",
        help="print gdb commands that load the gemu extension (and attach)",
        description="Print lines for gdb (or a .gdbinit): `source` the gemu extension "
        "(command-stream disassembly for x/i and display/i, `gemu` commands) and, with "
        "--port, attach to a device started with `--gdb tcp::PORT`.",
    )
    init.add_argument(
        "--port", type=int_in("port", 1, 65535), metavar="PORT", help="add `target remote` to PORT"
    )
    init.set_defaults(func=cmd_gdbinit)


def cmd_coredump(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gemu.device.coredump import summarize

    try:
        print(summarize(args.file), end="")
    except FileNotFoundError:
        parser.error(f"argument FILE: {args.file!r}: no such file")
    except OSError as exc:  # a directory, no permission
        parser.error(f"argument FILE: {args.file!r}: {exc.strerror or exc}")
    except ValueError as exc:
        parser.error(f"argument FILE: {exc}")
    return 0


def gdbinit_text(port: int | None = None) -> str:
    lines = [
        "# gemu: load the gdb extension (packet disassembler, `gemu` commands); it is",
        "# self-contained, so gdb's own Python needs nothing from the project's venv",
        f"source {EXTENSION}",
    ]
    if port is not None:
        lines.append(f"target remote 127.0.0.1:{port}")
    return "\n".join(lines) + "\n"


def cmd_gdbinit(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    print(gdbinit_text(args.port), end="")
    return 0


def job_symbols(named: dict[str, object], labels: dict[str, dict[str, int]] | None = None):
    """The command buffers of submitted jobs, by name: ``named`` maps a name to a job's
    out-fence (what ``GemuFile.submit`` returned) or to the job; ``labels`` may name packets
    of a buffer by byte offset (``{"copy_job": {"copy_job_fence": 0x28}}``). Each buffer is
    at the job's GPU VA (in its file's address space)."""
    from gemu.device.symfile import CommandBuffer

    out = []
    for name, what in named.items():
        job = getattr(what, "job", what)
        ib_va, ib_dwords = getattr(job, "ib_va", None), getattr(job, "ib_dwords", None)
        if ib_va is None or not ib_dwords:
            raise ValueError(f"{name}: {what!r} is not a submitted job with a command buffer")
        out.append(CommandBuffer(name, ib_va, 4 * ib_dwords, dict((labels or {}).get(name, {}))))
    return out


def write_job_symbols(
    path: str | Path, named: dict[str, object], labels: dict[str, dict[str, int]] | None = None
) -> Path:
    """Write the ELF symbol file naming the command buffers of ``named`` jobs; gdb loads it
    with ``add-symbol-file PATH`` (see docs/gdb.md, Symbols)."""
    from gemu.device.symfile import write_symbol_elf

    return write_symbol_elf(path, job_symbols(named, labels))
