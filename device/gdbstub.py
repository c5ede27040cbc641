"""DOC: a GDB remote-serial-protocol stub for the device model (``gemu device --gdb``).

The stub lives in the device process and is served from the :class:`DeviceServer` loop
(``add_reader`` for its sockets, ``add_cp_observer`` to look at the command processor after
each batch), so it needs no thread or lock. It reads device state only through the
side-effect-free debug path (:meth:`Gpu.debug_read`, :meth:`Gpu.mem_read`, ``walk``,
``mappings``) and controls execution through the debugger hooks of :class:`Gpu`::

    stub = GdbStub(gpu, "tcp::1234", wait=True)   # -S: the CP is held until gdb continues
    stub.attach(server)
    server.serve_forever()

What gdb sees (``docs/gdb.md`` is the user guide):

- an aarch64 target (:mod:`.gdb_target`): ``pc`` is the next packet, x0.. the CP state, plus
  every MMIO register by name in group ``gpu``; ``P`` writes an MMIO register (a real write)
  or ``pc`` (moves the CP to another packet), ``G`` the registers that changed;
- memory through the selected space: ``auto`` (the ring's guest-physical window, else the
  CP's current AS), ``as N`` or ``phys`` (``monitor as N`` / ``monitor phys`` / ``monitor
  auto``); a failed translation is answered ``E14``;
- ``Z0``/``Z1`` stop the CP *before* the packet at that address (a ring PA or an IB VA; ``monitor
  break-space`` ties an address to one space), a step executes exactly one packet (one larger
  than a CP slice goes on in the loop, the reply comes when it completed), ``Z2``/``Z3``/``Z4``
  stop after the packet whose DMA touched the range (``watch:``/``rwatch:``/``awatch:ADDR``,
  pc shown on that packet until the next step), a CP error stops with a signal (SIGSEGV MMU
  fault, SIGBUS bus error or alignment, SIGALRM WAIT_MEM timeout, SIGILL a bad packet) and
  holds the error's interrupts from the guest until gdb continues, a 0x03 byte halts, ``D``
  (or a dropped connection) lets the device run on;
- the ring as gdb's one thread, named after the job it runs (``qThreadExtraInfo``,
  ``qXfer:threads:read``); jobs (the ring packets up to a FENCE, :func:`ring_jobs`) listed and
  broken on by ``monitor jobs`` / ``break-job`` / ``break-next-job``;
- ``monitor`` commands (``qRcmd``): see :data:`MONITOR_HELP`.

Replies never block the device: what gdb does not read waits in a per-connection buffer,
flushed when its socket is writable; a gdb that leaves more than the device's ``OUTPUT_CAP``
(4 MiB) unread is disconnected with one log line, as a protocol client would be.

While gdb holds the CP, STATUS.HALTED reads 1 and the device clock stands still; the guest keeps
running and its driver does not count the hold against a job. All-stop only, one gdb at a
time; gdb's input is taken READ_CHUNK bytes per loop iteration.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape as escape_xml

from . import transport
from .abi import packets as pk
from .abi import regs
from .abi.enums import AccessType, CpError, CpState, MmuFault, Opcode
from .abi.protocol import SPACE_PHYS
from .cp import BUDGET as CP_BUDGET
from .gdb_target import PC_REGNUM, REGISTERS, TARGET_XML
from .mmu import MemFault, perms_str
from .server import OUTPUT_CAP
from .symfile import CommandBuffer, read_symbols, symbolize

log = logging.getLogger("gemu.device.gdbstub")

MONITOR_MAX_RUNS = 512  # mapped ranges `monitor mappings` prints at most
MONITOR_MAX_ALIASES = 16  # cycle/alias lines it prints at most (the rest are counted)
PACKET_SIZE = 0x4000  # the largest packet we accept and announce (PacketSize, hex)
MAX_PAYLOAD = PACKET_SIZE * 4  # a packet longer than this (after run-length) is dropped
MAX_LISTED = 4096  # packets listed by one `monitor dis` / `monitor ring`
# bytes of gdb's input taken per loop iteration: what is left stays in the socket, which then
# reads as ready again, so a burst of requests (a gdb pipelining `m` reads it never collects)
# is answered a few dozen at a time and the device serves its client in between
READ_CHUNK = 256

# gdb's own signal numbers (gdb/signals.def), which the remote protocol uses
SIGINT, SIGILL, SIGTRAP, SIGBUS, SIGSEGV, SIGALRM = 2, 4, 5, 10, 11, 14
EFAULT, EINVAL, ENOENT = "E14", "E16", "E02"

ERROR_SIGNALS = {
    CpError.MMU_FAULT: SIGSEGV,
    CpError.BUS_ERROR: SIGBUS,
    CpError.NO_MEMORY: SIGBUS,
    CpError.BAD_ALIGNMENT: SIGBUS,
    CpError.WAIT_TIMEOUT: SIGALRM,
}  # every other CP error is a bad packet: SIGILL

MONITOR_HELP = """\
gemu GPU monitor commands:
  help                 this text
  status               CP state, pc, ring and the memory space gdb uses
  ring [N]             ring registers and the packets from RING_HEAD to the tail (at most N)
  dis ADDR [N]         disassemble N packets (default 8) at ADDR in the current space
  walk VA [AS]         page-table walk of VA (default: the CP's current AS)
  mappings [AS]        mapped ranges of an AS (default: the CP's current AS); at most 512
                       shown; a table reached twice is shown as cycle/alias, not followed
  fence                latched FENCE seqno and fence interrupt state
  fault                why the CP stopped: CP_ERROR and every latched MMU fault
  reset                soft-reset the device (CONTROL.SOFT_RESET)
  as N | phys | auto   memory space for x/set/break/watch: AS N, guest-physical, or auto
                       (the ring's physical window, else the CP's current AS)
  break-space ADDR as N|phys|any
                       breakpoints at ADDR hit only in IBs of AS N, only in the ring, or
                       anywhere (the default); no ADDR: list the qualified addresses
  symbol-file [PATH|clear]
                       command buffer names from a gemu symbol file, which core files
                       then carry (`monitor status` names pc by them)
  jobs                 jobs on the ring: seqno (its FENCE), AS, ring range, IBs, fences, state
  break-job SEQNO      stop before the first packet of the job whose FENCE writes SEQNO
  break-next-job [AS]  stop before the first packet of the next job (of address space AS)
  break-job list|clear job breakpoints set, or remove them all
"""

_HEX = b"0123456789abcdef"
_ESCAPED = frozenset(b"#$}*")
_NEEDS_ESCAPE = re.compile(rb"[#$}*]")


# --- framing -------------------------------------------------------------------------------


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def escape(payload: bytes) -> bytes:
    """Binary-escape ``#$}*`` as ``}`` followed by the byte XOR 0x20."""
    if _NEEDS_ESCAPE.search(payload) is None:
        return payload
    out = bytearray()
    for b in payload:
        if b in _ESCAPED:
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def frame(payload: bytes) -> bytes:
    """``$payload#cc`` with the payload escaped."""
    body = escape(payload)
    return b"$" + body + b"#%02x" % checksum(body)


class PacketReader:
    """Incremental parser of what gdb sends: packets, acks, nacks and the 0x03 interrupt.

    :meth:`feed` returns events: ``("packet", payload)`` (escapes and run-length expanded),
    ``("bad", why)`` for a packet with a wrong checksum or an overlong one, ``("ack",)``,
    ``("nack",)`` and ``("interrupt",)``. Bytes outside packets are ignored. The checksum
    covers the bytes as sent (before unescaping), as in the protocol."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._state = "idle"
        self._raw = bytearray()  # bytes as sent, for the checksum
        self._data = bytearray()  # decoded payload
        self._csum = bytearray()
        self._overflow = False

    def feed(self, data: bytes) -> list[tuple]:
        events: list[tuple] = []
        for b in data:
            st = self._state
            if st == "idle":
                if b == 0x24:  # $
                    self._start()
                elif b == 0x2B:
                    events.append(("ack",))
                elif b == 0x2D:
                    events.append(("nack",))
                elif b == 0x03:
                    events.append(("interrupt",))
            elif st == "csum":
                self._csum.append(b)
                if len(self._csum) == 2:
                    events.append(self._finish())
                    self._state = "idle"
            elif b == 0x24:  # a new packet starts: the previous one was cut short
                events.append(("bad", "packet restarted before its end"))
                self._start()
            elif b == 0x23:  # #
                self._state = "csum"
            else:
                self._raw.append(b)
                if st == "escape":
                    self._put(b ^ 0x20)
                    self._state = "data"
                elif st == "repeat":
                    count = b - 29
                    if count < 0 or not self._data:
                        self._overflow = self._overflow or "bad run-length"
                    else:
                        self._put_many(self._data[-1], count)
                    self._state = "data"
                elif b == 0x7D:
                    self._state = "escape"
                elif b == 0x2A:
                    self._state = "repeat"
                else:
                    self._put(b)
        return events

    def _start(self) -> None:
        self._state = "data"
        self._raw.clear()
        self._data.clear()
        self._csum.clear()
        self._overflow = False

    def _put(self, b: int) -> None:
        if len(self._data) >= self.max_payload:
            self._overflow = self._overflow or "packet too long"
        else:
            self._data.append(b)

    def _put_many(self, b: int, count: int) -> None:
        if len(self._data) + count > self.max_payload:
            self._overflow = self._overflow or "packet too long"
        else:
            self._data += bytes((b,)) * count

    def _finish(self) -> tuple:
        try:
            want = int(self._csum.decode("ascii"), 16)
        except (UnicodeDecodeError, ValueError):
            return ("bad", f"checksum {bytes(self._csum)!r} is not two hex digits")
        got = checksum(self._raw)
        if want != got:
            return ("bad", f"checksum {want:02x} does not match the data ({got:02x})")
        if self._overflow:
            return ("bad", str(self._overflow))
        return ("packet", bytes(self._data))


def _hex_u(value: int, size: int) -> bytes:
    return value.to_bytes(size, "little").hex().encode()


def _parse_int(text: str) -> int:
    return int(text, 0)


def _xfer_chunk(data: bytes, span: str) -> bytes:
    """The ``qXfer`` reply for ``OFFSET,LENGTH`` (hex) of ``data``."""
    try:
        off_s, len_s = span.split(",")
        off, length = int(off_s, 16), int(len_s, 16)
    except ValueError:
        return EINVAL.encode()
    return (b"l" if off + length >= len(data) else b"m") + data[off : off + length]


# --- what gdb sees of the CP (also used by the core dumper) --------------------------------


def _error_addr(gpu: Any) -> int:
    d = gpu.debug_read
    return d(regs.CP_ERROR_ADDR_LO.offset) | (d(regs.CP_ERROR_ADDR_HI.offset) << 32)


def next_pc(gpu: Any) -> int:
    """The next packet: the failing one in ERROR, else CP_PC skipping drained IBs."""
    cp = gpu.cp
    if cp.error:
        return _error_addr(gpu)
    if cp.waiting is None and cp.bulk is None:  # else: the packet in progress
        for pc, end in reversed(cp.ib_stack):
            if pc < end:
                return pc
        if cp.ib_stack:
            return cp.ring_base + cp.head
    return cp.pc()


def pc_in_ib(gpu: Any) -> bool:
    """Whether :func:`next_pc` is a GPU VA in an indirect buffer (else a ring PA)."""
    cp = gpu.cp
    if cp.error:
        return bool(regs.CP_ERROR.field("IN_IB").ex(gpu.debug_read(regs.CP_ERROR.offset)))
    if cp.waiting is not None:
        return cp.waiting.in_ib
    if cp.bulk is not None:
        return cp.bulk.in_ib
    return any(pc < end for pc, end in cp.ib_stack)


def core_values(gpu: Any) -> dict[str, int]:
    """The values of the aarch64 core registers (see gdb_target.CORE_MAP)."""
    cp = gpu.cp
    d = gpu.debug_read
    return {
        "x0": int(cp.state()),
        "x1": d(regs.RING_HEAD.offset),
        "x2": cp.tail,
        "x3": cp.as_index,
        "x4": d(regs.CP_ERROR.offset),
        "x5": _error_addr(gpu),
        "x6": cp.error_ib_depth if cp.error else len(cp.ib_stack),
        "x7": d(regs.CP_PACKETS.offset),
        "x8": cp.ring_base,
        "x9": cp.ring_size,
        "x10": d(regs.FENCE_SEQNO_LO.offset) | (d(regs.FENCE_SEQNO_HI.offset) << 32),
        "x11": int(pc_in_ib(gpu)),
        "x12": d(regs.STATUS.offset),
        "x13": d(regs.IRQ_STATUS.offset),
        "x14": d(regs.MMU_INT_RAWSTAT.offset),
        "pc": next_pc(gpu),
    }


def mmu_faults(gpu: Any) -> list[str]:
    """Each latched MMU fault in words, e.g. ``AS1 TRANSLATION_L3 on WRITE at GPU VA ...``."""
    out = []
    d = gpu.debug_read
    for n in range(regs.AS_COUNT):
        fs = d(regs.as_reg(n, "FAULTSTATUS").offset)
        if not fs:
            continue
        addr = d(regs.as_reg(n, "FAULTADDRESS_LO").offset) | (
            d(regs.as_reg(n, "FAULTADDRESS_HI").offset) << 32
        )
        exc, acc, src = (fld.ex(fs) for fld in regs.AS_TEMPLATE[6].fields)
        try:
            exc_name = MmuFault(exc).name
        except ValueError:
            exc_name = f"{exc:#x}"
        try:
            src_name = Opcode(src).name
        except ValueError:
            src_name = f"{src:#x}"
        out.append(f"AS{n} {exc_name} on {AccessType(acc).name} at GPU VA {addr:#x} by {src_name}")
    return out


def describe_error(gpu: Any) -> str:
    """CP_ERROR (and the MMU faults) in words."""
    d = gpu.debug_read(regs.CP_ERROR.offset)
    f = regs.CP_ERROR.field
    code = f("CODE").ex(d)
    try:
        code_name = CpError(code).name
    except ValueError:
        code_name = f"{code:#x}"
    try:
        op = Opcode(f("OPCODE").ex(d)).name
    except ValueError:
        op = f"{f('OPCODE').ex(d):#x}"
    where = "IB VA" if f("IN_IB").ex(d) else "ring PA"
    text = f"{code_name} at {where} {_error_addr(gpu):#x} (opcode {op}, AS{f('AS').ex(d)})"
    faults = mmu_faults(gpu)
    if faults:
        text += "; " + "; ".join(faults)
    return text


# --- jobs on the ring (the GPU's view: a job is the ring packets up to a FENCE) ------------

MAX_JOBS = 256  # jobs `monitor jobs` lists at most


@dataclass
class RingJob:
    """Ring packets from a job boundary up to and including its FENCE (the driver's job):
    known by the seqno its FENCE writes, the AS it selects and the IBs it runs."""

    start: int  # ring offset of its first packet
    as_index: int
    end: int | None = None  # ring offset after its FENCE (None: no FENCE before the tail)
    seqno: int | None = None
    ibs: list[tuple[int, int]] = field(default_factory=list)  # (GPU VA, bytes)
    fences: list[tuple[int, int]] = field(default_factory=list)  # (address, seqno)
    state: str = "queued"

    def describe(self) -> str:
        name = f"job {self.seqno}" if self.seqno is not None else "job (no FENCE yet)"
        return f"{name}, AS {self.as_index}, {self.state}"


def ring_jobs(gpu: Any, limit: int = MAX_JOBS) -> list[RingJob]:
    """The jobs from the one executing (it began at ``cp.job_start``) to the ring tail, with
    their state: the first one running (or the CP's state), the rest queued. Reads at most
    ``MAX_LISTED`` packets; a packet that cannot be read or decoded ends the list."""
    cp = gpu.cp
    if not cp.ring_size:
        return []
    jobs: list[RingJob] = []
    off, as_index = cp.job_start, cp.as_index
    job = RingJob(off, as_index)
    for _ in range(MAX_LISTED):
        if off == cp.tail or len(jobs) >= limit:
            break
        addr = cp.ring_base + off
        try:
            hdr = gpu.mem_read(SPACE_PHYS, addr, 4)
            size = 4 + 4 * (struct.unpack("<I", hdr)[0] >> 16)
            first = min(size, cp.ring_size - off)
            raw = gpu.mem_read(SPACE_PHYS, addr, first)
            if first < size:
                raw += gpu.mem_read(SPACE_PHYS, cp.ring_base, size - first)
        except MemFault:
            break
        pkt = pk.decode(raw, 0, addr)
        if pkt.error:
            break
        b = pkt.body
        if pkt.opcode == Opcode.NOP and off == job.start:
            job.start = (off + size) % cp.ring_size  # padding before a job is not its start
        elif pkt.opcode == Opcode.SET_AS:
            job.as_index = b.as_index
        elif pkt.opcode == Opcode.INDIRECT_BUFFER:
            job.ibs.append((b.addr_lo | (b.addr_hi << 32), 4 * b.size_dw))
        off = (off + size) % cp.ring_size
        if pkt.opcode == Opcode.FENCE:
            seqno = b.seqno_lo | (b.seqno_hi << 32)
            job.fences.append((b.addr_lo | (b.addr_hi << 32), seqno))
            job.seqno, job.end = seqno, off
            jobs.append(job)
            job = RingJob(off, job.as_index)
    else:
        off = None
    if off is not None and off != job.start and len(jobs) < limit:
        jobs.append(job)
    if jobs:
        head = jobs[0]
        started = cp.head not in (head.start, cp.job_start)
        running = started or cp.ib_stack or cp.waiting or cp.bulk or cp.error
        state = cp.state()
        if running or state in (CpState.ERROR, CpState.WAITING):
            head.state = state.name.lower()
            if state is CpState.HALTED:
                head.state = "halted by the debugger"
        elif state is CpState.HALTED:
            head.state = "halted before its first packet"
    return jobs


# --- the stub ------------------------------------------------------------------------------


class GdbStub:
    """One gdb connection at a time to ``gpu``, on a loopback TCP (or UNIX) ``spec``."""

    def __init__(self, gpu: Any, spec: str, *, wait: bool = False) -> None:
        self.gpu = gpu
        if spec.startswith("tcp::"):
            spec = "tcp:127.0.0.1:" + spec[len("tcp::") :]
        self.listener = transport.listen(spec, backlog=1)
        self.listener.sock.setblocking(False)
        self.address = str(self.listener.spec)
        self.conn: socket.socket | None = None
        self.server: Any = None
        self.reader = PacketReader()
        self.ack_mode = True
        self.running = False  # gdb resumed the target and waits for a stop reply
        self.breakpoints: set[int] = set()
        # addr -> the space its breakpoints hit in (an AS index or SPACE_PHYS); unqualified
        # addresses hit in the ring and in any IB. Kept across gdb's remove/insert of
        # breakpoints at every stop, until detach or `monitor break-space ADDR any`.
        self.break_spaces: dict[int, int] = {}
        self.command_buffers: list[CommandBuffer] = []  # names of `monitor symbol-file`
        self.job_breaks: set[int] = set()  # FENCE seqnos of jobs to stop at
        self.next_job_break: list[int | None] = []  # [AS or None] while one is set
        self.watchpoints: dict[tuple[int, int, int], int | None] = {}
        self.space: str | int = "auto"
        self.last_stop = b"S05"
        self.stop_text = "not stopped yet"
        self._hit: bytes | None = None  # stop reply decided by a hook during a run
        self._hit_text = ""  # ... and why, for `monitor status` / `monitor fault`
        self._errors_seen = 0
        # after a watchpoint stop: (pc, in_ib) of the packet whose DMA hit, shown as pc until
        # the first step past the stop or a continue (see _step)
        self._free_step: tuple[int, bool] | None = None
        # a step of a packet larger than one CP slice: it goes on in the device's loop and
        # the stop comes before the next packet (the device answers meanwhile)
        self._stepping = False
        self._watch_reported = False  # gdb made its step over the watchpoint stop
        self._hit_at: tuple[int, bool] = (0, False)  # the packet that caused _hit
        self._last_sent = b""
        self.out = bytearray()  # replies gdb has not taken yet (sends never block the device)
        # A CP error while gdb is attached is gdb's stop first: the interrupts it raises reach
        # the guest only once gdb continues or detaches (else the guest's IRQ handler would
        # recover the fault while gdb looks at it). _released counts the CP errors and MMU
        # faults up to the last release (an MMU fault raises its interrupt just before the CP
        # error it causes); _irq_deliver is the device's own on_irq, _irq_pending what waits.
        self._released = (gpu.cp.errors, gpu.mmu.faults)
        self._irq_deliver: Callable[[bool, int, int], None] | None = None
        self._irq_pending: tuple[bool, int, int] | None = None
        self.counters = dict(connections=0, packets=0, bad_packets=0, stops=0)
        if wait:
            gpu.halt()
            self.stop_text = "held from start (-S) until gdb continues"

    # --- wiring --------------------------------------------------------------------------

    def attach(self, server: Any) -> None:
        """Serve from ``server``'s loop."""
        self.server = server
        self._irq_deliver = self.gpu.on_irq
        self.gpu.on_irq = self._on_irq
        # lazy: until a gdb connects, the device keeps its fast path (an accept may wait for
        # an idle client's recv timeout, a few tens of milliseconds)
        server.add_reader(self.listener.sock, self._accept, lazy=True)
        server.add_cp_observer(self.poll)

    def close(self) -> None:
        if self.conn is not None:
            self._disconnect("stub closing")
        if self._irq_deliver is not None:
            self.gpu.on_irq, self._irq_deliver = self._irq_deliver, None
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.server.remove_reader(self.listener.sock)
        self.listener.close()

    def _accept(self) -> None:
        try:
            sock, _peer = self.listener.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self.conn is not None:
            log.warning("refusing a second gdb connection: one gdb at a time")
            sock.close()
            return
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = sock
        self.out = bytearray()
        self.reader = PacketReader()
        self.ack_mode = True
        self.counters["connections"] += 1
        self._connected()
        if self.server is not None:
            self.server.add_reader(sock, self._readable)
        log.info("gdb connected; the command processor is halted")

    def _connected(self) -> None:
        """A debugger attaches: the CP stops (like QEMU pausing the VM on connect)."""
        self._released = (self.gpu.cp.errors, self.gpu.mmu.faults)
        self.gpu.halt()
        self.running = False
        self._errors_seen = self.gpu.cp.errors
        self.last_stop = b"T%02xthread:01;" % SIGTRAP
        if self.stop_text == "not stopped yet":
            self.stop_text = "halted by gdb attaching"

    def _disconnect(self, why: str) -> None:
        """Detach: forget breakpoints and watchpoints, let the device run on."""
        sock, self.conn = self.conn, None
        self.out = bytearray()
        if sock is not None:
            if self.server is not None:
                with contextlib.suppress(Exception):
                    self.server.remove_reader(sock)
            with contextlib.suppress(OSError):
                sock.close()
        self.breakpoints.clear()
        self.break_spaces.clear()
        self.watchpoints.clear()
        self.job_breaks.clear()
        self.next_job_break = []
        self._install_hooks()
        self.running = False
        self._stepping = False
        self._free_step = None
        self._release_irq()
        self.gpu.resume()
        log.info("gdb detached (%s); the device runs on", why)

    def _readable(self) -> None:
        sock = self.conn
        if sock is None:
            return
        if self.out:  # called for writability too (server.watch_writable)
            self._flush()
            if self.conn is not sock:
                return
        try:
            data = sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._disconnect(f"read failed: {exc}")
            return
        if not data:
            self._disconnect("connection closed")
            return
        self.feed(data)

    # --- input ---------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Handle bytes from gdb (the socket callback; tests may call it directly)."""
        for event in self.reader.feed(data):
            if self.conn is None:
                return  # detached by an earlier packet of the same read
            kind = event[0]
            if kind == "packet":
                self.counters["packets"] += 1
                if self.ack_mode:
                    self._write(b"+")
                try:
                    reply = self.handle(event[1])
                except Exception:  # never let gdb bring the device down
                    log.exception("gdb packet %r failed", event[1][:40])
                    reply = b"E01"
                if reply is not None:
                    self.send(reply)
            elif kind == "bad":
                self.counters["bad_packets"] += 1
                log.warning("gdb: bad packet: %s", event[1])
                if self.ack_mode:
                    self._write(b"-")
            elif kind == "nack":
                if self._last_sent:
                    self._write(self._last_sent)
            elif kind == "interrupt":
                self.interrupt()

    def send(self, payload: bytes) -> None:
        data = frame(payload)
        self._last_sent = data
        self._write(data)

    def _write(self, data: bytes) -> None:
        """Send without blocking the device: what gdb does not take now waits in ``out``,
        flushed when the socket is writable; past OUTPUT_CAP unread, gdb is disconnected."""
        if self.conn is None:
            return
        if not self.out:
            sent = self._send_nowait(data)
            if sent is None or sent == len(data):
                return
            data = data[sent:]
            if self.server is not None:
                self.server.watch_writable(self.conn, True)
        self.out += data
        if len(self.out) > OUTPUT_CAP:
            log.warning(
                "gdb: disconnecting: it leaves its replies unread (%d bytes pending, over the "
                "cap of %d)",
                len(self.out),
                OUTPUT_CAP,
            )
            self._disconnect(f"over {OUTPUT_CAP} bytes of replies unread")

    def _send_nowait(self, data) -> int | None:
        """Bytes of ``data`` the socket took now; None if it failed (gdb is then detached)."""
        sock = self.conn
        try:
            return sock.send(data, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            self._disconnect(f"send failed: {exc}")
            return None

    def _flush(self) -> None:
        sent = self._send_nowait(self.out)
        if sent is None:
            return
        del self.out[:sent]
        if not self.out and self.server is not None:
            self.server.watch_writable(self.conn, False)

    # --- execution -----------------------------------------------------------------------

    def interrupt(self) -> None:
        """0x03 from gdb: hold the CP before its next packet."""
        if not self.running:
            return
        self._stepping = False
        self.gpu.halt()
        self._stop(b"T%02xthread:01;" % SIGINT, "interrupted by gdb (Ctrl-C)")

    def poll(self) -> None:
        """After a CP batch: report a breakpoint, a watchpoint or a CP error to gdb."""
        if not self.running:
            return
        cp = self.gpu.cp
        if self._stepping and cp.bulk is None and self._hit is None and not cp.runnable():
            self.gpu.halt()
            self._hit = b"T%02xthread:01;" % SIGTRAP  # the stepped packet ended the work
            self._hit_text = "stepped one packet"
        if self._hit is not None or cp.errors != self._errors_seen:
            self._stepping = False
        if self._hit is not None:
            reply, self._hit = self._hit, None
            self._free_step = self._hit_at if b"watch:" in reply else None
            self._watch_reported = False
            self._stop(reply, self._hit_text)
        elif cp.errors != self._errors_seen:
            self.gpu.halt()
            self._stop_on_error()

    def _stop_on_error(self) -> None:
        cp = self.gpu.cp
        self._errors_seen = cp.errors
        code = CpError(regs.CP_ERROR.field("CODE").ex(self.gpu.debug_read(regs.CP_ERROR.offset)))
        sig = ERROR_SIGNALS.get(code, SIGILL)
        self._stop(b"T%02xthread:01;" % sig, "CP error: " + self.describe_error())

    def _stop(self, reply: bytes, why: str) -> None:
        self.running = False
        self.counters["stops"] += 1
        self.last_stop = reply
        self.stop_text = why
        log.info("stop: %s", why)
        self.send(reply)

    def _resume(self) -> None:
        self._stepping = False
        self._release_irq()
        self._free_step = None
        self._hit = None
        self._errors_seen = self.gpu.cp.errors
        self.running = True
        self.gpu.resume()
        self.poll()

    def _step(self) -> bytes:
        """Execute exactly one packet; the reply is the stop it caused."""
        if self._free_step is not None:
            # aarch64 watchpoints are "non-steppable": gdb expects the stop *at* the accessing
            # instruction and steps over it before it reports the watchpoint. The stop shows
            # pc on the packet that wrote, whose DMA already happened, so gdb's step leaves
            # pc there (had it moved onto a breakpoint, gdb would report only that one); the
            # user's next step moves pc to the next packet, still without running one.
            if self._watch_reported:
                self._free_step = None
            self._watch_reported = True
            return b"T%02xthread:01;" % SIGTRAP
        gpu = self.gpu
        self._stepping = False
        self._release_irq()
        errors = gpu.cp.errors
        self._hit = None
        gpu.halt()
        gpu.cp.run(1, single=True, budget=CP_BUDGET)
        if gpu.cp.bulk is not None and gpu.cp.errors == errors and self._hit is None:
            self._stepping = True
            self._errors_seen = errors
            self.running = True
            self._install_hooks()
            gpu.resume()
            return None
        hit, self._hit = self._hit, None
        if gpu.cp.errors != errors:
            self._errors_seen = gpu.cp.errors
            code = CpError(regs.CP_ERROR.field("CODE").ex(gpu.debug_read(regs.CP_ERROR.offset)))
            reply = b"T%02xthread:01;" % ERROR_SIGNALS.get(code, SIGILL)
            self.stop_text = "CP error: " + self.describe_error()
        elif hit is not None:
            reply = hit
            self.stop_text = self._hit_text
            self._free_step = self._hit_at
            self._watch_reported = False
        else:
            reply = b"T%02xthread:01;" % SIGTRAP
            self.stop_text = "stepped one packet"
        self.last_stop = reply
        return reply

    # --- interrupts ----------------------------------------------------------------------

    def _on_irq(self, level: bool, irq_status: int, mmu_int_stat: int) -> None:
        """The device's interrupt output, held back while gdb holds a CP error stop."""
        gpu = self.gpu
        if self.conn is not None and (gpu.cp.errors, gpu.mmu.faults) != self._released:
            self._irq_pending = (level, irq_status, mmu_int_stat)
        elif self._irq_deliver is not None:
            self._irq_pending = None
            self._irq_deliver(level, irq_status, mmu_int_stat)

    def _release_irq(self) -> None:
        """gdb lets the CP go on: the guest now sees the error as it would without gdb."""
        self._released = (self.gpu.cp.errors, self.gpu.mmu.faults)
        pending, self._irq_pending = self._irq_pending, None
        if pending is not None and self._irq_deliver is not None:
            self._irq_deliver(*pending)

    # --- hooks ---------------------------------------------------------------------------

    def _install_hooks(self) -> None:
        gpu = self.gpu
        wanted = self.breakpoints or self.job_breaks or self.next_job_break or self._stepping
        gpu.packet_hook = self._packet_hook if wanted else None
        gpu.access_hook = self._access_hook if self.watchpoints else None

    def _packet_hook(self, addr: int, in_ib: bool) -> bool:
        if self._stepping:  # the stepped packet is done: stop before this one
            self._hit = b"T%02xthread:01;" % SIGTRAP
            self._hit_text = "stepped one packet"
            return True
        if addr in self.breakpoints:
            cp = self.gpu.cp
            space = cp.as_index if in_ib else SPACE_PHYS
            if self.break_spaces.get(addr, space) == space:
                self._hit = b"T%02xthread:01;" % SIGTRAP
                where = f"AS{space} IB VA" if in_ib else "ring PA"
                self._hit_text = f"breakpoint at {where} {addr:#x}"
                return True
        if (self.job_breaks or self.next_job_break) and not in_ib:
            cp = self.gpu.cp
            if addr == cp.ring_base + cp.job_start:
                return self._job_starts()
        return False

    def _job_starts(self) -> bool:
        """The CP is about to run the first packet of a job: stop if a job break wants it."""
        jobs = ring_jobs(self.gpu, limit=1)
        cp = self.gpu.cp
        if not jobs or cp.ring_base + jobs[0].start != cp.ring_base + cp.head:
            return False  # padding before the job: its first packet comes next
        job = jobs[0]
        if job.seqno in self.job_breaks:
            self.job_breaks.discard(job.seqno)
            why = f"job breakpoint: job {job.seqno}"
        elif self.next_job_break and self.next_job_break[0] in (None, job.as_index):
            self.next_job_break = []
            why = "next-job breakpoint: job " + (
                str(job.seqno) if job.seqno is not None else "(no FENCE yet)"
            )
        else:
            return False
        self._hit = b"T%02xthread:01;" % SIGTRAP
        self._hit_text = (
            f"{why} (AS {job.as_index}) starts at ring PA {self.gpu.cp.ring_base + job.start:#x}"
        )
        return True

    def _access_hook(self, addr: int, size: int, write: bool, space: int) -> None:
        end = addr + size
        for (kind, waddr, wlen), wspace in self.watchpoints.items():
            if (kind == 2 and not write) or (kind == 3 and write):
                continue
            if wspace is None:
                if space == SPACE_PHYS:
                    continue
            elif wspace != space:
                continue
            if addr < waddr + wlen and waddr < end:
                hit = max(addr, waddr)
                name = {2: b"watch", 3: b"rwatch", 4: b"awatch"}[kind]
                self._hit = b"T%02x%s:%x;thread:01;" % (SIGTRAP, name, hit)
                cp = self.gpu.cp
                self._hit_at = (cp._cur_pc, cp._cur_in_ib)
                where = "PA" if space == SPACE_PHYS else f"AS{space} VA"
                self._hit_text = (
                    f"{name.decode()}point: {'write' if write else 'read'} of {size} bytes at "
                    f"{where} {addr:#x} by the packet at {self.gpu.cp._cur_pc:#x}"
                )
                self.gpu.halt()
                return

    # --- registers -----------------------------------------------------------------------

    def next_pc(self) -> int:
        return next_pc(self.gpu)

    def pc_in_ib(self) -> bool:
        return pc_in_ib(self.gpu)

    def _error_addr(self) -> int:
        return _error_addr(self.gpu)

    def core_values(self) -> dict[str, int]:
        values = core_values(self.gpu)
        if self._free_step is not None:
            values["pc"], in_ib = self._free_step
            values["x11"] = int(in_ib)
        return values

    def register_bytes(self) -> bytes:
        """Every register in regnum order (the ``g`` reply, before hex)."""
        core = self.core_values()
        d = self.gpu.debug_read
        out = bytearray()
        for r in REGISTERS:
            value = d(r.mmio.offset) if r.mmio is not None else core.get(r.name, 0)
            out += (value & ((1 << r.bits) - 1)).to_bytes(r.size, "little")
        return bytes(out)

    def _read_register(self, regnum: int) -> bytes:
        if not 0 <= regnum < len(REGISTERS):
            return EINVAL.encode()
        r = REGISTERS[regnum]
        value = (
            self.gpu.debug_read(r.mmio.offset)
            if r.mmio is not None
            else self.core_values().get(r.name, 0)
        )
        return _hex_u(value & ((1 << r.bits) - 1), r.size)

    def _write_register(self, regnum: int, data: bytes) -> bytes:
        if not 0 <= regnum < len(REGISTERS):
            return EINVAL.encode()
        r = REGISTERS[regnum]
        if r.regnum == PC_REGNUM:
            return self._write_pc(int.from_bytes(data[: r.size], "little"))
        if r.mmio is None:
            return EINVAL.encode()  # the CP state is changed through registers, not x0..x30
        value = int.from_bytes(data[: r.size], "little")
        self.gpu.mmio_write(r.mmio.offset, value)
        log.info("gdb wrote %s = %#x", r.mmio.name, value)
        return b"OK"

    def _write_pc(self, addr: int) -> bytes:
        """Move the CP to another packet (``set $pc``, ``jump``, the entry of ``load``)."""
        try:
            self.gpu.cp.debug_set_pc(addr)
        except ValueError as exc:
            log.warning("gdb: cannot set pc to %#x: %s", addr, exc)
            self.stop_text = f"pc not moved to {addr:#x}: {exc}"
            return EINVAL.encode()
        self._free_step = None
        log.info("gdb moved pc to %#x", addr)
        return b"OK"

    # --- memory --------------------------------------------------------------------------

    def space_for(self, addr: int, size: int) -> int:
        """The space an access at ``addr`` goes through (an AS index or SPACE_PHYS)."""
        if self.space == "phys":
            return SPACE_PHYS
        if isinstance(self.space, int):
            return self.space
        cp = self.gpu.cp
        if cp.ring_size and cp.ring_base <= addr and addr + size <= cp.ring_base + cp.ring_size:
            return SPACE_PHYS
        return cp.as_index

    def space_name(self) -> str:
        if self.space == "auto":
            return f"auto (ring PA window, else AS{self.gpu.cp.as_index})"
        return "phys" if self.space == "phys" else f"AS{self.space}"

    def read_memory(self, addr: int, size: int) -> bytes:
        return self.gpu.mem_read(self.space_for(addr, size), addr, size)

    def write_memory(self, addr: int, data: bytes) -> None:
        self.gpu.mem_write(self.space_for(addr, len(data)), addr, data)

    # --- dispatch ------------------------------------------------------------------------

    def handle(self, packet: bytes) -> bytes | None:
        """The reply to one packet (None: no reply now, e.g. ``c`` until the CP stops)."""
        if not packet:
            return b""
        head = packet[:1]
        handler = self._simple.get(head)
        if handler is not None:
            return handler(self, packet)
        return b""

    def _q(self, packet: bytes) -> bytes:
        text = packet.decode("latin-1")
        name = text.split(":", 1)[0].split(",", 1)[0]
        if name == "qSupported":
            return (
                f"PacketSize={PACKET_SIZE:x};qXfer:features:read+;qXfer:threads:read+;"
                "QStartNoAckMode+;vContSupported+"
            ).encode()
        if text.startswith("qXfer:threads:read::"):
            xml = (
                '<?xml version="1.0"?>\n<threads>\n'
                f'  <thread id="1" core="0" name="ring 0">{escape_xml(self.thread_text())}'
                "</thread>\n</threads>\n"
            ).encode()
            return _xfer_chunk(xml, text[len("qXfer:threads:read::") :])
        if name == "qThreadExtraInfo":
            return self.thread_text().encode().hex().encode()
        if text.startswith("qXfer:features:read:"):
            return self._xfer_features(text[len("qXfer:features:read:") :])
        if name == "qAttached":
            return b"1"
        if name == "qC":
            return b"QC01"
        if name == "qfThreadInfo":
            return b"m01"
        if name == "qsThreadInfo":
            return b"l"
        if name == "qSymbol":
            return b"OK"
        if name == "qRcmd":
            return self._rcmd(text.partition(",")[2])
        return b""

    def _Q(self, packet: bytes) -> bytes:
        if packet == b"QStartNoAckMode":
            self.send(b"OK")
            self.ack_mode = False
            return None
        return b""

    def _xfer_features(self, rest: str) -> bytes:
        annex, _, span = rest.partition(":")
        if annex != "target.xml":
            return ENOENT.encode()
        return _xfer_chunk(TARGET_XML, span)

    def _question(self, packet: bytes) -> bytes:
        # gdb is (re)connecting: like QEMU, drop every breakpoint it may have left
        self.breakpoints.clear()
        self.watchpoints.clear()
        self.job_breaks.clear()
        self.next_job_break = []
        self._install_hooks()
        return self.last_stop

    def _g(self, packet: bytes) -> bytes:
        return self.register_bytes().hex().encode()

    def _G(self, packet: bytes) -> bytes:
        """All registers at once: those whose value changed are written as ``P`` would."""
        try:
            raw = bytes.fromhex(packet[1:].decode())
        except ValueError:
            return EINVAL.encode()
        current = self.register_bytes()
        if len(raw) != len(current):
            return EINVAL.encode()
        pos = 0
        for r in REGISTERS:
            new, old = raw[pos : pos + r.size], current[pos : pos + r.size]
            pos += r.size
            if new != old:
                reply = self._write_register(r.regnum, new)
                if reply != b"OK":
                    return reply
        return b"OK"

    def _p(self, packet: bytes) -> bytes:
        try:
            regnum = int(packet[1:], 16)
        except ValueError:
            return EINVAL.encode()
        return self._read_register(regnum)

    def _P(self, packet: bytes) -> bytes:
        try:
            num, _, val = packet[1:].partition(b"=")
            return self._write_register(int(num, 16), bytes.fromhex(val.decode()))
        except ValueError:
            return EINVAL.encode()

    def _m(self, packet: bytes) -> bytes:
        try:
            a, n = packet[1:].split(b",")
            addr, size = int(a, 16), int(n, 16)
        except ValueError:
            return EINVAL.encode()
        if size > PACKET_SIZE // 2:
            size = PACKET_SIZE // 2  # gdb accepts a short read and asks for the rest
        try:
            return self.read_memory(addr, size).hex().encode()
        except MemFault as exc:
            log.debug("gdb read %#x+%#x: %s", addr, size, exc)
            return EFAULT.encode()

    def _M(self, packet: bytes) -> bytes:
        try:
            spec, _, data = packet[1:].partition(b":")
            a, n = spec.split(b",")
            addr, size = int(a, 16), int(n, 16)
            raw = bytes.fromhex(data.decode())
        except ValueError:
            return EINVAL.encode()
        if len(raw) != size:
            return EINVAL.encode()
        return self._store(addr, raw)

    def _X(self, packet: bytes) -> bytes:
        try:
            spec, _, raw = packet[1:].partition(b":")
            a, n = spec.split(b",")
            addr, size = int(a, 16), int(n, 16)
        except ValueError:
            return EINVAL.encode()
        if len(raw) != size:
            return EINVAL.encode()
        return self._store(addr, raw)

    def _store(self, addr: int, raw: bytes) -> bytes:
        if not raw:
            return b"OK"
        try:
            self.write_memory(addr, raw)
        except MemFault as exc:
            log.debug("gdb write %#x+%#x: %s", addr, len(raw), exc)
            return EFAULT.encode()
        return b"OK"

    def _c(self, packet: bytes) -> bytes | None:
        self._resume()
        return None

    def _s(self, packet: bytes) -> bytes:
        return self._step()

    def _v(self, packet: bytes) -> bytes | None:
        if packet == b"vCont?":
            return b"vCont;c;C;s;S"
        if packet.startswith(b"vCont;"):
            actions = [a.split(b":")[0] for a in packet[6:].split(b";") if a]
            first = actions[0][:1] if actions else b""
            if first in (b"s", b"S"):
                return self._step()
            if first in (b"c", b"C"):
                self._resume()
                return None
            return EINVAL.encode()
        if packet.startswith(b"vKill"):
            self.send(b"OK")
            self._disconnect("vKill (the device keeps running)")
            return None
        return b""

    def _D(self, packet: bytes) -> bytes | None:
        self.send(b"OK")
        self._disconnect("detach")
        return None

    def _k(self, packet: bytes) -> None:
        self._disconnect("kill (the device keeps running)")
        return None

    def _H(self, packet: bytes) -> bytes:
        return b"OK"

    def _Z(self, packet: bytes) -> bytes:
        insert = packet[:1] == b"Z"
        try:
            t, a, k = packet[1:].split(b",")[:3]
            kind, addr, length = int(t), int(a, 16), int(k.split(b";")[0], 16)
        except ValueError:
            return EINVAL.encode()
        if kind in (0, 1):
            if insert:
                self.breakpoints.add(addr)
            else:
                self.breakpoints.discard(addr)
        elif kind in (2, 3, 4):
            key = (kind, addr, max(length, 1))
            if insert:
                space = None if self.space == "auto" else self.space_for(addr, key[2])
                if self.space == "auto" and self.space_for(addr, key[2]) == SPACE_PHYS:
                    space = SPACE_PHYS
                self.watchpoints[key] = space
            else:
                self.watchpoints.pop(key, None)
        else:
            return b""
        self._install_hooks()
        return b"OK"

    _simple: dict[bytes, Callable] = {
        b"q": _q,
        b"Q": _Q,
        b"?": _question,
        b"g": _g,
        b"G": _G,
        b"p": _p,
        b"P": _P,
        b"m": _m,
        b"M": _M,
        b"X": _X,
        b"c": _c,
        b"C": _c,
        b"s": _s,
        b"S": _s,
        b"v": _v,
        b"D": _D,
        b"k": _k,
        b"H": _H,
        b"T": lambda self, p: b"OK",
        b"Z": _Z,
        b"z": _Z,
    }

    # --- monitor -------------------------------------------------------------------------

    def _rcmd(self, hexcmd: str) -> bytes:
        try:
            command = bytes.fromhex(hexcmd).decode("utf-8", "replace").strip()
        except ValueError:
            return EINVAL.encode()
        try:
            text = self.monitor(command)
        except (ValueError, IndexError, MemFault) as exc:
            text = f"error: {exc}\n"
        for i in range(0, len(text), 2000):
            self.send(b"O" + text[i : i + 2000].encode().hex().encode())
        return b"OK"

    def monitor(self, command: str) -> str:
        """Run one monitor command; its output text."""
        words = command.split()
        if not words:
            return MONITOR_HELP
        name, args = words[0].lower(), words[1:]
        fn = getattr(self, "_mon_" + name.replace("-", "_"), None)
        if fn is None:
            return f"unknown monitor command {name!r}; try 'monitor help'\n"
        return fn(args)

    def _mon_help(self, args: list[str]) -> str:
        return MONITOR_HELP

    def _mon_status(self, args: list[str]) -> str:
        cp = self.gpu.cp
        where = "IB VA" if self.pc_in_ib() else "ring PA"
        name = symbolize(self.command_buffers, self.next_pc())
        where += f", {name}" if name else ""
        return (
            f"CP {cp.state().name}, pc {self.next_pc():#x} ({where}), AS{cp.as_index}, "
            f"IB depth {len(cp.ib_stack)}, {cp.packets} packets executed\n"
            f"ring base {cp.ring_base:#x} size {cp.ring_size:#x} head {cp.head:#x} "
            f"tail {cp.tail:#x}\n"
            f"memory space: {self.space_name()}\n"
            f"last stop: {self.stop_text}\n"
        )

    def _mon_as(self, args: list[str]) -> str:
        n = _parse_int(args[0])
        if not 0 <= n < regs.AS_COUNT:
            raise ValueError(f"no address space {n} (0..{regs.AS_COUNT - 1})")
        self.space = n
        return f"memory space: AS{n}\n"

    def _mon_phys(self, args: list[str]) -> str:
        self.space = "phys"
        return "memory space: guest-physical\n"

    def _mon_auto(self, args: list[str]) -> str:
        self.space = "auto"
        return f"memory space: {self.space_name()}\n"

    def disassemble(self, space: int, addr: int, count: int) -> list[str]:
        """``count`` packets at ``addr`` in ``space``, one line each (stops at a bad one)."""
        lines = []
        for _ in range(count):
            try:
                hdr = self.gpu.mem_read(space, addr, 4)
                length = struct.unpack("<I", hdr)[0] >> 16
                body = self.gpu.mem_read(space, addr + 4, 4 * length)
            except MemFault as exc:
                lines.append(f"{addr:#014x}: <{exc}>")
                break
            pkt = pk.decode(hdr + body, 0, addr)
            lines.append(f"{addr:#014x}: {pk.disassemble_one(pkt)}")
            if pkt.error and pkt.opcode < 0:
                break
            addr += pkt.size
        return lines

    def _mon_dis(self, args: list[str]) -> str:
        addr = _parse_int(args[0]) if args else self.next_pc()
        count = min(_parse_int(args[1]) if len(args) > 1 else 8, MAX_LISTED)
        return "\n".join(self.disassemble(self.space_for(addr, 4), addr, count)) + "\n"

    _mon_disas = _mon_dis
    _mon_x = _mon_dis

    def _mon_ring(self, args: list[str]) -> str:
        cp = self.gpu.cp
        limit = min(_parse_int(args[0]) if args else 32, MAX_LISTED)
        out = [
            f"ring base {cp.ring_base:#x} size {cp.ring_size:#x} head {cp.head:#x} "
            f"tail {cp.tail:#x} (RING_TAIL register {self.gpu.debug_read(regs.RING_TAIL.offset):#x})"
            f", CP {cp.state().name}"
        ]
        for depth, (pc, end) in enumerate(cp.ib_stack):
            out.append(f"  IB level {depth + 1}: next {pc:#x}, end {end:#x}")
        if not cp.ring_size:
            out.append("  (ring not enabled)")
            return "\n".join(out) + "\n"
        head, n = cp.head, 0
        while head != cp.tail and n < limit:
            addr = cp.ring_base + head
            try:
                hdr = self.gpu.mem_read(SPACE_PHYS, addr, 4)
                length = struct.unpack("<I", hdr)[0] >> 16
                size = 4 + 4 * length
                first = min(size, cp.ring_size - head)
                raw = self.gpu.mem_read(SPACE_PHYS, addr, first)
                if first < size:
                    raw += self.gpu.mem_read(SPACE_PHYS, cp.ring_base, size - first)
            except MemFault as exc:
                out.append(f"{addr:#014x}: <{exc}>")
                break
            pkt = pk.decode(raw, 0, addr)
            out.append(f"{addr:#014x}: {pk.disassemble_one(pkt)}")
            head = (head + size) % cp.ring_size
            n += 1
        if head != cp.tail:
            out.append("  ...")
        elif n == 0:
            out.append("  (no packets between head and tail)")
        return "\n".join(out) + "\n"

    def _as_arg(self, args: list[str], pos: int) -> int:
        if len(args) > pos:
            n = _parse_int(args[pos])
        elif isinstance(self.space, int):
            n = self.space
        else:
            n = self.gpu.cp.as_index
        if not 0 <= n < regs.AS_COUNT:
            raise ValueError(f"no address space {n} (0..{regs.AS_COUNT - 1})")
        return n

    def _mon_walk(self, args: list[str]) -> str:
        va = _parse_int(args[0])
        n = self._as_arg(args, 1)
        rows = self.gpu.walk(n, va)
        out = [f"AS{n} walk of {va:#x}:"]
        if not rows:
            out.append("  (AS disabled or VA out of range)")
        seen: dict[int, int] = {}
        for level, table, idx, entry in rows:
            if table in seen:
                out.append(
                    f"  cycle/alias at level L{level} table PA {table:#x} "
                    f"(also the L{seen[table]} table)"
                )
            seen.setdefault(table, level)
            kind = ("invalid", "table", "page", "reserved")[(entry >> 1) & 3] if entry & 1 else "-"
            perms = perms_str(entry) if level == 3 else ""
            out.append(
                f"  L{level} table {table:#x}[{idx}] = {entry:#018x} {kind} "
                f"-> {entry & 0xFFFFFFFFF000:#x} {perms}".rstrip()
            )
        try:
            pa = self.gpu.translate(n, va, AccessType.READ)
            out.append(f"  => PA {pa:#x}")
        except MemFault as exc:
            out.append(f"  => {exc}")
        return "\n".join(out) + "\n"

    def _mon_mappings(self, args: list[str]) -> str:
        n = self._as_arg(args, 0)
        report = self.gpu.mappings_report(n)
        runs = report.runs
        out = [f"AS{n}: {len(runs)} mapped range(s)"]
        for va, pa, size, perms in runs[:MONITOR_MAX_RUNS]:
            out.append(f"  {va:#014x}-{va + size:#014x} -> PA {pa:#x} {perms} ({size:#x} bytes)")
        if len(runs) > MONITOR_MAX_RUNS:
            out.append(f"  ... {len(runs) - MONITOR_MAX_RUNS} more range(s) not shown")
        for level, table, va in report.aliases[:MONITOR_MAX_ALIASES]:
            out.append(f"  cycle/alias at level L{level} table PA {table:#x} (from VA {va:#x})")
        hidden = report.aliases_total - min(len(report.aliases), MONITOR_MAX_ALIASES)
        if hidden:
            out.append(f"  ... {hidden} more cycle/alias entries not followed")
        if report.truncated:
            out.append(f"  walk {report.truncated}")
        return "\n".join(out) + "\n"

    _mon_maps = _mon_mappings

    def _mon_fence(self, args: list[str]) -> str:
        d = self.gpu.debug_read
        seqno = d(regs.FENCE_SEQNO_LO.offset) | (d(regs.FENCE_SEQNO_HI.offset) << 32)
        raw, mask = d(regs.IRQ_RAWSTAT.offset), d(regs.IRQ_MASK.offset)
        return (
            f"last FENCE seqno {seqno}\n"
            f"IRQ_RAWSTAT {raw:#x} (FENCE {'pending' if raw & 1 else 'clear'}), "
            f"IRQ_MASK {mask:#x}, IRQ_STATUS {d(regs.IRQ_STATUS.offset):#x}\n"
        )

    def describe_error(self) -> str:
        return describe_error(self.gpu)

    def mmu_faults(self) -> list[str]:
        return mmu_faults(self.gpu)

    def _mon_fault(self, args: list[str]) -> str:
        out = [f"last stop: {self.stop_text}"]
        cp_error = self.gpu.debug_read(regs.CP_ERROR.offset)
        out.append(f"CP_ERROR: {self.describe_error() if cp_error else 'none'}")
        faults = self.mmu_faults()
        out.extend(faults or ["MMU: no latched fault"])
        return "\n".join(out) + "\n"

    def _mon_break_space(self, args: list[str]) -> str:
        if not args:
            rows = [
                f"  {a:#x}: {'ring PA' if sp == SPACE_PHYS else f'AS{sp} IB VA'}"
                for a, sp in sorted(self.break_spaces.items())
            ]
            return "\n".join(["qualified breakpoint addresses:", *rows]) + "\n"
        if len(args) not in (2, 3):
            raise ValueError("usage: break-space ADDR as N|phys|any")
        addr, where = _parse_int(args[0]), "".join(args[1:]).lower()
        if where == "any":
            self.break_spaces.pop(addr, None)
            return f"breakpoints at {addr:#x} hit in the ring and in any IB\n"
        if where in ("phys", "ring"):
            self.break_spaces[addr] = SPACE_PHYS
            return f"breakpoints at {addr:#x} hit only in the ring (guest-physical)\n"
        n = _parse_int(where.removeprefix("as"))
        if not 0 <= n < regs.AS_COUNT:
            raise ValueError(f"no address space {n} (0..{regs.AS_COUNT - 1})")
        self.break_spaces[addr] = n
        return f"breakpoints at {addr:#x} hit only in IBs of AS{n}\n"

    def _mon_symbol_file(self, args: list[str]) -> str:
        if args and args[0] == "clear":
            self.command_buffers = []
            return "command buffer names removed\n"
        if args:
            self.command_buffers = read_symbols(" ".join(args))
        rows = [f"  {b.name}: {b.addr:#x}+{b.size:#x}" for b in self.command_buffers]
        head = f"{len(rows)} command buffer(s) named (core files carry them)"
        return "\n".join([head, *rows]) + "\n"

    def _mon_jobs(self, args: list[str]) -> str:
        cp = self.gpu.cp
        jobs = ring_jobs(self.gpu)
        out = [
            f"ring 0: {len(jobs)} job(s) from ring offset {cp.job_start:#x} to the tail "
            f"{cp.tail:#x}, CP {cp.state().name}"
        ]
        for job in jobs:
            end = "tail" if job.end is None else f"{cp.ring_base + job.end:#x}"
            ibs = " ".join(f"IB {va:#x}+{n:#x}" for va, n in job.ibs) or "no IB"
            fences = " ".join(f"fence {a:#x}={v}" for a, v in job.fences) or "no fence"
            seqno = "-" if job.seqno is None else str(job.seqno)
            out.append(
                f"  job {seqno:<6} AS{job.as_index}  ring {cp.ring_base + job.start:#x}-{end}"
                f"  {ibs}  {fences}  {job.state}"
            )
        return "\n".join(out) + "\n"

    def _mon_break_job(self, args: list[str]) -> str:
        if not args or args[0] == "list":
            seqnos = ", ".join(str(n) for n in sorted(self.job_breaks)) or "none"
            nxt = self.next_job_break
            pending = "" if not nxt else f"; next job{'' if nxt[0] is None else f' of AS{nxt[0]}'}"
            return f"job breakpoints: {seqnos}{pending}\n"
        if args[0] == "clear":
            self.job_breaks.clear()
            self.next_job_break = []
            self._install_hooks()
            return "job breakpoints removed\n"
        seqno = _parse_int(args[0])
        if seqno < 0:
            raise ValueError(f"a job's seqno is not negative ({seqno})")
        self.job_breaks.add(seqno)
        self._install_hooks()
        return f"will stop before the first packet of job {seqno}\n"

    def _mon_break_next_job(self, args: list[str]) -> str:
        as_index = None
        if args:
            word = args[0].upper().removeprefix("AS")
            as_index = _parse_int(word)
            if not 0 <= as_index < regs.AS_COUNT:
                raise ValueError(f"no address space {as_index} (0..{regs.AS_COUNT - 1})")
        self.next_job_break = [as_index]
        self._install_hooks()
        which = "" if as_index is None else f" of AS{as_index}"
        return f"will stop before the first packet of the next job{which}\n"

    def thread_text(self) -> str:
        """What gdb shows for the ring's thread (``info threads``)."""
        jobs = ring_jobs(self.gpu, limit=1)
        if not jobs:
            return f"ring 0: idle, CP {self.gpu.cp.state().name}"
        return f"ring 0: {jobs[0].describe()}"

    def _mon_reset(self, args: list[str]) -> str:
        self.gpu.reset()
        self._errors_seen = self.gpu.cp.errors
        return "device reset (the debugger's hold is kept)\n"

    def statistics(self) -> dict:
        return dict(
            self.counters,
            address=self.address,
            connected=self.conn is not None,
            breakpoints=len(self.breakpoints),
            watchpoints=len(self.watchpoints),
        )


__all__ = [
    "MONITOR_HELP",
    "GdbStub",
    "PacketReader",
    "checksum",
    "escape",
    "frame",
]
