"""gemu explore on the VM_BIND flavour: the ``gpuvm`` and ``gpuvm-small`` scenarios
(host/explore/gpuvm.py), the flavour's mutants found with fixed seeds, and the correct driver
clean."""

from __future__ import annotations

import pytest

from gemu.host.cli import main
from gemu.host.explore import engine
from gemu.host.explore.exhaustive import BoundedSearch
from gemu.host.explore.scenario import SCENARIOS, ExploreConfig, run_schedule, scenario_for_mutant

GPUVM = SCENARIOS["gpuvm"]
SMALL = SCENARIOS["gpuvm-small"]

# mutant -> (strategy, first seed, schedules within which it is found, invariants that may
# name it first); measured: every one is found in the first few schedules of these campaigns
FOUND = {
    "bind-allocates-pt": ("pct", 1000, 5, {"lockdep"}),
    "fence-vm-resv-only": ("random", 1000, 5, {"gpu-fault"}),
    "validate-skips-other-vm": ("pct", 1000, 5, {"gpu-fault"}),
    "evict-marks-one-vm": ("pct", 1000, 10, {"mapped-free"}),
    "gpuvm-fence-before-validate": ("random", 1000, 5, {"signalling", "kernel-warning"}),
    "gpuvm-fence-after-unlock": ("random", 1000, 10, {"gpu-fault"}),
    "gpuvm-arm-before-validate": ("random", 1000, 5, {"kernel-warning"}),
}


def test_every_flavour_mutant_runs_on_the_gpuvm_scenario():
    """``gemu explore --mutant M`` picks the gpuvm scenario for every mutant of the flavour's
    section of the Mutant enum, and this file tests each."""
    from gemu.guest.gemu_drv.job import Mutant

    section = [m.value for m in Mutant][[m.value for m in Mutant].index("bind-allocates-pt") :]
    assert set(FOUND) <= set(section)
    assert set(section[: len(FOUND)]) == set(FOUND)
    for mutant in FOUND:
        assert scenario_for_mutant(mutant) is GPUVM


def test_same_seed_same_event_log():
    """A gpuvm schedule is a pure function of its seed."""
    cfg = ExploreConfig(scenario=GPUVM)
    a = run_schedule(cfg, 3, keep_log=True)
    b = run_schedule(cfg, 3, keep_log=True)
    assert a.event_log == b.event_log and a.schedule == b.schedule and a.ok
    assert run_schedule(cfg, 4).schedule != a.schedule


def test_correct_driver_passes_a_short_campaign():
    """The working flavour: no violation in 30 schedules of each strategy, and the schedules
    exercise what the scenario is for: binds, execs, evictions (busy BOs skipped too)."""
    for strategy in ("random", "pct"):
        cfg = ExploreConfig(scenario=GPUVM, strategy=strategy)
        report = engine.run_campaign(cfg, 30, seed=100)
        assert report.first is None, report.first and report.first.violations
        assert len(report.interleavings) == 30
    stats = [run_schedule(ExploreConfig(scenario=GPUVM), seed).stats for seed in range(4)]
    for key in ("jobs", "binds", "evicted", "skipped_busy", "kswapd_runs"):
        assert sum(s[key] for s in stats), key


@pytest.mark.parametrize("mutant", sorted(FOUND))
def test_mutant_is_found(mutant):
    """explore finds each of the flavour's mutants and names the invariant that catches it."""
    strategy, seed, limit, kinds = FOUND[mutant]
    cfg = ExploreConfig(scenario=GPUVM, strategy=strategy, mutant=mutant)
    n, kind = engine.schedules_to_detection(cfg, seed, limit)
    assert n is not None, f"{mutant} not found in {limit} schedules"
    assert kind in kinds


def test_evict_marks_one_vm_names_the_frame_and_the_other_vm():
    """The mapped-free report says which frame of which BO was freed while mapped at which
    GPU VA of which VM: a BO shared by several VMs, still mapped in a VM the eviction did not
    mark."""
    cfg = ExploreConfig(scenario=GPUVM, strategy="pct", mutant="evict-marks-one-vm")
    res = next(
        r for r in (run_schedule(cfg, 1000 + i) for i in range(10)) if r.kind == "mapped-free"
    )
    msg = res.violations[0].message
    assert "of shared" in msg and "freed while mapped at GPU VA" in msg and " in vm" in msg


def test_small_scenario_is_clean_without_preemption_and_finds_a_mutant_at_k1():
    """gpuvm-small: the non-preemptive schedule of the correct driver is clean, and the
    bounded search at K=1 finds fence-vm-resv-only (the shared BO, with no fence of the
    running copy on it, evicted under it)."""
    res = BoundedSearch(ExploreConfig(scenario=SMALL), 0).run()
    assert res.complete == 1 and not res.violating
    assert "of gpuvm-small with at most 0 preemptions explored" in res.statement()
    cfg = ExploreConfig(scenario=SMALL, mutant="fence-vm-resv-only")
    found = BoundedSearch(cfg, 1, max_schedules=50).run()
    assert found.first is not None and found.first.kind == "gpu-fault"


def test_cli_explores_the_gpuvm_scenario(capsys):
    """``gemu explore gpuvm --mutant M`` reports the violation; the working driver exits 0."""
    args = ["explore", "gpuvm", "--schedules", "5", "--workers", "1", "--quiet", "--seed", "1000"]
    assert main([*args, "--mutant", "fence-vm-resv-only", "--strategy", "random"]) == 1
    out = capsys.readouterr().out
    assert "VIOLATION gpu-fault" in out and "GPU MMU fault" in out
    assert main(args) == 0
    assert "5 distinct interleavings" in capsys.readouterr().out


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_correct_driver_long_campaign():
    """The working flavour: 3000 schedules of each strategy on gpuvm, zero violations."""
    for strategy in ("random", "pct"):
        cfg = ExploreConfig(scenario=GPUVM, strategy=strategy)
        report = engine.run_campaign(cfg, 3000, seed=50_000, workers=2)
        assert report.first is None, report.first and report.first.violations


@pytest.mark.soak
def test_small_scenario_bounded_proof_k1():
    """The K=1 proof of docs/validation.md: every interleaving of gpuvm-small with at most
    one preemption, 0 violations."""
    res = BoundedSearch(ExploreConfig(scenario=SMALL), 1).run()
    assert not res.violating and not res.stopped_early, res.statement()
    assert res.statement().endswith(": 0 violations")
