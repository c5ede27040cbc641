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


def test_help_summaries_keep_parenthesised_sentences_whole():
    """`help` shows each command's first sentence; a period or colon inside parentheses
    (``(e.g. ...)``, ``(``nomap``: ...)``) does not cut the summary short."""
    from gemu.host.shell import _first_sentence

    assert _first_sentence("Store a value (e.g. release a job). More text.") == (
        "Store a value (e.g. release a job)"
    )
    assert _first_sentence("Create a BO (``nomap``: unbound). Then: more") == (
        "Create a BO (``nomap``: unbound)"
    )
    assert _first_sentence("Finish: wait for jobs") == "Finish"
    assert _first_sentence("No period at all.") == "No period at all"
