"""DOC: the gemu GPU device model (passive and single-threaded).

:class:`Gpu` assembles the register file (:mod:`.regfile`), the MMU (:mod:`.mmu`), the command
processor (:mod:`.cp`) and the device clock (:mod:`.clock`) over guest memory
(:mod:`.memory`). It owns no thread, lock or socket: the protocol server calls MMIO and
execution methods and owns time; a debugger (gdb stub) uses the side-effect-free debug methods
and the hooks. Registers and packets are the published interface in :mod:`gemu.device.abi`::

    gpu = Gpu(stepped=True)
    gpu.attach_memory(MappedMemory(bytearray(1 << 20)))
    gpu.on_irq = lambda level, irq_status, mmu_int_stat: ...
    gpu.mmio_write(regs.RING_SIZE.offset, 4096)
    gpu.mmio_write(regs.CP_CONTROL.offset, 1)          # ENABLE
    ...                                               # packets into the ring, RING_TAIL
    gpu.mmio_write(regs.RING_DOORBELL.offset, 1)
    while gpu.has_work():
        gpu.run(1024)

**Interrupts.** :meth:`Gpu.update_irq` is the one place deriving interrupt state:
MMU_INT_STAT = MMU_INT_RAWSTAT & MMU_INT_MASK; IRQ_RAWSTAT.MMU = (MMU_INT_STAT != 0);
IRQ_STATUS = IRQ_RAWSTAT & IRQ_MASK; the line is high while IRQ_STATUS != 0. Whenever
(line, IRQ_STATUS, MMU_INT_STAT) changes, ``on_irq(level, irq_status, mmu_int_stat)`` is called.

**Execution.** :meth:`Gpu.has_work` says packets are ready; :meth:`Gpu.run` executes up to N of
them within a work budget (``cp.BUDGET``: about a millisecond, whatever the packets are), so a
caller that loops ``run`` and its own input stays responsive; a large COPY/FILL/CRC32 left
half done by the budget is continued by the next call (see :mod:`.cp`, Slices). While a WAIT_MEM blocks (``cp_state() == WAITING``) the device does not poll on its own:
the caller runs it again, at the latest at :meth:`Gpu.wait_deadline_ns` (its timeout on the
device clock, None when it waits forever); with the free clock the server re-polls every few
tens to hundreds of microseconds. In stepped mode :meth:`Gpu.step` advances the clock, then runs.

**Debugger hooks.** ``packet_hook(addr, in_ib) -> bool`` is called before each packet; True
halts the CP *before* that packet (HALTED). :meth:`Gpu.resume` continues and executes that
packet without asking the hook again; :meth:`Gpu.single_step` executes exactly one packet even
while halted. ``access_hook(addr, size, write, space)`` is called after each data access of a
packet (not for packet fetches or page-table walks) with the GPU VA and AS index, or the
physical address and ``protocol.SPACE_PHYS``; calling :meth:`Gpu.halt` from it stops the CP
after the current packet. The hold survives a device reset (it belongs to the debugger).
"""

from __future__ import annotations

from collections.abc import Callable

from .abi import regs
from .abi.enums import AccessType, CpError, CpState, Irq, Opcode
from .abi.protocol import SPACE_PHYS
from .abi.regs import PAGE_SHIFT
from .clock import FreeClock, SteppedClock
from .cp import CommandProcessor
from .memory import BusError, GuestMemory
from .mmu import Mappings, MemFault, Mmu, perms_str
from .regfile import RegFile, access_table, guest_error

__all__ = ["Gpu", "MemFault", "perms_str"]

_IRQ_RAWSTAT = regs.IRQ_RAWSTAT.offset >> 2
_IRQ_MASK = regs.IRQ_MASK.offset >> 2
_IRQ_STATUS = regs.IRQ_STATUS.offset >> 2
_MMU_RAW = regs.MMU_INT_RAWSTAT.offset >> 2
_MMU_MASK = regs.MMU_INT_MASK.offset >> 2
_MMU_STAT = regs.MMU_INT_STAT.offset >> 2
_IRQ_MMU = int(Irq.MMU)


class Gpu:
    """The virtual GPU. See the module documentation for the contract."""

    def __init__(self, *, tlb_capacity: int = 65536, stepped: bool = False) -> None:
        self.clock: FreeClock | SteppedClock = SteppedClock() if stepped else FreeClock()
        self.mem: GuestMemory | None = None
        self.on_irq: Callable[[bool, int, int], None] | None = None
        self.packet_hook: Callable[[int, bool], bool] | None = None
        self.access_hook: Callable[[int, int, bool, int], None] | None = None
        self.reset_hook: Callable[[], None] | None = None  # called before a reset (core dumps)
        self.regs = RegFile()
        self.mmu = Mmu(self, tlb_capacity)
        self.cp = CommandProcessor(self)
        self.regs.bind(access_table(self))
        self._irq_state = (False, 0, 0)
        self.resets = 0

    # --- memory and reset ----------------------------------------------------------------

    def attach_memory(self, mem: GuestMemory) -> None:
        """Give the device its guest memory (MEM_PAGES and STATUS.MEM_ATTACHED follow)."""
        self.mem = mem

    def detach_memory(self) -> GuestMemory | None:
        """Take guest memory away (the caller closes it); the CP then fails with NO_MEMORY."""
        mem, self.mem = self.mem, None
        return mem

    def reset(self) -> None:
        """CONTROL.SOFT_RESET: every register to its reset value, TLBs empty, CP stopped, the
        clock back to 0; guest memory is kept. Raises Irq.RESET_DONE."""
        if self.reset_hook is not None:
            self.reset_hook()
        self.resets += 1
        self.regs.reset()
        self.mmu.reset()
        self.cp.reset()
        self.clock.reset()
        self.raise_irq(Irq.RESET_DONE)

    def set_stepped(self, stepped: bool) -> None:
        """Switch between the free and the stepped clock (the protocol's CLOCK_MODE)."""
        if stepped != self.clock.stepped:
            now = self.clock.now_ns()
            self.clock = SteppedClock() if stepped else FreeClock()
            if stepped:
                self.clock.advance(now)

    # --- MMIO ----------------------------------------------------------------------------

    def mmio_read(self, offset: int) -> int:
        """A guest register read; never raises (bad accesses log a guest error, read 0)."""
        return self.regs.mmio_read(offset)

    def mmio_write(self, offset: int, value: int) -> None:
        """A guest register write; never raises (bad accesses log a guest error)."""
        self.regs.mmio_write(offset, value)

    def debug_read(self, offset: int) -> int:
        """Side-effect-free register read for debuggers and dumps."""
        return self.regs.debug_read(offset)

    # --- interrupts ----------------------------------------------------------------------

    def update_irq(self) -> None:
        """Derive MMU_INT_STAT, IRQ_RAWSTAT.MMU, IRQ_STATUS and the line; notify on change."""
        v = self.regs.values
        mmu_stat = v[_MMU_RAW] & v[_MMU_MASK]
        v[_MMU_STAT] = mmu_stat
        raw = (v[_IRQ_RAWSTAT] | _IRQ_MMU) if mmu_stat else (v[_IRQ_RAWSTAT] & ~_IRQ_MMU)
        v[_IRQ_RAWSTAT] = raw
        status = raw & v[_IRQ_MASK]
        v[_IRQ_STATUS] = status
        state = (status != 0, status, mmu_stat)
        if state != self._irq_state:
            self._irq_state = state
            if self.on_irq is not None:
                self.on_irq(*state)

    def raise_irq(self, sources: Irq) -> None:
        self.regs.values[_IRQ_RAWSTAT] |= int(sources)
        self.update_irq()

    @property
    def irq_level(self) -> bool:
        return self._irq_state[0]

    # --- behaviour bound in regfile.access_table -----------------------------------------

    def guest_error(self, msg: str) -> None:
        self.regs.guest_errors += 1
        guest_error.warning("%s", msg)

    def log_cp_error(self, code: CpError, opcode: int, addr: int, in_ib: bool, why: str) -> None:
        try:
            name = Opcode(opcode).name
        except ValueError:
            name = f"{opcode:#04x}"
        where = "IB VA" if in_ib else "ring PA"
        guest_error.warning(
            "CP error %s at %s %#x (opcode %s, AS %d): %s",
            code.name,
            where,
            addr,
            name,
            self.cp.as_index,
            why,
        )

    def control_written(self, value: int) -> None:
        if value & regs.CONTROL.field("SOFT_RESET").mask:
            self.reset()

    def mem_pages(self) -> int:
        return 0 if self.mem is None else self.mem.size >> PAGE_SHIFT

    def status_value(self) -> int:
        state = self.cp.state()
        busy = (
            self.cp.enabled
            and not self.cp.error
            and (
                self.cp.waiting is not None
                or self.cp.bulk is not None
                or bool(self.cp.ib_stack)
                or self.cp.head != self.cp.tail
            )
        )
        return (
            int(busy)
            | (int(state is CpState.ERROR) << 1)
            | (int(any(s.fault is not None for s in self.mmu.spaces)) << 2)
            | (int(self.cp.halted) << 3)
            | (int(self.mem is not None) << 4)
        )

    # --- execution -----------------------------------------------------------------------

    def has_work(self) -> bool:
        """Packets are ready to execute now (not idle, waiting, stopped, in error or halted)."""
        return self.cp.runnable()

    def run(self, max_packets: int, *, budget: int | None = None) -> int:
        """Execute up to ``max_packets`` packets within ``budget`` work units (default
        ``cp.BUDGET``: one slice of about a millisecond); returns how many completed. A large
        packet the budget cuts short stays in progress and the next call continues it."""
        return self.cp.run(max_packets, budget=budget)

    def wait_pending(self) -> bool:
        """A WAIT_MEM is in progress (WAITING, or held by a debugger in the middle of one):
        the caller polls it again, guest memory changing without telling the device."""
        return self.cp.waiting is not None

    def wait_deadline_ns(self) -> int | None:
        """Device-clock time at which the blocking WAIT_MEM times out (None: none or forever)."""
        return self.cp.wait_deadline_ns()

    def step(self, max_packets: int, ticks_ns: int) -> tuple[int, CpState, int]:
        """Stepped mode: advance the clock by ``ticks_ns``, then run up to ``max_packets``."""
        if ticks_ns:
            if not isinstance(self.clock, SteppedClock):
                raise ValueError("step() with ticks needs the stepped clock")
            self.clock.advance(ticks_ns)
        executed = self.cp.run(max_packets)
        return executed, self.cp.state(), self.clock.now_ns()

    # --- debugger ------------------------------------------------------------------------

    def halt(self) -> None:
        """Hold the CP before its next packet (HALTED)."""
        self.cp.halted = True
        self._debugger_hold = True

    def resume(self) -> None:
        """Release the hold; the packet at CP_PC runs next without asking packet_hook again.
        While the machine is paused (:meth:`pause`) the CP stays held until it continues."""
        self._debugger_hold = False
        self.cp.halted = self.paused

    # --- machine run state (QMP stop/cont) -------------------------------------------------

    paused = False
    """The machine's ``stop``: the CP holds (HALTED) until ``cont``, whatever gdb does."""
    _debugger_hold = False

    def pause(self) -> None:
        """Hold the CP for the machine (QMP ``stop``), on top of any debugger hold."""
        if not self.paused:
            # a breakpoint or watchpoint stop sets cp.halted without halt(): it is gdb's too
            self._debugger_hold = self.cp.halted
            self.paused = True
        self.cp.halted = True

    def unpause(self) -> None:
        """Release the machine's hold (QMP ``cont``); a debugger's hold stays."""
        self.paused = False
        self.cp.halted = self._debugger_hold

    def single_step(self) -> int:
        """Execute exactly one packet, even while halted; returns 1 if one completed."""
        return self.cp.run(1, single=True)

    def cp_pc(self) -> int:
        return self.cp.pc()

    def cp_state(self) -> CpState:
        return self.cp.state()

    def _extents(self, space: int, addr: int, size: int, access: AccessType | None) -> list:
        if self.mem is None:
            raise MemFault(None, addr, "no guest memory attached")
        if size < 0:
            raise MemFault(None, addr, f"negative size {size}")
        if space == SPACE_PHYS:
            if addr < 0 or addr + size > self.mem.size:
                raise MemFault(
                    None,
                    addr,
                    f"{size} bytes at {addr:#x} lie outside guest memory "
                    f"({self.mem.size:#x} bytes)",
                )
            return [(addr, size)] if size else []
        return self.mmu.debug_extents(space, addr, size, access)

    def mem_read(self, space: int, addr: int, size: int) -> bytes:
        """Read GPU memory for a debugger: ``space`` is an AS index or ``SPACE_PHYS``.

        Uses the TLB entry when one is cached, else walks the tables without filling the TLB;
        needs the pages mapped but ignores R/W/X (like QEMU's debug accesses). Raises MemFault.
        """
        try:
            return b"".join(
                self.mem.read(pa, n) for pa, n in self._extents(space, addr, size, None)
            )
        except BusError as e:
            raise MemFault(None, addr, str(e)) from None

    def mem_write(self, space: int, addr: int, data: bytes) -> None:
        """Write GPU memory for a debugger (same rules as :meth:`mem_read`)."""
        data = bytes(data)
        ext = self._extents(space, addr, len(data), None)
        try:
            pos = 0
            for pa, n in ext:
                self.mem.write(pa, data[pos : pos + n])
                pos += n
        except BusError as e:
            raise MemFault(None, addr, str(e)) from None

    def translate(self, as_index: int, va: int, access: AccessType = AccessType.READ) -> int:
        """Debug translation of one address, checking the permission ``access`` needs."""
        return self._extents(as_index, va, 1, access)[0][0]

    def walk(self, as_index: int, va: int) -> list[tuple[int, int, int, int]]:
        """``(level, table_pa, index, entry)`` rows of the page-table walk for ``va``."""
        return self.mmu.walk(as_index, va)

    def mappings(self, as_index: int) -> list[tuple[int, int, int, str]]:
        """Coalesced ``(va, pa, size, perms)`` runs of every page mapped in the AS."""
        return self.mmu.mappings(as_index)

    def mappings_report(self, as_index: int) -> Mappings:
        """The bounded walk of the AS: runs, tables reached twice, why it stopped early."""
        return self.mmu.mappings_report(as_index)

    # --- statistics ----------------------------------------------------------------------

    def stats(self) -> dict:
        cp, mmu = self.cp, self.mmu
        return {
            "packets": cp.packets,
            "per_opcode": {op.name: cp.op_counts[op] for op in Opcode if cp.op_counts[op]},
            "tlb_hits": mmu.hits,
            "tlb_misses": mmu.misses,
            "tlb_flushes": mmu.flushes,
            "tlb_entries": sum(len(s.tlb) for s in mmu.spaces),
            "mmu_faults": mmu.faults,
            "cp_errors": cp.errors,
            "bytes_copied": cp.bytes_copied,
            "guest_errors": self.regs.guest_errors,
            "internal_errors": self.regs.internal_errors,
            "resets": self.resets,
            "cp_state": cp.state().name,
            "clock_ns": self.clock.now_ns(),
        }
