"""DOC: the device wire protocol.

The machine (client) and the device model (server) exchange messages over one byte stream: a
UNIX socket, a loopback TCP connection or a serial line. Every message is a 16-byte
little-endian header followed by a payload::

    offset  size  field
    0       2     msg_id    chosen by the sender of a request, echoed in its reply
    2       2     command   Command
    4       4     size      whole message, header included
    8       4     flags     MsgFlags: REPLY, NO_REPLY (posted request), ERROR
    12      4     error     errno of a failed request (replies with ERROR set)

Requests go both ways: the client reads and writes registers, attaches guest memory, resets
and steps the device; the device sends IRQ notifications (always posted) and, when guest
memory could not be shared by file descriptor, DMA_READ/DMA_WRITE requests that the client
answers. A reply carries the request's msg_id and command. An error reply is a bare header
with ERROR set and ``error`` = an errno (:class:`ProtoError`); it may carry a UTF-8 text
payload that says what was wrong. Posted requests (NO_REPLY) get a reply only on error.

Encoding a register read::

    from gemu.device.abi import protocol as p
    frame = p.encode(p.Command.REG_READ, msg_id=1, payload=p.REG_READ_REQ.build(
        dict(offset=0x0, count=1)))

The construct formats below (``HEADER``, ``VERSION_REQ``...) are the definition of every
payload; both ends encode and decode with the equal struct codecs of :data:`CODECS` (a test
compares each with its construct format), so neither process imports construct to talk.
Limits:
``MAX_MESSAGE`` bytes per message (larger frames lose the framing: the receiver replies with
EMSGSIZE and closes; an error reply is never answered, not even then), ``MAX_REG_COUNT``
registers per batched read, ``MAX_DMA`` bytes per DMA or debug memory message.
"""

from __future__ import annotations

import errno
import functools
import struct
from collections.abc import Mapping
from enum import IntEnum, IntFlag
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from construct import Struct

PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 1
HEADER_SIZE = 16
MAX_DMA = 1 << 20
MAX_MESSAGE = HEADER_SIZE + 64 + MAX_DMA
MAX_REG_COUNT = 1024
SPACE_PHYS = 0xFFFFFFFF  # MEM_READ/MEM_WRITE space: guest-physical instead of an AS index


class Command(IntEnum):
    VERSION = 1
    REG_READ = 2
    REG_WRITE = 3
    IRQ = 4
    MEM_MAP = 5
    MEM_UNMAP = 6
    DMA_READ = 7
    DMA_WRITE = 8
    RESET = 9
    STEP = 10
    CLOCK_MODE = 11
    DEBUG_READ = 12
    MEM_READ = 13
    MEM_WRITE = 14
    STATS = 15
    RUN_STATE = 16


class MsgFlags(IntFlag):
    REPLY = 1 << 0
    NO_REPLY = 1 << 4
    ERROR = 1 << 5


class ProtoError(IntEnum):
    """errno values carried in error replies."""

    EPROTO = errno.EPROTO  # out of order (before or a second VERSION), or a stray reply
    EINVAL = errno.EINVAL  # bad argument (unaligned offset, count 0, unknown mode...)
    EMSGSIZE = errno.EMSGSIZE  # frame larger than MAX_MESSAGE: framing is lost, connection closed
    ENOSYS = errno.ENOSYS  # unknown command
    EFAULT = errno.EFAULT  # memory access outside guest memory, or an MMU fault on a debug read
    ENODEV = errno.ENODEV  # no guest memory attached
    EBADMSG = errno.EBADMSG  # payload size does not match the command
    EBUSY = errno.EBUSY  # the device cannot do that now (e.g. MEM_MAP while mapped)
    EIO = errno.EIO  # the client failed (or left unanswered) a DMA request the access needed


class ClockMode(IntEnum):
    FREE = 0  # the CP runs on its own thread as soon as the doorbell rings
    STEPPED = 1  # the CP and the device clock advance only on STEP requests


class RunRequest(IntEnum):
    QUERY = 0  # only report the run state
    STOP = 1  # the machine's stop (QMP stop): the CP holds before its next packet
    CONT = 2  # the machine's cont: release that hold (a debugger's own hold stays)
    POWEROFF = 3  # the machine powers off: every hold ends, the machine's and a debugger's


class MemMapFlags(IntFlag):
    FD = 1 << 0  # a file descriptor came with the message (SCM_RIGHTS); the device maps it
    IN_BAND = 1 << 1  # no descriptor: the device reaches memory with DMA_READ/DMA_WRITE


class Features(IntFlag):
    """Capabilities exchanged in VERSION: the client announces what it can do, the device
    replies with what it offers, and the connection uses the bits both set. The comments
    are the meaning column of docs/protocol.md (a test compares them)."""

    FD_PASSING = 1 << 0  # descriptors pass with SCM_RIGHTS; the device offers it on UNIX sockets
    IN_BAND_DMA = 1 << 1  # the client serves DMA_READ/DMA_WRITE; MEM_MAP IN_BAND needs it
    STEPPED_CLOCK = 1 << 2  # CLOCK_MODE STEPPED and STEP are available (always offered)
    DEBUG = 1 << 3  # DEBUG_READ, MEM_READ and MEM_WRITE are available (always offered)


HEADER_FAST = struct.Struct("<HHIII")
assert HEADER_FAST.size == HEADER_SIZE


@functools.cache
def _construct_formats() -> dict:
    """The construct declarations of the header and of every payload: the definition of the
    wire format (docs, property tests, tools). Built on first use (importing construct costs
    more than the rest of the protocol), by :func:`__getattr__`; the device and the machine
    encode and decode with the equal struct codecs of :data:`CODECS`."""
    from construct import Bytes, Const, GreedyBytes, Int16ul, Int32ul, Int64ul, Struct, this

    HEADER = Struct(
        "msg_id" / Int16ul,
        "command" / Int16ul,
        "size" / Int32ul,
        "flags" / Int32ul,
        "error" / Int32ul,
    )

    VERSION_REQ = Struct(
        "major" / Int16ul, "minor" / Int16ul, "features" / Int32ul, "name" / GreedyBytes
    )
    VERSION_REPLY = Struct(
        "major" / Int16ul,
        "minor" / Int16ul,
        "features" / Int32ul,
        "gpu_id" / Int32ul,
        "max_message" / Int32ul,
        "name" / GreedyBytes,
    )
    REG_READ_REQ = Struct("offset" / Int32ul, "count" / Int32ul)
    REG_READ_REPLY = Struct("offset" / Int32ul, "count" / Int32ul, "values" / Bytes(this.count * 4))
    REG_WRITE_REQ = Struct("offset" / Int32ul, "value" / Int32ul)
    IRQ_MSG = Struct(
        "level" / Int32ul, "irq_status" / Int32ul, "mmu_int_stat" / Int32ul, "sequence" / Int32ul
    )
    MEM_MAP_REQ = Struct(
        "base" / Int64ul, "size" / Int64ul, "flags" / Int32ul, "reserved" / Const(0, Int32ul)
    )
    DMA_READ_REQ = Struct("addr" / Int64ul, "size" / Int32ul)
    DMA_READ_REPLY = Struct("addr" / Int64ul, "size" / Int32ul, "data" / Bytes(this.size))
    DMA_WRITE_REQ = Struct("addr" / Int64ul, "size" / Int32ul, "data" / Bytes(this.size))
    DMA_WRITE_REPLY = Struct("addr" / Int64ul, "size" / Int32ul)
    STEP_REQ = Struct("max_packets" / Int32ul, "reserved" / Const(0, Int32ul), "ticks_ns" / Int64ul)
    STEP_REPLY = Struct(
        "executed" / Int32ul, "cp_state" / Int32ul, "clock_ns" / Int64ul, "irq_level" / Int32ul
    )
    CLOCK_MODE_REQ = Struct("mode" / Int32ul)
    MEM_READ_REQ = Struct("space" / Int32ul, "size" / Int32ul, "addr" / Int64ul)
    MEM_READ_REPLY = Struct("addr" / Int64ul, "size" / Int32ul, "data" / Bytes(this.size))
    MEM_WRITE_REQ = Struct(
        "space" / Int32ul, "size" / Int32ul, "addr" / Int64ul, "data" / Bytes(this.size)
    )
    STATS_REPLY = Struct("json" / GreedyBytes)
    RUN_STATE_REQ = Struct("run" / Int32ul)
    RUN_STATE_REPLY = Struct("paused" / Int32ul, "halted" / Int32ul)

    # Payload of each request and of its successful reply. None: empty payload.
    REQUESTS = {
        Command.VERSION: (VERSION_REQ, VERSION_REPLY),
        Command.REG_READ: (REG_READ_REQ, REG_READ_REPLY),
        Command.REG_WRITE: (REG_WRITE_REQ, None),
        Command.IRQ: (IRQ_MSG, None),
        Command.MEM_MAP: (MEM_MAP_REQ, None),
        Command.MEM_UNMAP: (None, None),
        Command.DMA_READ: (DMA_READ_REQ, DMA_READ_REPLY),
        Command.DMA_WRITE: (DMA_WRITE_REQ, DMA_WRITE_REPLY),
        Command.RESET: (None, None),
        Command.STEP: (STEP_REQ, STEP_REPLY),
        Command.CLOCK_MODE: (CLOCK_MODE_REQ, None),
        Command.DEBUG_READ: (REG_READ_REQ, REG_READ_REPLY),
        Command.MEM_READ: (MEM_READ_REQ, MEM_READ_REPLY),
        Command.MEM_WRITE: (MEM_WRITE_REQ, None),
        Command.STATS: (None, STATS_REPLY),
        Command.RUN_STATE: (RUN_STATE_REQ, RUN_STATE_REPLY),
    }
    formats = {k: v for k, v in locals().items() if k.isupper()}
    assert HEADER.sizeof() == HEADER_SIZE
    return formats


_CONSTRUCT_NAMES = frozenset(
    (
        "HEADER",
        "VERSION_REQ",
        "VERSION_REPLY",
        "REG_READ_REQ",
        "REG_READ_REPLY",
        "REG_WRITE_REQ",
        "IRQ_MSG",
        "MEM_MAP_REQ",
        "DMA_READ_REQ",
        "DMA_READ_REPLY",
        "DMA_WRITE_REQ",
        "DMA_WRITE_REPLY",
        "STEP_REQ",
        "STEP_REPLY",
        "CLOCK_MODE_REQ",
        "MEM_READ_REQ",
        "MEM_READ_REPLY",
        "MEM_WRITE_REQ",
        "STATS_REPLY",
        "RUN_STATE_REQ",
        "RUN_STATE_REPLY",
        "REQUESTS",
    )
)


def __getattr__(name: str):
    """The construct formats (HEADER, VERSION_REQ, ..., REQUESTS), built on first access."""
    if name not in _CONSTRUCT_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    formats = _construct_formats()
    globals().update(formats)
    return formats[name]


class Header(NamedTuple):
    msg_id: int
    command: int
    size: int
    flags: int
    error: int

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & MsgFlags.REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & MsgFlags.ERROR)

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & MsgFlags.NO_REPLY)

    @property
    def payload_size(self) -> int:
        return self.size - HEADER_SIZE

    def describe(self) -> str:
        try:
            cmd = Command(self.command).name
        except ValueError:
            cmd = f"command {self.command}"
        kind = "reply" if self.is_reply else "request"
        return f"{cmd} {kind} id={self.msg_id} size={self.size}"


class FrameError(Exception):
    """A received frame is malformed. ``fatal`` means the byte stream lost its framing."""

    def __init__(self, code: ProtoError, msg: str, *, fatal: bool = False) -> None:
        super().__init__(msg)
        self.code = code
        self.fatal = fatal


def encode(
    command: Command | int,
    msg_id: int,
    payload: bytes = b"",
    *,
    flags: MsgFlags | int = 0,
    error: int = 0,
) -> bytes:
    """One whole frame: header + payload."""
    size = HEADER_SIZE + len(payload)
    if size > MAX_MESSAGE:
        raise ValueError(f"message of {size} bytes exceeds MAX_MESSAGE ({MAX_MESSAGE})")
    return HEADER_FAST.pack(msg_id & 0xFFFF, int(command), size, int(flags), error) + payload


def decode_header(raw: bytes | memoryview) -> Header:
    """Parse and sanity-check a header; raise FrameError(fatal=True) if framing is lost."""
    msg_id, command, size, flags, error = HEADER_FAST.unpack_from(raw)
    if size < HEADER_SIZE:
        raise FrameError(
            ProtoError.EMSGSIZE, f"frame size {size} is smaller than the header", fatal=True
        )
    if size > MAX_MESSAGE:
        raise FrameError(
            ProtoError.EMSGSIZE,
            f"frame size {size} exceeds the maximum of {MAX_MESSAGE} bytes",
            fatal=True,
        )
    return Header(msg_id, command, size, flags, error)


def error_frame(request: Header, code: ProtoError | int, text: str = "") -> bytes:
    """The error reply to ``request``, carrying ``text`` to say what was wrong."""
    data = text.encode("utf-8", "replace")[:512]
    return encode(
        request.command & 0xFFFF,
        request.msg_id,
        data,
        flags=MsgFlags.REPLY | MsgFlags.ERROR,
        error=int(code),
    )


def parse_payload(fmt: Struct | None, command: int, payload: bytes, *, reply: bool = False):
    """Parse a payload with its construct format; FrameError(EBADMSG) names what is wrong.
    The device and the machine use :func:`decode_payload` with the equal codec instead."""
    what = _what(command, reply)
    if fmt is None:
        if payload:
            raise FrameError(
                ProtoError.EBADMSG, f"{what} takes no payload, got {len(payload)} bytes"
            )
        return None
    try:
        obj = fmt.parse(payload)
    except Exception as exc:  # construct raises a family of errors; all mean "malformed"
        raise FrameError(
            ProtoError.EBADMSG, f"{what} payload of {len(payload)} bytes is malformed: {exc}"
        ) from None
    built_len = len(fmt.build(obj))
    if built_len != len(payload):
        raise FrameError(
            ProtoError.EBADMSG,
            f"{what} payload has {len(payload) - built_len} trailing bytes",
        )
    return obj


def _what(command: int, reply: bool) -> str:
    name = Command(command).name if command in Command._value2member_map_ else str(command)
    return f"{name} {'reply' if reply else 'request'}"


# Hot-path codecs for the fixed-size payloads, equal to the construct formats above (a test
# builds both and compares): a register access must not pay for construct's generality.
REG_READ_REQ_FAST = struct.Struct("<II")
REG_WRITE_REQ_FAST = struct.Struct("<II")
IRQ_MSG_FAST = struct.Struct("<IIII")
DMA_REQ_FAST = struct.Struct("<QI")
MEM_REQ_FAST = struct.Struct("<IIQ")
STEP_REPLY_FAST = struct.Struct("<IIQI")


class Fields(dict):
    """A decoded payload: its fields by name, as keys and as attributes (like construct's
    Container, which the construct formats parse into)."""

    __slots__ = ()

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Codec:
    """One payload format as a ``struct`` codec: fixed little-endian ``fields``, then
    optionally a ``tail`` of bytes that runs to the end (``tail_size`` None, construct's
    GreedyBytes) or whose length ``tail_size(fields)`` gives (construct's ``Bytes(this.size)``).
    ``consts`` are fields whose value is fixed (construct's Const). Each codec equals the
    construct format of the same name in :data:`CODECS` (tests/unit/device/test_abi.py)."""

    __slots__ = ("consts", "fields", "name", "struct", "tail", "tail_size")

    def __init__(
        self,
        name: str,
        fmt: str,
        fields: tuple[str, ...],
        *,
        consts: Mapping[str, int] | None = None,
        tail: str | None = None,
        tail_size=None,
    ) -> None:
        self.name = name
        self.struct = struct.Struct(fmt)
        self.fields = fields
        self.consts = dict(consts or {})
        self.tail = tail
        self.tail_size = tail_size

    def build(self, values: Mapping) -> bytes:
        """The payload of ``values`` (a mapping of field names; consts may be left out).

        Raises:
            ValueError: a field is missing or out of range, a const has another value, or a
                sized tail has another length than its size field says.
        """
        row = []
        for name in self.fields:
            if name in self.consts:
                value = values.get(name, self.consts[name])
                if value != self.consts[name]:
                    raise ValueError(f"{self.name}.{name} must be {self.consts[name]}, not {value}")
            elif name in values:
                value = values[name]
            else:
                raise ValueError(f"{self.name} needs field {name!r}")
            row.append(value)
        try:
            head = self.struct.pack(*row)
        except struct.error as exc:
            raise ValueError(f"{self.name}: {exc}") from None
        if self.tail is None:
            return head
        data = bytes(values[self.tail])
        if self.tail_size is not None and len(data) != self.tail_size(dict(zip(self.fields, row))):
            raise ValueError(
                f"{self.name}.{self.tail} has {len(data)} bytes, not the "
                f"{self.tail_size(dict(zip(self.fields, row)))} its size field says"
            )
        return head + data

    def parse(self, payload: bytes | memoryview) -> tuple[Fields, int]:
        """(the fields, the bytes they took) of ``payload``; ValueError says why it is
        malformed (too short, a const with another value). Bytes past a sized payload are
        left for the caller to refuse."""
        size = self.struct.size
        if len(payload) < size:
            raise ValueError(f"{self.name} needs {size} bytes before any data, got {len(payload)}")
        out = Fields(zip(self.fields, self.struct.unpack_from(payload)))
        for name, value in self.consts.items():
            if out[name] != value:
                raise ValueError(f"{self.name}.{name} must be {value}, got {out[name]}")
        if self.tail is None:
            return out, size
        end = len(payload) if self.tail_size is None else size + self.tail_size(out)
        if end > len(payload):
            raise ValueError(
                f"{self.name}.{self.tail} needs {end - size} bytes, got {len(payload) - size}"
            )
        out[self.tail] = bytes(payload[size:end])
        return out, end


def _sized(field: str, scale: int = 1):
    return lambda fields: fields[field] * scale


CODECS: dict[str, Codec] = {
    c.name: c
    for c in (
        Codec("HEADER", "<HHIII", ("msg_id", "command", "size", "flags", "error")),
        Codec("VERSION_REQ", "<HHI", ("major", "minor", "features"), tail="name"),
        Codec(
            "VERSION_REPLY",
            "<HHIII",
            ("major", "minor", "features", "gpu_id", "max_message"),
            tail="name",
        ),
        Codec("REG_READ_REQ", "<II", ("offset", "count")),
        Codec(
            "REG_READ_REPLY",
            "<II",
            ("offset", "count"),
            tail="values",
            tail_size=_sized("count", 4),
        ),
        Codec("REG_WRITE_REQ", "<II", ("offset", "value")),
        Codec("IRQ_MSG", "<IIII", ("level", "irq_status", "mmu_int_stat", "sequence")),
        Codec(
            "MEM_MAP_REQ", "<QQII", ("base", "size", "flags", "reserved"), consts={"reserved": 0}
        ),
        Codec("DMA_READ_REQ", "<QI", ("addr", "size")),
        Codec("DMA_READ_REPLY", "<QI", ("addr", "size"), tail="data", tail_size=_sized("size")),
        Codec("DMA_WRITE_REQ", "<QI", ("addr", "size"), tail="data", tail_size=_sized("size")),
        Codec("DMA_WRITE_REPLY", "<QI", ("addr", "size")),
        Codec("STEP_REQ", "<IIQ", ("max_packets", "reserved", "ticks_ns"), consts={"reserved": 0}),
        Codec("STEP_REPLY", "<IIQI", ("executed", "cp_state", "clock_ns", "irq_level")),
        Codec("CLOCK_MODE_REQ", "<I", ("mode",)),
        Codec("MEM_READ_REQ", "<IIQ", ("space", "size", "addr")),
        Codec("MEM_READ_REPLY", "<QI", ("addr", "size"), tail="data", tail_size=_sized("size")),
        Codec(
            "MEM_WRITE_REQ",
            "<IIQ",
            ("space", "size", "addr"),
            tail="data",
            tail_size=_sized("size"),
        ),
        Codec("STATS_REPLY", "<", (), tail="json"),
        Codec("RUN_STATE_REQ", "<I", ("run",)),
        Codec("RUN_STATE_REPLY", "<II", ("paused", "halted")),
    )
}
"""Every construct format of this module (``REQUESTS`` aside) as an equal struct codec."""

_C = CODECS
REQUEST_CODECS: dict[Command, tuple[Codec | None, Codec | None]] = {
    Command.VERSION: (_C["VERSION_REQ"], _C["VERSION_REPLY"]),
    Command.REG_READ: (_C["REG_READ_REQ"], _C["REG_READ_REPLY"]),
    Command.REG_WRITE: (_C["REG_WRITE_REQ"], None),
    Command.IRQ: (_C["IRQ_MSG"], None),
    Command.MEM_MAP: (_C["MEM_MAP_REQ"], None),
    Command.MEM_UNMAP: (None, None),
    Command.DMA_READ: (_C["DMA_READ_REQ"], _C["DMA_READ_REPLY"]),
    Command.DMA_WRITE: (_C["DMA_WRITE_REQ"], _C["DMA_WRITE_REPLY"]),
    Command.RESET: (None, None),
    Command.STEP: (_C["STEP_REQ"], _C["STEP_REPLY"]),
    Command.CLOCK_MODE: (_C["CLOCK_MODE_REQ"], None),
    Command.DEBUG_READ: (_C["REG_READ_REQ"], _C["REG_READ_REPLY"]),
    Command.MEM_READ: (_C["MEM_READ_REQ"], _C["MEM_READ_REPLY"]),
    Command.MEM_WRITE: (_C["MEM_WRITE_REQ"], None),
    Command.STATS: (None, _C["STATS_REPLY"]),
    Command.RUN_STATE: (_C["RUN_STATE_REQ"], _C["RUN_STATE_REPLY"]),
}
""":data:`REQUESTS` with each construct format replaced by its codec (a test compares)."""


def decode_payload(codec: Codec | None, command: int, payload: bytes, *, reply: bool = False):
    """Decode a payload with its codec; FrameError(EBADMSG) names what is wrong (a payload
    where none belongs, one too short or with a bad const, bytes past its end)."""
    what = _what(command, reply)
    if codec is None:
        if payload:
            raise FrameError(
                ProtoError.EBADMSG, f"{what} takes no payload, got {len(payload)} bytes"
            )
        return None
    try:
        fields, used = codec.parse(payload)
    except ValueError as exc:
        raise FrameError(
            ProtoError.EBADMSG, f"{what} payload of {len(payload)} bytes is malformed: {exc}"
        ) from None
    if used != len(payload):
        raise FrameError(
            ProtoError.EBADMSG, f"{what} payload has {len(payload) - used} trailing bytes"
        )
    return fields
