"""DOC: the client side of the device protocol.

:class:`DeviceClient` is what a machine (or a test) uses to drive the device model: register
reads and writes, posted doorbell writes, interrupts, guest memory, reset, stepping and the
debugger's memory view. Guest RAM is a :class:`SharedMemory` (a memfd mapped in this process);
:meth:`DeviceClient.attach_memory` passes its descriptor over a UNIX socket, so device DMA is
a plain memory access, and falls back to serving in-band ``DMA_READ``/``DMA_WRITE`` requests on
TCP and serial links, without the caller choosing::

    from gemu.device.abi import regs
    from gemu.device.abi.client import DeviceClient, SharedMemory

    dev = DeviceClient.connect("unix:/tmp/gpu.sock")      # connects and sends VERSION
    ram = SharedMemory(16 << 20)
    dev.attach_memory(ram)
    assert dev.readl(regs.GPU_ID.offset) == regs.GPU_ID_VALUE
    dev.writel_posted(regs.RING_DOORBELL.offset, 1)
    event = dev.wait_irq(timeout=1.0)                      # IrqEvent or None

Demultiplexing. One byte stream carries three kinds of traffic towards the client: replies to
requests, ``IRQ`` messages (posted, at any time) and, with in-band memory, the device's
``DMA_READ``/``DMA_WRITE`` requests, which the device waits for before it can answer anything
else. There is no reader thread on the hot path. Instead, whichever thread needs input holds
the *reader role* (a flag under one condition variable) and reads frames itself:

- a reply to its own request ends the wait (one ``send`` and one ``recv`` per register round
  trip, which is what keeps it close to a raw socket echo);
- a reply for another thread is stashed by msg_id and that thread is woken; it finds the reply
  without touching the socket;
- an ``IRQ`` message updates :attr:`DeviceClient.irq_level`, is queued for :meth:`wait_irq`
  and is handed to :attr:`DeviceClient.on_irq`, which runs after the reader role is given up
  (so it may itself talk to the device);
- a DMA request is served on the spot from :class:`SharedMemory` (the device is blocked on
  it).

Deadlines. With ``reply_timeout`` set (a machine sets it from ``--device-timeout``), no call
waits on the device for longer: a reply must come within it (every ``recv`` is bounded by
``SO_RCVTIMEO``, and the whole wait for one reply by a deadline), and a send that the device
does not take (a stopped device whose socket buffer is full) fails after it
(``SO_SNDTIMEO``; a serial port's ``write_timeout``). A device that misses the deadline is
*lost*: :class:`DeviceTimeout` (a :class:`DeviceGone`) names what timed out and after how
long, in every waiting thread at once, and the connection is not used again (a late reply
would answer the wrong request).

Threads without the role wait on the condition variable for their reply or for the role.
When nobody is waiting, IRQs and in-band DMA would sit unread, so :meth:`start_service`
starts an optional background thread that ``select``\\ s on the socket and takes the role only
when it is free (non-blocking), reading just what is there. Error replies raise
:class:`DeviceError` (errno and the device's text); a closed or broken connection raises
:class:`DeviceGone` in every waiting thread at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from . import link
from . import protocol as p
from .enums import CpState

log = logging.getLogger("gemu.device.client")

_HDR = p.HEADER_FAST
_PAIR = p.REG_READ_REQ_FAST
_REG1 = struct.Struct("<III")
_READ1_REQ = struct.Struct("<HHIIIII")  # header + offset, count
_READ1_REPLY = struct.Struct("<HHIIIIII")  # header + offset, count, value
_REPLY = int(p.MsgFlags.REPLY)
_ERROR = int(p.MsgFlags.ERROR)
_NO_REPLY = int(p.MsgFlags.NO_REPLY)
_REG_READ = int(p.Command.REG_READ)
_REG_WRITE = int(p.Command.REG_WRITE)
_IRQ = int(p.Command.IRQ)
_DMA_READ = int(p.Command.DMA_READ)
_DMA_WRITE = int(p.Command.DMA_WRITE)
IRQ_QUEUE_MAX = 4096


class DeviceError(Exception):
    """The device refused a request: ``errno`` and the device's ``text`` say why."""

    def __init__(self, errno: int, text: str = "", command: str = "") -> None:
        self.errno = errno
        self.text = text
        self.command = command
        try:
            name = p.ProtoError(errno).name
        except ValueError:
            name = f"errno {errno}"
        where = f"{command}: " if command else ""
        super().__init__(f"{where}{name}: {text}" if text else f"{where}{name}")


class DeviceGone(ConnectionError):
    """The connection to the device is closed or broken."""


class DeviceTimeout(DeviceGone, TimeoutError):
    """The device did not answer (or take a send) within the client's ``reply_timeout``: a
    stopped or wedged device. The connection is given up, as for :class:`DeviceGone`."""


class _SendFailed(Exception):
    """A send failed; raised with the send lock held, turned into DeviceGone outside it."""


class IrqEvent(NamedTuple):
    """One IRQ message: the line level and the status registers behind it."""

    level: bool
    irq_status: int
    mmu_int_stat: int
    sequence: int


class StepResult(NamedTuple):
    executed: int
    cp_state: CpState
    clock_ns: int
    irq_level: bool


class SharedMemory:
    """Guest RAM: a memfd of ``size`` bytes mapped shared in this process.

    ``fd`` is what the device maps; ``buf`` is a writable memoryview of the whole range. The
    memfd is sealed against shrinking (``F_SEAL_SHRINK``), as the device requires: a
    truncated file would fault the device's mapping."""

    def __init__(self, size: int, name: str = "gemu-guest-ram") -> None:
        if size <= 0 or size % mmap.PAGESIZE:
            raise ValueError(f"guest memory size {size:#x} must be a positive multiple of 4 KiB")
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            self._map = mmap.mmap(
                self.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        except OSError:
            os.close(self.fd)
            raise
        self.buf = memoryview(self._map)

    def _check(self, addr: int, size: int) -> None:
        if addr < 0 or size < 0 or addr + size > self.size:
            raise ValueError(
                f"[{addr:#x}, {addr + size:#x}) is outside guest memory ({self.size:#x} bytes)"
            )

    def read(self, addr: int, size: int) -> bytes:
        self._check(addr, size)
        return self.buf[addr : addr + size].tobytes()

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        n = memoryview(data).nbytes
        self._check(addr, n)
        self.buf[addr : addr + n] = data

    def read_u32(self, addr: int) -> int:
        self._check(addr, 4)
        return struct.unpack_from("<I", self.buf, addr)[0]

    def write_u32(self, addr: int, value: int) -> None:
        self._check(addr, 4)
        struct.pack_into("<I", self.buf, addr, value & 0xFFFFFFFF)

    def read_u64(self, addr: int) -> int:
        self._check(addr, 8)
        return struct.unpack_from("<Q", self.buf, addr)[0]

    def write_u64(self, addr: int, value: int) -> None:
        self._check(addr, 8)
        struct.pack_into("<Q", self.buf, addr, value & 0xFFFFFFFFFFFFFFFF)

    def close(self) -> None:
        if self.fd < 0:
            return
        self.buf.release()
        self._map.close()
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> SharedMemory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _command_name(command: int) -> str:
    try:
        return p.Command(command).name
    except ValueError:
        return f"command {command}"


_Request = tuple[int, "bytes | int"]
"""What a waiting call asked: (command, payload or register offset), described only when a
deadline passes (so the hot path builds no message)."""


def _describe(request: _Request) -> str:
    """``REG_READ 0x24`` or the command's name: what a device-lost message says timed out."""
    command, detail = request
    name = _command_name(command)
    if command in (_REG_READ, _REG_WRITE, int(p.Command.DEBUG_READ)):
        offset = (
            detail
            if isinstance(detail, int)
            else (struct.unpack_from("<I", detail)[0] if len(detail) >= 4 else None)
        )
        if offset is not None:
            return f"{name} {offset:#x}"
    return name


class DeviceClient:
    """A connection to one device model. Thread-safe; see the module doc for the design."""

    def __init__(
        self, conn: link.Connection, *, name: str = "gemu", reply_timeout: float | None = None
    ) -> None:
        self.conn = conn
        self.name = name
        self.reply_timeout = reply_timeout
        self.on_irq: Callable[[IrqEvent], None] | None = None
        self.features = p.Features(0)
        self.device_features = p.Features(0)
        self.device_name = ""
        self.gpu_id = 0
        self.max_message = p.MAX_MESSAGE
        self.posted_errors: deque[DeviceError] = deque(maxlen=64)
        self._send_lock = threading.Lock()
        self._role = threading.Lock()  # held by the thread that reads the connection
        self._cond = threading.Condition(threading.Lock())
        self._sleepers = 0  # threads waiting on _cond (changed under it)
        self._replies: dict[int, tuple[int, int, int, bytes]] = {}
        self._waiting: set[int] = set()
        self._gone: DeviceGone | None = None
        self._next_id = 0
        self._irqs: deque[IrqEvent] = deque(maxlen=IRQ_QUEUE_MAX)
        self._callbacks: list[IrqEvent] = []
        self._irq_level = False
        self._mem: SharedMemory | None = None
        self._buf = bytearray(1 << 16)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._service: threading.Thread | None = None
        self._closed = False
        if isinstance(conn, link.SocketConnection):
            self._raw_send = conn.sock.sendall
            self._raw_recv = conn.sock.recv_into
        else:
            self._raw_send = conn.sendall
            self._raw_recv = conn.recv_into
        if reply_timeout is not None:
            self._bound_io(reply_timeout)
        self.counters = dict(requests=0, irqs=0, irqs_dropped=0, dma_served=0, dma_bytes=0)

    @classmethod
    def connect(
        cls,
        spec: str,
        *,
        handshake: bool = True,
        timeout: float | None = 10.0,
        name: str = "gemu",
        reply_timeout: float | None = None,
    ) -> DeviceClient:
        """Connect to ``spec`` (``unix:``, ``tcp:``, ``serial:``) and, by default, handshake."""
        conn = link.connect(spec, timeout=reply_timeout if spec.startswith("serial:") else timeout)
        client = cls(conn, name=name, reply_timeout=reply_timeout)
        if handshake:
            try:
                client.handshake()
            except BaseException:
                client.close()
                raise
        return client

    def _bound_io(self, seconds: float) -> None:
        """Bound every blocking send and receive of the connection by ``seconds``: in the
        kernel for sockets (SO_RCVTIMEO/SO_SNDTIMEO keep the socket blocking, so the hot path
        pays no extra poll), by pyserial's timeouts for a serial port."""
        if seconds <= 0:
            raise ValueError(f"reply_timeout must be above 0, not {seconds}")
        conn = self.conn
        if isinstance(conn, link.SocketConnection):
            sec = int(seconds)
            timeval = struct.pack("@ll", sec, int((seconds - sec) * 1_000_000))
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        elif isinstance(conn, link.SerialConnection):
            conn.timeout = seconds
            with contextlib.suppress(AttributeError, ValueError):
                conn.port.write_timeout = seconds

    def _timed_out(self, what: str) -> DeviceTimeout:
        """Give the connection up: the device missed the deadline on ``what``."""
        return self._lost(
            f"{what}: no answer from the device within {self.reply_timeout:g} s "
            "(stopped or wedged)",
            timeout=True,
        )

    def _io_failed(self, exc: BaseException, what: str) -> DeviceGone:
        """A failed send or receive: a timeout (SO_RCVTIMEO/SO_SNDTIMEO report EAGAIN) or a
        broken connection."""
        if isinstance(exc, TimeoutError) or (
            isinstance(exc, OSError) and exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK)
        ):
            return self._timed_out(what)
        return self._lost(f"{what} failed: {exc}")

    # --- requests --------------------------------------------------------------------------

    def handshake(self) -> p.Features:
        """Send VERSION; return the features both ends support."""
        mine = p.Features.IN_BAND_DMA | p.Features.STEPPED_CLOCK | p.Features.DEBUG
        if self.conn.supports_fds:
            mine |= p.Features.FD_PASSING
        payload = p.CODECS["VERSION_REQ"].build(
            dict(
                major=p.PROTOCOL_MAJOR,
                minor=p.PROTOCOL_MINOR,
                features=int(mine),
                name=self.name.encode(),
            )
        )
        reply = p.decode_payload(
            p.CODECS["VERSION_REPLY"],
            p.Command.VERSION,
            self._call(p.Command.VERSION, payload),
            reply=True,
        )
        self.device_features = p.Features(reply.features)
        self.features = mine & self.device_features
        self.device_name = bytes(reply.name).decode("utf-8", "replace")
        self.gpu_id = reply.gpu_id
        self.max_message = reply.max_message
        return self.features

    def readl(self, offset: int) -> int:
        """Read one register (a round trip)."""
        self.counters["requests"] += 1
        role = self._role
        if not role.acquire(False):
            msg_id = self._send_request(_REG_READ, _PAIR.pack(offset, 1), None, False)
            reply = self._wait_reply(msg_id, (_REG_READ, offset))
            return _REG1.unpack(self._check_reply(_REG_READ, msg_id, reply))[2]
        try:
            if self._gone is None and self._start == self._end:
                # The hot path: nothing buffered, so the next frame is most likely our reply,
                # whole. Anything else continues on the general path below.
                with self._send_lock:
                    self._next_id = msg_id = self._next_id % 0xFFFF + 1
                    try:
                        self._raw_send(_READ1_REQ.pack(msg_id, _REG_READ, 24, 0, 0, offset, 1))
                    except OSError as exc:
                        if not isinstance(exc, TimeoutError | BlockingIOError):
                            self._salvage(role_held=True)
                        raise self._io_failed(
                            exc, _describe((_REG_READ, offset)) + ": send"
                        ) from None
                try:
                    n = self._raw_recv(self._view)
                except (OSError, ValueError) as exc:
                    raise self._io_failed(exc, _describe((_REG_READ, offset)) + ": reply") from None
                if n == 28:
                    r_id, _, size, flags, _, _, _, value = _READ1_REPLY.unpack_from(self._buf)
                    if r_id == msg_id and flags == _REPLY and size == 28:
                        return value
                elif not n:
                    raise self._lost("the device closed the connection")
                self._waiting.add(msg_id)
                self._end = n
            else:
                msg_id = self._send_request(_REG_READ, _PAIR.pack(offset, 1), None, True)
            reply = self._read_reply(msg_id, (_REG_READ, offset))
        finally:
            role.release()
            if self._sleepers or self._callbacks:
                self._after_release()
        return _REG1.unpack(self._check_reply(_REG_READ, msg_id, reply))[2]

    def readl_many(self, offset: int, count: int) -> list[int]:
        """Read ``count`` consecutive registers in one round trip."""
        reply = self._call(_REG_READ, _PAIR.pack(offset, count))
        return list(struct.unpack_from(f"<{count}I", reply, 8))

    def debug_readl(self, offset: int, count: int = 1) -> int | list[int]:
        """Side-effect-free register read (what a debugger sees); a list if ``count`` > 1."""
        reply = self._call(p.Command.DEBUG_READ, _PAIR.pack(offset, count))
        values = list(struct.unpack_from(f"<{count}I", reply, 8))
        return values[0] if count == 1 else values

    def writel(self, offset: int, value: int) -> None:
        """Write one register and wait for the device to acknowledge it."""
        self._call(_REG_WRITE, _PAIR.pack(offset, value & 0xFFFFFFFF))

    def writel_posted(self, offset: int, value: int) -> None:
        """Write one register without waiting (a doorbell). A failure shows up later in
        :attr:`posted_errors` and the log."""
        body = _PAIR.pack(offset, value & 0xFFFFFFFF)
        try:
            with self._send_lock:
                self._send(
                    _HDR.pack(self._new_id(), _REG_WRITE, 24, _NO_REPLY, 0) + body,
                    what=(_REG_WRITE, offset),
                )
        except _SendFailed as exc:
            raise exc.args[1] if len(exc.args) > 1 else self._lost(str(exc)) from None

    def reset(self) -> None:
        """Reset the device (registers, TLBs, CP); guest memory stays attached."""
        self._call(p.Command.RESET)

    def step(self, max_packets: int, ticks_ns: int = 0) -> StepResult:
        """STEPPED mode: advance the device clock by ``ticks_ns``, then run at most
        ``max_packets`` packets."""
        payload = p.CODECS["STEP_REQ"].build(dict(max_packets=max_packets, ticks_ns=ticks_ns))
        executed, state, clock_ns, level = p.STEP_REPLY_FAST.unpack(
            self._call(p.Command.STEP, payload)
        )
        return StepResult(executed, CpState(state), clock_ns, bool(level))

    def run_state(self, run: p.RunRequest = p.RunRequest.QUERY) -> tuple[bool, bool]:
        """The machine's stop/cont of the device (QMP ``stop``/``cont``): send ``run`` and
        return (paused, halted): the machine's hold, and whether the CP holds at all (the
        machine's or a debugger's)."""
        reply = p.decode_payload(
            p.CODECS["RUN_STATE_REPLY"],
            p.Command.RUN_STATE,
            self._call(p.Command.RUN_STATE, p.CODECS["RUN_STATE_REQ"].build(dict(run=int(run)))),
            reply=True,
        )
        return bool(reply.paused), bool(reply.halted)

    def set_clock_mode(self, mode: p.ClockMode | int) -> None:
        self._call(p.Command.CLOCK_MODE, p.CODECS["CLOCK_MODE_REQ"].build(dict(mode=int(mode))))

    def mem_read(self, space: int, addr: int, size: int) -> bytes:
        """Read device memory through AS ``space`` (or ``protocol.SPACE_PHYS``), the
        debugger's way: no fault registers change; a fault raises DeviceError(EFAULT)."""
        out = bytearray()
        while len(out) < size:
            chunk = min(size - len(out), p.MAX_DMA)
            a = addr + len(out)
            reply = self._call(p.Command.MEM_READ, p.MEM_REQ_FAST.pack(space, chunk, a))
            out += reply[p.DMA_REQ_FAST.size :]
        return bytes(out)

    def mem_write(self, space: int, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Write device memory through AS ``space`` (or ``protocol.SPACE_PHYS``)."""
        mv = memoryview(data).cast("B")
        for off in range(0, len(mv), p.MAX_DMA):
            chunk = mv[off : off + p.MAX_DMA]
            self._call(
                p.Command.MEM_WRITE,
                p.MEM_REQ_FAST.pack(space, len(chunk), addr + off) + bytes(chunk),
            )

    def stats(self) -> dict:
        """The device's counters (and its server's, under ``"server"``)."""
        import json  # only for this rare request: not on the boot path

        data = json.loads(bytes(self._call(p.Command.STATS)))
        data["client"] = self.statistics()
        return data

    def statistics(self) -> dict:
        """This client's own counters."""
        return dict(self.counters, irq_queue=len(self._irqs), irq_level=self._irq_level)

    def attach_memory(self, mem: SharedMemory) -> str:
        """Give the device guest memory: by descriptor where the link can pass one, in band
        otherwise. Returns ``"fd"`` or ``"in-band"``."""
        by_fd = bool(self.features & p.Features.FD_PASSING) and self.conn.supports_fds
        flags = p.MemMapFlags.FD if by_fd else p.MemMapFlags.IN_BAND
        payload = p.CODECS["MEM_MAP_REQ"].build(dict(base=0, size=mem.size, flags=int(flags)))
        self._mem = mem  # in-band DMA may start as soon as the device has the reply out
        try:
            self._call(p.Command.MEM_MAP, payload, fds=[mem.fd] if by_fd else None)
        except BaseException:
            self._mem = None
            raise
        return "fd" if by_fd else "in-band"

    def detach_memory(self) -> None:
        self._call(p.Command.MEM_UNMAP)
        self._mem = None

    @property
    def memory(self) -> SharedMemory | None:
        return self._mem

    # --- interrupts ------------------------------------------------------------------------

    @property
    def irq_level(self) -> bool:
        """The interrupt line as of the last IRQ message received."""
        return self._irq_level

    def wait_irq(self, timeout: float | None = None) -> IrqEvent | None:
        """The oldest IRQ message not yet taken, waiting up to ``timeout`` seconds for one
        (None: forever). None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._irqs:
                with self._cond:
                    if self._irqs:
                        return self._irqs.popleft()
            if self._gone is not None:
                raise self._gone
            if self._role.acquire(False):
                try:
                    while not self._irqs:
                        self._read_some(deadline)
                        if deadline is not None and time.monotonic() >= deadline:
                            break
                finally:
                    self._release_role()
                if not self._irqs:
                    return None
                continue
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            self._sleep(lambda: bool(self._irqs), left)

    def drain_irqs(self) -> list[IrqEvent]:
        """Every queued IRQ message, without waiting."""
        with self._cond:
            out = list(self._irqs)
            self._irqs.clear()
        return out

    def start_service(self, interval: float = 0.1) -> None:
        """Serve IRQs and in-band DMA in a background thread while no caller is reading."""
        if self._service is not None:
            return
        self._service = threading.Thread(
            target=self._service_loop, args=(interval,), name="gemu-client-service", daemon=True
        )
        self._service.start()

    def close(self) -> None:
        """Close the connection; waiting threads get DeviceGone."""
        if self._closed:
            return
        self._closed = True
        with self._cond:
            if self._gone is None:
                self._gone = DeviceGone("the client closed the connection")
            self._cond.notify_all()
        self.conn.close()
        if self._service is not None and self._service is not threading.current_thread():
            self._service.join(timeout=5)

    def __enter__(self) -> DeviceClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- plumbing --------------------------------------------------------------------------

    def _new_id(self) -> int:
        """Next request id (1..65535; 0 is never used). Called with the send lock held."""
        self._next_id = self._next_id % 0xFFFF + 1
        return self._next_id

    def _send(
        self, data: bytes, fds: list[int] | None = None, *, what: _Request | None = None
    ) -> None:
        """Send a frame; the send lock is held by the caller. A send the device does not take
        within ``reply_timeout`` raises _SendFailed carrying the DeviceTimeout."""
        if self._gone is not None:
            raise self._gone
        try:
            if fds:
                self.conn.send_fds(data, fds)
            else:
                self._raw_send(data)
        except link.TransportError:
            raise
        except OSError as exc:
            if isinstance(exc, TimeoutError | BlockingIOError):
                request = what or (_HDR.unpack_from(data)[1], bytes(data[16:24]))
                raise _SendFailed(
                    str(exc), self._timed_out(_describe(request) + ": send")
                ) from None
            raise _SendFailed(f"sending to the device failed: {exc}") from None

    def _salvage(self, *, role_held: bool) -> None:
        """After a failed send, handle what the device sent before it closed (if nobody else
        is reading): typically the frame that refused the connection."""
        if not role_held and not self._role.acquire(False):
            return
        try:
            while self._fill(block=False):
                self._handle_buffered()
            self._handle_buffered()
        except DeviceGone:
            pass
        finally:
            if not role_held:
                self._release_role()

    def _send_request(
        self, command: int, payload: bytes, fds: list[int] | None, role_held: bool
    ) -> int:
        """Send a request that expects a reply; return its msg_id."""
        if self._gone is not None:
            raise self._gone
        try:
            with self._send_lock:
                self._next_id = msg_id = self._next_id % 0xFFFF + 1
                self._waiting.add(msg_id)
                try:
                    self._send(_HDR.pack(msg_id, command, 16 + len(payload), 0, 0) + payload, fds)
                except BaseException:
                    self._waiting.discard(msg_id)
                    raise
        except _SendFailed as exc:
            if len(exc.args) > 1:  # timed out: the device is not reading, nothing to salvage
                raise exc.args[1] from None
            self._salvage(role_held=role_held)  # the device may have said why it hung up
            raise self._lost(str(exc)) from None
        return msg_id

    def _call(self, command: int, payload: bytes = b"", *, fds: list[int] | None = None) -> bytes:
        """Send a request and return its reply payload (DeviceError on an error reply)."""
        self.counters["requests"] += 1
        if self._role.acquire(False):
            try:
                msg_id = self._send_request(command, payload, fds, True)
                reply = self._read_reply(msg_id, (command, payload))
            finally:
                self._release_role()
        else:
            msg_id = self._send_request(command, payload, fds, False)
            reply = self._wait_reply(msg_id, (command, payload))
        return self._check_reply(command, msg_id, reply)

    @staticmethod
    def _check_reply(command: int, msg_id: int, reply: tuple[int, int, int, bytes]) -> bytes:
        r_command, flags, error, data = reply
        if flags & _ERROR:
            raise DeviceError(error, data.decode("utf-8", "replace"), _command_name(command))
        if r_command != command:
            raise DeviceError(
                p.ProtoError.EPROTO,
                f"reply to id {msg_id} is for {_command_name(r_command)}",
                _command_name(command),
            )
        return data

    def _read_reply(self, msg_id: int, request: _Request) -> tuple[int, int, int, bytes]:
        """With the reader role: read until the reply to ``msg_id``, stashing others'. With
        ``reply_timeout``, the reply must come within it even while other frames (IRQs,
        DMA) keep arriving."""
        deadline = None if self.reply_timeout is None else time.monotonic() + self.reply_timeout
        try:
            reply = self._replies.pop(msg_id, None)
            while reply is None:
                r_id, r = self._next_reply(deadline, request)
                if r_id == msg_id:
                    reply = r
                else:
                    with self._cond:
                        self._replies[r_id] = r
                        self._cond.notify_all()
            return reply
        finally:
            self._waiting.discard(msg_id)

    def _wait_reply(self, msg_id: int, request: _Request) -> tuple[int, int, int, bytes]:
        """Without the reader role: wait for another reader to stash the reply, or for the
        role to come free and read it ourselves (both within ``reply_timeout``)."""
        limit = self.reply_timeout
        deadline = None if limit is None else time.monotonic() + limit
        try:
            while True:
                reply = self._replies.pop(msg_id, None)
                if reply is not None:
                    return reply
                if self._gone is not None:
                    raise self._gone
                if self._role.acquire(False):
                    try:
                        return self._read_reply(msg_id, request)
                    finally:
                        self._release_role()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise self._timed_out(_describe(request) + ": reply")
                self._sleep(lambda: msg_id in self._replies, left)
        finally:
            self._waiting.discard(msg_id)

    def _sleep(self, ready: Callable[[], bool], timeout: float | None = None) -> None:
        """Wait until ``ready()``, the reader role is free, the connection is gone or the
        timeout passes (the reader notifies under the condition)."""
        with self._cond:
            self._sleepers += 1
            try:
                if not ready() and self._gone is None and self._role.locked():
                    self._cond.wait(timeout)
            finally:
                self._sleepers -= 1

    def _release_role(self) -> None:
        self._role.release()
        if self._sleepers or self._callbacks:
            self._after_release()

    def _after_release(self) -> None:
        """Wake threads waiting for the role or a reply; run IRQ callbacks collected while
        reading (outside the role, so they may talk to the device)."""
        if self._sleepers:
            with self._cond:
                self._cond.notify_all()
        if self._callbacks:
            with self._cond:
                callbacks, self._callbacks = self._callbacks, []
            handler = self.on_irq
            if handler is not None:
                for event in callbacks:
                    try:
                        handler(event)
                    except Exception:
                        log.exception("on_irq handler failed")

    def _lost(self, why: str, *, timeout: bool = False) -> DeviceGone:
        with self._cond:
            if self._gone is None:
                self._gone = (DeviceTimeout if timeout else DeviceGone)(why)
                log.info("device connection lost: %s", why)
            self._cond.notify_all()
            return self._gone

    # --- reading (reader role held) --------------------------------------------------------

    def _next_reply(
        self, deadline: float | None, request: _Request
    ) -> tuple[int, tuple[int, int, int, bytes]]:
        """Read frames until a reply someone waits for arrives (by ``deadline``); handle
        everything else."""
        while True:
            frame = self._parse_frame()
            if frame is None:
                if deadline is not None and time.monotonic() >= deadline:
                    raise self._timed_out(_describe(request) + ": reply")
                self._fill(block=True, request=request)
                continue
            result = self._dispatch(*frame)
            if result is not None:
                return result

    def _read_some(self, deadline: float | None) -> None:
        """Handle buffered frames, or wait until ``deadline`` for input and handle it."""
        if self._handle_buffered():
            return
        fd = self.conn.fileno()
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if fd is not None:
            try:
                ready, _, _ = select.select([fd], (), (), left)
            except (OSError, ValueError):
                raise self._lost("the connection is closed") from None
            if not ready:
                return
            self._fill(block=True)
        elif not self._fill(block=False):
            time.sleep(min(0.005, left) if left is not None else 0.005)
            return
        self._handle_buffered()

    def _handle_buffered(self) -> bool:
        """Handle every complete buffered frame (stashing replies); True if there was one."""
        progressed = False
        while (frame := self._parse_frame()) is not None:
            progressed = True
            result = self._dispatch(*frame)
            if result is not None:
                with self._cond:
                    self._replies[result[0]] = result[1]
                    self._cond.notify_all()
        return progressed

    def _fill(self, *, block: bool, request: _Request | None = None) -> bool:
        if self._end == len(self._buf):
            self._make_room(1)
        try:
            if block:
                n = self._raw_recv(self._view[self._end :])
            else:
                n = self.conn.recv_into(self._view[self._end :], block=False)
        except (OSError, ValueError) as exc:
            what = "reading" if request is None else _describe(request) + ": reply"
            raise self._io_failed(exc, what) from None
        if n is None:
            return False
        if n == 0:
            raise self._lost("the device closed the connection")
        self._end += n
        return True

    def _make_room(self, need: int) -> None:
        if self._start:
            pending = self._end - self._start
            self._buf[:pending] = self._buf[self._start : self._end]
            self._start, self._end = 0, pending
        if len(self._buf) - self._end < need:
            self._view.release()
            self._buf.extend(bytes(need - (len(self._buf) - self._end)))
            self._view = memoryview(self._buf)

    def _parse_frame(self):
        avail = self._end - self._start
        if avail < 16:
            return None
        msg_id, command, size, flags, error = _HDR.unpack_from(self._buf, self._start)
        if size < 16 or size > p.MAX_MESSAGE:
            raise self._lost(f"the device sent a frame of impossible size {size}: framing lost")
        if avail < size:
            if len(self._buf) - self._start < size:
                self._make_room(size - avail)
            return None
        start = self._start
        payload = bytes(self._view[start + 16 : start + size])
        self._start = start + size
        if self._start == self._end:
            self._start = self._end = 0
        return msg_id, command, size, flags, error, payload

    def _dispatch(self, msg_id, command, size, flags, error, payload):
        """Handle one frame; return (msg_id, reply) for a reply someone waits for."""
        if flags & _REPLY:
            if msg_id in self._waiting:
                return msg_id, (command, flags, error, payload)
            text = payload.decode("utf-8", "replace")
            if flags & _ERROR:
                exc = DeviceError(error, text, _command_name(command))
                if msg_id == 0:  # not an answer to anything: the device refuses the connection
                    raise self._lost(f"the device refused the connection: {exc}")
                self.posted_errors.append(exc)
                log.warning("posted request id %d failed: %s", msg_id, exc)
            else:
                log.warning("unexpected %s reply id %d", _command_name(command), msg_id)
            return None
        if command == _IRQ:
            self._on_irq_message(payload)
        elif command in (_DMA_READ, _DMA_WRITE):
            self._serve_dma(msg_id, command, size, flags, error, payload)
        else:
            hdr = p.Header(msg_id, command, size, flags, error)
            log.warning("the device sent an unexpected request: %s", hdr.describe())
            if not flags & _NO_REPLY:
                self._reply(
                    p.error_frame(
                        hdr,
                        p.ProtoError.EPROTO,
                        f"{_command_name(command)} is not a request a client serves",
                    )
                )
        return None

    def _on_irq_message(self, payload: bytes) -> None:
        if len(payload) != p.IRQ_MSG_FAST.size:
            log.warning("IRQ message with a %d-byte payload ignored", len(payload))
            return
        level, status, mmu, seq = p.IRQ_MSG_FAST.unpack(payload)
        event = IrqEvent(bool(level), status, mmu, seq)
        self.counters["irqs"] += 1
        with self._cond:
            self._irq_level = event.level
            if len(self._irqs) == self._irqs.maxlen:
                self.counters["irqs_dropped"] += 1
            self._irqs.append(event)
            if self.on_irq is not None:
                self._callbacks.append(event)
            self._cond.notify_all()

    def _reply(self, frame: bytes) -> None:
        try:
            with self._send_lock:
                self._send(frame)
        except _SendFailed as exc:
            raise exc.args[1] if len(exc.args) > 1 else self._lost(str(exc)) from None

    def _serve_dma(self, msg_id, command, size, flags, error, payload) -> None:
        hdr = p.Header(msg_id, command, size, flags, error)
        name = _command_name(command)
        mem = self._mem
        if len(payload) < p.DMA_REQ_FAST.size:
            self._reply(p.error_frame(hdr, p.ProtoError.EBADMSG, f"{name} payload too short"))
            return
        addr, n = p.DMA_REQ_FAST.unpack_from(payload)
        if mem is None:
            self._reply(p.error_frame(hdr, p.ProtoError.ENODEV, f"{name}: no guest memory"))
            return
        if addr + n > mem.size:
            text = f"{name} {addr:#x}+{n:#x} is outside guest memory ({mem.size:#x} bytes)"
            log.warning("refused: %s", text)
            self._reply(p.error_frame(hdr, p.ProtoError.EFAULT, text))
            return
        self.counters["dma_served"] += 1
        self.counters["dma_bytes"] += n
        if command == _DMA_READ:
            if len(payload) != p.DMA_REQ_FAST.size:
                self._reply(p.error_frame(hdr, p.ProtoError.EBADMSG, f"{name} payload size"))
                return
            data = mem.buf[addr : addr + n]
            out = p.DMA_REQ_FAST.pack(addr, n)
            self._reply(_HDR.pack(msg_id, command, 16 + len(out) + n, _REPLY, 0) + out + data)
        else:
            data = memoryview(payload)[p.DMA_REQ_FAST.size :]
            if len(data) != n:
                text = f"{name} says {n} bytes but carries {len(data)}"
                self._reply(p.error_frame(hdr, p.ProtoError.EBADMSG, text))
                return
            mem.buf[addr : addr + n] = data
            out = p.DMA_REQ_FAST.pack(addr, n)
            self._reply(_HDR.pack(msg_id, command, 16 + len(out), _REPLY, 0) + out)

    def _service_loop(self, interval: float) -> None:
        while not self._closed and self._gone is None:
            fd = self.conn.fileno()
            if fd is not None:
                try:
                    if not select.select([fd], (), (), interval)[0]:
                        continue
                except (OSError, ValueError):
                    return
            if not self._role.acquire(False):
                # a caller is reading and handles what came in; wait until it is done
                self._sleep(lambda: False, interval)
                continue
            try:
                self._read_some(time.monotonic() + (0 if fd is not None else 0.01))
            except DeviceGone:
                return
            except Exception:
                log.exception("client service thread failed")
                return
            finally:
                self._release_role()


__all__ = [
    "DeviceClient",
    "DeviceError",
    "DeviceGone",
    "DeviceTimeout",
    "IrqEvent",
    "SharedMemory",
    "StepResult",
]
