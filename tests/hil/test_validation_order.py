"""Each step of the validation sequence sits where it does for a reason: move it and the
emulator reports a concrete failure. Every test runs on the real device (a spawned
``gemu device`` process): the wrong order (a :class:`SubmitOrder` the driver offers only for
this) shows the failure named in docs/validation.md, the right order passes.
"""

from __future__ import annotations

import zlib

import pytest

from gemu.device.abi import packets as pk
from gemu.device.abi.enums import WaitFunc
from gemu.guest.drm import gem
from gemu.guest.errors import Efault, Einval, KernelWarning
from gemu.guest.gemu_drv.job import SubmitOrder
from gemu.guest.gemu_drv.uapi import READ, WRITE
from gemu.guest.locking import lockdep
from gemu.guest.locking.lockdep import LockdepError
from gemu.host.machine import Machine

DATA = bytes(range(256)) * 32  # 8 KiB, two pages


def machine(order: SubmitOrder) -> Machine:
    return Machine(ram_size=8 << 20, swap_size=16 << 20, device="spawn", order=order)


def evict_all(m: Machine) -> None:
    """Memory pressure: run reclaim for all of RAM, as an allocation under pressure would.
    (The v19 shrinker reports SHRINK_STOP once it found nothing more, so the pages it freed
    are checked on the objects, not on the return value.)"""
    m.reclaim(m.allocator.totalram_pages)


def u32(b: bytes) -> int:
    return int.from_bytes(b[:4], "little")


def crc_job(f, src: int, dst: int, size: int = len(DATA)):
    return f.submit(pk.crc32(f.va_of(src), size, f.va_of(dst)), bos=[(src, READ), (dst, WRITE)])


def setup_bos(f):
    src, dst = f.create_bo(len(DATA)), f.create_bo(4096)
    f.vm_bind(src)
    f.vm_bind(dst)
    f.write(src, 0, DATA)
    return src, dst


def finish(m: Machine, *files) -> None:
    for f in files:
        f.close()
    m.check_clean()


# --- 1. fence before swapin ------------------------------------------------------------------


def run_fence_before_swapin(order: SubmitOrder):
    with machine(order) as m:
        f = m.open()
        src, dst = setup_bos(f)
        evict_all(m)
        assert f.bo(src).obj.evicted
        try:
            fence = crc_job(f, src, dst)
            f.wait(fence, 5)
            return u32(f.read(dst, 0, 4))
        finally:
            lockdep_reports = lockdep.reports()
            lockdep.reset()
            f.close()
            assert m.dev.object_count == 0, lockdep_reports


def test_fence_before_swapin_allocates_in_the_signalling_section():
    """Adding the job's fence before swap-in (Boris's draft order) makes swap-in allocate
    frames inside the dma_fence signalling critical section: lockdep reports it."""
    with pytest.raises(
        LockdepError, match=r"reclaimable allocation .* inside a dma_fence signalling critical"
    ) as info:
        run_fence_before_swapin(SubmitOrder.FENCE_BEFORE_SWAPIN)
    assert info.value.report.kind == "signalling"


def test_swapin_before_fence_is_clean():
    """The right order swaps in (allocating) while the fence is not yet published: no
    lockdep report, and the GPU reads the swapped-in contents."""
    assert run_fence_before_swapin(SubmitOrder.CORRECT) == zlib.crc32(DATA)


# --- 2. fence after unlock -------------------------------------------------------------------


def run_fence_after_unlock(order: SubmitOrder):
    """A job that waits on a semaphore, then checksums ``src``; memory pressure hits right
    after the submit unlocked the BOs, before the GPU touches ``src``."""
    with machine(order) as m:
        f = m.open()
        src, dst = setup_bos(f)
        sem = f.create_bo(4096)
        vsem = f.vm_bind(sem)
        f.pin(sem)
        evicted = []

        def pressure(job):
            evict_all(m)
            evicted.append(f.bo(src).obj.evicted)

        m.driver.hooks.after_unlock.append(pressure)
        cmd = pk.wait_mem(vsem, 1, function=WaitFunc.EQ) + pk.crc32(
            f.va_of(src), len(DATA), f.va_of(dst)
        )
        fence = f.submit(cmd, bos=[(sem, READ), (src, READ), (dst, WRITE)])
        if order is SubmitOrder.CORRECT:
            pressure(None)  # the same pressure, at the same point: after unlock
        f.write(sem, 0, (1).to_bytes(4, "little"))  # let the GPU go on
        try:
            f.wait(fence, 5)
            return evicted, u32(f.read(dst, 0, 4))
        finally:
            f.unpin(sem)
            finish(m, f)


def test_fence_after_unlock_lets_the_shrinker_evict_under_a_running_job():
    """With the fence added only after unlock, the BOs look idle in between: the shrinker
    evicts them (unmapping them from the GPU VM) while the job is on the GPU, and the job
    faults when it reaches them."""
    with pytest.raises(Efault, match=r"GPU MMU fault .*TRANSLATION_L3 on READ .* by CRC32"):
        run_fence_after_unlock(SubmitOrder.FENCE_AFTER_UNLOCK)


def test_fence_before_unlock_keeps_busy_bos_resident():
    """In the right order the fence is in every resv before unlock: the same pressure finds
    the BOs busy, nothing is evicted and the checksum is right."""
    evicted, crc = run_fence_after_unlock(SubmitOrder.CORRECT)
    assert evicted == [False]
    assert crc == zlib.crc32(DATA)


# --- 3. arm before a failing step ------------------------------------------------------------


def run_purged_submit(order: SubmitOrder):
    with machine(order) as m:
        f = m.open()
        src, dst = setup_bos(f)
        assert f.madvise(src, willneed=False)
        evict_all(m)
        assert f.bo(src).obj.madv < 0  # purged
        try:
            crc_job(f, src, dst)
        finally:
            f.close_bo(src)
            if order is SubmitOrder.CORRECT:
                # the entity is intact: the next job runs
                out = f.create_bo(4096)
                f.vm_bind(out)
                f.wait(f.submit(pk.write_data(f.va_of(out), [5]), bos=[(out, WRITE)]), 5)
                assert u32(f.read(out, 0, 4)) == 5
            f.drv.order = SubmitOrder.CORRECT
            f.entity._armed.clear()
            finish(m, f)


def test_arm_before_a_failing_step_leaves_an_armed_job_that_cannot_be_pushed():
    """Arming before validation: validation fails on a purged BO after the point of no
    return, and the submit can only abandon an armed job, which drm_sched reports."""
    with pytest.raises(KernelWarning, match="point of no return"):
        run_purged_submit(SubmitOrder.ARM_BEFORE_FAILING_STEP)


def test_validation_failure_before_arm_is_a_clean_error():
    """In the right order a purged BO fails the submit before arm with a clear error, and
    the file goes on submitting."""
    with pytest.raises(Einval, match="was purged"):
        run_purged_submit(SubmitOrder.CORRECT)


# --- 4. no TLB flush after remap -------------------------------------------------------------


def run_remap(order: SubmitOrder) -> int:
    with machine(order) as m:
        f = m.open()
        src, dst = setup_bos(f)
        f.pin(dst)  # only src moves
        f.wait(crc_job(f, src, dst), 5)  # the GPU's TLB now caches src's frames
        old = list(f.bo(src).obj.sgt.pfns)
        evict_all(m)  # src evicted: PTEs cleared, frames freed
        spacer = f.create_bo(len(DATA))  # takes src's freed frames
        f.write(spacer, 0, b"\x5a" * len(DATA))
        f.wait(crc_job(f, src, dst), 5)  # swap-in into other frames, remap
        new = list(f.bo(src).obj.sgt.pfns)
        assert set(old).isdisjoint(new)
        crc = u32(f.read(dst, 0, 4))
        f.unpin(dst)
        f.close_bo(spacer)
        finish(m, f)
        return crc


def test_no_tlb_flush_after_remap_reads_stale_frames():
    """Without the flush, the GPU keeps translating src's VA to its old frames (now another
    BO's): the checksum is of the wrong data."""
    crc = run_remap(SubmitOrder.NO_TLB_FLUSH)
    assert crc == zlib.crc32(b"\x5a" * len(DATA)) != zlib.crc32(DATA)


def test_tlb_flush_after_remap_reads_the_swapped_in_data():
    """With the flush after every page-table change the GPU walks the new tables: the
    checksum is of the data written before eviction."""
    assert run_remap(SubmitOrder.CORRECT) == zlib.crc32(DATA)


def test_correct_is_the_default_order():
    """No option, no wrong order: the driver submits in the documented sequence."""
    with Machine(ram_size=8 << 20, swap_size=0, device="spawn") as m:
        assert m.driver.order is SubmitOrder.CORRECT
        assert not m.driver.gpu.mmu.skip_flush
        m.check_clean()
    assert gem  # the GEM layer is what the sequence protects
