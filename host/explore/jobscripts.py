"""DOC: job scripts as ``gemu explore`` scenarios.

``gemu explore FILE.job`` parses the script (``gemu.host.jobscript``; a bad script is reported
with ``file:line``, exit status 2) and explores it: every schedule boots an explore machine
(:class:`~gemu.host.explore.scenario._Run`: deterministic runtime, page allocator with kswapd,
swap, GEM device with the shmem shrinker, the gemu driver on the in-process stepped GPU, the
watchdog and the mapped-free check) and runs the script's statements through
:class:`~gemu.host.shell.Shell` in the main task, while kswapd, the scheduler worker, the IRQ
task, the GPU-stepping task and the ``hog`` run concurrently. The hog takes frames and gives
them back, then reclaims directly, so the script's BOs are evicted, purged and swapped in
between (and during) its submits; the deterministic scheduler picks the interleaving.

The shell sees the explore run through :class:`ExploreMachine` (the part of
:class:`~gemu.host.machine.Machine` it uses). Its waits run on the runtime's virtual clock,
and what it prints goes to the event log as ``shell:`` lines.

Verdicts: a failed ``expect`` or any failing line (not followed by ``expect error``) is an
``expectation`` violation naming ``file:line``; a job that failed and that the script did not
examine is a ``gpu-fault``, data a ``verify`` found changed is ``content``; the shell's file is
closed at the end and the usual invariants (lockdep, warnings, leaks, deadlock) apply.

The scenario keeps the script's text (``Scenario.script_text``), so a reproduction replays the
script as it was explored; files it ``include``s are read when it runs. A script's ``task``
blocks run as tasks of the deterministic runtime (the shell spawns them), so the schedule
interleaves them with the main program, each other and the kernel's own tasks.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from gemu.guest.kernel import runtime
from gemu.host.explore.scenario import Scenario

SCRIPT_SCENARIO = Scenario(
    name="script", ram_pages=4096, free_frames=4096, swap_pages=4 * 4096, reclaims=40
)
"""Script defaults: ``gemu run``'s machine (16 MiB of guest RAM, no balloon, swap four times
the RAM) and 40 hog rounds."""


def scenario_for_script(path: Path) -> Scenario:
    """The scenario that explores the job script at ``path`` (ValueError naming file:line
    if it does not parse)."""
    from dataclasses import replace

    from gemu.host import jobscript
    from gemu.host.shell import Shell

    try:
        statements = jobscript.parse_file(path, commands=Shell.COMMANDS)
    except jobscript.ScriptError as exc:
        raise ValueError(str(exc)) from None
    for st in statements:
        if st.command == "driver-mode" and tuple(st.argv[1:2]) != ("per-bo",):
            # the explore machine is the per-bo driver; a script of another mode would only
            # fail at its first command of that mode, reported as a violation
            raise ValueError(
                f"{st.where}: driver-mode {' '.join(st.argv[1:])}: gemu explore runs job "
                "scripts on the per-bo driver; explore the VM_BIND flavour with "
                "its own scenarios: gemu explore gpuvm (or gpuvm-small)"
            )
    text = Path(path).read_text(encoding="utf-8")
    return replace(SCRIPT_SCENARIO, script=str(path), script_text=text)


class ExploreMachine:
    """What :class:`~gemu.host.shell.Shell` uses of a machine, over an explore run."""

    def __init__(self, run) -> None:
        self.run = run
        self.driver = run.drv
        self.dev = run.dev
        self.allocator = run.allocator
        self.swap = run.swap

    def open(self):
        return self.driver.open()

    def reclaim(self, nr_pages: int) -> int:
        return self.allocator.direct_reclaim(nr_pages)

    def end_holds(self) -> None:
        """Power-off's release of GPU holds: an explore machine's GPU is the in-process model
        stepped by the schedule, which no debugger or QMP stop can hold, so none is held."""

    def device_lost(self) -> str | None:
        return None  # the device is in this process: it cannot go away

    def statistics(self) -> dict:
        from gemu.host.machine import Machine

        return Machine.statistics(self)  # the same counters, from the same attributes


def run_script(run) -> None:
    """Run ``run``'s script in the current task and turn what went wrong into violations."""
    from gemu.host import jobscript
    from gemu.host.shell import PowerOff, Shell

    sc = run.sc
    try:
        statements = jobscript.parse(
            sc.script_text, sc.script, commands=Shell.COMMANDS, base=Path(sc.script).parent
        )
    except jobscript.ScriptError as exc:
        run.violate("expectation", str(exc))
        return

    def out(line: str) -> None:
        runtime.log(f"shell: {line}")

    failures: list[str] = []

    def report(text: str) -> None:
        failures.append(text)
        out(text)

    shell = Shell(ExploreMachine(run), write=out)
    shell.report = report
    with contextlib.suppress(PowerOff):  # the script said poweroff
        shell.run_statements(statements)
    summary = shell.poweroff()
    for text in failures:
        run.violate("expectation", text)
    for fault in summary.unexpected_faults:
        run.violate("gpu-fault", f"{sc.script}: job {fault}")
    for lost in summary.lost_data:
        run.violate("content", f"{sc.script}: {lost}")
    for leak in summary.leaks:
        run.violate("leak", f"{sc.script}: {leak}")
    run.fences.extend((f"{sc.script}: {fv.name}", fv.fence) for fv in shell.fences.values())
