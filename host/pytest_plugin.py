"""DOC: a pytest plugin: gemu machines as fixtures, job scripts as test items.

Registered through the ``pytest11`` entry point, so installing gemu makes it available::

    import pytest

    @pytest.mark.gemu(ram="16M", swap="64M", mutant="none")
    def test_fill(gemu_console):
        assert gemu_console.run("a = bo 8K\\nfill a 5\\nexpect value a == 5\\n")

    @pytest.mark.gemu(driver_mode="vm-bind")
    def test_bind(gemu_console):
        assert gemu_console.run("v = vm create\\na = bo 8K\\nb = bind v 0x100000 a\\nwait b\\n")

``gemu_machine`` is a booted :class:`~gemu.host.machine.Machine` (device in-process);
``gemu_console`` a console session on it whose power-off summary must be clean (an
unexamined GPU fault, a lockdep report, lost data or a leak fails the test); ``gemu_boot``
the real ``gemu boot`` process at its prompt, driven with pexpect, that must power off with
exit status 0::

    def test_ci(gemu_boot):
        assert "4 KiB" in gemu_boot.run("a = bo 4K")
        gemu_boot.run("fill a 7")
        assert gemu_boot.run("expect value a == 7") == "" With
``--gemu-jobs`` (or ``gemu_jobs = true`` in the ini file) every ``*.job`` file collected is
a test item run on its own machine (in the driver mode its ``driver-mode`` line names),
failing with the script's ``file:line: message``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

DEFAULT_RAM = 16 << 20
DEFAULT_SWAP = 64 << 20


def pytest_addoption(parser) -> None:
    parser.addoption("--gemu-jobs", action="store_true", help="collect *.job files as tests")
    parser.addini("gemu_jobs", "collect *.job files as tests", type="bool", default=False)


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers",
        "gemu(ram=SIZE, swap=SIZE, mutant=NAME, driver_mode=per-bo|vm-bind): the machine of "
        "gemu_machine",
    )


def _size(value, default: int) -> int:
    from gemu.host.machine import parse_size

    if value is None:
        return default
    return value if isinstance(value, int) else parse_size(str(value))


class _Booted:
    def __init__(self, ram: int, swap: int, mutant: str, driver_mode: str | None = None) -> None:
        from gemu.guest.gemu_drv.job import Mutant
        from gemu.host.machine import DEFAULT_DRIVER_MODE, Machine

        self.machine = Machine(
            ram_size=ram,
            swap_size=swap,
            device="inproc",
            driver_mode=driver_mode or DEFAULT_DRIVER_MODE,
        )
        if mutant != "none":
            self.machine.driver.set_mutant(Mutant(mutant))
            vm_bind = self.machine.vm_bind
            if vm_bind is not None:  # the flavour's own mutants live in its driver
                vm_bind.mutant = vm_bind.reclaim.mutant = Mutant(mutant)


@pytest.fixture
def gemu_machine(request):
    """A booted machine configured by the test's ``gemu`` marker; shut down afterwards."""
    marker = request.node.get_closest_marker("gemu")
    kw = dict(marker.kwargs) if marker else {}
    unknown = set(kw) - {"ram", "swap", "mutant", "driver_mode"}
    if unknown:
        pytest.fail(f"@pytest.mark.gemu: unknown argument(s) {sorted(unknown)}", pytrace=False)
    from gemu.host.machine import check_driver_mode

    mode = kw.get("driver_mode")
    if mode is not None:
        try:
            check_driver_mode(str(mode))
        except ValueError as exc:
            pytest.fail(f"@pytest.mark.gemu: {exc}", pytrace=False)
    booted = _Booted(
        _size(kw.get("ram"), DEFAULT_RAM),
        _size(kw.get("swap"), DEFAULT_SWAP),
        str(kw.get("mutant", "none")),
        mode,
    )
    with booted.machine as m:
        yield m


class Console:
    """A console session: ``run(text)`` runs lines as a script; ``lines`` what it printed."""

    def __init__(self, machine) -> None:
        from gemu.host.shell import Shell

        self.lines: list[str] = []
        self.shell = Shell(machine, self.lines.append)

    def run(self, text: str, file: str = "<test>") -> bool:
        return self.shell.run_text(text, file)

    def query(self, view: str):
        return self.shell.m.query(view, self.shell)


@pytest.fixture
def gemu_console(gemu_machine):
    """A console session on ``gemu_machine``; its power-off summary must be clean."""
    con = Console(gemu_machine)
    yield con
    summary = con.shell.poweroff()
    if not summary.ok:
        pytest.fail("gemu: " + "; ".join(summary.problems()), pytrace=False)


class BootedConsole:
    """A real ``gemu boot`` process at its ``gemu# `` prompt, driven with pexpect as CI
    (labgrid, LAVA) drives QEMU's console. ``run(line)`` sends one console line and returns
    what it printed; ``child`` is the pexpect child for anything else."""

    PROMPT = "gemu# "

    def __init__(self, argv: list[str], timeout: float) -> None:
        import pexpect

        self.timeout = timeout
        self.child = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", timeout=timeout)
        self.child.expect_exact(self.PROMPT)
        self.boot_log = self.child.before

    def run(self, text: str) -> str:
        """Send each line of ``text``, waiting for the prompt after each; what they printed
        (the echoed lines left out)."""
        out = []
        for line in text.splitlines() or [""]:
            self.child.sendline(line)
            self.child.expect_exact(self.PROMPT)
            got = self.child.before.replace("\r\n", "\n")
            out.append(got.split("\n", 1)[1] if "\n" in got else "")
        return "".join(out)

    def poweroff(self) -> tuple[int, str]:
        """Power off; (exit status, the summary and everything after it)."""
        import pexpect

        self.child.sendline("poweroff")
        self.child.expect(pexpect.EOF)
        tail = self.child.before
        self.child.close()
        return self.child.exitstatus, tail


@pytest.fixture
def gemu_boot(request):
    """``gemu boot`` in its own process (the device in another, as users run it), at its
    prompt; configured by the ``gemu`` marker's ram, swap and driver_mode. At teardown it
    powers off and the exit status must be 0: a failed expectation, an unexamined GPU fault,
    a lockdep report, lost data or a leak fails the test with the power-off summary."""
    import shutil
    import sys

    marker = request.node.get_closest_marker("gemu")
    kw = dict(marker.kwargs) if marker else {}
    unknown = set(kw) - {"ram", "swap", "driver_mode", "timeout"}
    if unknown:
        pytest.fail(
            f"@pytest.mark.gemu: {sorted(unknown)} not available with gemu_boot "
            "(ram, swap, driver_mode, timeout)",
            pytrace=False,
        )
    exe = Path(sys.executable).parent / "gemu"
    cmd = [str(exe)] if exe.exists() else [shutil.which("gemu") or "gemu"]
    argv = [*cmd, "boot", "-m", f"{_size(kw.get('ram'), DEFAULT_RAM) >> 20}M"]
    argv += ["--swap", f"{_size(kw.get('swap'), DEFAULT_SWAP) >> 20}M"]
    if kw.get("driver_mode"):
        argv += ["--driver-mode", str(kw["driver_mode"])]
    con = BootedConsole(argv, float(kw.get("timeout", 60)))
    try:
        yield con
    finally:
        if con.child.isalive():
            status, tail = con.poweroff()
            if status != 0:
                pytest.fail(f"gemu boot exited with {status}:\n{tail}", pytrace=False)


def pytest_collect_file(parent, file_path: Path):
    config = parent.config
    if file_path.suffix == ".job" and (
        config.getoption("--gemu-jobs") or config.getini("gemu_jobs")
    ):
        return JobFile.from_parent(parent, path=file_path)
    return None


class JobFailed(Exception):
    """A job script's problems, each ``file:line: message``."""


class JobFile(pytest.File):
    def collect(self):
        yield JobItem.from_parent(self, name=self.path.name)


class JobItem(pytest.Item):
    """One job script run on its own machine, as ``gemu run SCRIPT`` would."""

    def runtest(self) -> None:
        from gemu.host.jobscript import ScriptError, parse_file
        from gemu.host.shell import Shell, scripts_driver_mode

        try:
            statements = parse_file(self.path, commands=Shell.COMMANDS)
            mode = scripts_driver_mode([statements], None)
        except ScriptError as exc:
            raise JobFailed(str(exc)) from None
        booted = _Booted(DEFAULT_RAM, DEFAULT_SWAP, "none", mode)
        with booted.machine as m:
            sh = Shell(m, lambda text: None)
            sh.run_statements(statements)
            summary = sh.poweroff()
        if not summary.ok:
            raise JobFailed("\n".join(summary.problems()))

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, JobFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, 0, f"job script {self.path.name}"
