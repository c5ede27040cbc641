"""Stops that must hold with the real gdb-multiarch: what the guest sees around them.

A machine spawns its device with a gdb stub; gdb (interactive, under pexpect, or batch)
attaches, continues, interrupts or stops at a fault, and the guest's driver must see the
run exactly as it would without the debugger: time gdb holds the GPU does not count against
a job's timeout nor a WAIT_MEM's, an interrupted WAIT_MEM waits on, a fault stays latched
while gdb looks at it.
"""

from __future__ import annotations

import socket
import threading
import time

import pexpect

from gemu.device.abi import packets as pk
from gemu.device.abi import regs
from gemu.device.abi.enums import CpState, WaitFunc
from gemu.guest.gemu_drv.job import BoAccess
from gemu.host.machine import Machine
from tests.support.gdb import GDB, needs_gdb

pytestmark = needs_gdb

TIMEOUT_NS = 600_000_000  # the job timeout of these machines


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _until(cond, what: str, timeout: float = 20.0) -> None:
    """A bounded wait on a condition (the device and gdb run in other processes)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def _gdb(port: int) -> pexpect.spawn:
    gdb = pexpect.spawn(GDB, ["-nx", "-q"], encoding="utf-8", timeout=30)
    for line in ("set pagination off", "set style enabled off", f"target remote 127.0.0.1:{port}"):
        gdb.expect_exact("(gdb) ")
        gdb.sendline(line)
    gdb.expect_exact("(gdb) ")
    return gdb


def _quit(gdb: pexpect.spawn) -> None:
    gdb.sendline("detach")
    gdb.expect_exact("detached")
    gdb.sendline("quit")
    gdb.expect(pexpect.EOF)


def test_ctrl_c_during_wait_mem_does_not_count_against_the_job():
    """A job of two WAIT_MEMs (the first with a 300 ms timeout); gdb continues, the job
    starts waiting, Ctrl-C holds the GPU until 450 ms after the submit, gdb detaches, the
    guest releases the first wait at once and the second 750 ms after the submit. Without
    the hold the job would take 750 ms of its 600 ms timeout; with 450 ms of it held it took
    300 ms of GPU time: it completes without error, the GPU is never reset, and the first
    WAIT_MEM (interrupted mid-wait) waited on and did not time out."""
    port = _free_port()
    with Machine(
        ram_size=8 << 20,
        swap_size=0,
        device="spawn",
        timeout_ns=TIMEOUT_NS,
        device_args=("--gdb", f"tcp:127.0.0.1:{port}"),
    ) as m:
        f = m.open()
        sem = f.create_bo(4096)
        va = f.vm_bind(sem)
        bus = m.driver.gpu.bus
        gdb = _gdb(port)
        try:
            gdb.sendline("continue")
            gdb.expect_exact("Continuing.")
            job = pk.wait_mem(va, 1, function=WaitFunc.EQ, timeout_us=300_000)
            job += pk.wait_mem(va + 4, 1, function=WaitFunc.EQ)
            start = time.monotonic()
            fence = f.submit(job, bos=[(sem, BoAccess.READ)])

            def cp_state() -> int:
                return regs.CP_STATUS.field("STATE").ex(bus.readl(regs.CP_STATUS.offset))

            _until(lambda: cp_state() == CpState.WAITING, "the job to wait on memory")
            gdb.sendintr()
            gdb.expect("received signal SIGINT")
            gdb.expect_exact("(gdb) ")
            assert cp_state() == CpState.HALTED
            _until(lambda: time.monotonic() - start >= 0.45, "450 ms after the submit")
            _quit(gdb)
        finally:
            gdb.close(force=True)
        f.write(sem, 0, (1).to_bytes(4, "little"))
        _until(lambda: time.monotonic() - start >= 0.75, "750 ms after the submit")
        f.write(sem, 4, (1).to_bytes(4, "little"))
        f.wait(fence, 10)
        assert not fence.error, fence.message
        assert m.driver.gpu.stats.resets == 0
        f.close()
        m.check_clean()
