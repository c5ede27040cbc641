"""The QMP control socket: QEMU's own client drives ``gemu boot --qmp``; every malformed
request gets an error reply naming what was wrong; the stream parser survives any bytes."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs
from qemu.qmp import ExecuteError, QMPClient

from gemu.host import qmp
from gemu.host.machine import Machine, _gemu_command
from gemu.host.shell import Shell


def _wait_for(cond, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def booted(tmp_path):
    """``gemu boot --qmp unix:...`` as a user starts it, console on a pipe."""
    sock = tmp_path / "qmp.sock"
    old = os.umask(0)  # the socket must be owner-only whatever the umask
    try:
        proc = subprocess.Popen(
            [*_gemu_command(), "boot", "--device", "inproc", "-m", "16M", "--qmp", f"unix:{sock}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    finally:
        os.umask(old)
    _wait_for(sock.exists, "the QMP socket")
    yield proc, sock
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=20)


def test_qemu_qmp_client_drives_gemu_boot(booted):
    """qemu.qmp's QMPClient, unchanged: greeting and negotiation, query-status,
    query-version, a view, human-monitor-command, an unknown command's CommandNotFound, a
    GPU fault event with QEMU's timestamp, quit; the socket is 0600 under umask 0."""
    proc, sock = booted
    assert sock.stat().st_mode & 0o777 == 0o600

    async def session() -> None:
        c = QMPClient("test")
        await c.connect(str(sock))
        assert await c.execute("query-status") == {"running": True, "status": "running"}
        ver = await c.execute("query-version")
        assert set(ver["qemu"]) == {"major", "minor", "micro"} and "gemu" in ver["package"]
        mem = await c.execute("query-gemu-mem")
        assert mem["free_pages"] <= mem["total_pages"] and "watermarks" in mem
        out = await c.execute("human-monitor-command", {"command-line": "a = bo 8K"})
        assert out.startswith("a: handle 1, 8 KiB")
        objs = await c.execute("query-gemu-objects")
        assert [o["name"] for o in objs["objects"]] == ["a"]
        with pytest.raises(ExecuteError) as err:
            await c.execute("nope")
        assert err.value.error_class == "CommandNotFound"
        await c.execute("human-monitor-command", {"command-line": "f = submit fault"})
        ev = await asyncio.wait_for(c.events.get(), 10)
        assert ev["event"] == "GEMU_GPU_FAULT" and ev["data"]["exception"] == "TRANSLATION_L0"
        assert set(ev["timestamp"]) == {"seconds", "microseconds"}
        await c.execute("human-monitor-command", {"command-line": "expect fault"})
        await c.execute("quit")
        await c.disconnect()

    asyncio.run(session())
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out.decode()
    assert f"QMP listening on unix:{sock}" in out.decode()


@pytest.fixture
def server(tmp_path):
    """A QmpServer over an in-process machine, its commands pumped by a console thread."""
    with Machine(ram_size=8 << 20, device="inproc") as m:
        sh = Shell(m, lambda text: None)
        quits: list[bool] = []
        srv = qmp.QmpServer(f"unix:{tmp_path / 'q.sock'}", {}, notice=lambda t: None)
        srv.serve(qmp.machine_commands(sh, lambda: quits.append(True)))
        stop = threading.Event()

        def console() -> None:
            while not stop.is_set():
                srv.pump()
                time.sleep(0.005)

        t = threading.Thread(target=console, daemon=True)
        t.start()
        yield srv
        stop.set()
        t.join(5)
        srv.close()
        sh.poweroff()


def _connect(srv) -> tuple[socket.socket, object]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(srv.path)
    f = s.makefile("rwb")
    assert "QMP" in json.loads(f.readline())
    return s, f


def _ask(f, raw: bytes) -> dict:
    f.write(raw + b"\n")
    f.flush()
    return json.loads(f.readline())


def test_errors_name_what_was_wrong(server):
    """Before negotiation, malformed JSON, a non-object, an unknown member, a wrong argument
    type, a missing or unexpected argument, an unknown command: each an error reply with
    QEMU's class naming the fault, and the connection keeps serving."""
    s, f = _connect(server)
    with s:
        r = _ask(f, b'{"execute": "query-status"}')
        assert r["error"]["class"] == "CommandNotFound" and "qmp_capabilities" in r["error"]["desc"]
        assert _ask(f, b'{"execute": "qmp_capabilities"}') == {"return": {}}
        cases = [
            (b'{"execute": "query-status" 1}', "JSON parse error"),
            (b"[1, 2]", "must be a JSON object"),
            (b'{"execute": "query-status", "bogus": 1}', "member 'bogus' is unexpected"),
            (b'{"execute": 5}', "'execute' must be a string"),
            (b'{"execute": "query-status", "arguments": []}', "'arguments' must be an object"),
            (
                b'{"execute": "human-monitor-command", "arguments": {"command-line": 3}}',
                "Invalid parameter type for 'command-line', expected: string",
            ),
            (b'{"execute": "human-monitor-command"}', "Parameter 'command-line' is missing"),
            (b'{"execute": "query-status", "arguments": {"x": 1}}', "Parameter 'x' is unexpected"),
        ]
        for raw, want in cases:
            r = _ask(f, raw)
            assert r["error"]["class"] == "GenericError", raw
            assert want in r["error"]["desc"], (raw, r)
        r = _ask(f, b'{"execute": "nope", "id": "x1"}')
        assert r == {
            "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"},
            "id": "x1",
        }
        r = _ask(f, b"this is not json")
        assert "JSON parse error" in r["error"]["desc"]
        r = _ask(f, b'{"execute": "human-monitor-command", "arguments": {"command-line": "bo x"}}')
        assert "bo:" in r["return"]  # a console error is the command's output, as in HMP
        assert _ask(f, b'{"execute": "query-status", "id": 2}')["id"] == 2


def test_an_overlong_line_is_refused_and_dropped(server):
    """A request longer than MAX_LINE gets an error naming the bound, then the connection
    closes; the server still accepts new clients."""
    s, f = _connect(server)
    with s:
        f.write(b'{"execute": "qmp_capabilities"}')
        f.flush()
        assert json.loads(f.readline()) == {"return": {}}
        s.sendall(b'{"execute": "' + b"x" * (qmp.MAX_LINE + 10))
        r = json.loads(f.readline())
        assert f"longer than {qmp.MAX_LINE}" in r["error"]["desc"]
        assert f.readline() == b""
    s2, _ = _connect(server)
    s2.close()


def test_tcp_spec_is_loopback_only_and_reports_its_port():
    """tcp: with port 0 picks a port the address names; a non-loopback host is refused."""
    srv = qmp.QmpServer("tcp:127.0.0.1:0", {}, notice=lambda t: None)
    try:
        assert srv.port and srv.address == f"tcp:127.0.0.1:{srv.port}"
    finally:
        srv.close()
    with pytest.raises(qmp.QmpSpecError, match="loopback only"):
        qmp.QmpServer("tcp:0.0.0.0:0", {}, notice=lambda t: None)
    with pytest.raises(qmp.QmpSpecError, match="use unix:PATH or tcp"):
        qmp.QmpServer("stdio", {}, notice=lambda t: None)


_json = hs.recursive(
    hs.none() | hs.booleans() | hs.integers() | hs.text(max_size=8),
    lambda kids: (
        hs.lists(kids, max_size=3) | hs.dictionaries(hs.text(max_size=5), kids, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(hs.lists(hs.dictionaries(hs.text(max_size=6), _json, max_size=4), max_size=4))
def test_stream_split_returns_each_object_whole(objs):
    """Objects sent back to back, with or without newlines, come out one by one intact."""
    stream = b"".join(json.dumps(o).encode() for o in objs)
    msgs, rest = qmp.split_messages(stream)
    assert [json.loads(m) for m in msgs] == objs and rest == b""


@settings(max_examples=500, deadline=None, derandomize=True)
@given(hs.binary(max_size=200))
def test_any_bytes_give_a_request_or_a_named_error(data):
    """Whatever bytes arrive, splitting and parsing either yields a request or raises
    QmpError with a description; never another exception."""
    msgs, rest = qmp.split_messages(data)
    assert len(rest) <= len(data)
    for m in msgs:
        try:
            name, args, _ = qmp.parse_request(m)
        except qmp.QmpError as exc:
            assert exc.cls == "GenericError" and exc.desc
        else:
            assert isinstance(name, str) and isinstance(args, dict)


def test_a_bad_qmp_spec_is_a_usage_error():
    """``gemu boot --qmp tcp:0.0.0.0:0`` exits 2 naming the option, before booting."""
    r = subprocess.run(
        [*_gemu_command(), "boot", "--device", "inproc", "--qmp", "tcp:0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 2
    assert "argument --qmp: 'tcp:0.0.0.0:0': QMP listens on loopback only" in r.stderr
    assert "Traceback" not in r.stderr
