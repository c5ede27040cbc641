"""DOC: the device model's end of the link: listening on a transport spec.

The specs and the :class:`Connection` classes are shared with clients and live in the
published interface (:mod:`gemu.device.abi.link`, re-exported here). This module adds the
listening side:

- ``unix:PATH``: a stale socket file is replaced, a live one (another device) is an error;
  the socket is created owner-only (``SOCKET_MODE``, 0600) whatever the umask, since the
  protocol has no authentication;
- ``tcp:HOST:PORT``: loopback only (127.0.0.0/8, ``::1``, ``localhost``), since the protocol has
  no authentication; port 0 picks a free port and :attr:`Listener.spec` tells which;
- ``serial:PORT-or-URL`` is not listened on but opened (:func:`open_serial`): the line is
  the connection.

::

    from gemu.device import transport
    listener = transport.listen("tcp:127.0.0.1:0")
    print(listener.spec)                    # tcp:127.0.0.1:40123
    conn = transport.connect(str(listener.spec))
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import stat

from .abi.link import (
    Connection,
    SerialConnection,
    SocketConnection,
    Spec,
    SpecError,
    TransportError,
    connect,
    open_serial,
    parse_spec,
    socketpair,
)

__all__ = [
    "Connection",
    "Listener",
    "SerialConnection",
    "SocketConnection",
    "Spec",
    "SpecError",
    "TransportError",
    "check_listen",
    "connect",
    "listen",
    "open_serial",
    "parse_spec",
    "socketpair",
]

SOCKET_MODE = 0o600  # a UNIX listening socket: owner-only, the protocol has no authentication


def _loopback_address(spec: Spec, text: str) -> tuple[int, str]:
    """The socket family and address to bind a loopback-only TCP listener on."""
    if spec.host == "localhost":
        return socket.AF_INET, "127.0.0.1"
    try:
        addr = ipaddress.ip_address(spec.host)
    except ValueError:
        raise SpecError(
            f"transport spec {text!r}: host {spec.host!r} is not an IP address; the device "
            "listens on loopback only (127.0.0.1, ::1 or localhost)"
        ) from None
    if not addr.is_loopback:
        raise SpecError(
            f"transport spec {text!r}: refusing to listen on {spec.host}, which is not a "
            "loopback address; the device protocol has no authentication, so it listens on "
            "127.0.0.0/8, ::1 or localhost only"
        )
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    return family, str(addr)


# --- endpoints ---------------------------------------------------------------------------


class Listener:
    """A listening socket. ``spec`` is the resolved address to connect to (the real port)."""

    def __init__(self, sock: socket.socket, spec: Spec, *, unlink: str | None = None) -> None:
        self.sock = sock
        self.spec = spec
        self._unlink = unlink
        sock.setblocking(False)

    def accept(self) -> SocketConnection | None:
        """The next pending connection, or None if there is none."""
        try:
            conn, addr = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        conn.setblocking(True)
        if self.spec.kind == "unix":
            name = f"unix:{self.spec.path}"
        else:
            host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
            name = f"tcp:{host}:{addr[1]}"
        return SocketConnection(conn, name, accept_fds=self.spec.kind == "unix")

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()
        if self._unlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._unlink)
            self._unlink = None


def _claim_unix_path(path: str, text: str) -> None:
    """Remove a stale socket file at ``path``; refuse a live one or a non-socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SpecError(f"transport spec {text!r}: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # stale: nobody listens there any more
        return
    finally:
        probe.close()
    raise SpecError(f"transport spec {text!r}: another process is listening on {path}")


def check_listen(text: str) -> Spec:
    """Validate a spec for listening without binding anything (SpecError if unusable)."""
    spec = parse_spec(text)
    if spec.kind == "tcp":
        _loopback_address(spec, text)
    return spec


def listen_unix(path: str, backlog: int) -> socket.socket:
    """A listening UNIX socket at ``path`` of mode :data:`SOCKET_MODE` whatever the umask.

    bind() follows the umask; nobody can connect before listen(), so restricting the mode in
    between leaves no window for another user. Raises OSError (the socket closed)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, SOCKET_MODE)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def listen(text: str, *, backlog: int = 2) -> Listener:
    """Listen on a ``unix:`` or loopback ``tcp:`` spec (serial ports are opened, see
    :func:`open_serial`)."""
    spec = parse_spec(text)
    if spec.kind == "unix":
        _claim_unix_path(spec.path, text)
        try:
            sock = listen_unix(spec.path, backlog)
        except OSError as exc:
            raise SpecError(f"transport spec {text!r}: cannot bind: {exc.strerror}") from None
        return Listener(sock, spec, unlink=spec.path)
    if spec.kind == "tcp":
        family, host = _loopback_address(spec, text)
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, spec.port))
        except OSError as exc:
            sock.close()
            raise SpecError(f"transport spec {text!r}: cannot bind: {exc.strerror}") from None
        sock.listen(backlog)
        port = sock.getsockname()[1]
        return Listener(sock, Spec("tcp", host=host, port=port))
    raise SpecError(f"transport spec {text!r}: a serial port is opened, not listened on")
