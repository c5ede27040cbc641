"""``drop-caches`` reclaims everything reclaimable, as ``echo 2 > /proc/sys/vm/drop_caches``
runs drop_slab(): every idle BO is evicted (or purged, if DONTNEED) while swap has room,
however many objects larger than one shrinker batch there are; busy and pinned BOs stay."""

from __future__ import annotations

import pytest

from gemu.guest import errors
from gemu.host.machine import Machine
from gemu.host.shell import Shell
from tests.support.machine import emulator_machine


@pytest.fixture
def machine():
    with emulator_machine(ram_size=16 << 20, swap_size=64 << 20) as m:
        yield m


def _run(machine, text: str) -> tuple[Shell, list[str]]:
    out: list[str] = []
    sh = Shell(machine, out.append)
    assert sh.run_text(text), "\n".join(out)
    return sh, out


def test_drop_caches_evicts_every_idle_bo(machine):
    """Four 2 MiB BOs (512 pages each, four shrinker batches apiece) and a DONTNEED one:
    one drop-caches leaves nothing on the evictable LRU; the pinned BO stays resident."""
    text = "".join(f"b{i} = bo 2M\nfill b{i} random {i}\n" for i in range(4))
    text += "p = bo 64K\npin p\nd = bo 1M\nmadvise d dontneed\ndrop-caches\n"
    text += "".join(f"expect state b{i} evicted\n" for i in range(4))
    text += "expect state d purged\nexpect state p pinned\n"
    sh, out = _run(machine, text)
    stats = machine.statistics()
    assert stats["shrinker"]["lru_evictable_pages"] == 0
    assert stats["mem"]["drop_slab"] == 1
    assert any(line.startswith("reclaim: 1 purged, 4 evicted") for line in out), out
    assert sh.run_text("verify\n")  # the contents come back from swap intact
    assert sh.poweroff().ok
    machine.check_clean()


def test_drop_caches_stops_when_swap_is_full():
    """With swap for two of three idle 4 MiB BOs, drop-caches evicts two, leaves the third
    resident and returns (a pass that frees nothing ends the loop)."""
    strict = errors.is_strict()
    errors.set_strict(False)
    try:
        with Machine(ram_size=16 << 20, swap_size=8 << 20, device="inproc") as m:
            text = "".join(f"c{i} = bo 4M\nfill c{i} random {i}\n" for i in range(3))
            sh, out = _run(m, text + "drop-caches\n")
            states = sorted(sh._obj_state(sh.file.bo(sh.bos[f"c{i}"].handle).obj) for i in range(3))
            assert states == ["evicted", "evicted", "resident"], out
            assert m.statistics()["shrinker"]["skipped_no_swap"] >= 1
            assert sh.poweroff().ok
            m.check_clean()
    finally:
        errors.set_strict(strict)
        errors.reset_warn_stats()
