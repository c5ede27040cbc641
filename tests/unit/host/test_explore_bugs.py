"""The corpus of historical kernel bugs: each entry found again with a fixed seed, the working
driver clean on each entry's scenario, the CLI's --list-bugs and --bug."""

from __future__ import annotations

import re

import pytest

from gemu.guest.gemu_drv.job import Mutant
from gemu.host.cli import main
from gemu.host.explore import bugs
from gemu.host.explore.scenario import KINDS, SCENARIOS, ExploreConfig, run_schedule


def test_entries_are_well_formed():
    for b in bugs.BUGS:
        assert re.fullmatch(r"[0-9a-f]{40}", b.fix), b.name
        assert Mutant(b.mutant) is not Mutant.NONE
        assert b.scenario in SCENARIOS
        assert b.invariant in KINDS
        assert b.verified


@pytest.mark.parametrize("bug", bugs.BUGS, ids=lambda b: b.name)
def test_entry_found_with_a_fixed_seed(bug):
    cfg = ExploreConfig(scenario=SCENARIOS[bug.scenario], mutant=bug.mutant)
    res = run_schedule(cfg, bug.seed)
    assert bug.invariant in {v.kind for v in res.violations}, res.violations


@pytest.mark.parametrize("bug", bugs.BUGS, ids=lambda b: b.name)
def test_working_driver_clean_on_entry_scenario(bug):
    cfg = ExploreConfig(scenario=SCENARIOS[bug.scenario])
    for seed in range(3):
        res = run_schedule(cfg, seed)
        assert res.ok, (seed, res.violations)


def test_list_bugs(capsys):
    assert main(["explore", "--list-bugs"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["panfrost-madvise-list", "9fc33eaaa979"]
    assert len(out) == len(bugs.BUGS)


def test_bug_cli_reports_violation(tmp_path, capsys):
    rc = main(
        [
            "explore",
            "--bug",
            "panfrost-madvise-list",
            "--seed",
            "3",
            "--schedules",
            "5",
            "--workers",
            "1",
            "--no-shrink",
            "--quiet",
            "--out",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 1
    assert "VIOLATION lru: list_add double add" in out
    assert (tmp_path / "seed-3" / "repro.json").is_file()


def test_unknown_bug_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["explore", "--bug", "nope"])
    assert exc.value.code == 2
    assert "no bug 'nope'" in capsys.readouterr().err
