"""A gdb client that never reads its replies cannot block the device.

Through the real ``gemu device`` process with its gdb stub: a client connects to the stub and
asks for large memory reads (``m``) in a loop without reading one reply. The register path of
the device's protocol client stays answered meanwhile (measured with
:func:`tests.support.hostile.rtt_while`, wall-clock and the device's CPU time), and once the
stub holds more than ``OUTPUT_CAP`` unread the gdb client is disconnected with one log line.
"""

from __future__ import annotations

import socket
import threading
import time

from gemu.device.abi import regs
from gemu.device.gdbstub import PACKET_SIZE, frame
from gemu.device.server import OUTPUT_CAP
from tests.support.device import attached_client
from tests.support.gdb import spawn_gdb_device
from tests.support.hostile import rtt_while

# the device's own work for one register read, whatever gdb does: the stub takes READ_CHUNK
# bytes of gdb's input per loop iteration (a few dozen `m` requests, about 10 ms of replies);
# taking 64 KiB at once made up to OUTPUT_CAP of replies in one iteration (60-70 ms)
CPU_BOUND_S = 3 * regs.RESPONSE_BOUND_MS / 1000
WALL_CAP_S = 2.0  # generous: a loaded 2-core machine may keep the device off its CPU
DISCONNECT_LINE = "gdb: disconnecting: it leaves its replies unread"


class GdbHog(threading.Thread):
    """Sends ``m`` packets for the largest read the stub answers and reads nothing, until the
    stub hangs up, a send cannot be taken for ``stall_s`` or ``deadline_s`` passes."""

    def __init__(self, port: int, deadline_s: float = 20.0, stall_s: float = 3.0) -> None:
        super().__init__(name="gdb-hog", daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=stall_s)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.deadline = time.monotonic() + deadline_s
        self.sent = 0
        self.ended = ""
        self.rx = b""

    def ask(self, payload: bytes) -> bytes:
        """Send one packet and return its reply (after any ``O`` console output packets)."""
        self.sock.sendall(frame(payload))
        while True:
            reply = self._packet()
            if not reply.startswith(b"O") or reply == b"OK":
                return reply

    def _packet(self) -> bytes:
        while True:
            start = self.rx.find(b"$")
            end = self.rx.find(b"#", start)
            if start >= 0 and end >= 0 and len(self.rx) >= end + 3:
                packet, self.rx = self.rx[start + 1 : end], self.rx[end + 3 :]
                return packet
            chunk = self.sock.recv(65536)  # bounded by the socket timeout
            assert chunk, f"the gdb stub hung up after {self.rx[:80]!r}"
            self.rx += chunk

    def run(self) -> None:
        packet = frame(b"m0,%x" % (PACKET_SIZE // 2))
        try:
            while time.monotonic() < self.deadline:
                self.sock.sendall(packet)
                self.sent += 1
            self.ended = "deadline"
        except OSError as exc:
            self.ended = f"{type(exc).__name__}: {exc}"


def test_a_gdb_client_that_never_reads_cannot_block_the_device():
    with spawn_gdb_device(wait=False) as dev, attached_client(dev.spec, reply_timeout=5) as client:
        hog = GdbHog(dev.gdb_port)
        deadline = time.monotonic() + 10
        while "gdb connected" not in dev.log():  # the listener is served when the loop idles
            assert time.monotonic() < deadline, "the stub did not accept gdb within 10 s"
            time.sleep(0.005)
        assert hog.ask(b"qRcmd," + b"phys".hex().encode())  # reads of guest RAM
        assert len(hog.ask(b"m0,%x" % (PACKET_SIZE // 2))) == PACKET_SIZE  # a full read
        hog.start()
        try:
            rtt = rtt_while(
                client,
                lambda: DISCONNECT_LINE not in dev.log(),
                deadline_s=15.0,
                min_reads=200,
                pid=dev.proc.pid,
            )
            hog.join(timeout=20)
        finally:
            hog.sock.close()
        log = dev.log()
        print(
            f"gdb hog sent {hog.sent} m packets ({hog.ended}); {rtt.reads} register reads, worst "
            f"{rtt.worst_s * 1e3:.1f} ms wall, {rtt.worst_cpu_s * 1e3:.1f} ms device CPU"
        )
        assert log.count(DISCONNECT_LINE) == 1, log[-3000:]
        assert hog.sent * PACKET_SIZE > OUTPUT_CAP  # it did ask for more than the cap
        assert rtt.worst_cpu_s < CPU_BOUND_S
        assert rtt.worst_s < WALL_CAP_S
        assert client.readl(regs.GPU_ID.offset) == regs.GPU_ID_VALUE
        assert dev.alive()
