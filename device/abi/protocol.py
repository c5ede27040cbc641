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

The payload formats below are the single definition both ends use. Limits:
``MAX_MESSAGE`` bytes per message (larger frames lose the framing: the receiver replies with
EMSGSIZE and closes; an error reply is never answered, not even then), ``MAX_REG_COUNT``
registers per batched read, ``MAX_DMA`` bytes per DMA or debug memory message.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from construct import Bytes, Const, GreedyBytes, Int16ul, Int32ul, Int64ul, Struct, this

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


HEADER = Struct(
    "msg_id" / Int16ul,
    "command" / Int16ul,
    "size" / Int32ul,
    "flags" / Int32ul,
    "error" / Int32ul,
)
HEADER_FAST = struct.Struct("<HHIII")
assert HEADER_FAST.size == HEADER.sizeof() == HEADER_SIZE

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


@dataclass(frozen=True)
class Header:
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
    """Parse a payload with its declared format; FrameError(EBADMSG) names what is wrong."""
    name = Command(command).name if command in Command._value2member_map_ else str(command)
    what = f"{name} {'reply' if reply else 'request'}"
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


# Hot-path codecs for the fixed-size payloads, equal to the construct formats above (a test
# builds both and compares): a register access must not pay for construct's generality.
REG_READ_REQ_FAST = struct.Struct("<II")
REG_WRITE_REQ_FAST = struct.Struct("<II")
IRQ_MSG_FAST = struct.Struct("<IIII")
DMA_REQ_FAST = struct.Struct("<QI")
MEM_REQ_FAST = struct.Struct("<IIQ")
STEP_REPLY_FAST = struct.Struct("<IIQI")
