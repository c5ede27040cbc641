"""DOC: post-mortem core files of the GPU (``gemu device --coredump-dir DIR``).

When the command processor stops on an error (an MMU fault, a bad packet, a bus error), or
the device is reset while the CP still had work (the guest's recovery from a hang), the device
writes an ELF core file that gdb opens as an aarch64 core and ``gemu coredump FILE`` reads:

- ``PT_NOTE`` with an ``NT_PRSTATUS`` note ("CORE", aarch64 layout) whose registers follow
  :data:`gemu.device.gdb_target.CORE_MAP` (``pc`` = the failing or next packet), and gemu
  notes ("GEMU"): :data:`NT_GEMU_STATE` (why, CP state, ring, error), :data:`NT_GEMU_MMIO`
  (every MMIO register) and :data:`NT_GEMU_FAULT` (each AS with a latched fault);
- ``PT_LOAD`` segments: the ring at its guest-physical address, and at their GPU VAs the
  memory mapped in the faulting AS (the CP's AS when there is no fault): all of it up to
  :data:`VA_DUMP_ALL`, else the mapped pages around the fault, the failing packet and the
  indirect buffers.

A core file is bounded whatever the guest programmed: the ring segment is at most
:data:`RING_DUMP_MAX` (1 MiB), the GPU VA segments at most :data:`VA_DUMP_ALL` (8 MiB) or
``2 * FAULT_WINDOW + 4 KiB`` around each of at most ``2 + IB_MAX_DEPTH + AS_COUNT`` addresses,
and the mapping walk behind them reads each page table once, at most
``mmu.WALK_MAX_TABLES`` of them (a cycle or alias in the tables is logged, not followed).

Formats are construct declarations; :func:`build_core` and :func:`read_core` are inverses
(the reader uses pyelftools' ``ELFFile``)::

    dumper = CoreDumper(gpu, "/tmp/cores")
    dumper.attach(server)          # observes CP errors and resets
    ...
    print(summarize("/tmp/cores/gemu-1-MMU_FAULT.core"))
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from construct import Array, Bytes, Const, Int8ul, Int16ul, Int32sl, Int32ul, Int64ul, Struct

from .abi import regs
from .abi.enums import CpError, CpState
from .abi.protocol import SPACE_PHYS
from .gdb_target import CORE_COUNT
from .gdbstub import core_values, describe_error, pc_in_ib
from .mmu import MemFault
from .symfile import (
    ELF_HEADER,
    EM_AARCH64,
    SECTION_HEADER,
    CommandBuffer,
    read_symbols,
    symbol_sections,
    symbolize,
)

log = logging.getLogger("gemu.device.coredump")
CORE_MODE = 0o600  # core files hold guest memory: owner-only whatever the umask

ET_CORE = 4
PT_LOAD, PT_NOTE = 1, 4
PF_X, PF_W, PF_R = 1, 2, 4
NT_PRSTATUS = 1
NT_GEMU_STATE = 0x6E750001
NT_GEMU_MMIO = 0x6E750002
NT_GEMU_FAULT = 0x6E750003
RING_DUMP_MAX = 1 << 20  # larger rings: a window around RING_HEAD
VA_DUMP_ALL = 8 << 20  # an AS with at most this much mapped is dumped whole
FAULT_WINDOW = 16 * regs.PAGE_SIZE  # else: this much on each side of the fault and the pc

# Linux signal numbers (si_signo in NT_PRSTATUS)
LINUX_SIGNALS = {
    CpError.MMU_FAULT: 11,
    CpError.BUS_ERROR: 7,
    CpError.NO_MEMORY: 7,
    CpError.BAD_ALIGNMENT: 7,
    CpError.WAIT_TIMEOUT: 14,
}
SIGILL, SIGABRT = 4, 6

PROGRAM_HEADER = Struct(
    "p_type" / Int32ul,
    "p_flags" / Int32ul,
    "p_offset" / Int64ul,
    "p_vaddr" / Int64ul,
    "p_paddr" / Int64ul,
    "p_filesz" / Int64ul,
    "p_memsz" / Int64ul,
    "p_align" / Int64ul,
)
NOTE_HEADER = Struct("n_namesz" / Int32ul, "n_descsz" / Int32ul, "n_type" / Int32ul)

# struct elf_prstatus for aarch64 (392 bytes; bfd finds pr_reg at offset 112)
PRSTATUS = Struct(
    "si_signo" / Int32sl,
    "si_code" / Int32sl,
    "si_errno" / Int32sl,
    "pr_cursig" / Int16ul,
    "pad0" / Const(b"\0\0"),
    "pr_sigpend" / Int64ul,
    "pr_sighold" / Int64ul,
    "pr_pid" / Int32ul,
    "pr_ppid" / Int32ul,
    "pr_pgrp" / Int32ul,
    "pr_sid" / Int32ul,
    "pr_times" / Bytes(64),
    "pr_reg" / Array(CORE_COUNT, Int64ul),  # x0..x30, sp, pc, pstate
    "pr_fpvalid" / Int32ul,
    "pad1" / Const(b"\0\0\0\0"),
)

GEMU_STATE = Struct(
    "reason" / Int8ul,  # 0 CP error, 1 reset while busy, 2 requested
    "cp_state" / Int8ul,
    "in_ib" / Int8ul,
    "as_index" / Int8ul,
    "cp_error" / Int32ul,
    "error_addr" / Int64ul,
    "pc" / Int64ul,
    "ring_base" / Int64ul,
    "ring_size" / Int32ul,
    "ring_head" / Int32ul,
    "ring_tail" / Int32ul,
    "packets" / Int32ul,
    "fence_seqno" / Int64ul,
    "text" / Bytes(160),
)
GEMU_MMIO = Array(regs.MMIO_SIZE // 4, Int32ul)
GEMU_FAULT = Struct(
    "as_index" / Int32ul,
    "faultstatus" / Int32ul,
    "faultaddress" / Int64ul,
)
REASONS = ("CP error", "reset while the CP was busy", "requested")


@dataclass
class Segment:
    vaddr: int
    data: bytes
    flags: int = PF_R
    paddr: int = 0
    what: str = ""


@dataclass
class Core:
    """What a core file holds (the input of :func:`build_core`)."""

    signal: int
    registers: list[int]
    state: dict
    mmio: list[int]
    faults: list[dict] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    symbols: list[CommandBuffer] = field(default_factory=list)  # names the debugger gave


def _note(name: bytes, n_type: int, desc: bytes) -> bytes:
    name = name + b"\0"
    pad = lambda n: bytes(-n % 4)  # noqa: E731
    return (
        NOTE_HEADER.build(dict(n_namesz=len(name), n_descsz=len(desc), n_type=n_type))
        + name
        + pad(len(name))
        + desc
        + pad(len(desc))
    )


def build_core(core: Core) -> bytes:
    """The ELF core file for ``core``."""
    prstatus = PRSTATUS.build(
        dict(
            si_signo=core.signal,
            si_code=0,
            si_errno=0,
            pr_cursig=core.signal,
            pr_sigpend=0,
            pr_sighold=0,
            pr_pid=1,
            pr_ppid=0,
            pr_pgrp=1,
            pr_sid=1,
            pr_times=bytes(64),
            pr_reg=core.registers,
            pr_fpvalid=0,
        )
    )
    notes = _note(b"CORE", NT_PRSTATUS, prstatus)
    notes += _note(b"GEMU", NT_GEMU_STATE, GEMU_STATE.build(core.state))
    notes += _note(b"GEMU", NT_GEMU_MMIO, GEMU_MMIO.build(core.mmio))
    for f in core.faults:
        notes += _note(b"GEMU", NT_GEMU_FAULT, GEMU_FAULT.build(f))
    phnum = 1 + len(core.segments)
    offset = ELF_HEADER.sizeof() + phnum * PROGRAM_HEADER.sizeof()
    phdrs = [
        dict(
            p_type=PT_NOTE,
            p_flags=0,
            p_offset=offset,
            p_vaddr=0,
            p_paddr=0,
            p_filesz=len(notes),
            p_memsz=0,
            p_align=4,
        )
    ]
    body = bytearray(notes)
    for seg in core.segments:
        body += bytes(-len(body) % 8)
        phdrs.append(
            dict(
                p_type=PT_LOAD,
                p_flags=seg.flags,
                p_offset=offset + len(body),
                p_vaddr=seg.vaddr,
                p_paddr=seg.paddr,
                p_filesz=len(seg.data),
                p_memsz=len(seg.data),
                p_align=1,
            )
        )
        body += seg.data
    shoff = shnum = shstrndx = 0
    sections = b""
    if core.symbols:  # the command buffers' names, as in a symbol file (device/symfile.py)
        body += bytes(-(offset + len(body)) % 8)
        secs = symbol_sections(core.symbols, offset + len(body))
        body += secs.body
        shoff, shnum, shstrndx, sections = (
            offset + len(body),
            secs.shnum,
            secs.shstrndx,
            secs.headers,
        )
    header = ELF_HEADER.build(
        dict(
            e_type=ET_CORE,
            e_machine=EM_AARCH64,
            e_version=1,
            e_entry=0,
            e_phoff=ELF_HEADER.sizeof(),
            e_shoff=shoff,
            e_flags=0,
            e_ehsize=ELF_HEADER.sizeof(),
            e_phentsize=PROGRAM_HEADER.sizeof(),
            e_phnum=phnum,
            e_shentsize=SECTION_HEADER.sizeof() if shnum else 0,
            e_shnum=shnum,
            e_shstrndx=shstrndx,
        )
    )
    phdr_bytes = b"".join(PROGRAM_HEADER.build(p) for p in phdrs)
    return header + phdr_bytes + bytes(body) + sections


# --- capturing the device ------------------------------------------------------------------


def _pages(gpu: Any, space: int, lo: int, hi: int) -> list[tuple[int, bytes]]:
    """The readable 4 KiB pages of [lo, hi) in ``space``, as (address, data) runs."""
    page = regs.PAGE_SIZE
    runs: list[tuple[int, bytes]] = []
    for addr in range(max(0, lo - lo % page), hi, page):
        try:
            data = gpu.mem_read(space, addr, page)
        except MemFault:
            continue
        if runs and runs[-1][0] + len(runs[-1][1]) == addr:
            runs[-1] = (runs[-1][0], runs[-1][1] + data)
        else:
            runs.append((addr, data))
    return runs


def capture(gpu: Any, reason: int, text: str) -> Core:
    """Everything a core file holds, read through the debug path (no side effects)."""
    d = gpu.debug_read
    cp = gpu.cp
    values = core_values(gpu)  # the registers gdb sees, computed the same way
    names = [f"x{i}" for i in range(31)] + ["sp", "pc", "cpsr"]
    registers = [values.get(n, 0) & (1 << 64) - 1 for n in names]
    cp_error = d(regs.CP_ERROR.offset)
    code = regs.CP_ERROR.field("CODE").ex(cp_error)
    if reason == 0:
        try:
            sig = LINUX_SIGNALS.get(CpError(code), SIGILL)
        except ValueError:
            sig = SIGILL
    else:
        sig = SIGABRT
    in_ib = pc_in_ib(gpu)
    state = dict(
        reason=reason,
        cp_state=int(cp.state()),
        in_ib=int(in_ib),
        as_index=cp.as_index,
        cp_error=cp_error,
        error_addr=values["x5"],
        pc=values["pc"],
        ring_base=cp.ring_base,
        ring_size=cp.ring_size,
        ring_head=cp.head,
        ring_tail=cp.tail,
        packets=d(regs.CP_PACKETS.offset),
        fence_seqno=values["x10"],
        text=text.encode()[:160].ljust(160, b"\0"),
    )
    mmio = [d(off) for off in range(0, regs.MMIO_SIZE, 4)]
    faults, segments = [], []
    for n in range(regs.AS_COUNT):
        fs = d(regs.as_reg(n, "FAULTSTATUS").offset)
        if fs:
            addr = d(regs.as_reg(n, "FAULTADDRESS_LO").offset) | (
                d(regs.as_reg(n, "FAULTADDRESS_HI").offset) << 32
            )
            faults.append(dict(as_index=n, faultstatus=fs, faultaddress=addr))
    if cp.ring_size:
        if cp.ring_size <= RING_DUMP_MAX:
            lo, hi = cp.ring_base, cp.ring_base + cp.ring_size
        else:
            mid = cp.ring_base + cp.head
            lo = max(cp.ring_base, mid - RING_DUMP_MAX // 2)
            hi = min(cp.ring_base + cp.ring_size, lo + RING_DUMP_MAX)
        for addr, data in _pages(gpu, SPACE_PHYS, lo, hi):
            segments.append(Segment(addr, data, PF_R, addr, "ring (guest-physical)"))
    as_index = faults[0]["as_index"] if faults else cp.as_index
    try:
        report = gpu.mappings_report(as_index)
    except MemFault:
        mapped = []
    else:
        mapped = report.runs
        if report.aliases_total or report.truncated:
            log.warning(
                "AS%d page tables: %d table(s) reached twice (cycle/alias, not followed)%s",
                as_index,
                report.aliases_total,
                f"; walk {report.truncated}" if report.truncated else "",
            )
    if sum(size for _, _, size, _ in mapped) <= VA_DUMP_ALL:
        windows = [(va, va + size) for va, _, size, _ in mapped]
    else:
        centers = [values["pc"]] if in_ib else []
        centers += [f["faultaddress"] for f in faults if f["as_index"] == as_index]
        centers += [frame[0] for frame in cp.ib_stack]
        windows = [(c - FAULT_WINDOW, c + FAULT_WINDOW + regs.PAGE_SIZE) for c in centers]
    va_pages: dict[int, bytes] = {}
    for lo, hi in windows:
        for addr, data in _pages(gpu, as_index, lo, hi):
            for i in range(0, len(data), regs.PAGE_SIZE):
                va_pages[addr + i] = data[i : i + regs.PAGE_SIZE]
    for _, group in itertools.groupby(
        enumerate(sorted(va_pages)), key=lambda t: t[1] - t[0] * regs.PAGE_SIZE
    ):
        addrs = [a for _, a in group]
        data = b"".join(va_pages[a] for a in addrs)
        segments.append(Segment(addrs[0], data, PF_R | PF_W, 0, f"AS{as_index} GPU VA"))
    return Core(sig, registers, state, mmio, faults, segments)


class CoreDumper:
    """Write a core file into ``directory`` on each CP error and on each reset that finds the
    CP busy (a hang recovered by the guest)."""

    def __init__(self, gpu: Any, directory: str | os.PathLike) -> None:
        self.gpu = gpu
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.written: list[Path] = []
        # the command buffers' names a core carries (the gdb stub's `monitor symbol-file`)
        self.symbols: Callable[[], list[CommandBuffer]] = list
        self._errors_seen = gpu.cp.errors
        self._seq = 0

    def attach(self, server: Any) -> None:
        server.add_cp_observer(self.observe)
        previous = self.gpu.reset_hook

        def on_reset() -> None:
            if previous is not None:
                previous()
            self.before_reset()

        self.gpu.reset_hook = on_reset

    def observe(self) -> None:
        """After a CP batch: dump once per new CP error."""
        errors = self.gpu.cp.errors
        if errors != self._errors_seen:
            self._errors_seen = errors
            d = self.gpu.debug_read(regs.CP_ERROR.offset)
            try:
                name = CpError(regs.CP_ERROR.field("CODE").ex(d)).name
            except ValueError:
                name = "CP_ERROR"
            self.dump(0, name)

    def before_reset(self) -> None:
        """A soft reset is about to clear the state: dump it if the CP was still busy."""
        self.observe()  # an error not seen yet (e.g. the reset comes in the same batch)
        cp = self.gpu.cp
        busy = (
            cp.enabled
            and not cp.error
            and (
                cp.waiting is not None
                or cp.bulk is not None
                or bool(cp.ib_stack)
                or cp.head != cp.tail
            )
        )
        if busy:
            self.dump(1, "HANG_RESET")

    def dump(self, reason: int, name: str) -> Path | None:
        text = f"{REASONS[reason]}: {name}"
        if reason == 0:
            text = f"{REASONS[0]}: {describe_error(self.gpu)}"
        try:
            core = capture(self.gpu, reason, text)
            core.symbols = list(self.symbols())
            self._seq += 1
            path = self.directory / f"gemu-{os.getpid()}-{self._seq}-{name}.core"
            _write_private(path, build_core(core))
        except Exception:
            log.exception("writing a core file failed")
            return None
        self.written.append(path)
        log.warning("core dump written: %s (%s)", path, text)
        return path


def _write_private(path: Path, data: bytes) -> None:
    """Write a new file readable by its owner only (CORE_MODE) whatever the umask: a core
    holds guest memory."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, CORE_MODE)
    os.fchmod(fd, CORE_MODE)  # a file left by an earlier process keeps its mode otherwise
    with os.fdopen(fd, "wb") as f:
        f.write(data)


# --- reading -------------------------------------------------------------------------------


@dataclass
class CoreInfo:
    """A core file as :func:`read_core` finds it."""

    signal: int
    registers: list[int]
    state: Any
    mmio: list[int]
    faults: list[Any]
    segments: list[tuple[int, int, int, int]]  # vaddr, paddr, size, flags
    _elf: Any = None

    @property
    def pc(self) -> int:
        return self.registers[32]

    def reason(self) -> str:
        return self.state.text.rstrip(b"\0").decode("utf-8", "replace")


def read_core(path: str | os.PathLike) -> CoreInfo:
    """Parse a gemu core file with pyelftools (ELFFile); ValueError if it is not one."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        try:
            elf = ELFFile(f)
        except ELFError as exc:
            raise ValueError(f"{path}: not an ELF file ({exc})") from None
        if elf["e_type"] != "ET_CORE" or elf["e_machine"] != "EM_AARCH64":
            raise ValueError(f"{path}: not a gemu core file ({elf['e_type']}, {elf['e_machine']})")
        prstatus = state = mmio = None
        faults, segments = [], []
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_NOTE":
                for note in seg.iter_notes():
                    desc = note["n_descdata"]
                    if note["n_name"] == "CORE" and note["n_type"] in ("NT_PRSTATUS", 1):
                        prstatus = PRSTATUS.parse(desc)
                    elif note["n_name"] == "GEMU":
                        n_type = note["n_type"]
                        if n_type == NT_GEMU_STATE:
                            state = GEMU_STATE.parse(desc)
                        elif n_type == NT_GEMU_MMIO:
                            mmio = list(GEMU_MMIO.parse(desc))
                        elif n_type == NT_GEMU_FAULT:
                            faults.append(GEMU_FAULT.parse(desc))
            elif seg["p_type"] == "PT_LOAD":
                segments.append((seg["p_vaddr"], seg["p_paddr"], seg["p_filesz"], seg["p_flags"]))
    if prstatus is None or state is None or mmio is None:
        raise ValueError(f"{path}: a core file without the gemu notes")
    return CoreInfo(prstatus.si_signo, list(prstatus.pr_reg), state, mmio, faults, segments)


def read_segment(path: str | os.PathLike, vaddr: int, size: int) -> bytes | None:
    """``size`` bytes at ``vaddr`` from the first PT_LOAD segment holding them."""
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        for seg in ELFFile(f).iter_segments():
            if seg["p_type"] != "PT_LOAD":
                continue
            lo = seg["p_vaddr"]
            if lo <= vaddr and vaddr + size <= lo + seg["p_filesz"]:
                off = vaddr - lo
                return seg.data()[off : off + size]
    return None


def summarize(path: str | os.PathLike) -> str:
    """A human-readable summary of a gemu core file."""
    from .abi import packets as pk

    info = read_core(path)
    st = info.state
    try:
        state_name = CpState(st.cp_state).name
    except ValueError:
        state_name = str(st.cp_state)
    lines = [
        f"{path}: gemu GPU core",
        f"  why:     {info.reason()}",
        f"  signal:  {info.signal}",
        f"  pc:      {info.pc:#x} ({'IB GPU VA' if st.in_ib else 'ring guest-physical'}), "
        f"CP {state_name}, AS{st.as_index}, {st.packets} packets executed",
        f"  ring:    base {st.ring_base:#x} size {st.ring_size:#x} head {st.ring_head:#x} "
        f"tail {st.ring_tail:#x}; last fence seqno {st.fence_seqno}",
        f"  CP_ERROR {st.cp_error:#x} at {st.error_addr:#x}",
    ]
    for f in info.faults:
        lines.append(
            f"  fault:   AS{f.as_index} FAULTSTATUS {f.faultstatus:#x} at GPU VA "
            f"{f.faultaddress:#x}"
        )
    try:
        symbols = read_symbols(path)
    except ValueError:  # a core written without names
        symbols = []
    name = symbolize(symbols, info.pc)
    where = f" <{name}>" if name else ""
    if symbols:
        lines.append(
            "  symbols: " + ", ".join(f"{b.name} {b.addr:#x}+{b.size:#x}" for b in symbols)
        )
    raw = read_segment(path, info.pc, 4)
    if raw is not None:
        length = int.from_bytes(raw, "little") >> 16
        pkt_bytes = read_segment(path, info.pc, 4 + 4 * length) or raw
        pkt = pk.decode(pkt_bytes, 0, info.pc)
        lines.append(f"  packet:  {info.pc:#x}{where}: {pk.disassemble_one(pkt)}")
    lines.append(f"  segments ({len(info.segments)}):")
    for vaddr, _paddr, size, flags in info.segments:
        kind = "GPU VA" if flags & PF_W else "ring, guest-physical"
        lines.append(f"    {vaddr:#014x}-{vaddr + size:#014x} {size:#x} bytes ({kind})")
    return "\n".join(lines) + "\n"


__all__ = [
    "Core",
    "CoreDumper",
    "CoreInfo",
    "build_core",
    "capture",
    "read_core",
    "summarize",
]
