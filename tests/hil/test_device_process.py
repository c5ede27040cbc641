"""The real ``gemu device`` process over every transport, driven through DeviceClient.

Each test spawns the device (tests.support.device.spawn_device), waits for its ready line and
talks to it like a machine would: fd-mapped memory over UNIX sockets, in-band DMA over TCP and
over a pty serial line.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tty
import zlib

import pytest

from gemu.device.abi import link, regs
from gemu.device.abi import packets as pk
from gemu.device.abi import protocol as p
from gemu.device.abi.client import DeviceClient, SharedMemory
from gemu.device.abi.enums import CpState, Irq
from gemu.host.demo import FrameAllocator, PageTables, Ring
from tests.support.device import (
    attached_client,
    device,
    device_process,
    gemu_executable,
    spawn_device,
)

__all__ = ["device", "device_process"]  # fixtures

SCRATCH0 = regs.SCRATCH[0].offset


class FdConnection(link.Connection):
    """The master side of a pty as a link connection (it has no path to open)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.name = "pty-master"

    def sendall(self, data) -> None:
        view = memoryview(bytes(data))
        while view:
            view = view[os.write(self.fd, view) :]

    def recv_into(self, view, *, block: bool = True):
        if not block:
            import select

            if not select.select([self.fd], [], [], 0)[0]:
                return None
        try:
            data = os.read(self.fd, len(view))
        except OSError:
            return 0
        view[: len(data)] = data
        return len(data)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        pass  # the test owns the descriptor


def run_job(dev: DeviceClient, ram: SharedMemory) -> None:
    """FILL + CRC32 through a GPU VA, then a FENCE with an IRQ; checks every result."""
    dev.writel(regs.IRQ_MASK.offset, int(Irq.FENCE | Irq.CP_ERROR | Irq.MMU))
    alloc = FrameAllocator(ram.size, start=0x20000)
    vm = PageTables(ram, alloc)
    data_pa = alloc.take(4)
    vm.map(0x10_0000, data_pa, 4 * regs.PAGE_SIZE, write=True)
    vm.bind(dev, 1)
    ring = Ring(dev, ram, base=0x1000, size=0x4000)
    ring.submit(
        pk.set_as(1)
        + pk.fill(0x10_0000, 0x2000, 0x01020304)
        + pk.crc32(0x10_0000, 0x2000, 0x10_3000)
        + pk.fence(0x10_3008, 7, irq=True)
    )
    event = dev.wait_irq(timeout=20)
    assert event is not None and event.level and event.irq_status & Irq.FENCE
    assert ring.wait_idle() is CpState.IDLE
    assert ram.read(data_pa, 8) == bytes.fromhex("0403020104030201")
    assert ram.read_u32(data_pa + 0x3000) == zlib.crc32(bytes.fromhex("04030201") * 0x800)
    assert ram.read_u64(data_pa + 0x3008) == 7


def test_unix_socket_maps_guest_memory_by_descriptor(device):
    """Over a UNIX socket guest memory is passed by fd: DMA needs no messages."""
    assert device.readl(regs.GPU_ID.offset) == regs.GPU_ID_VALUE
    assert device.readl(regs.MEM_PAGES.offset) == device.memory.size // regs.PAGE_SIZE
    run_job(device, device.memory)
    assert device.stats()["server"]["dma_requests"] == 0


def test_tcp_uses_in_band_dma():
    """Over loopback TCP (port 0, the ready line names the port) DMA goes in band."""
    with spawn_device("tcp:127.0.0.1:0") as proc:
        assert proc.spec.startswith("tcp:127.0.0.1:") and not proc.spec.endswith(":0")
        with attached_client(proc.spec, size=1 << 20) as dev:
            assert dev.features & p.Features.IN_BAND_DMA
            assert not dev.features & p.Features.FD_PASSING
            run_job(dev, dev.memory)
            stats = dev.stats()
            assert stats["server"]["dma_requests"] > 0
            assert stats["client"]["dma_served"] == stats["server"]["dma_requests"]


def test_serial_pty_uses_in_band_dma():
    """The device opens a pty slave as a serial port; the client talks over the master."""
    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        with spawn_device(f"serial:{os.ttyname(slave)}") as proc:
            dev = DeviceClient(FdConnection(master), reply_timeout=20)
            try:
                dev.handshake()
                assert not dev.features & p.Features.FD_PASSING
                with SharedMemory(1 << 20) as ram:
                    assert dev.attach_memory(ram) == "in-band"
                    run_job(dev, ram)
                    dev.detach_memory()
            finally:
                dev.close()
            assert proc.alive()
    finally:
        os.close(master)
        os.close(slave)


def test_reconnect_keeps_device_state(device_process):
    """Registers survive a disconnect: write SCRATCH0, reconnect, read it back."""
    with device_process.connect() as dev:
        dev.writel(SCRATCH0, 0x5EED)
    with device_process.connect() as dev:
        assert dev.readl(SCRATCH0) == 0x5EED


def test_reset_restores_reset_values(device):
    """RESET puts every register back to its declared reset value."""
    device.writel(SCRATCH0, 0x1234)
    device.writel(regs.IRQ_MASK.offset, 0x1F)
    device.writel(regs.RING_SIZE.offset, 0x4000)
    device.reset()
    for reg in (regs.SCRATCH[0], regs.IRQ_MASK, regs.RING_SIZE, regs.GPU_ID, regs.FEATURES):
        assert device.readl(reg.offset) == reg.reset, reg.name


def test_a_client_killed_mid_frame_does_not_kill_the_device(device_process):
    """A client process killed halfway through a frame leaves the device serving."""
    path = device_process.spec.partition(":")[2]
    code = (
        "import socket, os, struct, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        "s.sendall(struct.pack('<HHIII', 1, 2, 24, 0, 0) + b'\\0\\0')\n"
        "print('sent', flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", code, path], capture_output=True, timeout=30, text=True
    )
    assert child.returncode == -signal.SIGKILL and "sent" in child.stdout
    with device_process.connect() as dev:
        assert dev.readl(regs.GPU_ID.offset) == regs.GPU_ID_VALUE
    assert device_process.alive()
    assert "closed the connection mid-frame (18 of 24 bytes)" in device_process.log()


def test_malformed_frames_get_error_replies_from_the_process(device_process):
    """The process answers garbage with errors and an EMSGSIZE disconnect, and lives on."""
    path = device_process.spec.partition(":")[2]
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(p.encode(77, 1))
        hdr = p.decode_header(s.recv(16))
        assert hdr.is_error and hdr.error == p.ProtoError.ENOSYS
        s.recv(hdr.payload_size)
        s.sendall(p.HEADER_FAST.pack(2, 2, 4, 0, 0))
        hdr = p.decode_header(s.recv(16))
        assert hdr.error == p.ProtoError.EMSGSIZE
    with device_process.connect() as dev:
        assert dev.readl(regs.GPU_ID.offset) == regs.GPU_ID_VALUE


def test_non_loopback_tcp_listen_is_refused():
    """`gemu device --listen tcp:0.0.0.0:0` is a usage error naming the address."""
    proc = subprocess.run(
        [*gemu_executable(), "device", "--listen", "tcp:0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "refusing to listen on 0.0.0.0, which is not a loopback address" in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["device"], "the following arguments are required: --listen"),
        (["device", "--listen", "udp:1"], "unknown transport 'udp'"),
        (["device", "--listen", "unix:/tmp/x", "--log", "loud"], "invalid log level 'loud'"),
        (["demo", "-m", "lots"], "invalid size 'lots'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_command_lines_exit_2_naming_the_value(args, message):
    proc = subprocess.run([*gemu_executable(), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_sigterm_stops_the_device_cleanly():
    """SIGTERM ends the process with status 0 and removes its socket file."""
    with spawn_device() as proc:
        path = proc.spec.partition(":")[2]
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(timeout=20) == 0
        assert not os.path.exists(path)
        assert "SIGTERM: shutting down" in proc.log()


def test_demo_runs_end_to_end():
    """`gemu demo --device-tour` spawns a device, runs its jobs and reports the fault it
    provoked (the curated emulator run is tests/hil/test_demo.py)."""
    proc = subprocess.run(
        [*gemu_executable(), "demo", "--device-tour", "-m", "16"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "CRC32" in out and "ok" in out and "MISMATCH" not in out
    assert "TRANSLATION_L2 on WRITE by FILL at 0x50000000" in out
    assert "RESUME: cp=IDLE" in out
