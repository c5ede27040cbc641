"""The device's event loop under a hostile guest (issue 11).

The guest aliases the whole VA space onto one page (tests.support.hostile) and queues FILL,
COPY and CRC32 packets of 4 GiB each, a million page walks apiece. While they run, a client
reads a register back to back; the worst round trip is the longest the event loop was kept
from answering. It is set against the register round trip of the same device idle, measured
in the same run (the ratio says how many idle round trips the worst stall is worth). Aim: the
worst round trip within the device's stated bound (``regs.RESPONSE_BOUND_MS``, 10 ms).
"""

from __future__ import annotations

import gc
import statistics
import time

from gemu.device.abi import regs
from gemu.device.abi.enums import CpState
from gemu.host.demo import Ring
from tests.bench.common import Row
from tests.support.device import attached_client, spawn_device
from tests.support.hostile import (
    GiB4,
    alias_tables,
    bind,
    cp_state,
    hostile_packets,
    rss_bytes,
    rtt_while,
)

TABLES = 0x100000
RING = 0x10000
ALIAS_VA = 1 << 40


def idle_rtt(client, count: int) -> float:
    """Median seconds per register read of the idle device (5 runs of ``count``)."""
    offset = regs.SCRATCH[0].offset
    readl = client.readl
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(count):
            readl(offset)
        samples.append((time.perf_counter() - t0) / count)
    return statistics.median(samples)


def slice_cpu_times(slices: int) -> list[float]:
    """Thread CPU seconds of each of ``slices`` CP slices (``Gpu.run(BATCH)``) over the same
    hostile packets, in this process: what the device itself spends per slice, without the
    scheduling noise of a shared machine."""
    from gemu.device.abi.enums import MmuCommand, TransCfgMode
    from gemu.device.server import BATCH
    from tests.support.device_rig import Rig

    rig = Rig(stepped=False)
    rig.start_ring(size=0x10000)
    rig.was(0, "TRANSTAB_LO", alias_tables(rig.mem, 0x800000))
    rig.was(0, "TRANSCFG", TransCfgMode.PT_4LEVEL)
    rig.mmu(0, MmuCommand.UPDATE)
    rig.submit(hostile_packets(ALIAS_VA, GiB4, 0x300000, repeat=8))
    out = []
    # the heap of the benchmarks that ran before is not the device's: keep the collector off it
    gc.collect()
    gc.freeze()
    try:
        for _ in range(slices):
            t0 = time.thread_time()
            rig.gpu.run(BATCH)
            out.append(time.thread_time() - t0)
    finally:
        gc.unfreeze()
    return out


def bench(quick: bool) -> list[Row]:
    seconds = 1.0 if quick else 4.0
    with spawn_device(log_level="error") as dev, attached_client(dev.spec) as client:
        mem = client.memory
        bind(client, 0, alias_tables(mem, TABLES))
        ring = Ring(client, mem, base=RING, size=0x10000)
        idle = idle_rtt(client, 2000 if quick else 10000)
        rss0 = rss_bytes(dev.proc.pid)
        ring.submit(hostile_packets(ALIAS_VA, GiB4, 0x300000, repeat=8))
        rtt = rtt_while(
            client,
            lambda: cp_state(client) is CpState.RUNNING,
            deadline_s=seconds,
            pid=dev.proc.pid,
        )
        worst, reads = rtt.worst_s, rtt.reads
        busy_after = cp_state(client) is CpState.RUNNING
        rss1 = rss_bytes(dev.proc.pid)
        t0 = time.perf_counter()
        client.reset()
        reset_s = time.perf_counter() - t0
    mean_under_load = seconds / max(reads, 1)
    cpu = sorted(slice_cpu_times(500 if quick else 3000))
    return [
        Row(
            11,
            "worst register round trip, hostile guest (aliased 4 GiB FILL/COPY/CRC32)",
            worst * 1e6,
            "us",
            "register round trip, idle device",
            idle * 1e6,
            f"<= {regs.RESPONSE_BOUND_MS} ms",
            higher_is_better=False,
            note=(
                f"{reads} reads over {seconds:.0f} s while 24 packets of 4 GiB ran "
                f"(still running at the end: {busy_after}); mean round trip under load "
                f"{mean_under_load * 1e3:.2f} ms; the device's CPU time during one read at "
                f"most {rtt.worst_cpu_s * 1e3:.2f} ms; RESET under load {reset_s * 1e3:.2f} ms; "
                f"device RSS {rss0 >> 20} -> {rss1 >> 20} MiB"
            ),
        ),
        Row(
            11,
            "longest CP slice (thread CPU time), same hostile packets",
            cpu[-1] * 1e6,
            "us",
            "the stated response bound",
            regs.RESPONSE_BOUND_MS * 1e3,
            "<= 1x",
            higher_is_better=False,
            note=(
                f"{len(cpu)} slices of Gpu.run(BATCH) in-process; median "
                f"{cpu[len(cpu) // 2] * 1e3:.2f} ms, 99th percentile "
                f"{cpu[int(len(cpu) * 0.99)] * 1e3:.2f} ms (the wall-clock round trip above "
                "adds the scheduling of a shared machine)"
            ),
        ),
    ]
