"""gemu explore and the signalling section: real lockdep's view (explicit annotations) is the
default and still catches the orders that publish a fence before they allocate; the implicit
section is the ``--strict-signalling`` mode; the reset mutant is found on the hang scenario,
where the correct driver's reset is clean."""

from __future__ import annotations

import pytest

from gemu.host.cli import main
from gemu.host.explore import engine
from gemu.host.explore.scenario import (
    SCENARIOS,
    ExploreConfig,
    run_schedule,
    scenario_for_mutant,
)

HANG = SCENARIOS["hang"]


def test_fence_before_swapin_is_caught_by_the_explicit_annotation_in_both_modes():
    """The submit path annotates from publishing the fences to the push: the default mode
    (no implicit section) reports the swap-in allocation there just as the strict mode does,
    and the default mode's report is real lockdep's (no gemu-model label)."""
    default = run_schedule(ExploreConfig(mutant="fence-before-swapin"), 1000)
    strict = run_schedule(ExploreConfig(mutant="fence-before-swapin", strict_signalling=True), 1000)
    assert default.kind == "signalling" and strict.kind == "signalling"
    assert "a reclaimable allocation (might_alloc)" in default.violations[0].message
    assert "gemu model check" not in default.violations[0].message


def test_correct_driver_is_clean_in_strict_mode():
    """The correct driver publishes its fences with nothing that allocates, locks a
    reservation or waits before the push: the implicit section finds nothing either."""
    for seed in range(1000, 1004):
        res = run_schedule(ExploreConfig(strict_signalling=True), seed)
        assert res.ok, res.violations


def test_hang_scenario_resets_the_gpu_and_is_clean():
    """The hang scenario's first task starts with a job that waits forever; the timeout's
    reset fails it with -ETIMEDOUT while the others submit and reclaim, and the run is clean
    (the correct reset path captures its crash state without entering reclaim)."""
    assert scenario_for_mutant("reset-allocates") is HANG
    for seed in range(1000, 1003):
        res = run_schedule(ExploreConfig(scenario=HANG), seed)
        assert res.ok, res.violations


def test_reset_allocates_is_found_on_the_hang_scenario():
    """The reset mutant's GFP_KERNEL capture inside the reset's signalling section is a
    signalling report in the first schedule."""
    res = run_schedule(ExploreConfig(scenario=HANG, mutant="reset-allocates"), 1000)
    assert res.kind == "signalling"
    assert "inside a dma_fence signalling critical section" in res.violations[0].message


def test_cli_picks_the_mutants_scenario_and_takes_strict_signalling(tmp_path, capsys):
    """``gemu explore --mutant reset-allocates`` without a scenario runs the hang scenario
    and finds it (exit 1); ``--strict-signalling`` runs the correct driver clean (exit 0)."""
    out = tmp_path / "out"
    args = ["explore", "--mutant", "reset-allocates", "--schedules", "2", "--workers", "1"]
    assert main([*args, "--quiet", "--out", str(out)]) == 1
    assert "signalling" in capsys.readouterr().out
    args = ["explore", "small", "--strict-signalling", "--schedules", "2", "--workers", "1"]
    assert main([*args, "--quiet"]) == 0


@pytest.mark.soak
def test_correct_driver_long_campaign_on_the_hang_scenario_and_in_strict_mode():
    """The working driver: 500 schedules of each strategy on the hang scenario (a GPU reset in
    every schedule), and 1000 of each on the standard scenario in the strict signalling mode,
    zero violations."""
    for strategy in ("random", "pct"):
        cfg = ExploreConfig(scenario=HANG, strategy=strategy)
        report = engine.run_campaign(cfg, 500, seed=60_000, workers=2)
        assert report.first is None, report.first and report.first.violations
        cfg = ExploreConfig(strategy=strategy, strict_signalling=True)
        report = engine.run_campaign(cfg, 1000, seed=70_000, workers=2)
        assert report.first is None, report.first and report.first.violations
