"""DOC: a QMP control socket for ``gemu boot --qmp unix:PATH`` or ``--qmp tcp:127.0.0.1:PORT``.

QEMU's Machine Protocol on the wire, so QEMU's own clients (``qemu.qmp``, ``qmp-shell``,
libvirt-style scripts) drive gemu unchanged. One JSON object per line each way::

    S: {"QMP": {"version": {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": "gemu"},
                "capabilities": []}}
    C: {"execute": "qmp_capabilities"}
    S: {"return": {}}
    C: {"execute": "query-gemu-mem", "id": 7}
    S: {"return": {"free_pages": 4078, ...}, "id": 7}
    C: {"execute": "nope"}
    S: {"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}
    S: {"event": "GEMU_GPU_FAULT", "data": {...}, "timestamp": {"seconds": ..., "microseconds": ...}}

Commands run in the console's thread (:meth:`QmpServer.pump`, called while the console
waits for a line), so they never race a console command. Each connection's line is bounded
(:data:`MAX_LINE`) and a client that does not read its replies is dropped once
:data:`SEND_TIMEOUT_S` passes rather than stalling the machine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gemu.device.transport import listen_unix

log = logging.getLogger("gemu.host.qmp")

MAX_LINE = 64 * 1024
"""Longest request line accepted (bytes); a longer one is answered with an error and dropped."""

SEND_TIMEOUT_S = 5.0
"""How long a write to a client may block before that client is dropped."""

REPLY_TIMEOUT_S = 30.0
"""How long a connection waits for the console thread to run its command."""


class QmpSpecError(ValueError):
    """A ``--qmp`` value that names no usable listening address."""


class QmpError(Exception):
    """A command's failure, as QEMU reports it: an error class and a description."""

    def __init__(self, cls: str, desc: str) -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


def parse_spec(text: str) -> tuple[str, bool]:
    """``--qmp``/``-qmp`` as QEMU spells it: ``unix:PATH`` or ``tcp:127.0.0.1:PORT``, with
    QEMU's chardev options ``server`` (QMP always listens), ``nowait``, ``wait=on|off``.
    Returns (address spec, whether to wait for a client before booting: QEMU's default for
    ``,server`` without ``nowait``). :class:`QmpSpecError` names what is wrong."""
    spec, *opts = text.split(",")
    wait = False
    for opt in opts:
        key, eq, value = opt.partition("=")
        if eq and value not in ("on", "off"):
            raise QmpSpecError(f"{text!r}: {key}={value}: use on or off")
        on = value != "off"
        if key == "server":
            if not on:
                raise QmpSpecError(
                    f"{text!r}: gemu's QMP socket listens; server=off is not supported"
                )
            wait = True  # QEMU: a server chardev waits for its client unless told not to
        elif key == "nowait":
            wait = False
        elif key == "wait":
            wait = on
        else:
            raise QmpSpecError(f"{text!r}: option {key!r} is not supported by gemu")
    if "server" not in [o.partition("=")[0] for o in opts]:
        wait = False
    return spec, wait


def generic(desc: str) -> QmpError:
    return QmpError("GenericError", desc)


def parse_request(line: bytes) -> tuple[str, dict, Any]:
    """A request line as (command, arguments, id); :class:`QmpError` says what is wrong.

    Follows QEMU's qmp_dispatch checks: a JSON object, ``execute`` a string, ``arguments``
    an object, no other keys than ``execute``, ``arguments``, ``id``."""
    try:
        req = json.loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        raise generic(f"JSON parse error, {exc}") from None
    if not isinstance(req, dict):
        raise generic("QMP input must be a JSON object")
    rid = req.get("id")
    for key in req:
        if key not in ("execute", "arguments", "id"):
            raise generic(f"QMP input member '{key}' is unexpected")
    cmd = req.get("execute")
    if cmd is None:
        raise generic("QMP input lacks member 'execute'")
    if not isinstance(cmd, str):
        raise generic("QMP input member 'execute' must be a string")
    args = req.get("arguments", {})
    if not isinstance(args, dict):
        raise generic("QMP input member 'arguments' must be an object")
    return cmd, args, rid


def split_messages(buf: bytes) -> tuple[list[bytes], bytes]:
    """Cut complete JSON texts off the front of a byte stream, as QEMU's JSON streamer does:
    an object or array ends when its brackets balance outside strings (no newline needed);
    anything else at the top level runs to the end of its line. Returns (messages, rest)."""
    out: list[bytes] = []
    start = 0
    i, n = 0, len(buf)
    while i < n:  # one pass over at most MAX_LINE + one chunk of bytes
        b = buf[i]
        if b in b" \t\r\n":
            i += 1
            start = i
            continue
        if b in b"{[":
            depth, in_str, esc, j = 0, False, False, i
            while j < n:
                ch = buf[j]
                if in_str:
                    if esc:
                        esc = False
                    elif ch == 0x5C:  # backslash
                        esc = True
                    elif ch == 0x22:
                        in_str = False
                elif ch == 0x22:
                    in_str = True
                elif ch in b"{[":
                    depth += 1
                elif ch in b"}]":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            if j >= n:
                return out, buf[start:]
            out.append(buf[i : j + 1])
            i = start = j + 1
            continue
        nl = buf.find(b"\n", i)
        if nl < 0:
            return out, buf[start:]
        out.append(buf[i:nl])
        i = start = nl + 1
    return out, buf[start:]


@dataclass
class Command:
    """A command: its handler and its arguments' types (name -> (type, required))."""

    fn: Callable[..., Any]
    params: dict[str, tuple[type, bool]] = field(default_factory=dict)

    def check(self, name: str, args: dict) -> None:
        for key, value in args.items():
            if key not in self.params:
                raise generic(f"Parameter '{key}' is unexpected")
            want = self.params[key][0]
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise generic(f"Invalid parameter type for '{key}', expected: {_type_name(want)}")
        for key, (_, required) in self.params.items():
            if required and key not in args:
                raise generic(f"Parameter '{key}' is missing")


def _type_name(t: type) -> str:
    return {str: "string", int: "integer", bool: "boolean", dict: "object"}.get(t, t.__name__)


def timestamp() -> dict:
    """QEMU's event timestamp: wall-clock seconds and microseconds."""
    now = time.time()
    sec = int(now)
    return {"seconds": sec, "microseconds": int((now - sec) * 1e6)}


class _Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.negotiated = False
        self.lock = threading.Lock()
        self.alive = True

    def send(self, obj: dict) -> None:
        data = json.dumps(obj).encode() + b"\r\n"
        with self.lock:
            if not self.alive:
                return
            try:
                self.sock.sendall(data)
            except OSError:
                self.alive = False  # gone, or not reading within SEND_TIMEOUT_S


class QmpServer:
    """Listens on ``spec``; each connection's commands are queued for :meth:`pump`."""

    def __init__(self, spec: str, commands: dict[str, Command], notice=print) -> None:
        self.commands = commands
        self.requests: queue.Queue = queue.Queue()
        self.clients: list[_Client] = []
        self._lock = threading.Lock()
        self.closed = False
        self.inflight = 0  # requests read whose reply is not yet sent
        self.ready = threading.Event()  # set once the machine booted and commands are known
        self.connected = threading.Event()  # set once a first client connected
        self.path: str | None = None
        self.listener, self.address = self._listen(spec)
        notice(f"gemu: QMP listening on {self.address}")
        self._thread = threading.Thread(target=self._accept, name="qmp-accept", daemon=True)
        self._thread.start()

    def _listen(self, spec: str) -> tuple[socket.socket, str]:
        kind, _, rest = spec.partition(":")
        if kind == "unix":
            if not rest:
                raise QmpSpecError("unix: needs a path (unix:PATH)")
            if os.path.exists(rest):
                raise QmpSpecError(f"{rest} already exists")
            try:  # owner-only whatever the umask: QMP controls the machine
                s = listen_unix(rest, 4)
            except OSError as exc:
                raise QmpSpecError(f"unix:{rest}: cannot listen: {exc.strerror}") from None
            self.path = rest
            return s, f"unix:{rest}"
        if kind == "tcp":
            host, sep, port = rest.rpartition(":")
            if not sep or not port.isdigit() or int(port) > 65535:
                raise QmpSpecError(f"{spec!r}: use tcp:127.0.0.1:PORT")
            if host not in ("127.0.0.1", "localhost", ""):
                raise QmpSpecError(f"{spec!r}: QMP listens on loopback only (127.0.0.1)")
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", int(port)))
            except OSError as exc:
                s.close()
                raise QmpSpecError(f"{spec}: cannot listen: {exc.strerror}") from None
            s.listen(4)
            return s, f"tcp:127.0.0.1:{s.getsockname()[1]}"
        raise QmpSpecError(f"{spec!r}: use unix:PATH or tcp:127.0.0.1:PORT")

    @property
    def port(self) -> int | None:
        """The TCP port listened on (None for a UNIX socket)."""
        return None if self.path else self.listener.getsockname()[1]

    # -- connection threads ----------------------------------------------------------------
    def _accept(self) -> None:
        while not self.closed:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            sock.settimeout(SEND_TIMEOUT_S)
            c = _Client(sock)
            with self._lock:
                self.clients.append(c)
            self.connected.set()
            threading.Thread(target=self._serve, args=(c,), name="qmp-client", daemon=True).start()

    def _serve(self, c: _Client) -> None:
        c.send(greeting())
        buf = b""
        try:
            while c.alive and not self.closed:
                try:
                    chunk = c.sock.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not chunk:
                    break
                buf += chunk
                messages, buf = split_messages(buf)
                for msg in messages:
                    self._request(c, msg)
                if len(buf) > MAX_LINE:
                    c.send(_error(generic(f"QMP input line longer than {MAX_LINE} bytes")))
                    break
        finally:
            c.alive = False
            with contextlib.suppress(OSError):
                c.sock.close()
            with self._lock:
                if c in self.clients:
                    self.clients.remove(c)

    def _request(self, c: _Client, line: bytes) -> None:
        with self._lock:
            self.inflight += 1
        try:
            self._answer(c, line)
        finally:
            with self._lock:
                self.inflight -= 1

    def _answer(self, c: _Client, line: bytes) -> None:
        rid = None
        try:
            if len(line) > MAX_LINE:
                raise generic(f"QMP input line longer than {MAX_LINE} bytes")
            name, args, rid = parse_request(line)
            if name == "qmp_capabilities":
                if c.negotiated:
                    raise QmpError(
                        "CommandNotFound",
                        "Capabilities negotiation is already complete, command ignored",
                    )
                enable = args.get("enable", [])
                if set(args) - {"enable"} or not isinstance(enable, list):
                    raise generic("qmp_capabilities takes only 'enable', a list")
                if enable:
                    raise generic(f"Capability '{enable[0]}' not available")
                c.negotiated = True
                result: Any = {}
            elif not c.negotiated:
                raise QmpError(
                    "CommandNotFound",
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                )
            else:
                if not self.ready.wait(REPLY_TIMEOUT_S) or self.closed:
                    raise generic("the machine is not running")
                cmd = self.commands.get(name)
                if cmd is None:
                    raise QmpError("CommandNotFound", f"The command {name} has not been found")
                cmd.check(name, args)
                result = self._run(cmd, args)
        except QmpError as exc:
            reply = _error(exc)
        else:
            reply = {"return": result}
        if rid is not None:
            reply["id"] = rid
        c.send(reply)

    def _run(self, cmd: Command, args: dict) -> Any:
        done = threading.Event()
        box: list = []
        self.requests.put((cmd, args, box, done))
        if not done.wait(REPLY_TIMEOUT_S):
            raise generic(f"the machine did not run the command within {REPLY_TIMEOUT_S:.0f} s")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    # -- the console thread ----------------------------------------------------------------
    def serve(self, commands: dict[str, Command]) -> None:
        """The machine booted: answer ``commands`` from now on (requests waited till now)."""
        self.commands = commands
        self.ready.set()

    def requests_ready(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for a queued command (without taking it)."""
        with self.requests.not_empty:
            if not self.requests._qsize():
                self.requests.not_empty.wait(timeout)
            return bool(self.requests._qsize())

    def pump(self) -> None:
        """Run the queued commands (in the caller's thread: the console's)."""
        for _ in range(64):  # a bounded batch: the console stays responsive
            try:
                cmd, args, box, done = self.requests.get_nowait()
            except queue.Empty:
                return
            try:
                box.append((True, cmd.fn(**args)))
            except QmpError as exc:
                box.append((False, exc))
            except BaseException as exc:
                box.append((False, generic(f"{type(exc).__name__}: {exc}")))
                done.set()
                if not isinstance(exc, Exception):
                    raise
                log.debug("QMP command failed", exc_info=True)
                continue
            done.set()

    def event(self, name: str, data: dict | None = None) -> None:
        """Send an asynchronous event to every negotiated client."""
        msg: dict = {"event": name, "timestamp": timestamp()}
        if data is not None:
            msg["data"] = data
        with self._lock:
            clients = [c for c in self.clients if c.negotiated]
        for c in clients:
            c.send(msg)

    def close(self, reason: str = "host-qmp-quit") -> None:
        """Send SHUTDOWN, let replies in flight go out (at most 2 s), stop listening."""
        deadline = time.monotonic() + 2.0
        while self.inflight and time.monotonic() < deadline:
            time.sleep(0.01)
        self.event("SHUTDOWN", {"guest": False, "reason": reason})
        self.closed = True
        self.ready.set()  # requests waiting for a boot that failed get their error
        with contextlib.suppress(OSError):
            self.listener.close()
        if self.path:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        with self._lock:
            clients = list(self.clients)
        for c in clients:
            c.alive = False
            with contextlib.suppress(OSError):
                c.sock.shutdown(socket.SHUT_RDWR)


def _error(exc: QmpError) -> dict:
    return {"error": {"class": exc.cls, "desc": exc.desc}}


def greeting() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("gemu")
    except PackageNotFoundError:
        ver = "0.0.0"
    major, minor, micro = ([int(p) if p.isdigit() else 0 for p in ver.split(".")] + [0, 0, 0])[:3]
    return {
        "QMP": {
            "version": {
                "qemu": {"major": major, "minor": minor, "micro": micro},
                "package": f"gemu {ver}",
            },
            "capabilities": [],
        }
    }


EVENTS = {
    ("mmu", "fault"): "GEMU_GPU_FAULT",
    ("sched", "timeout"): "GEMU_JOB_TIMEOUT",
    ("gpu", "reset"): "GEMU_GPU_RESET",
    ("shrinker", "scan"): "GEMU_SHRINKER_SCAN",
}
"""Guest tracepoints sent as QMP events (category, name) -> event name."""


def machine_commands(
    shell,
    on_quit: Callable[[], None],
    server: QmpServer | None = None,
    chardevs: Callable[[], list[dict]] | None = None,
    prelaunch: list[bool] | None = None,
) -> dict[str, Command]:
    """The commands of a booted machine driven through ``shell`` (its console session).

    ``server`` receives the STOP, RESUME and RESET events; ``chardevs`` lists the machine's
    character devices (console, QMP, gdb) for query-chardev. ``prelaunch`` (``-S`` with
    QMP): ``[True]`` until ``cont`` sets it False; until then query-status says
    ``prelaunch`` and the console or the scripts have not started (QEMU's -S)."""
    from gemu.host import query

    m = shell.m

    def emit(name: str, data: dict | None = None) -> None:
        if server is not None:
            server.event(name, data)

    def status() -> dict:
        # QEMU's StatusInfo (qapi/run-state.json): running, and the RunState
        if m.device_lost():
            return {"running": False, "status": "internal-error"}
        if prelaunch is not None and prelaunch[0]:
            return {"running": False, "status": "prelaunch"}
        paused = m.paused()
        return {"running": not paused, "status": "paused" if paused else "running"}

    def stop() -> dict:
        was = m.paused()
        m.stop()
        if not was:
            emit("STOP")
        return {}

    def cont() -> dict:
        was = m.paused()
        m.cont()
        if prelaunch is not None and prelaunch[0]:
            prelaunch[0] = False
            was = True
        if was:
            emit("RESUME")
        return {}

    def system_reset() -> dict:
        m.system_reset(lambda: emit("RESET", {"guest": False, "reason": "host-qmp-system-reset"}))
        return {}

    def hmp(**kw: Any) -> str:
        out: list[str] = []
        saved = shell.write
        shell.write = out.append
        try:
            shell.run_line(kw["command-line"], "<qmp>", 1)
        finally:
            shell.write = saved
        return "".join(line + "\r\n" for line in out)

    def view(name: str) -> Command:
        return Command(lambda: query.query(m, name, shell))

    def quit_() -> dict:
        on_quit()
        return {}

    cmds = {
        "query-status": Command(status),
        "query-version": Command(lambda: greeting()["QMP"]["version"]),
        "query-commands": Command(lambda: [{"name": n} for n in (*cmds, "qmp_capabilities")]),
        "query-chardev": Command(lambda: chardevs() if chardevs is not None else []),
        "stop": Command(stop),
        "cont": Command(cont),
        "system_reset": Command(system_reset),
        "human-monitor-command": Command(
            hmp, {"command-line": (str, True), "cpu-index": (int, False)}
        ),
        "quit": Command(quit_),
    }
    for name in query.VIEWS:
        cmds[f"query-gemu-{name}"] = view(name)
    return cmds


def subscribe_events(server: QmpServer) -> Callable[[], None]:
    """Forward the guest tracepoints of :data:`EVENTS`; returns the unsubscribe call."""
    from gemu.guest.kernel import trace

    def on_trace(ev) -> None:
        name = EVENTS.get((ev.category, ev.name))
        if name is not None:
            server.event(
                name, {k: v for k, v in ev.args.items() if isinstance(v, (int, str, float))}
            )

    trace.subscribe(on_trace)
    return lambda: trace.unsubscribe(on_trace)
