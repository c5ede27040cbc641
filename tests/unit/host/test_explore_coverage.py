"""The campaign report's coverage figure (distinct outcomes and when the last new one came)
and the progress line's ETA."""

from __future__ import annotations

from gemu.host.cli import main
from gemu.host.cmd_explore import _duration
from gemu.host.explore import engine
from gemu.host.explore.scenario import SCENARIOS, ExploreConfig, run_schedule

SMALL = ExploreConfig(scenario=SCENARIOS["small"])


def test_outcomes_are_first_seen_indices_of_distinct_outcomes():
    report = engine.run_campaign(SMALL, 12, seed=0, workers=1, keep_going=True)
    expected: dict = {}
    for i, seed in enumerate(range(12), 1):
        expected.setdefault(run_schedule(SMALL, seed).outcome, i)
    assert report.outcomes == expected
    last = max(expected.values())
    text = report.coverage()
    assert f"{len(expected)} distinct outcomes" in text and f"at schedule {last};" in text
    # the verdict follows from where the last new outcome came
    late = "new ones still came late" in text
    assert late == (last > 12 // 2)


def test_progress_shows_an_eta_and_the_report_a_coverage_line(capsys):
    assert main(["explore", "small", "--schedules", "40", "--workers", "1"]) == 0
    captured = capsys.readouterr()
    assert "ETA " in captured.err and " outcomes, " in captured.err
    assert "explore: coverage: " in captured.out


def test_duration():
    assert [_duration(x) for x in (0.2, 12.4, 185, 3725)] == ["0s", "12s", "3m05s", "1h02m"]
