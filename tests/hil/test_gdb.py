"""The real gdb-multiarch against a spawned ``gemu device --gdb ... -S``.

A client (the test) attaches shared memory, builds AS1 page tables, an indirect buffer and a
ring job with tests.support.gdb.setup_job, while the device holds its command processor for
gdb. gdb then attaches in batch mode (``-batch -ex ...``) or interactively under pexpect.
"""

from __future__ import annotations

import re
import struct
import subprocess

import pexpect
import pytest

from gemu.device.abi import packets as pk
from gemu.device.abi import regs
from gemu.device.abi.enums import Irq
from gemu.host.cmd_gdb import EXTENSION
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

HALTED = regs.STATUS.field("HALTED").mask
IB = [
    pk.fill(DATA_VA, 0x100, 0x11223344),
    pk.write_data(DATA_VA + 0x200, [0xDEADBEEF]),
    pk.nop(2),
    pk.atomic_add(DATA_VA + 0x208, 5),
]


def _offsets(packets: list[bytes], base: int) -> list[int]:
    out, addr = [], base
    for p in packets:
        out.append(addr)
        addr += len(p)
    return out


def _values(out: str) -> list[str]:
    """The ``$N = VALUE`` results of ``print`` commands, in order."""
    return re.findall(r"^\$\d+ = (.*)$", out, re.M)


def test_registers_memory_break_step_watch_and_detach():
    """With -S nothing runs before gdb continues; registers show the CP (x0 HALTED, pc the
    first ring packet, $ring_tail) and `info registers gpu` the MMIO file; x reads GPU VAs
    through AS1; `break *` stops before an IB packet, three `stepi` advance pc by the packet
    lengths, `watch` on the fence stops after the FENCE packet, and after `detach` the device
    runs on."""
    ib_at = _offsets(IB, IB_VA)
    with spawn_gdb_device() as dev, attached_client(dev.spec, size=1 << 20) as client:
        job = setup_job(client, IB)
        ram = client.memory
        assert client.readl(regs.STATUS.offset) & HALTED
        out = gdb_batch(
            dev.gdb_port,
            "p $x0",
            "p/x $pc",
            "p/x $ring_tail",
            "info registers gpu",
            "monitor as 1",
            f"x/2xw {DATA_VA:#x}",
            f"break *{ib_at[1]:#x}",
            "continue",
            "p/x $pc",
            f"x/2xw {DATA_VA:#x}",
            "stepi",
            "p/x $pc",
            "stepi",
            "p/x $pc",
            "stepi",
            "p/x $pc",
            "delete",
            "monitor auto",
            f"watch *(long*){DATA_VA + 0x3000:#x}",
            "continue",
            "p/x $pc",
            "delete",
            "detach",
        )
        values = _values(out)
        ring_len = sum(len(p) for p in job.ring_packets)
        assert values[:3] == ["5", "0x1000", f"{ring_len:#x}"], out
        assert re.search(r"gpu_id\s+0x67656d75", out), out
        assert f"{DATA_VA:#x}:\t0x00000000\t0x00000000" in out, out
        assert f"Breakpoint 1, {ib_at[1]:#018x} in ?? ()" in out, out
        assert values[3] == f"{ib_at[1]:#x}"
        assert f"{DATA_VA:#x}:\t0x11223344\t0x11223344" in out, out
        assert values[4:7] == [f"{ib_at[2]:#x}", f"{ib_at[3]:#x}", f"{RING_BASE + 0x18:#x}"], (
            "stepi advanced pc by the lengths of WRITE_DATA, NOP and ATOMIC, leaving the IB",
            out,
        )
        assert "Old value = 0\nNew value = 7" in out, out
        fence_at = RING_BASE + ring_len - len(job.ring_packets[-1])
        assert values[7] == f"{fence_at:#x}", ("the watch stop is at the FENCE that wrote", out)
        assert "detached" in out, out
        fence = ram.read_u64(job.data_pa + 0x3000)
        for _ in range(2000):
            if fence == 7:
                break
            client.wait_irq(0.005)  # let the device finish: the detach released the hold
            fence = ram.read_u64(job.data_pa + 0x3000)
        assert fence == 7
        assert ram.read_u32(job.data_pa + 0x200) == 0xDEADBEEF
        assert not client.readl(regs.STATUS.offset) & HALTED


def test_watchpoint_stops_at_the_writing_packet():
    """`set` writes GPU memory through AS1 (an unmapped address is refused); `watch` on a
    word stops once, after the WRITE_DATA that stores it ran (old and new value shown, pc on
    that packet, as a CPU's watchpoint shows the storing instruction), not a packet later."""
    ib_at = _offsets(IB, IB_VA)
    with spawn_gdb_device() as dev, attached_client(dev.spec, size=1 << 20) as client:
        job = setup_job(client, IB)
        out = gdb_batch(
            dev.gdb_port,
            "monitor as 1",
            f"set {{int}}{DATA_VA + 0x300:#x} = 0x1234",
            f"set {{int}}{DATA_VA + 0x9000:#x} = 1",
            f"watch *(unsigned int*){DATA_VA + 0x200:#x}",
            "continue",
            "p/x $pc",
            "p $x7",
        )
        assert "Old value = 0\nNew value = 3735928559" in out, out
        assert _values(out) == [f"{ib_at[1]:#x}", "4"], out
        assert client.memory.read_u32(job.data_pa + 0x300) == 0x1234
        assert f"Cannot access memory at address {DATA_VA + 0x9000:#x}" in out, out


def test_fault_stops_with_sigsegv_and_monitor_commands():
    """A job writing an unmapped VA stops gdb with SIGSEGV at the faulting packet, which the
    gdb extension shows as a packet in `x/i` (and `gemu cp` by meaning; memory reads work
    through `gemu cache on`); `monitor fault` names the fault; ring, dis, walk, mappings and fence answer; reading an unmapped
    address is an error, not a crash."""
    bad = [pk.fill(DATA_VA, 0x10, 1), pk.fill(0x90_0000, 4, 1)]
    with spawn_gdb_device() as dev, attached_client(dev.spec, size=1 << 20) as client:
        setup_job(client, bad)
        out = gdb_batch(
            dev.gdb_port,
            f"source {EXTENSION}",
            "monitor ring",
            "monitor as 1",
            f"monitor dis {IB_VA:#x} 2",
            "monitor auto",
            "continue",
            "p/x $pc",
            "x/2i $pc",
            "gemu cp",
            "gemu cache on",
            f"x/2xw {DATA_VA:#x}",
            "monitor fault",
            f"monitor walk {DATA_VA:#x}",
            "monitor mappings",
            "monitor fence",
            "x/xw 0x900000",
            "p $x4",
        )
        assert "Program received signal SIGSEGV" in out, out
        fault_pc = IB_VA + len(bad[0])
        assert _values(out)[0] == f"{fault_pc:#x}", out
        assert f"=> {fault_pc:#x}:\tFILL 0x900000, size=0x4, value=0x1" in out, out
        assert f"{fault_pc + 4:#x}:\t  .dword 0x00900000  ; FILL +0x4" in out, out
        assert f"CP ERROR, pc {fault_pc:#x} (IB GPU VA), AS1" in out, out
        assert "CP_ERROR MMU_FAULT" in out, out
        assert f"{DATA_VA:#x}:\t0x00000001\t0x00000001" in out, out
        assert "AS1 TRANSLATION_L2 on WRITE at GPU VA 0x900000 by FILL" in out, out
        assert "INDIRECT_BUFFER 0x200000, 10 dwords" in out, out
        assert "FILL 0x900000, size=0x4, value=0x1" in out, out
        assert "=> PA" in out and "AS1: 2 mapped range(s)" in out, out
        assert "Cannot access memory at address 0x900000" in out, out
        assert client.readl(regs.STATUS.offset) & regs.STATUS.field("CP_ERROR").mask


def test_interactive_session_ctrl_c_and_continue():
    """Interactive gdb under pexpect: continue on an idle ring, Ctrl-C halts it (SIGINT), the
    guest sees STATUS.HALTED meanwhile; a job submitted while halted does not run until gdb
    continues (`display/i $pc` with the extension follows a `stepi` through it), then runs to
    its fence."""
    with spawn_gdb_device() as dev, attached_client(dev.spec, size=1 << 20) as client:
        job = setup_job(client, IB, submit=False)
        gdb = pexpect.spawn(GDB, ["-nx", "-q"], encoding="utf-8", timeout=30)
        try:
            gdb.expect_exact("(gdb) ")
            gdb.sendline("set pagination off")
            gdb.expect_exact("(gdb) ")
            gdb.sendline("set style enabled off")
            gdb.expect_exact("(gdb) ")
            gdb.sendline(f"target remote 127.0.0.1:{dev.gdb_port}")
            gdb.expect_exact("(gdb) ")
            gdb.sendline("continue")
            gdb.expect_exact("Continuing.")
            gdb.sendintr()
            gdb.expect("received signal SIGINT")
            gdb.expect_exact("(gdb) ")
            assert client.readl(regs.STATUS.offset) & HALTED
            job.ring.submit(b"".join(job.ring_packets))
            gdb.sendline("p $x7")
            gdb.expect(r"\$1 = 0")
            gdb.expect_exact("(gdb) ")
            gdb.sendline("monitor ring 1")
            gdb.expect_exact("SET_AS as=1")
            gdb.expect_exact("(gdb) ")
            gdb.sendline(f"source {EXTENSION}")
            gdb.expect_exact("(gdb) ")
            gdb.sendline("display/i $pc")
            gdb.expect_exact("1: x/i $pc\r\n=> 0x1000:\tSET_AS as=1")
            gdb.expect_exact("(gdb) ")
            gdb.sendline("stepi")
            gdb.expect_exact(f"=> 0x1008:\tINDIRECT_BUFFER 0x200000, {len(job.ib) // 4} dwords")
            gdb.expect_exact("(gdb) ")
            gdb.sendline("detach")
            gdb.expect_exact("detached")
            gdb.sendline("quit")
            gdb.expect(pexpect.EOF)
        finally:
            gdb.close(force=True)
        ram = client.memory
        for _ in range(2000):
            if ram.read_u64(job.data_pa + 0x3000) == 7:
                break
            client.wait_irq(0.005)
        assert ram.read_u64(job.data_pa + 0x3000) == 7
        assert struct.unpack("<I", ram.read(job.data_pa + 0x200, 4))[0] == 0xDEADBEEF


@pytest.mark.parametrize("opt", ["-S"])
def test_dash_s_needs_gdb(opt, capsys):
    """`gemu device -S` without --gdb is refused with a message that says why."""
    from gemu.host.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["device", "--listen", "tcp:127.0.0.1:0", opt])
    assert exc.value.code == 2
    assert "-S: needs --gdb" in capsys.readouterr().err


def test_core_file_of_a_faulting_job(tmp_path):
    """With --coredump-dir (and no gdb attached) a faulting job leaves a core file:
    `gemu coredump` summarises it and `gdb-multiarch -c` opens it with pc on the failing
    packet (decoded by the extension) and the job's GPU memory readable."""
    bad = [pk.fill(DATA_VA, 0x10, 0x5A5A5A5A), pk.fill(0x90_0000, 4, 1)]
    cores = tmp_path / "cores"
    with (
        spawn_gdb_device("--coredump-dir", str(cores), wait=False) as dev,
        attached_client(dev.spec, size=1 << 20) as client,
    ):
        client.writel(regs.IRQ_MASK.offset, int(Irq.CP_ERROR))
        setup_job(client, bad)
        event = client.wait_irq(timeout=20)  # the core is written before the IRQ goes out
        assert event is not None and event.irq_status & Irq.CP_ERROR
    (core,) = cores.iterdir()
    summary = subprocess.run(
        [*gemu_executable(), "coredump", str(core)], capture_output=True, text=True, check=True
    ).stdout
    fault_pc = IB_VA + len(bad[0])
    assert "MMU_FAULT at IB VA" in summary and f"pc:      {fault_pc:#x}" in summary, summary
    out = subprocess.run(
        [GDB, "-nx", "-batch", "-ex", f"source {EXTENSION}", "-c", str(core)]
        + ["-ex", "p/x $pc", "-ex", "x/i $pc", "-ex", f"x/2xw {DATA_VA:#x}"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert "Program terminated with signal SIGSEGV" in out, out
    assert _values(out) == [f"{fault_pc:#x}"], out
    assert "FILL 0x900000, size=0x4, value=0x1" in out, out
    assert f"{DATA_VA:#x}:\t0x5a5a5a5a\t0x5a5a5a5a" in out, out
