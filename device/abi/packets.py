"""DOC: command-stream packets.

The command processor (CP) reads packets from the ring (guest-physical memory) and from
indirect buffers (GPU virtual memory of the current AS). A packet is a 32-bit little-endian
header followed by ``LENGTH`` 32-bit body dwords::

    header bits  7:0   OPCODE  (Opcode)
    header bits 15:8   FLAGS   (PacketFlags)
    header bits 31:16  LENGTH  (body dwords)

so a packet takes ``4 * (1 + LENGTH)`` bytes. 64-bit values are split LO then HI. Addresses
are GPU virtual addresses in the AS chosen by SET_AS, unless the PHYS flag makes them
guest-physical; PHYS, SET_AS and TLB_INVALIDATE are privileged (ring only). Building a job::

    from gemu.device.abi import packets as pk
    ib = pk.fill(dst=0x10000, size=4096, value=0xA5A5A5A5) + pk.crc32(0x10000, 4096, 0x20000)
    ring = pk.set_as(1) + pk.indirect_buffer(0x40000, len(ib) // 4) + pk.fence(0x1000, 7, irq=True)

Each body is declared once below (:data:`BODIES`) with construct; :data:`SPECS` adds the length
rule, the flags each opcode accepts and whether it is privileged. The device's hot path uses
``struct`` formats derived from the same declarations (:attr:`PacketSpec.fast`).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

from .enums import Opcode, PacketFlags, WaitFunc

if TYPE_CHECKING:
    from construct import Container, Struct

HEADER_FAST = struct.Struct("<BBH")
MAX_LENGTH = 0xFFFF
NO_FLAGS = PacketFlags(0)


@functools.cache
def _construct_formats() -> dict:
    """``HEADER`` and ``BODIES``, the construct declarations of the packet formats (docs,
    decoding, property tests). Built on first use by :func:`__getattr__`: importing
    construct costs more than the rest of the ABI, and the CP and the builders use the equal
    struct codecs of :data:`FIXED_FIELDS`."""
    from construct import Enum, FlagsEnum, GreedyRange, Int8ul, Int16ul, Int32ul, Struct

    def _u64(name: str) -> tuple:
        return (name + "_lo") / Int32ul, (name + "_hi") / Int32ul

    header = Struct(
        "opcode" / Enum(Int8ul, Opcode),
        "flags" / FlagsEnum(Int8ul, PacketFlags),
        "length" / Int16ul,
    )
    bodies: dict[Opcode, Struct] = {
        Opcode.NOP: Struct("payload" / GreedyRange(Int32ul)),
        Opcode.SET_AS: Struct("as_index" / Int32ul),
        Opcode.WRITE_DATA: Struct(*_u64("addr"), "data" / GreedyRange(Int32ul)),
        Opcode.COPY: Struct(*_u64("src"), *_u64("dst"), "size" / Int32ul),
        Opcode.FILL: Struct(*_u64("dst"), "size" / Int32ul, "value" / Int32ul),
        Opcode.CRC32: Struct(*_u64("src"), "size" / Int32ul, *_u64("dst")),
        Opcode.ATOMIC: Struct(*_u64("addr"), *_u64("value")),
        Opcode.FENCE: Struct(*_u64("addr"), *_u64("seqno")),
        Opcode.WAIT_MEM: Struct(
            *_u64("addr"),
            "reference" / Int32ul,
            "mask" / Int32ul,
            "function" / Enum(Int32ul, WaitFunc),
            "timeout_us" / Int32ul,
        ),
        Opcode.INDIRECT_BUFFER: Struct(*_u64("addr"), "size_dw" / Int32ul),
        Opcode.TLB_INVALIDATE: Struct("as_index" / Int32ul, *_u64("va"), *_u64("size")),
    }
    assert header.sizeof() == HEADER_FAST.size
    return {"HEADER": header, "BODIES": bodies}


def __getattr__(name: str):
    """``HEADER`` and ``BODIES``, built on first access."""
    if name not in ("HEADER", "BODIES"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    formats = _construct_formats()
    globals().update(formats)
    return formats[name]


FIXED_FIELDS: dict[Opcode, tuple[str, ...]] = {
    Opcode.SET_AS: ("as_index",),
    Opcode.COPY: ("src_lo", "src_hi", "dst_lo", "dst_hi", "size"),
    Opcode.FILL: ("dst_lo", "dst_hi", "size", "value"),
    Opcode.CRC32: ("src_lo", "src_hi", "size", "dst_lo", "dst_hi"),
    Opcode.ATOMIC: ("addr_lo", "addr_hi", "value_lo", "value_hi"),
    Opcode.FENCE: ("addr_lo", "addr_hi", "seqno_lo", "seqno_hi"),
    Opcode.WAIT_MEM: ("addr_lo", "addr_hi", "reference", "mask", "function", "timeout_us"),
    Opcode.INDIRECT_BUFFER: ("addr_lo", "addr_hi", "size_dw"),
    Opcode.TLB_INVALIDATE: ("as_index", "va_lo", "va_hi", "size_lo", "size_hi"),
}
"""The fields of each fixed-size body in order, every one a little-endian u32: the same
bodies as :data:`BODIES` (a test derives this table from them and compares)."""

_FAST = {op: struct.Struct("<" + "I" * len(names)) for op, names in FIXED_FIELDS.items()}


class PacketSpec(NamedTuple):
    """What the CP accepts for one opcode."""

    opcode: Opcode
    min_length: int
    max_length: int
    flags: PacketFlags
    privileged: bool
    doc: str

    @property
    def fixed(self) -> bool:
        return self.min_length == self.max_length

    @property
    def fast(self) -> struct.Struct | None:
        """``struct`` format of a fixed-size body (:data:`FIXED_FIELDS`)."""
        return _FAST.get(self.opcode)


_ADDR_FLAGS = PacketFlags.PHYS
SPECS: dict[Opcode, PacketSpec] = {
    s.opcode: s
    for s in (
        PacketSpec(Opcode.NOP, 0, MAX_LENGTH, PacketFlags(0), False, "Do nothing; skip the body."),
        PacketSpec(
            Opcode.SET_AS,
            1,
            1,
            PacketFlags(0),
            True,
            "Select the address space for the following GPU VA accesses.",
        ),
        PacketSpec(
            Opcode.WRITE_DATA,
            3,
            MAX_LENGTH,
            _ADDR_FLAGS,
            False,
            "Write the body's data dwords at ADDR (4-byte aligned).",
        ),
        PacketSpec(
            Opcode.COPY, 5, 5, _ADDR_FLAGS, False, "Copy SIZE bytes from SRC to DST (no overlap)."
        ),
        PacketSpec(
            Opcode.FILL,
            4,
            4,
            _ADDR_FLAGS,
            False,
            "Fill SIZE bytes at DST with the little-endian 32-bit VALUE repeated.",
        ),
        PacketSpec(
            Opcode.CRC32,
            5,
            5,
            _ADDR_FLAGS,
            False,
            "Write the CRC-32 (zlib) of SIZE bytes at SRC as a 32-bit value at DST (4-aligned).",
        ),
        PacketSpec(
            Opcode.ATOMIC,
            4,
            4,
            _ADDR_FLAGS,
            False,
            "Add VALUE to the 64-bit value at ADDR (8-byte aligned), wrapping at 2**64.",
        ),
        PacketSpec(
            Opcode.FENCE,
            4,
            4,
            _ADDR_FLAGS | PacketFlags.IRQ,
            False,
            "Write the 64-bit SEQNO at ADDR (8-aligned), latch FENCE_SEQNO, raise Irq.FENCE if IRQ.",
        ),
        PacketSpec(
            Opcode.WAIT_MEM,
            6,
            6,
            _ADDR_FLAGS,
            False,
            "Wait until (u32 at ADDR & MASK) FUNCTION REFERENCE; TIMEOUT_US 0 waits forever, "
            "otherwise the CP stops with WAIT_TIMEOUT.",
        ),
        PacketSpec(
            Opcode.INDIRECT_BUFFER,
            3,
            3,
            PacketFlags(0),
            False,
            "Execute SIZE_DW dwords of packets at GPU VA ADDR (needs EXEC permission); may nest.",
        ),
        PacketSpec(
            Opcode.TLB_INVALIDATE,
            5,
            5,
            PacketFlags(0),
            True,
            "Drop cached translations of AS_INDEX in [VA, VA+SIZE); SIZE 0 drops all.",
        ),
    )
}


# --- builders ----------------------------------------------------------------------------


def header(opcode: Opcode, length: int, flags: PacketFlags = NO_FLAGS) -> bytes:
    if not 0 <= length <= MAX_LENGTH:
        raise ValueError(f"packet length must be 0..{MAX_LENGTH} dwords, not {length!r}")
    return HEADER_FAST.pack(int(opcode), int(flags), length)


def _lohi(v: int) -> tuple[int, int]:
    if not 0 <= v < (1 << 64):
        raise ValueError(f"value must fit in 64 bits, not {v!r}")
    return v & 0xFFFFFFFF, v >> 32


def build(opcode: Opcode, flags: PacketFlags = NO_FLAGS, **fields) -> bytes:
    """Build any packet from its body fields (64-bit fields may be passed whole: ``addr=``).

    Raises:
        TypeError: a field of the body is missing.
        ValueError: a value does not fit its field.
    """
    names = FIXED_FIELDS.get(opcode)
    if names is None:  # NOP and WRITE_DATA: a run of dwords after the fixed part
        return _build_variable(opcode, flags, fields)
    values = []
    for name in names:
        if name in fields:
            values.append(fields[name])
        elif name.endswith("_lo") and name[:-3] in fields:
            values += _lohi(fields[name[:-3]])
        elif name.endswith("_hi") and name[:-3] in fields:
            continue
        else:
            raise TypeError(f"{opcode.name} needs field {name!r}")
    try:
        body = _FAST[opcode].pack(*values)
    except struct.error as exc:
        raise ValueError(f"{opcode.name}: a field does not fit in 32 bits: {exc}") from None
    return header(opcode, len(names), flags) + body


def _build_variable(opcode: Opcode, flags: PacketFlags, fields: dict) -> bytes:
    words = []
    if opcode is Opcode.WRITE_DATA:
        if "addr" in fields:
            words += _lohi(fields["addr"])
        elif "addr_lo" in fields and "addr_hi" in fields:
            words += (fields["addr_lo"], fields["addr_hi"])
        else:
            raise TypeError("WRITE_DATA needs field 'addr_lo'")
        words += fields.get("data", [])
    else:
        words += fields.get("payload", [])
    try:
        body = struct.pack(f"<{len(words)}I", *words)
    except struct.error as exc:
        raise ValueError(f"{opcode.name}: a dword does not fit in 32 bits: {exc}") from None
    return header(opcode, len(words), flags) + body


def nop(length: int = 0) -> bytes:
    return header(Opcode.NOP, length) + b"\0" * (4 * length)


def set_as(as_index: int) -> bytes:
    return build(Opcode.SET_AS, as_index=as_index)


def _addr_flags(phys: bool) -> PacketFlags:
    return PacketFlags.PHYS if phys else PacketFlags(0)


def write_data(addr: int, data: list[int] | bytes, *, phys: bool = False) -> bytes:
    if isinstance(data, bytes | bytearray):
        if len(data) % 4:
            raise ValueError("WRITE_DATA data must be whole dwords")
        data = list(struct.unpack(f"<{len(data) // 4}I", data))
    return build(Opcode.WRITE_DATA, _addr_flags(phys), addr=addr, data=list(data))


def copy(src: int, dst: int, size: int, *, phys: bool = False) -> bytes:
    return build(Opcode.COPY, _addr_flags(phys), src=src, dst=dst, size=size)


def fill(dst: int, size: int, value: int, *, phys: bool = False) -> bytes:
    return build(Opcode.FILL, _addr_flags(phys), dst=dst, size=size, value=value)


def crc32(src: int, size: int, dst: int, *, phys: bool = False) -> bytes:
    return build(Opcode.CRC32, _addr_flags(phys), src=src, size=size, dst=dst)


def atomic_add(addr: int, value: int, *, phys: bool = False) -> bytes:
    return build(Opcode.ATOMIC, _addr_flags(phys), addr=addr, value=value & ((1 << 64) - 1))


def fence(addr: int, seqno: int, *, irq: bool = False, phys: bool = False) -> bytes:
    flags = _addr_flags(phys) | (PacketFlags.IRQ if irq else PacketFlags(0))
    return build(Opcode.FENCE, flags, addr=addr, seqno=seqno)


def wait_mem(
    addr: int,
    reference: int,
    *,
    mask: int = 0xFFFFFFFF,
    function: WaitFunc = WaitFunc.EQ,
    timeout_us: int = 0,
    phys: bool = False,
) -> bytes:
    return build(
        Opcode.WAIT_MEM,
        _addr_flags(phys),
        addr=addr,
        reference=reference,
        mask=mask,
        function=function,
        timeout_us=timeout_us,
    )


def indirect_buffer(addr: int, size_dw: int) -> bytes:
    return build(Opcode.INDIRECT_BUFFER, addr=addr, size_dw=size_dw)


def tlb_invalidate(as_index: int, va: int = 0, size: int = 0) -> bytes:
    return build(Opcode.TLB_INVALIDATE, as_index=as_index, va=va, size=size)


# --- decoding ----------------------------------------------------------------------------


class Packet(NamedTuple):
    """A decoded packet (for disassembly, dumps and tests; the CP decodes on its own)."""

    address: int
    opcode: int
    flags: int
    length: int
    body: Container | None
    error: str = ""

    @property
    def size(self) -> int:
        return 4 * (1 + self.length)

    def __str__(self) -> str:
        return disassemble_one(self)


def decode(buf: bytes, offset: int = 0, address: int | None = None) -> Packet:
    """Decode the packet at ``buf[offset:]``; problems are reported in ``Packet.error``."""
    addr = offset if address is None else address
    if len(buf) - offset < 4:
        return Packet(addr, -1, 0, 0, None, "truncated header")
    opcode, flags, length = HEADER_FAST.unpack_from(buf, offset)
    try:
        op = Opcode(opcode)
    except ValueError:
        return Packet(addr, opcode, flags, length, None, f"unknown opcode {opcode:#04x}")
    spec = SPECS[op]
    end = offset + 4 + 4 * length
    if end > len(buf):
        return Packet(addr, opcode, flags, length, None, "body runs past the end of the buffer")
    if not spec.min_length <= length <= spec.max_length:
        return Packet(addr, opcode, flags, length, None, f"bad length {length} for {op.name}")
    if flags & ~int(spec.flags):
        return Packet(addr, opcode, flags, length, None, f"bad flags {flags:#x} for {op.name}")
    body = _construct_formats()["BODIES"][op].parse(bytes(buf[offset + 4 : end]))
    return Packet(addr, opcode, flags, length, body)


def iter_packets(buf: bytes, base: int = 0) -> Iterator[Packet]:
    """Decode consecutive packets until the buffer ends or a packet cannot be sized."""
    offset = 0
    while offset + 4 <= len(buf):
        pkt = decode(buf, offset, base + offset)
        yield pkt
        if pkt.error and pkt.error.startswith(("truncated", "body runs")):
            return
        offset += pkt.size


def _join(body: Container, name: str) -> int:
    return body[name + "_lo"] | (body[name + "_hi"] << 32)


def disassemble_one(pkt: Packet) -> str:
    """One line of assembly-like text, e.g. ``FENCE.irq 0x1000, seqno=7``."""
    if pkt.opcode < 0:
        return f"(bad) {pkt.error}"
    try:
        name = Opcode(pkt.opcode).name
    except ValueError:
        return f".word {pkt.opcode | (pkt.flags << 8) | (pkt.length << 16):#010x}  ; {pkt.error}"
    fl = "".join("." + f.name.lower() for f in PacketFlags if pkt.flags & f)
    if pkt.body is None:
        return f"{name}{fl} len={pkt.length}  ; {pkt.error}"
    b = pkt.body
    op = Opcode(pkt.opcode)
    if op is Opcode.NOP:
        args = f"{pkt.length} dwords" if pkt.length else ""
    elif op is Opcode.SET_AS:
        args = f"as={b.as_index}"
    elif op is Opcode.WRITE_DATA:
        words = ", ".join(f"{w:#x}" for w in b.data[:4]) + (", ..." if len(b.data) > 4 else "")
        args = f"{_join(b, 'addr'):#x}, [{words}]"
    elif op is Opcode.COPY:
        args = f"{_join(b, 'src'):#x} -> {_join(b, 'dst'):#x}, size={b.size:#x}"
    elif op is Opcode.FILL:
        args = f"{_join(b, 'dst'):#x}, size={b.size:#x}, value={b.value:#x}"
    elif op is Opcode.CRC32:
        args = f"{_join(b, 'src'):#x}, size={b.size:#x} -> {_join(b, 'dst'):#x}"
    elif op is Opcode.ATOMIC:
        args = f"{_join(b, 'addr'):#x} += {_join(b, 'value'):#x}"
    elif op is Opcode.FENCE:
        args = f"{_join(b, 'addr'):#x}, seqno={_join(b, 'seqno')}"
    elif op is Opcode.WAIT_MEM:
        args = (
            f"{_join(b, 'addr'):#x} & {b.mask:#x} {b.function} {b.reference:#x}, "
            f"timeout={b.timeout_us}us"
        )
    elif op is Opcode.INDIRECT_BUFFER:
        args = f"{_join(b, 'addr'):#x}, {b.size_dw} dwords"
    else:  # TLB_INVALIDATE
        args = f"as={b.as_index}, {_join(b, 'va'):#x}+{_join(b, 'size'):#x}"
    return f"{name}{fl} {args}".rstrip()


def disassemble(buf: bytes, base: int = 0) -> list[str]:
    """``ADDR: TEXT`` lines for every packet in ``buf``."""
    return [f"{p.address:#014x}: {disassemble_one(p)}" for p in iter_packets(buf, base)]


__all__ = [
    "BODIES",  # noqa: F822 (module __getattr__)
    "HEADER",  # noqa: F822
    "SPECS",
    "Packet",
    "PacketSpec",
    "decode",
    "disassemble",
]
