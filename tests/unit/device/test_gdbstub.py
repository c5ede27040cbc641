"""The gdb stub (gemu.device.gdbstub) at the protocol level, over a real loopback socket.

A DeviceServer runs on a thread with a Gpu whose memory is a plain buffer; the stub is
attached to its loop. A raw client sends packets by hand, so framing, acks, escapes and error
paths are checked byte for byte (the real gdb is in tests/hil/test_gdb.py).
"""

from __future__ import annotations

import socket
import struct
import threading

import pytest

from gemu.device.abi import packets as pk
from gemu.device.abi import regs
from gemu.device.abi.enums import CpState
from gemu.device.gdb_target import CORE_COUNT, REGISTERS, TARGET_XML
from gemu.device.gdbstub import GdbStub, PacketReader, checksum, frame
from gemu.device.gpu import Gpu
from gemu.device.memory import MappedMemory
from tests.support.device import inproc_device
from tests.support.pagetable import PageTable

RING = 0x1000
DATA_VA = 0x40_0000


class RawGdb:
    """A gdb client speaking the remote protocol by hand."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""
        self.ack = True

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("stub closed the connection")
        self.buf += chunk

    def read_byte(self) -> bytes:
        while not self.buf:
            self._more()
        b, self.buf = self.buf[:1], self.buf[1:]
        return b

    def read_packet(self) -> bytes:
        """The next packet's payload (acks skipped), checksum verified, escapes kept."""
        while b"$" not in self.buf:
            self._more()
        self.buf = self.buf[self.buf.index(b"$") :]
        while b"#" not in self.buf or len(self.buf) < self.buf.index(b"#") + 3:
            self._more()
        end = self.buf.index(b"#")
        body, cs = self.buf[1:end], self.buf[end + 1 : end + 3]
        self.buf = self.buf[end + 3 :]
        assert int(cs, 16) == checksum(body)
        if self.ack:
            self.sock.sendall(b"+")
        return body

    def call(self, payload: bytes) -> bytes:
        self.sock.sendall(frame(payload))
        if self.ack:
            assert self.read_byte() == b"+"
        return self.read_packet()

    def monitor(self, text: str) -> str:
        """Run a monitor command (qRcmd); its output from the O packets before OK."""
        self.sock.sendall(frame(b"qRcmd," + text.encode().hex().encode()))
        if self.ack:
            assert self.read_byte() == b"+"
        out = ""
        while True:
            p = self.read_packet()
            if p == b"OK":
                return out
            assert p[:1] == b"O"
            out += bytes.fromhex(p[1:].decode()).decode()

    def close(self) -> None:
        self.sock.close()


def _unescape(data: bytes) -> bytes:
    out, it = bytearray(), iter(data)
    for b in it:
        out.append(next(it) ^ 0x20 if b == 0x7D else b)
    return bytes(out)


@pytest.fixture
def rig():
    """A Gpu with 1 MiB of memory, AS1 mapping DATA_VA (2 pages) and a ring of 3 packets
    submitted while the stub holds the CP (-S); yields (gpu, stub, client)."""
    gpu = Gpu()
    mem = MappedMemory(bytearray(1 << 20))
    gpu.attach_memory(mem)
    pt = PageTable(mem, 0x80000, 0xC0000)
    pt.map(DATA_VA, 0x10000, 0x2000, write=True)
    gpu.mmio_write(regs.as_reg(1, "TRANSTAB_LO").offset, pt.root)
    gpu.mmio_write(regs.as_reg(1, "TRANSCFG").offset, 1)
    gpu.mmio_write(regs.as_reg(1, "COMMAND").offset, 1)
    ring = pk.set_as(1) + pk.write_data(DATA_VA, [0x600DF00D]) + pk.fence(DATA_VA + 8, 5)
    mem.write(RING, ring)
    gpu.mmio_write(regs.RING_BASE_LO.offset, RING)
    gpu.mmio_write(regs.RING_SIZE.offset, 0x1000)
    gpu.mmio_write(regs.CP_CONTROL.offset, 1)
    stub = GdbStub(gpu, "tcp:127.0.0.1:0", wait=True)
    gpu.mmio_write(regs.RING_TAIL.offset, len(ring))
    gpu.mmio_write(regs.RING_DOORBELL.offset, 1)
    with inproc_device(gpu, listen=None) as dev:
        stub.attach(dev.server)
        port = int(stub.address.rpartition(":")[2])
        client = RawGdb(port)
        try:
            yield gpu, stub, client
        finally:
            client.close()
    stub.close()


def test_reader_handles_acks_interrupt_escape_and_run_length():
    """PacketReader: acks/nacks/0x03 outside packets, `}` escapes and `*` run-length inside,
    the checksum over the bytes as sent, and a bad checksum reported, not raised."""
    r = PacketReader()
    body = b"X0*\x22}\x5d"  # '0' repeated 0x22-29 = 5 more times, then an escaped '}'
    events = r.feed(b"+-\x03$" + body + b"#%02x" % checksum(body) + b"$m#00")
    assert events[:3] == [("ack",), ("nack",), ("interrupt",)]
    assert events[3] == ("packet", b"X000000}")
    assert events[4][0] == "bad" and "does not match" in events[4][1]


def test_reader_survives_a_packet_cut_short_and_an_overlong_one():
    """A '$' inside a packet restarts it (the first is reported bad); a packet longer than the
    limit is dropped as bad rather than buffered without bound."""
    r = PacketReader(max_payload=8)
    events = r.feed(b"$abc$" + frame(b"ok")[1:] + frame(b"x" * 20))
    assert events[0] == ("bad", "packet restarted before its end")
    assert events[1] == ("packet", b"ok")
    assert events[2] == ("bad", "packet too long")


def test_handshake_target_xml_and_no_ack_mode(rig):
    """qSupported announces the features gdb needs; qXfer returns the target description in
    m/l chunks; after QStartNoAckMode the stub stops sending '+'."""
    _gpu, _stub, g = rig
    sup = g.call(b"qSupported:multiprocess+;swbreak+")
    assert b"qXfer:features:read+" in sup and b"vContSupported+" in sup
    assert b"QStartNoAckMode+" in sup and b"PacketSize=4000" in sup
    xml, off = b"", 0
    while True:
        chunk = _unescape(g.call(b"qXfer:features:read:target.xml:%x,400" % off))
        xml += chunk[1:]
        off += len(chunk) - 1
        if chunk[:1] == b"l":
            break
        assert chunk[:1] == b"m"
    assert xml == TARGET_XML
    assert g.call(b"qXfer:features:read:other.xml:0,100") == b"E02"
    assert g.call(b"vCont?") == b"vCont;c;C;s;S"
    assert g.call(b"QStartNoAckMode") == b"OK"
    g.ack = False
    g.sock.sendall(frame(b"qAttached"))
    assert g.read_packet() == b"1"  # no '+' before it


def test_bad_checksum_is_nacked_and_nack_resends(rig):
    """A packet with a wrong checksum gets '-' and no reply; a '-' from gdb makes the stub
    send its last packet again."""
    _gpu, stub, g = rig
    g.send_raw(b"$qC#00")
    assert g.read_byte() == b"-"
    assert g.call(b"qC") == b"QC01"
    g.send_raw(b"-")
    assert g.read_packet() == b"QC01"
    assert stub.counters["bad_packets"] == 1


def test_unknown_packets_get_the_empty_reply(rig):
    """Anything the stub does not implement is answered with an empty packet."""
    _gpu, _stub, g = rig
    for packet in (b"vMustReplyEmpty", b"qTStatus", b"!", b"bc", b"Z9,0,4"):
        assert g.call(packet) == b""


def test_registers_memory_and_faults(rig):
    """'g' carries every register of the description; pc is the next packet, x0 the CP state;
    'p' reads an MMIO register; 'm' reads through the ring window and AS1; an unmapped address
    is E14; 'M' and 'X' (binary, escaped) write through the MMU."""
    gpu, _stub, g = rig
    assert g.call(b"?") == b"T05thread:01;"
    raw = bytes.fromhex(g.call(b"g").decode())
    assert len(raw) == sum(r.size for r in REGISTERS)
    assert int.from_bytes(raw[0:8], "little") == CpState.HALTED
    pc = int.from_bytes(raw[32 * 8 : 33 * 8], "little")
    assert pc == RING
    gpu_id_reg = next(r for r in REGISTERS if r.name == "gpu_id")
    assert gpu_id_reg.regnum >= CORE_COUNT
    assert g.call(b"p%x" % gpu_id_reg.regnum) == struct.pack("<I", regs.GPU_ID_VALUE).hex().encode()
    assert g.call(b"p%x" % len(REGISTERS)) == b"E16"
    assert g.call(b"m%x,8" % RING) == pk.set_as(1).hex().encode()
    assert g.call(b"m%x,4" % DATA_VA) == b"E14"  # auto: the CP is still in AS0 (disabled)
    assert g.monitor("as 1") == "memory space: AS1\n"
    assert g.call(b"m%x,4" % (DATA_VA + 0x2000)) == b"E14"
    assert g.call(b"M%x,4:11223344" % DATA_VA) == b"OK"
    assert gpu.mem_read(1, DATA_VA, 4) == bytes.fromhex("11223344")
    data = b"#$}*"  # frame() sends each of these escaped as '}' + (byte ^ 0x20)
    assert b"}\x03}\x04}]}\x0a" in frame(b"X%x,4:" % (DATA_VA + 4) + data)
    assert g.call(b"X%x,4:" % (DATA_VA + 4) + data) == b"OK"
    assert gpu.mem_read(1, DATA_VA + 4, 4) == data
    assert g.call(b"m%x,8" % DATA_VA) == (bytes.fromhex("11223344") + data).hex().encode()
    assert g.call(b"M%x,4:00" % DATA_VA) == b"E16"  # length and data disagree


def test_breakpoint_step_and_continue(rig):
    """Z0 on the FENCE stops the CP before it; a step runs exactly one packet (pc advances by
    its length); 'c' after the last packet leaves the ring idle, Ctrl-C halts it."""
    gpu, stub, g = rig
    write_at = RING + len(pk.set_as(1))
    fence_at = write_at + len(pk.write_data(DATA_VA, [0]))
    assert g.call(b"vCont;s:1") == b"T05thread:01;"
    assert stub.next_pc() == write_at
    assert g.call(b"Z0,%x,4" % fence_at) == b"OK"
    g.sock.sendall(frame(b"vCont;c"))
    assert g.read_byte() == b"+"
    assert g.read_packet() == b"T05thread:01;"
    assert stub.next_pc() == fence_at
    assert gpu.mem_read(1, DATA_VA, 4) == struct.pack("<I", 0x600DF00D)
    assert g.call(b"z0,%x,4" % fence_at) == b"OK"
    assert g.call(b"s") == b"T05thread:01;"
    assert gpu.mem_read(1, DATA_VA + 8, 8) == struct.pack("<Q", 5)
    g.sock.sendall(frame(b"c"))
    assert g.read_byte() == b"+"
    g.send_raw(b"\x03")
    assert g.read_packet() == b"T02thread:01;"
    assert gpu.debug_read(regs.STATUS.offset) & regs.STATUS.field("HALTED").mask


def test_watchpoint_reports_the_address(rig):
    """Z2 on the word WRITE_DATA stores stops after that packet with watch:ADDR and pc on
    the packet that wrote; the step gdb makes over the 'instruction' leaves pc there, the
    next step moves pc to the next packet, neither runs a packet; the one after runs one."""
    gpu, stub, g = rig
    assert g.call(b"Z2,%x,4" % DATA_VA) == b"OK"
    g.sock.sendall(frame(b"c"))
    assert g.read_byte() == b"+"
    assert g.read_packet() == b"T05watch:%x;thread:01;" % DATA_VA
    writer = stub.core_values()["pc"]
    assert writer < gpu.cp.pc()
    packets = gpu.cp.packets
    assert g.call(b"vCont;s:1") == b"T05thread:01;"
    assert gpu.cp.packets == packets and stub.core_values()["pc"] == writer
    assert g.call(b"s") == b"T05thread:01;"
    assert gpu.cp.packets == packets and stub.core_values()["pc"] == gpu.cp.pc()
    assert g.call(b"s") == b"T05thread:01;"
    assert gpu.cp.packets == packets + 1


def test_monitor_commands(rig):
    """qRcmd output comes back as O packets then OK: ring dump, disassembly, walk, mappings,
    fence, help and an unknown command."""
    g = rig[2]
    monitor = g.monitor
    assert "WRITE_DATA 0x400000, [0x600df00d]" in monitor("ring")
    assert "SET_AS as=1" in monitor(f"dis {RING:#x} 1")
    walk = monitor(f"walk {DATA_VA:#x} 1")
    assert "L3" in walk and "=> PA 0x10000" in walk
    assert "0x000000400000-0x000000402000 -> PA 0x10000 rw-" in monitor("mappings 1")
    assert "last FENCE seqno 0" in monitor("fence")
    assert "walk VA [AS]" in monitor("help")
    assert "unknown monitor command 'frob'" in monitor("frob")
    assert "error: no address space 9" in monitor("as 9")
    assert monitor("phys") == "memory space: guest-physical\n"
    assert g.call(b"m%x,4" % 0x10000) != b"E14"


def test_disconnect_mid_packet_lets_the_device_run_on(rig):
    """A gdb that vanishes in the middle of a packet is treated as a detach: breakpoints go,
    the hold is released and the queued ring runs to its fence."""
    gpu, stub, g = rig
    finished = threading.Event()
    stub.server.add_cp_observer(lambda: gpu.cp.packets >= 3 and finished.set())
    assert g.call(b"Z0,%x,4" % (RING + 8)) == b"OK"
    g.send_raw(b"$m10")
    g.close()
    assert finished.wait(timeout=10)
    assert gpu.mem_read(1, DATA_VA + 8, 8) == struct.pack("<Q", 5)
    assert not gpu.cp.halted and stub.conn is None and not stub.breakpoints


def test_second_gdb_is_refused_while_one_is_attached(rig):
    """One gdb at a time: a second connection is closed at once; the first keeps working."""
    _gpu, stub, g = rig
    port = int(stub.address.rpartition(":")[2])
    other = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        assert other.recv(16) == b""  # closed by the stub
    finally:
        other.close()
    assert g.call(b"qC") == b"QC01"
    assert stub.statistics()["connections"] == 1


def test_read_and_access_watchpoints(rig):
    """Z3 (read) ignores the writes of WRITE_DATA and FENCE; Z4 (access) on the fence word
    stops after FENCE with awatch:ADDR."""
    _gpu, _stub, g = rig
    assert g.call(b"Z3,%x,4" % DATA_VA) == b"OK"
    assert g.call(b"Z4,%x,8" % (DATA_VA + 8)) == b"OK"
    g.sock.sendall(frame(b"c"))
    assert g.read_byte() == b"+"
    assert g.read_packet() == b"T05awatch:%x;thread:01;" % (DATA_VA + 8)
