"""gemu explore --strategy exhaustive: bounded enumeration, its reduction, its statement."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gemu.guest.kernel import runtime
from gemu.host.cli import main
from gemu.host.explore import exhaustive, repro
from gemu.host.explore.scenario import SCENARIOS, ExploreConfig, run_schedule

# the race scenario cut down to one job per submitter and no hog: K=1 is ~100 schedules
TINY = ExploreConfig(scenario=replace(SCENARIOS["race"], jobs=1, reclaims=0))
RACE = ExploreConfig(scenario=SCENARIOS["race"])


class _Recording(exhaustive.BoundedSearch):
    """Keeps every complete run's decisions and what each one cost."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.runs: list[tuple[list[int], int]] = []

    def _add_alternatives(self, path, one) -> None:
        self.runs.append(([p.chosen for p in one.points], one.spent))
        super()._add_alternatives(path, one)


def test_bound_zero_is_the_one_non_preemptive_schedule():
    """K=0 runs exactly the default schedule: no alternative costs nothing."""
    res = exhaustive.BoundedSearch(TINY, 0, reduce=False).run()
    assert (res.complete, res.pruned) == (1, 0)
    assert res.statement().startswith("all 1 distinct interleavings of race with at most 0")


def test_naive_enumeration_runs_each_schedule_within_the_bound_once():
    """Without the reduction every run is a different schedule, none has more than K
    preemptions, and K=1 contains every K=0 schedule and more."""
    s = _Recording(TINY, 1, reduce=False, keep_going=True)
    res = s.run()
    schedules = [tuple(d) for d, _ in s.runs]
    assert len(schedules) == len(set(schedules)) == res.complete > 1
    assert all(spent <= 1 for _, spent in s.runs)
    assert sum(spent == 0 for _, spent in s.runs) == 1


def test_reduction_reaches_the_same_outcomes_with_fewer_runs():
    """Dynamic partial-order reduction runs fewer schedules and still reaches every outcome
    (verdicts and end statistics) the naive enumeration reaches, at K=1 on the race
    scenario (naive: 367 schedules, 3 outcomes)."""
    naive = exhaustive.BoundedSearch(RACE, 1, reduce=False, keep_going=True).run()
    reduced = exhaustive.BoundedSearch(RACE, 1, reduce=True, keep_going=True).run()
    assert reduced.outcomes == naive.outcomes
    assert len(naive.outcomes) > 1  # the outcomes do depend on the interleaving
    assert naive.pruned == 0 and reduced.pruned > 0
    assert 3 * reduced.run <= naive.run  # 120 of 367
    assert len(reduced.classes) <= reduced.run


def test_reduction_on_the_cut_down_race():
    """On the cut-down race the reduced search runs under half the naive enumeration's
    schedules at K=1 (48 of 105), with the same outcomes."""
    naive = exhaustive.BoundedSearch(TINY, 1, reduce=False, keep_going=True).run()
    reduced = exhaustive.BoundedSearch(TINY, 1, reduce=True, keep_going=True).run()
    assert reduced.outcomes == naive.outcomes
    assert 2 * reduced.run <= naive.run


def test_reduced_search_finds_what_the_naive_one_finds_within_the_bound():
    """pt-alloc-under-lock needs kswapd to run before the submitters start; with the reduced
    search moving that preemption to a later point, the schedule after it must still be the
    one the naive enumeration runs (the preempted task resumes), or the violation would need
    a second preemption and escape the K=1 search."""
    cfg = replace(RACE, mutant="pt-alloc-under-lock")
    res = exhaustive.BoundedSearch(cfg, 1).run()
    assert res.first is not None and res.first.kind == "lockdep"
    assert "pt" in res.first.violations[0].message or "pgtable" in res.first.violations[0].message


def _enabler_run(bound: int) -> list:
    """The decisions of a made-up run after its races are read: task 1 runs 'lock a' and
    'unlock a' (decisions 0 and 1, task 3 asleep on queue q at both), task 2 then wakes q and
    task 3's step after its wake-up works on a too, a race with task 1's 'unlock a'."""
    s = exhaustive._Step
    one = exhaustive._Run([])
    one.steps = [
        s(1, frozenset({"a"}), 0, "lock a"),
        s(1, frozenset({"a"}), 1, "unlock a"),
        s(2, frozenset({"q"}), None, "wake x"),
        s(3, frozenset({"q", "a"}), None, "wake q"),
    ]
    path = [exhaustive._Point((1, 2), 1, 1, 0), exhaustive._Point((1, 2), 1, 1, 0)]
    exhaustive.BoundedSearch(TINY, bound)._add_alternatives(path, one)
    return path


def test_a_blocked_racer_is_reached_through_its_waker_within_the_bound():
    """Task 3 cannot run at the decision before task 1's 'unlock a', so the race is reversed
    by running task 2, whose step wakes it. Where task 1 is running there (decision 1), that
    choice preempts it and task 1 is handed back the CPU when task 2 blocks, before task 3:
    the reversal needs two preemptions, so with a bound of 1 task 2 is tried only where task
    1's run began (decision 0), with a bound of 2 at both."""
    one_left = _enabler_run(1)
    assert one_left[0].backtrack == {1, 2} and one_left[1].backtrack == {1}
    two_left = _enabler_run(2)
    assert two_left[0].backtrack == {1, 2} and two_left[1].backtrack == {1, 2}


def test_races_follow_happens_before():
    """A race is a dependent pair of steps of two tasks that nothing orders in between: the
    lock handed from task 1 to task 2 to task 1 gives the races (0, 1) and (1, 2), and not
    (0, 2), which the step of task 2 orders."""
    s = exhaustive._Step
    steps = [
        s(1, frozenset({"l"}), 0),
        s(2, frozenset({"l"}), 1),
        s(1, frozenset({"l"}), 2),
        s(3, frozenset({"other"}), 3),
    ]
    assert exhaustive.races(steps) == [(0, 1), (1, 2)]
    glob = [s(1, frozenset({"a"}), 0), s(2, frozenset({exhaustive.GLOBAL}), 1)]
    assert exhaustive.races(glob) == [(0, 1)]


def test_correct_driver_is_clean_and_a_mutant_is_found_within_one_preemption():
    clean = exhaustive.BoundedSearch(TINY, 1).run()
    assert clean.violating == [] and not clean.stopped_early
    found = exhaustive.BoundedSearch(replace(RACE, mutant="shrinker-skips-busy"), 1).run()
    assert found.first is not None and found.stopped_early
    assert "1 violation" in found.statement()


def test_a_violating_schedule_replays_exactly(tmp_path):
    """The decisions of an exhaustive run are an ordinary recorded schedule: the reproduction
    replays it with the same verdict."""
    cfg = replace(RACE, mutant="shrinker-skips-busy")
    res = exhaustive.BoundedSearch(cfg, 1).run()
    first = res.first
    assert first is not None
    again = run_schedule(replace(cfg, strategy="exhaustive"), 0, first.schedule)
    assert again.schedule == first.schedule and again.violations == first.violations
    out = repro.write_repro(tmp_path, replace(cfg, strategy="exhaustive"), 0, first.schedule)
    assert out.violations == first.violations


@pytest.mark.parametrize(
    "label,obj",
    [
        ("lock bo3", "bo3"),
        ("unlock gemu0:shmem_mm", "gemu0:shmem_mm"),
        ("wake dma_fence 3:1", "dma_fence 3:1"),
        # a fence or reservation point that did not name its instance could be on any one
        ("dma_fence.signal", exhaustive.GLOBAL),
        ("dma_resv.add_fence", exhaustive.GLOBAL),
        ("alloc_pages", "mm"),
        ("advance 1000", "gpu"),
        ("spawn hog", "spawn hog"),
        ("hog holds its frames", "mm"),
        ("something unknown", exhaustive.GLOBAL),
    ],
)
def test_footprints(label, obj):
    assert exhaustive.footprint_of(label) == obj


def test_footprints_of_named_instances():
    """A point that names its fence or reservation object works on that instance, named as
    its wait queue or lock is."""
    from gemu.guest.dma_buf import dma_resv

    resv = dma_resv.DmaResv("bo9")
    assert exhaustive.footprint_of("dma_resv.add_fence", resv) == "bo9"

    class Fence:
        context, seqno = 3, 1

    assert exhaustive.footprint_of("dma_fence.signal", Fence()) == "dma_fence 3:1"


def test_a_spawned_task_records_its_first_transition():
    """A task's first transition (from its start to its first preemption point) records what
    it waited on, and the point it ends at names its object for the next one, as every other
    transition does. Both used to be lost (the recorder had not started the new task's
    record yet): the start worked on nothing shared and the fence point after it on
    ``dma_fence``, a name none of the per-instance ones (``dma_fence 7:1``) meets, so a
    search took both for independent of the steps they race with."""
    rt = runtime.Deterministic(0)
    one = exhaustive._Run([])
    one.attach(rt)
    queue = runtime.WaitQueue("first wait")

    class Fence:
        context, seqno = 7, 1

    def child() -> None:
        queue.wait_event(lambda: True)
        runtime.preempt("dma_fence.signal", on=Fence())

    spawned = []

    def main() -> None:
        spawned.append(runtime.spawn(child, name="child"))
        spawned[0].join()

    rt.run(main)
    tid = spawned[0].tid
    first, second = [st for st in one.steps if st.tid == tid][:2]
    assert first.label == "start" and "first wait" in first.objs
    # the fence point's step ends with the task, which wakes its joiner
    assert second.label == "dma_fence.signal"
    assert second.objs == {"dma_fence 7:1", "exit of child"}


def test_cli_prints_the_statement_and_exits_by_verdict(capsys, tmp_path):
    args = ["explore", "race", "--strategy", "exhaustive", "--preemption-bound", "0", "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "all 1 distinct interleavings (up to the order of independent steps) of race" in out
    assert "0 violations" in out
    bad = [*args[:4], "--preemption-bound", "1", "--mutant", "shrinker-skips-busy", "--no-shrink"]
    assert main([*bad, "--out", str(tmp_path), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "VIOLATION gpu-fault" in out and (tmp_path / "seed-0" / "repro.json").is_file()
    with pytest.raises(SystemExit):
        main(["explore", "race", "--strategy", "exhaustive", "--preemption-bound", "-1"])


def test_two_workers_reach_what_one_reaches():
    """Dealing the branches out to two processes reaches the same outcomes and stays clean
    (a worker may run a class the other also ran, so the counts may differ)."""
    one = exhaustive.BoundedSearch(TINY, 1, keep_going=True).run()
    two = exhaustive.BoundedSearch(TINY, 1, keep_going=True).run(workers=2)
    assert two.outcomes == one.outcomes and not two.stopped_early
    assert two.violating == one.violating == []
    found = exhaustive.BoundedSearch(replace(RACE, mutant="shrinker-skips-busy"), 1).run(2)
    assert found.first is not None


def test_two_workers_count_what_they_run_not_as_pruned():
    """The naive enumeration prunes nothing, in one process or dealt out to two: the
    alternatives handed to the workers are run there, not left untried (the statement of
    a search with workers said '105 schedules run, 104 pruned')."""
    one = exhaustive.BoundedSearch(TINY, 1, reduce=False, keep_going=True).run()
    two = exhaustive.BoundedSearch(TINY, 1, reduce=False, keep_going=True).run(workers=2)
    assert (two.run, two.pruned) == (one.run, one.pruned) == (one.run, 0)


def test_distinct_interleavings_in_both_modes():
    """What the statement and the progress line count as distinct interleavings: trace
    classes when reduced, every schedule when naive (the progress line said 0 there)."""
    naive = exhaustive.BoundedSearch(TINY, 1, reduce=False, keep_going=True).run()
    reduced = exhaustive.BoundedSearch(TINY, 1, keep_going=True).run()
    assert naive.distinct == naive.complete > len(naive.classes) > 1
    assert reduced.distinct == len(reduced.classes) > 1
    assert f"all {naive.distinct} distinct interleavings of race" in naive.statement()


def test_the_harness_list_of_fences_is_a_footprint():
    """Every submitter appends its job's fence to the one list the end of the run reads in
    order: the steps that append name it (``scenario fences``), so a search orders two
    submitters' appends. Before, they looked independent, and two schedules that appended
    in different orders counted as one state although the end checked the fences in a
    different order (found by the state cache reaching 12 fewer classes at K=2)."""
    one = exhaustive._Run([])
    run_schedule(replace(TINY, strategy="exhaustive", backend="greenlet"), 0, search=one)
    appending = [st for st in one.steps if "scenario fences" in st.objs]
    assert len({st.tid for st in appending}) == 2  # both submitters
    assert len(appending) == TINY.scenario.tasks * TINY.scenario.jobs


def test_the_state_cache_reaches_the_same_classes_with_fewer_runs():
    """On the cut-down race at K=2 the state cache (``cache=True``) leaves out about a
    quarter of the reduced search's runs (1,186 of 1,536) and reaches exactly the same
    trace classes and outcomes: what it skips below a state was searched below the same
    state before."""
    plain = exhaustive.BoundedSearch(TINY, 2, keep_going=True).run()
    cached = exhaustive.BoundedSearch(TINY, 2, cache=True, keep_going=True).run()
    assert cached.classes == plain.classes and cached.outcomes == plain.outcomes
    assert plain.merged == 0 < cached.merged
    assert 5 * cached.run <= 4 * plain.run
    assert "at a state searched before" in cached.statement()


class _Task:
    def __init__(self, tid: int, done: bool = False) -> None:
        self.tid, self.done = tid, done


def test_a_state_is_searched_again_only_with_more_preemptions_left():
    """The cache's rule: the same trace, task at the point, default and preempted tasks
    reached with as many preemptions spent or more is cut; with fewer spent (more left) it
    is searched again and becomes the state's record. A finished task on the preempted
    stack does not make the state differ (the default skips it)."""
    visited: dict = {}
    a, b, gone = _Task(1), _Task(2), _Task(3, done=True)

    def reach(spent: int, preempted: list, default=b) -> int | None:
        one = exhaustive._Run([], visited, bound=2)
        one.spent, one.preempted = spent, preempted
        one._check_state(7, a, default)
        return one.cut

    assert reach(1, [b]) is None  # first time: recorded
    assert reach(1, [b, gone]) == 7  # the same state, as many spent: cut
    assert reach(0, [b]) is None  # more left: searched again
    assert reach(1, [b]) == 7 and reach(0, [b]) == 7
    assert reach(0, [b], default=a) is None  # another default: another state
    assert reach(0, []) is None  # other preempted tasks: another state


def test_cli_turns_the_state_cache_on(monkeypatch, capsys):
    """``--state-cache`` adds the state cache to the reduction; by default it is off, and
    ``--no-reduction`` runs neither."""
    seen = []
    real = exhaustive.BoundedSearch.__init__

    def spy(self, *a, **kw):
        real(self, *a, **kw)
        seen.append((self.reduce, self.cache))

    monkeypatch.setattr(exhaustive.BoundedSearch, "__init__", spy)
    args = ["explore", "race", "--strategy", "exhaustive", "--preemption-bound", "0", "--quiet"]
    for extra in ([], ["--state-cache"], ["--no-reduction"]):
        assert main([*args, *extra]) == 0
    assert seen == [(True, False), (True, True), (False, False)]
    assert capsys.readouterr().out.count("0 violations") == 3


def test_the_naive_schedule_count_without_running_the_last_bound():
    """naive_schedule_count(cfg, K) runs the naive enumeration at K-1 and counts the
    choices costing one more after each run's last preemption: exactly what the naive
    enumeration at K runs (the bench checks K=2 on the cut-down race: 7,426 both ways)."""
    for bound in (0, 1):
        ran = exhaustive.BoundedSearch(TINY, bound, reduce=False, keep_going=True).run()
        assert exhaustive.naive_schedule_count(TINY, bound) == ran.run
    assert exhaustive.naive_schedule_count(TINY, 1) > 1
