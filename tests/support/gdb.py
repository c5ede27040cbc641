"""Helpers for driving the real gdb-multiarch against a ``gemu device --gdb`` process.

- :func:`spawn_gdb_device` starts ``gemu device --listen unix:... --gdb
  tcp:127.0.0.1:0 [-S] ...`` and yields once both ready lines are read (device spec, gdb port);
- :func:`setup_job` builds page tables, an indirect buffer and a ring in a client's memory and
  submits one job, returning the addresses a test checks;
- :func:`gdb_batch` runs ``gdb-multiarch -batch`` with ``-ex`` commands against a port.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gemu.device.abi import packets as pk
from gemu.device.abi.client import DeviceClient
from gemu.host.demo import FrameAllocator, PageTables, Ring
from tests.support.device import DeviceProcess, gemu_executable

GDB = shutil.which("gdb-multiarch")


def _require_gdb() -> None:
    # ci/setup.sh installs gdb-multiarch (and fails if it cannot): a missing debugger is a
    # broken setup to report, not a reason to skip the tests that need it.
    assert GDB is not None, "gdb-multiarch is not installed: run `bash ci/setup.sh` as root"


# The fixture lives in tests/conftest.py so every test module sees it.
needs_gdb = pytest.mark.usefixtures("gdb_installed")

DATA_VA = 0x10_0000
IB_VA = 0x20_0000
RING_BASE = 0x1000
RING_SIZE = 0x4000


def _read_lines(proc: subprocess.Popen, count: int, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while buf.count(b"\n") < count:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise RuntimeError(f"gemu device printed no {count} ready lines within {timeout} s")
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"gemu device exited with {proc.wait()} before it was ready")
            buf += chunk
    return buf.decode().splitlines()[:count]


@dataclass
class GdbDevice(DeviceProcess):
    gdb_port: int = 0


@contextlib.contextmanager
def spawn_gdb_device(*args: str, wait: bool = True, timeout: float = 20.0) -> Iterator[GdbDevice]:
    """A ``gemu device`` on a UNIX socket with its gdb stub on a free loopback port."""
    with tempfile.TemporaryDirectory(prefix="gemu-gdb-") as tmp:
        log_path = Path(tmp) / "device.log"
        # a UNIX socket: guest memory is mapped, so the stub's reads need no DMA round trip
        # to a client that is busy waiting for gdb
        argv = [*gemu_executable(), "device", "--listen", f"unix:{tmp}/device.sock"]
        argv += ["--gdb", "tcp:127.0.0.1:0", *(["-S"] if wait else []), *args]
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=log_file, stdin=subprocess.DEVNULL
            )
        try:
            ready, gdb_line = _read_lines(proc, 2, timeout)
            spec = ready.rpartition(" ")[2]
            port = int(gdb_line.rpartition(":")[2])
            yield GdbDevice(proc, spec, log_path, gdb_port=port)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            proc.stdout.close()


@dataclass
class Job:
    ring: Ring
    data_pa: int
    ib_pa: int
    ib: bytes
    ring_packets: list[bytes]


def setup_job(dev: DeviceClient, ib_packets: list[bytes], *, submit: bool = True) -> Job:
    """AS1 maps DATA_VA (4 pages, writable) and IB_VA (the IB, executable); the ring gets
    SET_AS 1, INDIRECT_BUFFER, FENCE (seqno 7 at DATA_VA + 0x3000)."""
    ram = dev.memory
    alloc = FrameAllocator(ram.size, start=0x20000)
    vm = PageTables(ram, alloc)
    data_pa = alloc.take(4)
    vm.map(DATA_VA, data_pa, 4 * 4096, write=True)
    ib = b"".join(ib_packets)
    ib_pa = alloc.take(1)
    ram.buf[ib_pa : ib_pa + len(ib)] = ib
    vm.map(IB_VA, ib_pa, 4096, exec=True)
    vm.bind(dev, 1)
    ring = Ring(dev, ram, base=RING_BASE, size=RING_SIZE)
    ring_packets = [
        pk.set_as(1),
        pk.indirect_buffer(IB_VA, len(ib) // 4),
        pk.fence(DATA_VA + 0x3000, 7),
    ]
    if submit:
        ring.submit(b"".join(ring_packets))
    return Job(ring, data_pa, ib_pa, ib, ring_packets)


def gdb_batch(port: int, *commands: str, timeout: float = 30.0) -> str:
    """Run gdb-multiarch in batch mode against the stub; its stdout (stderr appended)."""
    argv = [GDB, "-nx", "-batch", "-ex", "set pagination off"]
    argv += ["-ex", f"target remote 127.0.0.1:{port}"]
    for c in commands:
        argv += ["-ex", c]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    return r.stdout + r.stderr
