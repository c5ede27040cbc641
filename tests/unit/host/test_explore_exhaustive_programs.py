"""The reduction of the bounded exhaustive search measured on made-up programs where the
naive enumeration finishes in a second at K=2 and K=3: the same outcomes, far fewer runs.

The driver's scenarios are checked the same way in test_explore_exhaustive.py, at the bounds
where their naive enumeration is quick; there, a reduction cannot reach 10x, because the
naive enumeration itself runs each trace class at most about 10 times (race at K=1: 367
schedules for 98 classes; the cut-down race at K=2: 7,426 for 754). A program whose tasks do
mostly independent work, as real submitters on their own BOs do, shows what the reduction
does when independence is there to use.
"""

from __future__ import annotations

from gemu.guest.kernel import runtime
from tests.support.programs import ProgramSearch, both


def _workers(tasks: int, rounds: int):
    """``tasks`` workers; each takes and drops its own lock ``rounds`` times (steps that
    commute with every other worker's), then takes the one shared lock and appends its
    number. The outcome is the order the workers got the shared lock in."""

    def program() -> tuple[int, ...]:
        order: list[int] = []

        def worker(i: int) -> None:
            for _ in range(rounds):
                runtime.preempt(f"lock own{i}")
                runtime.preempt(f"unlock own{i}")
            runtime.preempt("lock shared")
            order.append(i)
            runtime.preempt("unlock shared")

        tasks_ = [runtime.spawn(worker, i, name=f"worker{i}") for i in range(tasks)]
        for t in tasks_:
            t.join()
        return tuple(order)

    return program


def test_the_reduction_is_tenfold_where_the_work_is_independent():
    """Three workers, four rounds of their own lock each, K=2: the naive enumeration runs
    1,605 schedules, the reduced search 131 (12.3x), and both reach all six orders of the
    shared lock and the same 47 trace classes. With two rounds each the naive count is 717
    and the reduced one the same 131: the reduction's runs follow the races, the naive
    enumeration's the number of preemption points."""
    naive, reduced = both(_workers(3, 4), 2)
    assert naive.outcomes == reduced.outcomes
    assert len(naive.outcomes) == 6
    assert naive.classes == reduced.classes
    assert naive.run >= 10 * reduced.run
    assert (naive.run, reduced.run) == (1605, 131)
    shorter, same = both(_workers(3, 2), 2)
    assert (shorter.run, same.run) == (717, 131)


def test_the_reduction_grows_with_the_bound():
    """K=3 with two rounds each: 6,856 schedules naive, 564 reduced (12.2x), the same
    outcomes and the same 130 classes."""
    naive, reduced = both(_workers(3, 2), 3)
    assert naive.outcomes == reduced.outcomes and naive.classes == reduced.classes
    assert naive.run >= 12 * reduced.run


def test_the_state_cache_keeps_every_class_on_a_program():
    """The reduction with and without its state cache reaches the same trace classes on
    three workers; the cache runs fewer schedules (113 against 131 at K=2, 438 against 564
    at K=3)."""
    for bound in (2, 3):
        cached = ProgramSearch(_workers(3, 2), bound, cache=True).run()
        plain = ProgramSearch(_workers(3, 2), bound).run()
        assert cached.classes == plain.classes and cached.outcomes == plain.outcomes
        assert cached.run < plain.run and cached.merged > 0


def test_the_reduction_reaches_every_outcome_of_four_workers_at_k2():
    """Four workers, one round each, K=2: the naive enumeration reaches 23 of the 24 orders
    of the shared lock. The reduced search reached 21: missing (2, 3, 1, 0) and (3, 0, 2, 1).
    Its sleep sets put worker 1 to sleep for the branch that starts worker 2 first (worker
    1's start had been tried at that decision and commutes with everything after it), so
    the preemption of worker 0 to worker 1 before the shared lock was never tried; the
    schedule equivalent to it in worker 1's own branch needs a third preemption. Under a
    preemption bound a sleeping task's branch does not cover what it covers unbounded."""
    naive, reduced = both(_workers(4, 1), 2)
    assert len(naive.outcomes) == 23
    assert reduced.outcomes == naive.outcomes
