"""Stops that must hold with the real gdb-multiarch: what the guest sees around them.

A machine spawns its device with a gdb stub; gdb (interactive, under pexpect, or batch)
attaches, continues, interrupts or stops at a fault, and the guest's driver must see the
run exactly as it would without the debugger: time gdb holds the GPU does not count against
a job's timeout nor a WAIT_MEM's, an interrupted WAIT_MEM waits on, a fault stays latched
while gdb looks at it.
"""

from __future__ import annotations

import errno
import re
import socket
import time

import pexpect

from gemu.device.abi import packets as pk
from gemu.device.abi import regs
from gemu.device.abi.enums import CpState, WaitFunc
from gemu.guest.gemu_drv.job import BoAccess
from gemu.host.machine import Machine
from tests.support.device import attached_client, gemu_executable
from tests.support.gdb import (
    DATA_VA,
    GDB,
    IB_VA,
    RING_BASE,
    gdb_batch,
    needs_gdb,
    setup_job,
    spawn_gdb_device,
)

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


WATCH_IB = [
    pk.fill(DATA_VA, 0x100, 0x11223344),
    pk.write_data(DATA_VA + 0x200, [0xDEADBEEF]),
    pk.nop(2),
    pk.atomic_add(DATA_VA + 0x208, 5),
]


def test_watch_hit_is_reported_before_the_next_packets_breakpoint():
    """Breakpoints on the IB's first packet and on the packet after the WRITE_DATA; at the
    first, `watch` the word the WRITE_DATA stores and continue: gdb reports the watchpoint
    (old and new value) at the WRITE_DATA, the next continue the breakpoint after it, and
    stepi from there runs the NOP."""
    at, addr = [], IB_VA
    for p in WATCH_IB:
        at.append(addr)
        addr += len(p)
    with spawn_gdb_device() as dev, attached_client(dev.spec, size=1 << 20) as client:
        setup_job(client, WATCH_IB)
        out = gdb_batch(
            dev.gdb_port,
            f"break *{at[0]:#x}",
            f"break *{at[2]:#x}",
            "continue",
            "monitor as 1",
            f"watch *(unsigned int*){DATA_VA + 0x200:#x}",
            "continue",
            "p/x $pc",
            "continue",
            "p/x $pc",
            "stepi",
            "p/x $pc",
            "delete",
            "detach",
        )
    watch = out.index("Hardware watchpoint 3: *(unsigned int*)0x100200\n\nOld value = 0\n")
    assert "New value = 3735928559" in out[watch:], out
    assert out.index("Breakpoint 2, ") > watch, out
    assert re.findall(r"^\$\d+ = (.*)$", out, re.M) == [
        f"{at[1]:#x}",
        f"{at[2]:#x}",
        f"{at[3]:#x}",
    ], out


FAULT_VA = 0x7_0000_0000  # never mapped by the driver


def test_fault_stays_latched_while_gdb_holds_the_sigsegv_stop():
    """gdb continues, the guest submits a job writing an unmapped VA: gdb stops with SIGSEGV.
    For as long as gdb holds that stop (here past two job timeouts) `monitor fault` shows the
    latched MMU fault and CP_ERROR, the guest's driver has seen no fault and the job has not
    finished; once gdb continues, the driver sees it as without gdb: the job fails with
    EFAULT, no reset, and the next job runs."""
    port = _free_port()
    with Machine(
        ram_size=8 << 20,
        swap_size=0,
        device="spawn",
        timeout_ns=200_000_000,
        device_args=("--gdb", f"tcp:127.0.0.1:{port}"),
    ) as m:
        f = m.open()
        bo = f.create_bo(4096)
        va = f.vm_bind(bo)
        gpu = m.driver.gpu
        gdb = _gdb(port)
        try:
            gdb.sendline("continue")
            gdb.expect_exact("Continuing.")
            start = time.monotonic()
            bad = f.submit(pk.fill(FAULT_VA, 4, 1), bos=[])
            gdb.expect("received signal SIGSEGV")
            gdb.expect_exact("(gdb) ")
            _until(lambda: time.monotonic() - start >= 0.5, "500 ms of holding the fault stop")
            gdb.sendline("monitor fault")
            gdb.expect_exact("(gdb) ")
            assert f"TRANSLATION_L1 on WRITE at GPU VA {FAULT_VA:#x} by FILL" in gdb.before, (
                gdb.before
            )
            assert "CP_ERROR: MMU_FAULT" in gdb.before, gdb.before
            assert gpu.stats.mmu_faults == 0 and not bad.signaled
            gdb.sendline("continue")
            gdb.expect_exact("Continuing.")
            _until(lambda: bad.signaled, "the faulting job to finish")
            gdb.sendintr()
            gdb.expect("received signal SIGINT")
            gdb.expect_exact("(gdb) ")
            _quit(gdb)
        finally:
            gdb.close(force=True)
        assert bad.error == -errno.EFAULT, bad.message
        assert gpu.stats.mmu_faults == 1 and gpu.stats.resets == 0
        good = f.submit(pk.fill(va, 4096, 0x5A5A5A5A), bos=[(bo, BoAccess.WRITE)])
        f.wait(good, 10)
        assert f.read(bo, 0, 4) == bytes.fromhex("5a5a5a5a")
        f.close()
        m.check_clean()


def test_poweroff_with_dash_s_and_no_gdb_is_prompt():
    """`gemu boot --gdb ... -S` and no gdb ever attaches: a job submitted at the prompt is held,
    and `poweroff` still ends the machine promptly (it never waits for a debugger)."""
    port = _free_port()
    exe, *pre = gemu_executable()
    argv = [*pre, "boot", "-m", "16M", "--gdb", f"tcp:127.0.0.1:{port}", "-S"]
    child = pexpect.spawn(exe, argv, timeout=30, encoding="utf-8", echo=False)
    try:
        child.expect_exact("gemu# ")
        for line in ("src = bo 64K", "dst = bo 64K", "f1 = submit copy src dst"):
            child.sendline(line)
            child.expect_exact("gemu# ")
        start = time.monotonic()
        child.sendline("poweroff")
        child.expect(pexpect.EOF, timeout=20)
        took = time.monotonic() - start
    finally:
        child.close(force=True)
    assert took < 10, f"poweroff took {took:.1f} s"


def test_pc_is_writable_restore_faults_like_reads_and_x6_at_a_fault_in_an_ib(tmp_path):
    """`set $pc` moves the CP to another packet of the IB (the WRITE_DATA and NOP skipped:
    their word stays 0, the ATOMIC runs), `jump` to a ring packet; `set $pc` to an address
    in neither is refused (E16); `restore` to an unmapped VA fails without a write; a fault
    inside the IB stops with x6 = 1 (the IB depth) while pc is the IB VA."""
    at, addr = [], IB_VA
    for p in WATCH_IB:
        at.append(addr)
        addr += len(p)
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"\x01\x02\x03\x04")
    with spawn_gdb_device() as dev, attached_client(dev.spec, size=1 << 20) as client:
        job = setup_job(client, WATCH_IB)
        fence_at = RING_BASE + sum(len(p) for p in job.ring_packets[:-1])
        out = gdb_batch(
            dev.gdb_port,
            f"break *{at[1]:#x}",
            "continue",
            f"set $pc = {at[3]:#x}",
            "p/x $pc",
            "stepi",
            "p/x $pc",
            "set $pc = 0x7000000",
            "monitor as 1",
            f"restore {blob} binary 0x900000",
            "monitor auto",
            "delete",
            f"break *{fence_at:#x}",
            f"jump *{fence_at:#x}",
            "p/x $pc",
            "delete",
            "detach",
        )
        ram = client.memory
        assert _values(out)[:3] == [f"{at[3]:#x}", f"{RING_BASE + 0x18:#x}", f"{fence_at:#x}"], out
        # the stub answers E14 (as to a read); gdb's restore words every failed write so
        assert "restore: memory write failed" in out, out
        assert """Could not write register "pc"; remote failure reply 'E16'""" in out, out
        _until(lambda: ram.read_u64(job.data_pa + 0x3000) == 7, "the fence after detach")
        assert ram.read_u32(job.data_pa + 0x200) == 0, "the skipped WRITE_DATA did not run"
        assert ram.read_u64(job.data_pa + 0x208) == 5, "the ATOMIC ran"
    bad = [pk.fill(DATA_VA, 0x10, 1), pk.fill(0x90_0000, 4, 1)]
    with spawn_gdb_device() as dev, attached_client(dev.spec, size=1 << 20) as client:
        setup_job(client, bad)
        out = gdb_batch(dev.gdb_port, "continue", "p/x $pc", "p $x6", "p $x11", "detach")
    assert "SIGSEGV" in out and _values(out) == [f"{IB_VA + len(bad[0]):#x}", "1", "1"], out


def _values(out: str) -> list[str]:
    return re.findall(r"^\$\d+ = (.*)$", out, re.M)
