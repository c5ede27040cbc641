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
    """Three workers, two rounds of their own lock each, K=2: the naive enumeration runs
    717 schedules, the reduced search 62, and both reach all six orders of the shared lock.
    The reduced search runs 38 of the naive one's 47 trace classes: under a bound, a class
    whose representatives the reduction reaches need more preemptions than are left is not
    run (explore.md says so); every outcome is among those it runs."""
    naive, reduced = both(_workers(3, 2), 2)
    assert naive.outcomes == reduced.outcomes
    assert len(naive.outcomes) == 6
    assert (len(naive.classes), len(reduced.classes)) == (47, 38)
    assert naive.run >= 10 * reduced.run
    assert (naive.run, reduced.run) == (717, 62)


def test_the_reduction_grows_with_the_bound():
    """K=3 on the same program: 6,856 schedules naive, 120 reduced (57x), the same
    outcomes."""
    naive, reduced = both(_workers(3, 2), 3)
    assert naive.outcomes == reduced.outcomes
    assert naive.run >= 50 * reduced.run


def test_the_state_cache_keeps_every_class_on_a_program():
    """The reduction with and without its state cache reaches the same trace classes; the
    cache runs fewer schedules (62 against 76 at K=2, 120 against 138 at K=3)."""
    for bound in (2, 3):
        cached = ProgramSearch(_workers(3, 2), bound).run()
        plain = ProgramSearch(_workers(3, 2), bound, cache=False).run()
        assert cached.classes == plain.classes and cached.outcomes == plain.outcomes
        assert cached.run < plain.run and cached.merged > 0
