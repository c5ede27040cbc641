"""Tests of gemu.guest.kernel.runtime: scheduling, replay, the virtual clock, deadlock
reports, signals and the free-running mode."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from gemu.guest.errors import Erestartsys
from gemu.guest.kernel import runtime
from gemu.guest.kernel.runtime import (
    Completion,
    DeadlockError,
    Deterministic,
    FreeRunning,
    LivelockError,
    ReplayDivergence,
    WaitQueue,
)
from gemu.guest.locking.mutex import Mutex

SEEDS = range(60)


def _counter_program(n_tasks: int = 3, rounds: int = 3) -> list[int]:
    """Tasks increment a shared counter under a mutex; returns the order of increments."""
    lock = Mutex("counter")
    order: list[int] = []

    def worker(i: int) -> None:
        for _ in range(rounds):
            with lock:
                order.append(i)
                runtime.preempt(f"inside {i}")

    tasks = [runtime.spawn(worker, i, name=f"w{i}") for i in range(n_tasks)]
    for t in tasks:
        t.join()
    return order


def test_same_seed_gives_identical_event_log():
    """Two runs with the same seed produce the same event log, schedule and result."""
    for seed in SEEDS:
        a, b = Deterministic(seed), Deterministic(seed)
        assert a.run(_counter_program) == b.run(_counter_program)
        assert a.event_log == b.event_log
        assert a.schedule == b.schedule
        assert a.steps == b.steps > 0


def test_different_seeds_explore_different_interleavings():
    """Across seeds the scheduler really interleaves tasks differently."""
    logs = {tuple(_run_log(seed)) for seed in SEEDS}
    orders = {tuple(Deterministic(seed).run(_counter_program)) for seed in SEEDS}
    assert len(logs) > len(SEEDS) // 2
    assert len(orders) > 5


def _run_log(seed: int) -> list[str]:
    rt = Deterministic(seed)
    rt.run(_counter_program)
    return rt.event_log


def test_replay_of_a_recorded_schedule_reproduces_the_log():
    """Feeding rt.schedule back as replay= reproduces the run, whatever the new seed."""
    for seed in SEEDS:
        rec = Deterministic(seed)
        rec.run(_counter_program)
        rep = Deterministic(seed + 1000, replay=rec.schedule)
        rep.run(_counter_program)
        assert rep.event_log == rec.event_log


def test_replay_detects_a_diverging_program():
    """A schedule replayed against a different program names the impossible decision."""
    rec = Deterministic(3)
    rec.run(_counter_program, 3)
    with pytest.raises(ReplayDivergence, match="replay decision"):
        Deterministic(3, replay=[99, *rec.schedule]).run(_counter_program, 3)


def test_event_log_lines_name_step_task_and_event():
    """Event log lines read "<step> <task> <event>" and rt.log() adds custom events."""

    def main():
        runtime.log("hello")
        runtime.preempt("point")

    rt = Deterministic(0)
    rt.run(main)
    assert rt.event_log == ["0 main hello", "1 main point"]


def _depth2_program(pct_probe: SimpleNamespace) -> None:
    """A bug needing two orderings: t2 writes x before t1 reads x, and t1 reads y before
    t2 writes y (t2 runs many steps in between)."""
    state = SimpleNamespace(x=0, y=0)

    def t1():
        ry = state.y
        runtime.preempt("t1 read y")
        rx = state.x
        if rx == 1 and ry == 0:
            pct_probe.found = True

    def t2():
        state.x = 1
        for i in range(8):
            runtime.preempt(f"t2 work {i}")
        state.y = 1

    a = runtime.spawn(t2, name="t2")
    b = runtime.spawn(t1, name="t1")
    a.join()
    b.join()


def test_pct_finds_a_depth_two_bug():
    """PCT with depth 2 hits an ordering bug that needs a priority change mid-run."""
    probe = SimpleNamespace(found=False)
    sizing = Deterministic(0)
    sizing.run(_depth2_program, probe)
    found = []
    for seed in range(200):
        probe.found = False
        Deterministic(seed, strategy="pct", pct_depth=2, pct_steps=sizing.steps).run(
            _depth2_program, probe
        )
        found.append(probe.found)
    assert any(found)
    assert not all(found)


def test_pct_without_change_points_runs_highest_priority_first():
    """PCT depth 1 never preempts a runnable task for a lower-priority one: the first
    task to run finishes its whole loop before the other starts."""
    for seed in range(30):
        order = []

        def main(order=order):
            def w(i):
                for _ in range(3):
                    order.append(i)
                    runtime.preempt("w")

            t = [runtime.spawn(w, i, name=f"w{i}") for i in range(2)]
            for x in t:
                x.join()

        Deterministic(seed, strategy="pct", pct_depth=1).run(main)
        assert order in ([0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0])


def test_deadlock_report_lists_every_task_its_locks_and_wait():
    """A run where nothing can run raises DeadlockError naming each task, what it holds and
    what it waits for, with the seed and a replay command."""

    def main():
        m = Mutex("big_lock")
        never = Completion("never")

        def stuck():
            m.lock()
            never.wait_for_completion()

        runtime.spawn(stuck, name="holder")
        runtime.preempt("let holder run")
        while not m.is_locked():
            runtime.preempt("yield")
        m.lock()

    with pytest.raises(DeadlockError) as info:
        Deterministic(5).run(main)
    msg = str(info.value)
    assert "no task can run" in msg
    assert "'holder': holds big_lock; waits for completion never" in msg
    assert "'main': holds nothing; waits for mutex big_lock held by holder" in msg
    assert "seed 5" in msg and "gemu explore --replay 5 --strategy random" in msg
    assert info.value.seed == 5
    assert info.value.replay_hint == "gemu explore --replay 5 --strategy random"


def test_task_exception_is_raised_with_seed_and_others_are_unwound():
    """The first task exception ends the run, carries the seed and replay hint, and every
    other task is unwound (its finally blocks run)."""
    unwound = []

    def main():
        def waiter():
            try:
                Completion("never").wait_for_completion()
            finally:
                unwound.append("waiter")

        runtime.spawn(waiter, name="waiter")
        runtime.preempt("p")
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom") as info:
        Deterministic(11).run(main)
    assert info.value.seed == 11
    assert "--replay 11" in info.value.replay_hint
    assert any("replay" in note for note in info.value.__notes__)
    assert unwound == ["waiter"]


def test_max_steps_reports_a_livelock():
    """A program that never ends is stopped at max_steps with LivelockError."""

    def spinner():
        while True:
            runtime.preempt("spin")

    with pytest.raises(LivelockError, match="no end after 50 steps"):
        Deterministic(0, max_steps=50).run(spinner)


def test_run_returns_main_result_after_all_tasks_finish():
    """run() returns main's value only once spawned tasks (not joined) have finished."""
    finished = []

    def main():
        runtime.spawn(lambda: finished.append("child"), name="child")
        return 42

    for seed in range(10):
        finished.clear()
        assert Deterministic(seed).run(main) == 42
        assert finished == ["child"]


def test_a_runtime_runs_once():
    """Reusing a Deterministic runtime is refused (its logs describe one run)."""
    rt = Deterministic(0)
    rt.run(lambda: None)
    with pytest.raises(RuntimeError, match="runs once"):
        rt.run(lambda: None)


def test_worker_threads_are_reused_across_runs():
    """Many runs (including failing ones) do not accumulate threads."""
    for seed in range(20):
        Deterministic(seed).run(_counter_program)
    before = threading.active_count()
    for seed in range(200):
        Deterministic(seed).run(_counter_program)
        with pytest.raises(DeadlockError):
            Deterministic(seed).run(lambda: Completion().wait_for_completion())
    assert threading.active_count() <= before + 2


# The virtual clock.


def test_clock_jumps_to_the_earliest_deadline_when_all_tasks_block():
    """With every task blocked, virtual time jumps to the next deadline; sleepers wake in
    deadline order and timed-out waits return False."""

    def main():
        woke = []

        def sleeper(ns):
            runtime.sleep_ns(ns)
            woke.append((ns, runtime.now_ns()))

        tasks = [runtime.spawn(sleeper, ns, name=f"s{ns}") for ns in (3000, 1000, 2000)]
        got = WaitQueue("never").wait_event(lambda: False, timeout_ns=5000)
        for t in tasks:
            t.join()
        return got, woke, runtime.now_ns()

    for seed in range(20):
        got, woke, now = Deterministic(seed).run(main)
        assert got is False
        assert woke == [(1000, 1000), (2000, 2000), (3000, 3000)]
        assert now == 5000


def test_wait_event_poll_and_success_before_timeout():
    """timeout_ns=0 polls; a condition made true before the deadline returns True at once."""

    def main():
        wq = WaitQueue("flag")
        state = SimpleNamespace(flag=False)
        assert wq.wait_event(lambda: state.flag, timeout_ns=0) is False

        def setter():
            with wq.lock:
                state.flag = True
            wq.wake_up_all()

        runtime.spawn(setter, name="setter")
        assert wq.wait_event(lambda: state.flag, timeout_ns=10_000) is True
        assert runtime.now_ns() == 0

    for seed in range(20):
        Deterministic(seed).run(main)


def test_advance_times_out_waiters():
    """An explicit advance() moves the clock and expires the waits it passes."""

    def main():
        result = {}

        def waiter():
            result["got"] = WaitQueue("x").wait_event(lambda: False, timeout_ns=100)
            result["at"] = runtime.now_ns()

        t = runtime.spawn(waiter, name="waiter")
        while t.wait_reason is None and not t.done:
            runtime.preempt("let waiter block")
        runtime.advance(250)
        t.join()
        return result

    for seed in range(20):
        assert Deterministic(seed).run(main) == {"got": False, "at": 250}


def test_join_with_timeout_in_virtual_time():
    """Task.join(timeout) gives up after that much virtual time."""

    def main():
        never = Completion("never")
        t = runtime.spawn(never.wait_for_completion, name="blocked")
        assert t.join(timeout=1e-6) is False
        assert runtime.now_ns() == 1000
        never.complete()
        assert t.join() is True

    Deterministic(0).run(main)


# Signals.


def test_interruptible_wait_raises_erestartsys_on_signal():
    """A signal pending on a task aborts its interruptible wait with -ERESTARTSYS, whether
    it arrives before or during the wait."""

    def main():
        done = Completion("never")
        out = {}

        def sleeper():
            try:
                done.wait_for_completion_interruptible()
            except Erestartsys as e:
                out["err"] = e

        t = runtime.spawn(sleeper, name="sleeper")
        runtime.preempt("maybe let it sleep")
        t.send_signal()
        t.join()
        return out

    for seed in SEEDS:
        out = Deterministic(seed).run(main)
        assert "-ERESTARTSYS" in str(out["err"])


def test_uninterruptible_wait_ignores_signals():
    """A non-interruptible wait keeps sleeping through a signal until its condition holds."""

    def main():
        done = Completion("later")
        t = runtime.spawn(done.wait_for_completion, name="sleeper")
        runtime.preempt("p")
        t.send_signal()
        runtime.preempt("p")
        assert not t.done
        done.complete()
        t.join()
        assert t.signal_pending
        t.clear_signal()
        assert not t.signal_pending

    for seed in range(20):
        Deterministic(seed).run(main)


def test_completion_counts_and_complete_all():
    """complete() lets one waiter through per call; complete_all() lets everyone through."""

    def main():
        c = Completion("c")
        assert not c.try_wait_for_completion()
        c.complete()
        c.complete()
        assert c.try_wait_for_completion() and c.try_wait_for_completion()
        assert not c.completion_done()
        assert c.wait_for_completion_timeout(10) is False
        c.complete_all()
        tasks = [runtime.spawn(c.wait_for_completion, name=f"w{i}") for i in range(3)]
        for t in tasks:
            t.join()
        assert c.completion_done()
        c.reinit()
        assert not c.completion_done()

    for seed in range(10):
        Deterministic(seed).run(main)


# Free-running mode.


def test_free_running_real_threads_keep_mutual_exclusion():
    """FreeRunning runs tasks as real threads; a mutex-protected counter stays exact."""
    state = SimpleNamespace(count=0)
    lock = Mutex("counter")

    def worker():
        for _ in range(2000):
            with lock:
                v = state.count
                state.count = v + 1

    def main():
        assert isinstance(runtime.current_runtime(), FreeRunning)
        tasks = [runtime.spawn(worker, name=f"w{i}") for i in range(4)]
        for t in tasks:
            t.join()
        return state.count

    assert FreeRunning().run(main) == 8000


def test_free_running_completion_and_signal_cross_threads():
    """Completions and signals work between real threads."""
    out = {}

    def main():
        ready, never = Completion("ready"), Completion("never")

        def sleeper():
            ready.complete()
            try:
                never.wait_for_completion_interruptible()
            except Erestartsys:
                out["interrupted"] = True

        t = runtime.spawn(sleeper, name="sleeper")
        ready.wait_for_completion()
        t.send_signal()
        t.join()

    FreeRunning().run(main)
    assert out == {"interrupted": True}


def test_free_running_reraises_task_exception():
    """An exception in a free-running task is re-raised by run()."""

    def main():
        runtime.spawn(lambda: 1 / 0, name="bad")

    with pytest.raises(ZeroDivisionError):
        FreeRunning().run(main)


def test_unknown_threads_are_adopted_by_the_default_runtime():
    """A plain thread calling current() gets a task of the default free-running runtime."""
    seen = {}

    def body():
        task = runtime.current()
        seen["task"] = task
        seen["again"] = runtime.current()
        runtime.preempt("nothing happens")

    th = threading.Thread(target=body, name="plain-thread")
    th.start()
    th.join()
    task = seen["task"]
    assert task is seen["again"]
    assert task.name == "plain-thread"
    assert task.runtime is runtime.default_runtime()
    assert runtime.default_runtime().deterministic is False


def test_pin_tasks_runs_deterministic_task_threads_on_one_cpu():
    """With the thread backend, pin_tasks(cpu) moves the threads of deterministic tasks onto
    that CPU from their next
    task on (schedules are unchanged); pin_tasks(None) lets them run anywhere again; a CPU
    this process may not use is refused."""
    import os

    cpus = sorted(os.sched_getaffinity(0))
    assert runtime.current_cpu() in cpus

    def affinity_of_tasks(seed):
        seen = []

        def child():
            seen.append(frozenset(os.sched_getaffinity(0)))
            runtime.preempt("x")

        def main():
            for i in range(3):
                runtime.spawn(child, name=f"c{i}")
            seen.append(frozenset(os.sched_getaffinity(0)))

        rt = runtime.Deterministic(seed=seed, backend="threads")
        rt.run(main)
        return set(seen), list(rt.schedule)

    free, schedule = affinity_of_tasks(3)
    try:
        runtime.pin_tasks(cpus[-1])
        pinned, pinned_schedule = affinity_of_tasks(3)
        assert pinned == {frozenset({cpus[-1]})}
        assert pinned_schedule == schedule
    finally:
        runtime.pin_tasks(None)
    assert affinity_of_tasks(3)[0] == {frozenset(cpus)} == free
    with pytest.raises(ValueError, match="is not one this process may use"):
        runtime.pin_tasks(max(cpus) + 1000)
