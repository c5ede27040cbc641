"""lockdep's reports name where things happened, file and line, although the stacks behind
them are captured cheaply: the start of a signalling section keeps only the frame that began
it (its callers are read when a report is formatted), and the acquisitions of an order are
walked once and turned into lines only for a report."""

from __future__ import annotations

import sys
import traceback

from gemu.guest.kernel import runtime
from gemu.guest.locking import lockdep
from gemu.guest.mm.gfp import GFP_KERNEL

HERE = __file__


def _here() -> int:
    """The line of the caller's current statement."""
    return sys._getframe(1).f_lineno


def _eager(skip: int = 1) -> str:
    """The stack at the caller, extracted at once as a traceback would print it."""
    frames = [
        (f, lineno)
        for f, lineno in traceback.walk_stack(sys._getframe(skip))
        if f.f_code.co_filename not in lockdep._PLUMBING
    ]
    summary = traceback.StackSummary.extract(iter(frames[:16]), lookup_lines=False)
    summary.reverse()
    return "".join(summary.format()).rstrip()


def _run(main):
    return runtime.Deterministic(seed=0, strict=False).run(main)


def _section_stack(rep: lockdep.LockdepReport) -> str:
    (stack,) = [s for s in rep.stacks if s.startswith("signalling section began at:\n")]
    return stack.removeprefix("signalling section began at:\n")


def _allocate_deeper(depth: int) -> None:
    if depth:
        _allocate_deeper(depth - 1)
        return
    lockdep.might_alloc(GFP_KERNEL)


def _wait_deeper(depth: int) -> None:
    if depth:
        _wait_deeper(depth - 1)
        return
    lockdep.dma_fence_might_wait()


def _section_then(violation) -> tuple[str, int]:
    cookie, began = lockdep.dma_fence_begin_signalling(), _eager()
    try:
        _ = [n for n in range(3)]  # the frame moves on to other lines before the violation
        violation(2)
    finally:
        lockdep.dma_fence_end_signalling(cookie)
    return began, _here()


def test_section_report_shows_the_stack_where_the_section_began():
    """A reclaimable allocation three calls deep inside a section: the report's "signalling
    section began at" stack is the stack at the begin call, line for line (that frame and
    every caller of it), not where the frame was when the allocation came."""

    def main():
        began, _ = _section_then(_allocate_deeper)
        return began, lockdep.reports()

    began, reps = _run(main)
    (rep,) = reps
    assert rep.kind == "signalling"
    shown = _section_stack(rep)
    assert shown == began
    line = began.splitlines()[-2]
    assert line.startswith(f'  File "{HERE}", line ') and line.endswith(", in _section_then")
    assert "cookie, began = lockdep.dma_fence_begin_signalling(), _eager()" in shown
    assert "returned" not in shown
    new = rep.stacks[-1]
    assert "_allocate_deeper" in new and "lockdep.might_alloc(GFP_KERNEL)" in new


def test_fence_wait_report_shows_the_stack_where_the_section_began():
    """The same for a fence wait inside the section (dma_fence_might_wait's report)."""

    def main():
        began, _ = _section_then(_wait_deeper)
        return began, lockdep.reports()

    began, reps = _run(main)
    (rep,) = reps
    assert "fence wait inside a dma_fence signalling critical section" in rep.message
    assert _section_stack(rep) == began
    assert "lockdep.dma_fence_might_wait()" in rep.stacks[-1]


def test_section_left_open_by_a_returned_function_says_so():
    """A function that begins a section and returns without ending it (a driver bug of its
    own): the report still names the begin line of that function, and says that its callers'
    lines are read as they are now."""

    def leave_open() -> int:
        lockdep.dma_fence_begin_signalling()
        return _here() - 1

    def main():
        begin_line = leave_open()
        lockdep.might_alloc(GFP_KERNEL)
        lockdep.dma_fence_end_signalling(False)
        return begin_line, lockdep.reports()

    begin_line, reps = _run(main)
    (rep,) = reps
    shown = _section_stack(rep)
    assert f'File "{HERE}", line {begin_line}, in leave_open' in shown
    assert "has returned" in shown


def test_the_section_drops_its_frame_when_it_ends():
    """The started section keeps the caller's frame only while it lasts."""

    def main():
        task = runtime.current()
        cookie = lockdep.dma_fence_begin_signalling()
        inside = task.signalling_stack
        lockdep.dma_fence_end_signalling(cookie)
        return inside, task.signalling_stack

    inside, after = _run(main)
    assert inside is not None and after is None


def test_inversion_report_names_both_acquisition_sites_by_file_and_line():
    """An ABBA inversion: the report shows the file and line of each acquisition, the
    recorded order's (A then B) and the new one's (B then A)."""
    a, b = lockdep.LockClass("sites_a"), lockdep.LockClass("sites_b")

    class L:
        def __init__(self, name):
            self.name = name

    la, lb = L("la"), L("lb")

    def a_then_b() -> int:
        lockdep.acquire(la, a)
        _, line = lockdep.acquire(lb, b), _here()
        lockdep.release(lb)
        lockdep.release(la)
        return line

    def b_then_a() -> int:
        lockdep.acquire(lb, b)
        _, line = lockdep.acquire(la, a), _here()
        lockdep.release(la)
        lockdep.release(lb)
        return line

    def main():
        first = a_then_b()
        second = b_then_a()
        return first, second, lockdep.reports()

    first, second, reps = _run(main)
    (rep,) = reps
    assert rep.kind == "inversion"
    existing, new = rep.stacks
    assert existing.startswith("existing order sites_a -> sites_b")
    assert f'File "{HERE}", line {first}, in a_then_b' in existing
    assert new.startswith("new order sites_b -> sites_a")
    assert f'File "{HERE}", line {second}, in b_then_a' in new
