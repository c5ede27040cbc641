"""The guest shell as a library: scripts against an in-process machine, and the accounting
that decides a run's exit status."""

from __future__ import annotations

import pytest

from gemu.host.machine import Machine
from gemu.host.shell import Shell


@pytest.fixture
def shell():
    with Machine(ram_size=8 << 20, swap_size=16 << 20, device="inproc") as m:
        lines: list[str] = []
        sh = Shell(m, lines.append)
        sh.lines = lines
        yield sh
        sh.poweroff()
        m.check_clean()  # the shell gives back every BO, frame and swap slot


def test_copy_and_checks_pass(shell):
    """A copy job's result checks out by GPU CRC, by value and by verify; the run is ok."""
    assert shell.run_text(
        "a = bo 8K\nb = bo 8K\nfill a 0x01020304\nf = submit copy a b\nwait f\n"
        "expect crc b == a\nexpect value b+4 == 0x01020304\nverify\n"
    )
    s = shell.poweroff()
    assert s.ok and s.checks_passed == 3 and s.checks_failed == 0


def test_an_expected_error_is_not_a_failure_but_an_unexpected_one_stops(shell):
    """`expect error ERRNO` right after a failing line accepts it; without it the script
    stops at that line with file:line."""
    assert shell.run_text("x = bo 1G\nexpect error ENOMEM\n", "a.job")
    assert not shell.run_text("x = bo 1G\necho after\n", "b.job")
    assert any(line.startswith("b.job:1: bo: -ENOMEM") for line in shell.lines)
    assert "after" not in shell.lines


def test_unexamined_fault_and_lost_data_fail_the_summary(shell):
    """A faulting job nobody checked, and a BO whose contents changed behind the shell's
    back, both make the summary not ok and say why."""
    shell.run_text("f = submit fault\na = bo 4K\nfill a 5\n")
    bo = shell.bos["a"]
    shell.file.write(bo.handle, 0, b"\xff" * 4)  # corrupt behind the shell's back
    assert not shell.run_text("verify\n")
    s = shell.poweroff()
    assert not s.ok
    problems = " ".join(s.problems())
    assert "unexpected GPU fault: f (fill at unmapped GPU VA" in problems
    assert "lost data: a: contents changed" in problems


def test_hang_and_waitmem_jobs_and_fence_chains(shell):
    """A hang is reset after the job timeout (ETIMEDOUT); a waitmem job runs once poked; a
    job submitted `after` another waits for it."""
    assert shell.run_text(
        "job-timeout 200\nh = submit hang\nwait h\nexpect error ETIMEDOUT\n"
        "s = bo 4K\nw = submit waitmem s 7\nd = bo 4K\nf = submit fill d 9 after w\n"
        "expect fence f pending\npoke s 7\nwait f\nexpect value d == 9\n"
        "expect stat gpu.resets == 1\n"
    )
    assert shell.poweroff().ok


def test_expect_stat_state_and_fence_forms(shell):
    """stat paths, BO states and fence states are checkable; wrong ones fail with the value."""
    assert shell.run_text(
        "a = bo 64K\nfill a random 3\ndrop-caches\nexpect state a evicted\n"
        "expect stat shrinker.evicted >= 1\nf = submit fault\nexpect fence f failed EFAULT\n"
    )
    assert not shell.run_text("expect stat gpu.resets == 5\n", "c.job")
    assert "c.job:1: expect stat gpu.resets: got 0, expected == 5" in shell.lines


def test_task_blocks_run_concurrently_share_names_and_are_joined(shell):
    """Two task blocks share the script's BOs and bind fences the main program then waits
    on; their lines are prefixed with the task's name; join waits for them; the summary
    counts every command of every task."""
    assert shell.run_text(
        "src = bo 64K\nfill src random 9\na = bo 64K\nb = bo 64K\n"
        "task left\n  fa = submit copy src a\n  wait fa\n  expect crc a == src\nend\n"
        "task right\n  fb = submit copy src b\n  expect fence fb signaled\nend\n"
        "join\nexpect crc b == a\nverify\n",
        "t.job",
    )
    assert shell.tasks["left"].ok and shell.tasks["right"].ok
    assert shell.tasks["left"].joined and shell.tasks["right"].joined
    assert any(line.startswith("[left] fa: job") for line in shell.lines)
    assert any(line.startswith("[right] fb: job") for line in shell.lines)
    assert "task left: started (3 lines)" in shell.lines
    s = shell.poweroff()
    assert s.ok and s.commands == 4 + 2 + 3 + 2 + 3 and s.checks_passed == 4


def test_a_failing_task_stops_alone_and_join_reports_it(shell):
    """A failure in a block names file:line and the task, ends that block only, and makes
    `join` fail naming where; `expect error` in a block checks the block's own last line."""
    ok = shell.run_text(
        "a = bo 4K\n"
        "task bad\n  x = bo 1G\n  expect error ENOMEM\n  expect value a == 7\n  echo unreached\nend\n"
        "echo main goes on\njoin bad\n",
        "t.job",
    )
    assert not ok
    assert "t.job:5: task bad: expect value a: got 0, expected == 7" in shell.lines
    assert "main goes on" in shell.lines
    assert "[bad] unreached" not in shell.lines
    assert "t.job:9: join: task bad failed at t.job:5" in shell.lines
    s = shell.poweroff()
    assert s.checks_failed == 2 and s.errors == 1 and not s.ok  # both failed lines


def test_task_command_errors(shell):
    """A running task's name cannot be reused; join names unknown tasks; `end` alone fails;
    poweroff joins what still runs."""
    assert not shell.run_text(
        "w = bo 4K\nh = submit waitmem w 1\ntask t\n  wait h\nend\ntask t\n  echo again\nend\n",
        "t.job",
    )
    assert any(
        "t.job:6: task t: still running (started at t.job:3; join it)" in x for x in shell.lines
    )
    assert not shell.run_text("join nope\n", "u.job")
    assert "u.job:1: join: no task 'nope' (known: t)" in shell.lines
    assert not shell.run_line("end")
    assert "<console>:1: end without a task" in shell.lines
    assert shell.run_text("info tasks\n")
    assert "t            started at t.job:3: running" in shell.lines
    assert shell.run_text("poke w 1\n")
    shell.poweroff()
    assert shell.tasks["t"].ok and shell.tasks["t"].joined


def test_console_collects_a_task_block_until_end(shell):
    """At the console, `task NAME` switches the prompt to the block prompt and keeps lines
    until `end`, which starts the task; a nested `task` is refused and the block stays open."""
    from gemu.host.shell import BLOCK_PROMPT, PROMPT

    assert shell.prompt == PROMPT
    assert shell.run_line("a = bo 4K", "<console>", 1)
    assert shell.run_line("task bg", "<console>", 2)
    assert shell.prompt == BLOCK_PROMPT
    assert shell.run_line("fill a 5", "<console>", 3)
    assert not shell.run_line("task inner", "<console>", 4)
    assert "<console>:4: task inner: inside task bg (line 2); tasks do not nest" in shell.lines
    assert "bg" not in shell.tasks  # nothing runs before `end`
    assert shell.run_line("end", "<console>", 5)
    assert shell.prompt == PROMPT
    assert shell.run_line("join bg", "<console>", 6)
    assert shell.run_line("expect value a == 5", "<console>", 7)


def test_a_task_joins_only_tasks_started_before_it(shell):
    """Joins inside task blocks go to earlier tasks only, so two tasks never wait for each
    other: naming a later one fails, located, and the main program's join reports it."""
    ok = shell.run_text(
        "w = bo 4K\nh = submit waitmem w 1\n"
        "task first\n  echo one\nend\n"
        "task a\n  wait h\n  join first\n  join b\nend\n"
        "task b\n  join first\n  echo two\nend\n"
        "poke w 1\njoin\n",
        "t.job",
    )
    assert not ok
    assert "t.job:9: task a: join: task a can only join tasks started before it (not b)" in (
        shell.lines
    )
    assert "t.job:16: join: task a failed at t.job:9" in shell.lines
    assert shell.tasks["first"].ok and shell.tasks["b"].ok
    assert "[b] two" in shell.lines
