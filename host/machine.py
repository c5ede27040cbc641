"""DOC: a machine: guest RAM, a device, the guest kernel's memory manager and the gemu driver.

:class:`Machine` assembles what ``gemu boot`` will run: guest RAM as one memfd
(:class:`~gemu.device.abi.client.SharedMemory`) shared with the device, the virtual GPU (a
spawned ``gemu device`` process by default, a device server on a thread with
``device="inproc"``, or any transport spec of a device already running), the page allocator
and swap device of the guest, a GEM device with the shmem shrinker, and the probed gemu
driver. ``open()`` gives a guest program its uAPI file. ``driver_mode`` picks the driver
flavour: ``"per-bo"`` (the default: one GPU VM per file, a BO list per submit) or
``"vm-bind"`` (VMs on drm_gpuvm, VM_BIND with fences, exec on a VM, Panthor's per-VM
shrinker; ``open()`` then gives a :class:`~gemu.guest.gemu_drv.vm_bind.VmBindFile`)::

    with Machine(ram_size=16 << 20, swap_size=32 << 20) as m:
        f = m.open()
        h = f.create_bo(4096)
        ...
    # shutdown: files closed, driver removed, device stopped, leaks checked by the caller

A device that stops answering (stopped, wedged, killed) is *lost*: every request the machine
and its driver make waits at most ``device_timeout`` seconds (default
:data:`DEVICE_TIMEOUT_S`), then the connection is given up and the call raises
:class:`DeviceLost` (a :class:`~gemu.device.abi.client.DeviceGone`) naming what timed out and
after how long; :meth:`Machine.device_lost` says why from then on::

    try:
        m.reclaim(256)
    except DeviceLost as exc:
        print("device lost:", exc)      # "REG_READ 0x24: reply: no answer ... within 5 s"

``check_clean()`` is what tests call after a run: no leaked frame or swap slot, no GEM object
left, no lockdep report. ``statistics()`` gathers every counter the emulator reports (memory,
swap, shrinker, GPU, MMU) in one dict; :func:`parse_size` reads QEMU-style sizes (``256M``).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from gemu.device.abi.client import (
    DeviceClient,
    DeviceError,
    DeviceGone,
    DeviceTimeout,
    SharedMemory,
)
from gemu.guest.dma_buf.dma_resv import DmaResvUsage
from gemu.guest.drm import gem
from gemu.guest.gemu_drv.job import SubmitOrder
from gemu.guest.gemu_drv.uapi import DEFAULT_TIMEOUT_NS, GemuDriver, GemuFile
from gemu.guest.locking import lockdep
from gemu.guest.mm.page_alloc import PageAllocator, PhysMem
from gemu.guest.mm.swap import SwapDevice
from gemu.host.cmd_device import wait_lines
from gemu.host.sizes import flag_names, format_size, parse_size

if TYPE_CHECKING:
    from gemu.guest.gemu_drv.vm_bind import VmBindFile

__all__ = [
    "DEFAULT_DRIVER_MODE",
    "DEVICE_TIMEOUT_S",
    "DRIVER_MODES",
    "DeviceLost",
    "DeviceTimeout",
    "Machine",
    "format_size",
    "parse_size",
]

log = logging.getLogger("gemu.host.machine")

PAGE_SIZE = 4096
SWAP_IN_MEMORY_MAX = 256 << 20
"""Swap up to this size is a buffer in memory; larger swap is a sparse file."""
DEVICE_TIMEOUT_S = 5.0
"""How long any request of the machine waits for the device before it is declared lost."""
DEVICE_READY_S = 20.0
"""How long a spawned device may take to print its ready line."""
EXIT_GRACE_S = 1.0
"""How long a spawned device that closed its connection is given to exit, so that its exit
status (a signal, a crash) is what the device-lost message names."""

DRIVER_MODES = {
    "per-bo": "one GPU VM per file, BOs mapped one by one, a BO list per submit (panfrost-like)",
    "vm-bind": "VMs on drm_gpuvm, VM_BIND with fences, exec on a VM, per-VM shrinker (Panthor-like)",
}
"""The driver flavours a machine can run, and what each is."""
DEFAULT_DRIVER_MODE = "per-bo"


def check_driver_mode(mode: str) -> str:
    """``mode`` if it names a driver flavour; ValueError naming it and the known ones."""
    if mode not in DRIVER_MODES:
        raise ValueError(f"unknown driver mode {mode!r} (known: {', '.join(DRIVER_MODES)})")
    return mode


DeviceLost = DeviceGone
"""What a machine call raises once the device is gone: its connection broke, its process
died, or it missed ``device_timeout`` (then the subclass :class:`DeviceTimeout`)."""


def _exit_status(code: int) -> str:
    """A Popen return code as a message: ``-9 (killed by SIGKILL)``, ``1``."""
    if code >= 0:
        return str(code)
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return f"{code} (killed by signal {-code})"
    return f"{code} (killed by {name})"


def _gemu_command() -> list[str]:
    exe = Path(sys.executable).parent / "gemu"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("gemu")
    return [found] if found else [sys.executable, "-m", "gemu.host"]


class Machine:
    """One emulated machine with the gemu GPU.

    Args:
        ram_size: guest RAM in bytes (a multiple of 4 KiB).
        swap_size: swap in bytes (0: no swap; the shrinker can then only purge).
        device: ``"spawn"`` (a ``gemu device`` child process), ``"inproc"`` (a device server
            on a thread of this process) or a transport spec (``unix:PATH``, ``tcp:H:P``...).
        order: the driver's submit order; :attr:`SubmitOrder.CORRECT` unless a test runs a
            deliberately wrong one.
        timeout_ns: the job timeout (a job running longer is a hang: GPU reset).
        reserved_frames: frames at the bottom of RAM the allocator never hands out.
        poison_on_free: freed frames are filled with 0xAA, so a stale GPU mapping reads
            garbage that checksums notice.
        kswapd: start the background reclaim task (``gemu boot`` does; tests that count
            reclaim exactly leave it off).
        device_timeout: seconds any request waits for the device (a register round trip, a
            send into a full socket buffer) before the device is declared lost
            (:class:`DeviceLost`); None waits forever (only for a device held in a
            debugger).
        strict_signalling: lockdep's implicit signalling section, gemu's stricter mode
            (publishing a fence in a reservation object opens it, annotated or not; see
            docs/validation.md). Off: only the kernel's explicit annotations, as real lockdep.
            The mode belongs to the guest runtime, so the last machine started sets it.
        device_process: with ``device="spawn"``, a ``gemu device`` already started (stdout a
            pipe, ready line not yet read) to use instead of starting one: ``gemu boot``
            starts it before importing the guest, so the two start-ups overlap. The machine
            owns it from here (terminated at shutdown).
        driver_mode: the driver flavour, a key of :data:`DRIVER_MODES`: ``"per-bo"`` (the
            default) or ``"vm-bind"`` (:attr:`vm_bind` is then the
            :class:`~gemu.guest.gemu_drv.vm_bind.VmBindDriver`, which takes the device's
            reclaim over). An unknown value is a ValueError naming it.
    """

    def __init__(
        self,
        ram_size: int = 16 << 20,
        swap_size: int = 32 << 20,
        device: str = "spawn",
        *,
        order: SubmitOrder = SubmitOrder.CORRECT,
        timeout_ns: int = DEFAULT_TIMEOUT_NS,
        reserved_frames: int = 1,
        poison_on_free: bool = True,
        watermarks: tuple[int, int, int] | None = None,
        device_args: tuple[str, ...] = (),
        kswapd: bool = False,
        strict_signalling: bool = False,
        device_process: subprocess.Popen | None = None,
        device_timeout: float | None = DEVICE_TIMEOUT_S,
        driver_mode: str = DEFAULT_DRIVER_MODE,
    ) -> None:
        self.driver_mode = check_driver_mode(driver_mode)
        self.vm_bind = None
        self.ram_size = ram_size
        self.swap_size = swap_size
        self.device_kind = device
        self.device_timeout = device_timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="gemu-machine-")
        self._proc: subprocess.Popen | None = None
        self._exit_waited = False  # device_lost() waited for a closed device to exit
        self.gdb_address: str | None = None
        """Where the spawned device's gdb stub listens (``tcp:127.0.0.1:PORT``), with --gdb."""
        self._server = None
        self._server_thread: threading.Thread | None = None
        self.client: DeviceClient | None = None
        self.ram = SharedMemory(ram_size)
        try:
            spec = self._start_device(device, device_args, device_process)
            self.client = DeviceClient.connect(
                spec, name="gemu-machine", reply_timeout=device_timeout
            )
            self.memory_mode = self.client.attach_memory(self.ram)
            if self.memory_mode != "fd":
                self.client.start_service()
            self.physmem = PhysMem(self.ram.buf)
            self.allocator = PageAllocator(
                self.physmem,
                reserved_frames=reserved_frames,
                watermarks=watermarks,
                poison_on_free=poison_on_free,
            )
            self.swap = None
            if swap_size:
                # a large swap is a sparse file in the machine's directory: an in-memory swap
                # would be zeroed (touched) up front
                backing = "memory" if swap_size <= SWAP_IN_MEMORY_MAX else f"{self._tmp.name}/swap"
                self.swap = SwapDevice(swap_size // PAGE_SIZE, backing)
            self.dev = gem.DrmDevice(
                self.allocator, self.swap, idle_usage=DmaResvUsage.BOOKKEEP, unique="gemu0"
            )
            self.driver = GemuDriver(self.dev, self.client, order=order, timeout_ns=timeout_ns)
            lockdep.set_implicit_signalling(strict_signalling)
            self.driver.probe()
            if driver_mode == "vm-bind":
                from gemu.guest.gemu_drv.vm_bind import VmBindDriver

                self.vm_bind = VmBindDriver(self.driver)
            if kswapd:
                self.allocator.start_kswapd()
            self.kernel_frames = self.allocator.nr_used
            # lockdep keeps reports per runtime; only what happens from here on is ours
            self._lockdep_seen = {id(r): r.count for r in lockdep.reports()}
        except BaseException:
            self.shutdown()
            raise
        self._down = False

    # -- device ----------------------------------------------------------------------------
    def _start_device(
        self, device: str, device_args: tuple[str, ...], started: subprocess.Popen | None
    ) -> str:
        # with --gdb the device prints a second line: where its gdb stub listens
        lines = 2 if "--gdb" in device_args else 1
        if device == "spawn" and started is not None:
            self._proc = started
            return self._ready(wait_lines(started, DEVICE_READY_S, lines))
        if device == "spawn":
            sock = f"unix:{self._tmp.name}/device.sock"
            self._device_log = Path(self._tmp.name) / "device.log"
            with open(self._device_log, "wb") as logf:
                self._proc = subprocess.Popen(
                    [
                        *_gemu_command(),
                        "device",
                        "--listen",
                        sock,
                        "--log",
                        "warning",
                        *device_args,
                    ],
                    stdout=subprocess.PIPE,
                    stderr=logf,
                    stdin=subprocess.DEVNULL,
                )
            return self._ready(wait_lines(self._proc, DEVICE_READY_S, lines))
        if device == "inproc":
            from gemu.device.gpu import Gpu
            from gemu.device.server import DeviceServer

            self._server = DeviceServer(Gpu(), f"unix:{self._tmp.name}/device.sock")
            self._server_thread = threading.Thread(
                target=self._server.serve_forever, name="gemu-device", daemon=True
            )
            self._server_thread.start()
            return self._server.address
        return device

    def _ready(self, addresses: list[str]) -> str:
        if len(addresses) > 1:
            self.gdb_address = addresses[1]
        return addresses[0]

    def device_log(self) -> str:
        path = getattr(self, "_device_log", None)
        return path.read_text(errors="replace") if path and path.exists() else ""

    # -- guest -----------------------------------------------------------------------------
    def open(self) -> GemuFile | VmBindFile:
        """Open the GPU: a new uAPI file of the machine's driver flavour, a
        :class:`GemuFile` with its own GPU VM (per-bo) or a
        :class:`~gemu.guest.gemu_drv.vm_bind.VmBindFile` that creates VMs (vm-bind)."""
        if self.vm_bind is not None:
            return self.vm_bind.open()
        return self.driver.open()

    def reclaim(self, nr_pages: int) -> int:
        """Run direct reclaim for ``nr_pages`` (as memory pressure would).

        Returns what the shrinkers reported freeing; the v19 shmem shrinker reports
        SHRINK_STOP (counted as 0) once it finds nothing more to take, even after freeing
        pages, so look at the objects (``evicted``, ``madv``) or ``allocator.nr_free``.
        """
        return self.allocator.direct_reclaim(nr_pages)

    def device_lost(self) -> str | None:
        """Why the device is unreachable (the connection broke or its process died), or None.

        A spawned device that dies closes its socket before the kernel lets its parent reap
        it, so a closed connection is followed by one bounded wait (:data:`EXIT_GRACE_S`,
        at most ``device_timeout``) for the process to exit: the reason is then its exit
        status ("killed by SIGKILL"), not the closed connection. A timeout does not wait: a
        stopped device never exits by itself."""
        gone = getattr(self.client, "_gone", None) if self.client is not None else None
        proc = self._proc
        if (
            proc is not None
            and gone is not None
            and not isinstance(gone, DeviceTimeout)
            and not self._exit_waited
        ):
            self._exit_waited = True
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=min(EXIT_GRACE_S, self.device_timeout or EXIT_GRACE_S))
        if proc is not None and proc.poll() is not None:
            return f"gemu device process exited with status {_exit_status(proc.returncode)}"
        return str(gone) if gone is not None and not self._down else None

    def probe_device(self) -> str | None:
        """Ask the device whether it is alive (one register round trip, bounded by
        ``device_timeout``): a console calls this while it waits for input, so a device
        stopped between two commands is found lost without a command to notice it. Returns
        :meth:`device_lost`."""
        from gemu.device.abi import regs

        if self.client is not None and self.device_lost() is None:
            with contextlib.suppress(DeviceGone):
                self.client.readl(regs.GPU_ID.offset)
        return self.device_lost()

    # -- run state: QMP stop, cont, system_reset --------------------------------------------
    def stop(self) -> None:
        """Hold the GPU (QMP ``stop``): its command processor stops before its next packet
        until :meth:`cont`. The guest keeps running; its job timeouts re-arm while the GPU is
        held (the timeout handler finds STATUS.HALTED), so a stop is never taken for a hang."""
        from gemu.device.abi.protocol import RunRequest

        self.client.run_state(RunRequest.STOP)

    def cont(self) -> None:
        """Release the hold of :meth:`stop` (a debugger's own hold stays)."""
        from gemu.device.abi.protocol import RunRequest

        self.client.run_state(RunRequest.CONT)

    def end_holds(self) -> None:
        """Power-off: end every hold of the GPU, the machine's :meth:`stop` and a debugger's
        (``-S`` with no gdb ever attached included), so power-off never waits for a debugger;
        a device too old to know RUN_STATE, or gone, has nothing to release."""
        from gemu.device.abi.protocol import RunRequest

        if self.client is not None:
            with contextlib.suppress(DeviceError, DeviceGone):
                self.client.run_state(RunRequest.POWEROFF)

    def paused(self) -> bool:
        """Whether :meth:`stop` holds the GPU (asks the device)."""
        return self.client.run_state()[0]

    def system_reset(self, done: Callable[[], None] | None = None) -> None:
        """Reset the GPU with no job to blame (QMP ``system_reset``): the driver's reset path
        (drm_sched_stop, soft reset, re-emit unfinished jobs, drm_sched_start), queued on the
        scheduler's timeout workqueue; ``done`` is called once the GPU runs again."""
        self.driver.schedule_reset("system reset requested by the host", done)

    def boot_log(self) -> list[str]:
        """What the guest kernel printed while booting: device, memory, swap, ring."""
        gpu = self.driver.gpu
        c = self.client
        from gemu.device.abi import regs

        feats = gpu.features
        as_count = regs.FEATURES.field("AS_COUNT").ex(feats)
        va_bits = regs.FEATURES.field("VA_BITS").ex(feats)
        a = self.allocator
        wm = a.watermarks
        lines = [
            f"gemu: device {c.device_name or 'gemu-gpu'} ({self.device_kind}), "
            f"GPU_ID {c.gpu_id or regs.GPU_ID_VALUE:#010x}, hardware interface "
            f"v{regs.VERSION.field('MAJOR').ex(gpu.version)}."
            f"{regs.VERSION.field('MINOR').ex(gpu.version)}",
            f"gemu: features: {as_count} address spaces, {va_bits}-bit GPU VA, link "
            f"{flag_names(c.device_features)}, guest memory by {self.memory_mode}",
            f"Memory: {format_size(self.ram_size)} guest RAM, {a.totalram_pages} pages "
            f"managed, watermarks min/low/high {wm.min}/{wm.low}/{wm.high}",
        ]
        if self.swap is not None:
            lines.append(
                f"Adding {format_size(self.swap_size)} swap ({self.swap.total_swap_pages} pages)"
            )
        else:
            lines.append("swap: none (the shrinker can only purge)")
        if a.kswapd is not None:
            lines.append("kswapd0: started")
        lines.append(
            f"{gpu.name}: ring ready: {gpu.ring_size >> 10} KiB, {gpu.ring_slots} slots, "
            f"job timeout {self.driver.timeout_ns // 1_000_000} ms"
        )
        if self.gdb_address is not None:
            lines.append(f"gemu: gdb stub listening on {self.gdb_address}")
        return lines

    def statistics(self) -> dict:
        """Every counter of the machine in one dict: ``mem`` (page allocator), ``swap``,
        ``shrinker`` (objects purged/evicted/swapped in, LRU pages), ``gpu`` (jobs, IRQs,
        faults, resets, MMU), ``objects``."""
        from dataclasses import asdict

        a = self.allocator
        out: dict = {
            "mem": {
                "total_pages": a.totalram_pages,
                "free_pages": a.nr_free,
                **asdict(a.statistics()),
            },
            "objects": self.dev.object_count,
        }
        if self.swap is not None:
            out["swap"] = {
                "total_pages": self.swap.total_swap_pages,
                "used_pages": self.swap.nr_used_slots,
                **asdict(self.swap.statistics()),
            }
        mm = self.dev.shmem_mm
        if mm is not None:
            out["shrinker"] = {
                **mm.stats.as_dict(),
                "lru_pinned_pages": mm.lru_pinned.count,
                "lru_evictable_pages": mm.lru_evictable.count,
                "lru_evicted_pages": mm.lru_evicted.count,
            }
        vm_bind = getattr(self, "vm_bind", None)
        if vm_bind is not None:
            out["shrinker"] = vm_bind_shrinker_stats(vm_bind.reclaim)
        out["gpu"] = self.driver.gpu.statistics()
        return out

    def query(self, view: str, session=None):
        """One view of the machine as plain data, the same data the console's ``info VIEW``
        formats (see :mod:`gemu.host.query`): ``mem``, ``swap``, ``shrinker``, ``ring``,
        ``lockdep``, ``stats``, ``reclaim`` (driver mode vm-bind's per-VM shrinker);
        ``objects``, ``mmu``, ``fences``, ``tasks`` and ``vms`` (driver mode vm-bind's VMs)
        show a console session's state and need that ``session`` (a
        :class:`~gemu.host.shell.Shell`)."""
        from gemu.host.query import query

        return query(self, view, session)

    def check_clean(self) -> None:
        """Assert that everything the guest allocated was given back: no GEM object, no
        frame beyond the driver's own, no swap slot, no lockdep report, no leaked object."""
        problems = []
        if self.dev.object_count:
            problems.append(f"{self.dev.object_count} GEM objects still alive")
        if self.dev.leaked:
            problems.append(f"leaked objects: {self.dev.leaked!r}")
        kernel = self.driver.frames.frames
        if self.allocator.nr_used != kernel:
            problems.append(
                f"{self.allocator.nr_used} frames in use, only the driver's {kernel} expected"
            )
        mm = self.dev.shmem_mm
        if mm is not None:
            lrus = {
                lru.name: lru.count for lru in (mm.lru_pinned, mm.lru_evictable, mm.lru_evicted)
            }
            if any(lrus.values()):
                problems.append(f"shrinker LRUs not empty: {lrus} pages")
        if self.vm_bind is not None:
            reclaim = self.vm_bind.reclaim
            lrus = {lru.name: lru.count for lru in reclaim._lrus() if lru.count}
            if lrus:
                problems.append(f"VM_BIND reclaim LRUs not empty: {lrus} pages")
        if self.swap is not None and self.swap.nr_used_slots:
            problems.append(f"{self.swap.nr_used_slots} swap slots in use")
        gpu = self.driver.gpu
        if gpu.pending:
            problems.append(f"{len(gpu.pending)} jobs still on the ring")
        busy = [vm.name for vm in gpu.mmu.slots if vm is not None]
        if busy:
            problems.append(f"GPU address spaces still bound: {busy}")
        reports = [r for r in lockdep.reports() if self._lockdep_seen.get(id(r), 0) != r.count]
        if reports:
            problems.append("lockdep: " + "; ".join(r.message for r in reports))
        if problems:
            raise AssertionError("machine not clean: " + " | ".join(problems))

    # -- teardown --------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Remove the driver, stop the device, release guest RAM."""
        if getattr(self, "_down", False):
            return
        self._down = True
        alloc = getattr(self, "allocator", None)
        if alloc is not None:
            with contextlib.suppress(Exception):
                alloc.stop_kswapd()
        vm_bind = getattr(self, "vm_bind", None)
        if vm_bind is not None:
            with contextlib.suppress(Exception):
                vm_bind.remove()
        drv = getattr(self, "driver", None)
        if drv is not None:
            with contextlib.suppress(Exception):
                drv.remove()
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
        if self._proc is not None:
            if isinstance(getattr(self.client, "_gone", None), DeviceTimeout):
                self._proc.kill()  # stopped or wedged: SIGTERM would wait for SIGCONT
            else:
                self._proc.terminate()
            try:
                self._proc.wait(timeout=self.device_timeout or 10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
            self._proc.stdout.close()
        if self._server is not None:
            self._server.stop()
            if self._server_thread is not None:
                self._server_thread.join(timeout=10)
        swap = getattr(self, "swap", None)
        if swap is not None:
            swap.close()
        physmem = getattr(self, "physmem", None)
        if physmem is not None:
            physmem.close()  # its views of RAM keep the mapping from closing
        with contextlib.suppress(Exception):
            self.ram.close()
        self._tmp.cleanup()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def vm_bind_shrinker_stats(reclaim) -> dict:
    """The VM_BIND flavour's reclaim counters and LRU sizes in pages, as ``statistics()``
    gives them under ``shrinker``: ``evicted``, ``scans``, ``contended``, ``harder``,
    ``skipped_busy``, ``last_scan``, ``lru_unused_pages``, ``lru_shared_pages`` (BOs mapped
    in several VMs), ``lru_private_pages`` (BOs mapped in one VM, over every VM)."""
    return {
        **reclaim.stats.as_dict(),
        "lru_unused_pages": reclaim.unused.count,
        "lru_shared_pages": reclaim.gpu_mapped_shared.count,
        "lru_private_pages": sum(vm.reclaim_lru.count for vm in list(reclaim.vms)),
    }
