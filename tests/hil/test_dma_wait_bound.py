"""A client that never answers an in-band DMA request holds the device for DMA_TIMEOUT_S at
most, and new connections are refused (EBUSY) at once meanwhile.

Through the real ``gemu device`` process over TCP (guest memory in band) with its gdb stub: the
client queues a COPY and then drops every DMA_READ the device sends. While the device waits, a
second client gets EBUSY at once; within DMA_TIMEOUT_S the wait fails the access (a CP bus
error, the log names the request), and the gdb stub and the client's own register reads are
answered.
"""

from __future__ import annotations

import socket
import time

from gemu.device.abi import packets as pk
from gemu.device.abi import regs
from gemu.device.abi.enums import CpError, CpState
from gemu.device.gdbstub import frame
from gemu.device.server import DMA_TIMEOUT_S
from gemu.host.demo import Ring
from tests.support.device import attached_client
from tests.support.gdb import spawn_gdb_device
from tests.support.hostile import cp_state
from tests.unit.device.test_server import Raw, error_of

SLACK_S = 1.5  # a loaded 2-core machine may keep the device off its CPU this long


class TcpRaw(Raw):
    def __init__(self, spec: str) -> None:
        host, _, port = spec.partition(":")[2].rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.next_id = 0


def test_an_unanswered_dma_read_fails_within_the_bound_and_others_are_answered():
    with (
        spawn_gdb_device("--listen", "tcp:127.0.0.1:0", wait=False) as dev,
        attached_client(dev.spec, size=1 << 20, reply_timeout=10) as client,
    ):
        assert dev.spec.startswith("tcp:")
        client._serve_dma = lambda *frame: None  # a client that never answers DMA requests
        ring = Ring(client, client.memory, base=0x10000, size=0x1000)
        ring.submit(pk.copy(0x20000, 0x30000, 0x1000, phys=True))
        t0 = time.monotonic()

        other = TcpRaw(dev.spec)
        code, text = error_of(other.recv())
        refused_s = time.monotonic() - t0
        other.sock.close()
        assert code == "EBUSY" and "one client at a time" in text

        with socket.create_connection(("127.0.0.1", dev.gdb_port), timeout=10) as gdb:
            gdb.sendall(frame(b"?"))
            answer = b""
            while b"#" not in answer:  # each recv bounded by the socket timeout
                chunk = gdb.recv(64)
                assert chunk, f"the gdb stub hung up after {answer!r}"
                answer += chunk
            gdb_s = time.monotonic() - t0
            assert answer.startswith(b"+$")
            assert cp_state(client) is CpState.ERROR
            failed_s = time.monotonic() - t0
            code = regs.CP_ERROR.field("CODE").ex(client.readl(regs.CP_ERROR.offset))
            assert code == CpError.BUS_ERROR
        print(
            f"EBUSY after {refused_s * 1e3:.0f} ms, gdb answered after {gdb_s:.2f} s, the CP in "
            f"ERROR after {failed_s:.2f} s (DMA_TIMEOUT_S {DMA_TIMEOUT_S} s)"
        )
        assert refused_s < 1.0
        assert gdb_s < DMA_TIMEOUT_S + SLACK_S
        assert failed_s < DMA_TIMEOUT_S + SLACK_S
        assert "DMA_READ 0x10000+" in dev.log() and "no reply from the client within" in dev.log()
        assert dev.alive()
