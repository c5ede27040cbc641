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
from gemu.guest.drm import drm_gpuvm
from gemu.guest.errors import Efault, Enomem, KernelWarning
from gemu.guest.gemu_drv.job import Mutant
from gemu.guest.gemu_drv.vm_bind import VmBindDriver
from gemu.guest.locking import lockdep
from gemu.guest.locking.lockdep import LockdepError
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

    def submit(self, packets: bytes):
        slot = self.next % self.pages
        self.next += 1
        self.f.write(self.handle, slot * PAGE, packets)
        return self.f.exec(self.vm, CMD_VA + slot * PAGE, len(packets))

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
