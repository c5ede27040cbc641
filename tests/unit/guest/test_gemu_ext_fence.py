"""The gemu driver's external-fence uAPI (vgem's fence ioctls) and BO wait, on a machine with
the GPU device in-process: a BO with a pending external fence is busy for the BO wait and for
the shrinker, and a GPU job that writes it waits for the fence (implicit dependency)."""

from __future__ import annotations

import pytest

from gemu.device.abi import packets as pk
from gemu.guest.errors import Ebusy, Einval, Enoent, Etimedout
from gemu.guest.gemu_drv.uapi import FENCE_WRITE, WRITE
from gemu.guest.locking import lockdep
from gemu.guest.mm.page_alloc import PAGE_SIZE
from gemu.host.machine import Machine


@pytest.fixture
def machine():
    lockdep.reset()
    with Machine(ram_size=8 << 20, swap_size=16 << 20, device="inproc") as m:
        yield m


@pytest.fixture
def f(machine):
    file = machine.open()
    yield file
    file.close()
    machine.check_clean()


def test_external_write_fence_keeps_the_bo_busy_and_resident(machine, f):
    """While an external write fence is pending the BO wait reports busy (-EBUSY at timeout
    0, -ETIMEDOUT otherwise) and reclaim leaves the BO alone; after the signal the wait
    returns and reclaim evicts it; its data comes back on the next access."""
    h = f.create_bo(4 * PAGE_SIZE)
    f.write(h, 0, b"keep")
    fid = f.fence_attach(h, FENCE_WRITE)
    obj = f.bo(h).obj
    with pytest.raises(Ebusy, match="is busy"):
        f.wait_bo(h, 0)
    with pytest.raises(Etimedout, match=r"still busy after 0\.01 s"):
        f.wait_bo(h, 0.01)
    stats = machine.dev.shmem_mm.stats
    skipped = stats.skipped_busy
    machine.reclaim(machine.allocator.totalram_pages)
    assert not obj.evicted and stats.skipped_busy > skipped
    f.fence_signal(fid)
    f.wait_bo(h, 0)
    machine.reclaim(machine.allocator.totalram_pages)
    assert obj.evicted
    assert f.read(h, 0, 4) == b"keep"
    with pytest.raises(Enoent, match="no pending external fence"):
        f.fence_signal(fid)


def test_gpu_job_waits_for_an_external_write_fence(f):
    """A GPU job that writes a BO depends on the BO's pending writer (implicit sync): it
    runs only once the external fence is signalled."""
    h = f.create_bo(PAGE_SIZE)
    va = f.vm_bind(h)
    fid = f.fence_attach(h, FENCE_WRITE)
    job = f.submit(pk.fill(va, PAGE_SIZE, 0x11223344), bos=[(h, WRITE)])
    with pytest.raises(Etimedout):
        f.wait(job, timeout=0.05)
    assert f.read(h, 0, 4) == b"\0\0\0\0"
    f.fence_signal(fid)
    f.wait(job, timeout=5.0)
    assert f.read(h, 0, 4) == (0x11223344).to_bytes(4, "little")


def test_attach_errors_and_close_signals_pending_fences(machine):
    """Unknown handles are -ENOENT, unknown flags -EINVAL, a writer over a reader -EBUSY;
    closing the file signals what is still pending (no 10 s wait for the timers)."""
    f = machine.open()
    h = f.create_bo(PAGE_SIZE)
    with pytest.raises(Enoent):
        f.fence_attach(999)
    with pytest.raises(Einval, match="unknown flags"):
        f.fence_attach(h, 4)
    reader = f.fence_attach(h)
    fence = f.ext_fences.fence(reader)
    with pytest.raises(Ebusy, match="pending fence"):
        f.fence_attach(h, FENCE_WRITE)
    with pytest.raises(Ebusy):
        f.wait_bo(h, 0)  # a reader is a fence the BO wait waits for too
    f.close()
    assert fence.timestamp and not fence.expired
    machine.check_clean()
