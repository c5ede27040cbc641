"""lockdep keeps the stacks it captures as (file, line, function) tuples and formats them only
for a report; the report reads exactly as an eagerly extracted traceback would."""

from __future__ import annotations

import sys
import traceback

from gemu.guest.kernel import runtime
from gemu.guest.locking import lockdep


def _eager(skip: int = 1) -> str:
    """What lockdep printed when it extracted a StackSummary at every capture."""
    frames = [
        (f, lineno)
        for f, lineno in traceback.walk_stack(sys._getframe(skip))
        if f.f_code.co_filename not in lockdep._PLUMBING
    ]
    summary = traceback.StackSummary.extract(iter(frames[:16]), lookup_lines=False)
    summary.reverse()
    return "".join(summary.format()).rstrip()


def _nested(depth: int) -> tuple[str, str]:
    if depth:
        return _nested(depth - 1)
    lazy, eager = lockdep._capture(1), _eager()  # one line: the same line number for both
    return lockdep._fmt(lazy), eager


def test_lazy_stack_formats_as_the_eager_one():
    lazy, eager = _nested(3)
    assert lazy == eager
    assert "_nested" in lazy and "test_lazy_stack_formats_as_the_eager_one" in lazy
    assert lazy.count("\n") > 4  # source lines are looked up when formatting


def test_lazy_stack_keeps_sixteen_frames():
    lazy, eager = _nested(30)
    assert lazy == eager
    assert len(lockdep._capture(1).frames) == 16


def test_report_stacks_name_the_functions_of_both_orders():
    a, b = lockdep.LockClass("lazy_a"), lockdep.LockClass("lazy_b")

    class L:
        def __init__(self, name):
            self.name = name

    la, lb = L("la"), L("lb")

    def a_then_b():
        lockdep.acquire(la, a)
        lockdep.acquire(lb, b)
        lockdep.release(lb)
        lockdep.release(la)

    def b_then_a():
        lockdep.acquire(lb, b)
        lockdep.acquire(la, a)
        lockdep.release(la)
        lockdep.release(lb)

    def main():
        a_then_b()
        b_then_a()
        return lockdep.reports()

    reps = runtime.Deterministic(seed=0, strict=False).run(main)
    (rep,) = reps
    existing, new = rep.stacks
    assert "in a_then_b" in existing and "lockdep.acquire(lb, b)" in existing
    assert "in b_then_a" in new and "lockdep.acquire(la, a)" in new
