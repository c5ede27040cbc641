"""The drm_gpuvm flow (the VM_BIND flavour's exec, bind and reclaim) step by step: move a
step, or leave one out, and the emulator reports a concrete failure. Every test runs on the
real device (a spawned ``gemu device`` process): the wrong driver (a :class:`Mutant` of the
section "The VM_BIND flavour's mutants", switched on with ``VmBindDriver(mutant=...)``) shows
the failure docs/validation.md ("The drm_gpuvm flow") names, the working driver passes the same
test. The legacy flow's counterpart is tests/hil/test_validation_order.py.
"""

from __future__ import annotations

import os
import zlib
from contextlib import contextmanager

import pytest

from gemu.device.abi import packets as pk
from gemu.guest import errors
from gemu.guest.errors import Efault, Enomem, KernelWarning
from gemu.guest.gemu_drv.job import Mutant
from gemu.guest.gemu_drv.vm_bind import VmBindDriver
from gemu.guest.locking import lockdep
from gemu.host.machine import Machine

RAM = 8 << 20
PAGE = 4096
CMD_VA = 0x10_0000
DATA = bytes(range(256)) * 32  # 8 KiB, two pages
WAIT_S = 60.0 * float(os.environ.get("GEMU_TIMEOUT_MULT", "1"))
"""A test's wait for a bind or a job it expects to finish (generous: the machine may be
loaded); the product's own deadlines stay the machine's defaults."""


def u32(b: bytes, off: int = 0) -> int:
    return int.from_bytes(b[off : off + 4], "little")


@contextmanager
def flavour(mutant: Mutant = Mutant.NONE):
    """A machine on the spawned device with the VM_BIND flavour (``mutant`` on) and one
    file; at the end the file is closed and the machine must be clean."""
    with Machine(ram_size=RAM, swap_size=32 << 20, device="spawn") as m:
        drv = VmBindDriver(m.driver, mutant=mutant)
        f = drv.open()
        try:
            yield m, drv, f
        finally:
            f.close()
            drv.remove()
        m.check_clean()


class Cmd:
    """A command BO private to ``vm`` at ``CMD_VA``; each run writes a fresh page of it."""

    def __init__(self, f, vm: int, pages: int = 4) -> None:
        self.f, self.vm, self.pages, self.next = f, vm, pages, 0
        self.handle = f.bo_create(pages * PAGE, vm_id=vm, name=f"cmd-vm{vm}")
        f.wait(f.map(vm, CMD_VA, pages * PAGE, self.handle), WAIT_S)

    def write(self, packets: bytes) -> tuple[int, int]:
        """Write the next command page; returns what :meth:`exec` takes."""
        slot = self.next % self.pages
        self.next += 1
        self.f.write(self.handle, slot * PAGE, packets)
        return CMD_VA + slot * PAGE, len(packets)

    def exec(self, written: tuple[int, int]):
        return self.f.exec(self.vm, *written)

    def submit(self, packets: bytes):
        return self.exec(self.write(packets))

    def run(self, packets: bytes) -> None:
        self.f.wait(self.submit(packets), WAIT_S)


def bind(f, vm: int, va: int, handle: int, size: int = len(DATA), offset: int = 0) -> None:
    f.wait(f.map(vm, va, size, handle, offset=offset), WAIT_S)
    f.vms[vm].flush_cleanup()  # the bind's pin is dropped: the BO may be reclaimed


def evict_all(m: Machine) -> None:
    """Memory pressure: reclaim as much as RAM holds."""
    m.reclaim(m.allocator.totalram_pages)


@pytest.fixture
def lax():
    """Reports and warnings counted, not raised (they happen where the driver must go on)."""
    was = errors.is_strict()
    errors.set_strict(False)
    errors.reset_warn_stats()
    yield
    errors.reset_warn_stats()
    errors.set_strict(was)


# --- reclaim and bind: a mapping bound while its vm_bo is marked evicted ----------------------


def run_rebind_after_eviction(mutant: Mutant = Mutant.NONE) -> tuple[int, int]:
    """A private BO bound at VA A is evicted (its vm_bo marked evicted, A's PTEs cleared),
    then bound again at VA B (the bind pins it back in and maps B) and, idle, evicted again.
    A spacer takes the freed frames; a job checksums B. Returns (B's PTE after the second
    eviction, the job's CRC)."""
    with flavour(mutant) as (m, _drv, f):
        vm = f.vm_create()
        src = f.bo_create(len(DATA), vm_id=vm, name="src")
        out = f.bo_create(PAGE, vm_id=vm, name="out")
        f.write(src, 0, DATA)
        cmd = Cmd(f, vm)
        bind(f, vm, 0x2000_0000, src)
        bind(f, vm, 0x3000_0000, out, PAGE)
        evict_all(m)
        assert f.bo(src).obj.evicted
        bind(f, vm, 0x4000_0000, src)  # B, while the vm_bo is still marked evicted
        assert not f.bo(src).obj.evicted
        evict_all(m)
        assert f.bo(src).obj.evicted
        pte = f.vms[vm].pt.lookup(0x4000_0000)
        spacer = f.bo_create(4 * len(DATA), vm_id=vm, name="spacer")
        f.write(spacer, 0, b"\x5a" * 4 * len(DATA))
        cmd.run(pk.crc32(0x4000_0000, len(DATA), 0x3000_0000))
        crc = u32(f.read(out, 0, 4))
        for h in (src, out, spacer, cmd.handle):
            f.close_bo(h)
        return pte, crc


def test_mapping_bound_while_evicted_loses_its_ptes_at_the_next_eviction():
    """Reclaim clears the PTEs of every mapping of the BO in every VM before its frames go,
    also a mapping bound after the BO's vm_bo was marked evicted (that vm_bo is skipped as
    already evicted only for the marking): B has no PTE left, and the next exec's validate
    swaps the BO in and maps B again, so the job checksums the BO's own bytes."""
    pte, crc = run_rebind_after_eviction()
    assert pte == 0
    assert crc == zlib.crc32(DATA)


# --- the exec: drm_gpuvm_exec_lock -> validate -> arm -> resv_add_fence -> push -> unlock -----


def setup_copy(f, vm: int, external: bool = False) -> tuple[int, int]:
    """``src`` (DATA; private to ``vm`` unless ``external``) at 0x2000_0000 and a private
    ``out`` page at 0x3000_0000, bound and idle."""
    src = f.bo_create(len(DATA), vm_id=None if external else vm, name="src")
    out = f.bo_create(PAGE, vm_id=vm, name="out")
    f.write(src, 0, DATA)
    bind(f, vm, 0x2000_0000, src)
    bind(f, vm, 0x3000_0000, out, PAGE)
    return src, out


CRC = pk.crc32(0x2000_0000, len(DATA), 0x3000_0000)


def new_reports(before: dict) -> list:
    return [r for r in lockdep.reports() if before.get(id(r), 0) != r.count]


def run_fence_before_validate(mutant: Mutant) -> tuple[list, int]:
    """``src`` evicted, then a job checksums it: the exec's validate swaps it in. Returns the
    new lockdep reports and the CRC."""
    with flavour(mutant) as (m, _drv, f):
        vm = f.vm_create()
        cmd = Cmd(f, vm)
        src, out = setup_copy(f, vm)
        evict_all(m)
        assert f.bo(src).obj.evicted
        before = {id(r): r.count for r in lockdep.reports()}
        cmd.run(CRC)
        reports = new_reports(before)
        lockdep.reset()
        crc = u32(f.read(out, 0, 4))
        for h in (src, out, cmd.handle):
            f.close_bo(h)
        return reports, crc


def test_fence_before_validate_allocates_in_the_signalling_section(lax):
    """Arm and drm_gpuvm_resv_add_fence() before drm_gpuvm_validate(): the swap-in of the
    evicted BO allocates frames inside the signalling section the published fence opened;
    lockdep reports it (the job itself still runs)."""
    reports, _crc = run_fence_before_validate(Mutant.GPUVM_FENCE_BEFORE_VALIDATE)
    assert [r.kind for r in reports] == ["signalling"]
    assert "inside a dma_fence signalling critical section" in reports[0].message


def test_validate_before_fence_is_clean():
    """drm_gpuvm_validate() before arm: the swap-in allocates while nothing is published, no
    report, and the GPU checksums the swapped-in bytes."""
    reports, crc = run_fence_before_validate(Mutant.NONE)
    assert reports == [] and crc == zlib.crc32(DATA)


def run_fence_after_unlock(mutant: Mutant) -> tuple[list[bool], int]:
    """A job that waits on a semaphore, then checksums an external ``src``; memory pressure
    hits right after the exec unlocked (drm_gpuvm_exec_unlock), before the GPU reads."""
    with flavour(mutant) as (m, _drv, f):
        vm = f.vm_create()
        cmd = Cmd(f, vm)
        src, out = setup_copy(f, vm, external=True)
        sem = f.bo_create(PAGE, vm_id=vm, name="sem")
        f.write(sem, 0, bytes(4))
        bind(f, vm, 0x0800_0000, sem, PAGE)
        evicted = []

        def pressure(_job):
            evict_all(m)
            evicted.append(f.bo(src).obj.evicted)

        m.driver.hooks.after_unlock.append(pressure)
        fence = cmd.submit(pk.wait_mem(0x0800_0000, 1) + CRC)
        if mutant is Mutant.NONE:
            pressure(None)  # the same pressure at the same point: after unlock
        f.write(sem, 0, (1).to_bytes(4, "little"))
        try:
            f.wait(fence, WAIT_S)
            return evicted, u32(f.read(out, 0, 4))
        finally:
            for h in (src, out, sem, cmd.handle):
                f.close_bo(h)


def test_fence_after_unlock_lets_reclaim_evict_under_a_running_job():
    """drm_gpuvm_resv_add_fence() after the unlock: in between, every BO of the VM looks idle
    and reclaim evicts them (their PTEs cleared in the VM) while the job is on the GPU: the
    job faults."""
    with pytest.raises(Efault, match=r"GPU MMU fault .*TRANSLATION_L3"):
        run_fence_after_unlock(Mutant.GPUVM_FENCE_AFTER_UNLOCK)


def test_fence_before_unlock_keeps_the_vm_resident():
    """With the fence on the VM's resv and every external BO before unlock, the same pressure
    finds them busy: nothing is evicted and the checksum is right."""
    evicted, crc = run_fence_after_unlock(Mutant.NONE)
    assert evicted == [False] and crc == zlib.crc32(DATA)


def run_failing_validate(mutant: Mutant) -> int:
    """``src`` evicted and the swap-in's allocation failing (fail-nth): the exec fails in
    drm_gpuvm_validate(); the next exec must work. Returns its CRC."""
    with flavour(mutant) as (m, _drv, f):
        vm = f.vm_create()
        cmd = Cmd(f, vm)
        src, out = setup_copy(f, vm)
        written = cmd.write(CRC)
        evict_all(m)
        m.allocator.set_fail_nth(1)  # the exec's first allocation: a swap-in in validate
        try:
            cmd.exec(written)
        finally:
            m.allocator.set_fail_nth(0)
            f.vms[vm].exec_entity._armed.clear()  # what the wrong order left armed
        cmd.run(CRC)
        crc = u32(f.read(out, 0, 4))
        for h in (src, out, cmd.handle):
            f.close_bo(h)
        return crc


def test_arm_before_a_failing_validate_leaves_an_armed_job():
    """drm_sched_job_arm() before drm_gpuvm_validate(): the swap-in fails after the point of
    no return, and the exec can only abandon an armed job, which drm_sched reports."""
    with pytest.raises(KernelWarning, match="point of no return"):
        run_failing_validate(Mutant.GPUVM_ARM_BEFORE_VALIDATE)


def test_validate_failure_before_arm_is_a_clean_error():
    """In the right order the failed swap-in fails the exec with -ENOMEM before arm; the
    next exec on the VM runs and checksums the right bytes."""
    with flavour() as (m, _drv, f):
        vm = f.vm_create()
        cmd = Cmd(f, vm)
        src, out = setup_copy(f, vm)
        written = cmd.write(CRC)
        evict_all(m)
        m.allocator.set_fail_nth(1)
        with pytest.raises(Enomem, match="injected failure"):
            cmd.exec(written)
        m.allocator.set_fail_nth(0)
        assert f.inflight == 0  # nothing queued, nothing armed
        f.wait(cmd.exec(written), WAIT_S)
        assert u32(f.read(out, 0, 4)) == zlib.crc32(DATA)
        for h in (src, out, cmd.handle):
            f.close_bo(h)


def run_fence_on_vm_resv_only(mutant: Mutant) -> tuple[bool, int]:
    """A job held by a semaphore checksums an external BO; reclaim runs while it waits."""
    with flavour(mutant) as (m, _drv, f):
        vm = f.vm_create()
        cmd = Cmd(f, vm)
        src, out = setup_copy(f, vm, external=True)
        sem = f.bo_create(PAGE, vm_id=vm, name="sem")
        f.write(sem, 0, bytes(4))
        bind(f, vm, 0x0800_0000, sem, PAGE)
        fence = cmd.submit(pk.wait_mem(0x0800_0000, 1) + CRC)
        evict_all(m)
        evicted = f.bo(src).obj.evicted
        f.write(sem, 0, (1).to_bytes(4, "little"))
        try:
            f.wait(fence, WAIT_S)
            return evicted, u32(f.read(out, 0, 4))
        finally:
            for h in (src, out, sem, cmd.handle):
                f.close_bo(h)


def test_fence_on_the_vm_resv_only_leaves_external_bos_idle():
    """The job's fence on the VM's resv alone: the private BOs are busy, the external BO the
    job reads is not, reclaim evicts it under the job, which faults reading it."""
    with pytest.raises(Efault, match=r"TRANSLATION_L3 on READ at VA 0x20000000 by CRC32"):
        run_fence_on_vm_resv_only(Mutant.FENCE_VM_RESV_ONLY)


def test_drm_gpuvm_resv_add_fence_covers_the_external_bos():
    """drm_gpuvm_resv_add_fence() adds the fence to every object drm_gpuvm_exec_lock locked:
    the external BO stays resident under pressure and the checksum is right."""
    evicted, crc = run_fence_on_vm_resv_only(Mutant.NONE)
    assert not evicted and crc == zlib.crc32(DATA)


# --- reclaim and revalidation across VMs ------------------------------------------------------


def run_shared_after_eviction(mutant: Mutant, spacer: bool = False) -> tuple[int, int, int]:
    """An external BO bound in VMs A and B, evicted, then (``spacer``: after another BO took
    free frames) checksummed by a job on A, then by a job on B. Returns B's PTE right after
    the eviction and the two CRCs."""
    with flavour(mutant) as (m, _drv, f):
        a, b = f.vm_create(), f.vm_create()
        ca, cb = Cmd(f, a), Cmd(f, b)
        shared = f.bo_create(len(DATA), name="shared")
        f.write(shared, 0, DATA)
        outs = []
        for vm in (a, b):
            bind(f, vm, 0x2000_0000, shared)
            outs.append(f.bo_create(PAGE, vm_id=vm))
            bind(f, vm, 0x3000_0000, outs[-1], PAGE)
        # the commands first: their BOs come back through the exec's validate, not a CPU
        # fault, so only the shared BO is resident again when B's exec validates
        wa, wb = ca.write(CRC), cb.write(CRC)
        evict_all(m)
        assert f.bo(shared).obj.evicted
        pte_b = f.vms[b].pt.lookup(0x2000_0000)
        handles = [shared, *outs, ca.handle, cb.handle]
        if spacer:
            sp = f.bo_create(4 * len(DATA), vm_id=a, name="spacer")
            f.write(sp, 0, b"\x5a" * 4 * len(DATA))
            handles.append(sp)
        try:
            if not spacer:
                f.wait(ca.exec(wa), WAIT_S)
            f.wait(cb.exec(wb), WAIT_S)
            crcs = [u32(f.read(o, 0, 4)) for o in outs]
        finally:
            for h in handles:
                f.close_bo(h)
        return pte_b, crcs[0], crcs[1]


def test_validate_skipping_a_bo_resident_again_faults_in_the_other_vm():
    """vm_bo_validate() that skips a BO already swapped in by VM A's exec: VM B's mapping
    keeps no PTE and B's job faults on a VA it has bound."""
    with pytest.raises(Efault, match=r"TRANSLATION_L3 on READ at VA 0x20000000"):
        run_shared_after_eviction(Mutant.VALIDATE_SKIPS_OTHER_VM)


def test_each_vm_revalidates_the_shared_bo():
    """The BO was marked evicted in both VMs (drm_gpuvm_bo_gem_evict); A's exec swaps it in
    and maps it in A, B's own exec maps it in B: both checksums are right."""
    pte_b, crc_a, crc_b = run_shared_after_eviction(Mutant.NONE)
    assert pte_b == 0 and crc_a == crc_b == zlib.crc32(DATA)


def test_eviction_marked_in_one_vm_leaves_the_other_on_freed_frames():
    """Evicted after marking and unmapping it in VM A only: VM B's page table still maps the
    frames reclaim freed; another BO gets them, and B's job checksums that BO's bytes."""
    pte_b, _crc_a, crc_b = run_shared_after_eviction(Mutant.EVICT_MARKS_ONE_VM, spacer=True)
    assert pte_b != 0
    assert crc_b != zlib.crc32(DATA)


def test_eviction_marks_every_vm():
    """Marked evicted and unmapped in every VM that maps it: B has no PTE left, and its exec
    swaps the BO in and maps it again: the checksum is of the BO's own bytes."""
    pte_b, _crc_a, crc_b = run_shared_after_eviction(Mutant.NONE, spacer=True)
    assert pte_b == 0 and crc_b == zlib.crc32(DATA)


# --- the bind job, in the signalling path -----------------------------------------------------


def run_far_binds(mutant: Mutant) -> list:
    """Binds each needing new page tables (a fresh 1 GiB region each); the new lockdep
    reports."""
    with flavour(mutant) as (_m, _drv, f):
        vm = f.vm_create()
        bo = f.bo_create(PAGE)
        before = {id(r): r.count for r in lockdep.reports()}
        for k in range(3):
            f.wait(f.map(vm, (k + 1) << 30, PAGE, bo), WAIT_S)
        reports = new_reports(before)
        lockdep.reset()
        f.close_bo(bo)
        return reports


def test_bind_job_allocating_page_tables_is_reported(lax):
    """Page tables not preallocated by the bind ioctl: the bind job (run_job, the fence
    signalling path) allocates them under op_lock, which lockdep reports."""
    reports = run_far_binds(Mutant.BIND_ALLOCATES_PT)
    assert [r.kind for r in reports] == ["inversion"]
    assert "&vm->op_lock" in reports[0].message and "fs_reclaim" in reports[0].message


def test_bind_job_with_preallocated_tables_is_clean():
    """panthor_vm_op_ctx_prealloc_pts() in the ioctl: the bind job allocates nothing."""
    assert run_far_binds(Mutant.NONE) == []
