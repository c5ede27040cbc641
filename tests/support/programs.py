"""The bounded exhaustive search over made-up runtime programs instead of a scenario: a
program is a function the deterministic runtime runs as its main task, and its return value
is the run's outcome. Small enough to enumerate without the reduction at K=2 or 3 in under
a second, so tests can compare both searches exactly."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

from gemu.guest.kernel import runtime
from gemu.host.explore import exhaustive
from gemu.host.explore.scenario import SCENARIOS, ExploreConfig

# only names the search; the programs never run a scenario
CFG = ExploreConfig(scenario=replace(SCENARIOS["race"], jobs=1, reclaims=0))


class ProgramSearch(exhaustive.BoundedSearch):
    """:class:`~gemu.host.explore.exhaustive.BoundedSearch` over ``program``: each run is a
    fresh deterministic runtime running it, with the search's decisions and state cache;
    the program's return value is the run's outcome."""

    def __init__(self, program, bound: int, **kwargs) -> None:
        super().__init__(CFG, bound, keep_going=True, **kwargs)
        self.program = program

    def _schedule(self, one):
        rt = runtime.Deterministic(0)
        one.attach(rt)
        return SimpleNamespace(violations=[], outcome=rt.run(self.program))


def both(program, bound: int = 1):
    """The naive enumeration and the reduced search of ``program`` at ``bound``."""
    naive = ProgramSearch(program, bound, reduce=False).run()
    reduced = ProgramSearch(program, bound, reduce=True).run()
    return naive, reduced
