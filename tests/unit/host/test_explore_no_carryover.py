"""A schedule is a function of its seed alone, whatever ran before it in the process.

explore keeps things across schedules (the device's register tables, BO patterns, poisoning
buffers, format structs): none of it may carry state from one schedule into the next. Seed A
run after seed B in one process gives A's event log and end statistics exactly, and they
equal those of A in a fresh process.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

from gemu.host.explore.scenario import ExploreConfig, run_schedule

SEED_A, SEED_B = 3, 11
CFG = ExploreConfig()


def _fingerprint(seed: int) -> dict:
    res = run_schedule(CFG, seed, keep_log=True)
    return {
        "log": hashlib.sha256("\n".join(res.event_log).encode()).hexdigest(),
        "lines": len(res.event_log),
        "stats": res.stats,
        "steps": res.steps,
        "schedule": res.interleaving,
        "violations": [str(v) for v in res.violations],
    }


def test_a_then_b_then_a_is_a_in_a_fresh_process():
    first = _fingerprint(SEED_A)
    other = _fingerprint(SEED_B)
    again = _fingerprint(SEED_A)
    assert other["log"] != first["log"]  # B really ran something else in between
    assert again == first
    fresh = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, sys; from tests.unit.host.test_explore_no_carryover import "
            f"_fingerprint; print(json.dumps(_fingerprint({SEED_A})))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(fresh.stdout.splitlines()[-1]) == first


def test_patterns_and_digests_are_what_they_were():
    """BO patterns made by the C generator are ``random.Random(tag).randbytes(size)``, and a
    schedule's digest is that of its ``repr``, whatever the task ids."""
    import random

    from gemu.host.explore.scenario import _pattern, digest

    for tag in (0, 1, 7, 100_123, 199_512, 2**33 + 5):
        for size in (4096, 8192):
            assert _pattern(tag, size) == random.Random(tag).randbytes(size)
    for schedule in ([], [1], [3, 1, 2, 2, 9], [1, 300, 2], list(range(260))):
        want = hashlib.blake2b(repr(schedule).encode(), digest_size=8).hexdigest()
        assert digest(schedule) == want
