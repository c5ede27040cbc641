"""DOC: console backends of ``gemu boot``: stdio, a pty, a UNIX or TCP socket, pyserial.

A :class:`Console` reads command lines and writes output lines. Two line disciplines:

- *cooked* (``stdio``): the terminal (or the pipe) delivers whole lines and echoes them
  itself; Ctrl-C is SIGINT, Ctrl-D an end of file;
- *raw* (``pty``, ``unix:``, ``tcp:``, ``serial:``): bytes arrive one by one, as on a serial
  line, and the guest echoes what it receives, handles Backspace/DEL, Ctrl-U (kill line),
  Ctrl-C (interrupt) and Ctrl-D on an empty line (end of input); output lines end in CRLF.

Specs, as QEMU's ``-serial``::

    stdio                      the emulator's own stdin/stdout (default)
    pty                        a new pseudo-terminal; prints "char device redirected to
                               /dev/pts/N (label serial0)" on stderr
    unix:PATH                  listen on a UNIX socket, wait for one client
    tcp:127.0.0.1:PORT         listen on loopback TCP (port 0 picks one), wait for a client
    serial:DEVICE-or-URL       a serial port or any pyserial URL (loop://, socket://...)

``open_console(spec, notice=print_to_stderr)`` returns the console once it is usable (for
sockets: once a client connected).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import socket
import struct
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable

POLL_S = 0.2
DRAIN_S = 2.0


class ConsoleInterrupt(Exception):
    """Ctrl-C on a raw console."""


class ConsoleSpecError(ValueError):
    """A ``--serial`` value that names no usable console."""


class Console:
    """A line console over a byte transport; see the module doc for the two disciplines."""

    def __init__(
        self,
        read: Callable[[float], bytes | None],
        write: Callable[[bytes], None],
        *,
        raw: bool,
        name: str,
        closers: tuple[Callable[[], None], ...] = (),
    ) -> None:
        self._read = read  # bytes, b"" at end of input, None on timeout
        self._write = write
        self.raw = raw
        self.name = name
        self._closers = closers
        self._pending = b""
        self._lock = threading.Lock()
        self._skip_lf = False
        self.closed = False
        self.filename = name
        """Where the console is, in QEMU's chardev encoding (``pty:/dev/pts/3``,
        ``tcp:127.0.0.1:40123,server=on``): what QMP's query-chardev answers."""

    def write(self, text: str) -> None:
        """Write text (newlines become CRLF on a raw console); never raises once closed."""
        data = text.encode("utf-8", "replace")
        if self.raw:
            data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        with self._lock:
            if self.closed:
                return
            try:
                self._write(data)
            except OSError:
                self.closed = True

    def line(self, text: str) -> None:
        self.write(text + "\n")

    def readline(self, prompt: str = "", idle: Callable[[], None] | None = None) -> str | None:
        """One line without its end, or None at end of input. ``idle()`` runs while nothing
        arrives (it may raise to stop waiting). Raises :class:`ConsoleInterrupt` on Ctrl-C."""
        if prompt:
            self.write(prompt)
        buf = bytearray()
        while True:
            if not self._pending:
                chunk = self._read(POLL_S)
                if chunk is None:
                    if idle is not None:
                        idle()
                    continue
                if chunk == b"":
                    return buf.decode("utf-8", "replace") if buf else None
                self._pending = chunk
            if not self.raw:
                nl = self._pending.find(b"\n")
                if nl < 0:
                    buf += self._pending
                    self._pending = b""
                    continue
                buf += self._pending[:nl]
                self._pending = self._pending[nl + 1 :]
                return buf.decode("utf-8", "replace").rstrip("\r")
            byte, self._pending = self._pending[:1], self._pending[1:]
            b = byte[0]
            if self._skip_lf:
                self._skip_lf = False
                if b == 0x0A:
                    continue
            if b in (0x0D, 0x0A):
                self._skip_lf = b == 0x0D
                self.write("\n")
                return buf.decode("utf-8", "replace")
            if b == 0x03:
                self.write("^C\n")
                raise ConsoleInterrupt()
            if b == 0x04:
                if not buf:
                    return None
                continue
            if b in (0x08, 0x7F):
                if buf:
                    # drop a whole UTF-8 sequence
                    while len(buf) > 1 and buf[-1] & 0xC0 == 0x80:
                        del buf[-1]
                    del buf[-1]
                    self._echo(b"\b \b")
                continue
            if b == 0x15:
                self._echo(b"\b \b" * len(buf.decode("utf-8", "replace")))
                buf.clear()
                continue
            if b < 0x20 and b != 0x09:
                continue
            buf += byte
            self._echo(byte)

    def _echo(self, data: bytes) -> None:
        with self._lock:
            if not self.closed:
                try:
                    self._write(data)
                except OSError:
                    self.closed = True

    def close(self) -> None:
        with self._lock:
            self.closed = True
        for fn in self._closers:
            with contextlib.suppress(OSError):
                fn()


def _pending(fd: int) -> int:
    """Bytes waiting to be read on a tty fd."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def _fd_reader(fd: int) -> Callable[[float], bytes | None]:
    def read(timeout: float) -> bytes | None:
        r, _, _ = select.select([fd], [], [], timeout)
        if not r:
            return None
        try:
            return os.read(fd, 4096)
        except OSError:  # EIO: the other side of a pty went away
            return b""

    return read


def _fd_writer(fd: int) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]

    return write


def _pty_writer(fd: int) -> Callable[[bytes], None]:
    """Writes to a pty master that nobody may be reading (a daemonized gemu, a client gone):
    the terminal's buffer fills and a blocking write would wedge the machine. Wait at most
    DRAIN_S for room, then drop what does not fit, and drop at once while the terminal
    stays full, as QEMU's pty chardev drops output with no client."""
    os.set_blocking(fd, False)
    state = {"stalled": False, "dropped": 0}

    def write(data: bytes) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + DRAIN_S
        while view:
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                left = 0.0 if state["stalled"] else deadline - time.monotonic()
                if left <= 0 or not select.select([], [fd], [], left)[1]:
                    state["stalled"] = True
                    state["dropped"] += len(view)
                    return
                continue
            except OSError:  # the line hung up
                state["dropped"] += len(view)
                return
            state["stalled"] = False
            view = view[n:]

    write.state = state  # type: ignore[attr-defined]
    return write


def _socket_console(listener: socket.socket, name: str) -> Console:
    conn, _ = listener.accept()
    listener.close()

    def read(timeout: float) -> bytes | None:
        r, _, _ = select.select([conn], [], [], timeout)
        if not r:
            return None
        try:
            return conn.recv(4096)
        except OSError:
            return b""

    def close() -> None:
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)
        conn.close()

    return Console(read, conn.sendall, raw=True, name=name, closers=(close,))


CONNECT_S = 10.0
"""How long a client console (QEMU's chardev without ``server``) tries to connect."""


def _client_console(target: str) -> Console:
    """QEMU's client chardev (``-serial tcp:HOST:PORT`` or ``unix:PATH`` without
    ``server``): gemu connects out to a terminal server that is already listening."""
    kind, _, rest = target.partition(":")
    try:
        if kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(CONNECT_S)
            sock.connect(rest)
        else:
            host, sep, port = rest.rpartition(":")
            if not sep or not port.isdigit():
                raise ConsoleSpecError(f"tcp:{rest}: use tcp:HOST:PORT")
            sock = socket.create_connection((host or "127.0.0.1", int(port)), CONNECT_S)
    except OSError as exc:
        raise ConsoleSpecError(
            f"{target}: cannot connect: {exc.strerror or exc} (is the terminal server "
            "listening? add ,server for gemu to listen instead)"
        ) from None
    sock.settimeout(None)

    def read(timeout: float) -> bytes | None:
        r, _, _ = select.select([sock], [], [], timeout)
        if not r:
            return None
        try:
            return sock.recv(4096)
        except OSError:
            return b""

    def close() -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    con = Console(read, sock.sendall, raw=True, name=target, closers=(close,))
    con.filename = target
    return con


def open_console(spec: str, notice: Callable[[str], None] | None = None) -> Console:
    """Open the console ``spec`` names; ``notice`` gets what a user must know to reach it
    (the pty path, the socket waiting for a client)."""
    notice = notice or (lambda text: print(text, file=sys.stderr, flush=True))
    kind, _, rest = spec.partition(":")
    if spec == "stdio":
        return Console(_fd_reader(0), _fd_writer(1), raw=False, name="stdio")
    if spec == "pty":
        master, slave = os.openpty()
        tty.setraw(slave)
        path = os.ttyname(slave)
        notice(f"char device redirected to {path} (label serial0)")

        def close() -> None:
            # Closing the master hangs the line up and drops what the client has not read
            # yet (the power-down message): give it a bounded moment to read it.
            # Bytes in flight to the slave show up in FIONREAD only once the tty layer has
            # moved them, so wait for it to read 0 several polls in a row.
            deadline = time.monotonic() + DRAIN_S
            quiet = 0
            while time.monotonic() < deadline and quiet < 5:
                quiet = 0 if _pending(slave) else quiet + 1
                select.select([], [], [], 0.01)
            os.close(master)
            os.close(slave)

        con = Console(
            _fd_reader(master), _pty_writer(master), raw=True, name=path, closers=(close,)
        )
        con.filename = f"pty:{path}"
        return con
    if kind == "unix":
        if not rest:
            raise ConsoleSpecError("unix: needs a path (unix:PATH)")
        if os.path.exists(rest):
            raise ConsoleSpecError(f"{rest} already exists")
        try:  # owner-only whatever the umask: the console is a guest shell, unauthenticated
            from gemu.device.transport import listen_unix  # only for a unix: console

            listener = listen_unix(rest, 1)
        except OSError as exc:
            raise ConsoleSpecError(f"unix:{rest}: cannot listen: {exc.strerror}") from None
        notice(f"gemu: serial0: waiting for connection on unix:{rest}")
        try:
            con = _socket_console(listener, spec)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(rest)
        con.filename = f"unix:{rest},server=on"
        return con
    if kind == "tcp":
        host, sep, port = rest.rpartition(":")
        if not sep or not port.isdigit():
            raise ConsoleSpecError(f"{spec!r}: use tcp:HOST:PORT")
        import ipaddress

        try:
            addr = socket.gethostbyname(host or "127.0.0.1")
        except OSError as exc:
            raise ConsoleSpecError(f"{spec!r}: {exc}") from None
        if not ipaddress.ip_address(addr).is_loopback:
            raise ConsoleSpecError(f"refusing to listen on {host}, which is not a loopback address")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((addr, int(port)))
        listener.listen(1)
        chosen = f"tcp:{addr}:{listener.getsockname()[1]}"
        notice(f"gemu: serial0: waiting for connection on {chosen}")
        con = _socket_console(listener, spec)
        con.filename = f"{chosen},server=on"
        return con
    if kind == "connect":
        return _client_console(rest)
    if kind == "serial":
        if not rest:
            raise ConsoleSpecError("serial: needs a port or a pyserial URL")
        import serial

        try:
            ser = serial.serial_for_url(rest, baudrate=115200, timeout=POLL_S)
        except (serial.SerialException, ValueError) as exc:
            raise ConsoleSpecError(f"cannot open serial port {rest!r}: {exc}") from None

        def read(timeout: float) -> bytes | None:
            try:
                data = ser.read(max(1, ser.in_waiting))
            except serial.SerialException:
                return b""
            return data or None

        return Console(read, ser.write, raw=True, name=spec, closers=(ser.close,))
    raise ConsoleSpecError(
        f"unknown console {spec!r} (stdio, pty, unix:PATH, tcp:127.0.0.1:PORT, serial:PORT)"
    )


def check_spec(spec: str) -> str:
    """Syntax check for the command line (opening happens later)."""
    kind, sep, rest = spec.partition(":")
    if spec in ("stdio", "pty"):
        return spec
    if kind in ("unix", "tcp", "serial") and sep and rest:
        return spec
    if kind == "connect" and rest.partition(":")[0] in ("unix", "tcp") and ":" in rest:
        return spec
    raise ConsoleSpecError(
        f"unknown console {spec!r} (stdio, pty, unix:PATH, tcp:127.0.0.1:PORT, serial:PORT)"
    )
