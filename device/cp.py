"""DOC: the command processor (CP): ring, indirect buffers and packet execution.

**Ring.** The driver puts packets in a ring buffer in guest-physical memory: RING_BASE (4 KiB
aligned) and RING_SIZE (a power of two, 4 KiB..16 MiB) are checked and latched when
CP_CONTROL.ENABLE is set (RING_CONFIG error if invalid, or if RING_HEAD does not fit the
size). The driver writes packets at RING_TAIL, advances RING_TAIL and writes RING_DOORBELL;
the doorbell latches RING_TAIL (RING_CONFIG error if it is not dword aligned or not below
RING_SIZE) and the CP executes packets from RING_HEAD up to that tail. Writing RING_TAIL alone
starts nothing. Offsets are taken modulo the ring size, so a packet may wrap around the end.
When RING_HEAD catches up with the tail the CP goes IDLE and raises Irq.CP_IDLE.

**Packets.** Each packet is checked before it runs, in this order: UNKNOWN_OPCODE, BAD_LENGTH
(length rule of the opcode, or a body that runs past the ring tail / indirect-buffer end),
BAD_FLAGS, PRIVILEGED (PHYS, SET_AS and TLB_INVALIDATE inside an indirect buffer), then the
opcode's own checks (BAD_ALIGNMENT: WRITE_DATA address, CRC32 destination, WAIT_MEM address
4-byte aligned, ATOMIC and FENCE addresses 8-byte aligned, INDIRECT_BUFFER address 4-byte
aligned; BAD_ARGUMENT: AS index >= AS_COUNT, WAIT_MEM function > GT). Every access of a packet
is translated before any data moves, so a packet that faults leaves memory untouched.

**Slices.** The CP budgets its work, not its packets: one :meth:`CommandProcessor.run` does at
most :data:`BUDGET` work units (a page translated or an extent moved is one unit; a COPY,
FILL or CRC32 moves data in windows of 1 MiB), then returns so the device answers register
reads, resets and the debugger in between: one slice takes about a millisecond, and
:data:`SLICE_BOUND_S` (10 ms) is the bound the device states. A COPY, FILL or CRC32 larger
than one window runs in resumable slices: RING_HEAD is already past it, CP_PC stays on it, the
CP is RUNNING, and the next ``run`` continues it. It first translates every access, a window at
a time, keeping nothing but its position (so the guarantee above holds however large the
packet, in memory that does not grow with it), then moves the data: over the physical runs
the first pass found when a range has at most 64 of them (a buffer mapped in a few contiguous
runs), else translating each window again. If the guest changes the page tables of such a
fragmented range while the packet runs, that second translation may fault: the packet then
stops with the windows before the fault done.
A soft reset, clearing CP_CONTROL.ENABLE or an error drops the packet in progress. The
debugger's single step (``run(1, single=True)``) executes one whole packet, whatever its size;
with a ``budget`` it executes one slice of it, and the caller lets the packet go on.

**Indirect buffers** live in GPU VA of the current AS and are fetched with EXECUTE access
(PTE.EXEC). They nest up to FEATURES.IB_MAX_DEPTH (deeper: IB_TOO_DEEP). A fault while
fetching a packet (header or body) from an IB stops the CP with MMU_FAULT, CP_ERROR.OPCODE =
INDIRECT_BUFFER whatever the fetched packet was, IN_IB = 1 and CP_ERROR_ADDR = the VA of the
packet being fetched; the AS latches it with SOURCE = INDIRECT_BUFFER, ACCESS_TYPE = EXECUTE
and FAULTADDRESS = the first byte that could not be fetched.

**Errors.** An error latches CP_ERROR (CODE, OPCODE, AS, IN_IB) and CP_ERROR_ADDR (the failing
packet: physical in the ring, GPU VA in an IB), puts the CP in ERROR and raises Irq.CP_ERROR.
RING_HEAD always points past the ring-level packet that was executing (or at the tail when that
packet ran past it), and the IB stack is dropped, so CP_CONTROL.RESUME continues with the next
ring packet: a job whose IB faulted loses the rest of that IB and goes on with its FENCE.
A RESUME that leaves ERROR with nothing left to run raises Irq.CP_IDLE at once. Clearing
CP_CONTROL.ENABLE leaves ERROR too, also after a failed enable (RING_CONFIG), which never
enabled the CP (CP_CONTROL.ENABLE reads back the enabled state).

**Time.** The CP never runs by itself: the caller runs it (:meth:`CommandProcessor.run`).
WAIT_MEM checks its condition when it starts; if it does not hold the CP is WAITING, RING_HEAD
is already past the packet and CP_PC stays on it. Each later ``run`` polls again: once the
condition holds the packet completes; once the device clock passes the timeout (TIMEOUT_US > 0)
the CP stops with WAIT_TIMEOUT.
"""

from __future__ import annotations

import struct
import zlib
from typing import TYPE_CHECKING

from .abi import regs
from .abi.enums import AccessType, CpError, CpState, Irq, Opcode, PacketFlags, WaitFunc
from .abi.packets import HEADER_FAST, SPECS
from .abi.protocol import SPACE_PHYS
from .abi.regs import AS_COUNT, IB_MAX_DEPTH, PAGE_SHIFT, RING_SIZE_MAX, RING_SIZE_MIN
from .memory import BusError
from .mmu import TranslationFault

if TYPE_CHECKING:
    from .gpu import Gpu

_PHYS = int(PacketFlags.PHYS)
_IRQ = int(PacketFlags.IRQ)
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_ADDR2 = struct.Struct("<II")
_MASK64 = (1 << 64) - 1
_FILL_CHUNK = 1 << 20
SLICE_BOUND_S = regs.RESPONSE_BOUND_MS / 1000  # the stated bound (docs/hardware.md)
BUDGET = 4096  # work units per run(): pages translated + extents moved (see DOC, Slices)
BUDGET_IN_BAND = BUDGET // 16  # in-band memory: every extent is a DMA round trip
_WINDOW = 1 << 20  # bytes translated and moved per step of a sliced packet
_UNLIMITED = 1 << 62
_SAVED_MAX = 64  # extents of a range kept from the translation pass for the data pass
_PAGE = 1 << PAGE_SHIFT
_ENABLE = regs.CP_CONTROL.field("ENABLE").mask
_RESUME = regs.CP_CONTROL.field("RESUME").mask
_RESET_HEAD = regs.CP_CONTROL.field("RESET_HEAD").mask

# Per-opcode validation tables, indexed by the raw opcode byte (None: unknown opcode).
_MIN = [0] * 256
_MAX = [-1] * 256
_FLAGS = [0] * 256
_PRIV = [False] * 256
_KNOWN = [False] * 256
for _op, _spec in SPECS.items():
    _MIN[_op] = _spec.min_length
    _MAX[_op] = _spec.max_length
    _FLAGS[_op] = int(_spec.flags)
    _PRIV[_op] = _spec.privileged
    _KNOWN[_op] = True

_COMPARE = {
    WaitFunc.ALWAYS: lambda v, r: True,
    WaitFunc.LT: lambda v, r: v < r,
    WaitFunc.LE: lambda v, r: v <= r,
    WaitFunc.EQ: lambda v, r: v == r,
    WaitFunc.NE: lambda v, r: v != r,
    WaitFunc.GE: lambda v, r: v >= r,
    WaitFunc.GT: lambda v, r: v > r,
}


class CpStop(Exception):
    """Raised inside packet execution to stop the CP with ``code``."""

    def __init__(self, code: CpError, msg: str = "") -> None:
        super().__init__(msg or code.name)
        self.code = code


class _Wait:
    """A WAIT_MEM in progress."""

    __slots__ = ("addr", "deadline", "flags", "func", "in_ib", "mask", "pc", "reference")

    def __init__(self, pc, in_ib, flags, addr, reference, mask, func, deadline) -> None:
        self.pc = pc
        self.in_ib = in_ib
        self.flags = flags
        self.addr = addr
        self.reference = reference
        self.mask = mask
        self.func = func
        self.deadline = deadline


class _Bulk:
    """A COPY, FILL or CRC32 larger than one window, in progress across ``run`` calls.

    ``checking`` indexes ``ranges`` during the translation pass (None once every access
    translated); ``pos`` is the byte offset reached in the current range or in the data pass.
    """

    __slots__ = (
        "checking",
        "crc",
        "dst",
        "flags",
        "in_ib",
        "op",
        "pattern",
        "pc",
        "pos",
        "ranges",
        "saved",
        "size",
        "src",
    )

    def __init__(self, op, pc, in_ib, flags, src, dst, size, ranges, pattern=None) -> None:
        self.op = op
        self.pc = pc
        self.in_ib = in_ib
        self.flags = flags
        self.src = src
        self.dst = dst
        self.size = size
        self.ranges = ranges
        self.saved: list[list | None] = [[] for _ in ranges]  # first-pass extents, while few
        self.pattern = pattern
        self.checking = 0
        self.pos = 0
        self.crc = 0


class CommandProcessor:
    """Ring and IB execution for one :class:`~gemu.device.gpu.Gpu` (passive: the caller runs it)."""

    def __init__(self, gpu: Gpu) -> None:
        self.gpu = gpu
        self._halted = False  # the debugger's hold: not device state, survives a reset
        self._hook_pending = False  # the packet at PC was already offered to packet_hook
        self.packets = 0
        self.op_counts = [0] * 256
        self.errors = 0
        self.bytes_copied = 0
        self._handlers = [None] * 256
        for op, name in (
            (Opcode.NOP, "_nop"),
            (Opcode.SET_AS, "_set_as"),
            (Opcode.WRITE_DATA, "_write_data"),
            (Opcode.COPY, "_copy"),
            (Opcode.FILL, "_fill"),
            (Opcode.CRC32, "_crc32"),
            (Opcode.ATOMIC, "_atomic"),
            (Opcode.FENCE, "_fence"),
            (Opcode.WAIT_MEM, "_wait_mem"),
            (Opcode.INDIRECT_BUFFER, "_indirect_buffer"),
            (Opcode.TLB_INVALIDATE, "_tlb_invalidate"),
        ):
            self._handlers[op] = getattr(self, name)
        self._fast = {op: spec.fast for op, spec in SPECS.items()}
        self.reset()

    def reset(self) -> None:
        """CP stopped, head/tail 0, AS 0, no IB, no wait (the debugger's hold is kept)."""
        self.packets_at_reset = self.packets  # CP_PACKETS counts from here
        self.enabled = False
        self.error = False
        self.head = 0
        self.tail = 0
        self.ring_base = 0
        self.ring_size = 0
        self.as_index = 0
        self.ib_stack: list[list[int]] = []  # [pc, end] per nesting level, VAs
        self.waiting: _Wait | None = None
        self.bulk: _Bulk | None = None  # the sliced packet in progress
        self.error_ib_depth = 0  # IB nesting of the failing packet (the stack is dropped)
        self.job_start = 0  # ring offset after the last ring-level FENCE: where a job begins
        self._budget = 0  # work units left in this run()
        self._busy = False  # executed something since the last CP_IDLE
        # Context of the packet being executed, for faults and errors.
        self._cur_pc = 0
        self._cur_op = 0
        self._cur_in_ib = False

    # --- state ---------------------------------------------------------------------------

    @property
    def halted(self) -> bool:
        """Held by the debugger or the machine (HALTED); the device clock stands still then."""
        return self._halted

    @halted.setter
    def halted(self, value: bool) -> None:
        self._halted = value
        self.gpu.clock.hold(value)

    def state(self) -> CpState:
        if self.error:
            return CpState.ERROR
        if self._halted:
            return CpState.HALTED
        if not self.enabled:
            return CpState.STOPPED
        if self.waiting is not None:
            return CpState.WAITING
        if self.bulk is not None or self.ib_stack or self.head != self.tail:
            return CpState.RUNNING
        return CpState.IDLE

    def runnable(self) -> bool:
        """Packets are ready to execute now (RUNNING and not held by the debugger)."""
        return (
            self.enabled
            and not self.error
            and not self._halted
            and self.waiting is None
            and (self.bulk is not None or bool(self.ib_stack) or self.head != self.tail)
        )

    def pc(self) -> int:
        """Address of the next packet: the WAIT_MEM being polled, the next IB packet (VA) or the
        ring packet at RING_HEAD (guest-physical)."""
        if self.waiting is not None:
            return self.waiting.pc
        if self.bulk is not None:
            return self.bulk.pc
        if self.ib_stack:
            return self.ib_stack[-1][0]
        return self.ring_base + self.head

    def in_ib(self) -> bool:
        if self.waiting is not None:
            return self.waiting.in_ib
        if self.bulk is not None:
            return self.bulk.in_ib
        return bool(self.ib_stack)

    def status_value(self) -> int:
        return int(self.state()) | (len(self.ib_stack) << 4) | (self.as_index << 8)

    def wait_deadline_ns(self) -> int | None:
        w = self.waiting
        return None if w is None else w.deadline

    def debug_set_pc(self, addr: int) -> None:
        """The debugger moves the CP to the packet at ``addr`` (gdb's ``jump``, ``set $pc``):
        a ring address (guest-physical) drops the indirect buffers, the wait and the packet in
        progress and makes it RING_HEAD. While an indirect buffer executes, an address below
        its end is a GPU VA in it and becomes its next packet (the ring and a buffer's VAs may
        overlap: that buffer wins). Raises ValueError naming what is wrong."""
        if addr & 3:
            raise ValueError(f"pc {addr:#x} is not dword aligned")
        if self.error:
            raise ValueError("the CP is in ERROR: the guest's driver recovers it (RESUME, reset)")
        if not self.enabled:
            raise ValueError("the CP is not enabled (no ring latched)")
        # the innermost buffer still executing (a drained one is popped before its next fetch)
        live = [i for i, (pc, end) in enumerate(self.ib_stack) if pc < end]
        if live and addr < self.ib_stack[live[-1]][1]:
            del self.ib_stack[live[-1] + 1 :]
            self.ib_stack[-1][0] = addr
        else:
            if not self.ring_base <= addr < self.ring_base + self.ring_size:
                raise ValueError(
                    f"pc {addr:#x} is neither in the ring (PA {self.ring_base:#x}+"
                    f"{self.ring_size:#x}) nor in an indirect buffer being executed"
                )
            self.ib_stack = []
            self.head = self.job_start = addr - self.ring_base
        self.waiting = None
        self.bulk = None
        self._hook_pending = False

    # --- register behaviour --------------------------------------------------------------

    def control_written(self, value: int) -> None:
        """CP_CONTROL written: ENABLE cleared, RESET_HEAD, ENABLE set, RESUME, in that order."""
        rf = self.gpu.regs
        if not value & _ENABLE and (self.enabled or self.error):
            # also after a failed enable (RING_CONFIG), which left ENABLE unset but ERROR on
            self.enabled = False
            self.error = False
            self.ib_stack = []
            self.waiting = None
            self.bulk = None
        if value & _RESET_HEAD:
            if self.enabled:
                self.gpu.guest_error("CP_CONTROL.RESET_HEAD ignored while the CP is enabled")
            else:
                self.head = 0
                self.tail = 0
                self.job_start = 0
                rf.set(regs.RING_TAIL, 0)
        if value & _ENABLE and not self.enabled:
            self._enable()
        if value & _RESUME:
            rf.set(regs.CP_ERROR, 0)
            rf.set(regs.CP_ERROR_ADDR_LO, 0)
            rf.set(regs.CP_ERROR_ADDR_HI, 0)
            if self.error:
                self.error = False
                self.ib_stack = []
                self.waiting = None
                self.bulk = None
                if self.enabled and self.head == self.tail:
                    # nothing left to run: say so, as draining the ring would
                    self._busy = False
                    self.gpu.raise_irq(Irq.CP_IDLE)
        self.gpu.update_irq()

    def _enable(self) -> None:
        rf = self.gpu.regs
        base = rf.get(regs.RING_BASE_LO) | (rf.get(regs.RING_BASE_HI) << 32)
        size = rf.get(regs.RING_SIZE)
        self.ring_base = base
        self.ring_size = size
        self.ib_stack = []
        self.waiting = None
        self.bulk = None
        self.error = False
        if base % RING_SIZE_MIN or not (
            RING_SIZE_MIN <= size <= RING_SIZE_MAX and size & (size - 1) == 0
        ):
            self.ring_size = 0
            self._raise_error(
                CpError.RING_CONFIG, 0, base, False, f"ring base {base:#x} size {size:#x}"
            )
            return
        if self.head >= size:
            self._raise_error(
                CpError.RING_CONFIG, 0, base, False, f"RING_HEAD {self.head:#x} >= size {size:#x}"
            )
            return
        self.enabled = True
        self.job_start = self.head
        self._latch_tail()

    def doorbell(self) -> None:
        """RING_DOORBELL written: latch RING_TAIL (ignored while the CP is disabled)."""
        if self.enabled:
            self._latch_tail()
            self.gpu.update_irq()

    def _latch_tail(self) -> None:
        tail = self.gpu.regs.get(regs.RING_TAIL)
        if tail % 4 or tail >= self.ring_size:
            self._raise_error(
                CpError.RING_CONFIG,
                0,
                self.ring_base + self.head,
                False,
                f"RING_TAIL {tail:#x} is unaligned or not below RING_SIZE {self.ring_size:#x}",
            )
            return
        self.tail = tail

    # --- errors --------------------------------------------------------------------------

    def _raise_error(self, code: CpError, opcode: int, addr: int, in_ib: bool, why: str) -> None:
        """Stop on an error: latch CP_ERROR/CP_ERROR_ADDR, ERROR state, Irq.CP_ERROR."""
        gpu = self.gpu
        rf = gpu.regs
        self.errors += 1
        self.error = True
        self.error_ib_depth = len(self.ib_stack) if in_ib else 0
        self.ib_stack = []
        self.waiting = None
        self.bulk = None
        rf.set(
            regs.CP_ERROR,
            int(code) | ((opcode & 0xFF) << 8) | (self.as_index << 16) | (int(in_ib) << 20),
        )
        rf.set(regs.CP_ERROR_ADDR_LO, addr & 0xFFFFFFFF)
        rf.set(regs.CP_ERROR_ADDR_HI, (addr >> 32) & 0xFFFFFFFF)
        gpu.log_cp_error(code, opcode, addr, in_ib, why)
        gpu.raise_irq(Irq.CP_ERROR)

    def _stop(self, code: CpError, why: str) -> None:
        self._raise_error(code, self._cur_op, self._cur_pc, self._cur_in_ib, why)

    # --- execution -----------------------------------------------------------------------

    def run(self, max_packets: int, *, single: bool = False, budget: int | None = None) -> int:
        """Execute up to ``max_packets`` packets within ``budget`` work units (default
        :data:`BUDGET`, or :data:`BUDGET_IN_BAND` over in-band memory); returns how many
        completed.

        Stops early when the ring drains, a WAIT_MEM blocks, the budget is spent (a large
        packet then stays in progress and the next ``run`` continues it), an error occurs or
        the debugger halts. ``single`` executes one whole packet even when halted, whatever
        its size, without consulting ``packet_hook`` (the debugger's single step); with a
        ``budget`` too, a packet larger than it stays in progress as in a normal run.
        """
        if max_packets <= 0 or not self.enabled or self.error or (self._halted and not single):
            return 0
        gpu = self.gpu
        mem = gpu.mem
        if mem is None:
            if (
                self.waiting is not None
                or self.bulk is not None
                or self.ib_stack
                or self.head != self.tail
            ):
                self._raise_error(
                    CpError.NO_MEMORY, 0, self.pc(), self.in_ib(), "no guest memory attached"
                )
            return 0
        mv = getattr(mem, "mv", None)
        if budget is not None:
            self._budget = budget
        elif single:
            self._budget = _UNLIMITED
        else:
            self._budget = BUDGET if mv is not None else BUDGET_IN_BAND
        memsize = mem.size
        base = self.ring_base
        rmask = self.ring_size - 1
        tail = self.tail
        hook = gpu.packet_hook
        skip_hook = single or self._hook_pending
        handlers = self._handlers
        counts = self.op_counts
        unpack_header = HEADER_FAST.unpack_from
        executed = 0
        try:
            while executed < max_packets and self._budget > 0:
                if self.bulk is not None:
                    if self._halted and not single:
                        break
                    op = self.bulk.op
                    if not self._advance():
                        break
                    self._busy = True
                    self._hook_pending = False
                    executed += 1
                    counts[op] += 1
                    if single:
                        break
                    continue
                if self.waiting is not None:
                    if not self._poll_wait():
                        break
                    self._busy = True
                    self._hook_pending = False
                    executed += 1
                    counts[Opcode.WAIT_MEM] += 1
                    if single:
                        break
                    continue
                if self._halted and not single:
                    break
                if self.ib_stack:
                    frame = self.ib_stack[-1]
                    if frame[0] >= frame[1]:
                        self.ib_stack.pop()
                        continue
                    pc = frame[0]
                    self._cur_pc, self._cur_op, self._cur_in_ib = pc, Opcode.INDIRECT_BUFFER, True
                    op, flags, length, buf, off = self._fetch_ib(frame, hook, skip_hook)
                    if buf is None:
                        self.halted = True
                        self._hook_pending = True
                        break
                else:
                    head = self.head
                    if head == tail:
                        break
                    pc = base + head
                    self._cur_pc, self._cur_op, self._cur_in_ib = pc, 0, False
                    if mv is not None and pc + 4 <= memsize:
                        op, flags, length = unpack_header(mv, pc)
                    else:
                        op, flags, length = unpack_header(mem.read(pc, 4))
                    if hook is not None and not skip_hook and hook(pc, False):
                        self.halted = True
                        self._hook_pending = True
                        break
                    nbytes = 4 + 4 * length
                    if nbytes <= ((tail - head) & rmask):
                        self.head = (head + nbytes) & rmask
                        fits = True
                    else:
                        self.head = tail
                        fits = False
                    self._cur_op = op
                    if not _KNOWN[op]:
                        raise CpStop(CpError.UNKNOWN_OPCODE, f"unknown opcode {op:#04x}")
                    if not (_MIN[op] <= length <= _MAX[op]) or not fits:
                        raise CpStop(
                            CpError.BAD_LENGTH,
                            f"length {length} for {Opcode(op).name}"
                            + ("" if fits else " runs past RING_TAIL"),
                        )
                    if flags & ~_FLAGS[op]:
                        raise CpStop(CpError.BAD_FLAGS, f"flags {flags:#x} for {Opcode(op).name}")
                    if head + nbytes <= rmask + 1:
                        if pc + nbytes > memsize:
                            raise BusError(pc, nbytes)
                        buf = mv if mv is not None else mem.read(pc, nbytes)
                        off = pc + 4 if mv is not None else 4
                    else:  # the packet wraps around the end of the ring
                        first = rmask + 1 - head
                        buf = mem.read(pc, first) + mem.read(base, nbytes - first)
                        off = 4
                skip_hook = False
                self._hook_pending = False
                handlers[op](flags, buf, off, length)
                counts[op] += 1
                executed += 1
                self._busy = True
                if self.waiting is not None or self.bulk is not None:
                    # WAIT_MEM blocked or the budget ran out in a large packet: not done yet
                    counts[op] -= 1
                    executed -= 1
                    break
                if single:
                    break
        except CpStop as stop:
            self._stop(stop.code, str(stop))
        except TranslationFault as f:
            access = self._fault_access
            if getattr(f, "fetch", False):
                access, self._cur_op = AccessType.EXECUTE, Opcode.INDIRECT_BUFFER
            gpu.mmu.latch_fault(self.as_index, f.code, f.va, access, self._cur_op)
            self._stop(CpError.MMU_FAULT, f"{f.code.name} at GPU VA {f.va:#x}")
        except BusError as e:
            self._stop(CpError.BUS_ERROR, str(e))
        self.packets += executed
        if (
            self._busy
            and not self.error
            and self.waiting is None
            and self.bulk is None
            and not self.ib_stack
            and self.head == self.tail
        ):
            self._busy = False
            gpu.raise_irq(Irq.CP_IDLE)
        return executed

    _fault_access = AccessType.READ  # access type of the data translation in progress

    def _ib_translate(self, va: int, size: int) -> list:
        try:
            return self.gpu.mmu.translate_range(self.as_index, va, size, AccessType.EXECUTE)
        except TranslationFault as f:
            f.fetch = True  # reported with SOURCE = INDIRECT_BUFFER, ACCESS_TYPE = EXECUTE
            raise

    def _fetch_ib(self, frame: list[int], hook, skip_hook: bool):
        """Fetch the packet at ``frame[0]``: (opcode, flags, length, buf, body offset).

        ``buf`` is None when packet_hook asked to halt before the packet.
        """
        mem = self.gpu.mem
        pc, end = frame
        ((hpa, _),) = self._ib_translate(pc, 4)
        op, flags, length = HEADER_FAST.unpack_from(mem.read(hpa, 4))
        if hook is not None and not skip_hook and hook(pc, True):
            return op, flags, length, None, 0
        nbytes = 4 + 4 * length
        self._cur_op = op
        fits = pc + nbytes <= end
        frame[0] = pc + nbytes if fits else end
        if not _KNOWN[op]:
            raise CpStop(CpError.UNKNOWN_OPCODE, f"unknown opcode {op:#04x}")
        if not fits:
            raise CpStop(CpError.BAD_LENGTH, f"packet of {nbytes} bytes runs past the IB end")
        if not (_MIN[op] <= length <= _MAX[op]):
            raise CpStop(CpError.BAD_LENGTH, f"length {length} for {Opcode(op).name}")
        if flags & ~_FLAGS[op]:
            raise CpStop(CpError.BAD_FLAGS, f"flags {flags:#x} for {Opcode(op).name}")
        if _PRIV[op] or flags & _PHYS:
            raise CpStop(CpError.PRIVILEGED, f"{Opcode(op).name} with flags {flags:#x} in an IB")
        if not length:
            return op, flags, length, b"", 0
        ext = self._ib_translate(pc + 4, 4 * length)
        self._budget -= (length >> 10) + len(ext)
        mv = getattr(mem, "mv", None)
        if len(ext) == 1 and mv is not None:
            return op, flags, length, mv, ext[0][0]
        return op, flags, length, b"".join(mem.read(pa, n) for pa, n in ext), 0

    # --- data access helpers -------------------------------------------------------------

    def _extents(self, addr: int, size: int, flags: int, access: AccessType) -> list:
        if flags & _PHYS:
            self.gpu.mem.check(addr, size)
            return [(addr, size)] if size else []
        self._fault_access = access
        return self.gpu.mmu.translate_range(self.as_index, addr, size, access)

    def _accessed(self, addr: int, size: int, flags: int, write: bool) -> None:
        hook = self.gpu.access_hook
        if hook is not None:
            hook(addr, size, write, SPACE_PHYS if flags & _PHYS else self.as_index)

    def _read(self, extents: list) -> bytes:
        mem = self.gpu.mem
        if len(extents) == 1:
            pa, n = extents[0]
            return mem.read(pa, n)
        return b"".join(mem.read(pa, n) for pa, n in extents)

    def _write(self, extents: list, data) -> None:
        mem = self.gpu.mem
        if len(extents) == 1:
            mem.write(extents[0][0], data)
            return
        data = memoryview(data)
        pos = 0
        for pa, n in extents:
            mem.write(pa, data[pos : pos + n])
            pos += n

    # --- opcodes -------------------------------------------------------------------------
    # Each handler gets (flags, buf, off, length): the body is buf[off : off + 4 * length].

    def _nop(self, flags, buf, off, length) -> None:
        if not self._cur_in_ib and self._cur_pc == self.ring_base + self.job_start:
            self.job_start = self.head  # padding after a job's FENCE: not the next job's

    def _set_as(self, flags, buf, off, length) -> None:
        (as_index,) = _U32.unpack_from(buf, off)
        if as_index >= AS_COUNT:
            raise CpStop(CpError.BAD_ARGUMENT, f"SET_AS {as_index}: only {AS_COUNT} AS")
        self.as_index = as_index

    def _write_data(self, flags, buf, off, length) -> None:
        lo, hi = _ADDR2.unpack_from(buf, off)
        addr = lo | (hi << 32)
        if addr & 3:
            raise CpStop(CpError.BAD_ALIGNMENT, f"WRITE_DATA to {addr:#x}")
        n = 4 * length - 8
        data = buf[off + 8 : off + 8 + n]
        if flags & _PHYS:
            mem = self.gpu.mem
            if addr + n > mem.size:
                raise BusError(addr, n)
            mem.write(addr, data)
        else:
            self._fault_access = AccessType.WRITE
            self._write(
                self.gpu.mmu.translate_range(self.as_index, addr, n, AccessType.WRITE), data
            )
            if n > _PAGE:
                self._budget -= 2 * (n >> PAGE_SHIFT)
        if self.gpu.access_hook is not None:
            self._accessed(addr, n, flags, True)

    def _copy(self, flags, buf, off, length) -> None:
        slo, shi, dlo, dhi, size = self._fast[Opcode.COPY].unpack_from(buf, off)
        src, dst = slo | (shi << 32), dlo | (dhi << 32)
        if size > _WINDOW:
            ranges = ((src, size, AccessType.READ), (dst, size, AccessType.WRITE))
            self._start_bulk(Opcode.COPY, flags, src, dst, size, ranges)
            return
        # the hot path: one window at most, moved whole (the sliced path shares the helpers)
        sext = self._extents(src, size, flags, AccessType.READ)
        dext = self._extents(dst, size, flags, AccessType.WRITE)
        mem = self.gpu.mem
        if len(sext) == 1 and len(dext) == 1:
            mem.copy(sext[0][0], dext[0][0], size)
        else:
            self._copy_extents(sext, dext, size)
        self._budget -= 3 * (size >> PAGE_SHIFT) + 2  # pages translated twice, extents moved
        self.bytes_copied += size
        if self.gpu.access_hook is not None:
            self._accessed(src, size, flags, False)
            self._accessed(dst, size, flags, True)

    def _copy_extents(self, sext: list, dext: list, size: int) -> None:
        mem = self.gpu.mem
        if len(sext) == 1 and len(dext) == 1:
            mem.copy(sext[0][0], dext[0][0], size)
            return
        si = di = 0
        soff = doff = 0
        left = size
        while left:
            spa, slen = sext[si]
            dpa, dlen = dext[di]
            k = min(slen - soff, dlen - doff)
            mem.copy(spa + soff, dpa + doff, k)
            soff += k
            doff += k
            left -= k
            if soff == slen:
                si, soff = si + 1, 0
            if doff == dlen:
                di, doff = di + 1, 0

    def _copied(self, flags: int, src: int, dst: int, size: int) -> None:
        self.bytes_copied += size
        if self.gpu.access_hook is not None:
            self._accessed(src, size, flags, False)
            self._accessed(dst, size, flags, True)

    def _fill(self, flags, buf, off, length) -> None:
        dlo, dhi, size, value = self._fast[Opcode.FILL].unpack_from(buf, off)
        dst = dlo | (dhi << 32)
        pattern = memoryview(_U32.pack(value) * ((min(size, _FILL_CHUNK) + 7) // 4 + 1))
        if size > _WINDOW:
            ranges = ((dst, size, AccessType.WRITE),)
            self._start_bulk(Opcode.FILL, flags, 0, dst, size, ranges, pattern)
            return
        ext = self._extents(dst, size, flags, AccessType.WRITE)
        if len(ext) == 1 and size <= _FILL_CHUNK:
            self.gpu.mem.write(ext[0][0], pattern[:size])
        else:
            self._fill_extents(ext, pattern, 0)
        self._budget -= 2 * (size >> PAGE_SHIFT) + 1
        if self.gpu.access_hook is not None:
            self._accessed(dst, size, flags, True)

    def _fill_extents(self, ext: list, pview: memoryview, pos: int) -> None:
        """Write the pattern over ``ext``; ``pos`` is the byte offset from the packet's DST (the
        pattern phase is ``pos % 4``)."""
        mem = self.gpu.mem
        for pa, n in ext:
            done = 0
            while done < n:
                k = min(n - done, _FILL_CHUNK)
                phase = (pos + done) & 3
                mem.write(pa + done, pview[phase : phase + k])
                done += k
            pos += n

    def _crc32(self, flags, buf, off, length) -> None:
        slo, shi, size, dlo, dhi = self._fast[Opcode.CRC32].unpack_from(buf, off)
        src, dst = slo | (shi << 32), dlo | (dhi << 32)
        if dst & 3:
            raise CpStop(CpError.BAD_ALIGNMENT, f"CRC32 destination {dst:#x}")
        if size > _WINDOW:
            ranges = ((src, size, AccessType.READ), (dst, 4, AccessType.WRITE))
            self._start_bulk(Opcode.CRC32, flags, src, dst, size, ranges)
            return
        sext = self._extents(src, size, flags, AccessType.READ)
        dext = self._extents(dst, 4, flags, AccessType.WRITE)
        mem = self.gpu.mem
        crc = 0
        for pa, n in sext:
            view = mem.view(pa, n)
            crc = zlib.crc32(view if view is not None else mem.read(pa, n), crc)
        self._budget -= 2 * (size >> PAGE_SHIFT) + 1
        self._write(dext, _U32.pack(crc))
        if self.gpu.access_hook is not None:
            self._accessed(src, size, flags, False)
            self._accessed(dst, 4, flags, True)

    def _crc_extents(self, ext: list, crc: int) -> int:
        mem = self.gpu.mem
        for pa, n in ext:
            view = mem.view(pa, n)
            crc = zlib.crc32(view if view is not None else mem.read(pa, n), crc)
        return crc

    def _crc_done(self, flags: int, src: int, dst: int, size: int, dext: list, crc: int) -> None:
        self._write(dext, _U32.pack(crc))
        if self.gpu.access_hook is not None:
            self._accessed(src, size, flags, False)
            self._accessed(dst, 4, flags, True)

    # --- sliced packets ------------------------------------------------------------------

    def _start_bulk(self, op, flags, src, dst, size, ranges, pattern=None) -> None:
        """Begin a COPY/FILL/CRC32 larger than one window; run() continues it under budget."""
        self.bulk = _Bulk(op, self._cur_pc, self._cur_in_ib, flags, src, dst, size, ranges, pattern)
        self._advance()  # clears self.bulk once done; the caller counts the packet then

    def _advance(self) -> bool:
        """Continue the sliced packet for at most the budget left; True once it completed.

        First pass: every range is translated, one window at a time, keeping only the position
        and, while a range has at most ``_SAVED_MAX`` physically contiguous runs, those runs;
        a fault there leaves memory untouched. Second pass: the data moves, over the saved
        runs, or else over each window translated again (the TLB serves it unless the tables
        were changed meanwhile; a fault then stops the packet with the windows before it done).
        """
        b = self.bulk
        self._cur_pc, self._cur_op, self._cur_in_ib = b.pc, b.op, b.in_ib
        flags = b.flags
        extents = self._extents
        while b.checking is not None:
            ri = b.checking
            if ri == len(b.ranges):
                b.checking, b.pos = None, 0
                break
            addr, size, access = b.ranges[ri]
            while b.pos < size:
                if self._budget <= 0:
                    return False
                va = addr + b.pos
                n = min(_WINDOW - (va & (_WINDOW - 1)), size - b.pos)
                ext = extents(va, n, flags, access)
                self._budget -= (n >> PAGE_SHIFT) + len(ext) + 1
                saved = b.saved[ri]
                if saved is not None:
                    for pa, k in ext:
                        if saved and saved[-1][0] + saved[-1][1] == pa:
                            saved[-1] = (saved[-1][0], saved[-1][1] + k)
                        elif len(saved) < _SAVED_MAX:
                            saved.append((pa, k))
                        else:
                            b.saved[ri] = None  # too fragmented: translate again later
                            break
                b.pos += n
            b.checking, b.pos = ri + 1, 0
        op = b.op
        # a COPY onto an overlapping range above its source moves the tail first (memmove)
        backward = op == Opcode.COPY and b.src < b.dst < b.src + b.size
        while b.pos < b.size:
            if self._budget <= 0:
                return False
            if backward:
                n = min(_WINDOW, b.size - b.pos)
                pos = b.size - b.pos - n
            else:
                pos = b.pos
                anchor = (b.dst if op == Opcode.FILL else b.src) + pos
                n = min(_WINDOW - (anchor & (_WINDOW - 1)), b.size - pos)
            if op == Opcode.COPY:
                sext = self._window(b, 0, pos, n)
                dext = self._window(b, 1, pos, n)
                self._copy_extents(sext, dext, n)
                cost = len(sext) + len(dext)
            elif op == Opcode.FILL:
                ext = self._window(b, 0, pos, n)
                self._fill_extents(ext, b.pattern, pos)
                cost = len(ext)
            else:
                ext = self._window(b, 0, pos, n)
                b.crc = self._crc_extents(ext, b.crc)
                cost = len(ext)
            self._budget -= cost + (n >> PAGE_SHIFT) + 1
            b.pos += n
        self.bulk = None
        if op == Opcode.COPY:
            self._copied(flags, b.src, b.dst, b.size)
        elif op == Opcode.FILL:
            if self.gpu.access_hook is not None:
                self._accessed(b.dst, b.size, flags, True)
        else:
            dext = extents(b.dst, 4, flags, AccessType.WRITE)
            self._crc_done(flags, b.src, b.dst, b.size, dext, b.crc)
        return True

    def _window(self, b: _Bulk, ri: int, pos: int, n: int) -> list:
        """The physical extents of ``[pos, pos + n)`` of range ``ri`` of the sliced packet:
        cut from the runs the first pass saved, or translated again (charged to the budget)."""
        saved = b.saved[ri]
        addr, _size, access = b.ranges[ri]
        if saved is None:
            ext = self._extents(addr + pos, n, b.flags, access)
            self._budget -= n >> PAGE_SHIFT
            return ext
        out = []
        off = 0
        end = pos + n
        for pa, k in saved:
            if off + k > pos:
                lo, hi = max(pos, off), min(end, off + k)
                out.append((pa + lo - off, hi - lo))
                if off + k >= end:
                    break
            off += k
        return out

    def _atomic(self, flags, buf, off, length) -> None:
        alo, ahi, vlo, vhi = self._fast[Opcode.ATOMIC].unpack_from(buf, off)
        addr = alo | (ahi << 32)
        if addr & 7:
            raise CpStop(CpError.BAD_ALIGNMENT, f"ATOMIC at {addr:#x}")
        ((pa, _),) = self._extents(addr, 8, flags, AccessType.ATOMIC)
        mem = self.gpu.mem
        mem.write_u64(pa, (mem.read_u64(pa) + (vlo | (vhi << 32))) & _MASK64)
        if self.gpu.access_hook is not None:
            self._accessed(addr, 8, flags, True)

    def _fence(self, flags, buf, off, length) -> None:
        alo, ahi, slo, shi = self._fast[Opcode.FENCE].unpack_from(buf, off)
        addr = alo | (ahi << 32)
        if addr & 7:
            raise CpStop(CpError.BAD_ALIGNMENT, f"FENCE at {addr:#x}")
        ((pa, _),) = self._extents(addr, 8, flags, AccessType.WRITE)
        mem = self.gpu.mem
        mem.write_u64(pa, slo | (shi << 32))
        if not self._cur_in_ib:
            self.job_start = self.head  # a ring FENCE ends a job (for the debugger's view)
        gpu = self.gpu
        gpu.regs.set(regs.FENCE_SEQNO_LO, slo)
        gpu.regs.set(regs.FENCE_SEQNO_HI, shi)
        if gpu.access_hook is not None:
            self._accessed(addr, 8, flags, True)
        if flags & _IRQ:
            gpu.raise_irq(Irq.FENCE)

    def _wait_mem(self, flags, buf, off, length) -> None:
        alo, ahi, ref, mask, func, timeout_us = self._fast[Opcode.WAIT_MEM].unpack_from(buf, off)
        addr = alo | (ahi << 32)
        if func > WaitFunc.GT:
            raise CpStop(CpError.BAD_ARGUMENT, f"WAIT_MEM function {func}")
        if addr & 3:
            raise CpStop(CpError.BAD_ALIGNMENT, f"WAIT_MEM at {addr:#x}")
        deadline = None
        if timeout_us:
            deadline = self.gpu.clock.now_ns() + timeout_us * 1000
        w = _Wait(self._cur_pc, self._cur_in_ib, flags, addr, ref, mask, WaitFunc(func), deadline)
        if not self._check_wait(w):
            self.waiting = w

    def _check_wait(self, w: _Wait) -> bool:
        ((pa, _),) = self._extents(w.addr, 4, w.flags, AccessType.READ)
        value = self.gpu.mem.read_u32(pa)
        if self.gpu.access_hook is not None:
            self._accessed(w.addr, 4, w.flags, False)
        return _COMPARE[w.func](value & w.mask, w.reference)

    def _poll_wait(self) -> bool:
        """Poll the pending WAIT_MEM: True when it completed, False while still waiting."""
        w = self.waiting
        self._cur_pc, self._cur_op, self._cur_in_ib = w.pc, Opcode.WAIT_MEM, w.in_ib
        if self._check_wait(w):
            self.waiting = None
            return True
        if w.deadline is not None and self.gpu.clock.now_ns() >= w.deadline:
            raise CpStop(CpError.WAIT_TIMEOUT, f"WAIT_MEM at {w.addr:#x} timed out")
        return False

    def _indirect_buffer(self, flags, buf, off, length) -> None:
        lo, hi, size_dw = self._fast[Opcode.INDIRECT_BUFFER].unpack_from(buf, off)
        addr = lo | (hi << 32)
        if len(self.ib_stack) >= IB_MAX_DEPTH:
            raise CpStop(CpError.IB_TOO_DEEP, f"IB nesting deeper than {IB_MAX_DEPTH}")
        if addr & 3:
            raise CpStop(CpError.BAD_ALIGNMENT, f"INDIRECT_BUFFER at {addr:#x}")
        if size_dw:
            self.ib_stack.append([addr, addr + 4 * size_dw])

    def _tlb_invalidate(self, flags, buf, off, length) -> None:
        as_index, vlo, vhi, slo, shi = self._fast[Opcode.TLB_INVALIDATE].unpack_from(buf, off)
        if as_index >= AS_COUNT:
            raise CpStop(CpError.BAD_ARGUMENT, f"TLB_INVALIDATE of AS {as_index}")
        self._budget -= self.gpu.mmu.invalidate(as_index, vlo | (vhi << 32), slo | (shi << 32))
