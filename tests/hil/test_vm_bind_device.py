"""The VM_BIND flavour against the real device (a spawned ``gemu device``), in the spirit of
Xe's xe_vm/xe_exec_basic/xe_evict and Panthor's VM_BIND tests: VMs, BO ranges bound at any
VA (partial, scattered), a BO in two VMs, part of a mapping unbound, jobs that name only the
VM, eviction under memory pressure and revalidation on the next exec, and the ordering that
bind and exec fences give. Every check is byte-exact, by the CPU and by the GPU (CRC32), and
every test ends with a clean machine (no frame, swap slot, GEM object or lockdep report
left)."""

from __future__ import annotations

import os
import random
import zlib

import pytest

from gemu.device.abi import packets as pk
from gemu.guest import errors
from gemu.guest.dma_buf import dma_fence
from gemu.guest.dma_buf.dma_fence import DmaFence
from gemu.guest.drm import drm_gpuvm
from gemu.guest.errors import Efault, Einval, Enoent, Etimedout
from gemu.guest.gemu_drv.vm import Prot
from gemu.guest.gemu_drv.vm_bind import VmBindDriver, VmBindOp
from gemu.guest.gemu_drv.vm_shrinker import ReclaimState
from gemu.guest.locking import lockdep
from gemu.host.machine import Machine

RAM = 8 << 20
PAGE = 4096
CMD_VA = 0x10_0000
WAIT_S = 60.0 * float(os.environ.get("GEMU_TIMEOUT_MULT", "1"))
"""How long a test waits for a bind or a job it expects to finish: a test's wait on a
condition, so generous (the machine may be loaded); the product's own deadlines (job
timeout, device timeout) are the machine's defaults and unchanged."""


@pytest.fixture
def machine():
    with Machine(ram_size=RAM, swap_size=32 << 20, device="spawn") as m:
        yield m
        m.check_clean()


@pytest.fixture
def vdrv(machine):
    drv = VmBindDriver(machine.driver)
    yield drv
    drv.remove()


@pytest.fixture
def f(vdrv):
    file = vdrv.open()
    yield file
    file.close()


def u32(b: bytes, off: int = 0) -> int:
    return int.from_bytes(b[off : off + 4], "little")


def pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


class Cmd:
    """A command BO private to a VM, bound at ``CMD_VA``: exec runs what was written last."""

    def __init__(self, f, vm: int, va: int = CMD_VA, size: int = PAGE) -> None:
        self.f, self.vm, self.va = f, vm, va
        self.handle = f.bo_create(size, vm_id=vm, name=f"cmd-vm{vm}")
        self.bound = f.map(vm, va, size, self.handle)

    def run(self, packets: bytes, in_fences=(), timeout: float = WAIT_S, wait: bool = True):
        self.f.write(self.handle, 0, packets)
        out = self.f.exec(self.vm, self.va, len(packets), in_fences=[self.bound, *in_fences])
        if wait:
            self.f.wait(out, timeout)
        return out


def vas(vdrv_vm) -> list[tuple[int, int, int]]:
    return [
        (va.va.addr, va.va.range, va.gem.offset)
        for va in drm_gpuvm.for_each_va(vdrv_vm)
        if va is not vdrv_vm.kernel_alloc_node
    ]


def test_bind_partial_ranges_at_any_va_and_copy(f):
    """A private source and an external destination, each bound partially (an offset into
    the BO) at unrelated VAs; a job that names only the VM copies one range to the other.
    The CPU reads the copied bytes exactly, and a GPU CRC32 of the destination range
    equals zlib's CRC of the source bytes."""
    vm = f.vm_create()
    data = pattern(1, 16 * PAGE)
    src = f.bo_create(16 * PAGE, vm_id=vm)
    dst = f.bo_create(16 * PAGE)
    out = f.bo_create(PAGE)
    f.write(src, 0, data)
    f.write(dst, 0, b"\x00" * 16 * PAGE)
    binds = [
        f.map(vm, 0x7FF0_3000, 5 * PAGE, src, offset=3 * PAGE),
        f.map(vm, 0x1234_5000, 5 * PAGE, dst, offset=8 * PAGE),
        f.map(vm, 0x4000_0000, PAGE, out),
    ]
    cmd = Cmd(f, vm)
    cmd.run(
        pk.copy(0x7FF0_3000, 0x1234_5000, 5 * PAGE) + pk.crc32(0x1234_5000, 5 * PAGE, 0x4000_0000),
        in_fences=binds,
    )
    assert f.read(dst, 8 * PAGE, 5 * PAGE) == data[3 * PAGE : 8 * PAGE]
    assert f.read(dst, 0, 8 * PAGE) == b"\x00" * 8 * PAGE  # outside the bound range: untouched
    assert u32(f.read(out, 0, 4)) == zlib.crc32(data[3 * PAGE : 8 * PAGE])
    g = f.vms[vm]
    assert not drm_gpuvm.is_extobj(g, f.bo(src).obj) and drm_gpuvm.is_extobj(g, f.bo(dst).obj)
    for h in (src, dst, out, cmd.handle):
        f.close_bo(h)


def test_scattered_pages_of_one_bo_at_scattered_vas(f):
    """Pages 5, 0 and 2 of one BO bound at three unrelated VAs, in that order, each a
    mapping of its own: a job gathering them into a destination produces exactly that
    permutation of the BO's pages."""
    vm = f.vm_create()
    data = pattern(2, 8 * PAGE)
    src, dst = f.bo_create(8 * PAGE), f.bo_create(3 * PAGE)
    f.write(src, 0, data)
    picks = [(5, 0x2000_0000), (0, 0x0900_1000), (2, 0x5555_5000)]
    fences = [f.map(vm, va, PAGE, src, offset=page * PAGE) for page, va in picks]
    fences.append(f.map(vm, 0x3000_0000, 3 * PAGE, dst))
    cmd = Cmd(f, vm)
    packets = b"".join(pk.copy(va, 0x3000_0000 + i * PAGE, PAGE) for i, (_, va) in enumerate(picks))
    cmd.run(packets, in_fences=fences)
    expected = b"".join(data[p * PAGE : (p + 1) * PAGE] for p, _ in picks)
    assert f.read(dst, 0, 3 * PAGE) == expected
    assert [(a, r, o) for a, r, o in vas(f.vms[vm]) if r == PAGE and a != CMD_VA] == sorted(
        (va, PAGE, p * PAGE) for p, va in picks
    )
    for h in (src, dst, cmd.handle):
        f.close_bo(h)


def test_one_bo_in_two_vms(f):
    """An external BO bound in two VMs at different VAs: a job on VM A fills it, a job on VM
    B (ordered by A's out-fence) checksums it through its own mapping and gets the CRC of
    what A wrote; both VMs hold a vm_bo of it on their extobj lists."""
    a, b = f.vm_create(), f.vm_create()
    shared = f.bo_create(4 * PAGE, name="shared")
    out = f.bo_create(PAGE, vm_id=b)
    fa = f.map(a, 0x6000_0000, 4 * PAGE, shared)
    fb = f.map(b, 0x0A00_0000, 4 * PAGE, shared)
    fo = f.map(b, 0x0B00_0000, PAGE, out)
    ca, cb = Cmd(f, a), Cmd(f, b)
    filled = ca.run(pk.fill(0x6000_0000, 4 * PAGE, 0xC0FFEE00), in_fences=[fa], wait=False)
    cb.run(pk.crc32(0x0A00_0000, 4 * PAGE, 0x0B00_0000), in_fences=[fb, fo, filled])
    expected = (0xC0FFEE00).to_bytes(4, "little") * PAGE
    assert f.read(shared, 0, 4 * PAGE) == expected
    assert u32(f.read(out, 0, 4)) == zlib.crc32(expected)
    obj = f.bo(shared).obj
    vms = {vb.vm.name for vb in drm_gpuvm.gem_for_each_gpuvm_bo(obj)}
    assert vms == {f.vms[a].name, f.vms[b].name}
    assert all(len(f.vms[v].extobj) == 1 for v in (a, b))
    f.vms[a].flush_cleanup()
    f.vms[b].flush_cleanup()
    assert f.bo(shared).reclaim_state is ReclaimState.GPU_MAPPED_MULTI_VM
    for h in (shared, out, ca.handle, cb.handle):
        f.close_bo(h)


def test_unbind_the_middle_of_a_mapping(f):
    """Unbinding the middle page of a four-page mapping leaves two mappings (a REMAP with
    prev and next, offsets kept); a job writing the whole range faults at the hole, with the
    VA in the message, while jobs on the pieces still land in the right pages."""
    vm = f.vm_create()
    bo = f.bo_create(4 * PAGE)
    f.write(bo, 0, b"\x00" * 4 * PAGE)
    base = 0x2000_0000
    mapped = f.map(vm, base, 4 * PAGE, bo)
    hole = f.unmap(vm, base + PAGE, PAGE, in_fences=[mapped])
    cmd = Cmd(f, vm)
    cmd.run(
        pk.fill(base, PAGE, 0x11111111) + pk.fill(base + 2 * PAGE, 2 * PAGE, 0x22222222), [hole]
    )
    mine = [(a, r, o) for a, r, o in vas(f.vms[vm]) if a != CMD_VA]
    assert mine == [(base, PAGE, 0), (base + 2 * PAGE, 2 * PAGE, 2 * PAGE)]
    assert f.read(bo, 0, 4 * PAGE) == (b"\x11" * PAGE + b"\x00" * PAGE + b"\x22" * 2 * PAGE)
    with pytest.raises(Efault, match=f"WRITE at VA {base + PAGE:#x}"):
        cmd.run(pk.fill(base, 4 * PAGE, 0x33333333))
    f.close_bo(bo)
    f.close_bo(cmd.handle)


def test_rebind_over_a_mapping_replaces_it(f):
    """Binding a second BO over the middle of an existing mapping splits the old one and maps
    the new one in between (drm_gpuvm_sm_map: REMAP + MAP); the GPU sees both."""
    vm = f.vm_create()
    x, y = f.bo_create(4 * PAGE), f.bo_create(PAGE)
    f.write(x, 0, b"x" * 4 * PAGE)
    f.write(y, 0, b"y" * PAGE)
    dst = f.bo_create(4 * PAGE)
    fences = [f.map(vm, 0x100_0000, 4 * PAGE, x)]
    fences.append(f.map(vm, 0x100_0000 + PAGE, PAGE, y, in_fences=fences[-1:]))
    fences.append(f.map(vm, 0x200_0000, 4 * PAGE, dst))
    Cmd(f, vm).run(pk.copy(0x100_0000, 0x200_0000, 4 * PAGE), fences)
    assert f.read(dst, 0, 4 * PAGE) == b"x" * PAGE + b"y" * PAGE + b"x" * 2 * PAGE
    for h in (x, y, dst):
        f.close_bo(h)


def test_read_only_mapping_faults_on_write(f):
    """A mapping bound READ only: a GPU read works, a GPU write faults (PERMISSION)."""
    vm = f.vm_create()
    bo, out = f.bo_create(PAGE), f.bo_create(PAGE)
    f.write(bo, 0, b"r" * PAGE)
    fences = [f.map(vm, 0x300_0000, PAGE, bo, prot=Prot.READ), f.map(vm, 0x400_0000, PAGE, out)]
    cmd = Cmd(f, vm)
    cmd.run(pk.copy(0x300_0000, 0x400_0000, PAGE), fences)
    assert f.read(out, 0, PAGE) == b"r" * PAGE
    with pytest.raises(Efault, match="PERMISSION"):
        cmd.run(pk.fill(0x300_0000, PAGE, 0))


def test_bind_in_fence_orders_the_bind_and_its_out_fence_orders_the_exec(f):
    """A bind waiting for an unsignalled in-fence does not run; an exec given the bind's
    out-fence waits behind it (no fault), and both complete once the fence signals. An exec
    that is *not* given the bind's fence runs at once and faults: only the fences order
    binds and execs."""
    vm = f.vm_create()
    src, dst = f.bo_create(PAGE), f.bo_create(PAGE)
    f.write(src, 0, b"s" * PAGE)
    gate = DmaFence(None, dma_fence.context_alloc(1), 1)
    cmd = Cmd(f, vm)
    early = Cmd(f, vm, va=0x700_0000)  # bound before the gated bind: binds run in order
    s = f.map(vm, 0x500_0000, PAGE, src)
    d = f.map(vm, 0x600_0000, PAGE, dst, in_fences=[gate])
    f.wait(s, WAIT_S)
    with pytest.raises(Efault, match="TRANSLATION"):
        early.run(pk.copy(0x500_0000, 0x600_0000, PAGE))
    copied = cmd.run(pk.copy(0x500_0000, 0x600_0000, PAGE), in_fences=[s, d], wait=False)
    with pytest.raises(Etimedout):
        f.wait(copied, 0.2)
    assert not d.signaled
    dma_fence.signal(gate)
    dma_fence.put(gate)
    f.wait(copied, WAIT_S)
    assert d.signaled and f.read(dst, 0, PAGE) == b"s" * PAGE


def test_unbind_waits_for_the_exec_given_as_in_fence(f):
    """An unmap whose in-fence is a running job's out-fence runs after that job: the job,
    held by a WAIT_MEM the CPU releases, completes its copy through the mapping."""
    vm = f.vm_create()
    sem = f.bo_create(PAGE)
    src, dst = f.bo_create(PAGE), f.bo_create(PAGE)
    f.write(sem, 0, b"\x00" * 4)
    f.write(src, 0, b"q" * PAGE)
    fences = [f.map(vm, 0x800_0000, PAGE, sem), f.map(vm, 0x900_0000, PAGE, src)]
    fences.append(f.map(vm, 0xA00_0000, PAGE, dst))
    cmd = Cmd(f, vm)
    job = cmd.run(
        pk.wait_mem(0x800_0000, 1) + pk.copy(0x900_0000, 0xA00_0000, PAGE), fences, wait=False
    )
    gone = f.unmap(vm, 0x900_0000, PAGE, in_fences=[job])
    with pytest.raises(Etimedout):
        f.wait(gone, 0.2)
    f.write(sem, 0, (1).to_bytes(4, "little"))
    f.wait(job, WAIT_S)
    f.wait(gone, WAIT_S)
    assert f.read(dst, 0, PAGE) == b"q" * PAGE


def test_evicted_under_pressure_and_revalidated_by_each_vm(machine, vdrv, f):
    """Reclaim evicts a VM-private BO and a BO shared by two VMs: the shared one is marked
    evicted in both VMs (drm_gpuvm_bo_gem_evict) and its PTEs are gone in both. The next exec
    on VM A swaps it in and rebuilds A's mappings only; VM B's vm_bo stays evicted until B's
    own exec revalidates it. Every byte survives, read by the CPU and checksummed by the
    GPU in each VM."""
    a, b = f.vm_create(), f.vm_create()
    data_p, data_s = pattern(3, 32 * PAGE), pattern(4, 16 * PAGE)
    priv = f.bo_create(32 * PAGE, vm_id=a, name="priv")
    shared = f.bo_create(16 * PAGE, name="shared")
    out_a, out_b = f.bo_create(PAGE, vm_id=a), f.bo_create(PAGE, vm_id=b)
    f.write(priv, 0, data_p)
    f.write(shared, 0, data_s)
    binds = [
        f.map(a, 0x1000_0000, 32 * PAGE, priv),
        f.map(a, 0x2000_0000, 16 * PAGE, shared),
        f.map(b, 0x0300_0000, 16 * PAGE, shared),
        f.map(a, 0x3000_0000, PAGE, out_a),
        f.map(b, 0x0400_0000, PAGE, out_b),
    ]
    ca, cb = Cmd(f, a), Cmd(f, b)
    for fence in binds:
        f.wait(fence, WAIT_S)
    f.vms[a].flush_cleanup()
    f.vms[b].flush_cleanup()
    machine.reclaim(machine.allocator.totalram_pages)
    p_obj, s_obj = f.bo(priv).obj, f.bo(shared).obj
    assert p_obj.evicted and s_obj.evicted
    assert f.bo(priv).reclaimed_count == 1 and f.bo(shared).reclaimed_count == 1
    assert all(vb.evicted for vb in drm_gpuvm.gem_for_each_gpuvm_bo(s_obj))
    assert f.vms[a].pt.lookup(0x2000_0000) == 0 and f.vms[b].pt.lookup(0x0300_0000) == 0
    ca.run(
        pk.crc32(0x1000_0000, 32 * PAGE, 0x3000_0000)
        + pk.crc32(0x2000_0000, 16 * PAGE, 0x3000_0004)
    )
    assert not p_obj.evicted and not s_obj.evicted
    states = {vb.vm.name: vb.evicted for vb in drm_gpuvm.gem_for_each_gpuvm_bo(s_obj)}
    assert states == {f.vms[a].name: False, f.vms[b].name: True}
    assert f.vms[b].pt.lookup(0x0300_0000) == 0
    cb.run(pk.crc32(0x0300_0000, 16 * PAGE, 0x0400_0000))
    assert not any(vb.evicted for vb in drm_gpuvm.gem_for_each_gpuvm_bo(s_obj))
    res_a = f.read(out_a, 0, 8)
    assert (u32(res_a), u32(res_a, 4)) == (zlib.crc32(data_p), zlib.crc32(data_s))
    assert u32(f.read(out_b, 0, 4)) == zlib.crc32(data_s)
    assert f.read(priv, 0, 32 * PAGE) == data_p and f.read(shared, 0, 16 * PAGE) == data_s
    for h in (priv, shared, out_a, out_b, ca.handle, cb.handle):
        f.close_bo(h)


def test_busy_bo_is_not_evicted(machine, vdrv, f):
    """A BO used by a job that has not finished (held by a WAIT_MEM) stays resident under
    pressure; once the job is done it can go."""
    vm = f.vm_create()
    sem = f.bo_create(PAGE, vm_id=vm)
    big = f.bo_create(64 * PAGE, vm_id=vm)
    f.write(sem, 0, b"\x00" * 4)
    fences = [f.map(vm, 0x800_0000, PAGE, sem), f.map(vm, 0x900_0000, 64 * PAGE, big)]
    cmd = Cmd(f, vm)
    job = cmd.run(
        pk.wait_mem(0x800_0000, 1) + pk.fill(0x900_0000, 64 * PAGE, 7), fences, wait=False
    )
    for fence in fences:
        f.wait(fence, WAIT_S)
    f.vms[vm].flush_cleanup()
    machine.reclaim(machine.allocator.totalram_pages)
    assert not f.bo(big).obj.evicted
    assert vdrv.reclaim.stats.skipped_busy >= 1
    f.write(sem, 0, (1).to_bytes(4, "little"))
    f.wait(job, WAIT_S)
    f.vms[vm].flush_cleanup()
    machine.reclaim(machine.allocator.totalram_pages)
    assert f.bo(big).obj.evicted
    assert f.read(big, 0, 64 * PAGE) == (7).to_bytes(4, "little") * (16 * PAGE)


def test_least_recently_active_vm_is_reclaimed_first(machine, vdrv, f):
    """Activeness is per VM (panthor_vm_active): with two VMs of private BOs, the VM that ran
    a job last keeps its BOs when reclaim asks for fewer pages than both hold."""
    old, new = f.vm_create(), f.vm_create()
    bos = {}
    for vm, va in ((old, 0x1000_0000), (new, 0x2000_0000)):
        bos[vm] = f.bo_create(64 * PAGE, vm_id=vm)
        f.wait(f.map(vm, va, 64 * PAGE, bos[vm]), WAIT_S)
    c_old, c_new = Cmd(f, old), Cmd(f, new)
    c_old.run(pk.fill(0x1000_0000, PAGE, 1))
    c_new.run(pk.fill(0x2000_0000, PAGE, 2))
    for vm in (old, new):
        f.vms[vm].flush_cleanup()
    assert vdrv.reclaim.vms.index(f.vms[old]) < vdrv.reclaim.vms.index(f.vms[new])
    machine.reclaim(64)
    assert f.bo(bos[old]).obj.evicted and not f.bo(bos[new]).obj.evicted
    assert u32(f.read(bos[old], 0, 4)) == 1 and u32(f.read(bos[new], 0, 4)) == 2


def test_workload_larger_than_ram_survives(machine, vdrv, f):
    """xe_evict-style, multi-VM: four VMs of private BOs plus two BOs shared by all, twice
    guest RAM in total, each VM's mapped set under RAM (an exec makes *everything* its VM
    maps resident: drm_gpuvm_validate walks the VM's whole evict list). Every BO is filled
    by the GPU with its own value, then checksummed by the GPU in random order of VMs,
    forcing reclaim of the other VMs' BOs and revalidation inside exec. Every CRC is exact."""
    rng = random.Random(5)
    size = 256 << 10
    per_vm = 16
    vms = [f.vm_create() for _ in range(4)]
    cmds = [Cmd(f, vm) for vm in vms]
    results = f.bo_create(PAGE)
    bos = []  # (handle, [vm indices], va)
    for k in range(2):
        h = f.bo_create(size, name=f"shared{k}")
        bos.append((h, list(range(len(vms))), 0x4000_0000 + k * size))
    for i in range(len(vms)):
        for j in range(per_vm):
            h = f.bo_create(size, vm_id=vms[i])
            bos.append((h, [i], 0x1000_0000 + j * size))
    for i, vm in enumerate(vms):
        binds = [f.map(vm, 0x0800_0000, PAGE, results)]
        binds += [f.map(vm, va, size, h) for h, owners, va in bos if i in owners]
        for fence in binds:
            f.wait(fence, WAIT_S)
        f.vms[vm].flush_cleanup()
    for n, (_h, owners, va) in enumerate(bos):
        cmds[owners[0]].run(pk.fill(va, size, 0x01010101 * (n + 1)))
    order = list(range(len(bos)))
    rng.shuffle(order)
    for n in order:
        _h, owners, va = bos[n]
        cmds[rng.choice(owners)].run(pk.crc32(va, size, 0x0800_0000 + 4 * (n % 1024)))
        expected = bytes([n + 1]) * size
        assert u32(f.read(results, 4 * (n % 1024), 4)) == zlib.crc32(expected), f"BO {n}"
    assert vdrv.reclaim.stats.evicted > len(bos) // 2
    for h, _owners, _va in bos:
        f.close_bo(h)
    f.close_bo(results)


def test_uapi_errors_name_the_problem(f):
    """Bad binds and execs fail before anything is queued, with a message naming what is
    wrong: misalignment, a range outside the BO or the VM, a BO private to another VM, an
    unknown handle or VM, a command buffer that is not whole dwords."""
    a, b = f.vm_create(), f.vm_create()
    priv = f.bo_create(PAGE, vm_id=a)
    ext = f.bo_create(2 * PAGE)
    with pytest.raises(Einval, match="whole pages"):
        f.map(a, 0x100_0800, PAGE, ext)
    with pytest.raises(Einval, match="outside"):
        f.map(a, 0x100_0000, 2 * PAGE, ext, offset=PAGE)
    with pytest.raises(Einval, match="outside vm"):
        f.map(a, 0, PAGE, ext)
    with pytest.raises(Einval, match="private to"):
        f.map(b, 0x100_0000, PAGE, priv)
    with pytest.raises(Enoent, match="no BO handle 99"):
        f.map(a, 0x100_0000, PAGE, 99)
    with pytest.raises(Enoent, match="no VM 7"):
        f.unmap(7, 0x100_0000, PAGE)
    with pytest.raises(Einval, match="whole dwords"):
        f.exec(a, 0x100_0000, 6)
    with pytest.raises(Einval, match="unknown bind op"):
        f.vm_bind(a, VmBindOp("remap", 0x100_0000, PAGE))
    assert f.inflight == 0


def test_bind_job_never_allocates(machine, vdrv, f):
    """Binds that need new page tables (ranges far apart, each in a fresh 1 GiB region) run
    in the signalling path with no allocation: lockdep has nothing to report (the machine's
    clean check), and the tables were preallocated by the ioctl."""
    vm = f.vm_create()
    bo = f.bo_create(PAGE)
    tables = machine.driver.gpu.mmu.stats.tables
    for k in range(4):
        f.wait(f.map(vm, (k + 1) << 30, PAGE, bo), WAIT_S)
    assert machine.driver.gpu.mmu.stats.tables >= tables + 4 * 2
    f.close_bo(bo)


@pytest.fixture
def lax():
    """Reports counted, not raised: the report happens in the bind queue's run_job, which
    must go on to signal the bind's fence."""
    was = errors.is_strict()
    errors.set_strict(False)
    yield
    errors.set_strict(was)


def test_bind_job_that_allocates_page_tables_is_reported(lax):
    """The deliberately wrong variant (no page tables preallocated at ioctl time: the bind
    job allocates them in run_job) is a lockdep signalling report naming the allocation in
    the bind job, while the bind itself still completes."""
    with Machine(ram_size=RAM, swap_size=0) as m:
        drv = VmBindDriver(m.driver)
        f = drv.open()
        vm = f.vm_create()
        f.vms[vm].alloc_in_bind_job = True
        bo = f.bo_create(PAGE)
        before = {id(r): r.count for r in lockdep.reports()}
        f.wait(f.map(vm, 3 << 30, PAGE, bo), WAIT_S)
        reports = [r for r in lockdep.reports() if before.get(id(r), 0) != r.count]
        # lockdep sees the allocation through dma_fence_map, the signalling annotation:
        # fs_reclaim taken under op_lock, which signalling sections take
        assert [r.kind for r in reports] == ["inversion"]
        for name in ("takes fs_reclaim", "&vm->op_lock", "dma_fence_map"):
            assert name in reports[0].message
        f.close_bo(bo)
        f.close()
        drv.remove()
        lockdep.reset()


def test_cpu_reads_of_evicted_shared_bos_after_multi_vm_reclaim(machine, vdrv, f):
    """Four VMs share four external BOs (VM i maps BO i and BO i+1) that together fill
    guest RAM; reclaim evicts all of them (each marked evicted in both VMs that map it).
    Reading each BO back through the CPU swaps it in through the fault path, which must put
    it back on a reclaim LRU (panthor_gem_fault() recomputes the reclaim state once the pages
    are back): otherwise the BOs read first sit on no LRU, the per-VM shrinker counts
    nothing, and a later read's swap-in is OOM (reclaim frees 0 pages). Every byte comes
    back, and the GPU then checksums each BO exactly through each VM that maps it."""
    size = 2 << 20
    nvm = 4
    vms = [f.vm_create() for _ in range(nvm)]
    datas = [pattern(40 + k, size) for k in range(nvm)]
    bos = []
    for k, data in enumerate(datas):
        h = f.bo_create(size, name=f"shared{k}")
        f.write(h, 0, data)
        bos.append(h)
    outs = [f.bo_create(PAGE, vm_id=vm) for vm in vms]
    for i, vm in enumerate(vms):
        f.wait(f.map(vm, 0x0800_0000, PAGE, outs[i]), WAIT_S)
    for k, h in enumerate(bos):  # one BO at a time: a bind pins its BO until cleanup
        for i in (k, (k - 1) % nvm):
            f.wait(f.map(vms[i], 0x4000_0000 + k * size, size, h), WAIT_S)
            f.vms[vms[i]].flush_cleanup()
    machine.reclaim(machine.allocator.totalram_pages)
    assert all(f.bo(h).obj.evicted for h in bos)
    for k, h in enumerate(bos):
        assert f.read(h, 0, size) == datas[k], f"shared{k}"
    for h in bos:  # each on an LRU again: the resident ones UNUSED (evicted vm_bos do not count)
        rec = f.bo(h)
        assert rec.obj.evicted or rec.reclaim_state is ReclaimState.UNUSED
        assert rec.obj.evicted or rec.obj.lru is vdrv.reclaim.unused
    cmds = [Cmd(f, vm) for vm in vms]
    for i, cmd in enumerate(cmds):
        for k in (i, (i + 1) % nvm):
            cmd.run(pk.crc32(0x4000_0000 + k * size, size, 0x0800_0000), timeout=WAIT_S)
            assert u32(f.read(outs[i], 0, 4)) == zlib.crc32(datas[k]), f"shared{k} in VM {i}"
    for h in [*bos, *outs, *(c.handle for c in cmds)]:
        f.close_bo(h)
