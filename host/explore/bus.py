"""DOC: the device on the guest's bus, in-process and stepped by the guest runtime.

``gemu explore`` runs the device model in the same process as the guest so that a run is a
pure function of its seed. :class:`InprocBus` gives the driver the part of the
:class:`~gemu.device.abi.client.DeviceClient` interface it uses (``readl``, ``readl_many``,
``writel``, ``writel_posted``, ``wait_irq``, ``drain_irqs``) directly over a
:class:`gemu.device.gpu.Gpu` in stepped mode, with guest RAM attached as
:class:`~gemu.device.memory.MappedMemory` (DMA is a memory access, as over a UNIX socket).

The GPU executes only in :meth:`InprocBus.device_task`, a task of the guest runtime: it sleeps
until the command processor has work, runs ``packets_per_step`` packets, lets ``step_ns`` of
runtime clock pass (a preemption point) and goes on. Under
:class:`~gemu.guest.kernel.runtime.Deterministic` the scheduler therefore interleaves packets
with the guest's tasks at every step, and the same seed gives the same interleaving. Register
accesses are immediate (they are not preemption points), like MMIO.

Interrupts: the device's ``on_irq`` queues an :class:`~gemu.device.abi.client.IrqEvent`;
``wait_irq`` sleeps on a runtime wait queue for one, so the driver's interrupt task blocks in
the runtime instead of on a socket::

    bus = InprocBus(ram_buffer)
    runtime.spawn(bus.device_task, name="gpu")
    drv = GemuDriver(dev, bus)          # probe, submit, ... as with a DeviceClient
    ...
    bus.stop()                          # the device task returns
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from gemu.device.abi import regs
from gemu.device.abi.client import IrqEvent
from gemu.device.abi.enums import CpState
from gemu.device.gpu import Gpu
from gemu.device.memory import MappedMemory
from gemu.guest.kernel import runtime

STEP_NS = 1_000
"""Runtime clock that passes per device step (one step runs ``packets_per_step`` packets)."""
WAIT_POLL_NS = 20_000
"""How often a WAIT_MEM-blocked command processor looks at memory again."""


class TrackedMemory(MappedMemory):
    """Guest memory that notes the frames (page frame numbers) every access touches, for a
    systematic search: which objects a GPU step worked on."""

    def __init__(self, buffer, frames: set[int]) -> None:
        super().__init__(buffer)
        self.frames = frames

    def _touch(self, pa: int, n: int) -> None:
        if n > 0:
            self.frames.update(range(pa >> 12, ((pa + n - 1) >> 12) + 1))

    def read(self, pa: int, n: int) -> bytes:
        self._touch(pa, n)
        return super().read(pa, n)

    def write(self, pa: int, data) -> None:
        self._touch(pa, len(data) if not isinstance(data, memoryview) else data.nbytes)
        super().write(pa, data)

    def view(self, pa: int, n: int) -> memoryview:
        self._touch(pa, n)
        return super().view(pa, n)

    def read_u32(self, pa: int) -> int:
        self._touch(pa, 4)
        return super().read_u32(pa)

    def write_u32(self, pa: int, value: int) -> None:
        self._touch(pa, 4)
        super().write_u32(pa, value)

    def read_u64(self, pa: int) -> int:
        self._touch(pa, 8)
        return super().read_u64(pa)

    def write_u64(self, pa: int, value: int) -> None:
        self._touch(pa, 8)
        super().write_u64(pa, value)

    def copy(self, src_pa: int, dst_pa: int, n: int) -> None:
        self._touch(src_pa, n)
        self._touch(dst_pa, n)
        super().copy(src_pa, dst_pa, n)


class InprocBus:
    """The driver's register bus over an in-process, stepped :class:`Gpu`.

    With ``track`` (a systematic search records the run), the GPU's memory is a
    :class:`TrackedMemory`, and each device step adds to the GPU task's transition the
    objects owning the frames it touched, as ``owner_of`` (set by the machine once its driver
    exists) names them; without ``owner_of`` a step that touched memory depends on every
    other step."""

    def __init__(
        self, ram, *, packets_per_step: int = 2, step_ns: int = STEP_NS, track: bool = False
    ) -> None:
        self.gpu = Gpu(stepped=True)
        self.frames: set[int] | None = set() if track else None
        self.owner_of: Callable[[set[int]], set[str]] | None = None
        self.gpu.attach_memory(
            TrackedMemory(ram, self.frames) if self.frames is not None else MappedMemory(ram)
        )
        self.gpu.on_irq = self._on_irq
        self.packets_per_step = packets_per_step
        self.step_ns = step_ns
        self.irq_wq = runtime.WaitQueue("gpu irq")
        self.work_wq = runtime.WaitQueue("gpu doorbell")
        self._irqs: deque[IrqEvent] = deque()
        self._irq_seq = 0
        self._stop = False
        self.steps = 0
        self.packets = 0

    # -- DeviceClient subset ---------------------------------------------------------------
    def readl(self, offset: int) -> int:
        return self.gpu.mmio_read(offset)

    def readl_many(self, offset: int, count: int) -> list[int]:
        read = self.gpu.mmio_read
        return [read(offset + 4 * i) for i in range(count)]

    def writel(self, offset: int, value: int) -> None:
        self.gpu.mmio_write(offset, value)
        if self.frames:  # a register write that made the device touch memory
            self._note_frames()
        self.work_wq.wake_up_all()

    def _note_frames(self) -> None:
        """Add the owners of the frames touched since the last note to the current task's
        transition (a search's recorder reads them), and forget the frames."""
        touched = runtime.current()._touched
        if touched is not None:
            owner_of = self.owner_of
            touched.update(owner_of(self.frames) if owner_of is not None else ("*",))
        self.frames.clear()

    writel_posted = writel

    def debug_readl(self, offset: int, count: int = 1) -> int | list[int]:
        values = [self.gpu.debug_read(offset + 4 * i) for i in range(count)]
        return values[0] if count == 1 else values

    @property
    def irq_level(self) -> bool:
        return self.gpu.irq_level

    def wait_irq(self, timeout: float | None = None) -> IrqEvent | None:
        """The oldest interrupt message, waiting up to ``timeout`` seconds of runtime clock."""
        timeout_ns = None if timeout is None else int(timeout * 1e9)
        if self.irq_wq.wait_event(lambda: bool(self._irqs), timeout_ns=timeout_ns, reason="irq"):
            return self._irqs.popleft()
        return None

    def drain_irqs(self) -> list[IrqEvent]:
        out = list(self._irqs)
        self._irqs.clear()
        return out

    def _on_irq(self, level: bool, irq_status: int, mmu_int_stat: int) -> None:
        self._irq_seq += 1
        self._irqs.append(IrqEvent(level, irq_status, mmu_int_stat, self._irq_seq))
        self.irq_wq.wake_up_all()

    # -- the device's clock ----------------------------------------------------------------
    def _ready(self) -> bool:
        return self._stop or self.gpu.has_work()

    def device_task(self) -> None:
        """Run the GPU until :meth:`stop`: a step whenever the command processor has work."""
        gpu = self.gpu
        while not self._stop:
            waiting = gpu.cp_state() is CpState.WAITING
            self.work_wq.wait_event(
                self._ready, timeout_ns=WAIT_POLL_NS if waiting else None, reason="gpu idle"
            )
            if self._stop:
                return
            executed, _state, _now = gpu.step(self.packets_per_step, self.step_ns)
            if self.frames:
                self._note_frames()
            self.steps += 1
            self.packets += executed
            runtime.advance(self.step_ns)

    def stop(self) -> None:
        """Make :meth:`device_task` return."""
        self._stop = True
        self.work_wq.wake_up_all()

    def quiesce(self) -> None:
        """Stop the command processor (the machine's teardown, after the driver's remove)."""
        self.gpu.mmio_write(regs.CP_CONTROL.offset, 0)
