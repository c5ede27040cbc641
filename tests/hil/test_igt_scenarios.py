"""IGT-style scenarios on the real device (a spawned ``gemu device``), in the spirit of
gem_madvise, gem_shrink, gem_exec_* and gem_reset_stats: purgeable objects, a workload
larger than guest RAM with GPU and CPU checksums, pinned and busy objects under pressure,
and a GPU hang recovered by timeout + reset. After every test the machine is clean: no frame
or swap slot leaked, no GEM object left, no lockdep report.
"""

from __future__ import annotations

import random
import zlib

import pytest

from gemu.device.abi import packets as pk
from gemu.device.abi.enums import WaitFunc
from gemu.guest.drm.gem_shmem import SigBus
from gemu.guest.errors import Einval, Etimedout
from gemu.guest.gemu_drv.uapi import READ, WRITE
from gemu.host.machine import Machine

RAM = 8 << 20


@pytest.fixture
def machine():
    with Machine(ram_size=RAM, swap_size=32 << 20, device="spawn") as m:
        yield m
        m.check_clean()


def u32(b: bytes, off: int = 0) -> int:
    return int.from_bytes(b[off : off + 4], "little")


def pressure(m: Machine) -> None:
    """Reclaim as much as the shrinker can give (what an allocation storm would cause)."""
    m.reclaim(m.allocator.totalram_pages)


def test_purgeable_objects_are_purged_and_then_fail_cleanly(machine):
    """gem_madvise: DONTNEED objects go first under pressure; afterwards a CPU access
    SIGBUSes, madvise(WILLNEED) reports them not retained, and a submit using one fails
    with -EINVAL before anything runs. Objects kept WILLNEED keep their contents."""
    f = machine.open()
    keep = f.create_bo(16384)
    f.write(keep, 0, b"k" * 16384)
    gone = [f.create_bo(16384) for _ in range(4)]
    for h in gone:
        f.write(h, 0, b"p" * 16384)
        f.vm_bind(h)
        assert f.madvise(h, willneed=False)
    free_before = machine.allocator.nr_free
    pressure(machine)
    assert machine.allocator.nr_free >= free_before + 4 * 4
    for h in gone:
        assert f.bo(h).obj.madv < 0
        with pytest.raises(SigBus, match="purged"):
            f.read(h, 0, 4)
        assert not f.madvise(h, willneed=True)
        with pytest.raises(Einval, match="was purged"):
            f.submit(pk.fill(f.va_of(h), 4096, 0), bos=[(h, WRITE)])
    assert f.read(keep, 0, 16384) == b"k" * 16384
    for h in [keep, *gone]:
        f.close_bo(h)
    f.close()


def test_workload_three_times_ram_survives_swap(machine):
    """gem_shrink-style: 24 MiB of BOs on 8 MiB of RAM, filled by the GPU, checksummed by
    the GPU in many jobs in random order, then read back by the CPU. Every byte survives
    eviction to swap and swap-in into different frames."""
    m = machine
    f = m.open()
    rng = random.Random(1234)
    size = 128 << 10
    n = (3 * RAM) // size
    results = f.create_bo(4 * n * 4)
    rva = f.vm_bind(results)
    f.pin(results)
    bos, values, first_frames = [], [], {}
    fences = []
    for i in range(n):
        h = f.create_bo(size)
        f.vm_bind(h)
        value = rng.getrandbits(32)
        cmd = pk.fill(f.va_of(h), size, value) + pk.write_data(f.va_of(h), [i, ~i & 0xFFFFFFFF])
        fences.append(f.submit(cmd, bos=[(h, WRITE)]))
        bos.append(h)
        values.append(value)
        if len(fences) > 4:
            f.wait(fences.pop(0), 10)
    for fence in fences:
        f.wait(fence, 10)

    def expected(i: int) -> bytes:
        body = bytearray(values[i].to_bytes(4, "little") * (size // 4))
        body[0:8] = i.to_bytes(4, "little") + (~i & 0xFFFFFFFF).to_bytes(4, "little")
        return bytes(body)

    for i, h in enumerate(bos):
        obj = f.bo(h).obj
        if obj.pages is not None and not obj.evicted:
            first_frames[i] = tuple(obj.pages)
    stats = m.dev.shmem_mm.stats
    assert stats.evicted > 0, "the workload did not exceed RAM"
    # three rounds of GPU checksums, three BOs per job, in random order
    fences = []
    for rnd in range(3):
        order = list(range(n))
        rng.shuffle(order)
        for k in range(0, n, 3):
            group = order[k : k + 3]
            cmd = b"".join(pk.crc32(f.va_of(bos[i]), size, rva + 4 * (rnd * n + i)) for i in group)
            refs = [(bos[i], READ) for i in group] + [(results, WRITE)]
            fences.append(f.submit(cmd, bos=refs))
            if len(fences) > 2:
                f.wait(fences.pop(0), 10)
    for fence in fences:
        f.wait(fence, 10)
    crcs = f.read(results, 0, 4 * 3 * n)
    want = [zlib.crc32(expected(i)) for i in range(n)]
    for rnd in range(3):
        got = [u32(crcs, 4 * (rnd * n + i)) for i in range(n)]
        assert got == want, f"GPU checksum mismatch in round {rnd}"
    assert stats.swapped_in > 0
    moved = 0
    for i, h in enumerate(bos):
        assert zlib.crc32(f.read(h, 0, size)) == want[i], f"CPU checksum of BO {i}"
        obj = f.bo(h).obj
        if i in first_frames and obj.pages is not None and obj.pages != first_frames[i]:
            moved += 1
    assert moved > 0, "no BO came back in different frames"
    f.unpin(results)
    for h in [*bos, results]:
        f.close_bo(h)
    f.close()


def test_pinned_and_busy_objects_are_never_reclaimed(machine):
    """Pressure while a pinned BO and a BO used by a running job exist: neither loses its
    frames; idle unpinned BOs are evicted instead. The job's checksum is right."""
    m = machine
    f = m.open()
    pinned, busy, idle, sem, out = (f.create_bo(s) for s in (65536, 65536, 65536, 4096, 4096))
    for h in (pinned, busy, idle, sem, out):
        f.vm_bind(h)
    f.write(pinned, 0, b"P" * 65536)
    f.write(busy, 0, b"B" * 65536)
    f.pin(pinned)
    f.pin(sem)
    cmd = pk.wait_mem(f.va_of(sem), 1, function=WaitFunc.EQ) + pk.crc32(
        f.va_of(busy), 65536, f.va_of(out)
    )
    fence = f.submit(cmd, bos=[(sem, READ), (busy, READ), (out, WRITE)])
    pinned_pages = tuple(f.bo(pinned).obj.pages)
    busy_pages = tuple(f.bo(busy).obj.pages)
    # an allocation storm: BOs for more than the free RAM
    storm = [f.create_bo(1 << 20) for _ in range(RAM // (1 << 20) + 2)]
    pressure(m)
    assert f.bo(pinned).obj.pages == pinned_pages and not f.bo(pinned).obj.evicted
    assert f.bo(busy).obj.pages == busy_pages and not f.bo(busy).obj.evicted
    assert f.bo(idle).obj.evicted
    assert m.dev.shmem_mm.stats.skipped_busy > 0
    f.write(sem, 0, (1).to_bytes(4, "little"))
    f.wait(fence, 10)
    assert u32(f.read(out, 0, 4)) == zlib.crc32(b"B" * 65536)
    assert f.read(pinned, 0, 65536) == b"P" * 65536
    f.unpin(pinned)
    f.unpin(sem)
    for h in (pinned, busy, idle, sem, out, *storm):
        f.close_bo(h)
    f.close()


@pytest.fixture
def hang_machine():
    with Machine(ram_size=RAM, swap_size=0, device="spawn", timeout_ns=300_000_000) as m:
        yield m
        m.check_clean()


def test_gpu_hang_is_recovered_by_timeout_and_reset(hang_machine):
    """gem_reset_stats: a job waits forever (WAIT_MEM with no timeout on a value nobody
    writes). The scheduler's timeout resets the GPU: the hung job fails with -ETIMEDOUT and a
    message saying so, the innocent jobs queued behind it (from another file too) are
    resubmitted and complete, and the GPU keeps working."""
    m = hang_machine
    f, g = m.open(), m.open()
    sem = f.create_bo(4096)
    f.vm_bind(sem)
    out_f, out_g = f.create_bo(4096), g.create_bo(4096)
    f.vm_bind(out_f)
    g.vm_bind(out_g)
    hang = f.submit(pk.wait_mem(f.va_of(sem), 1, function=WaitFunc.EQ), bos=[(sem, READ)])
    after_f = f.submit(pk.write_data(f.va_of(out_f), [0xF]), bos=[(out_f, WRITE)])
    after_g = g.submit(pk.write_data(g.va_of(out_g), [0x6]), bos=[(out_g, WRITE)])
    with pytest.raises(Etimedout, match=r"timed out after 300 ms .*GPU reset"):
        f.wait(hang, 10)
    f.wait(after_f, 10)
    g.wait(after_g, 10)
    assert u32(f.read(out_f, 0, 4)) == 0xF
    assert u32(g.read(out_g, 0, 4)) == 0x6
    stats = m.driver.gpu.stats
    assert stats.resets == 1 and stats.resubmitted == 2
    f.wait(f.submit(pk.write_data(f.va_of(out_f), [0x10]), bos=[(out_f, WRITE)]), 10)
    assert u32(f.read(out_f, 0, 4)) == 0x10
    for h in (sem, out_f):
        f.close_bo(h)
    g.close_bo(out_g)
    f.close()
    g.close()


def test_concurrent_submitters_against_reclaim(machine):
    """gem_exec_* under gem_shrink: two clients submit checksum jobs over their own BOs (2x
    RAM in total) from two threads while a third thread keeps reclaiming. Every checksum is
    right and no job faults: validation and reclaim exclude each other through the resv."""
    import threading

    m = machine
    size = 256 << 10
    per_client = RAM // size  # each client alone fills RAM
    errors: list[BaseException] = []
    stop = threading.Event()

    def client(seed: int) -> None:
        try:
            f = m.open()
            rng = random.Random(seed)
            out = f.create_bo(4 * per_client)
            f.vm_bind(out)
            f.pin(out)
            bos, want = [], []
            for i in range(per_client):
                h = f.create_bo(size)
                f.vm_bind(h)
                data = bytes([seed * 16 + i]) * size
                f.write(h, 0, data)
                bos.append(h)
                want.append(zlib.crc32(data))
            for _ in range(3):
                order = list(range(per_client))
                rng.shuffle(order)
                fences = []
                for i in order:
                    cmd = pk.crc32(f.va_of(bos[i]), size, f.va_of(out) + 4 * i)
                    fences.append(f.submit(cmd, bos=[(bos[i], READ), (out, WRITE)]))
                    if len(fences) > 3:
                        f.wait(fences.pop(0), 20)
                for fence in fences:
                    f.wait(fence, 20)
                got = f.read(out, 0, 4 * per_client)
                assert [u32(got, 4 * i) for i in range(per_client)] == want
            f.unpin(out)
            for h in [*bos, out]:
                f.close_bo(h)
            f.close()
        except BaseException as exc:
            errors.append(exc)

    def reclaimer() -> None:
        while not stop.is_set():
            try:
                pressure(m)
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=client, args=(s,)) for s in (1, 2)]
    rec = threading.Thread(target=reclaimer)
    for t in [*threads, rec]:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    rec.join(10)
    assert not errors, errors
    assert m.driver.gpu.stats.mmu_faults == 0
    assert m.dev.shmem_mm.stats.evicted > 0 and m.dev.shmem_mm.stats.swapped_in > 0


def test_shared_bos_locked_in_opposite_orders(machine):
    """Two clients share four BOs and list them in opposite orders, so their drm_exec loops
    contend and back off (wait-die); every job adds 1 to a counter in each BO. No deadlock,
    no lost update: each counter ends at the number of jobs."""
    import threading

    from gemu.guest.drm import gem

    m = machine
    f, g = m.open(), m.open()
    hf = [f.create_bo(4096) for _ in range(4)]
    hg = [gem.handle_create(g.drm, f.bo(h).obj) for h in hf]
    for h in hf:
        f.vm_bind(h)
    for h in hg:
        g.vm_bind(h)
    jobs = 150
    errors: list[BaseException] = []

    def client(file, handles) -> None:
        try:
            fences = []
            for _ in range(jobs):
                cmd = b"".join(pk.atomic_add(file.va_of(h), 1) for h in handles)
                fences.append(file.submit(cmd, bos=[(h, WRITE) for h in handles]))
            for fence in fences:
                file.wait(fence, 30)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=client, args=(f, hf)),
        threading.Thread(target=client, args=(g, list(reversed(hg)))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for h in hf:
        assert int.from_bytes(f.read(h, 0, 8), "little") == 2 * jobs
    f.close()
    g.close()
