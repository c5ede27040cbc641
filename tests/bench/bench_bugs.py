"""Benchmarks of the corpus of historical kernel bugs (host/explore/bugs.py).

For every entry, under the random and the pct strategy: the wall-clock time and the number of
schedules to the first violation of the entry's invariant, campaigns from seed 0 (``gemu
explore --bug NAME`` with the same strategy, in this process). The limit it is set against is
measured in the same run: the time of one schedule of the working driver on the same scenario
(the median of a few), so the ratio reads as "schedules' worth of time to find the bug" and
survives a loaded machine. docs/bugs.md has the medians over 20 seeds.
"""

from __future__ import annotations

import statistics
import time

from gemu.host.explore import engine
from gemu.host.explore.bugs import BUGS
from gemu.host.explore.scenario import SCENARIOS, ExploreConfig, run_schedule
from tests.bench.common import Row

LIMIT = 200
"""Schedules a campaign may run before the entry counts as not found."""


def _clean_schedule_s(scenario: str, strategy: str, runs: int) -> float:
    """Median seconds of one schedule of the working driver on ``scenario``."""
    cfg = ExploreConfig(scenario=SCENARIOS[scenario], strategy=strategy)
    run_schedule(cfg, 0)  # warm up (imports, PCT's calibration)
    times = []
    for seed in range(1, runs + 1):
        t0 = time.perf_counter()
        res = run_schedule(cfg, seed)
        times.append(time.perf_counter() - t0)
        assert res.ok, (scenario, strategy, seed, res.violations)
    return statistics.median(times)


def bench(quick: bool) -> list[Row]:
    runs = 3 if quick else 9
    strategies = ("random",) if quick else ("random", "pct")
    clean: dict[tuple[str, str], float] = {}
    rows = []
    for bug in BUGS:
        for strategy in strategies:
            key = (bug.scenario, strategy)
            if key not in clean:
                clean[key] = _clean_schedule_s(bug.scenario, strategy, runs)
            cfg = ExploreConfig(
                scenario=SCENARIOS[bug.scenario], strategy=strategy, mutant=bug.mutant
            )
            t0 = time.perf_counter()
            report = engine.run_campaign(cfg, LIMIT, 0, workers=1, batch=1)
            dt = time.perf_counter() - t0
            first = report.first
            found = first is not None and bug.invariant in {v.kind for v in first.violations}
            count = report.schedules_run if first is not None else None
            rows.append(
                Row(
                    issue=14,
                    name=f"time to first detection: bug {bug.name} ({strategy})",
                    value=dt,
                    unit="s",
                    limit_name=f"one schedule of the working driver on {bug.scenario}, same run",
                    limit_value=clean[key],
                    aim="informational (lower is better)",
                    higher_is_better=False,
                    note=(
                        f"{count} schedule(s), caught by {first.kind}"
                        if found
                        else f"not caught by {bug.invariant} within {LIMIT} schedules"
                    ),
                )
            )
    return rows
