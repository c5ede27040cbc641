"""Fuzz a live ``gemu device`` with hostile frames and command streams.

The fuzzer speaks the wire protocol over a raw UNIX socket (no client library: it must be free
to send anything). It mixes well-formed requests with random arguments, mutated frames that
keep the framing (flipped bytes, wrong commands, wrong flags, cut payloads), frames that break
the framing (the device must answer EMSGSIZE and close), and guest command streams: random and
mutated packets written into a ring in shared guest memory, over random page tables (some
aliasing the whole VA space onto one page, some pointing at themselves), with packets up to
4 GiB, executed with doorbells and STEPs. Everything is seeded.

While streams run, the fuzzer probes the device: once the backlog of its frames is answered,
it times one side-effect-free register read, so the figure is how long the event loop was kept
busy by the CP. Each probe is measured twice: wall-clock, and as the CPU time the device ran
meanwhile (/proc/PID/schedstat), which is the device's own work without the time it waited for
a CPU on a shared machine. The campaign reports deaths, probes slower than the device's stated
bound (``regs.RESPONSE_BOUND_MS``) and the device's RSS growth, and asserts that the device
lived, that no probe kept the device busy for ``STALL_LIMIT_S`` (the bound times ten), and that
RSS grew by less than ``RSS_GROWTH_LIMIT``. Wall-clock is reported and bounded robustly on a
loaded machine: a probe's round trip less the time the device's and the fuzzer's threads waited
on a run queue (schedstat) stays under ``WALL_LIMIT_S`` (a device that blocks does not wait on
a run queue), and the raw round trip under ``HANG_LIMIT_S``. Afterwards a fresh client must
find the device alive and correct: reset values, a job that computes the right CRC, a fence
and its IRQ.

``make test`` runs a short seeded campaign (a few seconds); ``make soak`` runs 1,000,000
frames and 100,000 guest command streams.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass

import pytest

from gemu.device.abi import packets as pk
from gemu.device.abi import protocol as p
from gemu.device.abi import pte, regs
from gemu.device.abi.client import SharedMemory
from gemu.device.abi.enums import CpState, Irq, PteType
from tests.support.device import attached_client, spawn_device
from tests.support.hostile import GiB4, alias_tables, cyclic_table, oncpu_ns, rss_bytes

SEED = 0x6E6D75
FRAMES = 20_000  # make test
STREAMS = 500
SOAK_FRAMES = 1_000_000  # make soak
SOAK_STREAMS = 100_000
PROBE_EVERY = 10  # streams between two stall probes
STALL_LIMIT_S = 10 * regs.RESPONSE_BOUND_MS / 1000
WALL_LIMIT_S = 1.0  # a hang: wall-clock not spent waiting for a CPU (run-queue wait)
HANG_LIMIT_S = 10.0  # a hang, even on a machine loaded enough to explain the rest
RSS_GROWTH_LIMIT = 16 << 20
TABLES = 0x40000
RAM = 4 << 20
RING_PA = 0x10000
RING_SIZE = 0x4000
SENTINEL_ID = 0xFFFF


class Reader(threading.Thread):
    """Drains the device's replies so it never blocks on a full socket, splitting the stream
    into frames (the device's own frames are always well-formed) and remembering sentinels."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.eof = threading.Event()
        self.sentinels: list[tuple[int, bytes]] = []
        self.got_sentinel = threading.Condition()
        self.frames = 0
        self.errors = 0

    def run(self) -> None:
        buf = bytearray()
        try:
            while True:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
                while len(buf) >= p.HEADER_SIZE:
                    msg_id, _cmd, size, flags, error = p.HEADER_FAST.unpack_from(buf)
                    assert p.HEADER_SIZE <= size <= p.MAX_MESSAGE, "device sent a bad frame"
                    if len(buf) < size:
                        break
                    payload = bytes(buf[p.HEADER_SIZE : size])
                    del buf[:size]
                    self.frames += 1
                    if flags & p.MsgFlags.ERROR:
                        self.errors += 1
                    if msg_id == SENTINEL_ID and flags & p.MsgFlags.REPLY:
                        with self.got_sentinel:
                            self.sentinels.append((error, payload))
                            self.got_sentinel.notify_all()
        except OSError:
            pass
        finally:
            self.eof.set()
            with self.got_sentinel:
                self.got_sentinel.notify_all()


class Fuzzer:
    def __init__(self, spec: str, rng: random.Random) -> None:
        self.path = spec.removeprefix("unix:")
        self.rng = rng
        self.mem = SharedMemory(RAM)
        self.sent = 0
        self.reconnects = 0
        self.streams = 0
        self.sock: socket.socket | None = None
        self.reader: Reader | None = None
        self.past_replies = 0
        self.past_errors = 0
        self.connect()

    # --- connection --------------------------------------------------------------------------

    def connect(self) -> None:
        if self.sock is not None:
            self.close()
            self.past_replies += self.reader.frames
            self.past_errors += self.reader.errors
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)
        self.reader = Reader(self.sock)
        self.reader.start()
        self.send(
            self.frame(
                p.Command.VERSION,
                p.VERSION_REQ.build(
                    dict(major=p.PROTOCOL_MAJOR, minor=0, features=0, name=b"fuzz")
                ),
            )
        )
        req = p.MEM_MAP_REQ.build(dict(base=0, size=RAM, flags=p.MemMapFlags.FD, reserved=0))
        socket.send_fds(self.sock, [self.frame(p.Command.MEM_MAP, req)], [self.mem.fd])
        self.reconnects += 1

    def close(self) -> None:
        # shutdown() first: the reader thread is blocked in recv() on this socket, and on Linux
        # close() alone would leave the connection open under it.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.reader.join(timeout=10)
        assert not self.reader.is_alive(), "reader thread did not stop"

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            self.connect()
            return False

    def frame(
        self, command: int, payload: bytes = b"", flags: int = 0, msg_id: int | None = None
    ) -> bytes:
        mid = self.rng.randrange(0xFFFF) if msg_id is None else msg_id
        return p.HEADER_FAST.pack(mid, command, p.HEADER_SIZE + len(payload), flags, 0) + payload

    def debug_read(self, offset: int) -> int:
        """A side-effect-free register read, answered after everything sent before it."""
        before = len(self.reader.sentinels)
        self.send(
            self.frame(
                p.Command.DEBUG_READ, p.REG_READ_REQ_FAST.pack(offset, 1), msg_id=SENTINEL_ID
            )
        )
        with self.reader.got_sentinel:
            self.reader.got_sentinel.wait_for(
                lambda: len(self.reader.sentinels) > before or self.reader.eof.is_set(), timeout=30
            )
        assert len(self.reader.sentinels) > before, "device stopped answering"
        error, payload = self.reader.sentinels[-1]
        assert error == 0
        return struct.unpack_from("<I", payload, 8)[0]

    def check_alive(self) -> None:
        """A side-effect-free read of GPU_ID must come back right, now."""
        assert self.debug_read(regs.GPU_ID.offset) == regs.GPU_ID_VALUE

    def probe(self, pid: int) -> Probe:
        """One register read once the backlog is answered (the CP may be busy): its wall-clock
        seconds, the CPU seconds the device ran meanwhile and the seconds the device and this
        process waited for a CPU."""
        self.check_alive()
        c0 = oncpu_ns(pid)
        q0 = runqueue_ns(pid) + runqueue_ns(os.getpid())
        t0 = time.perf_counter()
        self.check_alive()
        wall = time.perf_counter() - t0
        queued = (runqueue_ns(pid) + runqueue_ns(os.getpid()) - q0) / 1e9
        return Probe(wall, (oncpu_ns(pid) - c0) / 1e9, queued)

    @property
    def replies(self) -> int:
        return self.past_replies + self.reader.frames

    @property
    def error_replies(self) -> int:
        return self.past_errors + self.reader.errors

    # --- frames ------------------------------------------------------------------------------

    def random_payload(self, command: int) -> bytes:
        r = self.rng
        reg = (
            r.choice(regs.REGISTER_MAP.registers).offset
            if r.random() < 0.8
            else r.randrange(1 << 32)
        )
        if command in (p.Command.REG_READ, p.Command.DEBUG_READ):
            return p.REG_READ_REQ_FAST.pack(reg, r.choice([0, 1, 2, 7, 64, 1024, 1025, 1 << 31]))
        if command == p.Command.REG_WRITE:
            return p.REG_WRITE_REQ_FAST.pack(reg, r.randrange(1 << 32))
        if command == p.Command.MEM_READ:
            space = r.choice([p.SPACE_PHYS, 0, 1, 7, 8, r.randrange(1 << 32)])
            size = r.choice([0, 1, 4, 4096, p.MAX_DMA, p.MAX_DMA + 1, r.randrange(1 << 32)])
            return p.MEM_REQ_FAST.pack(space, size, r.randrange(RAM * 2))
        if command == p.Command.MEM_WRITE:
            space = r.choice([p.SPACE_PHYS, 0, 3, r.randrange(1 << 32)])
            data = r.randbytes(r.choice([0, 1, 8, 300]))
            return p.MEM_REQ_FAST.pack(space, len(data), r.randrange(RAM * 2)) + data
        if command == p.Command.STEP:
            return p.STEP_REQ.build(
                dict(max_packets=r.randrange(64), reserved=0, ticks_ns=r.randrange(1 << 40))
            )
        if command == p.Command.CLOCK_MODE:
            return struct.pack("<I", r.choice([0, 0, 1, 2, r.randrange(1 << 32)]))
        if command == p.Command.VERSION:
            return p.VERSION_REQ.build(
                dict(
                    major=r.choice([1, 1, 2, 0]),
                    minor=r.randrange(5),
                    features=r.randrange(16),
                    name=r.randbytes(r.randrange(8)),
                )
            )
        if command in (p.Command.DMA_READ, p.Command.DMA_WRITE):
            return p.DMA_REQ_FAST.pack(r.randrange(1 << 64), r.randrange(1 << 16))
        return r.randbytes(r.randrange(32))

    def safe_command(self) -> int:
        # RESET and MEM_UNMAP/MEM_MAP are allowed but rare, so streams get to run.
        r = self.rng.random()
        if r < 0.002:
            return p.Command.RESET
        if r < 0.003:
            return p.Command.MEM_UNMAP
        return self.rng.choice(
            [
                p.Command.REG_READ,
                p.Command.REG_WRITE,
                p.Command.DEBUG_READ,
                p.Command.MEM_READ,
                p.Command.MEM_WRITE,
                p.Command.STEP,
                p.Command.CLOCK_MODE,
                p.Command.STATS,
                p.Command.VERSION,
                p.Command.IRQ,
                p.Command.DMA_READ,
                p.Command.DMA_WRITE,
                p.Command.REG_READ,
                p.Command.REG_WRITE,
            ]
        )

    def one_frame(self) -> None:
        r = self.rng
        kind = r.random()
        if kind < 0.45:  # well-formed request, random arguments
            cmd = self.safe_command()
            flags = p.MsgFlags.NO_REPLY if r.random() < 0.2 else 0
            data = self.frame(cmd, self.random_payload(cmd), flags)
        elif kind < 0.85:  # mutated, framing kept
            cmd = self.safe_command()
            data = bytearray(self.frame(cmd, self.random_payload(cmd)))
            what = r.randrange(5)
            if what == 0 and len(data) > p.HEADER_SIZE:
                for _ in range(r.randrange(1, 4)):
                    i = r.randrange(p.HEADER_SIZE, len(data))
                    data[i] = r.randrange(256)
            elif what == 1:
                struct.pack_into("<H", data, 2, r.randrange(1 << 16))
            elif what == 2:
                struct.pack_into("<I", data, 8, r.randrange(1 << 32))
            elif what == 3:
                cut = r.randrange(p.HEADER_SIZE, len(data) + 1)
                data = data[:cut]
                struct.pack_into("<I", data, 4, len(data))
            else:
                data += r.randbytes(r.randrange(1, 40))
                struct.pack_into("<I", data, 4, len(data))
            data = bytes(data)
        elif kind < 0.8503:  # framing lost: the device answers and hangs up
            size = r.choice([0, 5, 15, p.MAX_MESSAGE + 1, 0xFFFFFFFF])
            data = p.HEADER_FAST.pack(1, p.Command.REG_READ, size, 0, 0)
            if self.send(data):
                assert self.reader.eof.wait(30), f"device kept a connection after size={size}"
                self.connect()
            self.sent += 1
            return
        else:  # random bytes in a plausible header
            payload = r.randbytes(r.randrange(64))
            data = (
                p.HEADER_FAST.pack(
                    r.randrange(1 << 16),
                    r.randrange(1 << 16),
                    p.HEADER_SIZE + len(payload),
                    r.randrange(1 << 32),
                    r.randrange(1 << 32),
                )
                + payload
            )
        self.send(data)
        self.sent += 1

    # --- command streams ---------------------------------------------------------------------

    def random_page_tables(self) -> int:
        """Write a small, partly valid and partly hostile page table; return its root. One in
        ten aliases the whole VA space onto one page, one in twenty points at itself."""
        r = self.rng
        kind = r.random()
        if kind < 0.1:
            return alias_tables(self.mem, TABLES)
        if kind < 0.15:
            return cyclic_table(self.mem, TABLES + r.randrange(16) * 0x1000)
        root = 0x40000 + r.randrange(16) * 0x1000
        for table in range(0x40000, 0x50000, 0x1000):
            for _ in range(r.randrange(1, 12)):
                idx = r.randrange(512)
                if r.random() < 0.7:
                    target = r.choice(
                        [
                            0x40000 + r.randrange(16) * 0x1000,
                            r.randrange(RAM // 4096) * 4096,
                            r.randrange(1 << 36) << 12 & pte.ADDR_MASK,
                        ]
                    )
                    entry = pte.make(
                        target,
                        r.choice(list(PteType)[1:3]),
                        read=r.random() < 0.8,
                        write=r.random() < 0.6,
                        exec=r.random() < 0.5,
                    )
                else:
                    entry = r.randrange(1 << 64)
                self.mem.write_u64(table + idx * 8, entry)
        return root

    def random_packet(self) -> bytes:
        r = self.rng
        va = r.choice(
            [r.randrange(1 << 48), r.randrange(RAM), 0, (1 << 48) - 8, r.randrange(1 << 64)]
        )
        choice = r.randrange(14)
        phys = r.random() < 0.4
        small = r.choice([0, 1, 4, 64, 4096, 70000, 70000, 3 << 20, 1 << 30, GiB4])
        try:
            if choice == 0:
                return pk.nop(r.randrange(4))
            if choice == 1:
                return pk.set_as(r.choice([0, 1, 7, 8, 1 << 31]))
            if choice == 2:
                return pk.write_data(
                    va & ~3, [r.randrange(1 << 32) for _ in range(r.randrange(1, 4))], phys=phys
                )
            if choice == 3:
                return pk.copy(va, r.randrange(RAM), small, phys=phys)
            if choice == 4:
                return pk.fill(va, small, r.randrange(1 << 32), phys=phys)
            if choice == 5:
                return pk.crc32(va, small, r.randrange(RAM) & ~3, phys=phys)
            if choice == 6:
                return pk.atomic_add(va & ~7, r.randrange(1 << 64), phys=phys)
            if choice == 7:
                return pk.fence(va & ~7, r.randrange(1 << 64), irq=r.random() < 0.5, phys=phys)
            if choice == 8:
                return pk.wait_mem(
                    va & ~3, r.randrange(4), timeout_us=r.choice([1, 10, 100]), phys=phys
                )
            if choice == 9:
                return pk.indirect_buffer(va & ~3, r.randrange(64))
            if choice == 10:
                return pk.tlb_invalidate(r.randrange(9), va & ~0xFFF, r.randrange(1 << 20))
            if choice == 11:  # unknown opcode or reserved flags
                n = r.randrange(4)
                head = struct.pack("<BBH", r.randrange(0x0B, 0x100), r.randrange(256), n)
                return head + r.randbytes(4 * n)
        except ValueError:
            pass
        # a valid packet with a corrupted header
        raw = bytearray(pk.fence(0x1000, 1, phys=True))
        raw[r.randrange(4)] = r.randrange(256)
        return bytes(raw)

    def one_stream(self) -> None:
        r = self.rng
        root = self.random_page_tables()
        ring = b"".join(self.random_packet() for _ in range(r.randrange(1, 24)))[: RING_SIZE - 64]
        ring = ring[: len(ring) & ~3]
        self.mem.write(RING_PA, ring + b"\0" * (RING_SIZE - len(ring)))
        writes = [
            (regs.CP_CONTROL.offset, 0),
            (regs.CP_CONTROL.offset, 4),  # RESET_HEAD
            (regs.RING_BASE_LO.offset, RING_PA),
            (regs.RING_BASE_HI.offset, 0),
            (regs.RING_SIZE.offset, RING_SIZE),
        ]
        for as_index in range(r.randrange(1, 3)):
            writes += [
                (regs.as_reg(as_index, "TRANSTAB_LO").offset, root),
                (regs.as_reg(as_index, "TRANSCFG").offset, r.choice([0, 1, 1, 7])),
                (regs.as_reg(as_index, "COMMAND").offset, r.choice([1, 1, 4, r.randrange(256)])),
            ]
        writes += [
            (regs.IRQ_MASK.offset, 0x1F),
            (regs.MMU_INT_MASK.offset, 0xFFFFFFFF),
            (regs.CP_CONTROL.offset, 1),
            (regs.RING_TAIL.offset, len(ring) if r.random() < 0.9 else r.randrange(1 << 32)),
            (regs.RING_DOORBELL.offset, 1),
        ]
        for _ in range(r.randrange(4)):
            writes.append((regs.CP_CONTROL.offset, 3))  # RESUME after errors
            writes.append((regs.MMU_INT_CLEAR.offset, 0xFFFFFFFF))
        data = b"".join(
            self.frame(p.Command.REG_WRITE, p.REG_WRITE_REQ_FAST.pack(o, v), p.MsgFlags.NO_REPLY)
            for o, v in writes
        )
        if r.random() < 0.3:
            data += self.frame(
                p.Command.STEP, p.STEP_REQ.build(dict(max_packets=64, reserved=0, ticks_ns=1 << 20))
            )
        self.send(data)
        self.sent += len(writes)
        self.streams += 1


def runqueue_ns(pid: int) -> int:
    """Nanoseconds the threads of process ``pid`` waited on a run queue (runnable, no CPU
    free; the second field of /proc/PID/task/TID/schedstat): the machine's load, not theirs."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[1])
    return total


@dataclass
class Probe:
    wall_s: float  # the register read's round trip
    cpu_s: float  # the device's CPU time meanwhile
    queued_s: float  # the device's and the fuzzer's threads waiting for a CPU meanwhile

    @property
    def unexplained_s(self) -> float:
        """Wall-clock time no run-queue wait accounts for: what a device that blocks (a hang)
        adds, while a loaded machine only adds run-queue wait."""
        return max(0.0, self.wall_s - self.queued_s)


@dataclass
class Campaign:
    """What one fuzzing campaign saw."""

    frames: int
    streams: int
    connections: int
    replies: int
    error_replies: int
    deaths: int
    probes: int
    worst_probe_s: float  # wall-clock
    worst_probe_queued_s: float  # run-queue wait during the probe with the worst wall-clock
    worst_unexplained_s: float  # wall-clock minus run-queue wait, worst
    worst_probe_cpu_s: float  # the device's CPU time during that kind of probe, worst
    probes_over_bound: int  # wall-clock over the stated bound
    cpu_over_bound: int  # device CPU time over the stated bound
    rss_growth: int

    def __str__(self) -> str:
        return (
            f"fuzz: {self.frames} frames, {self.streams} guest command streams, "
            f"{self.connections} connections, {self.replies} replies ({self.error_replies} "
            f"errors); deaths {self.deaths}; {self.probes} probes: worst "
            f"{self.worst_probe_s * 1e3:.2f} ms wall-clock ({self.worst_probe_queued_s * 1e3:.2f} "
            f"ms of it waiting for a CPU; {self.probes_over_bound} over "
            f"{regs.RESPONSE_BOUND_MS} ms), worst {self.worst_unexplained_s * 1e3:.2f} ms "
            f"wall-clock not spent waiting for a CPU, worst {self.worst_probe_cpu_s * 1e3:.2f} ms of "
            f"device CPU ({self.cpu_over_bound} over {regs.RESPONSE_BOUND_MS} ms); device RSS "
            f"growth {self.rss_growth / 2**20:.1f} MiB"
        )


def warm_up(fuzz: Fuzzer) -> None:
    """Fill the device's TLB to its capacity (bounded, but megabytes) before RSS is measured:
    a 512 MiB FILL (131,072 pages) over the aliasing tables, waited for."""
    root = alias_tables(fuzz.mem, TABLES)
    fuzz.mem.write(RING_PA, pk.fill(1 << 40, 512 << 20, 0))
    writes = [
        (regs.CP_CONTROL.offset, 0),
        (regs.CP_CONTROL.offset, 4),
        (regs.RING_BASE_LO.offset, RING_PA),
        (regs.RING_SIZE.offset, RING_SIZE),
        (regs.as_reg(0, "TRANSTAB_LO").offset, root),
        (regs.as_reg(0, "TRANSCFG").offset, 1),
        (regs.as_reg(0, "COMMAND").offset, 1),
        (regs.CP_CONTROL.offset, 1),
        (regs.RING_TAIL.offset, len(pk.fill(0, 0, 0))),
        (regs.RING_DOORBELL.offset, 1),
    ]
    fuzz.send(
        b"".join(
            fuzz.frame(p.Command.REG_WRITE, p.REG_WRITE_REQ_FAST.pack(o, v), p.MsgFlags.NO_REPLY)
            for o, v in writes
        )
    )
    state = regs.CP_STATUS.field("STATE")
    deadline = time.monotonic() + 60
    while state.ex(fuzz.debug_read(regs.CP_STATUS.offset)) == CpState.RUNNING:
        assert time.monotonic() < deadline, "the warm-up FILL did not finish in 60 s"


def run_campaign(frames: int, streams: int, seed: int) -> Campaign:
    """Fuzz a fresh device process with ``frames`` frames and ``streams`` guest command
    streams; then check it answers correctly; return what was seen."""
    rng = random.Random(seed)
    stream_share = max(0.02, streams / frames)  # both targets are reached about together
    with spawn_device(log_level="error") as dev:
        fuzz = Fuzzer(dev.spec, rng)
        probes: list[Probe] = []
        try:
            warm_up(fuzz)
            rss0 = rss_bytes(dev.proc.pid)
            while fuzz.sent < frames or fuzz.streams < streams:
                if fuzz.streams < streams and rng.random() < stream_share:
                    fuzz.one_stream()
                    if fuzz.streams % PROBE_EVERY == 0:
                        probes.append(fuzz.probe(dev.proc.pid))
                else:
                    fuzz.one_frame()
                if fuzz.sent % 10_000 < 1 and fuzz.sent:
                    fuzz.check_alive()
            fuzz.check_alive()
            rss_growth = rss_bytes(dev.proc.pid) - rss0
            assert fuzz.error_replies > frames // 10, "the fuzzer hardly provoked any error replies"
        finally:
            fuzz.close()
            fuzz.mem.close()
        worst = max(probes, key=lambda q: q.wall_s, default=Probe(0.0, 0.0, 0.0))
        campaign = Campaign(
            frames=fuzz.sent,
            streams=fuzz.streams,
            connections=fuzz.reconnects,
            replies=fuzz.replies,
            error_replies=fuzz.error_replies,
            deaths=0 if dev.alive() else 1,
            probes=len(probes),
            worst_probe_s=worst.wall_s,
            worst_probe_queued_s=worst.queued_s,
            worst_unexplained_s=max((q.unexplained_s for q in probes), default=0.0),
            worst_probe_cpu_s=max((q.cpu_s for q in probes), default=0.0),
            probes_over_bound=sum(q.wall_s > regs.RESPONSE_BOUND_MS / 1000 for q in probes),
            cpu_over_bound=sum(q.cpu_s > regs.RESPONSE_BOUND_MS / 1000 for q in probes),
            rss_growth=rss_growth,
        )
        print(campaign)
        assert campaign.deaths == 0, "the device process died:\n" + dev.log()[-3000:]
        assert fuzz.sent >= frames and fuzz.streams >= streams
        assert campaign.worst_probe_cpu_s < STALL_LIMIT_S, str(campaign)
        assert campaign.worst_unexplained_s < WALL_LIMIT_S, str(campaign)
        assert campaign.worst_probe_s < HANG_LIMIT_S, str(campaign)
        assert campaign.rss_growth < RSS_GROWTH_LIMIT, str(campaign)
        check_correct(dev.spec)
        assert dev.alive()
    return campaign


def check_correct(spec: str) -> None:
    """A fresh client finds reset values, a right CRC and a fence with its IRQ."""
    with attached_client(spec, size=RAM) as client:
        client.set_clock_mode(p.ClockMode.FREE)
        client.reset()
        assert client.readl(regs.GPU_ID.offset) == regs.GPU_ID_VALUE
        assert client.readl(regs.IRQ_MASK.offset) == 0
        assert client.readl(regs.RING_HEAD.offset) == 0
        assert (
            regs.CP_STATUS.field("STATE").ex(client.readl(regs.CP_STATUS.offset)) == CpState.STOPPED
        )
        mem = client.memory
        data_pa, crc_pa, fence_pa = 0x100000, 0x200000, 0x3000
        job = (
            pk.fill(data_pa, 8192, 0x5A5A1234, phys=True)
            + pk.crc32(data_pa, 8192, crc_pa, phys=True)
            + pk.fence(fence_pa, 42, irq=True, phys=True)
        )
        mem.write(RING_PA, job)
        client.writel(regs.RING_BASE_LO.offset, RING_PA)
        client.writel(regs.RING_SIZE.offset, RING_SIZE)
        client.writel(regs.IRQ_MASK.offset, int(Irq.FENCE | Irq.CP_ERROR))
        client.writel(regs.CP_CONTROL.offset, 1)
        client.writel(regs.RING_TAIL.offset, len(job))
        client.writel_posted(regs.RING_DOORBELL.offset, 1)
        # The device tells a new client the interrupt line as it is (level-triggered), so
        # the queue may start with the campaign's last FENCE interrupt, from before the
        # reset: wait for the one that comes with this job's fence written.
        event = client.wait_irq(timeout=30)
        while event is not None and not (
            event.irq_status & Irq.FENCE and mem.read_u64(fence_pa) == 42
        ):
            event = client.wait_irq(timeout=30)
        assert event is not None and event.irq_status & Irq.FENCE
        assert mem.read_u64(fence_pa) == 42
        expected = zlib.crc32(struct.pack("<I", 0x5A5A1234) * 2048)
        assert mem.read_u32(crc_pa) == expected


def test_device_survives_hostile_frames_and_guest_command_streams():
    """A short seeded campaign (make test): 20,000 random and mutated frames and 500 guest
    command streams (aliasing and cyclic page tables, packets up to 4 GiB): no death, no probe
    over STALL_LIMIT_S, RSS flat, and the device answers correctly afterwards."""
    run_campaign(FRAMES, STREAMS, SEED)


@pytest.mark.soak
def test_soak_a_million_frames_and_100k_guest_command_streams():
    """The long campaign (make soak): 1,000,000 frames and 100,000 guest command streams."""
    run_campaign(SOAK_FRAMES, SOAK_STREAMS, SEED + 1)
