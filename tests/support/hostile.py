"""A hostile guest for the device process: page tables built to make the device work hard.

- :func:`alias_tables`: four tables whose every entry points at the next one and a level-3
  table whose every entry maps one data page, so the whole 256 TiB VA space (and any 4 GiB
  range of it) aliases onto that one page. A FILL, COPY or CRC32 over 4 GiB then walks a
  million pages while moving only 4 KiB of distinct memory;
- :func:`cyclic_table`: one table whose every entry points at itself, a walk that never
  reaches a page unless the walker notices it came back;
- :func:`hostile_packets`: the worst packets over an aliased AS;
- :func:`rtt_while`: the longest register round trip while a condition holds (wall-clock and
  the device's CPU time);
- :func:`rss_bytes`: a process's resident set size; :func:`oncpu_ns`: its CPU time.

Used by the responsiveness and core-file tests (tests/hil), the fuzzer and ``make bench``::

    root = alias_tables(client.memory, 0x100000)
    bind(client, 0, root)
    ring = Ring(client, client.memory, base=0x10000, size=0x10000)
    ring.submit(hostile_packets(0x1_0000_0000, GiB4, 0x200000))
    rtt = rtt_while(client, lambda: busy(client), deadline_s=1.0, pid=device_pid)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from gemu.device.abi import packets as pk
from gemu.device.abi import pte, regs
from gemu.device.abi.client import DeviceClient
from gemu.device.abi.enums import CpState, MmuCommand, PteType, TransCfgMode

GiB4 = (1 << 32) - (1 << 12)  # the largest page-multiple SIZE a packet can carry (u32)
TABLE_BYTES = pte.ENTRIES_PER_TABLE * pte.ENTRY_SIZE
_STATE = regs.CP_STATUS.field("STATE")


def alias_tables(mem, base: int) -> int:
    """Write the aliasing tables at ``[base, base + 5 pages)``; return the root (level 0).

    Levels 0-2 are one table each, every entry a TABLE entry to the next level; the level-3
    table maps every entry to the data page at ``base + 4 pages`` (RW)."""
    tables = [base + i * TABLE_BYTES for i in range(pte.LEVELS)]
    data = base + pte.LEVELS * TABLE_BYTES
    for level, table in enumerate(tables):
        if level < pte.LEVELS - 1:
            entry = pte.make(tables[level + 1], PteType.TABLE)
        else:
            entry = pte.make(data, PteType.PAGE, read=True, write=True, exec=True)
        mem.write(table, entry.to_bytes(8, "little") * pte.ENTRIES_PER_TABLE)
    mem.write(data, bytes(TABLE_BYTES))
    return tables[0]


def cyclic_table(mem, base: int) -> int:
    """Write one table at ``base`` whose every entry is a TABLE entry to itself."""
    entry = pte.make(base, PteType.TABLE)
    mem.write(base, entry.to_bytes(8, "little") * pte.ENTRIES_PER_TABLE)
    return base


def bind(client: DeviceClient, as_index: int, root: int) -> None:
    """Point AS ``as_index`` at ``root`` and latch it (AS_COMMAND = UPDATE)."""
    client.writel(regs.as_reg(as_index, "TRANSTAB_LO").offset, root & 0xFFFFFFFF)
    client.writel(regs.as_reg(as_index, "TRANSTAB_HI").offset, root >> 32)
    client.writel(regs.as_reg(as_index, "TRANSCFG").offset, TransCfgMode.PT_4LEVEL)
    client.writel(regs.as_reg(as_index, "COMMAND").offset, MmuCommand.UPDATE)


def hostile_packets(va: int, size: int, crc_dst: int, repeat: int = 1) -> bytes:
    """FILL, COPY and CRC32 of ``size`` bytes at ``va`` (an aliased range of the current AS),
    ``repeat`` times."""
    one = pk.fill(va, size, 0xA5A5A5A5) + pk.copy(va, va + size, size) + pk.crc32(va, size, crc_dst)
    return one * repeat


def cp_state(client: DeviceClient) -> CpState:
    return CpState(_STATE.ex(client.readl(regs.CP_STATUS.offset)))


@dataclass
class Rtt:
    """Register round trips measured by :func:`rtt_while`."""

    worst_s: float  # the longest, wall-clock
    worst_cpu_s: float  # the most CPU time the device ran during one of them
    reads: int


def rtt_while(
    client: DeviceClient,
    busy: Callable[[], bool],
    *,
    deadline_s: float,
    min_reads: int = 50,
    pid: int | None = None,
) -> Rtt:
    """Read SCRATCH0 back to back until ``busy()`` is false (checked between reads) or
    ``deadline_s`` passed (after at least ``min_reads`` reads). With the device's ``pid``, each
    read is also measured as the CPU time the device ran meanwhile: its own work, without the
    time it waited for a CPU on a shared machine."""
    offset = regs.SCRATCH[0].offset
    readl = client.readl
    out = Rtt(0.0, 0.0, 0)
    end = time.monotonic() + deadline_s
    while out.reads < min_reads or (time.monotonic() < end and busy()):
        c0 = oncpu_ns(pid) if pid is not None else 0
        t0 = time.perf_counter()
        readl(offset)
        out.worst_s = max(out.worst_s, time.perf_counter() - t0)
        if pid is not None:
            out.worst_cpu_s = max(out.worst_cpu_s, (oncpu_ns(pid) - c0) / 1e9)
        out.reads += 1
        if out.reads >= 1_000_000:  # a bound of its own, whatever the clock does
            break
    return out


def oncpu_ns(pid: int) -> int:
    """Nanoseconds process ``pid``'s main thread has run on a CPU (/proc/PID/schedstat): the
    device's own work in an interval, without the time it waited for a CPU on a busy machine."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (VmRSS in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")
