"""Property test of VM_BIND through job scripts (Hypothesis, derandomized): any sequence of
partial binds (any page range of a BO at any page of a window of VAs, over what is already
there) and partial unbinds leaves exactly the mappings a page-granular model predicts, in
the view the console shows (``info vms``), and the GPU reads through the VM exactly the
bytes the CPU reads from the BO pages the model says are there; an unmapped page faults.
One machine (in-process device, driver mode vm-bind) for all examples, a VM each."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemu.guest import errors
from gemu.host.machine import Machine
from gemu.host.shell import Shell

PAGE = 4096
BASE = 0x1000_0000
WINDOW = 12  # pages of VA the ops touch
BOS = {"x": 8, "y": 4}  # name -> pages

DETERMINISTIC = settings(
    derandomize=True,
    max_examples=12,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@st.composite
def bind_op(draw):
    bo = draw(st.sampled_from(sorted(BOS)))
    off = draw(st.integers(0, BOS[bo] - 1))
    n = draw(st.integers(1, min(BOS[bo] - off, WINDOW)))
    va = draw(st.integers(0, WINDOW - n))
    return ("bind", va, bo, off, n)


@st.composite
def unbind_op(draw):
    n = draw(st.integers(1, WINDOW))
    return ("unbind", draw(st.integers(0, WINDOW - n)), n)


OPS = st.lists(st.one_of(bind_op(), unbind_op()), min_size=1, max_size=6)


@pytest.fixture(scope="module")
def shell():
    strict = errors.is_strict()
    errors.set_strict(False)
    try:
        with Machine(
            ram_size=8 << 20, swap_size=16 << 20, device="inproc", driver_mode="vm-bind"
        ) as m:
            lines: list[str] = []
            sh = Shell(m, lines.append)
            sh.lines = lines
            assert sh.run_text("x = bo 32K\nfill x random 1\ny = bo 16K\nfill y random 2\n")
            yield sh
            summary = sh.poweroff()
            assert summary.ok, summary.problems()
            m.check_clean()
    finally:
        errors.set_strict(strict)
        errors.reset_warn_stats()


_vm_names = (f"p{i}" for i in itertools.count())


@DETERMINISTIC
@given(ops=OPS)
def test_partial_binds_and_unbinds_match_a_page_model(shell, ops):
    """The VM's mappings, expanded to pages, equal the model's; each mapped page reads (GPU
    CRC32 through the VM) as that BO page reads by the CPU; one unmapped page faults."""
    vm = next(_vm_names)
    model: dict[int, tuple[str, int]] = {}  # VA page -> (BO, BO page)
    lines = [f"{vm} = vm create"]
    prev = ""
    for i, op in enumerate(ops):
        after = f" after {prev}" if prev else ""
        if op[0] == "bind":
            _, va, bo, off, n = op
            lines.append(
                f"f{i} = bind {vm} {BASE + va * PAGE:#x} {bo} {off * PAGE:#x} {n * PAGE}{after}"
            )
            for k in range(n):
                model[va + k] = (bo, off + k)
        else:
            _, va, n = op
            lines.append(f"f{i} = unbind {vm} {BASE + va * PAGE:#x} {n * PAGE}{after}")
            for k in range(n):
                model.pop(va + k, None)
        prev = f"f{i}"
    lines.append(f"wait {prev}")
    assert shell.run_text("\n".join(lines) + "\n"), "\n".join(shell.lines[-30:])
    (view,) = [v for v in shell.m.query("vms", shell) if v["name"] == vm]
    pages = {}
    for mp in view["mappings"]:
        if mp["bo"].startswith("_"):
            continue
        for k in range(mp["size"] // PAGE):
            pages[(mp["va"] - BASE) // PAGE + k] = (mp["bo"], mp["offset"] // PAGE + k)
    assert pages == model, ops
    checks = [
        f"expect crc {vm} {BASE + va * PAGE:#x} 4K == {bo}+{off * PAGE:#x}"
        for va, (bo, off) in sorted(model.items())
    ]
    hole = next((va for va in range(WINDOW) if va not in model), None)
    if hole is not None:
        checks += [f"h = exec {vm} fill {BASE + hole * PAGE:#x} 4K 0", "expect fault h"]
    checks.append(f"vm destroy {vm}")
    assert shell.run_text("\n".join(checks) + "\n"), "\n".join(shell.lines[-30:])
