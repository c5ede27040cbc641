"""The job-script/console command for external fences (`fence attach|signal|busy|wait`):
BOs made busy without the GPU, as IGT does with vgem's fence ioctls."""

from __future__ import annotations

from pathlib import Path

import pytest

from gemu.host.explore.jobscripts import scenario_for_script
from gemu.host.explore.scenario import ExploreConfig, run_schedule
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
        m.check_clean()


def test_busy_bo_is_not_evicted_until_its_external_fence_signals(shell):
    """A pending external write fence makes the BO busy ('fence busy', 'fence wait' with
    EBUSY/ETIMEDOUT) and keeps reclaim from evicting it; after 'fence signal' it is idle,
    evictable, and its data survives the round trip through swap."""
    assert shell.run_text(
        "a = bo 16K\nfill a 7\n"
        "x = fence attach a write\n"
        "fence busy a\n"
        "fence wait a timeout 0\nexpect error EBUSY\n"
        "fence wait a timeout 0.02\nexpect error ETIMEDOUT\n"
        "expect fence x pending\n"
        "drop-caches\nexpect state a resident\n"
        "fence signal x\nexpect fence x signaled\n"
        "fence busy a\nfence wait a\n"
        "drop-caches\nexpect state a evicted\n"
        "verify\n"
        "fence signal x\nexpect error ENOENT\n",
        "busy.job",
    ), shell.lines
    out = "\n".join(shell.lines)
    assert "x: external write fence 1 on a (expires in 10 s)" in out
    assert "a: busy" in out and "a: idle" in out and "x: signaled" in out
    s = shell.poweroff()
    assert s.ok, s.problems()


def test_jobs_wait_for_external_fences(shell):
    """A job writing a BO with a pending external reader or writer waits for it (implicit
    dependency); 'submit ... after X' waits for an external fence explicitly."""
    assert shell.run_text(
        "a = bo 4K\nb = bo 4K\n"
        "r = fence attach a\n"
        "f = submit fill a 5\n"
        "g = submit nop after r\n"
        "fence wait a timeout 0.05\nexpect error ETIMEDOUT\n"
        "expect fence f pending\nexpect fence g pending\n"
        "fence signal r\n"
        "wait f g\nexpect value a == 5\n"
        "w = fence attach b write\n"
        "x = fence attach b\nexpect error EBUSY\n"
        "fence signal w\n",
        "jobs.job",
    ), shell.lines
    assert shell.poweroff().ok


def test_usage_errors_name_what_is_wrong(shell):
    """Wrong forms are errors that say what is wrong, with file:line."""
    cases = {
        "fence attach a sideways": "'sideways' is not read or write",
        "fence attach nosuch": "no BO named 'nosuch'",
        "fence frob a": "'frob' is not attach, signal, busy or wait",
        "fence wait a timeout soon": "fence wait: SECONDS 'soon' is not a number",
        "fence busy a b": "usage:",
        "fence signal f": "f is a job's fence, not an external one",
    }
    assert shell.run_text("a = bo 4K\nf = submit nop\nwait f\n")
    for line, msg in cases.items():
        assert not shell.run_text(line + "\n", "bad.job")
        assert any(msg in out and out.startswith("bad.job:1:") for out in shell.lines), (
            line,
            shell.lines[-3:],
        )


def test_unsignalled_fence_expires_after_10s_of_guest_time(tmp_path: Path):
    """On the explore machine (deterministic runtime, virtual clock) an external fence
    nobody signals expires after 10 s of guest time: 'wait X' returns then, the BO is idle,
    and a late 'fence signal' is ETIMEDOUT."""
    script = tmp_path / "expire.job"
    script.write_text(
        "a = bo 4K\n"
        "x = fence attach a write\n"
        "wait x timeout 12\n"
        "fence busy a\n"
        "fence signal x\nexpect error ETIMEDOUT\n"
    )
    result = run_schedule(ExploreConfig(scenario=scenario_for_script(script)), 1, keep_log=True)
    assert result.ok, result.violations
    log = "\n".join(result.event_log)
    assert "shell: x: signaled (10000.0 ms)" in log
    assert "shell: a: idle" in log
