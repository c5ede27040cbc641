"""An exception that escapes the greenlet runtime's own bookkeeping (a Ctrl-C landing while a
task is being finished) ends that task's greenlet without marking the task done. The hub
must then count the task as gone and unwind the others, and the run must end with that
exception. Before, the hub kept switching to the dead greenlet, which returns at once:
the run spun forever."""

from __future__ import annotations

import pytest

from gemu.guest.kernel import runtime


@pytest.mark.timeout(60)
def test_interrupt_while_a_task_is_finished_ends_the_run():
    rt = runtime.Deterministic(seed=1, backend="greenlet")
    real_exit = rt._exit
    hit = {"n": 0}

    def exit_interrupted(task):
        if task.name == "child" and not hit["n"]:
            hit["n"] += 1
            raise KeyboardInterrupt  # as SIGINT would, inside the runtime's bookkeeping
        return real_exit(task)

    rt._exit = exit_interrupted

    def main():
        wq = runtime.WaitQueue("w")
        child = runtime.spawn(lambda: runtime.preempt("child step"), name="child")
        other = runtime.spawn(lambda: wq.wait_event(lambda: False, timeout_ns=10**6), name="other")
        child.join()
        other.join()

    with pytest.raises(KeyboardInterrupt):
        rt.run(main)
    assert hit["n"] == 1
    assert all(t.done for t in rt.tasks)
