"""DOC: ``gemu demo``: a curated emulator run, and the device-level tour.

``gemu demo`` (:func:`run_curated`) boots one machine and runs a curated set of the example
job scripts (examples/jobs: one copy, the validation sequence, purgeable BOs, a GPU fault, a
working set three times guest RAM, a hang, concurrent task blocks), then a second machine in
driver mode vm-bind for the VM_BIND flavour's larger-than-RAM script (three VMs sharing BOs,
evicted per VM and revalidated by exec), with progress, then prints a summary: jobs run,
bytes moved, evictions, swap-ins, purges, faults handled, checks passed.

``gemu demo --device-tour`` (:func:`main`) drives the GPU the way a driver does, with no guest
kernel: it spawns
``gemu device`` on a temporary UNIX socket, attaches a :class:`SharedMemory` as guest RAM,
writes 4-level page tables for two address spaces straight into that memory, sets up the
command ring and runs jobs: FILL, COPY, CRC32 (checked against zlib on the CPU), ATOMIC,
FENCE with an interrupt, a WAIT_MEM released by the CPU, a job that faults on an unmapped
address (decoded FAULTSTATUS, then CP_CONTROL.RESUME) and a job that still succeeds after it.

The building blocks are reusable (tests and benchmarks use them)::

    ram = SharedMemory(64 << 20)
    dev.attach_memory(ram)
    alloc = FrameAllocator(ram.size, start=1 << 20)
    vm = PageTables(ram, alloc)
    vm.map(0x10_0000, alloc.take(16), 16 * PAGE_SIZE, write=True)
    vm.bind(dev, as_index=1)
    ring = Ring(dev, ram, base=0x1000, size=0x10000)
    ring.submit(pk.set_as(1) + pk.fence(0x10_0000, 1, irq=True))
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gemu.device.abi import packets as pk
from gemu.device.abi import pte, regs
from gemu.device.abi.client import DeviceClient, IrqEvent, SharedMemory
from gemu.device.abi.enums import (
    AccessType,
    CpError,
    CpState,
    Irq,
    MmuCommand,
    MmuFault,
    TransCfgMode,
)
from gemu.device.abi.regs import PAGE_SIZE

READY_PREFIX = "gemu-device: listening on "


class FrameAllocator:
    """Hands out 4 KiB frames of guest memory, bump style (the demo never frees)."""

    def __init__(self, size: int, start: int = 0) -> None:
        self.size = size
        self.next = start

    def take(self, pages: int = 1) -> int:
        pa = self.next
        if pa + pages * PAGE_SIZE > self.size:
            raise MemoryError(f"guest memory exhausted ({self.size:#x} bytes)")
        self.next += pages * PAGE_SIZE
        return pa


class PageTables:
    """A 4-level GPU page table written directly into shared guest memory."""

    def __init__(self, ram: SharedMemory, alloc: FrameAllocator) -> None:
        self.ram = ram
        self.alloc = alloc
        self.root = self._new_table()

    def _new_table(self) -> int:
        pa = self.alloc.take()
        self.ram.buf[pa : pa + PAGE_SIZE] = bytes(PAGE_SIZE)
        return pa

    def map(self, va: int, pa: int, size: int, *, write: bool = False, exec: bool = False) -> None:
        """Map ``size`` bytes at GPU ``va`` to guest-physical ``pa`` (readable always)."""
        for off in range(0, size, PAGE_SIZE):
            table = self.root
            for level in range(pte.LEVELS - 1):
                slot = table + pte.index(va + off, level) * pte.ENTRY_SIZE
                entry = self.ram.read_u64(slot)
                if not entry & pte.VALID:
                    entry = pte.make(self._new_table(), pte.PteType.TABLE)
                    self.ram.write_u64(slot, entry)
                table = pte.address(entry)
            slot = table + pte.index(va + off, pte.LEVELS - 1) * pte.ENTRY_SIZE
            self.ram.write_u64(
                slot, pte.make(pa + off, pte.PteType.PAGE, read=True, write=write, exec=exec)
            )

    def bind(self, dev: DeviceClient, as_index: int) -> None:
        """Point AS ``as_index`` at this table and latch it (AS_COMMAND = UPDATE)."""
        dev.writel(regs.as_reg(as_index, "TRANSTAB_LO").offset, self.root & 0xFFFFFFFF)
        dev.writel(regs.as_reg(as_index, "TRANSTAB_HI").offset, self.root >> 32)
        dev.writel(regs.as_reg(as_index, "TRANSCFG").offset, TransCfgMode.PT_4LEVEL)
        dev.writel(regs.as_reg(as_index, "COMMAND").offset, MmuCommand.UPDATE)


class Ring:
    """The command ring in guest memory: write packets at the tail, ring the doorbell."""

    def __init__(self, dev: DeviceClient, ram: SharedMemory, base: int, size: int) -> None:
        self.dev = dev
        self.ram = ram
        self.base = base
        self.size = size
        self.tail = 0
        ram.buf[base : base + size] = bytes(size)
        dev.writel(regs.CP_CONTROL.offset, 0)
        dev.writel(regs.CP_CONTROL.offset, 1 << 2)  # RESET_HEAD
        dev.writel(regs.RING_BASE_LO.offset, base & 0xFFFFFFFF)
        dev.writel(regs.RING_BASE_HI.offset, base >> 32)
        dev.writel(regs.RING_SIZE.offset, size)
        dev.writel(regs.CP_CONTROL.offset, 1)  # ENABLE

    def write(self, packets: bytes) -> None:
        """Copy packets at the tail (wrapping) without telling the device."""
        if len(packets) >= self.size:
            raise ValueError(f"{len(packets)} bytes of packets do not fit a {self.size}-byte ring")
        first = min(len(packets), self.size - self.tail)
        start = self.base + self.tail
        self.ram.buf[start : start + first] = packets[:first]
        if first < len(packets):
            self.ram.buf[self.base : self.base + len(packets) - first] = packets[first:]
        self.tail = (self.tail + len(packets)) % self.size

    def kick(self) -> None:
        """Publish the tail and ring the doorbell (two posted writes)."""
        self.dev.writel_posted(regs.RING_TAIL.offset, self.tail)
        self.dev.writel_posted(regs.RING_DOORBELL.offset, 1)

    def submit(self, packets: bytes) -> None:
        self.write(packets)
        self.kick()

    def wait_idle(self, timeout: float = 10.0) -> CpState:
        """Poll until the CP is no longer busy; returns the final state."""
        deadline = time.monotonic() + timeout
        field_ = regs.CP_STATUS.field("STATE")
        while True:
            state = CpState(field_.ex(self.dev.readl(regs.CP_STATUS.offset)))
            if state not in (CpState.RUNNING, CpState.WAITING) and (
                state is not CpState.IDLE or self.dev.readl(regs.RING_HEAD.offset) == self.tail
            ):
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"the CP is still {state.name} after {timeout} s")
            self.dev.wait_irq(0.001)


def decode_faultstatus(value: int) -> str:
    """AS_FAULTSTATUS in words, e.g. ``TRANSLATION_L3 on WRITE by FILL``."""
    fs = regs.AS_TEMPLATE[6]
    exc = fs.fields[0].ex(value)
    access = fs.fields[1].ex(value)
    source = fs.fields[2].ex(value)
    try:
        exc_name = MmuFault(exc).name
    except ValueError:
        exc_name = f"{exc:#x}"
    try:
        op = pk.Opcode(source).name
    except ValueError:
        op = f"opcode {source:#x}"
    return f"{exc_name} on {AccessType(access).name} by {op}"


@contextlib.contextmanager
def spawn_device(*args: str, timeout: float = 20.0) -> Iterator[str]:
    """Run ``gemu device`` on a temporary UNIX socket; yield its spec."""
    with tempfile.TemporaryDirectory(prefix="gemu-demo-") as tmp:
        spec = f"unix:{tmp}/device.sock"
        proc = subprocess.Popen(
            [sys.executable, "-m", "gemu.host", "device", "--listen", spec, *args],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        try:
            line = _read_line(proc, timeout)
            if not line.startswith(READY_PREFIX):
                raise RuntimeError(f"gemu device did not start: {line!r}")
            yield line[len(READY_PREFIX) :].strip()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise RuntimeError(f"gemu device printed nothing within {timeout} s")
    return proc.stdout.readline().decode(errors="replace")


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    jobs: int = 0
    bytes_moved: int = 0
    irqs: list[IrqEvent] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)

    def say(self, text: str) -> None:
        self.lines.append(text)
        print(text, flush=True)


def run_demo(dev: DeviceClient, ram: SharedMemory) -> Report:
    """Program the device and run the demo jobs; return what happened."""
    rep = Report()
    dev.writel(regs.IRQ_MASK.offset, int(Irq.FENCE | Irq.CP_ERROR | Irq.MMU))
    dev.writel(regs.MMU_INT_MASK.offset, 0xFFFFFFFF)
    alloc = FrameAllocator(ram.size, start=1 << 20)
    ring = Ring(dev, ram, base=0x1000, size=0x10000)

    # two address spaces: AS1 has a 1 MiB buffer + a fence page; AS2 maps the same buffer
    # read-only at another VA and has its own scratch page
    buf_pa = alloc.take(256)
    fence_pa = alloc.take(1)
    scratch_pa = alloc.take(1)
    ib_pa = alloc.take(4)
    vm1, vm2 = PageTables(ram, alloc), PageTables(ram, alloc)
    BUF, FENCE, IB = 0x4000_0000, 0x7000_0000, 0x8000_0000
    vm1.map(BUF, buf_pa, 256 * PAGE_SIZE, write=True)
    vm1.map(FENCE, fence_pa, PAGE_SIZE, write=True)
    vm1.map(IB, ib_pa, 4 * PAGE_SIZE, exec=True)
    vm2.map(0x1_0000_0000, buf_pa, 256 * PAGE_SIZE)
    vm2.map(FENCE, scratch_pa, PAGE_SIZE, write=True)
    vm2.map(IB, ib_pa, 4 * PAGE_SIZE, exec=True)
    vm1.bind(dev, 1)
    vm2.bind(dev, 2)
    rep.say(
        f"guest RAM {ram.size >> 20} MiB; AS1 and AS2 page tables at {vm1.root:#x} and "
        f"{vm2.root:#x} ({(alloc.next - (1 << 20)) // PAGE_SIZE} frames used)"
    )
    seqno = 0
    t0 = time.perf_counter()
    packets_before = dev.readl(regs.CP_PACKETS.offset)

    def job(name: str, body: bytes, *, as_index: int = 1, irq: bool = True) -> None:
        nonlocal seqno
        seqno += 1
        ram.write(ib_pa, body)
        ring.submit(
            pk.set_as(as_index)
            + pk.indirect_buffer(IB, len(body) // 4)
            + pk.set_as(1)
            + pk.fence(FENCE, seqno, irq=irq)
        )
        rep.jobs += 1
        state = ring.wait_idle()
        dev.writel(regs.IRQ_CLEAR.offset, int(Irq.FENCE))  # the interrupt handler's ack
        done = ram.read_u64(fence_pa)
        rep.say(f"  job {seqno:2} {name:<44} fence={done} cp={state.name}")

    rep.say("jobs:")
    job("FILL 1 MiB with 0xA5A5A5A5", pk.fill(BUF, 1 << 20, 0xA5A5A5A5))
    rep.bytes_moved += 1 << 20
    pattern = bytes(range(256)) * 16
    ram.write(buf_pa, pattern)
    job("COPY 4 KiB inside the buffer", pk.copy(BUF, BUF + 0x8_0000, 4096))
    rep.bytes_moved += 4096
    assert ram.read(buf_pa + 0x8_0000, 4096) == pattern, "COPY result differs"
    job(
        "CRC32 of 64 KiB (AS2, read-only view)",
        pk.crc32(0x1_0000_0000, 0x1_0000, FENCE + 64),
        as_index=2,
    )
    rep.bytes_moved += 0x1_0000
    want = zlib.crc32(ram.read(buf_pa, 0x1_0000))
    got = ram.read_u32(scratch_pa + 64)
    rep.say(
        f"         CRC32 {got:#010x}, zlib says {want:#010x}: {'ok' if got == want else 'MISMATCH'}"
    )
    ram.write_u64(fence_pa + 8, 40)
    job("ATOMIC add 2 to a counter of 40", pk.atomic_add(FENCE + 8, 2))
    rep.say(f"         counter is now {ram.read_u64(fence_pa + 8)}")

    # WAIT_MEM: the CP waits until the CPU writes a flag
    seqno += 1
    ram.write_u32(fence_pa + 16, 0)
    ring.submit(pk.set_as(1) + pk.wait_mem(FENCE + 16, 1) + pk.fence(FENCE, seqno, irq=True))
    rep.jobs += 1
    time.sleep(0.02)
    state = CpState(regs.CP_STATUS.field("STATE").ex(dev.readl(regs.CP_STATUS.offset)))
    ram.write_u32(fence_pa + 16, 1)
    state_after = ring.wait_idle()
    dev.writel(regs.IRQ_CLEAR.offset, int(Irq.FENCE))
    rep.say(
        f"  job {seqno:2} {'WAIT_MEM on a flag the CPU sets later':<44} "
        f"fence={ram.read_u64(fence_pa)} cp={state.name} then {state_after.name}"
    )

    # a faulting job: FILL to an unmapped VA, then RESUME
    seqno += 1
    bad_va = 0x5000_0000
    ram.write(ib_pa, pk.fill(bad_va, 4096, 0))
    ring.submit(pk.set_as(1) + pk.indirect_buffer(IB, 5) + pk.fence(FENCE, seqno, irq=True))
    rep.jobs += 1
    state = ring.wait_idle()
    fs = dev.readl(regs.as_reg(1, "FAULTSTATUS").offset)
    fa = dev.readl(regs.as_reg(1, "FAULTADDRESS_LO").offset) | (
        dev.readl(regs.as_reg(1, "FAULTADDRESS_HI").offset) << 32
    )
    cp_error = CpError(regs.CP_ERROR.field("CODE").ex(dev.readl(regs.CP_ERROR.offset)))
    fault = f"AS1 {decode_faultstatus(fs)} at {fa:#x} (CP_ERROR {cp_error.name})"
    rep.faults.append(fault)
    rep.say(f"  job {seqno:2} {'FILL at an unmapped VA':<44} cp={state.name}: {fault}")
    dev.writel(regs.MMU_INT_CLEAR.offset, 1 << 1)
    dev.writel(regs.IRQ_CLEAR.offset, int(Irq.CP_ERROR | Irq.FENCE))
    dev.writel(regs.CP_CONTROL.offset, 1 | 1 << 1)  # ENABLE | RESUME
    state = ring.wait_idle()
    rep.say(f"         RESUME: cp={state.name}, fence={ram.read_u64(fence_pa)}")
    job("FILL after the fault still works", pk.fill(BUF, 4096, 0x12345678))
    rep.bytes_moved += 4096
    ok = ram.read(buf_pa, 8) == bytes.fromhex("7856341278563412")
    rep.say(f"         buffer starts with 0x12345678: {'ok' if ok else 'WRONG'}")

    elapsed = time.perf_counter() - t0
    packets = dev.readl(regs.CP_PACKETS.offset) - packets_before
    rep.irqs = dev.drain_irqs()
    raised = sum(1 for e in rep.irqs if e.level)
    rep.say("summary:")
    rep.say(f"  jobs         {rep.jobs} ({seqno} fences written)")
    rep.say(
        f"  packets      {packets} in {elapsed * 1e3:.1f} ms ({packets / elapsed:,.0f} packets/s)"
    )
    rep.say(f"  bytes moved  {rep.bytes_moved:,} by FILL/COPY/CRC32")
    rep.say(f"  IRQ messages {len(rep.irqs)} ({raised} with the line raised)")
    rep.say(f"  faults       {len(rep.faults)}: " + "; ".join(rep.faults))
    return rep


def main(*, memory_mib: int = 64, device: str | None = None) -> int:
    ram = SharedMemory(memory_mib << 20)
    try:
        with contextlib.ExitStack() as stack:
            spec = device or stack.enter_context(spawn_device("--log", "warning"))
            dev = DeviceClient.connect(spec, name="gemu-demo")
            stack.callback(dev.close)
            how = dev.attach_memory(ram)
            print(f"device {dev.device_name} at {spec}, guest memory attached by {how}")
            dev.reset()
            run_demo(dev, ram)
    finally:
        ram.close()
    return 0


# --- the curated run of ``gemu demo`` -------------------------------------------------------

CURATED = ("hello", "validation", "purgeable", "fault", "pressure", "hang", "tasks")
"""Example job scripts ``gemu demo`` runs, in order, on one fresh machine (driver mode per-bo)."""

CURATED_VM_BIND = ("vm-bind/larger-than-ram",)
"""Example job scripts of the VM_BIND flavour ``gemu demo`` runs afterwards, on a second
machine booted in driver mode vm-bind."""


def examples_dir() -> Path:
    """examples/jobs of the source tree (the demo runs from a checkout)."""
    return Path(__file__).resolve().parent.parent / "examples" / "jobs"


def header(path: Path) -> str:
    """The comment block a job script opens with, as one line: the prose lines up to the
    first indented (usage) line, blank line or command."""
    words = []
    for line in path.read_text().splitlines():
        if not line.startswith("#") or line.startswith(("#  ", "#\t")) or not line[1:].strip():
            break
        words.append(line[1:].strip())
    return " ".join(words)


def title(path: Path) -> str:
    """A script's title for progress lines: the first sentence (or clause up to ``;``) of
    its header, without the ``name:`` prefix; the file's stem when it has no header."""
    text = header(path)
    if not text:
        return path.stem
    name, sep, rest = text.partition(": ")
    if sep and " " not in name:
        text = rest
    return re.split(r"(?<=[^.]{2})[.;](?:\s|$)", text, maxsplit=1)[0].strip()


_DELTAS = (
    ("gpu", "jobs_emitted"),
    ("shrinker", "evicted"),
    ("shrinker", "swapped_in"),
    ("shrinker", "purged"),
    ("gpu", "mmu_faults"),
    ("gpu", "resets"),
)


def _count(stats: dict, group: str, key: str) -> int:
    return stats.get(group, {}).get(key, 0)


def run_curated(
    *,
    ram_size: int = 16 << 20,
    swap_size: int = 64 << 20,
    device: str = "spawn",
    scripts: tuple[str, ...] = CURATED,
    vm_bind_scripts: tuple[str, ...] = CURATED_VM_BIND,
    out=print,
) -> int:
    """Boot a machine, run the curated job scripts with progress; then boot a second one in
    driver mode vm-bind for the VM_BIND scripts; print a summary of both.

    Returns 0 when every script passed and nothing unexpected happened, 3 when the device
    was lost, else 1."""
    from gemu.guest import errors
    from gemu.host.machine import DRIVER_MODES, Machine, format_size
    from gemu.host.shell import DeviceLost, Shell

    errors.set_strict(False)
    t0 = time.perf_counter()
    phases = [
        (mode, names)
        for mode, names in (("per-bo", scripts), ("vm-bind", vm_bind_scripts))
        if names
    ]
    total = sum(len(names) for _, names in phases)
    failed: list[str] = []
    summaries = []
    bytes_moved = 0
    done = 0
    lost = False
    for mode, names in phases:
        if lost:
            break
        out(
            f"gemu demo: booting a machine with {format_size(ram_size)} RAM, "
            f"{format_size(swap_size)} swap, the GPU in its own process, driver mode {mode} "
            f"({DRIVER_MODES[mode]})"
        )
        with Machine(
            ram_size=ram_size, swap_size=swap_size, device=device, kswapd=True, driver_mode=mode
        ) as m:
            for line in m.boot_log():
                out(f"  {line}")
            sh = Shell(m, write=lambda text: None)
            sh.report = lambda text: out(f"    FAIL {text}")
            sh.progress = lambda text: out(f"    ... {text}")
            for name in names:
                done += 1
                path = examples_dir() / f"{name}.job"
                out(f"[{done}/{total}] {name}.job: {title(path)}")
                before = m.statistics()
                passed = sh.sum.checks_passed
                t = time.perf_counter()
                try:
                    ok = sh.run_file(path)
                except DeviceLost as exc:
                    out(f"    device lost: {exc}")
                    failed.append(name)
                    lost = True
                    break
                after = m.statistics()
                d = {k: _count(after, g, k) - _count(before, g, k) for g, k in _DELTAS}
                out(
                    f"    {'ok' if ok else 'FAILED'} in {time.perf_counter() - t:.2f} s: "
                    f"{sh.sum.checks_passed - passed} checks, {d['jobs_emitted']} jobs, "
                    f"{d['evicted']} evictions, {d['swapped_in']} swap-ins, "
                    f"{d['purged']} purges, {d['mmu_faults']} faults, "
                    f"{d['resets']} resets"
                )
                if not ok:
                    failed.append(name)
            summaries.append(sh.poweroff())
            bytes_moved += sh.bytes_moved

    def total_of(group: str, key: str) -> int:
        return sum(_count(s.stats, group, key) for s in summaries)

    out("summary:")
    out(f"  scripts         {total - len(failed)} of {total} passed")
    out(f"  jobs run        {total_of('gpu', 'jobs_emitted')}")
    out(f"  bytes moved     {format_size(bytes_moved)} by GPU copy/fill/crc jobs")
    out(
        f"  evictions       {total_of('shrinker', 'evicted')} BOs to swap "
        f"({total_of('swap', 'pswpout')} pages)"
    )
    out(f"  swap-ins        {total_of('shrinker', 'swapped_in')} BOs")
    out(f"  purges          {total_of('shrinker', 'purged')} DONTNEED BOs")
    out(
        f"  faults handled  {total_of('gpu', 'mmu_faults')} GPU MMU faults, "
        f"{total_of('gpu', 'resets')} hang resets"
    )
    out(
        f"  checks passed   {sum(s.checks_passed for s in summaries)} "
        f"({sum(s.checks_failed for s in summaries)} failed)"
    )
    out(f"  lockdep         {sum(len(s.unexpected_lockdep) for s in summaries)} unexpected reports")
    for s in summaries:
        for p in s.problems():
            out(f"  FAIL: {p}")
    out(f"  wall time       {time.perf_counter() - t0:.2f} s")
    if lost or any(s.device_lost for s in summaries):
        return 3  # as gemu run: the machine lost its device
    return 0 if all(s.ok for s in summaries) and not failed else 1
