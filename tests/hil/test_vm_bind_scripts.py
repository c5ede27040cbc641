"""IGT-style VM_BIND scenarios through the job-script interface, on the real device (a
spawned ``gemu device``): bind, exec, eviction under memory pressure, rebind, and part of a
mapping unbound, after which a job faults on the unbound part and not on the rest. Each
scenario is a script run by :class:`~gemu.host.shell.Shell` on a ``Machine(driver_mode=
"vm-bind")``; the data the console's ``info vms`` shows (:func:`gemu.host.query.vms`) is
checked at each step, and every byte by the CPU (``expect cpucrc``, ``expect value``) and by
the GPU (``expect crc VM ...``, a CRC32 job run through the VM)."""

from __future__ import annotations

import random
import zlib

import pytest

from gemu.guest import errors
from gemu.host.machine import Machine
from gemu.host.shell import Shell

MIB = 1 << 20


@pytest.fixture
def machine():
    was = errors.is_strict()
    errors.set_strict(False)  # a script's failures are counted, as under gemu run
    try:
        with Machine(
            ram_size=8 * MIB, swap_size=32 * MIB, device="spawn", driver_mode="vm-bind"
        ) as m:
            yield m
            m.check_clean()
    finally:
        errors.set_strict(was)


@pytest.fixture
def sh(machine):
    lines: list[str] = []
    shell = Shell(machine, lines.append)
    shell.lines = lines
    yield shell
    summary = shell.poweroff()
    assert summary.ok, summary.problems()


def run(sh: Shell, text: str) -> None:
    """Run script lines; every line must hold (the output is in the failure)."""
    ok = sh.run_text(text)
    assert ok, "\n".join(sh.lines)


def vm_view(sh: Shell, name: str) -> dict:
    return next(v for v in sh.m.query("vms", sh) if v["name"] == name)


def user_mappings(view: dict) -> list[tuple[int, int, str, int, bool]]:
    return [
        (mp["va"], mp["size"], mp["bo"], mp["offset"], mp["evicted"])
        for mp in view["mappings"]
        if not mp["bo"].startswith("_")
    ]


def crc_of(seed: int, size: int, start: int = 0, end: int | None = None) -> str:
    data = random.Random(seed).randbytes(size)
    return f"{zlib.crc32(data[start:end]):#010x}"


FILL_11 = f"{zlib.crc32(bytes([0x11]) * 0x2000):#010x}"
FILL_22 = f"{zlib.crc32(bytes([0x22]) * 0x4000):#010x}"


def test_unbind_part_of_a_mapping_then_exec_faults_only_on_the_unbound_part(sh):
    """xe_vm-style partial unbind: the middle 8 KiB of a 32 KiB mapping go (drm_gpuvm_sm_unmap:
    one REMAP keeping both ends, offsets kept). A job filling the first piece and one filling
    the last succeed and land in exactly those pages of the BO; a job touching the hole fails
    with a GPU MMU fault naming its VA; the hole's pages keep what they held, by CPU and GPU."""
    run(
        sh,
        f"""
        v = vm create
        x = bo 32K
        fill x random 7
        b = bind v 0x20000000 x
        wait b
        expect crc v 0x20000000 32K == {crc_of(7, 32 << 10)}
        u = unbind v 0x20002000 8K after b
        wait u
        """,
    )
    assert user_mappings(vm_view(sh, "v")) == [
        (0x2000_0000, 0x2000, "x", 0, False),
        (0x2000_4000, 0x4000, "x", 0x4000, False),
    ]
    run(
        sh,
        f"""
        e1 = exec v fill 0x20000000 8K 0x11111111
        e2 = exec v fill 0x20004000 16K 0x22222222
        wait e1 e2
        e3 = exec v fill 0x20002000 4K 0x33333333
        expect fault e3
        expect cpucrc x 8K == {FILL_11}
        expect cpucrc x+0x2000 8K == {crc_of(7, 32 << 10, 0x2000, 0x4000)}
        expect cpucrc x+0x4000 16K == {FILL_22}
        expect crc v 0x20004000 16K == x+0x4000
        expect crc v 0x20000000 8K == x
        """,
    )
    assert any("fault" in line and "0x20002000" in line for line in sh.lines)


def test_evicted_under_pressure_and_revalidated_by_the_next_exec(sh):
    """A private and an external BO bound in one VM; reclaim takes both. The private one is
    on the VM's evict list at once (evicted under the VM's reservation); the external one is
    only marked (RESV_PROTECTED: drm_gpuvm_bo_evict leaves the list alone for an extobj) and
    joins the list when exec locks it (drm_gpuvm_prepare_objects). The next exec validates
    both: swapped in, mappings restored, evict list empty, and every byte intact."""
    run(
        sh,
        """
        v = vm create
        p = bo 1M private v
        s = bo 1M
        fill p random 1
        fill s random 2
        bp = bind v 0x10000000 p
        bs = bind v 0x30000000 s
        wait bp bs
        drop-caches
        expect state p evicted
        expect state s evicted
        """,
    )
    view = vm_view(sh, "v")
    assert all(e for *_, e in user_mappings(view))
    assert "p" in view["evict"] and "s" not in view["evict"]
    vm_bos = {vb["bo"]: vb for vb in view["vm_bos"]}
    assert vm_bos["p"]["evicted"] and vm_bos["s"]["evicted"]
    assert not vm_bos["p"]["external"] and vm_bos["s"]["external"]
    assert view["extobj"] == ["s"]
    run(
        sh,
        f"""
        e = exec v copy 0x10000000 0x30000000 512K
        wait e
        expect state p resident
        expect state s resident
        expect cpucrc s 512K == p
        expect cpucrc s+0x80000 512K == {crc_of(2, MIB, 0x80000)}
        expect crc v 0x30000000 1M == s
        expect crc v 0x10000000 1M == {crc_of(1, MIB)}
        expect stat shrinker.swapped_in >= 2
        """,
    )
    view = vm_view(sh, "v")
    assert view["evict"] == [] and not any(e for *_, e in user_mappings(view))
    reclaim = sh.m.query("reclaim")
    states = {b["name"]: b["reclaim_state"] for b in reclaim["bos"]}
    assert states["p"] == states["s"] == "GPU_MAPPED_SINGLE_VM"
    assert reclaim["stats"]["evicted"] >= 2


def test_shared_bo_is_evicted_in_every_vm_and_revalidated_per_vm(sh):
    """An external BO bound in two VMs at different VAs: reclaim marks its vm_bo evicted in
    both; an exec on VM a revalidates a's mapping only, b's stays evicted (and unmapped) until
    b's own exec. Both read the same bytes through their own mapping."""
    run(
        sh,
        """
        a = vm create
        b = vm create
        s = bo 256K
        fill s random 9
        ba = bind a 0x40000000 s
        bb = bind b 0x08000000 s 0x10000 128K    # a part of it, elsewhere
        wait ba bb
        drop-caches
        expect state s evicted
        expect crc a 0x40000000 256K == s
        """,
    )
    evicted = {
        name: next(vb["evicted"] for vb in vm_view(sh, name)["vm_bos"] if vb["bo"] == "s")
        for name in ("a", "b")
    }
    assert evicted == {"a": False, "b": True}
    mmu = {(mp["vm"], mp["name"]): mp for mp in sh.m.query("mmu", sh)["mappings"]}
    assert mmu[("a", "s")]["first_page_pa"] is not None
    assert mmu[("b", "s")]["first_page_pa"] is None
    run(sh, f"expect crc b 0x08000000 128K == {crc_of(9, 256 << 10, 0x10000, 0x30000)}\n")
    assert not any(vb["evicted"] for vb in vm_view(sh, "b")["vm_bos"])


def test_rebind_over_a_mapping_and_after_eviction(sh):
    """Binding y over the middle of x's mapping splits x's (REMAP) and maps y between; a
    copy sees x, y, x. After reclaim, rebinding x over the whole range again (an evicted
    mapping replaced) and exec'ing restores x's pages exactly."""
    run(
        sh,
        f"""
        v = vm create
        x = bo 16K
        y = bo 4K
        d = bo 16K
        fill x 0x78787878
        fill y 0x79797979
        bx = bind v 0x01000000 x
        by = bind v 0x01001000 y after bx
        bd = bind v 0x02000000 d
        e = exec v copy 0x01000000 0x02000000 16K after by bd
        wait e
        expect cpucrc d 4K == x
        expect cpucrc d+0x1000 4K == y
        expect cpucrc d+0x2000 8K == x+0x2000
        drop-caches
        expect state x evicted
        r = bind v 0x01000000 x
        e2 = exec v copy 0x01000000 0x02000000 16K after r
        wait e2
        expect cpucrc d 16K == x
        expect crc v 0x02000000 16K == {zlib.crc32(b"x" * 0x4000):#010x}
        """,
    )
    assert user_mappings(vm_view(sh, "v"))[:1] == [(0x0100_0000, 0x4000, "x", 0, False)]


def test_workload_larger_than_ram_with_shared_bos(sh):
    """xe_evict-style through scripts: three VMs, each with 2 MiB of private BOs, sharing two
    external BOs of 1 MiB; 8 MiB of BOs in an 8 MiB machine. Jobs on each VM in turn make
    its set resident and push the others out; every GPU CRC and the final CPU verify are
    exact, and reclaim evicted and swapped in repeatedly."""
    lines = ["s0 = bo 1M", "s1 = bo 1M", "fill s0 random 100", "fill s1 random 101"]
    for k, v in enumerate("abc"):
        lines += [f"{v} = vm create", f"{v}p = bo 2M private {v}", f"fill {v}p random {k}"]
        lines += [
            f"{v}1 = bind {v} 0x10000000 {v}p",
            f"{v}2 = bind {v} 0x40000000 s0",
            f"{v}3 = bind {v} 0x40100000 s1",
            f"wait {v}1 {v}2 {v}3",
        ]
    for _round in range(2):
        for k, v in enumerate("abc"):
            lines += [
                f"expect crc {v} 0x10000000 2M == {crc_of(k, 2 * MIB)}",
                f"expect crc {v} 0x40000000 1M == {crc_of(100, MIB)}",
                f"expect crc {v} 0x40100000 1M == s1",
            ]
    lines += ["verify", "expect stat shrinker.evicted >= 4", "expect stat shrinker.swapped_in >= 4"]
    run(sh, "\n".join(lines) + "\n")
    assert sh.sum.checks_passed >= 20


def test_fences_order_binds_unbinds_and_execs(sh):
    """In- and out-fences through the script language: a job held by a WAIT_MEM keeps an
    unbind given its fence pending (the mapping stays until the job is done); poking the
    word releases both, the job's copy lands; a bind given the job's fence runs after it;
    vm destroy waits for the VM's work and the VM is gone from the views."""
    run(
        sh,
        """
        v = vm create
        sem = bo 4K
        src = bo 8K
        dst = bo 8K
        fill src 0x5a5a5a5a
        b1 = bind v 0x100000 sem
        b2 = bind v 0x200000 src
        b3 = bind v 0x300000 dst
        e = exec v waitmem 0x100000 1 after b1 b2 b3
        c = exec v copy 0x200000 0x300000 8K after e
        u = unbind v 0x200000 8K after c
        expect fence u pending
        later = bind v 0x400000 src after c
        expect fence later pending
        poke sem 1
        wait c u later
        expect cpucrc dst 8K == src
        expect crc v 0x400000 8K == src
        """,
    )
    mine = {mp["va"] for mp in vm_view(sh, "v")["mappings"] if not mp["bo"].startswith("_")}
    assert mine == {0x100000, 0x300000, 0x400000}  # 0x200000 unbound after the copy
    run(sh, "e2 = exec v fill 0x200000 4K 1\nexpect fault e2\nvm destroy v\n")
    assert sh.m.query("vms", sh) == []
    assert sh.m.query("reclaim")["vms"] == []
