"""A hostile guest cannot wedge the real ``gemu device`` process.

The guest builds page tables that alias the whole VA space onto one page
(tests.support.hostile) and queues FILL, COPY and CRC32 packets of 4 GiB over them, which walk
a million pages each. While they run, register reads must be answered within the device's
stated bound (``cp.SLICE_BOUND_S``): the CPU time the device spends before answering a read is
checked against ten times the bound, and the wall-clock round trip against one second, since
a shared 2-core CI machine may not give the device a CPU for tens of milliseconds (both
figures are printed). A reset must stop the work, and the device's memory must not grow with
the packets.
With ``--coredump-dir`` set, a page table that points at itself must not hang the core writer.
"""

from __future__ import annotations

import time

from gemu.device import cp
from gemu.device.abi import packets as pk
from gemu.device.abi import regs
from gemu.device.abi.enums import CpError, CpState
from gemu.device.coredump import read_core
from gemu.host.demo import Ring
from tests.support.device import attached_client, spawn_device
from tests.support.gdb import spawn_gdb_device
from tests.support.hostile import (
    GiB4,
    alias_tables,
    bind,
    cp_state,
    cyclic_table,
    hostile_packets,
    rss_bytes,
    rtt_while,
)
from tests.unit.device.test_gdbstub import RawGdb

TABLES = 0x100000
RING = 0x10000
CRC_PA = 0x300000
ALIAS_VA = 1 << 40
RTT_LIMIT_S = 0.1  # 10x the stated bound, for the device's CPU time during one read
WALL_LIMIT_S = 1.0  # wall-clock, on a 2-core CI box shared with other jobs
RSS_GROWTH_LIMIT = 8 << 20


def test_register_reads_answered_while_aliased_4gib_packets_run():
    """FILL/COPY/CRC32 over 4 GiB of aliased pages: every register read meanwhile comes back
    within RTT_LIMIT_S, a RESET stops the work at once, and the device RSS stays flat."""
    with spawn_device(log_level="error") as dev, attached_client(dev.spec) as client:
        mem = client.memory
        bind(client, 0, alias_tables(mem, TABLES))
        ring = Ring(client, mem, base=RING, size=0x10000)
        # warm up: fill the TLB to its capacity, whose size is bounded but not small
        ring.submit(pk.fill(ALIAS_VA, 512 << 20, 0))
        assert ring.wait_idle(timeout=60) is CpState.IDLE
        rss0 = rss_bytes(dev.proc.pid)
        ring.submit(hostile_packets(ALIAS_VA, GiB4, CRC_PA, repeat=8))
        rss_peak = rss0

        def busy() -> bool:
            nonlocal rss_peak
            rss_peak = max(rss_peak, rss_bytes(dev.proc.pid))
            return cp_state(client) is CpState.RUNNING

        rtt = rtt_while(client, busy, deadline_s=1.5, pid=dev.proc.pid)
        assert rtt.worst_cpu_s < RTT_LIMIT_S, f"the device worked {rtt.worst_cpu_s * 1e3:.1f} ms"
        assert rtt.worst_s < WALL_LIMIT_S, f"a register read took {rtt.worst_s * 1e3:.1f} ms"
        assert cp_state(client) is CpState.RUNNING, "the hostile packets finished too soon"
        t0 = time.perf_counter()
        client.reset()
        reset_s = time.perf_counter() - t0
        assert cp_state(client) is CpState.STOPPED
        assert client.readl(regs.RING_HEAD.offset) == 0
        after = rtt_while(client, lambda: False, deadline_s=0, min_reads=20)
        print(
            f"\nworst register round trip {rtt.worst_s * 1e3:.2f} ms wall-clock, "
            f"{rtt.worst_cpu_s * 1e3:.2f} ms of device CPU, over {rtt.reads} reads; "
            f"reset {reset_s * 1e3:.2f} ms; RSS {rss0 >> 20} -> {rss_peak >> 20} MiB"
        )
        assert reset_s < WALL_LIMIT_S, f"the reset took {reset_s * 1e3:.1f} ms"
        assert after.worst_s < WALL_LIMIT_S
        assert rss_peak - rss0 < RSS_GROWTH_LIMIT, f"RSS grew {(rss_peak - rss0) >> 20} MiB"
        assert dev.alive()


def test_disabling_the_cp_aborts_a_sliced_packet():
    """Clearing CP_CONTROL.ENABLE while a 4 GiB aliased FILL is half done stops it: the CP
    reads STOPPED, the fence after it is never written."""
    with spawn_device(log_level="error") as dev, attached_client(dev.spec) as client:
        mem = client.memory
        bind(client, 0, alias_tables(mem, TABLES))
        ring = Ring(client, mem, base=RING, size=0x10000)
        mem.write_u64(0x2000, 0)
        ring.submit(pk.fill(ALIAS_VA, GiB4, 1) + pk.fence(0x2000, 7, phys=True))
        assert cp_state(client) is CpState.RUNNING
        client.writel(regs.CP_CONTROL.offset, 0)
        assert cp_state(client) is CpState.STOPPED
        rtt_while(client, lambda: False, deadline_s=0, min_reads=20)
        assert mem.read_u64(0x2000) == 0
        assert dev.alive()


def test_stated_bound_is_10ms():
    """The bound the device states for one slice of CP work (docs/hardware.md)."""
    assert cp.SLICE_BOUND_S == 0.010


def test_cyclic_page_table_with_cores_on_does_not_hang_the_core_writer(tmp_path):
    """A table whose entries all point at itself, then an MMU fault with --coredump-dir: the
    core file is written, bounded, and the device answers right after."""
    cores = tmp_path / "cores"
    with (
        spawn_device(None, "--coredump-dir", str(cores), log_level="error") as dev,
        attached_client(dev.spec) as client,
    ):
        mem = client.memory
        bind(client, 0, cyclic_table(mem, TABLES))
        ring = Ring(client, mem, base=RING, size=0x10000)
        ring.submit(pk.fill(ALIAS_VA, 4096, 1))
        t0 = time.perf_counter()
        state = ring.wait_idle(timeout=30)
        assert state is CpState.ERROR
        code = regs.CP_ERROR.field("CODE").ex(client.readl(regs.CP_ERROR.offset))
        assert code == CpError.MMU_FAULT
        elapsed = time.perf_counter() - t0
        assert elapsed < 5, f"the core writer took {elapsed:.1f} s"
        files = sorted(cores.glob("*.core"))
        assert len(files) == 1
        core = read_core(files[0])
        assert "MMU_FAULT" in core.reason()
        assert files[0].stat().st_size < 16 << 20  # ring (64 KiB here) + at most 8 MiB of VA
        assert dev.alive()


def test_gdb_stub_answers_while_aliased_packets_run():
    """With the hostile packets running, the gdb stub's answers (stop reason, a monitor
    command, a memory read, `monitor reset`) each come back within RTT_LIMIT_S."""
    with (
        spawn_gdb_device(wait=False) as dev,
        attached_client(dev.spec) as client,
    ):
        mem = client.memory
        bind(client, 0, alias_tables(mem, TABLES))
        ring = Ring(client, mem, base=RING, size=0x10000)
        ring.submit(hostile_packets(ALIAS_VA, GiB4, CRC_PA, repeat=8))
        assert cp_state(client) is CpState.RUNNING
        gdb = RawGdb(dev.gdb_port)
        try:
            times = []
            for payload in (b"?", b"m0,4", b"qC"):
                t0 = time.perf_counter()
                assert gdb.call(payload)
                times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            assert "device reset" in gdb.monitor("reset")
            times.append(time.perf_counter() - t0)
        finally:
            gdb.close()
        assert max(times) < WALL_LIMIT_S, [f"{t * 1e3:.1f} ms" for t in times]
        # reset: the CP is disabled and rewound (HALTED until the stub sees gdb leave)
        assert cp_state(client) in (CpState.STOPPED, CpState.HALTED)
        assert client.readl(regs.CP_CONTROL.offset) == 0
        assert client.readl(regs.RING_HEAD.offset) == 0
        assert dev.alive()
