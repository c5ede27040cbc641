"""Benchmarks of ``gemu explore`` (issue 7).

- **schedules per second**, standard scenario, correct driver, random strategy, with 1 and 2
  local worker processes. The limit is what the schedules' own task switches would allow at
  the raw thread hand-off rate of this machine (two threads on one CPU passing a baton through
  two locks, measured in the same run; explore pins each worker's task threads to one CPU),
  divided by the switches one schedule makes: a schedule cannot be faster than its baton
  passes.
- **scaling**: the 2-worker rate over the 1-worker rate, against the usable CPUs (ideal 2.0
  on two or more cores).
- **time to first detection** of each driver mutant (random strategy, seed 0), against the
  time of one schedule of the correct driver.
"""

from __future__ import annotations

import os
import time

from gemu.host.cmd_explore import MUTANTS
from gemu.host.explore import engine
from gemu.host.explore.scenario import ExploreConfig, run_schedule
from tests.bench.common import Row, thread_handoff_rate


def bench(quick: bool) -> list[Row]:
    n = 400 if quick else 3000
    cfg = ExploreConfig()
    steps = [run_schedule(cfg, s).steps for s in range(5)]  # warm up, measure switches
    per_schedule = sum(steps) / len(steps)
    cpu = sorted(os.sched_getaffinity(0))[0]
    handoff = max(thread_handoff_rate(20_000, cpu) for _ in range(3))  # pinned, as workers run
    floor = handoff / per_schedule
    rates = {}
    for workers in (1, 2):
        report = engine.run_campaign(cfg, n, seed=10_000, workers=workers, keep_going=True)
        assert report.first is None, report.first.violations
        rates[workers] = report.rate
    cpus = len(os.sched_getaffinity(0))
    rows = [
        Row(
            issue=7,
            name=f"explore schedules/s, standard scenario, {w} worker(s)",
            value=rates[w],
            unit="schedules/s",
            limit_name="thread hand-off rate / preemption points per schedule",
            limit_value=floor * w,
            aim="informational; >= 30 schedules/s per worker",
            note=f"{n} schedules, {per_schedule:.0f} preemption points each, "
            f"hand-off {handoff:,.0f}/s; "
            + (
                "in this process, task threads pinned to one CPU"
                if w == 1
                else "spawned workers, one CPU each, start-up included"
            ),
        )
        for w in (1, 2)
    ]
    rows.append(
        Row(
            issue=7,
            name="explore scaling, 2 workers vs 1",
            value=rates[2] / rates[1],
            unit="x",
            limit_name="ideal on this machine (min(2, usable CPUs))",
            limit_value=float(min(2, cpus)),
            aim=">= 1.5x on two cores",
        )
    )
    one = 1 / rates[1]
    for mutant in MUTANTS[1:]:
        t0 = time.perf_counter()
        count, kind = engine.schedules_to_detection(ExploreConfig(mutant=mutant), 0, 400)
        dt = time.perf_counter() - t0
        rows.append(
            Row(
                issue=7,
                name=f"time to first detection: {mutant}",
                value=dt,
                unit="s",
                limit_name="one schedule of the correct driver",
                limit_value=one,
                aim="informational (lower is better)",
                higher_is_better=False,
                note=f"{count} schedule(s), caught by {kind}",
            )
        )
    return rows
