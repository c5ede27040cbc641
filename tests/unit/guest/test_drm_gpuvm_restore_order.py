"""The VM_BIND flavour's restore loop picks the mappings Panthor's does.

panthor_vm_restore_vmas()'s select_evicted_vma() takes the first evicted mapping from the
head of the vm_bo's list at every pick; gemu's ``vm_exec._EvictedVmas`` resumes after its last
pick instead. Here both run side by side on one vm_bo while, between picks (when the real loop
has dropped ``op_lock``), binds unlink mappings anywhere in the list and link new ones at its
tail, evicted or not (the pieces a split of an evicted mapping leaves), and the picked mapping
is restored when it is still linked. What never happens while validate holds the BO's resv
is not done either: a linked mapping is never marked evicted again. Every pick must be the
head walk's, for many seeded sequences.
"""

from __future__ import annotations

import random

import pytest

from gemu.guest.gemu_drv.vm_exec import _EvictedVmas

SEEDS = range(300)


class Va:
    """The fields the restore loop reads: ``vm_bo`` while linked, and ``evicted``."""

    __slots__ = ("evicted", "name", "vm_bo")

    def __init__(self, name: int, evicted: bool) -> None:
        self.name = name
        self.evicted = evicted
        self.vm_bo = None

    def __repr__(self) -> str:
        return f"va{self.name}{'*' if self.evicted else ''}"


class VmBo:
    __slots__ = ("gpuva",)

    def __init__(self) -> None:
        self.gpuva: dict[Va, None] = {}


def link(vm_bo: VmBo, va: Va) -> None:
    va.vm_bo = vm_bo
    vm_bo.gpuva[va] = None


def unlink(vm_bo: VmBo, va: Va) -> None:
    del vm_bo.gpuva[va]
    va.vm_bo = None


def head_walk(vm_bo: VmBo) -> Va | None:
    """select_evicted_vma(): the first evicted mapping from the head of the list."""
    for va in vm_bo.gpuva:
        if va.evicted:
            return va
    return None


def binds(rng: random.Random, vm_bo: VmBo, names) -> None:
    """What bind jobs may do while the restore loop has dropped op_lock."""
    for _ in range(rng.randrange(3)):
        if vm_bo.gpuva and rng.random() < 0.5:
            unlink(vm_bo, rng.choice(list(vm_bo.gpuva)))
        else:
            link(vm_bo, Va(next(names), rng.random() < 0.5))


@pytest.mark.parametrize("seed", SEEDS)
def test_each_pick_is_the_first_evicted_mapping_from_the_head(seed):
    rng = random.Random(seed)
    names = iter(range(10**6))
    vm_bo = VmBo()
    for _ in range(rng.randrange(1, 30)):
        link(vm_bo, Va(next(names), rng.random() < 0.6))
    picks = _EvictedVmas(vm_bo)
    for step in range(1000):  # each step restores one mapping or unlinks one, or ends
        want = head_walk(vm_bo)
        got = picks.next()
        assert got is want, f"seed {seed} step {step}: picked {got!r}, the head walk {want!r}"
        if got is None:
            break
        binds(rng, vm_bo, names)  # op_lock dropped: page tables preallocated
        if got.vm_bo is vm_bo and got.evicted:  # retaken: still there and still evicted
            got.evicted = False
        if rng.random() < 0.3:  # and binds queued behind this op_lock run next
            binds(rng, vm_bo, names)
    else:
        pytest.fail(f"seed {seed}: the loop did not end")
    assert not any(va.evicted for va in vm_bo.gpuva)
