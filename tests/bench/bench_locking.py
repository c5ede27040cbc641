"""Benchmark: the cost of locking and of exploring schedules (issue 3).

- ``ww_mutex uncontended lock+unlock``: one task, one ww mutex, one acquire context, in the
  free-running runtime (preemption points cost nothing; lockdep is on, as in every run),
  against an empty Python loop over the same count.
- ``deterministic ABBA schedules explored``: whole runs per second of the 3-task, 2-lock ABBA
  program with back-off (main and one task lock A then B, a third locks B then A) under the
  seeded random scheduler, one fresh runtime and seed per run. Its limit is the fastest a
  baton-passing scheduler could go: a raw ``threading.Lock`` ping-pong between two threads
  (one task switch), divided by the task switches the runs actually made.
"""

from __future__ import annotations

import itertools
import time

from gemu.guest.errors import Edeadlk
from gemu.guest.kernel import runtime
from gemu.guest.kernel.runtime import Deterministic, FreeRunning
from gemu.guest.locking import ww_mutex as ww
from tests.bench.common import Row, best_of, empty_loop_rate, thread_handoff_rate

CLASS = ww.WD_CLASS("bench")


def _uncontended_rate(n: int) -> float:
    def body() -> float:
        m = ww.WwMutex(CLASS, "m")
        ctx = ww.acquire_init(CLASS)
        lock, unlock = ww.lock, ww.unlock
        t0 = time.perf_counter()
        for _ in range(n):
            lock(m, ctx)
            unlock(m)
        dt = time.perf_counter() - t0
        ww.acquire_fini(ctx)
        return dt

    return n / best_of(lambda: FreeRunning().run(body))


def _transaction(first: ww.WwMutex, second: ww.WwMutex) -> None:
    ctx = ww.acquire_init(CLASS)
    contended = None
    while True:
        if contended is not None:
            ww.lock_slow(contended, ctx)
        try:
            for lk in (first, second):
                if lk is not contended:
                    ww.lock(lk, ctx)
            break
        except Edeadlk:
            for lk in (first, second):
                if lk.ctx is ctx:
                    ww.unlock(lk)
            contended = ctx.contending_lock
    ww.unlock(second)
    ww.unlock(first)
    ww.acquire_fini(ctx)


def _abba() -> None:
    a, b = ww.WwMutex(CLASS, "A"), ww.WwMutex(CLASS, "B")
    t1 = runtime.spawn(_transaction, a, b, name="ab")
    t2 = runtime.spawn(_transaction, b, a, name="ba")
    _transaction(a, b)
    t1.join()
    t2.join()


def _switches(log: list[str]) -> int:
    names = [line.split(" ", 2)[1] for line in log]
    return sum(1 for x, y in itertools.pairwise(names) if x != y)


def _schedules_rate(runs: int) -> tuple[float, float]:
    """(schedules per second, task switches per schedule)."""
    switches = 0
    t0 = time.perf_counter()
    for seed in range(runs):
        rt = Deterministic(seed)
        rt.run(_abba)
        switches += _switches(rt.event_log)
    dt = time.perf_counter() - t0
    return runs / dt, switches / runs


def bench(quick: bool) -> list[Row]:
    n = 5_000 if quick else 50_000
    runs = 300 if quick else 3_000
    _schedules_rate(20)  # warm the worker pool
    rate, per_run = _schedules_rate(runs)
    handoff = max(thread_handoff_rate(n // 5) for _ in range(3))
    return [
        Row(
            issue=3,
            name="ww_mutex uncontended lock+unlock (free-running)",
            value=_uncontended_rate(n),
            unit="lock+unlock/s",
            limit_name="empty_loop",
            limit_value=empty_loop_rate(n),
            aim="informational: per-lock cost with lockdep on",
            note=f"{n} pairs, one acquire context, wait-die class",
        ),
        Row(
            issue=3,
            name="deterministic ABBA schedules explored (3 tasks, 2 locks, back-off)",
            value=rate,
            unit="schedules/s",
            limit_name="thread handoff floor / switches per schedule",
            limit_value=handoff / per_run,
            aim=">= 1000 schedules/s",
            note=(
                f"{runs} seeds, random strategy, {per_run:.1f} task switches per schedule, "
                f"raw lock ping-pong {handoff:,.0f} switches/s"
            ),
        ),
    ]


if __name__ == "__main__":
    for row in bench(quick=False):
        print(f"{row.name}: {row.value:,.0f} {row.unit}; {row.limit_name} {row.limit_value:,.0f}")
        print(f"  ratio {row.ratio:.3f}  ({row.note})")
