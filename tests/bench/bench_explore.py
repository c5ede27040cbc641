"""Benchmarks of ``gemu explore``.

- **schedules per second**, standard scenario, correct driver, random strategy, with 1 and 2
  local worker processes, on the greenlet backend (the default). The 1-worker figure is set
  against the thread backend's rate measured in the same run (the design it replaced: task
  threads pinned to one CPU passing a baton), which makes exactly the same schedules; the two
  backends take turns every 20 schedules, so that both meet the same load.
- **schedules per CPU-second**, greenlet against threads in the same run: the work each backend
  does per schedule, whatever share of the CPUs the OS gives the process.
- **the thread backend's rate** against its own limit: the raw thread hand-off rate of this
  machine (two threads on one CPU passing a baton through two locks, measured in the same
  run) divided by the switches one schedule makes.
- **scaling**: the 2-worker rate over the 1-worker rate, against the usable CPUs (ideal 2.0
  on two or more cores).
- **exhaustive search**: distinct interleavings per second of the reduced search, and the
  reduction factor (schedules the naive enumeration runs over those the reduced one runs,
  same outcomes) on ``race`` at K=1 and on the cut-down ``race`` at K=2.
- **time to first detection** of each driver mutant (random strategy, seed 0), against the
  time of one schedule of the correct driver.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

from gemu.host.cmd_explore import MUTANTS
from gemu.host.explore import engine
from gemu.host.explore.scenario import ExploreConfig, run_schedule, scenario_for_mutant
from tests.bench.common import Row, thread_handoff_rate


def bench(quick: bool) -> list[Row]:
    n = 400 if quick else 3000
    cfg = ExploreConfig()
    steps = [run_schedule(cfg, s).steps for s in range(5)]  # warm up, measure switches
    per_schedule = sum(steps) / len(steps)
    cpu = sorted(os.sched_getaffinity(0))[0]
    handoff = max(thread_handoff_rate(20_000, cpu) for _ in range(3))  # pinned, as workers run
    floor = handoff / per_schedule
    wall, cpu, seen = _alternating(cfg, n)
    assert seen["greenlet"] == seen["threads"]  # the same schedules
    rates = {1: n / wall["greenlet"]}
    cpu_rates = {b: n / cpu[b] for b in cpu}
    threads_rate = n / wall["threads"]
    report = engine.run_campaign(cfg, n, seed=10_000, workers=2, keep_going=True)
    assert report.first is None, report.first.violations
    assert report.interleavings == seen["greenlet"]
    rates[2] = report.rate
    cpus = len(os.sched_getaffinity(0))
    rows = [
        Row(
            issue=15,
            name="explore schedules/s, greenlet vs thread backend, 1 worker",
            value=rates[1],
            unit="schedules/s",
            limit_name="thread backend, same schedules, same run",
            limit_value=threads_rate,
            aim=">= 2x the thread backend",
            note=f"{n} schedules of {per_schedule:.0f} preemption points, in this process, "
            f"the backends taking turns every {_TURN} schedules",
        ),
        Row(
            issue=15,
            name="explore schedules per CPU-second, greenlet vs thread backend, 1 worker",
            value=cpu_rates["greenlet"],
            unit="schedules/CPU-s",
            limit_name="thread backend, same schedules, same run",
            limit_value=cpu_rates["threads"],
            aim="informational (the wall-clock row is the aim)",
            note="process CPU time, all threads: on a busy machine the wall-clock ratio also "
            "measures how the OS shares the CPUs out",
        ),
        Row(
            issue=15,
            name="explore schedules/s, greenlet backend, 2 workers",
            value=rates[2],
            unit="schedules/s",
            limit_name="2 x the 1-worker rate",
            limit_value=2 * rates[1],
            aim="informational",
            note="spawned workers, start-up included",
        ),
        Row(
            issue=7,
            name="explore schedules/s, thread backend, 1 worker",
            value=threads_rate,
            unit="schedules/s",
            limit_name="thread hand-off rate / preemption points per schedule",
            limit_value=floor,
            aim="informational",
            note=f"hand-off {handoff:,.0f}/s, task threads pinned to one CPU",
        ),
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
    rows += _exhaustive_rows(quick)
    one = 1 / rates[1]
    for mutant in MUTANTS[1:]:
        t0 = time.perf_counter()
        cfg = ExploreConfig(scenario=scenario_for_mutant(mutant), mutant=mutant)
        count, kind = engine.schedules_to_detection(cfg, 0, 400)
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


_TURN = 20
"""Schedules each backend runs before the other takes its turn."""


def _alternating(cfg: ExploreConfig, n: int) -> tuple[dict, dict, dict]:
    """``n`` schedules (seeds 10,000 on) with each backend, 1 worker, the two taking turns
    every :data:`_TURN` schedules so that both meet the same load on a shared machine (run
    one after the other, their ratio measured mostly how busy the machine was in each
    half: 0.6x to 2.5x in four runs). Wall-clock and process CPU seconds per backend, and
    the interleavings each ran."""
    wall = {"greenlet": 0.0, "threads": 0.0}
    cpu = dict(wall)
    seen: dict[str, set[str]] = {"greenlet": set(), "threads": set()}
    for start in range(0, n, _TURN):
        count = min(_TURN, n - start)
        for backend in ("threads", "greenlet"):
            cpu0 = time.process_time()
            report = engine.run_campaign(
                replace(cfg, backend=backend),
                count,
                seed=10_000 + start,
                workers=1,
                keep_going=True,
            )
            cpu[backend] += time.process_time() - cpu0
            wall[backend] += report.elapsed_s
            assert report.first is None, report.first.violations
            seen[backend] |= report.interleavings
    return wall, cpu, seen


def _exhaustive_rows(quick: bool) -> list[Row]:
    """The bounded search with and without the reduction, on the scenarios where the naive
    enumeration also finishes: ``race`` and the built-in ``small`` (two submitters against
    kswapd and the hog) at K=1, and the cut-down ``race`` (one job per submitter, no hog) at
    K=2. Both searches must reach the same outcomes.

    Beside each reduction, its ceiling: the naive enumeration's schedules over the trace
    classes it reaches, what a reduction running each class exactly once would reach. And
    on the cut-down race at K=2, the reduced search with the state cache (``--state-cache``),
    which must reach exactly the same classes there.

    The full run adds ``small`` at K=2, the scenario the issue names, whose naive
    enumeration runs 539,661 schedules (most of an hour on two cores): that count is
    measured with :func:`naive_schedule_count` (the naive enumeration at K=1 and the choices
    left after each run's preemption), which must equal the naive enumeration's own count
    on the cut-down race at K=2 in the same run."""
    from gemu.host.explore.exhaustive import BoundedSearch, naive_schedule_count
    from gemu.host.explore.scenario import SCENARIOS

    race = SCENARIOS["race"]
    rows = []
    for label, scenario, bound in (
        ("race K=1", race, 1),
        ("small K=1", SCENARIOS["small"], 1),
        ("cut-down race K=2", replace(race, jobs=1, reclaims=0), 2),
    ):
        cfg = ExploreConfig(scenario=scenario)
        naive = BoundedSearch(cfg, bound, reduce=False, keep_going=True).run()
        reduced = BoundedSearch(cfg, bound, reduce=True, keep_going=True).run()
        assert reduced.outcomes == naive.outcomes
        ceiling = naive.run / len(naive.classes)
        rows += [
            Row(
                issue=15,
                name=f"exhaustive search, {label}: distinct interleavings/s",
                value=len(reduced.classes) / reduced.elapsed_s,
                unit="interleavings/s",
                limit_name="naive enumeration, schedules/s, same run",
                limit_value=naive.rate,
                aim="informational",
                note=f"{len(reduced.classes)} classes, {reduced.run} runs, {reduced.pruned} "
                f"pruned, {reduced.merged} at a state searched before",
            ),
            Row(
                issue=15,
                name=f"exhaustive search, {label}: reduction (naive / reduced schedules run)",
                value=naive.run / reduced.run,
                unit="x",
                limit_name="ceiling: naive schedules / naive classes",
                limit_value=ceiling,
                aim=">= 10x (the value; the ratio is against the ceiling)",
                note=f"naive {naive.run} schedules reaching {len(naive.classes)} classes, "
                f"reduced {reduced.run} reaching {len(reduced.classes)}; "
                f"{len(naive.outcomes)} outcomes in both; a reduction running every class "
                f"once would reach {ceiling:.2f}x",
            ),
        ]
        if bound == 2:
            assert naive_schedule_count(cfg, bound) == naive.run
            cached = BoundedSearch(cfg, bound, cache=True, keep_going=True).run()
            assert cached.classes == reduced.classes and cached.outcomes == reduced.outcomes
            rows.append(
                Row(
                    issue=15,
                    name=f"exhaustive search, {label}: the state cache (runs without / with)",
                    value=reduced.run / cached.run,
                    unit="x",
                    limit_name="the reduction without the state cache",
                    limit_value=1.0,
                    aim="informational (--state-cache, off by default)",
                    note=f"{reduced.run} runs without, {cached.run} with "
                    f"({cached.merged} at a state searched before); the same "
                    f"{len(reduced.classes)} classes and {len(reduced.outcomes)} outcomes",
                )
            )
    if not quick:
        cfg = ExploreConfig(scenario=SCENARIOS["small"])
        t0 = time.perf_counter()
        naive_runs = naive_schedule_count(cfg, 2)
        counted_s = time.perf_counter() - t0
        reduced = BoundedSearch(cfg, 2, keep_going=True).run()
        assert not reduced.violating
        rows.append(
            Row(
                issue=15,
                name="exhaustive search, small K=2: reduction (naive / reduced schedules run)",
                value=naive_runs / reduced.run,
                unit="x",
                limit_name="no reduction",
                limit_value=1.0,
                aim=">= 10x",
                note=f"naive {naive_runs:,} schedules (counted in {counted_s:.0f} s, not run), "
                f"reduced {reduced.run:,} in {reduced.elapsed_s:.0f} s reaching "
                f"{len(reduced.classes):,} classes, {reduced.merged:,} at a state searched "
                f"before; {len(reduced.outcomes)} outcomes, no violation",
            )
        )
    return rows
