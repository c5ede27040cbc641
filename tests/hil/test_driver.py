"""The gemu driver against the real device (a spawned ``gemu device`` process): probe, jobs,
fences, GPU faults and command errors, dependencies, and a clean machine afterwards."""

from __future__ import annotations

import zlib

import pytest

from gemu.device.abi import packets as pk
from gemu.device.abi.enums import WaitFunc
from gemu.guest.errors import Efault, Einval, Eio, Enoent
from gemu.guest.gemu_drv.uapi import READ, WRITE
from gemu.host.machine import Machine


@pytest.fixture
def machine():
    with Machine(ram_size=8 << 20, swap_size=16 << 20, device="spawn") as m:
        yield m
        m.check_clean()


@pytest.fixture
def f(machine):
    file = machine.open()
    yield file
    file.close()


def u32(b: bytes) -> int:
    return int.from_bytes(b[:4], "little")


def test_probe_identifies_the_gpu_and_sets_up_the_ring(machine):
    """Probe read the ID, reset the GPU, gave the ring and fence page kernel frames and
    started the scheduler; the device runs in its own process with RAM shared by fd."""
    gpu = machine.driver.gpu
    assert machine.memory_mode == "fd"
    assert gpu.probed and gpu.ring_size in (4096, 16 * 4096)
    assert machine.driver.frames.frames >= 2
    assert machine.driver.sched is not None and machine.driver.sched.ready


def test_crc32_job_reads_what_the_cpu_wrote(f):
    """A CRC32 job over a BO written through its CPU mapping returns zlib's CRC of the data,
    and the out-fence signals without error."""
    data = bytes(range(256)) * 48  # 12 KiB, three pages
    src = f.create_bo(len(data))
    dst = f.create_bo(4096)
    va, dva = f.vm_bind(src), f.vm_bind(dst)
    f.write(src, 0, data)
    fence = f.submit(pk.crc32(va, len(data), dva), bos=[(src, READ), (dst, WRITE)])
    f.wait(fence, 5)
    assert fence.signaled and fence.error == 0
    assert u32(f.read(dst, 0, 4)) == zlib.crc32(data)
    f.close_bo(src)
    f.close_bo(dst)


def test_fill_and_copy_between_bos(f):
    """GPU writes land in the BO's frames: FILL then COPY, seen by the CPU."""
    a, b = f.create_bo(8192), f.create_bo(8192)
    va, vb = f.vm_bind(a), f.vm_bind(b)
    cmd = pk.fill(va, 8192, 0xA5A5A5A5) + pk.copy(va, vb, 8192)
    f.wait(f.submit(cmd, bos=[(a, WRITE), (b, WRITE)]), 5)
    assert f.read(b, 0, 8192) == b"\xa5" * 8192


def test_command_buffer_in_a_bo(f):
    """submit() also takes (handle, offset, size) of a BO holding the packets."""
    out = f.create_bo(4096)
    ova = f.vm_bind(out)
    cmd = pk.write_data(ova, [0x1234, 0x5678])
    cb = f.create_bo(4096)
    f.vm_bind(cb)
    f.write(cb, 64, cmd)
    f.wait(f.submit((cb, 64, len(cmd)), bos=[(out, WRITE)]), 5)
    assert f.read(out, 0, 8) == (0x1234).to_bytes(4, "little") + (0x5678).to_bytes(4, "little")


def test_mmu_fault_fails_the_job_with_a_decoded_message(f, machine):
    """A job writing an unmapped VA faults: its fence carries -EFAULT and the message names
    the AS, the VA, the access and the packet; the CP resumes and the next job runs."""
    out = f.create_bo(4096)
    ova = f.vm_bind(out)
    bad = f.submit(pk.fill(0x7000_0000, 4096, 1))
    with pytest.raises(Efault, match=r"TRANSLATION_L\d on WRITE at VA 0x70000000 by FILL"):
        f.wait(bad, 5)
    assert machine.driver.gpu.stats.mmu_faults == 1
    good = f.submit(pk.write_data(ova, [7]), bos=[(out, WRITE)])
    f.wait(good, 5)
    assert u32(f.read(out, 0, 4)) == 7


def test_bad_packet_fails_the_job_with_eio(f):
    """An unknown opcode stops the CP; the job fails with -EIO naming the error, the ring
    goes on."""
    with pytest.raises(Eio, match="UNKNOWN_OPCODE"):
        f.wait(f.submit(b"\xee\x00\x00\x00"), 5)
    f.wait(f.submit(pk.nop()), 5)


def test_read_only_bo_written_by_the_gpu_faults(f):
    """A BO listed READ but bound read-only faults on a GPU write (PERMISSION)."""
    from gemu.guest.gemu_drv.vm import Prot

    h = f.create_bo(4096)
    va = f.vm_bind(h, prot=Prot.READ)
    with pytest.raises(Efault, match="PERMISSION"):
        f.wait(f.submit(pk.fill(va, 4096, 1), bos=[(h, READ)]), 5)


def test_in_fence_orders_jobs_across_files(machine):
    """A job waits for its in-fence from another file before it runs: the second job's copy
    sees the first job's fill."""
    f1, f2 = machine.open(), machine.open()
    a = f1.create_bo(4096)
    va = f1.vm_bind(a)
    # share the same object with the second file through a second handle
    obj = f1.bo(a).obj
    from gemu.guest.drm import gem

    b = gem.handle_create(f2.drm, obj)
    vb = f2.vm_bind(b)
    out = f2.create_bo(4096)
    vo = f2.vm_bind(out)
    first = f1.submit(pk.fill(va, 4096, 0x11111111), bos=[(a, WRITE)])
    second = f2.submit(pk.copy(vb, vo, 4096), bos=[(b, READ), (out, WRITE)], in_fences=[first])
    f2.wait(second, 5)
    assert f2.read(out, 0, 4096) == b"\x11" * 4096
    f1.close()
    f2.close()


def test_uapi_errors_name_the_problem(f):
    """Bad handles, unbound BOs and odd command sizes are refused before anything runs."""
    with pytest.raises(Enoent, match="no BO handle 99"):
        f.submit(pk.nop(), bos=[(99, READ)])
    h = f.create_bo(4096)
    with pytest.raises(Einval, match="not bound"):
        f.submit(pk.nop(), bos=[(h, READ)])
    with pytest.raises(Einval, match="whole dwords"):
        f.submit(b"\x00\x00")


def test_wait_mem_semaphore_released_by_the_cpu(f):
    """A job blocked in WAIT_MEM goes on when the CPU writes the semaphore."""
    sem, out = f.create_bo(4096), f.create_bo(4096)
    vs, vo = f.vm_bind(sem), f.vm_bind(out)
    f.pin(sem)
    cmd = pk.wait_mem(vs, 1, function=WaitFunc.EQ) + pk.write_data(vo, [42])
    fence = f.submit(cmd, bos=[(sem, READ), (out, WRITE)])
    assert not fence.signaled
    f.write(sem, 0, (1).to_bytes(4, "little"))
    f.wait(fence, 5)
    assert u32(f.read(out, 0, 4)) == 42
    f.unpin(sem)


@pytest.mark.parametrize("kind", ["inproc", "spec"])
def test_machine_with_an_inproc_or_already_running_device(kind):
    """Machine(device=...) also runs the device on a thread of this process, or connects to
    a device that is already running (any transport spec); the driver works the same."""
    from tests.support.device import spawn_device

    def run(device: str) -> None:
        with Machine(ram_size=8 << 20, swap_size=0, device=device) as m:
            f = m.open()
            h = f.create_bo(4096)
            f.wait(f.submit(pk.fill(f.vm_bind(h), 4096, 0x01010101), bos=[(h, WRITE)]), 5)
            assert f.read(h, 0, 4096) == b"\x01" * 4096
            f.close()
            m.check_clean()

    if kind == "inproc":
        run("inproc")
    else:
        with spawn_device() as dev:
            run(dev.spec)


def test_bo_closed_while_a_job_uses_it_lives_until_the_job_is_done(f, machine):
    """Closing the last handle of a BO a running job uses does not free its frames: the job
    holds a reference until drm_sched frees it, then the BO goes."""
    sem, buf = f.create_bo(4096), f.create_bo(4096)
    f.vm_bind(sem)
    vb = f.vm_bind(buf)
    f.pin(sem)
    cmd = pk.wait_mem(f.va_of(sem), 1, function=WaitFunc.EQ) + pk.fill(vb, 4096, 0x77777777)
    fence = f.submit(cmd, bos=[(sem, READ), (buf, WRITE)])
    objects = machine.dev.object_count
    f.close_bo(buf)
    assert machine.dev.object_count == objects  # still alive: the job has it
    f.write(sem, 0, (1).to_bytes(4, "little"))
    f.wait(fence, 5)
    f.unpin(sem)
    f.close_bo(sem)


def test_vm_bind_and_unbind_rules(f):
    """A fixed VA that overlaps a binding is -EBUSY; unbinding a BO a job still uses is
    -EBUSY; once idle it unbinds (PTEs cleared, TLB flushed) and the VA can be reused."""
    from gemu.guest.errors import Ebusy

    a, b, sem = f.create_bo(8192), f.create_bo(4096), f.create_bo(4096)
    va = f.vm_bind(a, va=0x4000_0000)
    with pytest.raises(Ebusy, match="overlaps"):
        f.vm_bind(b, va=0x4000_1000)
    f.vm_bind(sem)
    f.pin(sem)
    cmd = pk.wait_mem(f.va_of(sem), 1, function=WaitFunc.EQ) + pk.fill(va, 8192, 1)
    fence = f.submit(cmd, bos=[(sem, READ), (a, WRITE)])
    with pytest.raises(Ebusy, match="still used by a job"):
        f.vm_unbind(a)
    f.write(sem, 0, (1).to_bytes(4, "little"))
    f.wait(fence, 5)
    f.vm_unbind(a)
    assert f.vm.lookup(va) == 0
    assert f.vm_bind(b, va=0x4000_1000) == 0x4000_1000
    f.unpin(sem)


def test_device_process_lost_fails_jobs_with_enodev():
    """If the device process dies, pending and new jobs fail with -ENODEV naming the lost
    device instead of hanging; the machine still shuts down."""
    from gemu.guest.errors import Enodev

    with Machine(ram_size=8 << 20, swap_size=0, device="spawn") as m:
        f = m.open()
        f.wait(f.submit(pk.nop()), 5)
        m._proc.kill()
        m._proc.wait(10)
        with pytest.raises(Enodev, match="device lost"):
            for _ in range(3):
                f.wait(f.submit(pk.nop()), 5)
