"""gemu explore SCRIPT.job: job scripts explored against reclaim on the explore machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gemu.host.cli import main
from gemu.host.explore import engine
from gemu.host.explore.jobscripts import scenario_for_script
from gemu.host.explore.scenario import KINDS, ExploreConfig, run_schedule

ROOT = Path(__file__).resolve().parents[3]
HELLO = ROOT / "examples" / "jobs" / "hello.job"
TASKS = ROOT / "examples" / "jobs" / "tasks.job"


def _cfg(path: Path, **kw) -> ExploreConfig:
    return ExploreConfig(scenario=scenario_for_script(path), **kw)


def test_hello_explores_clean_with_both_strategies():
    """hello.job shows no violation in 15 schedules of each strategy, every schedule a
    distinct interleaving, and the hog's reclaim evicts the script's BOs under way."""
    for strategy in ("random", "pct"):
        report = engine.run_campaign(_cfg(HELLO, strategy=strategy), 15, seed=7)
        assert report.first is None, report.first and report.first.violations
        assert len(report.interleavings) == 15
    stats = [run_schedule(_cfg(HELLO), seed).stats for seed in range(4)]
    assert sum(s["evicted"] for s in stats) and sum(s["swapped_in"] for s in stats)


def test_same_seed_same_event_log():
    """A script schedule is a pure function of its seed; the shell's output is in the log."""
    a = run_schedule(_cfg(HELLO), 3, keep_log=True)
    b = run_schedule(_cfg(HELLO), 3, keep_log=True)
    assert a.ok and a.event_log == b.event_log and a.schedule == b.schedule
    assert any("shell: verify: 2 BOs intact" in line for line in a.event_log)
    assert run_schedule(_cfg(HELLO), 4).schedule != a.schedule


@pytest.mark.parametrize(
    ("mutant", "kind"),
    [
        ("evict-frees-before-unmap", "mapped-free"),
        ("no-tlb-flush", "expectation"),  # hello.job's expect crc sees the stale data
        ("shrinker-skips-busy", "gpu-fault"),
        ("fence-before-swapin", "signalling"),
    ],
)
@pytest.mark.parametrize("strategy", ["random", "pct"])
def test_mutant_is_caught_and_named(mutant, kind, strategy):
    """A wrong driver is caught on hello.job, within 20 schedules, by the invariant named."""
    n, got = engine.schedules_to_detection(_cfg(HELLO, mutant=mutant, strategy=strategy), 0, 20)
    assert n is not None and got == kind


def test_wrong_expectation_names_file_and_line(tmp_path, capsys):
    """A failed expect is an 'expectation' violation naming file:line; the reproduction keeps
    the script, so replaying it (even with the file gone) gives the identical schedule."""
    assert "expectation" in KINDS
    script = tmp_path / "wrong.job"
    script.write_text("a = bo 4K\nfill a 1\nf = submit fill a 2\nwait f\nexpect value a == 1\n")
    out_dir = tmp_path / "out"
    rc = main(
        ["explore", str(script), "--schedules", "3", "--workers", "1", "--quiet"]
        + ["--out", str(out_dir)]
    )
    out = capsys.readouterr().out
    assert rc == 1
    assert f"VIOLATION expectation: {script}:5: expect value a: got 2, expected == 1" in out
    repro = next(out_dir.glob("seed-*/repro.json"))
    doc = json.loads(repro.read_text())
    assert doc["config"]["scenario"]["script_text"] == script.read_text()
    assert doc["violations"][0]["kind"] == "expectation"
    script.unlink()
    assert main(["explore", "--replay", str(repro)]) == 1
    out = capsys.readouterr().out
    assert "schedule identical" in out and "VIOLATION expectation" in out


def test_failing_line_is_an_expectation_violation(tmp_path):
    """A line that fails (not followed by 'expect error') is a violation too."""
    script = tmp_path / "fails.job"
    script.write_text("a = bo 4K\nclose nosuch\n")
    res = run_schedule(_cfg(script), 0)
    assert res.kind == "expectation"
    assert res.violations[0].message.startswith(f"{script}:2: no BO named 'nosuch'")


def test_bad_script_exits_2_with_file_line(tmp_path, capsys):
    script = tmp_path / "bad.job"
    script.write_text("a = bo 4K\nfrobnicate a\n")
    with pytest.raises(SystemExit) as exc:
        main(["explore", str(script)])
    assert exc.value.code == 2
    assert f"{script}:2: unknown command 'frobnicate'" in capsys.readouterr().err


def test_task_blocks_are_explored_as_guest_tasks():
    """tasks.job's three task blocks are runtime tasks the scheduler interleaves (they act
    under their own names in the event log); the script explores clean with both
    strategies."""
    res = run_schedule(_cfg(TASKS), 1, keep_log=True)
    assert res.ok, res.violations
    actors = {line.split()[1] for line in res.event_log}
    assert {"copier", "summer", "reclaimer", "main"} <= actors
    for strategy in ("random", "pct"):
        report = engine.run_campaign(_cfg(TASKS, strategy=strategy), 12, seed=3)
        assert report.first is None, report.first and report.first.violations


@pytest.mark.parametrize(
    ("mutant", "kind"),
    [
        # two submitters on one file share a scheduler entity: only concurrent tasks race
        # arm against push
        ("push-outside-entity-lock", "kernel-warning"),
        ("shrinker-skips-busy", "gpu-fault"),
    ],
)
def test_concurrent_task_blocks_catch_mutants(mutant, kind):
    """A script whose tasks submit concurrently finds a wrong driver, named by its
    invariant (random strategy, within 30 schedules from seed 0)."""
    n, got = engine.schedules_to_detection(_cfg(TASKS, mutant=mutant), 0, 30)
    assert n is not None and got == kind
    if mutant == "push-outside-entity-lock":  # one submitting program cannot show it
        assert engine.schedules_to_detection(_cfg(HELLO, mutant=mutant), 0, 30) == (None, None)
