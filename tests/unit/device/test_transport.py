"""Transport specs, listeners and connections (gemu.device.transport, gemu.device.abi.link)."""

from __future__ import annotations

import os
import select
import socket
import tty

import pytest

from gemu.device import transport
from gemu.device.abi import link


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:/tmp/gpu.sock", link.Spec("unix", path="/tmp/gpu.sock")),
        ("tcp:127.0.0.1:0", link.Spec("tcp", host="127.0.0.1", port=0)),
        ("tcp:localhost:7000", link.Spec("tcp", host="localhost", port=7000)),
        ("tcp:[::1]:7000", link.Spec("tcp", host="::1", port=7000)),
        ("serial:/dev/pts/3", link.Spec("serial", path="/dev/pts/3")),
        ("serial:socket://127.0.0.1:5000", link.Spec("serial", path="socket://127.0.0.1:5000")),
        ("serial:/dev/ttyUSB0,baud=921600", link.Spec("serial", path="/dev/ttyUSB0", baud=921600)),
    ],
)
def test_parse_spec_accepts_the_documented_forms(text, expected):
    """Every documented spec form parses, and prints back as a usable spec."""
    spec = transport.parse_spec(text)
    assert spec == expected
    assert transport.parse_spec(str(spec)).kind == spec.kind


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gpu.sock", "must look like unix:PATH"),
        ("pipe:/x", "unknown transport 'pipe'"),
        ("unix:", "path is empty"),
        ("unix:/" + "x" * 200, "longer than 107 bytes"),
        ("tcp:127.0.0.1", "expected tcp:HOST:PORT"),
        ("tcp::80", "host is empty"),
        ("tcp:127.0.0.1:http", "port 'http' is not a number"),
        ("tcp:127.0.0.1:70000", "port 70000 is not in 0..65535"),
        ("tcp:[::1:80", r"expected tcp:\[IPV6\]:PORT"),
        ("serial:", "serial port or URL is empty"),
        ("serial:/dev/ttyS0,baud=fast", "baud rate 'fast' is not a number"),
    ],
)
def test_bad_specs_name_the_spec_and_the_problem(text, message):
    """A bad spec raises SpecError naming the spec and what is wrong with it."""
    with pytest.raises(transport.SpecError, match=message) as info:
        transport.parse_spec(text)
    assert repr(text)[1:-1] in str(info.value) or text in str(info.value)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "192.168.0.1"])
def test_listen_refuses_non_loopback_addresses(host):
    """The device protocol has no authentication, so TCP listens on loopback only."""
    spec = f"tcp:[{host}]:0" if ":" in host else f"tcp:{host}:0"
    with pytest.raises(transport.SpecError, match="not a loopback address"):
        transport.listen(spec)


def test_listen_refuses_host_names_other_than_localhost():
    """A host name could resolve anywhere; only 'localhost' and IP literals are accepted."""
    with pytest.raises(transport.SpecError, match="is not an IP address"):
        transport.listen("tcp:example.org:0")


def test_tcp_port_zero_reports_the_chosen_port_and_connects():
    """Port 0 picks a free port; Listener.spec is the address clients connect to."""
    listener = transport.listen("tcp:localhost:0")
    try:
        assert listener.spec.host == "127.0.0.1" and listener.spec.port > 0
        client = transport.connect(str(listener.spec))
        assert select.select([listener], [], [], 5.0)[0], "the connection never arrived"
        server = listener.accept()
        assert server is not None
        client.sendall(b"ping")
        assert server.recv_exact(4) == b"ping"
        assert not server.supports_fds
        with pytest.raises(transport.TransportError, match="cannot pass file descriptors"):
            client.send_fds(b"x", [0])
        client.close()
        server.close()
    finally:
        listener.close()


def test_unix_listener_replaces_a_stale_socket_and_removes_it_at_close(tmp_path):
    """A socket file nobody listens on is stale and replaced; the file goes away at close."""
    path = tmp_path / "gpu.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    listener = transport.listen(f"unix:{path}")
    assert path.exists()
    listener.close()
    assert not path.exists()


def test_unix_listener_refuses_a_live_socket_and_a_regular_file(tmp_path):
    """Another process listening, or a file that is no socket, is a clear error."""
    path = tmp_path / "gpu.sock"
    first = transport.listen(f"unix:{path}")
    try:
        with pytest.raises(transport.SpecError, match="another process is listening"):
            transport.listen(f"unix:{path}")
    finally:
        first.close()
    plain = tmp_path / "plain"
    plain.write_text("x")
    with pytest.raises(transport.SpecError, match="exists and is not a socket"):
        transport.listen(f"unix:{plain}")


def test_unix_connection_passes_descriptors():
    """SCM_RIGHTS descriptors sent with a message are collected by the accepting end."""
    client, device = transport.socketpair()
    r, w = os.pipe()
    try:
        client.send_fds(b"frame", [w])
        buf = memoryview(bytearray(16))
        assert device.recv_into(buf) == 5
        (fd,) = device.take_fds()
        os.write(fd, b"!")
        os.close(fd)
        assert os.read(r, 1) == b"!"
        assert device.take_fds() == []
    finally:
        os.close(r)
        os.close(w)
        client.close()
        device.close()


def test_non_blocking_receive_returns_none_and_end_of_stream_returns_zero():
    """recv_into(block=False) says "would block" with None; a closed peer reads 0."""
    client, device = transport.socketpair()
    buf = memoryview(bytearray(8))
    assert device.recv_into(buf, block=False) is None
    client.close()
    assert device.recv_into(buf) == 0
    with pytest.raises(ConnectionError, match="stream ended after 0 of 4 bytes"):
        device.recv_exact(4)
    device.close()


def test_connect_failure_names_the_spec(tmp_path):
    """Connecting to nothing fails with the spec in the message."""
    with pytest.raises(ConnectionError, match=r"cannot connect to unix:.*nothing\.sock"):
        transport.connect(f"unix:{tmp_path}/nothing.sock")


def test_serial_loop_url_round_trip():
    """A pyserial URL works as a serial transport (loop:// echoes what is written)."""
    conn = transport.open_serial("serial:loop://", timeout=1.0)
    try:
        conn.sendall(b"abc")
        assert conn.recv_exact(3) == b"abc"
        assert conn.recv_into(memoryview(bytearray(4)), block=False) is None
    finally:
        conn.close()


def test_serial_over_a_pty_pair():
    """The device side opens a pty slave by path; bytes flow both ways over the master."""
    master, slave = os.openpty()
    tty.setraw(slave)
    conn = transport.open_serial(f"serial:{os.ttyname(slave)}", timeout=2.0)
    try:
        os.write(master, b"\x00\x01hello")
        assert conn.recv_exact(7) == b"\x00\x01hello"
        conn.sendall(b"\xffworld")
        assert os.read(master, 6) == b"\xffworld"
        assert conn.fileno() is not None
    finally:
        conn.close()
        os.close(master)
        os.close(slave)


def test_serial_open_failure_names_the_spec():
    with pytest.raises(transport.SpecError, match=r"serial:/nonexistent/tty.*cannot open"):
        transport.open_serial("serial:/nonexistent/tty")
