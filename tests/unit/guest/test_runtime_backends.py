"""The deterministic runtime's two backends (greenlets in one thread, pooled threads with a
baton) make the same decisions: for every seed the same event log, schedule, clock, results
and failures. The thread backend is the reference the greenlet one replaced."""

from __future__ import annotations

import random

import pytest

from gemu.guest.kernel import runtime
from gemu.guest.locking.mutex import Mutex


def _program(shape: int):
    """A seeded random guest program: tasks that lock, sleep, wait with timeouts, spawn
    children, join, signal each other and sometimes fail; ``shape`` seeds its structure (the
    runtime's seed only picks the interleaving)."""
    rnd = random.Random(shape)
    nr_tasks = rnd.randint(2, 5)
    nr_locks = rnd.randint(1, 3)
    plans = [[rnd.choice("lwpsx") for _ in range(rnd.randint(3, 12))] for _ in range(nr_tasks)]
    fail_at = rnd.choice([None, None, None, (rnd.randrange(nr_tasks), rnd.randrange(3))])

    def main():
        locks = [Mutex(f"m{i}") for i in range(nr_locks)]
        wq = runtime.WaitQueue("flag")
        flag = {"n": 0}
        out = []

        def worker(i, plan):
            for j, op in enumerate(plan):
                if fail_at == (i, j):
                    raise ValueError(f"task {i} fails at op {j}")
                if op == "l":
                    m = locks[(i + j) % nr_locks]
                    m.lock()
                    runtime.preempt(f"t{i} holds {m.name}")
                    m.unlock()
                elif op == "w":
                    got = wq.wait_event(lambda j=j: flag["n"] > j, timeout_ns=1000 * (j + 1))
                    out.append((i, j, got, runtime.now_ns()))
                elif op == "p":
                    with wq.lock:
                        flag["n"] += 1
                    wq.wake_up_all()
                elif op == "s":
                    runtime.sleep_ns(500 * (i + 1))
                else:
                    child = runtime.spawn(runtime.preempt, f"child of t{i}", name=f"c{i}.{j}")
                    child.join()
            return i

        tasks = [runtime.spawn(worker, i, p, name=f"t{i}") for i, p in enumerate(plans)]
        for t in tasks:
            t.join()
        return [t.result for t in tasks], out

    return main


def _run(backend: str, shape: int, seed: int, strategy: str):
    rt = runtime.Deterministic(seed, strategy=strategy, backend=backend, max_steps=20_000)
    try:
        result = ("ok", rt.run(_program(shape)))
    except (ValueError, runtime.DeadlockError, runtime.LivelockError) as exc:
        result = (type(exc).__name__, str(exc).splitlines()[0])
    return result, rt.event_log, rt.schedule, rt.now_ns(), rt.steps


@pytest.mark.parametrize("strategy", ["random", "pct"])
def test_backends_make_identical_runs(strategy):
    """Over 150 random programs and seeds, both backends give the identical event log,
    schedule, clock, step count and outcome (results, a task's exception, a deadlock)."""
    outcomes = set()
    for case in range(150):
        threads = _run("threads", case, case * 7 + 1, strategy)
        glets = _run("greenlet", case, case * 7 + 1, strategy)
        assert glets == threads, f"case {case}: backends diverge"
        outcomes.add(threads[0][0])
    # the programs exercise success and failure both
    assert "ok" in outcomes and "ValueError" in outcomes


def test_greenlet_runs_leave_the_calling_thread_as_it_was():
    """A run inside a plain thread restores that thread's own task afterwards, also when the
    run fails."""
    before = runtime.current()
    rt = runtime.Deterministic(1)
    assert rt.run(lambda: runtime.current().name) == "main"
    assert runtime.current() is before

    def boom():
        runtime.spawn(runtime.preempt, "x", name="child")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        runtime.Deterministic(2).run(boom)
    assert runtime.current() is before


def test_a_diverging_replay_unwinds_every_task():
    """A replay naming a task that cannot run fails the run with ReplayDivergence, and a task
    suspended in the middle of its work is unwound (none is left suspended)."""
    seen = []

    def main():
        def child():
            try:
                for _ in range(3):
                    runtime.preempt("child step")
            finally:
                seen.append("child unwound")

        runtime.spawn(child, name="child")
        for _ in range(3):
            runtime.preempt("main step")

    # child runs first, then main, then the replay names a task that does not exist
    rt = runtime.Deterministic(0, replay=[2, 1, 99])
    with pytest.raises(runtime.ReplayDivergence):
        rt.run(main)
    assert seen == ["child unwound"]
    assert all(t.done for t in rt.tasks)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend 'fibers'"):
        runtime.Deterministic(0, backend="fibers")


@pytest.mark.parametrize("backend", ["greenlet", "threads"])
def test_a_chooser_abandoning_the_run_while_a_task_blocks_unwinds_it(backend):
    """A chooser that gives up the run at the decision a blocking task asks for: the task,
    already off the run queue, does not go on with its own code (its cleanup reaches a
    preemption point, which would otherwise hand the CPU away and strand it); every task is
    unwound and run() raises RunAbandoned."""
    after_block = []

    def main():
        wq = runtime.WaitQueue("never")

        def sleeper():
            try:
                wq.wait_event(lambda: False)
            finally:
                runtime.preempt("cleanup")  # would switch away under a live run
                after_block.append("cleanup went on")

        def steps(what):
            for _ in range(5):
                runtime.preempt(what)

        runtime.spawn(steps, "other step", name="other")
        runtime.spawn(sleeper, name="sleeper")
        steps("main step")

    calls = []

    def chooser(rt, runnable):
        calls.append(runtime.current().name)
        cur = runtime.current()
        if cur.name == "sleeper" and cur not in runnable and "abandoned" not in calls:
            calls.append("abandoned")
            raise runtime.RunAbandoned("explored")
        sleeper = [t for t in runnable if t.name == "sleeper"]
        return sleeper[0] if sleeper else runtime.round_robin(runtime.current(), runnable)

    rt = runtime.Deterministic(0, backend=backend)
    rt.chooser = chooser
    with pytest.raises(runtime.RunAbandoned):
        rt.run(main)
    assert "abandoned" in calls
    assert after_block == []
    assert all(t.done for t in rt.tasks)
