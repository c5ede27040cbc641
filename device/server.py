"""DOC: the device model's protocol server (``gemu device``).

:class:`DeviceServer` puts a :class:`~gemu.device.gpu.Gpu` behind a transport
(:mod:`gemu.device.transport`) and speaks the wire protocol of
:mod:`gemu.device.abi.protocol`. Everything happens on one event-loop thread, with no device
threads and no locks, the way QEMU's main loop drives a device model:

- ``epoll`` over the listener, the client and any extra readers (:meth:`add_reader`, e.g. a
  debugger socket); one client at a time, a second connection is refused with an ``EBUSY``
  frame and a log line. While the device is idle and only a socket client is there, the loop
  blocks in that client's ``recv`` instead (bounded by ``SO_RCVTIMEO``, after which it looks
  at the listener and the wake-up pipe): one system call less per register round trip;
- every message is handled to completion, then an ``IRQ`` message is posted if the interrupt
  line, ``IRQ_STATUS`` or ``MMU_INT_STAT`` changed (the IRQ goes out *before* the reply, so a
  client that has the reply of a register write also knows the line it caused);
- in ``FREE`` clock mode the command processor runs in batches (``gpu.run(BATCH)``) between
  non-blocking polls while it has work, and every ``WAIT_POLL_S`` while a WAIT_MEM is pending
  (guest memory changes without a message, so the device must look again; the WAIT_MEM
  timeout is the device model's business); in ``STEPPED`` mode it runs only inside ``STEP``;
- replies never block the loop: a send takes what the link takes now, the rest waits in the
  session's output buffer, flushed on ``EPOLLOUT``; a client that leaves more than
  ``OUTPUT_CAP`` bytes unread is disconnected with a log line;
- guest memory comes as a descriptor (``MEM_MAP`` with SCM_RIGHTS over a UNIX socket: a memfd
  sealed against shrinking, :class:`~gemu.device.memory.MappedMemory`; descriptors that come
  with any other request are closed before it is handled) or in band (TCP, serial:
  :class:`~gemu.device.memory.InBandMemory`, whose accesses become ``DMA_READ``/``DMA_WRITE``
  requests to the client; requests that arrive while the device waits for the DMA reply are
  queued and handled afterwards, in order).

A client can never bring the process down: a malformed, oversized or out-of-order frame gets
an error reply naming what was wrong plus a log line on ``gemu.device.server``; a frame whose
size field is impossible has lost the framing, so it gets ``EMSGSIZE`` and the connection is
closed (an error reply is never answered, not even then). On disconnect guest memory is
unmapped but the device keeps its state for the next client. A serial port is opened at
construction (SpecError if it cannot be) and reopened with back-off if it goes away. Running a device in a thread of a test::

    server = DeviceServer(Gpu(), "unix:/tmp/gpu.sock")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ...
    server.stop()
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from gemu.device import transport
from gemu.device.abi import link, regs
from gemu.device.abi import protocol as p
from gemu.device.memory import BusError, InBandMemory, MappedMemory

log = logging.getLogger("gemu.device.server")
guest_log = logging.getLogger("gemu.device.guest_error")

BATCH = 256  # packets per CP batch between two polls in FREE mode
WAIT_POLL_S = 200e-6  # how often a pending WAIT_MEM re-reads guest memory in FREE mode
# The longest the loop waits for a client's DMA reply; the access then fails (EIO, a CP bus
# error). Everything but new connections (answered EBUSY) waits meanwhile, so this bounds how
# long a client that never answers can hold the device: the gdb stub, a reset, the CP.
DMA_TIMEOUT_S = 2.0
IDLE_RECV_US = 50_000  # longest blocking recv on an idle client before looking at the rest
POLL_S = 0.01  # polling period for links without a descriptor (e.g. loop://)
SERIAL_RETRY_S = (0.1, 2.0)  # reopening a serial port that went away: first delay, cap
ACCEPT_DRAIN_READS = 8  # reads of the current client before a new connection is answered
OUTPUT_CAP = 4 << 20  # bytes of output a client may leave unread before it is disconnected
NAME = b"gemu-device"

_HDR = p.HEADER_FAST
_REG1_REPLY = struct.Struct("<HHIIIIII")  # header + offset, count, one value
_REG1_REPLY_SIZE = _REG1_REPLY.size
_REG1_REQ = struct.Struct("<HHIIIII")  # header + offset, count
_REG_PAIR = p.REG_READ_REQ_FAST
_REPLY = int(p.MsgFlags.REPLY)
_NO_REPLY = int(p.MsgFlags.NO_REPLY)
_ERROR = int(p.MsgFlags.ERROR)
_REG_READ = int(p.Command.REG_READ)
_REG_WRITE = int(p.Command.REG_WRITE)
_VERSION = int(p.Command.VERSION)
_MEM_MAP = int(p.Command.MEM_MAP)
_MMIO_SIZE = regs.MMIO_SIZE


class _Reject(Exception):
    """A request that fails with ``code``; ``guest`` logs it as a guest error."""

    def __init__(self, code: p.ProtoError, text: str, *, guest: bool = False) -> None:
        super().__init__(text)
        self.code = code
        self.guest = guest


class _Disconnected(Exception):
    """The client went away (end of stream or a failed send)."""


class _Session:
    """State of the connection being served."""

    def __init__(self, conn: transport.Connection) -> None:
        self.conn = conn
        self.buf = bytearray(1 << 18)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.queued: deque[tuple[int, int, int, int, int, bytes]] = deque()
        self.out = bytearray()  # what the client has not taken yet (sends never block)
        self.handshaken = False
        self.features = p.Features(0)
        self.alive = True
        self.next_id = 0
        self.direct = False  # the loop may block in this connection's recv (sockets)
        self.recv: Callable[[memoryview], int] | None = None

    def new_id(self) -> int:
        self.next_id = (self.next_id + 1) & 0xFFFF or 1
        return self.next_id


def _header(msg_id: int, command: int, size: int, flags: int, error: int) -> p.Header:
    return p.Header(msg_id, command, size, flags, error)


def _command_name(command: int) -> str:
    try:
        return p.Command(command).name
    except ValueError:
        return f"command {command}"


class DeviceServer:
    """Serve ``gpu`` on ``listen_spec`` (``unix:``, loopback ``tcp:`` or ``serial:``)."""

    def __init__(self, gpu: Any, listen_spec: str | None) -> None:
        self.gpu = gpu
        self.listener: transport.Listener | None = None
        self._serial_spec: str | None = None
        if listen_spec is None:
            self.address = "(no listener)"  # connections come through adopt()
        elif transport.parse_spec(listen_spec).kind == "serial":
            self._serial_spec = listen_spec
            self.address = listen_spec
        else:
            self.listener = transport.listen(listen_spec)
            self.address = str(self.listener.spec)
        self.session: _Session | None = None
        self._mem: Any = None
        self._readers: dict[int, Callable[[], None]] = {}
        self._lazy_readers: set[int] = set()
        self._cp_observers: list[Callable[[], None]] = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._epoll = select.epoll()
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._listen_fd = -1
        self._client_fd: int | None = None
        if self.listener is not None:
            self._listen_fd = self.listener.fileno()
            self._epoll.register(self._listen_fd, select.EPOLLIN)
        self._running = False
        self._stop_requested = False
        self._closed = False
        self._irq_seq = 0
        self._irq_sent = (False, 0, 0)
        self._irq_now = self._read_irq_state()
        gpu.on_irq = self._on_irq
        self.counters = dict(
            connections=0,
            refused=0,
            messages=0,
            errors=0,
            irqs_sent=0,
            dma_requests=0,
            dma_bytes=0,
            batches=0,
            serial_retries=0,
        )
        self._stepped = bool(gpu.clock.stepped)
        self._next_wait_poll = 0.0
        self._cp_waiting = gpu.wait_pending()
        self._dma_failure: str | None = None  # what the last failed in-band DMA said
        self._serial_retry_at = 0.0
        self._serial_delay = SERIAL_RETRY_S[0]
        self._serial_lost = False
        if self._serial_spec:
            # a port that cannot be opened at start is a usage error (SpecError), not a retry
            try:
                conn = transport.open_serial(self._serial_spec)
            except transport.SpecError:
                self.close()
                raise
            self._start_session(conn)

    # --- public API ------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Run the event loop until :meth:`stop` (a stop requested earlier, e.g. by a signal
        that arrived before the loop started, ends it at once)."""
        self._running = not self._stop_requested
        try:
            while self._running:
                self.run_once()
        finally:
            self.close()

    def stop(self) -> None:
        """Ask the loop to exit (thread- and signal-safe)."""
        self._stop_requested = True
        self._running = False
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def adopt(self, conn: transport.Connection) -> None:
        """Serve an already connected stream (e.g. one end of :func:`transport.socketpair`);
        only before :meth:`serve_forever` or on the loop thread."""
        if self.session is not None:
            raise RuntimeError(f"the device already serves {self.session.conn.name}")
        self._start_session(conn)

    def add_reader(self, fileobj: Any, callback: Callable[[], None], *, lazy: bool = False) -> None:
        """Call ``callback()`` on the loop thread whenever ``fileobj`` is readable.

        A ``lazy`` reader (e.g. a listening socket) may wait while the loop blocks in an idle
        client's recv (up to ``IDLE_RECV_US``), so it keeps the fast single-client path."""
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        if fd not in self._readers:
            self._epoll.register(fd, select.EPOLLIN)
        self._readers[fd] = callback
        if lazy:
            self._lazy_readers.add(fd)
        else:
            self._lazy_readers.discard(fd)

    def add_cp_observer(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` on the loop thread after every command-processor batch (and
        STEP), e.g. for a debugger to notice a breakpoint or an error."""
        self._cp_observers.append(callback)

    def _observe_cp(self) -> None:
        for cb in self._cp_observers:
            try:
                cb()
            except Exception:
                log.exception("command-processor observer %r failed", cb)

    def watch_writable(self, fileobj: Any, on: bool) -> None:
        """Also call a reader's callback when ``fileobj`` is writable (``on``), e.g. for it to
        flush output its peer did not take; the callback must not assume there is input."""
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        if fd in self._readers:
            self._epoll.modify(fd, select.EPOLLIN | (select.EPOLLOUT if on else 0))

    def remove_reader(self, fileobj: Any) -> None:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        if self._readers.pop(fd, None) is not None:
            self._epoll.unregister(fd)
        self._lazy_readers.discard(fd)

    def _eager_readers(self) -> bool:
        return len(self._readers) > len(self._lazy_readers)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.session:
            self._end_session("device shutting down")
        if self.listener:
            self.listener.close()
        self._epoll.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def statistics(self) -> dict:
        return dict(self.counters, address=self.address, stepped=self._stepped)

    # --- the loop --------------------------------------------------------------------------

    def run_once(self) -> None:
        """One loop iteration: handle what is buffered, run the CP, wait for input."""
        s = self.session
        if s is not None and (s.queued or s.end - s.start >= p.HEADER_SIZE):
            self._drain(s)
        timeout = None if self._stepped else self._cp_work()
        s = self.session
        if (
            timeout is None
            and s is not None
            and s.direct
            and not s.out
            and not self._eager_readers()
        ):
            # Idle with one client: block in its recv (bounded by SO_RCVTIMEO) rather than in
            # epoll, one system call less per request; look at the rest when it times out.
            if self._serve_direct(s):
                return
            timeout = 0.0
        polling = self._client_fd is None and (self.session is not None or self._serial_spec)
        if polling:
            if self.session is None:  # a serial port to reopen, when its back-off has passed
                poll = max(0.0, self._serial_retry_at - time.monotonic())
            else:
                poll = POLL_S  # no descriptor to wait on (loop://)
            if timeout is None or timeout > poll:
                timeout = poll
        try:
            events = self._epoll.poll(-1 if timeout is None else timeout)
        except InterruptedError:
            return
        for fd, mask in events:
            if fd == self._client_fd:
                s = self.session
                if s is not None and mask & select.EPOLLOUT:
                    try:
                        self._flush_out(s)
                    except _Disconnected as exc:
                        self._end_session(str(exc))
                if self.session is s and s is not None and mask & ~select.EPOLLOUT:
                    self._receive(s, block=True)
            elif fd == self._listen_fd:
                self._accept()
            elif fd == self._wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            else:
                cb = self._readers.get(fd)
                if cb is not None:
                    try:
                        cb()
                    except Exception:
                        log.exception("reader callback for fd %d failed", fd)
                    self._flush_irq()  # a debugger's register write or release may raise one
        if polling:
            s = self.session
            if s is not None:
                if self._client_fd is None:
                    self._receive(s, block=False)
            elif self._serial_spec and not self._closed and self._running:
                self._reopen_serial()

    def _serve_direct(self, s: _Session) -> bool:
        """Wait in the client's recv and handle what comes, staying in a tight loop while
        single-register reads and writes arrive one at a time and the CP has nothing to do.
        False if nothing came before SO_RCVTIMEO."""
        if s.end != 0 or s.conn.accept_fds or not s.handshaken:
            return self._receive(s, block=True)
        recv, send, buf, view = s.recv, s.conn.sock.send, s.buf, s.view
        gpu = self.gpu
        mmio_read, mmio_write, has_work = gpu.mmio_read, gpu.mmio_write, gpu.has_work
        unpack = _REG1_REQ.unpack_from
        counters = self.counters
        served = False
        while True:
            try:
                n = recv(view)
            except (BlockingIOError, InterruptedError):
                return served
            except OSError as exc:
                self._end_session(f"read failed: {exc}")
                return served
            if n != 24:
                break
            msg_id, command, size, flags, _, offset, arg = unpack(buf)
            if size != 24 or offset & 3 or offset >= _MMIO_SIZE:
                break
            if command == _REG_READ and not flags and arg == 1:
                value = mmio_read(offset)
                out = _REG1_REPLY.pack(msg_id, _REG_READ, 28, _REPLY, 0, offset, 1, value)
            elif command == _REG_WRITE and flags in (0, _NO_REPLY):
                mmio_write(offset, arg)
                out = b"" if flags else _HDR.pack(msg_id, _REG_WRITE, 16, _REPLY, 0)
            else:
                break
            counters["messages"] += 1
            if self._irq_now != self._irq_sent:
                out = self._irq_frame() + out
            if out:
                try:
                    sent = send(out, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError as exc:
                    self._end_session(f"send failed: {exc}")
                    return True
                if sent != len(out):  # the client is not reading: buffer, wait for EPOLLOUT
                    try:
                        self._queue_out(s, memoryview(out)[sent:])
                    except _Disconnected as exc:
                        self._end_session(str(exc))
                    return True
            served = True
            if has_work() or self._cp_waiting or self._eager_readers() or not self._running:
                return True
        if not n:
            self._end_session("end of stream")
            return served
        s.end = n
        self._drain(s)
        return True

    def _cp_work(self) -> float | None:
        """Run a CP batch if there is work; return how long the loop may sleep (None: until
        input arrives)."""
        if self._stepped:
            return None
        gpu = self.gpu
        if not gpu.has_work():
            # only a CP batch can start a WAIT_MEM, so the state is checked after batches
            if not self._cp_waiting:
                return None
            # a WAIT_MEM polls guest memory, which the client writes without telling us
            left = self._next_wait_poll - time.monotonic()
            if left > 0:
                return left
            self._next_wait_poll = time.monotonic() + WAIT_POLL_S
        try:
            gpu.run(BATCH)
        except Exception:
            log.exception("the command processor raised; the device stays up")
        # a WAIT_MEM held by a debugger (HALTED) still waits: it is polled again once released
        self._cp_waiting = gpu.wait_pending()
        self.counters["batches"] += 1
        if self._cp_observers:
            self._observe_cp()
        self._flush_irq()
        s = self.session
        if s is not None and not s.alive:
            self._end_session("connection lost during DMA")
        return 0.0

    # --- connections -----------------------------------------------------------------------

    def _accept(self) -> None:
        conn = self.listener.accept()
        if conn is None:
            return
        s = self.session
        if s is not None and s.conn.fileno() is not None:
            # the client may have hung up just before: take what it sent, see the end of
            # stream; a few reads only, a client that keeps sending must not delay the answer
            for _ in range(ACCEPT_DRAIN_READS):
                if self.session is not s or not self._receive(s, block=False):
                    break
        if self.session is not None:
            self._refuse(conn)
            return
        self._start_session(conn)

    def _refuse(self, conn: transport.Connection) -> None:
        """Answer a connection EBUSY and close it: the device serves one client at a time."""
        self.counters["refused"] += 1
        text = (
            f"the device is busy serving {self.session.conn.name}; it serves one client at a time"
        )
        log.warning("refusing connection from %s: %s", conn.name, text)
        with contextlib.suppress(OSError):
            conn.send_nowait(
                p.error_frame(_header(0, _VERSION, 16, 0, 0), p.ProtoError.EBUSY, text)
            )
        conn.close()

    def _reopen_serial(self) -> None:
        """Reopen the serial port after its connection ended, backing off from
        SERIAL_RETRY_S[0] doubling to SERIAL_RETRY_S[1] while it stays away (one log line
        when it goes, one when it comes back)."""
        now = time.monotonic()
        if now < self._serial_retry_at:
            return
        try:
            conn = transport.open_serial(self._serial_spec)
        except transport.SpecError as exc:
            if not self._serial_lost:
                self._serial_lost = True
                first, cap = SERIAL_RETRY_S
                log.warning(
                    "%s; retrying every %g s doubling up to %g s until it comes back",
                    exc,
                    first,
                    cap,
                )
            self.counters["serial_retries"] += 1
            self._serial_retry_at = now + self._serial_delay
            self._serial_delay = min(self._serial_delay * 2, SERIAL_RETRY_S[1])
            return
        if self._serial_lost:
            log.warning("serial port %s is back", self._serial_spec)
        self._serial_lost = False
        self._serial_delay = SERIAL_RETRY_S[0]
        self._serial_retry_at = 0.0
        self._start_session(conn)

    def _start_session(self, conn: transport.Connection) -> None:
        self.counters["connections"] += 1
        log.info("client connected: %s", conn.name)
        self.session = _Session(conn)
        if isinstance(conn, transport.SocketConnection):
            conn.sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, IDLE_RECV_US)
            )
            self.session.direct = True
            self.session.recv = conn.sock.recv_into
        fd = conn.fileno()
        if fd is not None:
            self._epoll.register(fd, select.EPOLLIN)
            self._client_fd = fd

    def _end_session(self, why: str) -> None:
        s = self.session
        if s is None:
            return
        self.session = None
        s.alive = False
        log.info("client %s disconnected: %s", s.conn.name, why)
        if self._client_fd is not None:
            self._epoll.unregister(self._client_fd)
            self._client_fd = None
        s.conn.close()
        self._detach_memory(f"client {s.conn.name} went away")

    def _detach_memory(self, why: str) -> None:
        mem = self._mem
        if mem is None:
            return
        self._mem = None
        self.gpu.detach_memory()
        if self.session is not None:
            self.session.conn.accept_fds = self.session.conn.supports_fds
        try:
            mem.close()
        except Exception:
            log.exception("closing guest memory failed")
        log.info("guest memory unmapped: %s", why)

    # --- reading frames --------------------------------------------------------------------

    def _receive(self, s: _Session, *, block: bool) -> bool:
        """Read what the client sent and handle every complete frame; False if nothing came."""
        try:
            if not self._fill(s, block=block):
                return False
        except _Disconnected as exc:
            self._end_session(str(exc))
            return False
        self._drain(s)
        return True

    def _fill(self, s: _Session, *, block: bool) -> bool:
        if s.end == len(s.buf):
            self._make_room(s, self._room_wanted(s))
        try:
            n = s.conn.recv_into(s.view[s.end :], block=block)
        except TimeoutError:
            return False
        except OSError as exc:
            raise _Disconnected(f"read failed: {exc}") from None
        if n is None:
            return False
        if n == 0:
            pending = s.end - s.start
            if pending:
                if pending < p.HEADER_SIZE:
                    what = f"{pending} of {p.HEADER_SIZE} header bytes"
                else:
                    size = _HDR.unpack_from(s.buf, s.start)[2]
                    what = f"{pending} of {size} bytes"
                log.warning("client %s closed the connection mid-frame (%s)", s.conn.name, what)
                raise _Disconnected(f"closed mid-frame ({what})")
            raise _Disconnected("end of stream")
        s.end += n
        return True

    @staticmethod
    def _room_wanted(s: _Session) -> int:
        """Bytes of room to make when the buffer is full: the rest of the frame whose header
        is buffered (its size is checked against MAX_MESSAGE), so one recv can take it
        whole, else as much again as the buffer holds (doubling, up to MAX_MESSAGE)."""
        if s.start:
            return 1  # compacting frees the bytes of the frames already handled
        avail = s.end
        if avail >= p.HEADER_SIZE:
            size = _HDR.unpack_from(s.buf, 0)[2]
            if avail < size <= p.MAX_MESSAGE:
                return size - avail
        return max(1, min(len(s.buf), p.MAX_MESSAGE - avail))

    def _make_room(self, s: _Session, need: int) -> None:
        """Make ``need`` more bytes of room after ``s.end`` (compacting, then growing)."""
        if s.start:
            pending = s.end - s.start
            s.buf[:pending] = s.buf[s.start : s.end]
            s.start, s.end = 0, pending
        if len(s.buf) - s.end < need:
            s.view.release()
            s.buf.extend(bytes(need - (len(s.buf) - s.end)))
            s.view = memoryview(s.buf)

    def _next_frame(self, s: _Session):
        """The next complete frame (queued ones first), or None. Raises _Disconnected after a
        fatal framing error."""
        if s.queued:
            return s.queued.popleft()
        avail = s.end - s.start
        if avail < p.HEADER_SIZE:
            return None
        msg_id, command, size, flags, error = _HDR.unpack_from(s.buf, s.start)
        if size < p.HEADER_SIZE or size > p.MAX_MESSAGE:
            try:
                p.decode_header(s.buf[s.start : s.start + p.HEADER_SIZE])
            except p.FrameError as exc:
                self._frame_error(
                    s, _header(msg_id, command, size, flags, error), exc.code, str(exc)
                )
            s.start = s.end = 0
            if isinstance(s.conn, transport.SerialConnection):
                s.conn.discard_input()
            raise _Disconnected("framing lost")
        if avail < size:
            if len(s.buf) - s.start < size:
                self._make_room(s, size - avail)
            return None
        payload = bytes(s.view[s.start + p.HEADER_SIZE : s.start + size])
        s.start += size
        if s.start == s.end:
            s.start = s.end = 0
        return msg_id, command, size, flags, error, payload

    def _drain(self, s: _Session) -> None:
        """Handle every complete frame of the session."""
        try:
            while s.alive and self.session is s:
                frame = self._next_frame(s)
                if frame is None:
                    break
                if s.conn.accept_fds and frame[1] != _MEM_MAP:
                    self._drop_stray_fds(s, frame[1])
                self._handle(s, *frame)
        except _Disconnected as exc:
            self._end_session(str(exc))
            return
        if not s.alive and self.session is s:
            self._end_session("connection lost")

    def _drop_stray_fds(self, s: _Session, command: int) -> None:
        """Close the descriptors that came with a frame other than MEM_MAP before handling it
        (MEM_MAP takes them all and closes what it does not map, success or not). A UNIX
        socket read stops after the data a descriptor came with, so while more bytes are
        buffered the newest ones may belong to the next frame: up to MAX_FDS wait for it."""
        keep = link.MAX_FDS if s.end > s.start else 0
        dropped = s.conn.drop_fds(keep)
        if dropped:
            log.warning(
                "client %s: closed %d descriptor(s) sent with %s, which takes none",
                s.conn.name,
                dropped,
                _command_name(command),
            )

    # --- sending ---------------------------------------------------------------------------

    def _send(self, s: _Session, data: bytes) -> None:
        """Send without blocking the loop: what the link does not take now waits in
        ``s.out`` (flushed on EPOLLOUT); past OUTPUT_CAP the client is disconnected."""
        if s.out:
            self._queue_out(s, data)
            return
        try:
            sent = s.conn.send_nowait(data)
        except OSError as exc:
            s.alive = False
            raise _Disconnected(f"send failed: {exc}") from None
        if sent != len(data):
            self._queue_out(s, memoryview(data)[sent:])

    def _queue_out(self, s: _Session, data) -> None:
        if not s.out and self._client_fd is not None and self.session is s:
            self._epoll.modify(self._client_fd, select.EPOLLIN | select.EPOLLOUT)
        s.out += data
        if len(s.out) > OUTPUT_CAP:
            s.alive = False
            log.warning(
                "client %s: disconnecting: it leaves its replies unread (%d bytes pending, "
                "over the cap of %d)",
                s.conn.name,
                len(s.out),
                OUTPUT_CAP,
            )
            raise _Disconnected(f"over {OUTPUT_CAP} bytes of replies unread")

    def _flush_out(self, s: _Session) -> None:
        """Send what is pending for the client, as much as it takes now."""
        try:
            sent = s.conn.send_nowait(s.out)
        except OSError as exc:
            s.alive = False
            raise _Disconnected(f"send failed: {exc}") from None
        del s.out[:sent]
        if not s.out and self._client_fd is not None and self.session is s:
            self._epoll.modify(self._client_fd, select.EPOLLIN)

    def _frame_error(self, s: _Session, hdr: p.Header, code: p.ProtoError, text: str) -> None:
        self.counters["errors"] += 1
        log.warning("client %s: %s: %s: %s", s.conn.name, hdr.describe(), code.name, text)
        if hdr.is_reply and hdr.is_error:
            return  # never answer an error with an error
        with contextlib.suppress(_Disconnected):  # s.alive is False: the session ends
            self._send(s, p.error_frame(hdr, code, text))

    # --- interrupts ------------------------------------------------------------------------

    def _read_irq_state(self) -> tuple[bool, int, int]:
        gpu = self.gpu
        return (
            bool(gpu.irq_level),
            gpu.debug_read(regs.IRQ_STATUS.offset),
            gpu.debug_read(regs.MMU_INT_STAT.offset),
        )

    def _on_irq(self, level: bool, irq_status: int, mmu_int_stat: int) -> None:
        self._irq_now = (bool(level), irq_status, mmu_int_stat)

    def _irq_frame(self) -> bytes:
        """The IRQ message to post if the interrupt state changed since the last one."""
        now = self._irq_now
        if now == self._irq_sent:
            return b""
        s = self.session
        if s is None or not s.handshaken:
            return b""
        self._irq_sent = now
        self._irq_seq = (self._irq_seq + 1) & 0xFFFFFFFF
        self.counters["irqs_sent"] += 1
        payload = p.IRQ_MSG_FAST.pack(int(now[0]), now[1], now[2], self._irq_seq)
        return p.encode(p.Command.IRQ, s.new_id(), payload, flags=p.MsgFlags.NO_REPLY)

    def _flush_irq(self) -> None:
        if self._irq_now != self._irq_sent and self.session is not None:
            frame = self._irq_frame()
            if frame:
                with contextlib.suppress(_Disconnected):
                    self._send(self.session, frame)

    # --- dispatch --------------------------------------------------------------------------

    def _handle(
        self, s: _Session, msg_id: int, command: int, size: int, flags: int, error: int, payload
    ) -> None:
        self.counters["messages"] += 1
        if not flags & _REPLY and s.handshaken:
            # the hot paths: one register read, one register write
            if command == _REG_READ and size == 24:
                offset, count = _REG_PAIR.unpack(payload)
                if count == 1 and not offset & 3 and offset < _MMIO_SIZE:
                    value = self.gpu.mmio_read(offset)
                    out = self._irq_frame() if self._irq_now != self._irq_sent else b""
                    self._send(
                        s,
                        out
                        + _REG1_REPLY.pack(
                            msg_id, _REG_READ, _REG1_REPLY_SIZE, _REPLY, 0, offset, 1, value
                        ),
                    )
                    return
            elif command == _REG_WRITE and size == 24:
                offset, value = _REG_PAIR.unpack(payload)
                if not offset & 3 and offset < _MMIO_SIZE:
                    self.gpu.mmio_write(offset, value)
                    out = self._irq_frame() if self._irq_now != self._irq_sent else b""
                    if not flags & _NO_REPLY:
                        out += _HDR.pack(msg_id, _REG_WRITE, 16, _REPLY, 0)
                    if out:
                        self._send(s, out)
                    return
        hdr = _header(msg_id, command, size, flags, error)
        try:
            reply = self._dispatch(s, hdr, payload)
        except _Disconnected:
            raise
        except _Reject as exc:
            if exc.guest:
                guest_log.warning("%s: %s", hdr.describe(), exc)
            self._frame_error(s, hdr, exc.code, str(exc))
            self._flush_irq()
            return
        except p.FrameError as exc:
            self._frame_error(s, hdr, exc.code, str(exc))
            return
        except Exception as exc:
            log.exception("internal error handling %s", hdr.describe())
            self._frame_error(
                s, hdr, p.ProtoError.EIO, f"internal error handling {hdr.describe()}: {exc!r}"
            )
            return
        out = self._irq_frame() if self._irq_now != self._irq_sent else b""
        if reply is not None and not hdr.no_reply:
            out += p.encode(hdr.command, hdr.msg_id, reply, flags=p.MsgFlags.REPLY)
        if out and s.alive:
            self._send(s, out)

    def _dispatch(self, s: _Session, hdr: p.Header, payload: bytes) -> bytes | None:
        """Handle one request; return the reply payload (None: no reply at all)."""
        if hdr.is_reply:
            raise _Reject(
                p.ProtoError.EPROTO,
                f"unexpected reply: no {_command_name(hdr.command)} request with id "
                f"{hdr.msg_id} is outstanding",
            )
        try:
            command = p.Command(hdr.command)
        except ValueError:
            raise _Reject(p.ProtoError.ENOSYS, f"unknown command {hdr.command}") from None
        if not s.handshaken and command is not p.Command.VERSION:
            raise _Reject(
                p.ProtoError.EPROTO,
                f"VERSION must be the first request on a connection, got {command.name}",
            )
        req = p.decode_payload(p.REQUEST_CODECS[command][0], command, payload)
        handler = self._handlers.get(command)
        if handler is None:
            raise _Reject(
                p.ProtoError.EPROTO,
                f"{command.name} is sent by the device, not to it",
            )
        return handler(self, s, hdr, req)

    # --- request handlers ------------------------------------------------------------------

    def _on_version(self, s: _Session, hdr: p.Header, req) -> bytes:
        if s.handshaken:
            # features are fixed for the connection (memory may be mapped in band under
            # them); libvfio-user likewise handles VERSION only while negotiating
            raise _Reject(
                p.ProtoError.EPROTO,
                "VERSION was already negotiated on this connection; reconnect to change it",
            )
        if req.major != p.PROTOCOL_MAJOR:
            raise _Reject(
                p.ProtoError.EPROTO,
                f"protocol version {req.major}.{req.minor} is not supported (the device speaks "
                f"{p.PROTOCOL_MAJOR}.{p.PROTOCOL_MINOR})",
            )
        mine = p.Features.IN_BAND_DMA | p.Features.STEPPED_CLOCK | p.Features.DEBUG
        if s.conn.supports_fds:
            mine |= p.Features.FD_PASSING
        s.features = p.Features(req.features) & mine
        s.handshaken = True
        self._irq_sent = (False, 0, 0)  # tell a new client the line state if it is up
        name = bytes(req.name).decode("utf-8", "replace")[:64]
        log.info(
            "client %s: %s speaks %d.%d, features %s",
            s.conn.name,
            name or "(unnamed)",
            req.major,
            req.minor,
            "|".join(f.name for f in p.Features if f in s.features) or "none",
        )
        return p.CODECS["VERSION_REPLY"].build(
            dict(
                major=p.PROTOCOL_MAJOR,
                minor=min(req.minor, p.PROTOCOL_MINOR),
                features=int(mine),
                gpu_id=regs.GPU_ID_VALUE,
                max_message=p.MAX_MESSAGE,
                name=NAME,
            )
        )

    @staticmethod
    def _check_regs(command: p.Command, offset: int, count: int) -> None:
        if count < 1 or count > p.MAX_REG_COUNT:
            raise _Reject(
                p.ProtoError.EINVAL,
                f"{command.name} count {count} is not in 1..{p.MAX_REG_COUNT}",
                guest=True,
            )
        if offset & 3:
            raise _Reject(
                p.ProtoError.EINVAL,
                f"{command.name} offset {offset:#x} is not 4-byte aligned",
                guest=True,
            )
        if offset + 4 * count > regs.MMIO_SIZE:
            raise _Reject(
                p.ProtoError.EINVAL,
                f"{command.name} of {count} register(s) at {offset:#x} runs past the MMIO "
                f"window ({regs.MMIO_SIZE:#x} bytes)",
                guest=True,
            )

    def _on_reg_read(self, s: _Session, hdr: p.Header, req) -> bytes:
        self._check_regs(p.Command.REG_READ, req.offset, req.count)
        read = self.gpu.mmio_read
        values = [read(req.offset + 4 * i) for i in range(req.count)]
        return _REG_PAIR.pack(req.offset, req.count) + _pack_u32s(values)

    def _on_debug_read(self, s: _Session, hdr: p.Header, req) -> bytes:
        self._check_regs(p.Command.DEBUG_READ, req.offset, req.count)
        read = self.gpu.debug_read
        values = [read(req.offset + 4 * i) for i in range(req.count)]
        return _REG_PAIR.pack(req.offset, req.count) + _pack_u32s(values)

    def _on_reg_write(self, s: _Session, hdr: p.Header, req) -> bytes:
        self._check_regs(p.Command.REG_WRITE, req.offset, 1)
        self.gpu.mmio_write(req.offset, req.value)
        return b""

    def _on_mem_map(self, s: _Session, hdr: p.Header, req) -> bytes:
        fds = s.conn.take_fds()
        try:
            if self._mem is not None:
                raise _Reject(
                    p.ProtoError.EBUSY, "guest memory is already attached; send MEM_UNMAP first"
                )
            if req.base != 0:
                raise _Reject(
                    p.ProtoError.EINVAL, f"MEM_MAP base {req.base:#x}: guest memory starts at 0"
                )
            limit = 1 << regs.PA_BITS
            if not 0 < req.size <= limit or req.size % regs.PAGE_SIZE:
                raise _Reject(
                    p.ProtoError.EINVAL,
                    f"MEM_MAP size {req.size:#x} must be a non-zero multiple of "
                    f"{regs.PAGE_SIZE:#x} up to {limit:#x}",
                )
            flags = p.MemMapFlags(req.flags)
            if flags == p.MemMapFlags.FD:
                if not fds:
                    raise _Reject(
                        p.ProtoError.EINVAL,
                        "MEM_MAP has the FD flag but no descriptor came with it"
                        + ("" if s.conn.supports_fds else f" ({s.conn.name} cannot pass one)"),
                    )
                try:
                    mem = MappedMemory.from_fd(fds[0], req.size)
                except (OSError, ValueError) as exc:
                    raise _Reject(
                        p.ProtoError.EINVAL, f"MEM_MAP cannot map the descriptor: {exc}"
                    ) from None
                how = "mapped from a descriptor"
            elif flags == p.MemMapFlags.IN_BAND:
                if not s.features & p.Features.IN_BAND_DMA:
                    raise _Reject(
                        p.ProtoError.EINVAL,
                        "MEM_MAP IN_BAND needs the IN_BAND_DMA feature in VERSION",
                    )
                mem = InBandMemory(req.size, self._dma_reader(s), self._dma_writer(s))
                how = "reached in band (DMA_READ/DMA_WRITE)"
            else:
                raise _Reject(
                    p.ProtoError.EINVAL,
                    f"MEM_MAP flags {req.flags:#x} must be exactly FD or IN_BAND",
                )
        finally:
            for fd in fds:
                os.close(fd)  # MappedMemory.from_fd maps it; the descriptor is not needed
        self.gpu.attach_memory(mem)
        self._mem = mem
        # no descriptor is expected while memory is attached: plain reads are cheaper
        s.conn.accept_fds = False
        log.info("guest memory attached: %#x bytes, %s", req.size, how)
        return b""

    def _on_mem_unmap(self, s: _Session, hdr: p.Header, req) -> bytes:
        if self._mem is None:
            raise _Reject(p.ProtoError.ENODEV, "MEM_UNMAP: no guest memory is attached")
        self._detach_memory("MEM_UNMAP")
        return b""

    def _on_reset(self, s: _Session, hdr: p.Header, req) -> bytes:
        self.gpu.reset()
        log.info("device reset by %s", s.conn.name)
        return b""

    def _on_step(self, s: _Session, hdr: p.Header, req) -> bytes:
        if not self._stepped:
            raise _Reject(
                p.ProtoError.EBUSY,
                "STEP needs the STEPPED clock mode (send CLOCK_MODE STEPPED first)",
            )
        executed, cp_state, clock_ns = self.gpu.step(req.max_packets, req.ticks_ns)
        if self._cp_observers:
            self._observe_cp()
        return p.STEP_REPLY_FAST.pack(
            executed, int(cp_state), clock_ns, int(bool(self.gpu.irq_level))
        )

    def _on_clock_mode(self, s: _Session, hdr: p.Header, req) -> bytes:
        try:
            mode = p.ClockMode(req.mode)
        except ValueError:
            raise _Reject(
                p.ProtoError.EINVAL, f"unknown clock mode {req.mode} (0 FREE, 1 STEPPED)"
            ) from None
        self._set_stepped(mode is p.ClockMode.STEPPED)
        log.info("clock mode %s", mode.name)
        return b""

    def _set_stepped(self, stepped: bool) -> None:
        self.gpu.set_stepped(stepped)
        self._stepped = stepped
        self._cp_waiting = self.gpu.wait_pending()

    def _memory_request(self, command: p.Command, space: int, size: int) -> None:
        if self._mem is None:
            raise _Reject(p.ProtoError.ENODEV, f"{command.name}: no guest memory is attached")
        if size > p.MAX_DMA:
            raise _Reject(
                p.ProtoError.EINVAL, f"{command.name} size {size} exceeds {p.MAX_DMA} bytes"
            )
        if space != p.SPACE_PHYS and not 0 <= space < regs.AS_COUNT:
            raise _Reject(
                p.ProtoError.EINVAL,
                f"{command.name} space {space} is neither an AS (0..{regs.AS_COUNT - 1}) nor "
                f"SPACE_PHYS",
            )

    def _debug_access(self, what: str, access: Callable[[], Any]) -> Any:
        """Run a debugger memory access: a fault is EFAULT, but a DMA request the client
        failed (or left unanswered) is EIO, as documented, whatever fault it became."""
        self._dma_failure = None
        try:
            return access()
        except Exception as exc:
            failure, self._dma_failure = self._dma_failure, None
            if failure is not None:
                raise _Reject(p.ProtoError.EIO, f"{what}: {failure}") from None
            raise _Reject(p.ProtoError.EFAULT, f"{what}: {exc}") from None

    def _on_mem_read(self, s: _Session, hdr: p.Header, req) -> bytes:
        self._memory_request(p.Command.MEM_READ, req.space, req.size)
        data = self._debug_access(
            f"MEM_READ {req.addr:#x}+{req.size:#x}",
            lambda: bytes(self.gpu.mem_read(req.space, req.addr, req.size)),
        )
        return p.DMA_REQ_FAST.pack(req.addr, len(data)) + data

    def _on_mem_write(self, s: _Session, hdr: p.Header, req) -> bytes:
        self._memory_request(p.Command.MEM_WRITE, req.space, req.size)
        self._debug_access(
            f"MEM_WRITE {req.addr:#x}+{req.size:#x}",
            lambda: self.gpu.mem_write(req.space, req.addr, bytes(req.data)),
        )
        return b""

    def _on_stats(self, s: _Session, hdr: p.Header, req) -> bytes:
        data = dict(self.gpu.stats())
        data["server"] = self.statistics()
        import json  # only for this rare request: not on the device's start

        return json.dumps(data, default=str).encode()

    def _on_run_state(self, s: _Session, hdr: p.Header, req) -> bytes:
        try:
            run = p.RunRequest(req.run)
        except ValueError:
            raise _Reject(
                p.ProtoError.EINVAL,
                f"unknown run request {req.run} (0 QUERY, 1 STOP, 2 CONT, 3 POWEROFF)",
            ) from None
        if run is p.RunRequest.STOP:
            self.gpu.pause()
            log.info("machine stopped by %s: the command processor holds", s.conn.name)
        elif run is p.RunRequest.CONT:
            self.gpu.unpause()
            log.info("machine continued by %s", s.conn.name)
        elif run is p.RunRequest.POWEROFF:
            # power-off never waits for a debugger: what is queued runs to its end
            held = self.gpu.cp.halted
            self.gpu.unpause()
            self.gpu.resume()
            if held:
                log.info("machine powering off: the command processor's hold ends")
        return p.CODECS["RUN_STATE_REPLY"].build(
            dict(paused=int(self.gpu.paused), halted=int(self.gpu.cp.halted))
        )

    _handlers: dict[p.Command, Callable] = {
        p.Command.VERSION: _on_version,
        p.Command.REG_READ: _on_reg_read,
        p.Command.REG_WRITE: _on_reg_write,
        p.Command.MEM_MAP: _on_mem_map,
        p.Command.MEM_UNMAP: _on_mem_unmap,
        p.Command.RESET: _on_reset,
        p.Command.STEP: _on_step,
        p.Command.CLOCK_MODE: _on_clock_mode,
        p.Command.DEBUG_READ: _on_debug_read,
        p.Command.MEM_READ: _on_mem_read,
        p.Command.MEM_WRITE: _on_mem_write,
        p.Command.STATS: _on_stats,
        p.Command.RUN_STATE: _on_run_state,
    }

    # --- in-band DMA -----------------------------------------------------------------------

    def _dma_reader(self, s: _Session) -> Callable[[int, int], bytes]:
        def read(addr: int, size: int) -> bytes:
            out = bytearray()
            while len(out) < size:
                chunk = min(size - len(out), p.MAX_DMA)
                a = addr + len(out)
                reply = self._dma(s, p.Command.DMA_READ, p.DMA_REQ_FAST.pack(a, chunk), a, chunk)
                got_addr, got_size = p.DMA_REQ_FAST.unpack_from(reply)
                data = reply[p.DMA_REQ_FAST.size :]
                if got_addr != a or got_size != chunk or len(data) != chunk:
                    raise BusError(
                        a,
                        chunk,
                        f"DMA_READ reply for {a:#x}+{chunk:#x} carries {got_addr:#x}+"
                        f"{got_size:#x} ({len(data)} bytes)",
                    )
                out += data
            return bytes(out)

        return read

    def _dma_writer(self, s: _Session) -> Callable[[int, bytes], None]:
        def write(addr: int, data: bytes) -> None:
            mv = memoryview(data)
            for done in range(0, len(mv), p.MAX_DMA):
                chunk = mv[done : done + p.MAX_DMA]
                a = addr + done
                payload = p.DMA_REQ_FAST.pack(a, len(chunk)) + bytes(chunk)
                self._dma(s, p.Command.DMA_WRITE, payload, a, len(chunk))

        return write

    def _dma(self, s: _Session, command: p.Command, payload: bytes, addr: int, size: int) -> bytes:
        """Send a DMA request to the client and wait for its reply; BusError on failure.

        Requests that arrive meanwhile are queued on the session, in order."""
        what = f"{command.name} {addr:#x}+{size:#x}"
        mem = self._mem
        if mem is not None and addr + size > mem.size:
            raise BusError(addr, size, f"{what} is outside guest memory ({mem.size:#x} bytes)")
        if not s.alive or self.session is not s:
            raise BusError(addr, size, f"{what}: the client is gone")
        msg_id = s.new_id()
        self.counters["dma_requests"] += 1
        self.counters["dma_bytes"] += size
        try:
            self._send(s, p.encode(command, msg_id, payload))
            deadline = time.monotonic() + DMA_TIMEOUT_S
            while True:
                frame = self._read_frame_for_dma(s, deadline, what)
                r_id, r_cmd, r_size, r_flags, r_err, r_payload = frame
                if r_flags & _REPLY and r_id == msg_id and r_cmd == command:
                    if r_flags & _ERROR:
                        text = r_payload.decode("utf-8", "replace")
                        failure = f"{what} failed on the client: {_errno_name(r_err)} {text}"
                        self._dma_failure = failure
                        raise BusError(addr, size, failure)
                    return r_payload
                if r_flags & _REPLY:
                    hdr = _header(r_id, r_cmd, r_size, r_flags, r_err)
                    self._frame_error(
                        s,
                        hdr,
                        p.ProtoError.EPROTO,
                        f"unexpected reply: no {_command_name(r_cmd)} request with id {r_id} "
                        "is outstanding",
                    )
                    continue
                s.queued.append(frame)
        except _Disconnected as exc:
            s.alive = False
            self._dma_failure = f"{what}: the client is gone ({exc})"
            raise BusError(addr, size, self._dma_failure) from None
        except BusError as exc:
            self._dma_failure = str(exc)  # no reply within DMA_TIMEOUT_S
            raise

    def _read_frame_for_dma(self, s: _Session, deadline: float, what: str):
        """The next frame straight from the connection (not from the queue)."""
        while True:
            avail = s.end - s.start
            if avail >= p.HEADER_SIZE:
                size = _HDR.unpack_from(s.buf, s.start)[2]
                if p.HEADER_SIZE <= size <= p.MAX_MESSAGE and avail >= size:
                    payload = bytes(s.view[s.start + p.HEADER_SIZE : s.start + size])
                    frame = (*_HDR.unpack_from(s.buf, s.start), payload)
                    s.start += size
                    if s.start == s.end:
                        s.start = s.end = 0
                    return frame
                if not p.HEADER_SIZE <= size <= p.MAX_MESSAGE:
                    saved, s.queued = s.queued, deque()
                    try:
                        self._next_frame(s)  # replies EMSGSIZE and raises _Disconnected
                    finally:
                        s.queued = saved
            left = deadline - time.monotonic()
            if left <= 0:
                raise BusError(0, 0, f"{what}: no reply from the client within {DMA_TIMEOUT_S:g} s")
            fd = s.conn.fileno()
            if fd is not None:
                # a new connection is refused (EBUSY) at once; nothing else is served here:
                # the gdb stub and other requests may reach guest memory through this very wait
                watch = [fd] if self._listen_fd < 0 else [fd, self._listen_fd]
                ready, writable, _ = select.select(watch, [fd] if s.out else (), (), left)
                if writable:
                    self._flush_out(s)  # the DMA request itself may be waiting there
                if self._listen_fd in ready:
                    conn = self.listener.accept()
                    if conn is not None:
                        self._refuse(conn)
                if fd not in ready:
                    continue
            self._fill(s, block=fd is not None)


def _errno_name(code: int) -> str:
    try:
        return f"{p.ProtoError(code).name} ({code})"
    except ValueError:
        return f"errno {code}"


def _pack_u32s(values: list[int]) -> bytes:
    return struct.pack(f"<{len(values)}I", *values)


__all__ = ["DeviceServer"]
