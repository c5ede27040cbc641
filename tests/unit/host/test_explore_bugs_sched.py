"""The corpus's drm_sched and reset-path entries (host/explore/bugs.py): each found again
through ``gemu explore --bug NAME`` with a fixed seed, by the invariant the entry names; the
working driver clean on the timeouts and exit scenarios (a short seeded campaign here, a long
one for every corpus scenario under ``make soak``)."""

from __future__ import annotations

import pytest

from gemu.host.cli import main
from gemu.host.explore import bugs, engine
from gemu.host.explore.scenario import SCENARIOS, ExploreConfig, run_schedule

SCHED_BUGS = {
    # name: (seed of the campaign, schedules it may take)
    "xe-tdr-frees-job": (0, 2),
    "v3d-skipped-reset-leak": (0, 2),
    "sched-kill-scheduled-fence": (0, 4),
    "sched-kill-before-deps": (0, 4),
    "sched-resv-deps-double-put": (0, 4),
    "sched-kill-prev-leak": (0, 8),
}


def test_the_section_holds_these_entries():
    names = {b.name for b in bugs.BUGS if b.scenario in ("timeouts", "exit")}
    assert names == set(SCHED_BUGS)
    for name in SCHED_BUGS:
        b = bugs.lookup(name)
        assert b.fixes and "CVE-" in b.verified and b.fix[:12] in b.verified


@pytest.mark.parametrize("name", sorted(SCHED_BUGS))
def test_found_by_gemu_explore_bug(name, tmp_path, capsys):
    bug = bugs.lookup(name)
    seed, schedules = SCHED_BUGS[name]
    rc = main(
        [
            "explore",
            "--bug",
            name,
            "--seed",
            str(seed),
            "--schedules",
            str(schedules),
            "--workers",
            "1",
            "--no-shrink",
            "--quiet",
            "--out",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 1, out
    assert f"bug {name}: fixed by {bug.fix[:12]}" in out
    assert f"VIOLATION {bug.invariant}: " in out, out
    assert any(p.name == "repro.json" for p in tmp_path.rglob("*")), out


@pytest.mark.parametrize("scenario", ["timeouts", "exit"])
@pytest.mark.parametrize("strategy", ["random", "pct"])
def test_working_driver_clean(scenario, strategy):
    cfg = ExploreConfig(scenario=SCENARIOS[scenario], strategy=strategy)
    report = engine.run_campaign(cfg, 12, seed=500, workers=1)
    assert report.first is None, report.first.violations


def test_exit_schedule_that_put_a_dependency_twice_is_clean():
    """exit seed 66: a killed entity's dependency callback ran while entity_fini removed it,
    and the late wakeup of another entity put the dependency it had moved on to (a refcount
    underflow on the gate fence) before drm_sched_entity_wakeup put its own fence."""
    res = run_schedule(ExploreConfig(scenario=SCENARIOS["exit"]), 66)
    assert res.ok, res.violations


def test_the_scenarios_reach_the_paths_their_bugs_live_on():
    """timeouts resets the GPU and skips resets as spurious; exit kills queued jobs and fails
    dependency allocations: the paths are exercised by the working driver, not only by the
    mutants."""
    from gemu.guest.drm import sched as drm_sched
    from gemu.guest.gemu_drv import uapi

    seen = {"no_hang": 0, "reset": 0, "killed": 0}
    recover, kill = uapi.GemuDriver.recover, drm_sched._kill_job
    fail = None

    def counting_recover(self, job):
        status = recover(self, job)
        seen["no_hang" if status == drm_sched.DrmGpuSchedStat.NO_HANG else "reset"] += 1
        return status

    def counting_kill(job):
        seen["killed"] += 1
        kill(job)

    uapi.GemuDriver.recover = counting_recover
    drm_sched._kill_job = counting_kill
    try:
        for seed in range(4):
            run_schedule(ExploreConfig(scenario=SCENARIOS["timeouts"]), seed)
        for seed in range(4):
            fail = drm_sched.should_fail_alloc
            res = run_schedule(ExploreConfig(scenario=SCENARIOS["exit"]), seed)
            assert res.ok, res.violations
    finally:
        uapi.GemuDriver.recover = recover
        drm_sched._kill_job = kill
    assert fail is None  # the scenario's fault injection does not outlive its schedule
    assert drm_sched.should_fail_alloc is None
    assert seen["no_hang"] and seen["reset"] and seen["killed"]


@pytest.mark.soak
@pytest.mark.parametrize("scenario", sorted({b.scenario for b in bugs.BUGS}))
@pytest.mark.parametrize("strategy", ["random", "pct"])
def test_soak_every_corpus_scenario_clean(scenario, strategy):
    cfg = ExploreConfig(scenario=SCENARIOS[scenario], strategy=strategy)
    report = engine.run_campaign(cfg, 2000, seed=10_000, workers=2)
    assert report.first is None, report.first.violations


def test_docs_bugs_md_lists_exactly_the_corpus():
    """docs/bugs.md's generated table names every entry of BUGS, in order, and nothing else;
    each entry's section gives its full fix id."""
    from gemu.host.explore import bugs_table

    assert bugs_table.main(["--check"]) == 0
    doc = bugs_table.DOC.read_text()
    for b in bugs.BUGS:
        assert f"### {b.name}\n" in doc and b.fix in doc, b.name


def test_bugs_table_renders_measured_figures(tmp_path):
    """The generator writes the medians it measured into the page between its markers, and
    keeps the figures of the entries it did not measure again."""
    from gemu.host.explore import bugs_table

    page = tmp_path / "bugs.md"
    page.write_text(f"intro\n{bugs_table.BEGIN}\nold\n{bugs_table.END}\nkept prose\n")
    assert bugs_table.main(["--doc", str(page), "--seeds", "2", "--only", "xe-tdr-frees-job"]) == 0
    text = page.read_text()
    assert text.startswith("intro\n") and text.endswith("kept prose\n") and "\nold\n" not in text
    row = next(ln for ln in text.splitlines() if ln.startswith("| [xe-tdr-frees-job]"))
    assert row.endswith("| 1 (2/2) | 1 (2/2) | 1 |")
    other = next(ln for ln in text.splitlines() if ln.startswith("| [sched-kill-before-deps]"))
    assert other.endswith("| not measured | not measured | not measured |")
    assert bugs_table.listed_names(text) == [b.name for b in bugs.BUGS]
