"""Benchmarks of the device process as a machine sees it (issue 2).

- register round trip: one REG_READ to a spawned ``gemu device`` over a UNIX socket, against
  a raw socket echo of the same frame size between two Python processes (aim: <= 1.25x);
- command processor throughput: a ring full of WRITE_DATA/NOP packets in shared memory, timed
  from the doorbell until the final FENCE shows up in memory (aim: >= 100k packets/s; limit:
  an empty Python loop over as many items);
- COPY of 64 MiB between two buffers mapped through the 4-level MMU, against a memoryview
  copy of the same size (aim: >= 0.8x, issue 18; with ``GEMU_BENCH_BASELINE`` naming an earlier
  checkout, that design's COPY is measured in the same run too, see :mod:`tests.bench.baseline`);
- in-band DMA of 16 MiB over loopback TCP (debugger reads that the device serves with 1 MiB
  DMA_READs from the client, on a fresh connection), against a raw loopback TCP copy of the
  same size (aim: >= 0.05x: three copies cross the link per byte, each parsed in Python).

The round trip and its limit are measured alternately, several times, and compared by
median, because the machine is shared and a single sample of either is noisy.
"""

from __future__ import annotations

import statistics
import time

from gemu.device.abi import packets as pk
from gemu.device.abi import protocol as p
from gemu.device.abi import regs
from gemu.device.abi.client import DeviceClient
from gemu.host.demo import FrameAllocator, PageTables, Ring
from tests.bench import baseline
from tests.bench.common import (
    Row,
    empty_loop_rate,
    loopback_copy_rate,
    memoryview_copy_rate,
    socket_echo_rtt,
)
from tests.support.device import attached_client, spawn_device

_BASELINE_COPY = (
    "from tests.bench.bench_device import mmu_copy_rate\n"
    "from tests.support.device import attached_client, spawn_device\n"
    "with spawn_device(log_level='warning') as proc, "
    "attached_client(proc.spec, size={nbytes} * 2 + (4 << 20)) as dev:\n"
    "    print(mmu_copy_rate(dev, {nbytes}))"
)
REQUEST_FRAME = 16 + 8  # REG_READ header + offset, count
REPLY_FRAME = 16 + 12  # header + offset, count, value


def register_rtt(dev: DeviceClient, count: int) -> float:
    """Seconds per readl() round trip."""
    offset = regs.SCRATCH[0].offset
    readl = dev.readl
    for _ in range(count // 10):
        readl(offset)
    t0 = time.perf_counter()
    for _ in range(count):
        readl(offset)
    return (time.perf_counter() - t0) / count


def wait_u64(ram, addr: int, value: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while ram.read_u64(addr) != value:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the fence at {addr:#x} never reached {value}")
        time.sleep(0.0002)


def cp_packet_rate(dev: DeviceClient, n_packets: int) -> float:
    """Packets per second executed from a ring filled in shared memory beforehand."""
    ram = dev.memory
    fence_pa, scratch_pa = 0x1000, 0x2000
    ring_base, ring_size = 0x100000, 16 << 20
    ring = Ring(dev, ram, base=ring_base, size=ring_size)
    pair = pk.write_data(scratch_pa, [0x600DF00D], phys=True) + pk.nop()  # 2 packets
    body = pair * (n_packets // 2)
    seqno = int(time.monotonic_ns() & 0xFFFFFFFF) | 1
    ram.write_u64(fence_pa, 0)
    ring.write(body + pk.fence(fence_pa, seqno, phys=True))
    t0 = time.perf_counter()
    ring.kick()
    wait_u64(ram, fence_pa, seqno)
    return (n_packets + 1) / (time.perf_counter() - t0)


def mmu_copy_rate(dev: DeviceClient, nbytes: int) -> float:
    """Bytes per second of one COPY between two buffers mapped through AS1."""
    ram = dev.memory
    alloc = FrameAllocator(ram.size, start=0x200000)
    src_pa = alloc.take(nbytes // regs.PAGE_SIZE)
    dst_pa = alloc.take(nbytes // regs.PAGE_SIZE)
    vm = PageTables(ram, alloc)
    src_va, dst_va = 0x10_0000_0000, 0x20_0000_0000
    vm.map(src_va, src_pa, nbytes)
    vm.map(dst_va, dst_pa, nbytes, write=True)
    vm.bind(dev, 1)
    ram.buf[src_pa : src_pa + nbytes] = bytes(range(256)) * (nbytes // 256)
    ring = Ring(dev, ram, base=0x10000, size=0x10000)
    fence_pa = 0x1000
    best = float("inf")
    for seqno in (11, 12, 13):
        ring.write(
            pk.set_as(1) + pk.copy(src_va, dst_va, nbytes) + pk.fence(fence_pa, seqno, phys=True)
        )
        t0 = time.perf_counter()
        ring.kick()
        wait_u64(ram, fence_pa, seqno)
        best = min(best, time.perf_counter() - t0)
    assert ram.buf[dst_pa + nbytes - 256 : dst_pa + nbytes] == bytes(range(256))
    return nbytes / best


def inband_dma_rate(nbytes: int) -> float:
    """Bytes per second of MEM_READs of ``nbytes`` over TCP, each served by the device with
    an in-band DMA_READ, on a fresh device and connection (its buffers start small)."""
    with (
        spawn_device("tcp:127.0.0.1:0", log_level="warning") as proc,
        attached_client(proc.spec, size=nbytes) as dev,
    ):
        t0 = time.perf_counter()
        for addr in range(0, nbytes, p.MAX_DMA):
            dev.mem_read(p.SPACE_PHYS, addr, p.MAX_DMA)
        return nbytes / (time.perf_counter() - t0)


def bench(quick: bool) -> list[Row]:
    rtt_count = 5000 if quick else 20000
    reps = 3 if quick else 5
    n_packets = 50_000 if quick else 200_000
    copy_bytes = 64 << 20
    rows = []
    with (
        spawn_device(log_level="warning") as proc,
        attached_client(proc.spec, size=copy_bytes * 2 + (4 << 20)) as dev,
    ):
        ours, floor = [], []
        for _ in range(reps):
            floor.append(socket_echo_rtt(max(REQUEST_FRAME, REPLY_FRAME), count=rtt_count))
            ours.append(register_rtt(dev, rtt_count))
        rtt, echo = statistics.median(ours), statistics.median(floor)
        rows.append(
            Row(
                2,
                "device register round trip (REG_READ, unix socket)",
                rtt * 1e6,
                "us",
                "socket_echo_rtt(28 B)",
                echo * 1e6,
                "<= 1.25x",
                higher_is_better=False,
                note=f"median of {reps} alternating runs of {rtt_count}; "
                f"ours {min(ours) * 1e6:.1f}-{max(ours) * 1e6:.1f} us, "
                f"echo {min(floor) * 1e6:.1f}-{max(floor) * 1e6:.1f} us",
            )
        )
        rate = max(cp_packet_rate(dev, n_packets) for _ in range(2))
        rows.append(
            Row(
                2,
                "CP packets/s (WRITE_DATA/NOP ring, doorbell to fence)",
                rate,
                "packets/s",
                "empty_loop_rate",
                empty_loop_rate(n_packets),
                ">= 100k/s",
                note=f"{n_packets} packets, best of 2",
            )
        )
        copy = mmu_copy_rate(dev, copy_bytes)
        copy_floor = memoryview_copy_rate(copy_bytes) / 1e6
        rows.append(
            Row(
                18,
                "COPY 64 MiB through the 4-level MMU",
                copy / 1e6,
                "MB/s",
                "memoryview_copy_rate(64 MiB)",
                copy_floor,
                ">= 0.8x",
                note="doorbell to fence, best of 3",
            )
        )
    old_copy = baseline.in_checkout(_BASELINE_COPY.format(nbytes=copy_bytes))
    if old_copy is not None:
        rows.append(
            Row(
                18,
                "COPY 64 MiB through the 4-level MMU: previous design",
                old_copy / 1e6,
                "MB/s",
                "memoryview_copy_rate(64 MiB)",
                copy_floor,
                "informational: the same COPY on the baseline checkout's device",
                note=f"{baseline.ENV}={baseline.checkout()}, a device of its own, best of 3",
            )
        )
    dma_bytes = 16 << 20
    dma = inband_dma_rate(dma_bytes)
    rows.append(
        Row(
            2,
            "in-band DMA 16 MiB over TCP (MEM_READ served by DMA_READ)",
            dma / 1e6,
            "MB/s",
            "loopback_copy_rate(16 MiB)",
            loopback_copy_rate(dma_bytes) / 1e6,
            ">= 0.05x",
            note="first transfer on a fresh connection, 16 x 1 MiB",
        )
    )
    return rows


if __name__ == "__main__":
    import sys

    for row in bench("--quick" in sys.argv):
        print(
            f"{row.name}: {row.value:,.2f} {row.unit} vs {row.limit_name} "
            f"{row.limit_value:,.2f} -> {row.ratio:.2f}x (aim {row.aim}) {row.note}"
        )
