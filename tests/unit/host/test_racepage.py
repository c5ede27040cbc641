"""explore's race.html: the timeline of a replay, its racing pair, the page."""

from __future__ import annotations

from dataclasses import replace

from gemu.host.explore import racepage, repro
from gemu.host.explore.scenario import SCENARIOS, ExploreConfig, run_schedule

RACE = ExploreConfig(scenario=SCENARIOS["race"])


def _row(step, task, text):
    return racepage.Row(step, task, text, racepage._kind(text), racepage.pair_object(text))


def test_racing_pair_is_the_last_cross_task_meeting_after_a_switch():
    rows = [
        _row(1, "a", "lock bo1"),
        _row(2, "a", "unlock bo1"),
        _row(3, "b", "lock bo1"),  # b meets a's object right after a switch
        _row(4, "b", "lock bo2"),
        _row(5, "b", "unlock bo2"),
        _row(6, "b", "lock bo2"),  # same task: not a race
        _row(7, "a", "advance 1000"),  # the clock names no object
    ]
    assert racepage.racing_pair(rows) == (1, 2)
    assert racepage.racing_pair(rows[:2]) is None


def test_timeline_has_every_step_and_the_tracepoints_in_order():
    """A replay's timeline: one row per preemption point plus the tracepoints, steps never
    going back, every task a lane, the GPU's among them."""
    res0 = run_schedule(RACE, 3)
    events = racepage.TimelineCollector()
    with events.listening():
        res = run_schedule(RACE, 3, res0.schedule, keep_log=True)
    tl = racepage.Timeline.of(res, events)
    steps = [r.step for r in tl.rows]
    assert steps == sorted(steps)
    assert sum(not r.trace for r in tl.rows) == res.steps
    assert any(r.trace for r in tl.rows)
    assert {"main", "gpu", "submit0", "submit1", "hog"} <= set(tl.tasks)


def test_write_repro_writes_a_page_naming_the_violation_and_the_replay(tmp_path):
    cfg = replace(RACE, mutant="shrinker-skips-busy")
    first = next(r for s in range(20) if (r := run_schedule(cfg, s)).violations)
    repro.write_repro(tmp_path, cfg, first.seed, first.schedule, full=(cfg, first.schedule))
    page = (tmp_path / "race.html").read_text()
    assert page.startswith("<!doctype html>")
    assert "gpu-fault" in page and f"gemu explore --replay {tmp_path}/repro.json" in page
    assert "racing pair:" in page and 'class="pair"' in page
    assert "http" not in page  # self-contained: nothing to fetch
    # the text of the run is escaped, never markup
    tl = racepage.Timeline([_row(1, "<t>", "lock <b>")], ["<t>"], [("x", "<i>")])
    out = racepage.render(tl, title="<title>", replay="r")
    assert "lock <b>" not in out and "<i>" not in out and "<t>" not in out
    assert "lock &lt;b&gt;" in out and "&lt;i&gt;" in out and "&lt;title&gt;" in out


def test_a_named_object_wins_over_a_family():
    """Fence, reservation, scheduler and memory points do not name their instance: a pair on
    a named lock is preferred even when it came earlier."""
    rows = [
        _row(1, "a", "unlock bo1"),
        _row(2, "b", "lock bo1"),
        _row(3, "a", "dma_fence.signal"),
        _row(4, "b", "dma_fence.wait"),
    ]
    assert racepage.racing_pair(rows) == (0, 1)
    assert racepage.racing_pair(rows[2:]) == (0, 1)
