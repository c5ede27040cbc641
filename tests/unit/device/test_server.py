"""The device protocol server (gemu.device.server), driven frame by frame over a raw socket.

The device model is a FakeGpu, so these tests are about framing, sequencing and robustness:
each error path is checked by the text of its error reply and its log line.
"""

from __future__ import annotations

import logging
import socket
import struct

import pytest

from gemu.device.abi import protocol as p
from gemu.device.abi import regs
from gemu.device.abi.client import DeviceClient, SharedMemory
from tests.support.device import FakeGpu, inproc_device

SCRATCH0 = regs.SCRATCH[0].offset


class Raw:
    """A client that speaks the protocol by hand."""

    def __init__(self, spec: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(spec.partition(":")[2])
        self.next_id = 0

    def send(self, command, payload=b"", *, flags=0, msg_id=None, size=None) -> int:
        if msg_id is None:
            self.next_id += 1
            msg_id = self.next_id
        size = 16 + len(payload) if size is None else size
        self.sock.sendall(p.HEADER_FAST.pack(msg_id, int(command), size, int(flags), 0) + payload)
        return msg_id

    def recv(self) -> tuple[p.Header, bytes]:
        hdr = p.decode_header(self._exact(16))
        return hdr, self._exact(hdr.payload_size)

    def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError(f"closed after {len(out)} of {n} bytes")
            out += chunk
        return out

    def call(self, command, payload=b"", **kw) -> tuple[p.Header, bytes]:
        msg_id = self.send(command, payload, **kw)
        hdr, data = self.recv()
        assert hdr.msg_id == msg_id and hdr.is_reply
        return hdr, data

    def hello(self) -> None:
        hdr, _ = self.call(
            p.Command.VERSION,
            p.VERSION_REQ.build(dict(major=1, minor=0, features=0xF, name=b"raw")),
        )
        assert not hdr.is_error

    def closed_by_peer(self) -> bool:
        return self.sock.recv(1) == b""

    def close(self) -> None:
        self.sock.close()


def error_of(reply: tuple[p.Header, bytes]) -> tuple[str, str]:
    hdr, data = reply
    assert hdr.is_error, f"expected an error reply, got {hdr.describe()}"
    return p.ProtoError(hdr.error).name, data.decode()


@pytest.fixture
def dev():
    with inproc_device(FakeGpu()) as d:
        yield d


@pytest.fixture
def raw(dev):
    r = Raw(dev.spec)
    yield r
    r.close()


def reg_read(offset, count=1):
    return p.REG_READ_REQ.build(dict(offset=offset, count=count))


def sync(dev) -> DeviceClient:
    """Connect a fresh client: once it is accepted, the previous session has ended."""
    return DeviceClient.connect(dev.spec)


def test_request_before_version_is_refused_with_eproto(raw):
    """The first request must be VERSION; anything else gets EPROTO naming the command."""
    assert error_of(raw.call(p.Command.REG_READ, reg_read(0))) == (
        "EPROTO",
        "VERSION must be the first request on a connection, got REG_READ",
    )
    raw.hello()
    _hdr, data = raw.call(p.Command.REG_READ, reg_read(regs.GPU_ID.offset))
    assert struct.unpack("<III", data) == (0, 1, regs.GPU_ID_VALUE)


def test_wrong_major_version_is_refused(raw):
    reply = raw.call(
        p.Command.VERSION, p.VERSION_REQ.build(dict(major=2, minor=0, features=0, name=b""))
    )
    code, text = error_of(reply)
    assert code == "EPROTO" and "version 2.0 is not supported" in text


def test_unknown_command_gets_enosys(raw):
    raw.hello()
    assert error_of(raw.call(99)) == ("ENOSYS", "unknown command 99")


@pytest.mark.parametrize(
    ("payload", "text"),
    [
        (b"\0" * 4, "REG_READ request payload of 4 bytes is malformed"),
        (b"\0" * 12, "REG_READ request payload has 4 trailing bytes"),
    ],
)
def test_wrong_payload_length_gets_ebadmsg(raw, payload, text):
    """A payload that does not match the command's format is named in the reply."""
    raw.hello()
    code, got = error_of(raw.call(p.Command.REG_READ, payload))
    assert code == "EBADMSG" and got.startswith(text)


def test_payload_on_a_command_without_one_gets_ebadmsg(raw):
    raw.hello()
    assert error_of(raw.call(p.Command.RESET, b"xx")) == (
        "EBADMSG",
        "RESET request takes no payload, got 2 bytes",
    )


def test_reply_without_request_gets_eproto(raw, caplog):
    """A reply frame the device never asked for is an out-of-order frame."""
    raw.hello()
    with caplog.at_level(logging.WARNING, "gemu.device.server"):
        code, text = error_of(raw.call(p.Command.DMA_READ, flags=p.MsgFlags.REPLY, msg_id=77))
        assert code == "EPROTO"
        assert text == "unexpected reply: no DMA_READ request with id 77 is outstanding"
    assert "unexpected reply" in caplog.text


def test_device_to_client_commands_sent_to_the_device_get_eproto(raw):
    raw.hello()
    code, text = error_of(raw.call(p.Command.IRQ, p.IRQ_MSG_FAST.pack(1, 1, 0, 1)))
    assert code == "EPROTO" and text == "IRQ is sent by the device, not to it"


@pytest.mark.parametrize(
    ("offset", "count", "text"),
    [
        (2, 1, "REG_READ offset 0x2 is not 4-byte aligned"),
        (0, 0, "REG_READ count 0 is not in 1..1024"),
        (0, 2000, "REG_READ count 2000 is not in 1..1024"),
        (regs.MMIO_SIZE - 4, 2, "REG_READ of 2 register(s) at 0x1ffc runs past the MMIO window"),
    ],
)
def test_bad_register_access_gets_einval_and_a_guest_error(raw, caplog, offset, count, text):
    raw.hello()
    with caplog.at_level(logging.WARNING):
        code, got = error_of(raw.call(p.Command.REG_READ, reg_read(offset, count)))
    assert code == "EINVAL" and got.startswith(text)
    assert any(r.name == "gemu.device.guest_error" for r in caplog.records)


def test_posted_write_replies_only_on_error(raw):
    """REG_WRITE with NO_REPLY is silent when it works; a failing one still gets an error."""
    raw.hello()
    write = p.REG_WRITE_REQ.build(dict(offset=SCRATCH0, value=5))
    raw.send(p.Command.REG_WRITE, write, flags=p.MsgFlags.NO_REPLY)
    bad = p.REG_WRITE_REQ.build(dict(offset=SCRATCH0 + 1, value=5))
    bad_id = raw.send(p.Command.REG_WRITE, bad, flags=p.MsgFlags.NO_REPLY)
    hdr, data = raw.recv()
    assert hdr.msg_id == bad_id and hdr.is_error and b"not 4-byte aligned" in data
    _, data = raw.call(p.Command.REG_READ, reg_read(SCRATCH0))
    assert struct.unpack("<III", data)[2] == 5


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (8, "frame size 8 is smaller than the header"),
        (p.MAX_MESSAGE + 1, f"frame size {p.MAX_MESSAGE + 1} exceeds the maximum"),
    ],
)
def test_impossible_size_gets_emsgsize_then_disconnect(dev, raw, caplog, size, text):
    """A size field outside [16, MAX_MESSAGE] means framing is lost: EMSGSIZE, then close."""
    raw.hello()
    with caplog.at_level(logging.WARNING, "gemu.device.server"):
        raw.send(p.Command.REG_READ, reg_read(0), size=size)
        code, got = error_of(raw.recv())
        assert code == "EMSGSIZE" and got.startswith(text)
        assert raw.closed_by_peer()
    sync(dev).close()
    assert text in caplog.text


def test_disconnect_mid_header_is_logged_and_the_device_carries_on(dev, caplog):
    """A client that dies after part of a header just closes that connection."""
    r = Raw(dev.spec)
    with caplog.at_level(logging.INFO, "gemu.device.server"):
        r.sock.sendall(b"\x01\x00\x02\x00\x18")
        r.close()
        client = sync(dev)
    assert "closed the connection mid-frame (5 of 16 header bytes)" in caplog.text
    assert client.readl(regs.GPU_ID.offset) == regs.GPU_ID_VALUE
    client.close()


def test_disconnect_mid_payload_is_logged(dev, caplog):
    r = Raw(dev.spec)
    r.hello()
    with caplog.at_level(logging.INFO, "gemu.device.server"):
        r.sock.sendall(p.HEADER_FAST.pack(9, int(p.Command.REG_READ), 24, 0, 0) + b"\0\0\0\0")
        r.close()
        sync(dev).close()
    assert "closed the connection mid-frame (20 of 24 bytes)" in caplog.text


def test_garbage_never_kills_the_device(dev):
    """Random bytes get error replies or a disconnect; the next client is served."""
    import random

    rng = random.Random(1234)
    for _ in range(20):
        r = Raw(dev.spec)
        r.hello()
        r.sock.sendall(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
        r.close()
    client = sync(dev)
    assert client.readl(regs.GPU_ID.offset) == regs.GPU_ID_VALUE
    client.close()
    assert dev.thread.is_alive()


def test_second_client_is_refused_with_ebusy(dev, raw):
    """One client at a time: a second connection gets an EBUSY frame naming the first."""
    raw.hello()
    other = Raw(dev.spec)
    code, text = error_of(other.recv())
    assert code == "EBUSY" and "one client at a time" in text
    assert other.closed_by_peer()
    other.close()
    with pytest.raises(ConnectionError, match="refused the connection: VERSION: EBUSY"):
        DeviceClient.connect(dev.spec)


def test_state_survives_a_reconnect_and_reset_restores_it(dev):
    """Device state outlives a connection; RESET resets the device model."""
    client = DeviceClient.connect(dev.spec)
    client.writel(SCRATCH0, 0xC0FFEE)
    client.close()
    client = sync(dev)
    assert client.readl(SCRATCH0) == 0xC0FFEE
    client.reset()
    assert client.readl(SCRATCH0) == 0
    assert dev.gpu.resets == 1
    client.close()


def test_step_needs_stepped_mode_and_clock_mode_is_validated(dev):
    client = DeviceClient.connect(dev.spec)
    with pytest.raises(Exception, match="STEP needs the STEPPED clock mode"):
        client.step(10, 0)
    with pytest.raises(Exception, match="EINVAL: unknown clock mode 7"):
        client.set_clock_mode(7)
    client.set_clock_mode(p.ClockMode.STEPPED)
    assert dev.gpu.stepped
    result = client.step(10, 1000)
    assert result.executed == 0 and result.clock_ns == 1000
    client.close()


def test_memory_requests_need_memory(dev):
    client = DeviceClient.connect(dev.spec)
    with pytest.raises(Exception, match="ENODEV: MEM_READ: no guest memory is attached"):
        client.mem_read(p.SPACE_PHYS, 0, 4)
    with pytest.raises(Exception, match="ENODEV: MEM_UNMAP: no guest memory is attached"):
        client.detach_memory()
    client.close()


def test_mem_map_validation(raw):
    raw.hello()

    def mem_map(size, flags, base=0):
        return raw.call(
            p.Command.MEM_MAP, p.MEM_MAP_REQ.build(dict(base=base, size=size, flags=flags))
        )

    assert error_of(mem_map(4096, p.MemMapFlags.FD)) == (
        "EINVAL",
        "MEM_MAP has the FD flag but no descriptor came with it",
    )
    assert error_of(mem_map(4096, 3))[1] == "MEM_MAP flags 0x3 must be exactly FD or IN_BAND"
    assert "non-zero multiple of 0x1000" in error_of(mem_map(100, p.MemMapFlags.IN_BAND))[1]
    assert "guest memory starts at 0" in error_of(mem_map(4096, 2, base=4096))[1]
    assert not mem_map(4096, p.MemMapFlags.IN_BAND)[0].is_error
    assert error_of(mem_map(4096, p.MemMapFlags.IN_BAND)) == (
        "EBUSY",
        "guest memory is already attached; send MEM_UNMAP first",
    )


def test_irq_message_comes_before_the_reply_that_caused_it(raw):
    """A register write that lowers the line is followed by the IRQ message, then the reply,
    so a client that has the reply already knows the new line state."""
    raw.hello()
    raw.call(
        p.Command.MEM_MAP, p.MEM_MAP_REQ.build(dict(base=0, size=4096, flags=p.MemMapFlags.IN_BAND))
    )
    raw.send(
        p.Command.REG_WRITE,
        p.REG_WRITE_REQ.build(dict(offset=regs.RING_DOORBELL.offset, value=1)),
        flags=p.MsgFlags.NO_REPLY,
    )
    # the fake CP reads u32 at 0 and writes it + 1 at 4, in band
    hdr, data = raw.recv()
    assert hdr.command == p.Command.DMA_READ and not hdr.is_reply
    assert p.DMA_REQ_FAST.unpack(data) == (0, 4)
    raw.sock.sendall(
        p.encode(
            p.Command.DMA_READ,
            hdr.msg_id,
            p.DMA_REQ_FAST.pack(0, 4) + struct.pack("<I", 41),
            flags=p.MsgFlags.REPLY,
        )
    )
    hdr, data = raw.recv()
    assert hdr.command == p.Command.DMA_WRITE
    assert data == p.DMA_REQ_FAST.pack(4, 4) + struct.pack("<I", 42)
    raw.sock.sendall(
        p.encode(p.Command.DMA_WRITE, hdr.msg_id, p.DMA_REQ_FAST.pack(4, 4), flags=p.MsgFlags.REPLY)
    )
    hdr, data = raw.recv()
    assert hdr.command == p.Command.IRQ and hdr.no_reply
    assert p.IRQ_MSG_FAST.unpack(data)[:3] == (1, 1, 0)
    write_id = raw.send(
        p.Command.REG_WRITE, p.REG_WRITE_REQ.build(dict(offset=regs.IRQ_CLEAR.offset, value=1))
    )
    hdr, data = raw.recv()
    assert hdr.command == p.Command.IRQ and p.IRQ_MSG_FAST.unpack(data)[:3] == (0, 0, 0)
    hdr, _ = raw.recv()
    assert hdr.msg_id == write_id and hdr.is_reply and not hdr.is_error


def test_requests_during_in_band_dma_are_queued_and_answered_in_order(raw):
    """While the device waits for a DMA reply, requests that arrive are handled afterwards."""
    raw.hello()
    raw.call(
        p.Command.MEM_MAP, p.MEM_MAP_REQ.build(dict(base=0, size=4096, flags=p.MemMapFlags.IN_BAND))
    )
    raw.send(
        p.Command.REG_WRITE,
        p.REG_WRITE_REQ.build(dict(offset=regs.RING_DOORBELL.offset, value=1)),
        flags=p.MsgFlags.NO_REPLY,
    )
    dma, _ = raw.recv()
    assert dma.command == p.Command.DMA_READ
    read_id = raw.send(p.Command.REG_READ, reg_read(regs.GPU_ID.offset))
    raw.sock.sendall(
        p.encode(
            p.Command.DMA_READ,
            dma.msg_id,
            p.DMA_REQ_FAST.pack(0, 4) + b"\0" * 4,
            flags=p.MsgFlags.REPLY,
        )
    )
    dma, _ = raw.recv()
    assert dma.command == p.Command.DMA_WRITE
    raw.sock.sendall(
        p.encode(p.Command.DMA_WRITE, dma.msg_id, p.DMA_REQ_FAST.pack(4, 4), flags=p.MsgFlags.REPLY)
    )
    kinds = [raw.recv()[0] for _ in range(2)]
    assert kinds[0].command == p.Command.IRQ
    assert kinds[1].msg_id == read_id and kinds[1].command == p.Command.REG_READ


def test_dma_error_reply_becomes_a_bus_error(dev, raw):
    """A client that fails a DMA request makes the access a bus error in the device model."""
    raw.hello()
    raw.call(
        p.Command.MEM_MAP, p.MEM_MAP_REQ.build(dict(base=0, size=4096, flags=p.MemMapFlags.IN_BAND))
    )
    raw.send(
        p.Command.REG_WRITE,
        p.REG_WRITE_REQ.build(dict(offset=regs.RING_DOORBELL.offset, value=1)),
        flags=p.MsgFlags.NO_REPLY,
    )
    hdr, _ = raw.recv()
    raw.sock.sendall(p.error_frame(hdr, p.ProtoError.EFAULT, "no such memory"))
    hdr, _ = raw.recv()
    assert hdr.command == p.Command.IRQ
    assert "DMA_READ 0x0+0x4 failed on the client" in dev.gpu.bus_errors[0]
    assert "no such memory" in dev.gpu.bus_errors[0]


def test_dma_outside_guest_memory_is_a_bus_error_without_a_message():
    """In-band accesses beyond the mapped size are refused in the device; no DMA message."""
    from gemu.device.memory import BusError

    with inproc_device(FakeGpu(), listen="tcp:127.0.0.1:0") as dev:
        client = DeviceClient.connect(dev.spec)
        with SharedMemory(4096) as mem:
            assert client.attach_memory(mem) == "in-band"
            with pytest.raises(BusError, match="outside guest memory"):
                dev.server._mem.read(4094, 4)  # the loop is idle: safe to poke from here
            assert dev.server.counters["dma_requests"] == 0
            client.close()


def test_stats_reports_device_and_server_counters(dev):
    client = DeviceClient.connect(dev.spec)
    stats = client.stats()
    assert stats["resets"] == 0
    assert stats["server"]["connections"] == 1
    assert stats["client"]["requests"] >= 2
    client.close()


def test_stop_before_serve_forever_is_not_lost():
    """A stop() that comes before the loop starts (SIGTERM right after the ready line) still
    ends serve_forever() at once instead of being overwritten when the loop begins."""
    import tempfile

    from gemu.device.gpu import Gpu
    from gemu.device.server import DeviceServer

    with tempfile.TemporaryDirectory() as tmp:
        server = DeviceServer(Gpu(), f"unix:{tmp}/d.sock")
        server.stop()
        server.serve_forever()  # returns instead of blocking forever
