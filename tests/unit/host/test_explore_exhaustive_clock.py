"""The exhaustive search and the virtual clock: reading the clock and moving it are dependent.

The deterministic runtime's clock does not move only when every task is blocked: the explore
bus's GPU task calls ``runtime.advance(step_ns)`` after every device step while the driver's
tasks can run (host/explore/bus.py), and drm_sched's timeout deadline, the time left of a
fence wait and every timed wait's deadline read it. A step that reads the clock and a step
that moves it do not commute, so their footprints must meet. A timestamp the model only
records (a fence's, a job's submit time) is read with ``runtime.timestamp_ns()``, which does
not count.
"""

from __future__ import annotations

from dataclasses import replace
from itertools import pairwise

from gemu.guest.kernel import runtime
from gemu.host.explore import exhaustive
from gemu.host.explore.scenario import run_schedule
from tests.support.programs import CFG, both


def _timestamp_program() -> tuple[int, ...]:
    """A device task lets a step of time pass (as the explore bus's GPU does after each
    step); another task keeps what it read (as drm_sched's timeout keeps its deadline)."""
    seen: list[int] = []

    def device() -> None:
        runtime.advance(1_000)

    def stamper() -> None:
        seen.append(runtime.now_ns())

    a = runtime.spawn(device, name="device")
    b = runtime.spawn(stamper, name="stamper")
    a.join()
    b.join()
    return tuple(seen)


def _sleep_program() -> tuple[int, ...]:
    """A task sleeps (a timed wait: drm_sched's job timeout, a fence wait with a timeout
    take their deadline the same way) while the device lets a step of time pass: the
    deadline is read from the clock when the wait begins, so where the device's step falls
    decides when the sleeper wakes."""
    woke: list[int] = []

    def device() -> None:
        runtime.advance(1_000)

    def sleeper() -> None:
        runtime.sleep_ns(500)
        woke.append(runtime.now_ns())

    a = runtime.spawn(device, name="device")
    b = runtime.spawn(sleeper, name="sleeper")
    a.join()
    b.join()
    return tuple(woke)


def test_a_clock_read_and_the_device_advancing_it_are_dependent():
    """The order of a clock read and a clock advance decides the value recorded: the naive
    enumeration reaches both, and so must the reduction (it took the two steps for
    independent and ran only one order)."""
    naive, reduced = both(_timestamp_program)
    assert naive.outcomes == {(0,), (1_000,)}
    assert reduced.outcomes == naive.outcomes


def test_a_timed_wait_and_the_device_advancing_the_clock_are_dependent():
    """A sleep that begins before the device's step ends when that step moves the clock past
    its deadline (1,000); one that begins after it ends at its own deadline (1,500): the
    reduction reaches both, as the naive enumeration does."""
    naive, reduced = both(_sleep_program)
    assert naive.outcomes == {(1_000,), (1_500,)}
    assert reduced.outcomes == naive.outcomes


def test_clock_reads_and_advances_share_the_clock_footprint():
    """The runtime marks the steps that read the clock (now_ns, a timed wait's deadline and
    its expiry) and the step that moves it (advance) with :data:`runtime.CLOCK`; a step that
    touches neither does not carry it."""
    rt = runtime.Deterministic(0)
    one = exhaustive._Run([])
    one.attach(rt)

    def reader() -> None:
        runtime.now_ns()
        runtime.preempt("lock quiet")
        runtime.preempt("lock quiet")

    def sleeper() -> None:
        runtime.sleep_ns(10)

    def main() -> None:
        tasks = [runtime.spawn(reader, name="reader"), runtime.spawn(sleeper, name="sleeper")]
        runtime.advance(5)
        for t in tasks:
            t.join()

    rt.run(main)
    by_tid = {t.name: t.tid for t in rt.tasks}
    reader_steps = [st for st in one.steps if st.tid == by_tid["reader"]]
    assert runtime.CLOCK in reader_steps[0].objs  # the read
    assert runtime.CLOCK not in reader_steps[1].objs  # between the two lock points
    sleeper_steps = [st for st in one.steps if st.tid == by_tid["sleeper"]]
    # the deadline taken when it slept, and the expiry checked when it woke
    assert runtime.CLOCK in sleeper_steps[0].objs and runtime.CLOCK in sleeper_steps[1].objs
    main_steps = [st for st in one.steps if st.tid == by_tid["main"]]
    assert any(
        runtime.CLOCK in st.objs and st.label.startswith("spawn") for st in main_steps
    )  # the step that ends at advance's point moved the clock


def test_a_recorded_timestamp_is_not_a_clock_read():
    """``timestamp_ns()`` (a fence's signal time, a job's submit time: values nothing
    compares) reads the same clock without the clock footprint, so the steps that signal
    fences stay independent of the GPU's time passing."""
    rt = runtime.Deterministic(0)
    one = exhaustive._Run([])
    one.attach(rt)
    got = []

    def stamper() -> None:
        got.append(runtime.timestamp_ns())
        runtime.preempt("lock quiet")

    def main() -> None:
        runtime.advance(7)
        runtime.spawn(stamper, name="stamper").join()

    rt.run(main)
    assert got == [7]
    tid = next(t.tid for t in rt.tasks if t.name == "stamper")
    assert all(runtime.CLOCK not in st.objs for st in one.steps if st.tid == tid)


def test_the_gpu_moves_the_clock_while_the_driver_reads_it():
    """In a scenario's run the premise holds: the GPU task's steps move the clock while other
    tasks can run (a decision has more than one runnable task after a GPU step), and the
    scheduler's steps that take the job timeout's deadline read it; both carry the clock
    footprint, so the search orders them."""
    one = exhaustive._Run([])
    run_schedule(replace(CFG, strategy="exhaustive", backend="greenlet"), 0, search=one)
    gpu = next(st.tid for st in one.steps if st.label.startswith("advance"))
    mine = [st for st in one.steps if st.tid == gpu]
    # a step ending at the point ``advance`` makes (the next one's label) moved the clock
    moved = [st for st, nxt in pairwise(mine) if nxt.label.startswith("advance")]
    assert moved and all(runtime.CLOCK in st.objs for st in moved)
    readers = {st.tid for st in one.steps if runtime.CLOCK in st.objs} - {gpu}
    assert readers  # the scheduler's worker, the submitters' fence waits
    after_gpu = [
        one.points[st.node]
        for prev, st in pairwise(one.steps)
        if prev.label.startswith("advance") and st.node is not None
    ]
    assert any(len(p.runnable) > 1 for p in after_gpu)
