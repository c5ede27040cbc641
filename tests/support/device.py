"""Helpers and fixtures that run a device model for tests.

- :func:`spawn_device` starts the real ``gemu device`` process on a spec, waits for its ready
  line (bounded by a timeout on the pipe, never a sleep) and kills it at the end;
- :func:`inproc_device` runs a :class:`DeviceServer` on a thread of the test process, over a
  socket pair or a temporary UNIX socket, for fast tests;
- :class:`FakeGpu` is a tiny stand-in for the device model with the same interface, for
  testing the protocol layers on their own.

Fixtures (import them into a test module, e.g.
``from tests.support.device import device_process, device  # noqa: F401``):

- ``device_process``: a spawned ``gemu device`` on a temporary UNIX socket;
- ``device``: a connected :class:`DeviceClient` to it with 16 MiB of :class:`SharedMemory`
  attached (``device.memory``).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from gemu.device.abi import regs
from gemu.device.abi.client import DeviceClient, SharedMemory
from gemu.device.abi.enums import CpState, Irq
from gemu.host.cmd_device import wait_ready

ROOT = Path(__file__).resolve().parents[2]
GUEST_RAM = 16 << 20


def gemu_executable() -> list[str]:
    """The ``gemu`` console script of the project's venv (or the running interpreter's)."""
    for candidate in (ROOT / ".venv" / "bin" / "gemu", Path(sys.executable).parent / "gemu"):
        if candidate.exists():
            return [str(candidate)]
    found = shutil.which("gemu")
    if found:
        return [found]
    return [sys.executable, "-m", "gemu.host"]


@dataclass
class DeviceProcess:
    """A running ``gemu device``: its process, the spec it listens on and its log file."""

    proc: subprocess.Popen
    spec: str
    log_path: Path
    extra: dict = field(default_factory=dict)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def connect(self, **kw) -> DeviceClient:
        return DeviceClient.connect(self.spec, **kw)


@contextlib.contextmanager
def spawn_device(
    listen: str | None = None, *args: str, timeout: float = 20.0, log_level: str = "info"
) -> Iterator[DeviceProcess]:
    """Run ``gemu device --listen LISTEN ARGS...``; yield once it is listening."""
    with tempfile.TemporaryDirectory(prefix="gemu-dev-") as tmp:
        listen = listen or f"unix:{tmp}/device.sock"
        log_path = Path(tmp) / "device.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                [*gemu_executable(), "device", "--listen", listen, "--log", log_level, *args],
                stdout=subprocess.PIPE,
                stderr=log_file,
                stdin=subprocess.DEVNULL,
            )
        dev = None
        try:
            spec = wait_ready(proc, timeout)
            dev = DeviceProcess(proc, spec, log_path)
            yield dev
        except BaseException:
            if dev is None:
                sys.stderr.write(log_path.read_text(errors="replace"))
            raise
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            proc.stdout.close()


@contextlib.contextmanager
def attached_client(spec: str, size: int = GUEST_RAM, **kw) -> Iterator[DeviceClient]:
    """A connected client with ``size`` bytes of SharedMemory attached."""
    client = DeviceClient.connect(spec, **kw)
    mem = SharedMemory(size)
    try:
        client.attach_memory(mem)
        yield client
    finally:
        client.close()
        mem.close()


@dataclass
class InprocDevice:
    server: object
    thread: threading.Thread
    spec: str | None
    gpu: object

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "the device loop did not stop"


@contextlib.contextmanager
def inproc_device(gpu=None, *, listen: str | None = "unix", conn=None) -> Iterator[InprocDevice]:
    """A DeviceServer on a thread. ``listen="unix"`` picks a temporary UNIX socket; any other
    spec is used as is; ``listen=None`` serves ``conn`` (one end of a socket pair) only."""
    from gemu.device.server import DeviceServer

    if gpu is None:
        from gemu.device.gpu import Gpu

        gpu = Gpu()
    with tempfile.TemporaryDirectory(prefix="gemu-inproc-") as tmp:
        spec = f"unix:{tmp}/device.sock" if listen == "unix" else listen
        server = DeviceServer(gpu, spec)
        if conn is not None:
            server.adopt(conn)
        thread = threading.Thread(target=server.serve_forever, name="device-loop", daemon=True)
        thread.start()
        dev = InprocDevice(server, thread, server.address if spec else None, gpu)
        try:
            yield dev
        finally:
            dev.stop()


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def device_process() -> Iterator[DeviceProcess]:
    """A ``gemu device`` process on a temporary UNIX socket."""
    with spawn_device() as dev:
        yield dev


@pytest.fixture
def device(device_process: DeviceProcess) -> Iterator[DeviceClient]:
    """A client of ``device_process`` with 16 MiB of shared guest memory attached."""
    with attached_client(device_process.spec) as client:
        yield client


# --- a stand-in device model ----------------------------------------------------------------


class FakeGpu:
    """Just enough of the device model's interface to exercise the protocol layers.

    SCRATCH registers store values; a write to RING_DOORBELL queues one unit of work that
    :meth:`run` performs: it reads the u32 at guest-physical 0 and writes it plus one at 4
    (through whatever memory is attached, so in-band DMA shows), then raises Irq.FENCE.
    IRQ_CLEAR lowers it again."""

    def __init__(self, *, stepped: bool = False) -> None:
        self.clock = SimpleNamespace(stepped=stepped)
        self.values: dict[int, int] = {regs.GPU_ID.offset: regs.GPU_ID_VALUE}
        self.memory = None
        self.on_irq = None
        self.irq_level = False
        self.irq_status = 0
        self.pending = 0
        self.executed = 0
        self.resets = 0
        self.bus_errors: list[str] = []
        self.clock_ns = 0

    def attach_memory(self, mem) -> None:
        self.memory = mem

    def detach_memory(self) -> None:
        self.memory = None

    def reset(self) -> None:
        self.resets += 1
        self.values = {regs.GPU_ID.offset: regs.GPU_ID_VALUE}
        self.pending = 0
        self._set_irq(0)

    def _set_irq(self, status: int) -> None:
        self.irq_status = status
        self.irq_level = bool(status)
        if self.on_irq:
            self.on_irq(self.irq_level, status, 0)

    def mmio_read(self, off: int) -> int:
        if off == regs.IRQ_STATUS.offset:
            return self.irq_status
        return self.values.get(off, 0)

    debug_read = mmio_read

    def mmio_write(self, off: int, val: int) -> None:
        if off == regs.RING_DOORBELL.offset:
            self.pending += 1
        elif off == regs.IRQ_CLEAR.offset:
            self._set_irq(self.irq_status & ~val)
        else:
            self.values[off] = val

    @property
    def stepped(self) -> bool:
        return self.clock.stepped

    def set_stepped(self, stepped: bool) -> None:
        self.clock.stepped = stepped

    def cp_state(self) -> CpState:
        return CpState.RUNNING if self.pending else CpState.IDLE

    def has_work(self) -> bool:
        return bool(self.pending) and not self.stepped

    def wait_deadline_ns(self) -> int | None:
        return None

    def wait_pending(self) -> bool:
        return False

    def run(self, max_packets: int) -> int:
        from gemu.device.memory import BusError

        done = 0
        while self.pending and done < max_packets:
            self.pending -= 1
            done += 1
            try:
                value = self.memory.read_u32(0)
                self.memory.write_u32(4, value + 1)
            except (BusError, AttributeError) as exc:
                self.bus_errors.append(str(exc))
            self._set_irq(self.irq_status | Irq.FENCE)
        self.executed += done
        return done

    def step(self, max_packets: int, ticks_ns: int) -> tuple[int, int, int]:
        self.clock_ns += ticks_ns
        done = self.run(max_packets)
        return done, CpState.IDLE, self.clock_ns

    def mem_read(self, space: int, addr: int, size: int) -> bytes:
        return self.memory.read(addr, size)

    def mem_write(self, space: int, addr: int, data: bytes) -> None:
        self.memory.write(addr, data)

    def stats(self) -> dict:
        return {"executed": self.executed, "resets": self.resets}
