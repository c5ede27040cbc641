"""run_schedule keeps Python's cyclic garbage collector off while a schedule runs and collects
the schedule's machine once it is garbage: the collector's state is the caller's again
afterwards, and nothing of the run outlives it."""

from __future__ import annotations

import gc
import weakref

import pytest

from gemu.host.explore import scenario
from gemu.host.explore.scenario import SCENARIOS, ExploreConfig, run_schedule

SMALL = ExploreConfig(scenario=SCENARIOS["small"])


@pytest.fixture
def runtimes(monkeypatch) -> list[tuple[weakref.ref, bool]]:
    """A weak reference to every runtime run_schedule makes, and whether the collector was on
    when it was made."""
    made: list[tuple[weakref.ref, bool]] = []
    init = scenario.ExploreRuntime.__init__

    def watched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append((weakref.ref(self), gc.isenabled()))

    monkeypatch.setattr(scenario.ExploreRuntime, "__init__", watched)
    return made


def test_collector_off_during_the_run_and_the_machine_freed_after(runtimes):
    """The collector is off while the runtime exists and on again after; the runtime (and
    with it the machine, which its tasks reference) is gone when run_schedule returns."""
    assert gc.isenabled()
    res = run_schedule(SMALL, 3)
    assert res.ok and res.steps > 0
    assert gc.isenabled()
    [(runtime, collector_on)] = runtimes
    assert not collector_on
    assert runtime() is None  # the cycles of the run were collected


def test_a_caller_that_turned_the_collector_off_keeps_it_off(runtimes):
    """run_schedule never turns on a collector its caller turned off."""
    gc.disable()
    try:
        run_schedule(SMALL, 3)
        assert not gc.isenabled()
    finally:
        gc.enable()
