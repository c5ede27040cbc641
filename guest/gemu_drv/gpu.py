"""DOC: the gemu GPU device driver core: probe, ring, interrupts, fences, faults, reset.

:class:`GemuGpu` plays the role of ``struct panfrost_device`` plus the job-slot code of
panfrost_job.c. It drives the device only through registers (``DeviceClient``) and guest RAM:

- **probe** (``panfrost_device_init``): read GPU_ID/VERSION/FEATURES, soft-reset, allocate the
  ring and the fence page from kernel frames, program the ring and the interrupt masks, start
  the interrupt task;
- **ring**: every job takes one fixed 64-byte slot (SET_AS, INDIRECT_BUFFER, FENCE with IRQ,
  NOP padding), so the scheduler's credits bound ring use and no packet straddles the wrap;
  the tail and the doorbell go out as posted writes, with no round trip per job;
- **fences**: the FENCE packet writes the job's hardware seqno into the fence page; the
  interrupt task signals every :class:`HwFence` up to the seqno found there, in order
  (``amdgpu_fence_process``-style);
- **faults**: an MMU interrupt is decoded from AS_FAULTSTATUS/FAULTADDRESS into a
  :class:`GpuFault` naming the AS, VM, VA, access and packet; the running job fails with
  -EFAULT and that message; the fault is cleared and the CP resumed past the job's indirect
  buffer. Any other CP error fails the job with -EIO and the decoded CP_ERROR;
- **timeouts** (``panfrost_job_timedout``): drm_sched calls :meth:`timedout_job`; the driver
  stops the scheduler, soft-resets the GPU, reprograms the ring and AS slots, fails the hung
  job with -ETIMEDOUT and re-emits the innocent jobs that were queued behind it.

Usage (the machine does this at boot)::

    gpu = GemuGpu(client, frames)
    gpu.probe()
    fence = gpu.emit_job(as_nr, ib_va, ib_dwords)   # a HwFence
    ...
    gpu.remove()
"""

from __future__ import annotations

import errno
import logging
import struct
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

from gemu.device.abi import packets as pk
from gemu.device.abi import regs
from gemu.device.abi.enums import AccessType, CpError, CpState, Irq, MmuFault, Opcode, PacketFlags
from gemu.guest.dma_buf import dma_fence
from gemu.guest.dma_buf.dma_fence import DmaFence, DmaFenceOps
from gemu.guest.errors import Enodev, Etimedout
from gemu.guest.gemu_drv.sync import SpinLock
from gemu.guest.gemu_drv.vm import FrameSource, GpuMmu
from gemu.guest.kernel import runtime, trace
from gemu.guest.locking import lockdep
from gemu.guest.locking.lockdep import LockClass
from gemu.guest.mm.gfp import (
    GFP_ATOMIC,
    GFP_KERNEL,
    memalloc_noreclaim_restore,
    memalloc_noreclaim_save,
)

log = logging.getLogger("gemu.guest.gemu_drv")

JOB_SLOT_BYTES = 64
"""Ring bytes of one job: SET_AS (8) + INDIRECT_BUFFER (16) + FENCE (20) + NOP padding (20)."""
RING_PAGES = 16
"""The ring is 64 KiB of physically contiguous kernel frames when the allocator has them."""
IRQ_POLL_S = 0.05
RESET_POLLS = 1000

_ALL_IRQS = Irq.FENCE | Irq.CP_ERROR | Irq.MMU | Irq.RESET_DONE
# plain ints for the interrupt handler (IntFlag arithmetic costs more than the handler's tests)
_IRQ_FENCE = int(Irq.FENCE)
_IRQ_MMU = int(Irq.MMU)
_IRQ_CP_ERROR = int(Irq.CP_ERROR)
_ALL_MMU = (1 << regs.AS_COUNT) - 1 | ((1 << regs.AS_COUNT) - 1) << 16
RING_LOCK_CLASS = LockClass("gemu_gpu.ring_lock")
"""The lockdep class of the ring lock (ring, pending list, reset)."""

_U64 = struct.Struct("<Q")
# One job slot: SET_AS, INDIRECT_BUFFER, FENCE(PHYS|IRQ), NOP padding to JOB_SLOT_BYTES. The
# bodies follow the construct declarations of gemu.device.abi.packets (a test compares them).
_H_SET_AS = pk.header(Opcode.SET_AS, 1)
_H_IB = pk.header(Opcode.INDIRECT_BUFFER, 3)
_H_FENCE = pk.header(Opcode.FENCE, 4, PacketFlags.PHYS | PacketFlags.IRQ)
_H_NOP = pk.header(Opcode.NOP, 4)
_SLOT = struct.Struct("<" + "4sI" + "4sIII" + "4sIIII" + "4s16x")


class DeviceBus(Protocol):
    """The register interface the driver uses (gemu.device.abi.client.DeviceClient)."""

    def readl(self, offset: int) -> int: ...

    def readl_many(self, offset: int, count: int) -> list[int]: ...

    def writel(self, offset: int, value: int) -> None: ...

    def writel_posted(self, offset: int, value: int) -> None: ...

    def wait_irq(self, timeout: float | None = None) -> Any: ...


class KernelFrames(FrameSource, Protocol):
    """Kernel memory for the driver: page-table frames plus contiguous runs for the ring."""

    def alloc_contiguous(self, npages: int) -> int | None: ...

    def free_contiguous(self, pa: int, npages: int) -> None: ...


@dataclass(frozen=True)
class GpuFault:
    """A decoded GPU MMU fault. Kernel: the message of panfrost_mmu_irq_handler_thread."""

    as_nr: int
    vm_name: str
    va: int
    exception: MmuFault
    access: AccessType
    opcode: int

    def __str__(self) -> str:
        try:
            op = Opcode(self.opcode).name
        except ValueError:
            op = f"opcode {self.opcode:#x}"
        return (
            f"GPU MMU fault in AS{self.as_nr} ({self.vm_name}): {self.exception.name} on "
            f"{self.access.name} at VA {self.va:#x} by {op}"
        )


class _HwFenceOps(DmaFenceOps):
    def get_driver_name(self, fence: DmaFence) -> str:
        return "gemu"

    def get_timeline_name(self, fence: DmaFence) -> str:
        return "gemu-ring0"


_HW_OPS = _HwFenceOps()


class HwFence(DmaFence):
    """The hardware fence of one ring slot. Kernel: struct panfrost_fence.

    ``message`` says why the job failed when ``error`` is set. Like the kernel's, it does not
    point back at its job (the job holds it until ``free_job``).
    """

    __slots__ = ("message",)

    def __init__(self, context: int, seqno: int) -> None:
        super().__init__(_HW_OPS, context, seqno, seqno64=True)
        self.message = ""


@dataclass(frozen=True)
class GpuCrashState:
    """What the driver keeps of a GPU hang for post-mortem reading (the last one).
    Kernel: struct msm_gpu_state (msm_gpu_crashstate_capture()) / a devcoredump."""

    message: str
    completed_seqno: int
    hung_seqno: int | None
    pending_seqnos: tuple[int, ...]
    ring: bytes
    faults: tuple[str, ...]


@dataclass
class GpuStats:
    jobs_emitted: int = 0
    irqs: int = 0
    fences_signalled: int = 0
    mmu_faults: int = 0
    cp_errors: int = 0
    resets: int = 0
    resubmitted: int = 0
    doorbells: int = 0
    crashstates: int = 0


class GemuGpu:
    """One gemu GPU. Kernel: struct panfrost_device (+ panfrost_gpu/job/mmu irq handlers).

    Invariants: ``pending`` holds the emitted, unsignaled hardware fences in seqno order;
    ``completed`` is the last seqno seen in the fence page; at most ``ring_slots - 1`` jobs are
    on the ring at once (the scheduler's credit limit).
    """

    def __init__(self, bus: DeviceBus, frames: KernelFrames, *, name: str = "gemu0") -> None:
        self.bus = bus
        self.frames = frames
        self.mem = frames.mem
        self.name = name
        self.mmu = GpuMmu(bus, frames)
        self.stats = GpuStats()
        self.faults: list[GpuFault] = []
        self.crashstate: GpuCrashState | None = None
        self.capture_may_reclaim = False
        self.errors: list[str] = []
        self.lock = SpinLock(f"{name}.ring", RING_LOCK_CLASS)  # ring, pending list, reset
        self.pending: deque[HwFence] = deque()
        self.fence_context = dma_fence.context_alloc(1)
        self.next_seqno = 1
        self.completed = 0
        self.ring_pa = 0
        self.ring_pages = 0
        self.ring_size = 0
        self.ring_slots = 0
        self.tail = 0
        self.announced_tail = 0
        self.announced_seqno = 0
        self.fence_pa = 0
        self.features = 0
        self.version = 0
        self._irq_task: runtime.Task | None = None
        self._stop = False
        self._fault_pending: dict[int, GpuFault] = {}
        self.probed = False
        self.clock_anchor: tuple[int, int] | None = None  # (guest ns, TIMESTAMP) read together

    # -- probe / remove --------------------------------------------------------------------
    def probe(self) -> None:
        """Identify, reset and bring up the GPU. Kernel: panfrost_device_init()."""
        gpu_id, version, features, mem_pages = self.bus.readl_many(regs.GPU_ID.offset, 4)
        if gpu_id != regs.GPU_ID_VALUE:
            raise Enodev(msg=f"{self.name}: GPU_ID {gpu_id:#010x} is not a gemu GPU")
        major = regs.VERSION.field("MAJOR").ex(version)
        if major != regs.VERSION_MAJOR:
            raise Enodev(msg=f"{self.name}: hardware interface v{major}, driver speaks v1")
        self.version, self.features = version, features
        as_count = regs.FEATURES.field("AS_COUNT").ex(features)
        self.mmu.slots = [None] * as_count
        log.info(
            "%s: gemu GPU v%d.%d, %d AS, %d-bit VA, %d pages of guest memory",
            self.name,
            major,
            regs.VERSION.field("MINOR").ex(version),
            as_count,
            regs.FEATURES.field("VA_BITS").ex(features),
            mem_pages,
        )
        pa = self.frames.alloc_contiguous(RING_PAGES)
        pages = RING_PAGES
        if pa is None:
            pa, pages = self.frames.alloc_table_frame(), 1
        self.ring_pa, self.ring_pages = pa, pages
        self.ring_size = pages * regs.PAGE_SIZE
        self.ring_slots = self.ring_size // JOB_SLOT_BYTES
        self.fence_pa = self.frames.alloc_table_frame()
        self._hw_init()
        self._stop = False
        self._irq_task = runtime.spawn(self._irq_loop, name=f"{self.name}-irq")
        self.probed = True

    def _soft_reset(self) -> None:
        """Kernel: panfrost_gpu_soft_reset() — reset and wait for RESET_DONE."""
        self.bus.writel(regs.CONTROL.offset, regs.CONTROL.field("SOFT_RESET").dp(0, 1))
        for _ in range(RESET_POLLS):
            if self.bus.readl(regs.IRQ_RAWSTAT.offset) & Irq.RESET_DONE:
                break
        else:
            raise Etimedout(msg=f"{self.name}: soft reset did not complete")
        self.bus.writel(regs.IRQ_CLEAR.offset, int(Irq.RESET_DONE))

    def _hw_init(self) -> None:
        """Reset the GPU and program ring, fence page and interrupt masks."""
        self._soft_reset()
        self.mem[self.ring_pa : self.ring_pa + self.ring_size] = bytes(self.ring_size)
        _U64.pack_into(self.mem, self.fence_pa, self.completed)
        w = self.bus.writel
        w(regs.RING_BASE_LO.offset, self.ring_pa & 0xFFFFFFFF)
        w(regs.RING_BASE_HI.offset, self.ring_pa >> 32)
        w(regs.RING_SIZE.offset, self.ring_size)
        w(regs.CP_CONTROL.offset, regs.CP_CONTROL.field("RESET_HEAD").dp(0, 1))
        self.tail = self.announced_tail = 0
        self.announced_seqno = self.completed
        w(regs.MMU_INT_CLEAR.offset, _ALL_MMU)
        w(regs.MMU_INT_MASK.offset, _ALL_MMU)
        w(regs.IRQ_CLEAR.offset, int(_ALL_IRQS | Irq.CP_IDLE))
        w(regs.IRQ_MASK.offset, int(Irq.FENCE | Irq.CP_ERROR | Irq.MMU))
        w(regs.CP_CONTROL.offset, regs.CP_CONTROL.field("ENABLE").dp(0, 1))
        state = regs.CP_STATUS.field("STATE").ex(self.bus.readl(regs.CP_STATUS.offset))
        # HALTED: a debugger holds the CP (gemu device -S); it starts when gdb continues
        if state not in (CpState.IDLE, CpState.RUNNING, CpState.HALTED):
            code = regs.CP_ERROR.field("CODE").ex(self.bus.readl(regs.CP_ERROR.offset))
            raise Enodev(msg=f"{self.name}: CP did not start ({CpState(state).name}, {code})")
        self.mmu.reset()
        if not runtime.current_runtime().deterministic:
            # the device clock stops while a debugger holds the GPU; comparing it with ours
            # tells a job's timeout how much of its time the GPU really ran
            self.clock_anchor = self.device_clock()

    def device_clock(self) -> tuple[int, int]:
        """The guest clock and the device's TIMESTAMP, read together (nanoseconds)."""
        lo, hi = self.bus.readl_many(regs.TIMESTAMP_LO.offset, 2)
        return runtime.now_ns(), lo | (hi << 32)

    def remove(self) -> None:
        """Stop the interrupt task, fail what is still pending, free the ring. Kernel:
        panfrost_device_fini()."""
        if not self.probed:
            return
        self._stop = True
        if self._irq_task is not None:
            self._irq_task.join()
            self._irq_task = None
        with self.lock:
            while self.pending:
                self._fail(self.pending.popleft(), -errno.ENODEV, "GPU removed")
        try:
            self.bus.writel(regs.IRQ_MASK.offset, 0)
            self.bus.writel(regs.CP_CONTROL.offset, 0)
        except Exception as exc:  # the device may already be gone
            log.info("%s: device unreachable during remove: %s", self.name, exc)
        if self.ring_pages == 1:
            self.frames.free_table_frame(self.ring_pa)
        else:
            self.frames.free_contiguous(self.ring_pa, self.ring_pages)
        self.frames.free_table_frame(self.fence_pa)
        self.probed = False

    # -- ring ------------------------------------------------------------------------------
    def emit_job(self, as_nr: int, ib_va: int, ib_dwords: int) -> HwFence:
        """Write one job slot into the ring and ring the doorbell with posted writes.

        Kernel: panfrost_job_hw_submit() (here: ring packets + RING_TAIL + RING_DOORBELL).

        Doorbells are coalesced while the GPU is busy: when jobs already announced to the GPU
        have not completed, the new slot waits for the interrupt of their completion, whose
        handler rings once for every slot written meanwhile (:meth:`_kick`). An idle GPU is
        rung at once.
        """
        # The ring fence is allocated on run_job's signalling path: without reclaim, as
        # amdgpu_fence_emit() does (kmem_cache_alloc(..., GFP_ATOMIC)).
        lockdep.might_alloc(GFP_ATOMIC)
        # The ring lock by acquire()/release(), here and in the interrupt path, rather than a
        # with-block: its __enter__/__exit__ are two more calls per use, per job.
        lock = self.lock
        lock.acquire()
        try:
            fence = HwFence(self.fence_context, self.next_seqno)
            self.next_seqno += 1
            self._write_slot(as_nr, ib_va, ib_dwords, fence.seqno)
            self.pending.append(fence)
            self.stats.jobs_emitted += 1
            if trace.enabled:
                trace.begin(
                    "job", "job", fence.seqno, ring=self.name, seqno=fence.seqno, as_nr=as_nr
                )
            if self.announced_seqno <= self.completed:
                self._kick()
        finally:
            lock.release()
        return fence

    def _kick(self) -> None:
        """Announce every written slot: RING_TAIL then RING_DOORBELL, both posted."""
        if self.announced_tail == self.tail:
            return
        self.bus.writel_posted(regs.RING_TAIL.offset, self.tail)
        self.bus.writel_posted(regs.RING_DOORBELL.offset, 1)
        self.announced_tail = self.tail
        self.announced_seqno = self.next_seqno - 1
        self.stats.doorbells += 1

    def _write_slot(self, as_nr: int, ib_va: int, ib_dwords: int, seqno: int) -> None:
        if len(self.pending) >= self.ring_slots - 1:
            raise RuntimeError(f"{self.name}: ring overrun (credit limit not respected)")
        fp = self.fence_pa
        body = _SLOT.pack(
            _H_SET_AS,
            as_nr,
            _H_IB,
            ib_va & 0xFFFFFFFF,
            ib_va >> 32,
            ib_dwords,
            _H_FENCE,
            fp & 0xFFFFFFFF,
            fp >> 32,
            seqno & 0xFFFFFFFF,
            seqno >> 32,
            _H_NOP,
        )
        off = self.ring_pa + self.tail
        self.mem[off : off + JOB_SLOT_BYTES] = body
        self.tail = (self.tail + JOB_SLOT_BYTES) % self.ring_size

    # -- interrupts ------------------------------------------------------------------------
    def _irq_loop(self) -> None:
        """The interrupt task: wait for IRQ messages and run the handler.

        Messages that queued up while the handler ran are taken together: one handler run
        reads the current status, which covers all of them.
        """
        bus = self.bus
        while not self._stop:
            try:
                event = bus.wait_irq(IRQ_POLL_S)
                events = [event, *bus.drain_irqs()] if event is not None else []
            except Exception as exc:  # DeviceGone: fail everything, stop
                log.error("%s: device lost: %s", self.name, exc)
                with self.lock:
                    while self.pending:
                        self._fail(self.pending.popleft(), -errno.ENODEV, f"device lost: {exc}")
                return
            if not any(e.level for e in events):
                # line low (or no message): fences may still have landed since the last run
                self.fence_process()
                continue
            status = 0
            for e in events:
                status |= e.irq_status if e.level else 0
            try:
                self.irq_handler(status)
            except Exception:  # keep the interrupt task alive; the error is in the log
                log.exception("%s: interrupt handler failed", self.name)
                self.errors.append("interrupt handler failed (see log)")

    def irq_handler(self, hint: int = 0) -> None:
        """Read and clear the interrupt sources and act on them.

        Kernel: panfrost_job_irq_handler() + panfrost_mmu_irq_handler() + panfrost_gpu_irq.

        ``hint`` is the IRQ_STATUS carried by the interrupt messages (MSI-style). When it
        says "fences only", the handler clears FENCE with a posted write and reads the seqno
        from the fence page, with no register round trip; anything else is read from
        IRQ_STATUS.
        """
        if trace.enabled:
            trace.instant("irq", "irq", device=self.name, status=hint)
        # The whole handler is on the path that signals fences (a fault or command error
        # fails a job's fence here too): one signalling section, as a driver's IRQ handler
        # annotates with dma_fence_begin_signalling().
        cookie = lockdep.dma_fence_begin_signalling()
        try:
            self._irq_handler(hint)
        finally:
            lockdep.dma_fence_end_signalling(cookie)

    def _irq_handler(self, hint: int) -> None:
        lock = self.lock
        lock.acquire()
        try:
            self.stats.irqs += 1
            if hint and not hint & ~_IRQ_FENCE:
                self.bus.writel_posted(regs.IRQ_CLEAR.offset, _IRQ_FENCE)
            else:
                status = self.bus.readl(regs.IRQ_STATUS.offset)
                if status & _IRQ_MMU:
                    self._mmu_irq()
                clear = status & ~_IRQ_MMU
                if clear:
                    self.bus.writel_posted(regs.IRQ_CLEAR.offset, clear)
                if status & _IRQ_CP_ERROR:
                    self._cp_error()
        finally:
            lock.release()
        self.fence_process()

    def _mmu_irq(self) -> None:
        """Decode and clear every latched AS fault. Kernel: panfrost_mmu_irq_handler_thread."""
        stat = self.bus.readl(regs.MMU_INT_STAT.offset)
        for as_nr in range(regs.AS_COUNT):
            bits = stat & ((1 << as_nr) | (1 << (as_nr + 16)))
            if not bits:
                continue
            fs, lo, hi = self.bus.readl_many(regs.as_reg(as_nr, "FAULTSTATUS").offset, 3)
            f = regs.as_reg(as_nr, "FAULTSTATUS")
            try:
                exc = MmuFault(f.field("EXCEPTION_TYPE").ex(fs))
            except ValueError:
                exc = MmuFault.NONE
            vm = self.mmu.slots[as_nr] if as_nr < len(self.mmu.slots) else None
            fault = GpuFault(
                as_nr,
                vm.name if vm is not None else "unbound",
                lo | (hi << 32),
                exc,
                AccessType(f.field("ACCESS_TYPE").ex(fs)),
                f.field("SOURCE").ex(fs),
            )
            self.faults.append(fault)
            self.stats.mmu_faults += 1
            self._fault_pending[as_nr] = fault
            log.error("%s: %s", self.name, fault)
            if trace.enabled:
                trace.instant(
                    "mmu",
                    "fault",
                    as_nr=as_nr,
                    vm=fault.vm_name,
                    va=fault.va,
                    exception=exc.name,
                    access=fault.access.name,
                )
            self.bus.writel_posted(regs.MMU_INT_CLEAR.offset, bits)

    def _cp_error(self) -> None:
        """Fail the job the CP stopped in and resume the ring after its indirect buffer.

        Kernel: panfrost_job_handle_err() (+ the CP RESUME that panfrost's job slots do by
        hardware).
        """
        err, lo, hi = self.bus.readl_many(regs.CP_ERROR.offset, 3)
        code = CpError(regs.CP_ERROR.field("CODE").ex(err))
        as_nr = regs.CP_ERROR.field("AS").ex(err)
        self.stats.cp_errors += 1
        self._signal(self._collect_completed_locked())
        fence = self.pending[0] if self.pending else None
        fault = self._fault_pending.pop(as_nr, None)
        if code is CpError.MMU_FAULT and fault is not None:
            message, error = str(fault), -errno.EFAULT
        else:
            try:
                op = Opcode(regs.CP_ERROR.field("OPCODE").ex(err)).name
            except ValueError:
                op = "?"
            where = "GPU VA" if regs.CP_ERROR.field("IN_IB").ex(err) else "ring"
            message = f"GPU command error {code.name} in {op} at {where} {lo | (hi << 32):#x}"
            error = -errno.EFAULT if code is CpError.MMU_FAULT else -errno.EIO
        self._fault_pending.clear()
        if fence is not None and not fence.message:
            fence.message = message
            dma_fence.set_error(fence, error)
        self.errors.append(message)
        log.error("%s: job seqno %s: %s", self.name, fence.seqno if fence else "-", message)
        cc = regs.CP_CONTROL
        self.bus.writel_posted(cc.offset, cc.field("RESUME").dp(cc.field("ENABLE").dp(0, 1), 1))

    def fence_process(self) -> None:
        """Signal every pending hardware fence up to the seqno in the fence page, and ring the
        doorbell for slots written while the GPU was busy.

        Kernel: amdgpu_fence_process() / panfrost's per-slot fence signalling.
        """
        lock = self.lock
        lock.acquire()
        try:
            done = self._collect_completed_locked()
        finally:
            lock.release()
        self._signal(done)

    def _collect_completed_locked(self) -> list[HwFence]:
        """Take the completed fences off ``pending`` (caller holds the ring lock)."""
        (seqno,) = _U64.unpack_from(self.mem, self.fence_pa)
        if seqno > self.completed:
            self.completed = seqno
        done = []
        pending = self.pending
        while pending and pending[0].seqno <= seqno:
            done.append(pending.popleft())
        if self.announced_tail != self.tail and self.announced_seqno <= self.completed:
            self._kick()
        return done

    def _signal(self, done: list[HwFence]) -> None:
        if not done:
            return
        # Signalling is a fence signalling path: annotated here for every caller (the
        # interrupt handler annotates its whole run as well; sections nest).
        cookie = lockdep.dma_fence_begin_signalling()
        try:
            for fence in done:
                dma_fence.check_and_signal(fence)
                if trace.enabled:
                    trace.end("job", "job", fence.seqno, ring=self.name, error=fence.error)
        finally:
            lockdep.dma_fence_end_signalling(cookie)
        self.stats.fences_signalled += len(done)

    def _fail(self, fence: HwFence, error: int, message: str) -> None:
        if not dma_fence.test_signaled_flag(fence):
            if not fence.message:
                fence.message = message
                dma_fence.set_error(fence, error)
            dma_fence.check_and_signal(fence)
            if trace.enabled:
                trace.end("job", "job", fence.seqno, ring=self.name, error=fence.error)

    # -- reset -----------------------------------------------------------------------------
    def crashstate_capture(self, guilty: HwFence | None, message: str) -> GpuCrashState:
        """Snapshot the ring and the fault history before a reset; kept as ``crashstate``.

        Kernel: msm_gpu_crashstate_capture(), called by msm's recover_worker. The snapshot is
        a kvmalloc (``GFP_KERNEL``; gemu has no slab, so the allocation is its might_alloc).
        The reset path is inside the fence signalling section (the hung job's fence and every
        fence behind it wait for it), where reclaim must not be entered: as msm's fix
        "drm: gpu: msm: forbid mem reclaim from reset" (4625fe5bbdac) does, the capture runs
        under memalloc_noreclaim_save(). ``capture_may_reclaim`` drops that scope (the
        ``reset-allocates`` mutant); never set it in normal use.
        """
        noreclaim = None if self.capture_may_reclaim else memalloc_noreclaim_save()
        try:
            lockdep.might_alloc(GFP_KERNEL)
            with self.lock:
                state = GpuCrashState(
                    message,
                    self.completed,
                    guilty.seqno if guilty is not None else None,
                    tuple(f.seqno for f in self.pending),
                    bytes(self.mem[self.ring_pa : self.ring_pa + self.ring_size]),
                    tuple(str(f) for f in self.faults[-8:]),
                )
        finally:
            if noreclaim is not None:
                memalloc_noreclaim_restore(noreclaim)
        self.crashstate = state
        self.stats.crashstates += 1
        return state

    def reset(self, guilty: HwFence | None, message: str) -> list[HwFence]:
        """Soft-reset the GPU; fail ``guilty`` and return the fences of the jobs that never
        completed, in ring order, so the caller can re-emit the innocent ones.

        Kernel: panfrost_device_reset() / panfrost_reset().
        """
        with self.lock:
            self.stats.resets += 1
            self._signal(self._collect_completed_locked())
            lost = list(self.pending)
            self.pending.clear()
            self._hw_init()
            if guilty is not None:
                self._fail(guilty, -errno.ETIMEDOUT, message)
            for fence in lost:
                if fence is not guilty:
                    self._fail(fence, -errno.ECANCELED, "GPU reset (job lost, resubmitted)")
        log.error("%s: GPU reset: %s", self.name, message)
        if trace.enabled:
            trace.instant("gpu", "reset", message=message, lost=len(lost))
        return [f for f in lost if f is not guilty]

    def statistics(self) -> dict:
        return {
            **self.stats.__dict__,
            "pending": len(self.pending),
            "completed_seqno": self.completed,
            "mmu": self.mmu.stats.__dict__,
        }
