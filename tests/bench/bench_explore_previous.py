"""Benchmark: explore's schedules/s on the standard scenario against the design it replaced.

The exploring engine's speed work (tasks as greenlets, lockdep stacks captured lazily, the
per-schedule set-up built once, the collector kept out of a schedule) is measured as a whole
against gemu as it was before any of it: :data:`PREVIOUS_DESIGN`, whose deterministic runtime
handed a baton between OS threads. Its ``device``, ``guest`` and ``host`` trees are exported
once (:func:`tests.bench.bench_job_rate._previous_tree`) and the same measuring code (this
file, run as a script) imports ``gemu`` from there. Both run the same seeds of the standard
scenario under the random strategy, one worker, in turns (old, new, old, new) so that a busy
patch of a shared machine slows both alike; each figure is the better of its two turns. The
scenario's parameters are the same in both designs; the mean number of preemption points per
schedule is reported beside the rate, so a change in what a schedule does would show.

Run alone: ``python tests/bench/run.py --quick explore_previous``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if __name__ == "__main__":
    sys.path.insert(1, str(ROOT))  # after the previous design's tree, which comes first

from tests.bench.bench_job_rate import (  # noqa: E402
    _gemu_origin,
    _previous_tree,
    run_in_tree,
)
from tests.bench.common import Row  # noqa: E402

PREVIOUS_DESIGN = "c5baaee"
"""The last commit before the deterministic runtime's greenlet backend and the exploring
engine's speed work."""


def _measure(n: int, tree: Path | None) -> dict:
    """Run this file as a script timing ``n`` schedules; with ``tree``, against that gemu."""
    return run_in_tree(__file__, [str(n)], tree, "timing schedules")


def _schedules(n: int) -> dict:
    """Seeds 0..n-1 of the standard scenario, random strategy, in this process."""
    from gemu.host.explore.scenario import ExploreConfig, run_schedule

    cfg = ExploreConfig()
    for seed in range(5):  # warm up: imports, first-use allocations
        run_schedule(cfg, 100_000 + seed)
    steps = 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for seed in range(n):
        result = run_schedule(cfg, seed)
        if result.violations:
            raise AssertionError(f"seed {seed}: {result.violations}")
        steps += result.steps
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"wall": wall, "cpu": cpu, "steps": steps / n, "gemu": _gemu_origin()}


def bench(quick: bool) -> list[Row]:
    tree = _previous_tree(PREVIOUS_DESIGN)
    n = 200 if quick else 1000
    turns = [(_measure(n, tree), _measure(n, None)) for _ in range(2)]
    old = {k: min(t[0][k] for t in turns) for k in ("wall", "cpu")}
    new = {k: min(t[1][k] for t in turns) for k in ("wall", "cpu")}
    old_o, new_o = turns[0][0], turns[0][1]
    if Path(old_o["gemu"]) == Path(new_o["gemu"]):
        raise RuntimeError(f"the previous design was not imported from {tree}")
    note = (
        f"{n} schedules (seeds 0-{n - 1}), standard scenario, random strategy, one process; "
        f"mean preemption points per schedule: {new_o['steps']:.0f} now, "
        f"{old_o['steps']:.0f} in {PREVIOUS_DESIGN}; best of two turns each, alternating"
    )
    return [
        Row(
            issue=15,
            name="explore schedules/s per worker, standard scenario, against the previous design",
            value=n / new["wall"],
            unit="schedules/s",
            limit_name=f"previous design ({PREVIOUS_DESIGN}, thread runtime), same run",
            limit_value=n / old["wall"],
            aim=">= 2x the previous design",
            note=note,
        ),
        Row(
            issue=15,
            name="explore schedules per CPU-second, standard scenario, against the previous design",
            value=n / new["cpu"],
            unit="schedules/CPU-s",
            limit_name=f"previous design ({PREVIOUS_DESIGN}, thread runtime), same run",
            limit_value=n / old["cpu"],
            aim="informational (steady on a loaded machine)",
            note="process CPU time, all threads",
        ),
    ]


if __name__ == "__main__":
    print(json.dumps(_schedules(int(sys.argv[1]))))
