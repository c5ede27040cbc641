"""The example job scripts pass together, in any order: ``gemu run -q examples/jobs/*.job``
(the CI line of the documentation) exits 0, and so does every order of them on one machine,
as ``gemu run`` runs several scripts (one machine, one shell, :meth:`Shell.run_script` per
script): the glob's sorted order, seeded permutations and every ordered pair. A script's
result must not depend on the scripts that ran before it."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
from pathlib import Path

import pytest

from gemu.guest import errors
from gemu.host.jobscript import parse_file
from gemu.host.machine import Machine
from gemu.host.shell import Shell
from tests.support.device import gemu_executable

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "jobs").glob("*.job"))
T = 120 * float(os.environ.get("GEMU_TIMEOUT_MULT", "1"))
PERMUTATION_SEEDS = range(4)


def _permutation(seed: int) -> list[Path]:
    order = list(EXAMPLES)
    random.Random(seed).shuffle(order)
    return order


ORDERS = {
    "sorted": EXAMPLES,
    **{f"perm{s}": _permutation(s) for s in PERMUTATION_SEEDS},
    **{f"{a.stem}-{b.stem}": [a, b] for a, b in itertools.permutations(EXAMPLES, 2)},
}


def test_the_ci_line_passes():
    """`gemu run -q examples/jobs/*.job` (the shell's glob: sorted) exits 0: every check of
    every script held, with nothing but the summary printed."""
    proc = subprocess.run(
        [*gemu_executable(), "run", "-q", *(str(p.relative_to(ROOT)) for p in EXAMPLES)],
        capture_output=True,
        text=True,
        timeout=T,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout and ", 0 failed;" in proc.stdout, proc.stdout


@pytest.fixture
def lenient():
    """The emulator's mode: kernel warnings are counted in the summary, not raised."""
    strict = errors.is_strict()
    errors.set_strict(False)
    errors.reset_warn_stats()
    yield
    errors.set_strict(strict)
    errors.reset_warn_stats()


@pytest.mark.parametrize("order", list(ORDERS.values()), ids=list(ORDERS))
def test_examples_pass_in_any_order_on_one_machine(order, lenient):
    """The scripts, in this order, on one machine booted as `gemu run` boots it (16 MiB of
    RAM, 64 MiB of swap): each script passes and the power-off summary is clean."""
    out: list[str] = []
    scripts = [parse_file(p, commands=Shell.COMMANDS) for p in order]
    with Machine(ram_size=16 << 20, swap_size=64 << 20, device="inproc") as m:
        sh = Shell(m, out.append, base=ROOT)
        for path, statements in zip(order, scripts, strict=True):
            assert sh.run_script(statements), (
                f"{path.name} failed after "
                + ", ".join(p.name for p in order[: order.index(path)])
                + "\n"
                + "\n".join(out[-30:])
            )
        summary = sh.poweroff()
        assert summary.ok, summary.problems()
        m.check_clean()
