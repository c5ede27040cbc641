"""gdb stub: jobs on the ring, job breakpoints, breakpoints qualified by address space, the
ring's thread, and the extension's `gemu break` syntax."""

from __future__ import annotations

import pytest

from gemu.device.abi import packets as pk
from gemu.device.abi import regs
from gemu.device.gdbstub import ring_jobs
from gemu.host import gdb_extension as ext
from tests.unit.device.test_gdbstub import DATA_VA, RING, rig  # noqa: F401 (the fixture)


def _append(gpu, packets: bytes) -> None:
    """Put ``packets`` after the ring's tail and ring the doorbell."""
    tail = gpu.debug_read(regs.RING_TAIL.offset)
    gpu.mem.write(RING + tail, packets)
    gpu.mmio_write(regs.RING_TAIL.offset, tail + len(packets))
    gpu.mmio_write(regs.RING_DOORBELL.offset, 1)


def test_ring_jobs_monitor_jobs_and_the_threads_name(rig):  # noqa: F811
    """The rig's ring is one job (SET_AS 1, WRITE_DATA, FENCE 5); a NOP and a second job
    (SET_AS 1, FENCE 6) follow: `monitor jobs` lists both with AS, ranges, fences and state,
    and qThreadExtraInfo / qXfer:threads name the ring after the job it runs."""
    gpu, _stub, g = rig
    _append(gpu, pk.nop() + pk.set_as(1) + pk.fence(DATA_VA + 16, 6))
    jobs = ring_jobs(gpu)
    assert [(j.seqno, j.as_index, j.state) for j in jobs] == [
        (5, 1, "halted before its first packet"),
        (6, 1, "queued"),
    ]
    assert jobs[1].start == 0x2C + 4  # the NOP after the first FENCE is not the job's
    text = g.monitor("jobs")
    assert "job 5      AS1  ring 0x1000-0x102c  no IB  fence 0x400008=5  halted before" in text, (
        text
    )
    assert "job 6      AS1  ring 0x1030-0x104c" in text, text
    assert g.call(b"s") == b"T05thread:01;"
    assert bytes.fromhex(g.call(b"qThreadExtraInfo,1").decode()) == (
        b"ring 0: job 5, AS 1, halted by the debugger"
    )
    xml = g.call(b"qXfer:threads:read::0,1000")
    assert xml.startswith(b"l") and b'name="ring 0">ring 0: job 5, AS 1, halted' in xml
    assert b"qXfer:threads:read+" in g.call(b"qSupported")


def test_break_job_and_break_next_job_stop_before_the_jobs_first_packet(rig):  # noqa: F811
    """`break-job 6` stops before job 6's SET_AS (not at the NOP padding before it), after
    job 5 ran; `break-next-job as 2` does not stop at a job of AS1; `break-job list|clear`."""
    gpu, stub, g = rig
    _append(gpu, pk.nop() + pk.set_as(1) + pk.fence(DATA_VA + 16, 6))
    assert "job 6" in g.monitor("break-job 6")
    assert g.monitor("break-job list") == "job breakpoints: 6\n"
    assert g.call(b"c") == b"T05thread:01;"
    assert stub.core_values()["pc"] == RING + 0x30
    assert gpu.mem_read(1, DATA_VA + 8, 8) == (5).to_bytes(8, "little")
    assert "job breakpoint: job 6 (AS 1) starts at ring PA 0x1030" in g.monitor("status")
    assert g.monitor("break-job list") == "job breakpoints: none\n"
    g.monitor("break-next-job as2")
    assert "next job of AS2" in g.monitor("break-job list")
    assert "removed" in g.monitor("break-job clear")
    assert "error: no address space 9" in g.monitor("break-next-job 9")


def test_a_breakpoint_qualified_by_as_hits_only_there(rig):  # noqa: F811
    """The rig's WRITE_DATA is ring PA 0x1008; a breakpoint there qualified `as 1` (an IB VA
    of AS1) does not stop the ring packet (the run stops at the FENCE's); qualified `phys`
    it does."""
    gpu, stub, g = rig
    assert "only in IBs of AS1" in g.monitor(f"break-space {RING + 8:#x} as 1")
    assert g.call(b"Z0,%x,4" % (RING + 8)) == b"OK"
    assert g.call(b"Z0,%x,4" % (RING + 0x18)) == b"OK"  # the FENCE
    assert g.call(b"c") == b"T05thread:01;"
    assert stub.core_values()["pc"] == RING + 0x18
    assert "0x1008: AS1 IB VA" in g.monitor("break-space")
    gpu.mmio_write(regs.CP_CONTROL.offset, 0)  # rewind the ring to run it again
    gpu.mmio_write(regs.CP_CONTROL.offset, regs.CP_CONTROL.field("RESET_HEAD").mask)
    gpu.mmio_write(regs.CP_CONTROL.offset, 1)
    gpu.mmio_write(regs.RING_TAIL.offset, 0x2C)
    gpu.mmio_write(regs.RING_DOORBELL.offset, 1)
    assert "only in the ring" in g.monitor(f"break-space {RING + 8:#x} phys")
    assert g.call(b"c") == b"T05thread:01;"
    assert stub.core_values()["pc"] == RING + 8
    assert "usage" in g.monitor("break-space 1")


@pytest.mark.parametrize(
    ("arg", "commands"),
    [
        ("job 41", ["monitor break-job 41"]),
        ("next-job", ["monitor break-next-job "]),
        ("next-job 2", ["monitor break-next-job 2"]),
        ("*AS1:0x100000", ["monitor break-space 0x100000 as1", "break *0x100000"]),
        ("--as 1 0x100000", ["monitor break-space 0x100000 as1", "break *0x100000"]),
        ("*ring:0x1018", ["monitor break-space 0x1018 phys", "break *0x1018"]),
        ("--phys 0x1018", ["monitor break-space 0x1018 phys", "break *0x1018"]),
    ],
)
def test_extension_break_syntax(arg, commands):
    """`gemu break` turns each form into monitor commands and gdb's breakpoint."""
    assert ext.break_commands(arg) == commands


@pytest.mark.parametrize("arg", ["", "job", "*XY:0x10", "--as 1", "0x1000"])
def test_extension_break_syntax_errors_show_the_usage(arg):
    with pytest.raises(ValueError, match="usage: gemu break job SEQNO"):
        ext.break_commands(arg)
