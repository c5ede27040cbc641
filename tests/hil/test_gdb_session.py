"""A GPU debugging session with the real gdb-multiarch, as docs/gdb.md shows it.

The machine's guest driver submits two jobs while gdb (interactive, under pexpect) has set a
job breakpoint on the second: gdb lists the GPU's thread (the ring, named after the job it
runs), stops before the copy job's first packet, lists the jobs on the ring, steps the job
into its indirect buffer and through the COPY, reads the destination BO through the job's
address space and detaches; the job then completes and the guest reads what it copied.
"""

from __future__ import annotations

import socket

import pexpect

from gemu.device.abi import packets as pk
from gemu.guest.gemu_drv.job import BoAccess
from gemu.host.cmd_gdb import EXTENSION
from gemu.host.machine import Machine
from tests.support.gdb import GDB, needs_gdb

pytestmark = needs_gdb

PROMPT = "(gdb) "


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Session:
    """An interactive gdb: ``run(line)`` returns what the line printed."""

    def __init__(self, port: int) -> None:
        self.gdb = pexpect.spawn(GDB, ["-nx", "-q"], encoding="utf-8", timeout=30)
        self.gdb.expect_exact(PROMPT)
        self.transcript: list[str] = []
        for line in ("set pagination off", "set style enabled off", "set width 0"):
            self.run(line)
        self.run(f"source {EXTENSION}")
        self.run(f"target remote 127.0.0.1:{port}")

    def run(self, line: str) -> str:
        self.gdb.sendline(line)
        self.gdb.expect_exact(PROMPT)
        out = self.gdb.before.replace("\r\n", "\n").replace("\x1b[?2004l\r", "")
        out = out.replace("\x1b[?2004h", "")
        self.transcript.append(PROMPT + out)
        return out.partition("\n")[2]


def test_job_breakpoint_step_read_through_the_jobs_as_and_detach():
    """threads, a job breakpoint, a stop at the job's first packet, steps, a read of the
    destination through the job's AS, detach: the job completes with the data copied."""
    port = _free_port()
    with Machine(
        ram_size=16 << 20,
        swap_size=0,
        device="spawn",
        device_args=("--gdb", f"tcp:127.0.0.1:{port}"),
    ) as m:
        f = m.open()
        src, dst = f.create_bo(4096), f.create_bo(4096)
        src_va, dst_va = f.vm_bind(src), f.vm_bind(dst)
        f.write(src, 0, bytes(range(16)) * 256)
        s = Session(port)
        try:
            threads = s.run("info threads")
            assert '"ring 0"' in threads and "ring 0: idle" in threads, threads
            copy_seqno = m.driver.gpu.next_seqno + 1  # the second job's fence
            assert f"job {copy_seqno}" in s.run(f"gemu break job {copy_seqno}")
            s.gdb.sendline("continue")
            s.gdb.expect_exact("Continuing.")
            fill = f.submit(pk.fill(dst_va, 4096, 0xA5A5A5A5), bos=[(dst, BoAccess.WRITE)])
            copy = f.submit(
                pk.copy(src_va, dst_va, 64), bos=[(src, BoAccess.READ), (dst, BoAccess.WRITE)]
            )
            s.gdb.expect("received signal SIGTRAP")
            s.gdb.expect_exact(PROMPT)
            assert fill.signaled and not copy.signaled
            status = s.run("monitor status")
            assert f"job breakpoint: job {copy_seqno}" in status, status
            jobs = s.run("monitor jobs")
            assert f"job {copy_seqno:<6} AS" in jobs and "halted before its first packet" in jobs, (
                jobs
            )
            threads = s.run("info threads")
            assert f"ring 0: job {copy_seqno}, AS " in threads, threads
            assert "halted before its first packet" in threads, threads
            as_index = int(jobs.split(f"job {copy_seqno:<6} AS")[1].split()[0])
            first = s.run("display/i $pc")
            assert f"SET_AS as={as_index}" in first, first
            step = s.run("stepi")
            assert "INDIRECT_BUFFER" in step, step
            step = s.run("stepi")  # enters the IB: pc is its first packet, the COPY
            assert f"COPY {src_va:#x} -> {dst_va:#x}, size=0x40" in step, step
            step = s.run("stepi")  # the COPY runs; the IB ends, pc is the job's FENCE
            assert "FENCE" in step, step
            s.run(f"gemu as {as_index}")
            words = s.run(f"x/4xw {dst_va:#x}")
            assert "0x03020100\t0x07060504\t0x0b0a0908\t0x0f0e0d0c" in words, words
            tail = s.run(f"x/xw {dst_va + 64:#x}")
            assert "0xa5a5a5a5" in tail, tail
            s.gdb.sendline("detach")
            s.gdb.expect_exact("detached")
            s.gdb.sendline("quit")
            s.gdb.expect(pexpect.EOF)
        finally:
            s.gdb.close(force=True)
        f.wait(copy, 10)
        assert f.read(dst, 0, 64) == bytes(range(16)) * 4
        assert f.read(dst, 64, 4) == bytes.fromhex("a5a5a5a5")
        f.close()
        m.check_clean()
