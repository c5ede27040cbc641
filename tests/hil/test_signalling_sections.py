"""The fence signalling critical section lasts until dma_fence_signal(): the submitter's part
ends at the push, and the paths that carry the fence on to its signal (drm_sched's run_job,
the driver's interrupt handler, its timeout/reset path) are annotated too. Run against the
real device model (a spawned ``gemu device`` process)."""

from __future__ import annotations

import struct

import pytest

from gemu.device.abi import packets as pk
from gemu.device.abi.enums import WaitFunc
from gemu.guest import errors
from gemu.guest.errors import Etimedout
from gemu.guest.gemu_drv.job import Mutant
from gemu.guest.gemu_drv.uapi import READ, WRITE
from gemu.guest.locking import lockdep
from gemu.host.machine import Machine

RAM = 8 << 20


def u32(b: bytes) -> int:
    return struct.unpack("<I", b)[0]


def new_reports(before: dict) -> list[lockdep.LockdepReport]:
    return [r for r in lockdep.reports() if before.get(id(r), 0) != r.count]


def hang_and_recover(m: Machine) -> None:
    """A job that waits forever, one queued behind it; the timeout resets the GPU."""
    f = m.open()
    sem, out = f.create_bo(4096), f.create_bo(4096)
    f.vm_bind(sem)
    f.vm_bind(out)
    hang = f.submit(pk.wait_mem(f.va_of(sem), 1, function=WaitFunc.EQ), bos=[(sem, READ)])
    after = f.submit(pk.write_data(f.va_of(out), [0x5A]), bos=[(out, WRITE)])
    with pytest.raises(Etimedout, match="GPU reset"):
        f.wait(hang, 10)
    f.wait(after, 10)
    assert u32(f.read(out, 0, 4)) == 0x5A
    for h in (sem, out):
        f.close_bo(h)
    f.close()


@pytest.fixture
def lax():
    """Reports counted, not raised (as in emulator runs): the report happens in the
    scheduler's timeout work, which must go on to reset the GPU."""
    was = errors.is_strict()
    errors.set_strict(False)
    yield
    errors.set_strict(was)


def test_reset_path_that_may_reclaim_is_reported(lax):
    """The reset path signals every pending fence: a crash-state capture there that may enter
    reclaim (GFP_KERNEL, as msm's recover_worker did before "forbid mem reclaim from reset")
    is a lockdep signalling report, while the GPU still recovers."""
    with Machine(ram_size=RAM, swap_size=0, timeout_ns=300_000_000) as m:
        m.driver.set_mutant(Mutant.RESET_ALLOCATES)
        before = {id(r): r.count for r in lockdep.reports()}
        hang_and_recover(m)
        reports = new_reports(before)
        assert [r.kind for r in reports] == ["signalling"]
        assert "a reclaimable allocation (might_alloc) inside a dma_fence signalling" in (
            reports[0].message
        )
        assert any("crashstate_capture" in s for s in reports[0].stacks)
        assert any("recover" in s for s in reports[0].stacks)
        lockdep.reset()


def test_reset_path_captures_under_noreclaim_and_is_clean():
    """The correct driver captures the crash state under memalloc_noreclaim_save() (the msm
    fix): the reset is clean, and the capture names the hung job and holds the ring."""
    with Machine(ram_size=RAM, swap_size=0, timeout_ns=300_000_000) as m:
        hang_and_recover(m)
        state = m.driver.gpu.crashstate
        assert state is not None and "timed out" in state.message
        assert state.hung_seqno == 1 and state.pending_seqnos == (1, 2)
        assert len(state.ring) == m.driver.gpu.ring_size
        m.check_clean()


def test_machine_strict_signalling_switch():
    """``Machine(strict_signalling=True)`` turns on the implicit section for the guest; the
    correct driver's submit path runs clean under it (nothing allocates, locks a reservation
    or waits between publishing its fences and the push). The default is real lockdep's
    view."""
    with Machine(ram_size=RAM, swap_size=0, strict_signalling=True) as m:
        assert lockdep.implicit_signalling()
        f = m.open()
        src, dst = f.create_bo(4096), f.create_bo(4096)
        f.write(src, 0, b"\x11" * 4096)
        f.vm_bind(src)
        f.vm_bind(dst)
        f.wait(
            f.submit(pk.copy(f.va_of(src), f.va_of(dst), 4096), bos=[(src, READ), (dst, WRITE)]), 10
        )
        assert f.read(dst, 0, 4) == b"\x11" * 4
        for h in (src, dst):
            f.close_bo(h)
        f.close()
        m.check_clean()
    with Machine(ram_size=RAM, swap_size=0) as m:
        assert not lockdep.implicit_signalling()
