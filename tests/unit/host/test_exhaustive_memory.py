"""A bounded search keeps nothing of the schedules it ran: every schedule builds a machine
(guest RAM, the GPU, the driver), and a search runs thousands of them."""

from __future__ import annotations

import gc
import weakref

from gemu.guest.mm import shrinker
from gemu.host.explore import exhaustive
from gemu.host.explore.scenario import SCENARIOS, ExploreConfig, run_schedule


def test_a_schedule_leaves_no_machine_behind():
    """The first schedule of gpuvm-small's search ends with the hog's reclaim marked as having
    met a contended shrinker (it asks no more after its last pass): the mark must not keep
    the hog's task, and through it the runtime and the whole machine, alive. It did, once per
    such schedule (about 1 MB each), until a two-worker search of gpuvm-small at K=2 was
    killed by the OOM killer at 13 GB."""
    seen = []

    class Run(exhaustive._Run):
        def attach(self, rt) -> None:
            seen.append(weakref.ref(rt))
            super().attach(rt)

    cfg = ExploreConfig(scenario=SCENARIOS["gpuvm-small"], strategy="exhaustive")
    run_schedule(cfg, 0, search=Run([]))
    gc.collect()
    assert seen and seen[0]() is None, [t for t in shrinker._came_back if t.name == "hog"]
