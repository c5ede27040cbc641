"""DOC: the byte-stream link between a machine and the device model (client side).

A transport spec names one end of the link, the same way on both sides:

==========================  ==========================================================
``unix:PATH``               a UNIX stream socket; the only transport that passes file
                            descriptors (SCM_RIGHTS), so guest memory can be shared
``tcp:HOST:PORT``           TCP (``tcp:[::1]:PORT`` for IPv6); the device listens on
                            loopback only, see :mod:`gemu.device.transport`
``serial:PORT-or-URL``      a serial line through pyserial: a device path (``/dev/pts/3``,
                            ``/dev/ttyUSB0``) or a pyserial URL (``socket://HOST:PORT``,
                            ``loop://``); an optional ``,baud=N`` suffix sets the rate
==========================  ==========================================================

:func:`connect` returns a :class:`Connection`: ``sendall``, ``send_nowait`` (what the link
takes without waiting), ``send_fds``, ``recv_into`` (blocking or not), ``recv_exact``,
``take_fds`` / ``drop_fds`` (descriptors that came with the data), ``fileno`` (for
``select``) and ``close``::

    from gemu.device.abi import link
    conn = link.connect("unix:/tmp/gpu.sock")
    conn.sendall(frame)

This module is part of the published interface because a driver needs it to reach the
device; the listening side lives with the device model. A bad spec raises
:class:`SpecError` naming the spec and what is wrong with it.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import socket
from typing import NamedTuple

MAX_FDS = 4  # descriptors accepted with one message
_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
UNIX_PATH_MAX = 107


class SpecError(ValueError):
    """A transport spec that cannot be used; the message names the spec."""


class TransportError(OSError):
    """The transport cannot do what was asked (e.g. pass descriptors over TCP)."""


class Spec(NamedTuple):
    """A parsed transport spec."""

    kind: str  # "unix", "tcp" or "serial"
    path: str = ""  # unix socket path, or serial port/URL
    host: str = ""
    port: int = 0
    baud: int = 115200

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"tcp:{host}:{self.port}"
        return f"serial:{self.path}"


def parse_spec(text: str) -> Spec:
    """Parse ``unix:PATH``, ``tcp:HOST:PORT`` or ``serial:PORT-or-URL``."""
    if not isinstance(text, str) or ":" not in text:
        raise SpecError(
            f"transport spec {text!r} must look like unix:PATH, tcp:HOST:PORT or serial:PORT"
        )
    kind, _, rest = text.partition(":")
    if kind == "unix":
        if not rest:
            raise SpecError(f"transport spec {text!r}: the UNIX socket path is empty")
        if len(os.fsencode(rest)) > UNIX_PATH_MAX:
            raise SpecError(
                f"transport spec {text!r}: the UNIX socket path is longer than "
                f"{UNIX_PATH_MAX} bytes"
            )
        return Spec("unix", path=rest)
    if kind == "tcp":
        if rest.startswith("["):
            host, sep, port_text = rest[1:].partition("]:")
            if not sep:
                raise SpecError(f"transport spec {text!r}: expected tcp:[IPV6]:PORT")
        else:
            host, sep, port_text = rest.rpartition(":")
            if not sep:
                raise SpecError(f"transport spec {text!r}: expected tcp:HOST:PORT")
        if not host:
            raise SpecError(f"transport spec {text!r}: the host is empty")
        try:
            port = int(port_text, 10)
        except ValueError:
            raise SpecError(
                f"transport spec {text!r}: port {port_text!r} is not a number"
            ) from None
        if not 0 <= port <= 65535:
            raise SpecError(f"transport spec {text!r}: port {port} is not in 0..65535")
        return Spec("tcp", host=host, port=port)
    if kind == "serial":
        port, baud = rest, 115200
        if ",baud=" in rest:
            port, _, baud_text = rest.rpartition(",baud=")
            try:
                baud = int(baud_text, 10)
            except ValueError:
                raise SpecError(
                    f"transport spec {text!r}: baud rate {baud_text!r} is not a number"
                ) from None
        if not port:
            raise SpecError(f"transport spec {text!r}: the serial port or URL is empty")
        return Spec("serial", path=port, baud=baud)
    raise SpecError(
        f"transport spec {text!r}: unknown transport {kind!r} (use unix:, tcp: or serial:)"
    )


# --- connections -------------------------------------------------------------------------


class Connection:
    """One end of an established byte stream."""

    name = "connection"
    supports_fds = False
    accept_fds = False  # collect descriptors that come with the data (see take_fds)

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError

    def send_nowait(self, data: bytes | bytearray | memoryview) -> int:
        """Send what the link takes without waiting; how many bytes (0 if it is full).
        Links that cannot tell (no descriptor, e.g. ``loop://``) send it all."""
        self.sendall(data)
        return len(data)

    def send_fds(self, data: bytes, fds: list[int]) -> None:
        raise TransportError(
            errno.EOPNOTSUPP, f"{self.name} cannot pass file descriptors (UNIX sockets only)"
        )

    def recv_into(self, view: memoryview, *, block: bool = True) -> int | None:
        """Read up to ``len(view)`` bytes; 0 means end of stream, None "would block"."""
        raise NotImplementedError

    def recv_exact(self, n: int) -> bytes:
        """Exactly ``n`` bytes; ConnectionError if the stream ends first."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.recv_into(view[got:])
            if not k:
                raise ConnectionError(f"{self.name}: stream ended after {got} of {n} bytes")
            got += k
        return bytes(buf)

    def take_fds(self) -> list[int]:
        """Descriptors received so far (the caller owns them now)."""
        return []

    def drop_fds(self, keep: int = 0) -> int:
        """Close the descriptors received so far but the newest ``keep``; how many closed."""
        return 0

    def fileno(self) -> int | None:
        return None

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class SocketConnection(Connection):
    """A connected stream socket. While ``accept_fds`` is set (UNIX only) every read collects
    SCM_RIGHTS descriptors, which :meth:`take_fds` hands out; otherwise the kernel drops
    descriptors that come with the data, and reads are a little cheaper."""

    def __init__(self, sock: socket.socket, name: str, *, accept_fds: bool = False) -> None:
        self.sock = sock
        self.name = name
        self.supports_fds = sock.family == socket.AF_UNIX
        self.accept_fds = accept_fds and self.supports_fds
        self._fds: list[int] = []
        self._closed = False
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        self.sock.sendall(data)

    def send_nowait(self, data: bytes | bytearray | memoryview) -> int:
        try:
            return self.sock.send(data, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return 0

    def send_fds(self, data: bytes, fds: list[int]) -> None:
        if not self.supports_fds:
            super().send_fds(data, fds)
        sent = socket.send_fds(self.sock, [data], fds)
        if sent < len(data):
            self.sock.sendall(data[sent:])

    def recv_into(self, view: memoryview, *, block: bool = True) -> int | None:
        flags = 0 if block else socket.MSG_DONTWAIT
        try:
            if not self.accept_fds:
                return self.sock.recv_into(view, len(view), flags)
            n, ancdata, _msg_flags, _addr = self.sock.recvmsg_into([view], _CMSG_SPACE, flags)
        except (BlockingIOError, InterruptedError):
            return None
        except (ConnectionResetError, TimeoutError):
            return 0
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
                self._fds.extend(fds)
        return n

    def take_fds(self) -> list[int]:
        fds, self._fds = self._fds, []
        return fds

    def drop_fds(self, keep: int = 0) -> int:
        fds = self._fds
        if len(fds) <= keep:
            return 0
        stale = fds[: len(fds) - keep]
        self._fds = fds[len(fds) - keep :]
        for fd in stale:
            os.close(fd)
        return len(stale)

    def fileno(self) -> int | None:
        return None if self._closed else self.sock.fileno()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fd in self.take_fds():
            os.close(fd)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class SerialConnection(Connection):
    """A serial line opened through pyserial (a tty, a pty, or a pyserial URL).

    ``timeout`` bounds a blocking read: a read that sees no byte for that long raises
    ``TimeoutError`` (a serial line has no end-of-stream to tell that the peer died)."""

    def __init__(self, port, name: str, *, timeout: float | None = None) -> None:
        self.port = port
        self.name = name
        self.timeout = timeout
        self._closed = False

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        import serial

        try:
            self.port.write(bytes(data))
        except serial.SerialException as exc:
            raise ConnectionError(f"{self.name}: {exc}") from None

    def send_nowait(self, data: bytes | bytearray | memoryview) -> int:
        fd = self.fileno()
        if fd is None or os.get_blocking(fd):
            return super().send_nowait(data)  # e.g. a pyserial URL: no descriptor to poll
        try:
            return os.write(fd, data)
        except (BlockingIOError, InterruptedError):
            return 0

    def recv_into(self, view: memoryview, *, block: bool = True) -> int | None:
        import serial

        try:
            waiting = self.port.in_waiting
            if not waiting:
                if not block:
                    return None
                self.port.timeout = self.timeout
                first = self.port.read(1)
                if not first:
                    raise TimeoutError(f"{self.name}: no data within {self.timeout} s")
                view[0:1] = first
                waiting = self.port.in_waiting
                n = 1
            else:
                n = 0
            room = min(waiting, len(view) - n)
            if room > 0:
                self.port.timeout = 0
                data = self.port.read(room)
                view[n : n + len(data)] = data
                n += len(data)
            return n
        except serial.SerialException:
            return 0  # the port went away: treat as the end of the stream
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EBADF, errno.ENXIO):
                return 0
            raise

    def discard_input(self) -> None:
        """Drop bytes already received (to resynchronise after lost framing)."""
        with contextlib.suppress(Exception):
            self.port.reset_input_buffer()

    def fileno(self) -> int | None:
        if self._closed:
            return None
        try:
            return self.port.fileno()
        except (AttributeError, OSError, NotImplementedError):
            return None  # e.g. loop://: the caller polls

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(Exception):
                self.port.close()


def open_serial(text: str, *, timeout: float | None = None) -> SerialConnection:
    """Open ``serial:PORT-or-URL`` through pyserial."""
    import serial

    spec = parse_spec(text)
    if spec.kind != "serial":
        raise SpecError(f"transport spec {text!r} is not a serial: spec")
    try:
        port = serial.serial_for_url(spec.path, baudrate=spec.baud, timeout=timeout)
    except (serial.SerialException, ValueError, OSError) as exc:
        raise SpecError(f"transport spec {text!r}: cannot open the serial port: {exc}") from None
    return SerialConnection(port, str(spec), timeout=timeout)


def connect(text: str, *, timeout: float | None = 10.0) -> Connection:
    """Connect to a ``unix:``, ``tcp:`` or ``serial:`` spec.

    ``timeout`` bounds connecting (sockets) or each read that waits for data (serial)."""
    spec = parse_spec(text)
    if spec.kind == "serial":
        return open_serial(text, timeout=timeout)
    if spec.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        addr: object = spec.path
    else:
        try:
            infos = socket.getaddrinfo(spec.host, spec.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise SpecError(f"transport spec {text!r}: cannot resolve {spec.host}: {exc}") from None
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(addr)
    except OSError as exc:
        sock.close()
        raise ConnectionError(f"cannot connect to {text}: {exc.strerror or exc}") from None
    sock.settimeout(None)
    return SocketConnection(sock, str(spec))


def socketpair() -> tuple[SocketConnection, SocketConnection]:
    """A connected UNIX socket pair (the device end accepts descriptors), for in-process use."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return (
        SocketConnection(a, "socketpair:client"),
        SocketConnection(b, "socketpair:device", accept_fds=True),
    )
