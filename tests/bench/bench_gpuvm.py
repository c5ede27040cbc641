"""Benchmarks of the VM_BIND flavour (drm_gpuvm, issue 13), on the spawned device.

- **exec rate**: NOP jobs through the flavour's exec (drm_gpuvm_exec_lock of the VM's resv and
  its external BOs, drm_gpuvm_validate, arm, drm_gpuvm_resv_add_fence, push, unlock) on a VM
  mapping ``BOS`` BOs (half private, half external), pipelined; next to the legacy flow's rate
  in the same run (a BO list of the same ``BOS`` BOs per submit, drm_exec + per-BO validate).
- **mapping count**: a VM with 1,000 / 3,000 / 10,000 single-page mappings, either of one BO
  (sparse binding: page i at its own VA) or of as many one-page BOs. Bind time: every map
  ioctl queued, until the last bind's out-fence signals. Validate time: after reclaim evicted
  everything (checked: every data mapping and BO evicted before, restored after), the first
  exec (which swaps in and rewrites every mapping's PTEs) from submit to its fence, best of
  two rounds (three without ``--quick``), less the best of three execs with nothing evicted:
  what the mappings cost, not the exec around them. The growth exponent is the least-squares
  slope of log(time) over log(count): 1.0 is linear.
"""

from __future__ import annotations

import math
import time

from gemu.device.abi import packets as pk
from gemu.guest.drm import drm_gpuvm
from gemu.guest.gemu_drv.uapi import READ
from gemu.guest.gemu_drv.vm_bind import VmBindDriver
from gemu.host.machine import Machine
from tests.bench.common import Row

PAGE = 4096
CMD_VA = 0x10_0000
DATA_VA = 0x1000_0000
BOS = 8
COUNTS = (1_000, 3_000, 10_000)
WAIT_S = 600.0


def _pipelined(submit, wait, n: int, window: int = 256) -> float:
    fences = []
    t0 = time.perf_counter()
    for _ in range(n):
        fences.append(submit())
        if len(fences) >= window:
            wait(fences[0])
            del fences[: window // 2]
    wait(fences[-1])
    return n / (time.perf_counter() - t0)


def _legacy_rate(n: int) -> float:
    with Machine(ram_size=64 << 20, swap_size=0, device="spawn") as m:
        f = m.open()
        bos = []
        for _ in range(BOS):
            h = f.create_bo(PAGE)
            f.vm_bind(h)
            bos.append((h, READ))
        nop = pk.nop()

        def submit():
            return f.submit(nop, bos=bos)

        _pipelined(submit, lambda x: f.wait(x, WAIT_S), 300)  # warm up
        rate = _pipelined(submit, lambda x: f.wait(x, WAIT_S), n)
        for h, _ in bos:
            f.close_bo(h)
        f.close()
    return rate


def _gpuvm_rate(n: int) -> float:
    with Machine(ram_size=64 << 20, swap_size=0, device="spawn") as m:
        drv = VmBindDriver(m.driver)
        f = drv.open()
        vm = f.vm_create()
        cmd = f.bo_create(PAGE, vm_id=vm)
        nop = pk.nop()
        f.write(cmd, 0, nop)
        fences = [f.map(vm, CMD_VA, PAGE, cmd)]
        for i in range(BOS):
            h = f.bo_create(PAGE, vm_id=vm if i % 2 else None)
            fences.append(f.map(vm, DATA_VA + i * PAGE, PAGE, h))
        for fence in fences:
            f.wait(fence, WAIT_S)

        def submit():
            return f.exec(vm, CMD_VA, len(nop))

        _pipelined(submit, lambda x: f.wait(x, WAIT_S), 300)  # warm up
        rate = _pipelined(submit, lambda x: f.wait(x, WAIT_S), n)
        f.close()
        drv.remove()
    return rate


def _timed_exec(f, vm: int, nop: bytes) -> float:
    t0 = time.perf_counter()
    f.wait(f.exec(vm, CMD_VA, len(nop)), WAIT_S)
    return time.perf_counter() - t0


def _mappings(count: int, one_bo: bool, repeats: int) -> tuple[float, float]:
    """(bind seconds, validate seconds) for ``count`` single-page mappings.

    Validate is the best of ``repeats`` rounds of reclaim + exec, less the best of three
    execs with nothing evicted (what every exec costs, whatever the mapping count)."""
    ram = max(64 << 20, count * PAGE * 3)
    with Machine(ram_size=ram, swap_size=ram, device="spawn") as m:
        drv = VmBindDriver(m.driver)
        f = drv.open()
        vm = f.vm_create()
        cmd = f.bo_create(PAGE, vm_id=vm)
        nop = pk.nop()
        f.write(cmd, 0, nop)
        f.wait(f.map(vm, CMD_VA, PAGE, cmd), WAIT_S)
        if one_bo:
            bo = f.bo_create(count * PAGE, vm_id=vm)
            ranges = [(bo, i * PAGE) for i in range(count)]
        else:
            ranges = [(f.bo_create(PAGE, vm_id=vm), 0) for _ in range(count)]
        t0 = time.perf_counter()
        last = None
        for i, (h, offset) in enumerate(ranges):
            last = f.map(vm, DATA_VA + 2 * i * PAGE, PAGE, h, offset=offset)
        f.wait(last, WAIT_S)
        bind_s = time.perf_counter() - t0
        gvm = f.vms[vm]
        gvm.flush_cleanup()
        idle_s = min(_timed_exec(f, vm, nop) for _ in range(3))
        validate_s = math.inf
        for _ in range(repeats):
            m.reclaim(m.allocator.totalram_pages)
            _check_evicted(gvm, count, True)
            validate_s = min(validate_s, _timed_exec(f, vm, nop))
            _check_evicted(gvm, count, False)
        f.close()
        drv.remove()
    return bind_s, max(validate_s - idle_s, 1e-9)


def _check_evicted(vm, count: int, evicted: bool) -> None:
    """The validate row times what it names: reclaim evicted every data mapping (and its
    BO), and the exec restored them all."""
    data = [va for va in drm_gpuvm.for_each_va(vm) if va.va.addr >= DATA_VA]
    if len(data) != count:
        raise RuntimeError(f"{vm.name}: {len(data)} data mappings, expected {count}")
    wrong = [va for va in data if va.evicted is not evicted or va.gem.obj.evicted is not evicted]
    if wrong:
        state = "evicted" if evicted else "restored"
        raise RuntimeError(f"{vm.name}: {len(wrong)} of {count} mappings not {state}: {wrong[0]!r}")


def _exponent(counts, times) -> float:
    xs = [math.log(c) for c in counts]
    ys = [math.log(t) for t in times]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def bench(quick: bool) -> list[Row]:
    rows: list[Row] = []
    n = 2000 if quick else 20000
    legacy = _legacy_rate(n)
    gpuvm = _gpuvm_rate(n)
    rows.append(
        Row(
            13,
            f"gpuvm: NOP exec on a VM of {BOS} BOs (exec_lock + validate + resv_add_fence)",
            gpuvm,
            "jobs/s",
            f"legacy submit, BO list of {BOS} (same run)",
            legacy,
            "informative (ratio: the flavour's exec against the legacy submit)",
            note=(
                f"{n} jobs pipelined each; half the VM's BOs private (one resv: the VM's), "
                "half external (a resv each, on the extobj list)"
            ),
        )
    )
    for one_bo, what in ((True, "one BO, a mapping per page"), (False, "a one-page BO each")):
        binds, validates = [], []
        for count in COUNTS:
            b, v = _mappings(count, one_bo, 2 if quick else 3)
            binds.append(b)
            validates.append(v)
        detail = "; ".join(
            f"{c:,}: bind {b:.2f} s, validate {v:.3f} s"
            for c, b, v in zip(COUNTS, binds, validates)
        )
        big, small = COUNTS[-1], COUNTS[0]
        rows.append(
            Row(
                13,
                f"gpuvm: bind {big:,} mappings ({what}), per mapping",
                binds[-1] / big * 1e6,
                "us",
                f"per mapping at {small:,} mappings",
                binds[0] / small * 1e6,
                "ratio <= 1.5 (linear)",
                higher_is_better=False,
                note=f"growth exponent {_exponent(COUNTS, binds):.2f}; {detail}",
            )
        )
        rows.append(
            Row(
                13,
                f"gpuvm: validate {big:,} evicted mappings ({what}), per mapping",
                validates[-1] / big * 1e6,
                "us",
                f"per mapping at {small:,} mappings",
                validates[0] / small * 1e6,
                "ratio <= 1.5 (linear)",
                higher_is_better=False,
                note=f"growth exponent {_exponent(COUNTS, validates):.2f}; the first exec "
                "after reclaim evicted everything (swap-in and a PTE rewrite per mapping), "
                "best of several rounds, less an exec with nothing evicted",
            )
        )
    return rows
