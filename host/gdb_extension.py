"""DOC: the gemu extension for gdb (load it with ``source <path>``; ``gemu gdbinit`` prints it).

gdb poses as aarch64 to talk to the gemu GPU (docs/gdb.md), so its own disassembler would
decode command-stream packets as ARM instructions. This extension registers a gdb 13 Python
disassembler (``gdb.disassembler.register_disassembler``) that decodes gemu packets instead,
so ``x/8i $pc`` and ``display/i $pc`` show ``FENCE 0x1000, seqno=7``. gdb caps an aarch64
instruction at 4 bytes, so the header line carries the packet's text and each body dword
follows as a ``.dword`` line; ``monitor dis ADDR N`` lists whole packets. It adds commands:

- ``gemu cp``: the command processor registers by meaning (state, ring, AS, error);
- ``gemu disasm on|off``: switch the packet disassembler (off: gdb's aarch64 one);
- ``gemu ring``, ``gemu fault``: shorthands for ``monitor ring`` / ``monitor fault``;
- ``gemu as N``, ``gemu phys``, ``gemu auto``: switch the stub's memory space and drop what
  gdb cached of the old one;
- ``gemu cache on|off``: read GPU memory through gdb's data cache in 4 KiB lines (``x/1024xw``
  becomes one packet instead of 1024), ``gemu flush`` drops it.

It runs in gdb's embedded Python (the system python3), which cannot import the project's
virtual environment, so it is self-contained: it imports only the standard library and
``gdb``, and carries its own copy of the packet table. ``tests/unit/device/test_gdbstub_extension.py``
checks that copy against ``gemu.device.abi.packets`` (names, lengths and the text of every
opcode), so the two cannot drift apart unnoticed.
"""

from __future__ import annotations

import struct

try:
    import gdb  # only inside gdb
except ImportError:  # imported by the tests, outside gdb
    gdb = None

# opcode -> (name, body fields); "*" is a 64-bit LO/HI pair, "+" every remaining dword
OPCODES = {
    0x00: ("NOP", ("payload+",)),
    0x01: ("SET_AS", ("as_index",)),
    0x02: ("WRITE_DATA", ("addr*", "data+")),
    0x03: ("COPY", ("src*", "dst*", "size")),
    0x04: ("FILL", ("dst*", "size", "value")),
    0x05: ("CRC32", ("src*", "size", "dst*")),
    0x06: ("ATOMIC", ("addr*", "value*")),
    0x07: ("FENCE", ("addr*", "seqno*")),
    0x08: ("WAIT_MEM", ("addr*", "reference", "mask", "function", "timeout_us")),
    0x09: ("INDIRECT_BUFFER", ("addr*", "size_dw")),
    0x0A: ("TLB_INVALIDATE", ("as_index", "va*", "size*")),
}
LENGTHS = {  # opcode -> (min, max) body dwords
    0x00: (0, 0xFFFF),
    0x01: (1, 1),
    0x02: (3, 0xFFFF),
    0x03: (5, 5),
    0x04: (4, 4),
    0x05: (5, 5),
    0x06: (4, 4),
    0x07: (4, 4),
    0x08: (6, 6),
    0x09: (3, 3),
    0x0A: (5, 5),
}
FLAGS = {0x01: "irq", 0x02: "phys"}
MAX_DECODE = 0x1000  # longer packets are shown by name and length
ACCEPTED_FLAGS = {0x02: 2, 0x03: 2, 0x04: 2, 0x05: 2, 0x06: 2, 0x07: 3, 0x08: 2}
WAIT_FUNCS = ("ALWAYS", "LT", "LE", "EQ", "NE", "GE", "GT")
CP_STATES = ("STOPPED", "IDLE", "RUNNING", "WAITING", "ERROR", "HALTED")
CP_ERRORS = (
    "NONE",
    "UNKNOWN_OPCODE",
    "BAD_LENGTH",
    "BAD_FLAGS",
    "PRIVILEGED",
    "MMU_FAULT",
    "BUS_ERROR",
    "WAIT_TIMEOUT",
    "IB_TOO_DEEP",
    "BAD_ALIGNMENT",
    "BAD_ARGUMENT",
    "RING_CONFIG",
    "NO_MEMORY",
)


def packet_length(header: int) -> int:
    """Bytes taken by the packet whose header dword is ``header``."""
    return 4 * (1 + (header >> 16))


def _fields(names: tuple[str, ...], words: list[int]) -> dict:
    out, i = {}, 0
    for name in names:
        if name.endswith("*"):
            out[name[:-1]] = words[i] | (words[i + 1] << 32)
            i += 2
        elif name.endswith("+"):
            out[name[:-1]] = words[i:]
            i = len(words)
        else:
            out[name] = words[i]
            i += 1
    return out


def disassemble(data: bytes) -> str:
    """One packet as text (the same text as ``gemu.device.abi.packets.disassemble_one``)."""
    if len(data) < 4:
        return "(bad) truncated header"
    (header,) = struct.unpack_from("<I", data)
    op, flags, length = header & 0xFF, (header >> 8) & 0xFF, header >> 16
    if op not in OPCODES:
        return f".word {header:#010x}  ; unknown opcode {op:#04x}"
    name, names = OPCODES[op]
    fl = "".join("." + FLAGS[bit] for bit in sorted(FLAGS) if flags & bit)
    lo, hi = LENGTHS[op]
    if 4 + 4 * length > len(data):
        return f"{name}{fl} len={length}  ; body runs past the end of the buffer"
    if not lo <= length <= hi:
        return f"{name}{fl} len={length}  ; bad length {length} for {name}"
    if flags & ~ACCEPTED_FLAGS.get(op, 0):
        return f"{name}{fl} len={length}  ; bad flags {flags:#x} for {name}"
    b = _fields(names, list(struct.unpack_from(f"<{length}I", data, 4)))
    if name == "NOP":
        args = f"{length} dwords" if length else ""
    elif name == "SET_AS":
        args = f"as={b['as_index']}"
    elif name == "WRITE_DATA":
        words = ", ".join(f"{w:#x}" for w in b["data"][:4])
        args = f"{b['addr']:#x}, [{words}{', ...' if len(b['data']) > 4 else ''}]"
    elif name == "COPY":
        args = f"{b['src']:#x} -> {b['dst']:#x}, size={b['size']:#x}"
    elif name == "FILL":
        args = f"{b['dst']:#x}, size={b['size']:#x}, value={b['value']:#x}"
    elif name == "CRC32":
        args = f"{b['src']:#x}, size={b['size']:#x} -> {b['dst']:#x}"
    elif name == "ATOMIC":
        args = f"{b['addr']:#x} += {b['value']:#x}"
    elif name == "FENCE":
        args = f"{b['addr']:#x}, seqno={b['seqno']}"
    elif name == "WAIT_MEM":
        fn = b["function"]
        fname = WAIT_FUNCS[fn] if fn < len(WAIT_FUNCS) else str(fn)
        args = (
            f"{b['addr']:#x} & {b['mask']:#x} {fname} {b['reference']:#x}, "
            f"timeout={b['timeout_us']}us"
        )
    elif name == "INDIRECT_BUFFER":
        args = f"{b['addr']:#x}, {b['size_dw']} dwords"
    else:
        args = f"as={b['as_index']}, {b['va']:#x}+{b['size']:#x}"
    return f"{name}{fl} {args}".rstrip()


BREAK_USAGE = (
    "usage: gemu break job SEQNO | gemu break next-job [AS] | gemu break *ASn:ADDR | "
    "gemu break *ring:ADDR | gemu break --as N ADDR | gemu break --phys ADDR"
)


def break_commands(arg: str) -> list[str]:
    """The gdb commands ``gemu break ARG`` runs: job breakpoints are monitor commands; an
    address qualified by its space (``*AS1:0x100000``, ``--as 1 0x100000``, ``*ring:ADDR``,
    ``--phys ADDR``) qualifies the address in the stub, then sets gdb's breakpoint there.
    Raises ValueError with the usage."""
    words = arg.split()
    if not words:
        raise ValueError(BREAK_USAGE)
    if words[0] == "job" and len(words) == 2:
        return [f"monitor break-job {int(words[1], 0)}"]
    if words[0] == "next-job" and len(words) <= 2:
        return ["monitor break-next-job " + " ".join(words[1:])]
    if words[0] == "--as" and len(words) == 3:
        space, addr = f"as{int(words[1], 0)}", words[2]
    elif words[0] == "--phys" and len(words) == 2:
        space, addr = "phys", words[1]
    elif len(words) == 1 and words[0].startswith("*") and ":" in words[0]:
        prefix, _, addr = words[0][1:].partition(":")
        prefix = prefix.lower()
        if prefix in ("ring", "phys"):
            space = "phys"
        elif prefix.startswith("as"):
            space = f"as{int(prefix[2:], 0)}"
        else:
            raise ValueError(BREAK_USAGE)
    else:
        raise ValueError(BREAK_USAGE)
    value = int(addr.removeprefix("*"), 0)
    return [f"monitor break-space {value:#x} {space}", f"break *{value:#x}"]


if gdb is not None:
    import gdb.disassembler

    _dis = gdb.disassembler

    class GemuDisassembler(_dis.Disassembler):
        """Decodes gemu command-stream packets for x/i, display/i and disassemble."""

        enabled = True

        def __init__(self) -> None:
            super().__init__("gemu")
            self.last = (0, 0, "")  # (address, size, name) of the last packet decoded

        def __call__(self, info):
            if not GemuDisassembler.enabled:
                return None
            addr = info.address
            start, size, name = self.last
            if start < addr < start + size:
                # gdb caps an aarch64 "instruction" at 4 bytes: the packet's header line
                # carries its text, each body dword gets a line of its own
                try:
                    word = struct.unpack("<I", bytes(info.read_memory(4, 0)))[0]
                except gdb.MemoryError:
                    return None
                text = f"  .dword {word:#010x}  ; {name} +{addr - start:#x}"
                return _dis.DisassemblerResult(length=4, string=text)
            try:
                header = struct.unpack("<I", bytes(info.read_memory(4, 0)))[0]
            except gdb.MemoryError:
                return None  # gdb reports the unreadable address itself
            op, size = header & 0xFF, packet_length(header)
            if op not in OPCODES:
                self.last = (0, 0, "")
                text = disassemble(header.to_bytes(4, "little"))
                return _dis.DisassemblerResult(length=4, string=text)
            if size > MAX_DECODE:  # a long NOP or WRITE_DATA: name and length only
                text = f"{OPCODES[op][0]} len={header >> 16}"
            else:
                try:
                    text = disassemble(bytes(info.read_memory(size, 0)))
                except gdb.MemoryError:
                    text = f"{OPCODES[op][0]} len={header >> 16}  ; body not readable"
            self.last = (addr, size, OPCODES[op][0])
            return _dis.DisassemblerResult(length=4, string=text)

    class GemuPrefix(gdb.Command):
        """gemu GPU commands: cp, ring, fault, jobs, break, as N, phys, auto, cache on|off,
        flush, disasm on|off."""

        def __init__(self) -> None:
            super().__init__("gemu", gdb.COMMAND_USER, prefix=True)

    class GemuCp(gdb.Command):
        """Show the command processor's registers by meaning."""

        def __init__(self) -> None:
            super().__init__("gemu cp", gdb.COMMAND_USER)

        def invoke(self, arg, from_tty):
            r = {n: int(gdb.parse_and_eval(f"${n}")) for n in [f"x{i}" for i in range(15)]}
            pc = int(gdb.parse_and_eval("$pc"))
            state = CP_STATES[r["x0"]] if r["x0"] < len(CP_STATES) else str(r["x0"])
            err = r["x4"] & 0xFF
            ename = CP_ERRORS[err] if err < len(CP_ERRORS) else f"{err:#x}"
            where = "IB GPU VA" if r["x11"] else "ring guest-physical"
            gdb.write(
                f"CP {state}, pc {pc:#x} ({where}), AS{r['x3']}, IB depth {r['x6']}, "
                f"{r['x7']} packets executed\n"
                f"ring base {r['x8']:#x} size {r['x9']:#x} head {r['x1']:#x} tail {r['x2']:#x}\n"
                f"CP_ERROR {ename} at {r['x5']:#x}; last fence seqno {r['x10']}\n"
                f"STATUS {r['x12']:#x} IRQ_STATUS {r['x13']:#x} MMU_INT_RAWSTAT {r['x14']:#x}\n"
            )

    class GemuMonitor(gdb.Command):
        """Shorthand for a monitor command of the gemu stub."""

        def __init__(self, name: str) -> None:
            self.monitor_name = name
            super().__init__(f"gemu {name}", gdb.COMMAND_USER)

        def invoke(self, arg, from_tty):
            gdb.execute(f"monitor {self.monitor_name} {arg}".rstrip(), from_tty)

    class GemuDisasm(gdb.Command):
        """gemu disasm on|off: decode gemu packets (on) or aarch64 instructions (off)."""

        def __init__(self) -> None:
            super().__init__("gemu disasm", gdb.COMMAND_USER)

        def invoke(self, arg, from_tty):
            if arg.strip() not in ("on", "off"):
                raise gdb.GdbError("usage: gemu disasm on|off")
            GemuDisassembler.enabled = arg.strip() == "on"
            gdb.write(f"gemu packet disassembler {arg.strip()}\n")

    class GemuCache(gdb.Command):
        """gemu cache on|off: read GPU memory in 4 KiB lines through gdb's data cache.

        gdb reads `x/1024xw` one word per packet; with the cache on it fetches whole 4 KiB
        lines and keeps them until the GPU runs again (or `gemu flush`). The guest may write
        memory while the GPU is halted, so flush before trusting a second look."""

        def __init__(self) -> None:
            super().__init__("gemu cache", gdb.COMMAND_USER)

        def invoke(self, arg, from_tty):
            if arg.strip() == "on":
                gdb.execute("set dcache line-size 4096", to_string=True)
                gdb.execute("set dcache size 256", to_string=True)
                gdb.execute(f"mem 0 {1 << 48:#x} rw cache", to_string=True)
                gdb.write("gemu: GPU memory cached in 4 KiB lines until the GPU runs\n")
            elif arg.strip() == "off":
                gdb.execute("mem auto", to_string=True)
                gdb.write("gemu: GPU memory read uncached\n")
            else:
                raise gdb.GdbError("usage: gemu cache on|off")

    class GemuFlush(gdb.Command):
        """Drop gdb's cached GPU memory (see `gemu cache`)."""

        def __init__(self) -> None:
            super().__init__("gemu flush", gdb.COMMAND_USER)

        def invoke(self, arg, from_tty):
            gdb.execute("maintenance flush dcache", to_string=True)

    class GemuBreak(gdb.Command):
        """Break on a job or on an address of one space.

        gemu break job SEQNO       stop before the first packet of the job whose FENCE
                                   writes SEQNO (monitor jobs lists them)
        gemu break next-job [AS]   stop before the first packet of the next job (of AS)
        gemu break *AS1:0x100000   a breakpoint that hits only in IBs of AS1 (also
                                   --as 1 0x100000); *ring:ADDR or --phys ADDR: only in
                                   the ring"""

        def __init__(self) -> None:
            super().__init__("gemu break", gdb.COMMAND_BREAKPOINTS)

        def invoke(self, arg, from_tty):
            try:
                commands = break_commands(arg)
            except ValueError as exc:
                raise gdb.GdbError(str(exc) if str(exc) == BREAK_USAGE else BREAK_USAGE) from None
            for command in commands:
                gdb.execute(command, from_tty)

    class GemuSpace(gdb.Command):
        """Switch the memory space (monitor as N / phys / auto) and drop cached memory."""

        def __init__(self, name: str) -> None:
            self.space = name
            super().__init__(f"gemu {name}", gdb.COMMAND_USER)

        def invoke(self, arg, from_tty):
            gdb.execute(f"monitor {self.space} {arg}".rstrip(), from_tty)
            gdb.execute("maintenance flush dcache", to_string=True)

    _dis.register_disassembler(None, "aarch64")  # sourcing the file again replaces it
    _dis.register_disassembler(GemuDisassembler(), "aarch64")
    GemuPrefix()
    GemuCp()
    GemuMonitor("ring")
    GemuMonitor("fault")
    GemuMonitor("jobs")
    GemuBreak()
    GemuDisasm()
    GemuCache()
    GemuFlush()
    for _space in ("as", "phys", "auto"):
        GemuSpace(_space)
    gdb.write("gemu gdb extension loaded: packet disassembler on; `help gemu` for commands\n")
