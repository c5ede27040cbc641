"""The demultiplexing DeviceClient (gemu.device.abi.client) against a scripted device.

The far end of a socket pair plays the device by hand, so each test controls exactly what
arrives between a request and its reply: IRQ messages, DMA requests, replies out of order.
"""

from __future__ import annotations

import socket
import struct
import threading

import pytest

from gemu.device.abi import protocol as p
from gemu.device.abi.client import DeviceClient, DeviceError, DeviceGone, IrqEvent, SharedMemory
from gemu.device.abi.link import SocketConnection


class Script:
    """The device end: read requests, send frames."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(10)

    def recv(self) -> tuple[p.Header, bytes]:
        hdr = p.decode_header(self._exact(16))
        return hdr, self._exact(hdr.payload_size)

    def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("client went away")
            out += chunk
        return out

    def reply(self, hdr: p.Header, payload: bytes = b"") -> None:
        self.sock.sendall(p.encode(hdr.command, hdr.msg_id, payload, flags=p.MsgFlags.REPLY))

    def irq(self, level: int, status: int, mmu: int = 0, seq: int = 1) -> None:
        self.sock.sendall(
            p.encode(
                p.Command.IRQ,
                900 + seq,
                p.IRQ_MSG_FAST.pack(level, status, mmu, seq),
                flags=p.MsgFlags.NO_REPLY,
            )
        )

    def request(self, command, payload: bytes, msg_id: int = 500) -> None:
        self.sock.sendall(p.encode(command, msg_id, payload))


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    client = DeviceClient(SocketConnection(a, "test"))
    dev = Script(b)
    yield client, dev
    client.close()
    b.close()


def serve(fn):
    """Run the device script in a thread; re-raise its failure at join."""
    errors = []

    def run():
        try:
            fn()
        except BaseException as exc:  # surfaced by join()
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()

    def join():
        t.join(10)
        assert not t.is_alive(), "device script hung"
        if errors:
            raise errors[0]

    return join


def read_reply(hdr: p.Header, payload: bytes, value: int) -> bytes:
    offset, count = p.REG_READ_REQ_FAST.unpack(payload)
    return p.encode(
        hdr.command,
        hdr.msg_id,
        struct.pack("<III", offset, count, value),
        flags=p.MsgFlags.REPLY,
    )


def test_irq_between_request_and_reply_is_queued_and_the_reply_returned(pair):
    """An IRQ that arrives before the reply is queued, updates irq_level and reaches on_irq."""
    client, dev = pair
    seen = []
    client.on_irq = seen.append

    def device():
        hdr, payload = dev.recv()
        dev.irq(1, 0x4, 0x1, seq=7)
        dev.sock.sendall(read_reply(hdr, payload, 0xABCD))

    join = serve(device)
    assert client.readl(0x30) == 0xABCD
    join()
    event = IrqEvent(True, 0x4, 0x1, 7)
    assert client.irq_level
    assert seen == [event]
    assert client.wait_irq(0) == event
    assert client.wait_irq(0) is None


def test_dma_requests_are_served_while_waiting_for_a_reply(pair):
    """The device's DMA_WRITE and DMA_READ are answered from SharedMemory mid-request."""
    client, dev = pair
    mem = SharedMemory(8192)
    client._mem = mem  # as attach_memory leaves it, without a MEM_MAP round trip

    def device():
        hdr, payload = dev.recv()
        dev.request(p.Command.DMA_WRITE, p.DMA_REQ_FAST.pack(0x1000, 4) + b"\xde\xad\xbe\xef", 41)
        w, data = dev.recv()
        assert w.is_reply and w.msg_id == 41 and data == p.DMA_REQ_FAST.pack(0x1000, 4)
        dev.request(p.Command.DMA_READ, p.DMA_REQ_FAST.pack(0x1002, 2), 42)
        r, data = dev.recv()
        assert (
            r.is_reply and r.msg_id == 42 and data == p.DMA_REQ_FAST.pack(0x1002, 2) + b"\xbe\xef"
        )
        dev.sock.sendall(read_reply(hdr, payload, 1))

    join = serve(device)
    assert client.readl(0) == 1
    join()
    assert mem.read(0x1000, 4) == b"\xde\xad\xbe\xef"
    assert client.statistics()["dma_served"] == 2
    mem.close()


def test_dma_outside_guest_memory_is_refused_with_efault(pair):
    client, dev = pair
    mem = SharedMemory(4096)
    client._mem = mem

    def device():
        hdr, payload = dev.recv()
        dev.request(p.Command.DMA_READ, p.DMA_REQ_FAST.pack(4090, 16), 43)
        r, data = dev.recv()
        assert r.is_error and p.ProtoError(r.error) is p.ProtoError.EFAULT
        assert data.decode() == "DMA_READ 0xffa+0x10 is outside guest memory (0x1000 bytes)"
        dev.sock.sendall(read_reply(hdr, payload, 2))

    join = serve(device)
    assert client.readl(0) == 2
    join()
    mem.close()


def test_dma_without_memory_is_refused_with_enodev(pair):
    client, dev = pair

    def device():
        hdr, payload = dev.recv()
        dev.request(p.Command.DMA_READ, p.DMA_REQ_FAST.pack(0, 4), 44)
        r, _data = dev.recv()
        assert r.is_error and p.ProtoError(r.error) is p.ProtoError.ENODEV
        dev.sock.sendall(read_reply(hdr, payload, 3))

    join = serve(device)
    assert client.readl(0) == 3
    join()


def test_two_threads_get_their_own_replies_when_they_come_in_reverse(pair):
    """Whichever thread reads stashes the other's reply and wakes it."""
    client, dev = pair
    results = {}

    def device():
        first = dev.recv()
        second = dev.recv()
        for hdr, payload in (second, first):
            offset, _ = p.REG_READ_REQ_FAST.unpack(payload)
            dev.sock.sendall(read_reply(hdr, payload, offset + 1))

    join = serve(device)
    threads = [
        threading.Thread(target=lambda off=off: results.__setitem__(off, client.readl(off)))
        for off in (0x30, 0x34)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    join()
    assert results == {0x30: 0x31, 0x34: 0x35}


def test_error_reply_raises_device_error_with_errno_and_text(pair):
    client, dev = pair

    def device():
        hdr, _ = dev.recv()
        dev.sock.sendall(p.error_frame(hdr, p.ProtoError.EINVAL, "REG_READ offset 0x2 is bad"))

    join = serve(device)
    with pytest.raises(DeviceError) as info:
        client.readl(2)
    join()
    assert info.value.errno == p.ProtoError.EINVAL
    assert str(info.value) == "REG_READ: EINVAL: REG_READ offset 0x2 is bad"


def test_posted_write_errors_are_collected(pair):
    client, dev = pair

    def device():
        hdr, _ = dev.recv()
        assert hdr.no_reply
        dev.sock.sendall(p.error_frame(hdr, p.ProtoError.EINVAL, "unaligned"))
        hdr2, payload = dev.recv()
        dev.sock.sendall(read_reply(hdr2, payload, 5))

    join = serve(device)
    client.writel_posted(0x31, 1)
    assert client.readl(0x30) == 5
    join()
    assert [str(e) for e in client.posted_errors] == ["REG_WRITE: EINVAL: unaligned"]


def test_connection_loss_raises_device_gone_in_every_waiting_thread(pair):
    """When the device goes away, every waiter gets DeviceGone promptly, and so do later calls."""
    client, dev = pair
    errors = []

    def call(off):
        try:
            client.readl(off)
        except DeviceGone as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=call, args=(off,)) for off in (0x30, 0x34)]
    for t in threads:
        t.start()
    dev.recv()
    dev.recv()
    dev.sock.close()
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    assert errors == ["the device closed the connection"] * 2
    with pytest.raises(DeviceGone):
        client.readl(0)


def test_refusal_frame_becomes_device_gone_with_the_reason(pair):
    client, dev = pair
    dev.sock.sendall(
        p.error_frame(p.Header(0, int(p.Command.VERSION), 16, 0, 0), p.ProtoError.EBUSY, "busy")
    )
    dev.sock.close()
    with pytest.raises(DeviceGone, match="refused the connection: VERSION: EBUSY: busy"):
        client.handshake()


def test_wait_irq_times_out_with_none_and_reads_the_socket_itself(pair):
    client, dev = pair
    assert client.wait_irq(0.01) is None
    dev.irq(1, 1)
    assert client.wait_irq(5) == IrqEvent(True, 1, 0, 1)


def test_service_thread_serves_dma_and_irqs_when_nobody_reads(pair):
    """With start_service(), DMA requests are answered while the caller does nothing."""
    client, dev = pair
    mem = SharedMemory(4096)
    mem.write(0, b"gemu")
    client._mem = mem
    client.start_service(interval=0.01)
    dev.request(p.Command.DMA_READ, p.DMA_REQ_FAST.pack(0, 4), 45)
    r, data = dev.recv()
    assert r.msg_id == 45 and data.endswith(b"gemu")
    dev.irq(1, 2)
    assert client.wait_irq(5) == IrqEvent(True, 2, 0, 1)
    client.close()
    mem.close()


def test_shared_memory_is_a_memfd_with_bounds_checks():
    with SharedMemory(8192) as mem:
        assert mem.fd >= 0
        mem.write_u64(8, 0x1122334455667788)
        assert mem.read_u32(8) == 0x55667788
        assert bytes(mem.buf[8:10]) == b"\x88\x77"
        with pytest.raises(ValueError, match=r"\[0x1ffe, 0x2002\) is outside guest memory"):
            mem.read(0x1FFE, 4)
    with pytest.raises(ValueError, match="positive multiple of 4 KiB"):
        SharedMemory(100)
