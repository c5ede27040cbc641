"""The out-fence a submit returns (:class:`~gemu.guest.gemu_drv.uapi.JobFence`) holds its
own reference on the job's finished fence, as a drm_syncobj or sync_file does, until it is
closed: it stays usable as a dependency and for waits after the job was freed, closing it
twice or using it closed is -ENOENT, and closing the file closes the rest."""

from __future__ import annotations

import pytest

from gemu.device.abi import packets as pk
from gemu.guest import errors
from gemu.guest.errors import Enoent
from gemu.guest.gemu_drv.uapi import READ, WRITE
from gemu.guest.locking import lockdep
from gemu.host.machine import Machine


@pytest.fixture
def machine():
    lockdep.reset()
    errors.reset_warn_stats()
    with Machine(ram_size=8 << 20, swap_size=16 << 20, device="inproc") as m:
        yield m
    assert not errors.warn_stats().counts


def _copy_job(f):
    src, dst = f.create_bo(4096), f.create_bo(4096)
    sva, dva = f.vm_bind(src), f.vm_bind(dst)
    return pk.copy(sva, dva, 4096), [(src, READ), (dst, WRITE)]


def test_a_signalled_out_fence_is_a_valid_dependency_after_its_job_was_freed(machine):
    """The reported chain: job 1 ends and is freed, later jobs of the same entity replace
    its fence everywhere else; ``after`` it still takes a reference (no warning) and the
    fence is released only when the out-fence closes."""
    f = machine.open()
    cmd, bos = _copy_job(f)
    f1 = f.submit(cmd, bos=bos)
    f.wait(f1)
    for _ in range(2):  # the shell's CRC checks: later jobs on the same entity and BOs
        f.wait(f.submit(cmd, bos=bos))
    dma = f1.fence
    assert dma.refcount == 1  # the out-fence's own reference is all that is left
    f2 = f.submit(cmd, bos=bos, in_fences=[f1])
    f.wait(f2)
    f.wait(f1)  # waited twice
    f1.close()
    assert dma.refcount == 0
    assert f1.signaled and f1.error == 0  # the state it had when closed
    with pytest.raises(Enoent, match="is closed"):
        f.wait(f1)
    with pytest.raises(Enoent, match="is closed"):
        f.submit(cmd, bos=bos, in_fences=[f1])
    with pytest.raises(Enoent, match="already closed"):
        f1.close()
    f.close()
    assert f2.closed and f2.fence.refcount == 0  # closing the file closed the rest
    machine.check_clean()


def test_a_failed_submit_keeps_no_reference(machine):
    """A submit refused before it runs (a closed in-fence) takes nothing: the in-fences'
    references balance."""
    f = machine.open()
    cmd, bos = _copy_job(f)
    f1 = f.submit(cmd, bos=bos)
    f.wait(f1)
    before = f1.fence.refcount
    with pytest.raises(errors.KernelError):
        f.submit(cmd, bos=[(999, READ)], in_fences=[f1])
    assert f1.fence.refcount == before
    f.close()
    machine.check_clean()


def test_closing_the_file_closes_its_open_out_fences_in_submit_order(machine, monkeypatch):
    """The file's open out-fences are closed in the order they were made, never in an order
    that depends on object addresses: closing reaches preemption points, and an explored
    schedule must be a pure function of its seed."""
    from gemu.guest.gemu_drv import uapi

    closed = []
    real_close = uapi.JobFence.close

    def close(self):
        closed.append(self.seqno)
        real_close(self)

    monkeypatch.setattr(uapi.JobFence, "close", close)
    f = machine.open()
    cmd, bos = _copy_job(f)
    outs = [f.submit(cmd, bos=bos) for _ in range(24)]
    for out in outs:
        f.wait(out)
    f.close()
    assert closed == [out.seqno for out in outs]
