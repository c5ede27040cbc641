"""gemu explore on the greenlet backend makes exactly the schedules the thread backend made:
the same event log, verdicts and step counts for every seed, on the built-in scenario (correct
driver and mutants, both strategies) and on a job script whose task blocks run as guest tasks."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from gemu.host.explore.jobscripts import scenario_for_script
from gemu.host.explore.scenario import ExploreConfig, run_schedule

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "jobs"


def _same_runs(cfg: ExploreConfig, seeds: range) -> list[str]:
    kinds = []
    for seed in seeds:
        threads = run_schedule(replace(cfg, backend="threads"), seed, keep_log=True)
        glets = run_schedule(replace(cfg, backend="greenlet"), seed, keep_log=True)
        assert glets.event_log == threads.event_log, f"seed {seed}: event logs differ"
        assert glets.violations == threads.violations, f"seed {seed}: verdicts differ"
        assert (glets.steps, glets.schedule) == (threads.steps, threads.schedule)
        kinds += [v.kind for v in threads.violations]
    return kinds


@pytest.mark.parametrize("strategy", ["random", "pct"])
@pytest.mark.parametrize("mutant", ["none", "no-tlb-flush", "fence-after-unlock"])
def test_standard_scenario_same_on_both_backends(strategy, mutant):
    """12 seeds of each strategy and mutant: identical runs; the mutants' violations are among
    them, so verdicts, not only clean runs, are compared."""
    kinds = _same_runs(ExploreConfig(strategy=strategy, mutant=mutant), range(12))
    if mutant == "none":
        assert kinds == []


def test_mutants_violate_in_the_compared_runs():
    """The comparison above covers failing schedules: over its seeds the random strategy
    catches no-tlb-flush at least once (a violation then unwinds every task)."""
    kinds = _same_runs(ExploreConfig(mutant="no-tlb-flush"), range(12, 40))
    assert kinds


def test_job_script_tasks_same_on_both_backends():
    """tasks.job (concurrent submitters and a reclaimer as guest tasks) under both strategies."""
    sc = scenario_for_script(EXAMPLES / "tasks.job")
    for strategy in ("random", "pct"):
        _same_runs(ExploreConfig(scenario=sc, strategy=strategy), range(4))
