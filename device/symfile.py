"""DOC: ELF symbol files for command buffers, so gdb names packets by what they belong to.

gdb shows a bare address for every packet (``0x100014 in ?? ()``). A command buffer named by
the job script or the Python API becomes a symbol in a small ELF file (aarch64, the
architecture the stub poses as) that gdb loads with ``symbol-file`` or ``add-symbol-file``;
``x/8i $pc``, ``info symbol $pc`` and the stop line then say ``copy_job+20``::

    buf = CommandBuffer("copy_job", 0x100000, 0x40, labels={"copy_job_fence": 0x28})
    write_symbol_elf("jobs.elf", [buf])
    # (gdb) add-symbol-file jobs.elf
    # (gdb) info symbol $pc          ->  copy_job + 20 in section .gemu.copy_job

Each buffer is an allocated, empty (``SHT_NOBITS``) section at its address holding a
``STT_FUNC`` symbol of its size; a label is an ``STT_FUNC`` symbol inside it reaching to the
next label or the buffer's end (gdb names an address after the closest sized symbol below
it). The file carries no memory: gdb still
reads the packets from the GPU. Formats are construct definitions; tests read the files back
with pyelftools. (gdb shows a name ``a.b`` as ``a[b]``, its notation for compiler clones:
name labels ``a_b``.)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from construct import Const, Int8ul, Int16ul, Int32ul, Int64ul, Struct

EM_AARCH64 = 183
ET_EXEC = 2
SHT_NULL, SHT_PROGBITS, SHT_SYMTAB, SHT_STRTAB, SHT_NOBITS = 0, 1, 2, 3, 8
SHF_ALLOC, SHF_EXECINSTR = 0x2, 0x4
STB_LOCAL, STB_GLOBAL = 0, 1
STT_FUNC, STT_SECTION = 2, 3
MAX_BUFFERS = 4096  # a symbol file names at most this many command buffers
_NAME = re.compile(r"[A-Za-z_.$][A-Za-z0-9_.$]*")

ELF_HEADER = Struct(
    "e_ident" / Const(b"\x7fELF\x02\x01\x01" + bytes(9)),
    "e_type" / Int16ul,
    "e_machine" / Int16ul,
    "e_version" / Int32ul,
    "e_entry" / Int64ul,
    "e_phoff" / Int64ul,
    "e_shoff" / Int64ul,
    "e_flags" / Int32ul,
    "e_ehsize" / Int16ul,
    "e_phentsize" / Int16ul,
    "e_phnum" / Int16ul,
    "e_shentsize" / Int16ul,
    "e_shnum" / Int16ul,
    "e_shstrndx" / Int16ul,
)
SECTION_HEADER = Struct(
    "sh_name" / Int32ul,
    "sh_type" / Int32ul,
    "sh_flags" / Int64ul,
    "sh_addr" / Int64ul,
    "sh_offset" / Int64ul,
    "sh_size" / Int64ul,
    "sh_link" / Int32ul,
    "sh_info" / Int32ul,
    "sh_addralign" / Int64ul,
    "sh_entsize" / Int64ul,
)
SYMBOL = Struct(
    "st_name" / Int32ul,
    "st_info" / Int8ul,
    "st_other" / Int8ul,
    "st_shndx" / Int16ul,
    "st_value" / Int64ul,
    "st_size" / Int64ul,
)


@dataclass(frozen=True)
class CommandBuffer:
    """A named command buffer: ``size`` bytes of packets at ``addr`` (an IB's GPU VA or a ring
    address), with ``labels`` naming packets in it by their byte offset. With ``data`` (the
    packets, ``size`` bytes) the section holds them, so gdb's ``load`` writes them to the GPU
    and moves the CP to the file's entry (the first buffer)."""

    name: str
    addr: int
    size: int
    labels: dict[str, int] = field(default_factory=dict)
    data: bytes | None = None

    def check(self) -> None:
        """Raise ValueError naming what is wrong with the buffer."""
        for name in (self.name, *self.labels):
            if not _NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a symbol name (letters, digits, _ . $)")
        if not 0 <= self.addr < 1 << 64 or not 0 < self.size <= (1 << 64) - self.addr:
            raise ValueError(f"{self.name}: {self.size:#x} bytes at {self.addr:#x} do not fit")
        if self.data is not None and len(self.data) != self.size:
            raise ValueError(f"{self.name}: {len(self.data)} bytes of packets, size {self.size}")
        for label, off in self.labels.items():
            if not 0 <= off < self.size:
                raise ValueError(f"{self.name}: label {label} at +{off:#x} is outside the buffer")


class _Strings:
    def __init__(self) -> None:
        self.data = bytearray(b"\0")

    def add(self, name: str) -> int:
        off = len(self.data)
        self.data += name.encode() + b"\0"
        return off


@dataclass(frozen=True)
class SymbolSections:
    """The sections naming some buffers, laid out from a file offset: ``body`` (symbol and
    string tables) goes there, ``headers`` (``shnum`` section headers) right after it."""

    body: bytes
    headers: bytes
    shnum: int
    shstrndx: int


def symbol_sections(buffers: list[CommandBuffer], offset: int) -> SymbolSections:
    """The sections of a symbol file (or of a core file's symbols) whose data starts at file
    offset ``offset`` (a multiple of 8). Raises ValueError naming a bad buffer."""
    if len(buffers) > MAX_BUFFERS:
        raise ValueError(f"{len(buffers)} command buffers: a symbol file names {MAX_BUFFERS}")
    names = [b.name for b in buffers]
    if len(set(names)) != len(names):
        raise ValueError("two command buffers have the same name")
    for b in buffers:
        b.check()
    shstr, strtab = _Strings(), _Strings()
    sections = [dict(sh_name=0, sh_type=SHT_NULL, sh_flags=0, sh_addr=0, sh_size=0)]
    symbols = [dict(st_name=0, st_info=0, st_other=0, st_shndx=0, st_value=0, st_size=0)]
    for b in buffers:
        shndx = len(sections)
        sections.append(
            dict(
                sh_name=shstr.add(f".gemu.{b.name}"),
                sh_type=SHT_NOBITS if b.data is None else SHT_PROGBITS,
                sh_flags=SHF_ALLOC | SHF_EXECINSTR,
                sh_addr=b.addr,
                sh_size=b.size,
            )
        )
        symbols.append(
            dict(
                st_name=strtab.add(b.name),
                st_info=(STB_GLOBAL << 4) | STT_FUNC,
                st_other=0,
                st_shndx=shndx,
                st_value=b.addr,
                st_size=b.size,
            )
        )
        labels = sorted(b.labels.items(), key=lambda kv: kv[1])
        ends = [off for _, off in labels[1:]] + [b.size] if labels else []
        for (label, off), end in zip(labels, ends, strict=True):
            symbols.append(
                dict(
                    st_name=strtab.add(label),
                    st_info=(STB_GLOBAL << 4) | STT_FUNC,
                    st_other=0,
                    st_shndx=shndx,
                    st_value=b.addr + off,
                    st_size=end - off,  # sized: gdb prefers a sized symbol covering pc
                )
            )
    symtab = b"".join(SYMBOL.build(s) for s in symbols)
    symtab_index = len(sections)
    sections.append(dict(sh_name=shstr.add(".symtab"), sh_type=SHT_SYMTAB, sh_flags=0, sh_addr=0))
    sections.append(dict(sh_name=shstr.add(".strtab"), sh_type=SHT_STRTAB, sh_flags=0, sh_addr=0))
    sections.append(dict(sh_name=shstr.add(".shstrtab"), sh_type=SHT_STRTAB, sh_flags=0, sh_addr=0))
    blobs = {i + 1: b.data for i, b in enumerate(buffers) if b.data is not None}
    blobs[symtab_index] = symtab
    blobs[symtab_index + 1] = bytes(strtab.data)
    blobs[symtab_index + 2] = bytes(shstr.data)
    body = bytearray()
    for index, blob in blobs.items():
        body += bytes(-(offset + len(body)) % 8)
        sections[index].update(sh_offset=offset + len(body), sh_size=len(blob))
        body += blob
    body += bytes(-(offset + len(body)) % 8)
    headers = []
    for i, sec in enumerate(sections):
        headers.append(
            SECTION_HEADER.build(
                dict(
                    sh_name=sec["sh_name"],
                    sh_type=sec["sh_type"],
                    sh_flags=sec["sh_flags"],
                    sh_addr=sec["sh_addr"],
                    sh_offset=sec.get("sh_offset", 0),
                    sh_size=sec.get("sh_size", 0),
                    sh_link=symtab_index + 1 if i == symtab_index else 0,
                    sh_info=1 if i == symtab_index else 0,  # first global symbol
                    sh_addralign=8 if i == symtab_index else (4 if sec["sh_type"] else 0),
                    sh_entsize=SYMBOL.sizeof() if i == symtab_index else 0,
                )
            )
        )
    return SymbolSections(bytes(body), b"".join(headers), len(sections), symtab_index + 2)


def build_symbol_elf(buffers: list[CommandBuffer]) -> bytes:
    """The ELF symbol file naming ``buffers`` (see the module documentation)."""
    offset = ELF_HEADER.sizeof()
    secs = symbol_sections(buffers, offset)
    header = ELF_HEADER.build(
        dict(
            e_type=ET_EXEC,
            e_machine=EM_AARCH64,
            e_version=1,
            e_entry=buffers[0].addr if buffers else 0,
            e_phoff=0,
            e_shoff=offset + len(secs.body),
            e_flags=0,
            e_ehsize=ELF_HEADER.sizeof(),
            e_phentsize=0,
            e_phnum=0,
            e_shentsize=SECTION_HEADER.sizeof(),
            e_shnum=secs.shnum,
            e_shstrndx=secs.shstrndx,
        )
    )
    return header + secs.body + secs.headers


def read_symbols(path: str | os.PathLike) -> list[CommandBuffer]:
    """The command buffers a symbol file (or a core file) names, read with pyelftools:
    ``.gemu.NAME`` sections with their symbols. Raises ValueError for a file that is no ELF
    or names nothing."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            symtab = elf.get_section_by_name(".symtab")
            if symtab is None:
                raise ValueError(f"{path}: no symbol table")
            by_section: dict[int, CommandBuffer] = {}
            labels: dict[int, dict[str, int]] = {}
            for sym in symtab.iter_symbols():
                shndx = sym["st_shndx"]
                if not sym.name or not isinstance(shndx, int):
                    continue
                sec = elf.get_section(shndx)
                if not sec.name.startswith(".gemu."):
                    continue
                if sym.name == sec.name[len(".gemu.") :]:
                    by_section[shndx] = CommandBuffer(sym.name, sym["st_value"], sym["st_size"])
                else:
                    labels.setdefault(shndx, {})[sym.name] = sym["st_value"] - sec["sh_addr"]
    except (ELFError, OSError) as exc:
        raise ValueError(f"{path}: not a symbol file: {exc}") from None
    if not by_section:
        raise ValueError(f"{path}: names no command buffer")
    return [CommandBuffer(b.name, b.addr, b.size, labels.get(i, {})) for i, b in by_section.items()]


def symbolize(buffers: list[CommandBuffer], addr: int) -> str | None:
    """``NAME+0xOFF`` for ``addr`` (the closest label, else the buffer), None if unnamed."""
    for b in buffers:
        if b.addr <= addr < b.addr + b.size:
            best, where = b.name, b.addr
            for label, off in b.labels.items():
                if where < b.addr + off <= addr:
                    best, where = label, b.addr + off
            return best if addr == where else f"{best}+{addr - where:#x}"
    return None


def write_symbol_elf(path: str | os.PathLike, buffers: list[CommandBuffer]) -> Path:
    """Write the symbol file for ``buffers`` to ``path``; returns the path."""
    path = Path(path)
    path.write_bytes(build_symbol_elf(buffers))
    return path


__all__ = [
    "ELF_HEADER",
    "CommandBuffer",
    "SymbolSections",
    "build_symbol_elf",
    "read_symbols",
    "symbol_sections",
    "symbolize",
    "write_symbol_elf",
]
