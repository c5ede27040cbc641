"""DOC: the guest shell: the commands of ``gemu boot``'s console and of job scripts.

:class:`Shell` runs commands against a booted :class:`~gemu.host.machine.Machine` through
the gemu driver's uAPI (one open :class:`~gemu.guest.gemu_drv.uapi.GemuFile`), the way a
guest program would (``gemu explore SCRIPT.job`` runs it over an explore machine instead,
``gemu.host.explore.jobscripts.ExploreMachine``; timings use the runtime clock), and keeps the bookkeeping CI needs: named BOs and fences, the checksum
each BO should hold, expectations passed and failed, and at the end whether anything went
wrong that nobody expected (a GPU fault, a lockdep report, lost data, a kernel warning)::

    with Machine(ram_size=16 << 20) as m:
        sh = Shell(m, write=print)
        sh.run_text("a = bo 64K\\nfill a random 1\\nf = submit crc a a\\nwait f\\n")
        sh.poweroff()
        assert sh.summary().ok

Every command has ``help``; docs/job-scripts.md lists them with the script grammar.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import inspect
import logging
import math
import operator
import random
import threading
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from gemu.device.abi import packets as pk
from gemu.device.abi.enums import WaitFunc
from gemu.guest.drm.gem_shmem import SigBus
from gemu.guest.errors import KernelError
from gemu.guest.gemu_drv.uapi import READ, WRITE, JobFence
from gemu.guest.gemu_drv.vm import VA_END, VA_START, Prot
from gemu.guest.kernel import runtime, trace
from gemu.guest.locking import lockdep
from gemu.host import query
from gemu.host.jobscript import (
    Arity,
    ScriptError,
    Statement,
    check_task_name,
    expand,
    parse,
    parse_file,
    parse_line,
)
from gemu.host.machine import DEFAULT_DRIVER_MODE, DRIVER_MODES, Machine, format_size, parse_size

log = logging.getLogger("gemu.host.shell")

PROMPT = "gemu# "
BLOCK_PROMPT = "...> "
"""The console's prompt while a ``task`` block is typed (until ``end``)."""
FAULT_VA = 0x7FFF_0000_0000
"""A GPU VA the VM never hands out: a job touching it faults."""
WAIT_TIMEOUT_S = 10.0
_OPS = {
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}


class ShellError(Exception):
    """A command failed; ``errno`` is set when the guest kernel returned one."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class ExpectationFailed(ShellError):
    """An ``expect`` line did not hold."""


class _Reported(ShellError):
    """A failure already reported and counted where it happened (a line of an include)."""


class PowerOff(Exception):
    """``poweroff`` was typed (or the script ended)."""


class DeviceLost(Exception):
    """The device became unreachable; the machine cannot go on."""


@dataclass
class BoVar:
    """A named BO of the shell. ``expected`` is the CRC32 its contents should have (None:
    unknown, e.g. after a partial GPU write); ``dontneed`` after madvise DONTNEED."""

    name: str
    handle: int
    size: int
    va: int | None
    expected: int | None = None
    dontneed: bool = False
    vm: str | None = None
    """vm-bind mode: the VM the BO is private to (None: external)."""


@dataclass
class FenceVar:
    """A submitted job: its out-fence, what it does and which BOs it will change."""

    name: str
    fence: JobFence
    what: str
    writes: list[tuple[BoVar, int | None]] = field(default_factory=list)
    examined: bool = False
    settled: bool = False
    judged: bool = False
    bind_vm: int | None = None
    """vm-bind mode: the VM id of a bind's or unbind's fence (waiting for it also waits for the
    bind's deferred cleanup)."""


SHELL_VA = VA_END - (16 << 20)
"""vm-bind mode: the top 16 MiB of every VM belong to the shell (its command buffer and its
CRC results); binds there are refused."""
CMD_VA = SHELL_VA
CMD_SIZE = 64 << 10
CMD_SLOT = 256
"""Bytes of command buffer per exec: slot ``i`` holds the packets of one job until it ended."""
CMD_SLOTS = CMD_SIZE // CMD_SLOT
OUT_VA = SHELL_VA + (1 << 20)
"""Where a slot's CRC result goes: ``OUT_VA + 4 * slot``."""


@dataclass
class VmVar:
    """vm-bind mode: a named VM of the shell, with the command buffer its exec jobs run from
    (a BO private to the VM, bound at :data:`CMD_VA`) and a page for GPU CRC results (at
    :data:`OUT_VA`). ``ready`` are the out-fences of those two binds (every exec waits for
    them); ``slots`` the out-fence of the job last run from each command slot; ``bound`` the
    VA ranges each BO was ever bound at in this VM (an exec writing into one forgets that BO's
    expected contents)."""

    name: str
    vm_id: int
    cmd: int
    out: int
    ready: list[JobFence]
    slots: list[JobFence | None] = field(default_factory=lambda: [None] * CMD_SLOTS)
    next_slot: int = 0
    bound: dict[str, list[tuple[int, int]]] = field(default_factory=dict)


@dataclass
class ShellTask:
    """A ``task NAME`` block running in its own guest task."""

    name: str
    where: str
    seq: int = 0  # start order: a task joins only tasks started before it
    task: runtime.Task | None = None
    ok: bool | None = None  # None while it runs
    failed_at: str | None = None
    joined: bool = False


@dataclass
class _Context:
    """Per guest task state of the shell: the main program's, or a ``task`` block's."""

    name: str | None
    shell_task: ShellTask | None = None
    last_error: ShellError | None = None
    last_fence: FenceVar | None = None
    failed_at: str | None = None


MAX_LISTED_FAILURES = 20
"""Failed lines named one by one in :meth:`Summary.problems` (the rest are counted)."""

MAX_LISTED_CHECKS = 10_000
"""``expect`` lines recorded one by one in :attr:`Summary.checks` (the rest are counted)."""


@dataclass
class Summary:
    """What a session did and whether it went well (``ok``).

    ``checks_failed`` counts every failed line: a failed expectation or a command that failed
    without an ``expect error`` after it (``errors`` counts the latter alone);
    ``failed_lines`` names them (``file:line: message``), the first
    :data:`MAX_LISTED_FAILURES` of them."""

    commands: int = 0
    checks_passed: int = 0
    checks_failed: int = 0
    errors: int = 0
    failed_lines: list[str] = field(default_factory=list)
    unexpected_faults: list[str] = field(default_factory=list)
    unexpected_lockdep: list[str] = field(default_factory=list)
    lost_data: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    device_lost: str | None = None
    stats: dict = field(default_factory=dict)
    checks: list[tuple[str, str, str]] = field(default_factory=list)
    """Each ``expect`` line run, as (``file:line``, its text, "" if it held else the
    message), the first :data:`MAX_LISTED_CHECKS` (CI reports make a sub-case of each)."""

    @property
    def ok(self) -> bool:
        return not (
            self.checks_failed
            or self.unexpected_faults
            or self.unexpected_lockdep
            or self.lost_data
            or self.warnings
            or self.leaks
            or self.device_lost
        )

    def problems(self) -> list[str]:
        out = list(self.failed_lines)
        more = self.checks_failed - len(self.failed_lines)
        if more > 0:
            out.append(f"{more} more failed line(s)")
        out += [f"unexpected GPU fault: {f}" for f in self.unexpected_faults]
        out += [f"unexpected lockdep report: {r}" for r in self.unexpected_lockdep]
        out += [f"lost data: {d}" for d in self.lost_data]
        out += [f"kernel warning: {w}" for w in self.warnings]
        out += [f"leak: {w}" for w in self.leaks]
        if self.device_lost:
            out.append(f"device lost: {self.device_lost}")
        return out


U32_MAX = 0xFFFF_FFFF
U64_MAX = (1 << 64) - 1
GPU_VA_LIMIT = 1 << 48
"""The GPU's virtual address space (48-bit VA): no address beyond it can be used."""
MAX_BO_SIZE = 1 << 32
"""The largest BO the shell creates: 4 GiB, the reach of panfrost's 32-bit
``drm_panfrost_create_bo.size`` (gemu's shmem files keep a word per page, so the bound also
keeps a typo from costing the host gigabytes; beyond the guest's RAM the kernel says ENOMEM)."""
READ_MAX = 4096
"""Most bytes ``read`` dumps at once."""
MAX_SECONDS = 3600.0
"""The longest ``wait ... timeout`` (and ``job-timeout``) the shell takes."""
MAX_EVENTS = 10_000
"""Events kept for ``events show`` (the most recent)."""


def _hex_or_dec(n: int | float) -> str:
    return f"{n:#x}" if isinstance(n, int) and abs(n) > 0xFFFF else f"{n:g}"


def _parse_int(text: str, what: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        pass
    try:
        return parse_size(text, default_unit="")
    except (ValueError, KeyError):
        raise ShellError(
            f"{what} {text!r} is not a number (decimal, 0x hex, or with a K/M/G/T suffix)",
            errno_mod.EINVAL,
        ) from None


def number(text: str, what: str, lo: int, hi: int) -> int:
    """The one place the shell reads an integer argument: decimal, ``0x`` hex, or a size with
    a K/M/G/T suffix, within ``lo..hi`` (inclusive). ``what`` names the command and the
    argument (``"fill: VALUE"``); anything else is a :class:`ShellError` (EINVAL) naming
    them and the range, never a truncated or clamped value."""
    n = _parse_int(text, what)
    if not lo <= n <= hi:
        raise ShellError(
            f"{what} {text} is out of range ({_hex_or_dec(lo)} to {_hex_or_dec(hi)})",
            errno_mod.EINVAL,
        )
    return n


def size(text: str, what: str, hi: int) -> int:
    """A size in bytes (``64K``, ``4M``, ``4096``) from 1 byte to ``hi``; see
    :func:`number`."""
    n = _parse_int(text, what)
    if not 1 <= n <= hi:
        raise ShellError(
            f"{what} {text} is out of range (1 byte to {format_size(hi)})", errno_mod.EINVAL
        )
    return n


def seconds(text: str, what: str, lo: float, hi: float) -> float:
    """A time (decimal, fractions allowed) within ``lo..hi``; nan and inf are out of
    range; see :func:`number`."""
    try:
        t = float(text)
    except ValueError:
        raise ShellError(f"{what} {text!r} is not a number", errno_mod.EINVAL) from None
    if not (math.isfinite(t) and lo <= t <= hi):
        raise ShellError(f"{what} {text} is out of range ({lo:g} to {hi:g})", errno_mod.EINVAL)
    return t


def _pattern_crc(value: int, size: int) -> int:
    return zlib.crc32(value.to_bytes(4, "little") * (size // 4))


INFO_VIEWS: dict[str, str] = {
    "objects": "BOs with their counters, state and GPU VA",
    "shrinker": "the shrinker's LRUs and counters",
    "swap": "swap use and I/O counters",
    "mem": "the page allocator: free pages, watermarks, reclaim",
    "mmu": "GPU address spaces and the BOs' mappings",
    "ring": "the command ring and the GPU's counters",
    "fences": "the jobs' fences and their state",
    "lockdep": "lockdep reports",
    "tasks": "the script's task blocks and their state",
    "stats": "every counter as NAME = VALUE (for expect stat)",
    "vms": "vm-bind mode: the VMs' mappings, vm_bos, evict and extobj lists, reclaim order",
    "reclaim": "vm-bind mode: the per-VM shrinker's LRUs, VM order and BO reclaim states",
}
"""``info VIEW``: the views and what they show; each formats the data of the function of
the same name in :mod:`gemu.host.query`."""

JOB_KINDS: dict[str, tuple[str, str]] = {
    "nop": ("", "a NOP packet"),
    "copy": ("SRC DST", "COPY min(size) bytes; DST then holds what SRC holds"),
    "fill": ("DST VALUE", "FILL the whole BO with a 32-bit VALUE"),
    "crc": ("SRC DST", "CRC32 of all of SRC into the first word of DST"),
    "atomic": ("DST[+OFF] ADD", "a 64-bit ATOMIC add"),
    "waitmem": ("BO[+OFF] VALUE", "WAIT_MEM until the word equals VALUE (poke it)"),
    "fault": ("", "FILL at an unmapped GPU VA: the job fails with EFAULT (MMU fault)"),
    "hang": ("", "WAIT_MEM nobody releases: the job timeout resets the GPU (ETIMEDOUT)"),
}
"""``submit KIND ARGS``: the job kinds, their arguments and what the job does."""

EXEC_KINDS: dict[str, tuple[str, str]] = {
    "nop": ("", "a NOP packet"),
    "copy": ("SRC DST SIZE", "COPY SIZE bytes from VA SRC to VA DST"),
    "fill": ("DST SIZE VALUE", "FILL SIZE bytes at VA DST with a 32-bit VALUE"),
    "crc": ("SRC SIZE DST", "CRC32 of SIZE bytes at VA SRC into the word at VA DST"),
    "atomic": ("DST ADD", "a 64-bit ATOMIC add at VA DST"),
    "waitmem": ("ADDR VALUE", "WAIT_MEM until the word at VA ADDR equals VALUE"),
}
"""vm-bind mode, ``exec VM KIND ARGS``: the job kinds, their arguments (GPU VAs of the VM)
and what the job does."""

EXPECT_FORMS: dict[str, tuple[str, str]] = {
    "crc": (
        "BO OP VALUE|BO2 | VM VA SIZE OP VALUE|BO[+OFF]",
        "the GPU's CRC32 of the whole BO (driver mode vm-bind: of SIZE bytes at VA of VM; "
        "BO: the CPU's CRC32 of SIZE bytes of BO) compares so",
    ),
    "cpucrc": (
        "BO[+OFF] SIZE OP VALUE|BO2[+OFF2]",
        "the CRC32 of SIZE bytes of BO as the CPU reads them compares so",
    ),
    "value": ("BO[+OFF] OP VALUE", "the 32-bit word the CPU reads compares so"),
    "fence": ("F signaled|pending|failed [ERRNO]", "the job's fence is in that state"),
    "fault": ("[F]", "job F (default: the last) failed with a GPU MMU fault"),
    "error": ("ERRNO", "the previous line failed with ERRNO (e.g. ENOMEM)"),
    "state": ("BO resident|evicted|purged|pinned", "the BO's shmem state"),
    "stat": ("NAME OP VALUE", "a counter of info stats compares so"),
    "event": ("CATEGORY.NAME [OP COUNT]", "tracepoints recorded after events on"),
    "lockdep": ("N", "exactly N lockdep reports so far (they are then expected)"),
    "lost": ("BO...", "those BOs' contents may be gone (verify accepts it)"),
}
"""``expect WHAT ARGS``: the checks (each one ``_expect_WHAT`` method); OP is one of
``== != < <= > >=``."""


@dataclass(frozen=True)
class CommandSpec:
    """One row of the command table: the method, its arity and usage, and a one-line
    summary (plain text, a whole sentence) that ``help`` lists."""

    method: str
    arity: Arity
    summary: str
    mode: str | None = None
    """The driver mode the command belongs to (None: both)."""


_TABLE: dict[str, CommandSpec] = {}
"""The command table: every shell command, filled by :func:`command`. The parser's arity
checks, ``help`` and the command dispatch all read it."""


def command(
    name: str,
    min_args: int,
    max_args: int | None,
    usage: str,
    summary: str,
    *,
    binds: bool = False,
    mode: str | None = None,
):
    def deco(fn):
        _TABLE[name] = CommandSpec(
            fn.__name__, Arity(min_args, max_args, usage, binds), summary, mode
        )
        fn._help = inspect.cleandoc(fn.__doc__ or "")
        return fn

    return deco


def _plain(text: str) -> str:
    """Docstring text for the console: without rST's inline-literal backticks."""
    return text.replace("``", "").replace("`", "")


def _known(table) -> str:
    return ", ".join(table)


_MODE_HINT = {
    "per-bo": "boot with --driver-mode per-bo (the default)",
    "vm-bind": "boot with --driver-mode vm-bind, or Machine(driver_mode='vm-bind')",
}


def _directives(statements: list[Statement]):
    for st in statements:
        if st.command == "driver-mode":
            yield st
        yield from _directives(list(st.body))


def scripts_driver_mode(scripts: list[list[Statement]], requested: str | None) -> str | None:
    """The driver mode a run of ``scripts`` needs: ``requested`` (``--driver-mode``), else the
    one their ``driver-mode MODE`` lines name, else None (the default). A mode that does not
    exist, two scripts naming different modes, or a line naming another mode than
    ``requested`` is a :class:`ScriptError` at that line: scripts of different driver modes
    cannot share a machine."""
    declared: Statement | None = None
    for statements in scripts:
        for st in _directives(statements):
            mode = st.argv[1]
            if mode not in DRIVER_MODES:
                raise ScriptError(
                    st.file,
                    st.line,
                    f"driver-mode: unknown driver mode {mode!r} (known: {_known(DRIVER_MODES)})",
                )
            if requested is not None and mode != requested:
                raise ScriptError(
                    st.file,
                    st.line,
                    f"driver-mode {mode}: the machine is asked to run {requested} "
                    f"(--driver-mode {requested})",
                )
            if declared is not None and mode != declared.argv[1]:
                raise ScriptError(
                    st.file,
                    st.line,
                    f"driver-mode {mode}: {declared.where} asks for {declared.argv[1]}; scripts "
                    "of different driver modes need a machine each (separate gemu run calls)",
                )
            declared = declared or st
    if requested is not None:
        return requested
    return declared.argv[1] if declared is not None else None


class Shell:
    """The guest shell over one machine. ``write`` receives every line of output."""

    COMMANDS: dict[str, Arity]

    def __init__(
        self,
        machine: Machine,
        write: Callable[[str], None] = print,
        *,
        echo: bool = False,
        base: Path | None = None,
    ) -> None:
        self.m = machine
        self.write = write
        self.report = self._plain
        """Where failures (file:line messages, naming the task block if any) go; ``write``
        unless set apart."""
        self.progress = self.say
        """Where ``echo`` lines go (progress of long scripts); ``write`` unless set apart."""
        self.echo = echo
        self.idle: Callable[[], None] | None = None
        """Called before each line of the main script (``gemu run --qmp`` serves QMP there)."""
        self.base = base or Path.cwd()
        self.mode = getattr(machine, "driver_mode", DEFAULT_DRIVER_MODE)
        self.file = machine.open()
        self.bos: dict[str, BoVar] = {}
        self.vms: dict[str, VmVar] = {}
        self.fences: dict[str, FenceVar] = {}
        self._retired: list[FenceVar] = []  # unbound names whose jobs were still running
        self._job_fences: list[
            tuple[str, int, object]
        ] = []  # every job's fence, for the leak check
        self.values: dict[str, str] = {}
        self.sum = Summary()
        self.tasks: dict[str, ShellTask] = {}
        self._main = _Context(None)
        self._contexts: dict[runtime.Task, _Context] = {}  # the running task blocks
        self._count = threading.Lock()  # counters and names shared by task blocks
        self._out = threading.Lock()
        self._typing: tuple[Statement, list[Statement]] | None = None  # console task block
        self._started = 0  # task blocks started
        self.expected_lockdep = 0
        self.expected_lost: set[str] = set()
        self.lockdep_base = len(lockdep.reports())
        self._boot_timeout_ns = machine.driver.timeout_ns
        self._jobs = 0
        self.bytes_moved = 0
        self.events: deque = deque(maxlen=10_000)
        self._events_on = False
        self._down = False
        self._hang_sems: list[int] = []
        self._pending_failure: str | None = None  # a console line's failure, until the next

    # -- per-task state -----------------------------------------------------------------------
    def _context(self) -> _Context:
        return self._contexts.get(runtime.current(), self._main)

    @property
    def last_error(self) -> ShellError | None:
        """The error of the previous line of the current program (main or task block)."""
        return self._context().last_error

    @last_error.setter
    def last_error(self, value: ShellError | None) -> None:
        self._context().last_error = value

    @property
    def prompt(self) -> str:
        """The console prompt: :data:`PROMPT`, or :data:`BLOCK_PROMPT` inside a task block."""
        return PROMPT if self._typing is None else BLOCK_PROMPT

    # -- output ------------------------------------------------------------------------------
    def say(self, text: str = "") -> None:
        name = self._context().name
        if name is not None:  # a task block's lines carry its name
            text = "\n".join(f"[{name}] {line}" for line in text.splitlines() or [""])
        self._plain(text)

    def _plain(self, text: str) -> None:
        with self._out:  # whole lines, when task blocks write at once
            for line in text.splitlines() or [""]:
                self.write(line)

    # -- running -----------------------------------------------------------------------------
    def execute(self, st: Statement) -> None:
        """Run one statement; raises ShellError (or PowerOff/DeviceLost)."""
        with self._count:
            self.sum.commands += 1
        try:
            argv = [expand(w, self.values) for w in st.argv]
        except KeyError as exc:
            raise ShellError(f"${exc.args[0]} is not set (set {exc.args[0]} VALUE)") from None
        spec = _TABLE[argv[0]]
        if spec.mode is not None and spec.mode != self.mode:
            raise ShellError(
                f"{argv[0]}: a command of driver mode {spec.mode}, and this machine runs "
                f"{self.mode} ({_MODE_HINT[spec.mode]})",
                errno_mod.EOPNOTSUPP,
            )
        fn = getattr(self, spec.method)
        try:
            result = fn(st, *argv[1:])
        except (ShellError, PowerOff, DeviceLost):
            raise
        except KernelError as exc:
            raise ShellError(f"{argv[0]}: {exc}", exc.errno) from None
        except (ConnectionError, OSError) as exc:
            raise ShellError(f"{argv[0]}: device unreachable: {exc}", errno_mod.ENODEV) from None
        except SigBus as exc:  # CPU access to a purged BO
            raise ShellError(f"{argv[0]}: SIGBUS: {exc}", errno_mod.EFAULT) from None
        except Exception as exc:  # a shell bug, not a user's mistake: say so, keep going
            log.debug("%s failed", argv[0], exc_info=True)
            raise ShellError(f"{argv[0]}: internal error: {type(exc).__name__}: {exc}") from None
        if st.target is not None and result is None:
            raise ShellError(f"{argv[0]}: gave no result to bind to {st.target}")

    def _record_check(self, where: str, text: str, message: str) -> None:
        with self._count:
            if len(self.sum.checks) < MAX_LISTED_CHECKS:
                self.sum.checks.append((where, text.strip(), message))

    def _line_failed(self, text: str, *, error: bool = False) -> None:
        """Count a failed line (``file:line: message``) in the summary."""
        with self._count:
            s = self.sum
            s.checks_failed += 1
            s.errors += error
            if len(s.failed_lines) < MAX_LISTED_FAILURES:
                s.failed_lines.append(text)

    def _settle_pending_failure(self, st: Statement | None) -> None:
        """A console command failed on the previous line: it fails the run unless ``st``
        (the next statement; None at the end) is the ``expect error`` that accepts it."""
        pending, self._pending_failure = self._pending_failure, None
        if pending is not None and (st is None or st.argv[:2] != ("expect", "error")):
            self._line_failed(pending, error=True)

    def _check_device(self) -> None:
        why = self.m.device_lost()
        if why is not None:
            self.sum.device_lost = why
            raise DeviceLost(why)

    def run_statements(
        self, statements: list[Statement], *, stop_on_error: bool = True, console: bool = False
    ) -> bool:
        """Run statements in order; returns False at the first failure when
        ``stop_on_error`` (the message, naming file:line, has been written). Every failed
        line is counted in the summary; with ``console`` (one typed line) a command's
        failure is counted once the next line is known not to be ``expect error``."""
        ok = True
        ctx = self._context()
        for i, st in enumerate(statements):
            if self.idle is not None and ctx.name is None:
                self.idle()  # the main script's turn to serve QMP between its lines
            if self.echo:
                self.say(f"{PROMPT}{st.text}")
            where = st.where if ctx.name is None else f"{st.where}: task {ctx.name}"
            try:
                self.execute(st)
                if st.command != "expect":
                    ctx.last_error = None
                else:
                    self._record_check(where, st.text, "")
            except ExpectationFailed as exc:
                self._record_check(where, st.text, str(exc))
                ctx.failed_at = ctx.failed_at or st.where
                self.report(f"{where}: {exc}")
                self._line_failed(f"{where}: {exc}")
                ok = False
                if stop_on_error:
                    return False
            except _Reported:
                ok = False
                if stop_on_error:
                    return False
            except ShellError as exc:
                ctx.last_error = exc
                nxt = statements[i + 1] if i + 1 < len(statements) else None
                if nxt is not None and nxt.argv[:2] == ("expect", "error"):
                    self.say(f"{st.where}: {exc}")
                    continue
                ctx.failed_at = ctx.failed_at or st.where
                self.report(f"{where}: {exc}")
                if console:  # the next line typed may be the `expect error` that accepts it
                    self._pending_failure = f"{where}: {exc}"
                else:
                    self._line_failed(f"{where}: {exc}", error=True)
                self._check_device()
                ok = False
                if stop_on_error:
                    return False
            self._check_device()
        return ok

    def run_text(self, text: str, file: str = "<text>", *, stop_on_error: bool = True) -> bool:
        return self.run_statements(
            parse(text, file, commands=self.COMMANDS, base=self.base), stop_on_error=stop_on_error
        )

    def run_script(self, statements: list[Statement]) -> bool:
        """Run one job script of several (``gemu run A.job B.job``): its statements, then
        :meth:`end_script`, so what it leaves behind cannot change the next script's result.
        Returns False if a line failed (the message, naming file:line, has been written)."""
        ok = self.run_statements(statements)
        self.end_script()
        return ok

    def end_script(self) -> None:
        """Finish what a script started and forget its names, as if the session began anew.

        Its tasks are joined and its jobs waited for; a failed job it never examined and a
        lockdep report it did not expect are counted (they fail the run); its fences and BOs
        are closed (their memory and swap go back), its ``set`` values, recorded events and
        ``job-timeout`` are dropped. The machine's counters (``info stats``) go on."""
        self._join([t for t in list(self.tasks.values()) if not t.joined])
        if self.m.device_lost() is not None:
            return
        self._settle_all()
        with self._count:
            fences = [*self.fences.values(), *self._retired]
            self.fences.clear()
            self._retired.clear()
            bos = [bo for bo in self.bos.values() if bo.name != "_crc"]  # not the scratch BO
            for bo in bos:
                del self.bos[bo.name]
        for fv in fences:
            self._judge(fv)
            if not fv.fence.closed:
                fv.fence.close()
        for bo in bos:
            self.file.close_bo(bo.handle)
        with self._count:
            vms = list(self.vms.values())
            self.vms.clear()
        for vm in vms:
            self._vm_destroy(vm)
        self._judge_lockdep()
        self.lockdep_base = len(lockdep.reports())
        self.expected_lockdep = 0
        self.expected_lost.clear()
        self.tasks.clear()
        self.values.clear()
        self._main = _Context(None)
        if self._events_on:
            trace.unsubscribe(self._record)
            self._events_on = False
        self.events.clear()
        if self.m.driver.timeout_ns != self._boot_timeout_ns:
            self.m.driver.timeout_ns = self.m.driver.sched.timeout = self._boot_timeout_ns

    def _judge_lockdep(self) -> None:
        """Count the lockdep reports since the session (or script) began beyond those an
        ``expect lockdep`` accepted; each is counted once."""
        reports = lockdep.reports()[self.lockdep_base :]
        for r in reports[self.expected_lockdep :]:
            self.sum.unexpected_lockdep.append(f"{r.kind}: {r.message.splitlines()[0]}")
        self.expected_lockdep = len(reports)

    def run_file(self, path: str | Path, *, stop_on_error: bool = True) -> bool:
        return self.run_statements(
            parse_file(path, commands=self.COMMANDS), stop_on_error=stop_on_error
        )

    def run_line(self, text: str, where: str = "<console>", line: int = 1) -> bool:
        """One console line: parse errors and command errors are printed, not raised.

        A ``task NAME`` line opens a block: the following lines are kept (the prompt becomes
        :data:`BLOCK_PROMPT`) until ``end``, which starts the task."""
        try:
            st = parse_line(text, where, line, self.COMMANDS)
            if st is not None and st.command == "task":
                check_task_name(st, self._typing[0] if self._typing else None)
        except ScriptError as exc:
            self._settle_pending_failure(None)
            self.report(str(exc))
            self._line_failed(str(exc), error=True)
            return False
        if st is None:
            return True
        if self._typing is None:
            self._settle_pending_failure(st)
        if st.command == "task":
            self._typing = (st, [])
            return True
        if self._typing is not None:
            opened, body = self._typing
            if st.command != "end":
                body.append(st)
                return True
            self._typing = None
            st = replace(opened, body=tuple(body))
        return self.run_statements([st], stop_on_error=True, console=True)

    # -- lookup ------------------------------------------------------------------------------
    def _bo(self, name: str) -> BoVar:
        base = name.split("+", 1)[0]
        bo = self.bos.get(base)
        if bo is None:
            raise ShellError(f"no BO named {base!r}" + self._known("BO", self.bos))
        return bo

    def _bo_off(self, text: str, what: str) -> tuple[BoVar, int]:
        """``BO[+OFFSET]``: the BO and the offset of a 32-bit word in it."""
        base, _, off = text.partition("+")
        bo = self._bo(base)
        return bo, number(off, f"{what}: OFFSET", 0, bo.size - 4) if off else 0

    def _fence(self, name: str) -> FenceVar:
        f = self.fences.get(name)
        if f is None:
            raise ShellError(f"no fence named {name!r}" + self._known("fence", self.fences))
        return f

    @staticmethod
    def _known(what: str, table: dict) -> str:
        return f" (known: {', '.join(table)})" if table else f" (no {what} yet)"

    def _new_name(self, st: Statement, prefix: str, n: int) -> str:
        return st.target or f"{prefix}{n}"

    # -- BOs ---------------------------------------------------------------------------------
    @command(
        "bo",
        1,
        3,
        "[NAME =] bo SIZE [nomap | private VM]",
        "Create a BO of SIZE bytes: per-bo mode binds it into the GPU VM (nomap: not); "
        "vm-bind mode makes it external, or private to VM.",
        binds=True,
    )
    def cmd_bo(self, st: Statement, size_text: str, flag: str = "", vm: str = "") -> BoVar:
        """Create a BO of SIZE bytes (K/M/G suffixes); its pages come from guest RAM at once.
        Driver mode per-bo maps it into the GPU VM (``nomap``: leave it unbound). Driver
        mode vm-bind binds nothing (see bind): the BO is external (it has a reservation of its
        own and can be bound into any VM), or ``private VM``: it shares VM's reservation and
        can be bound into VM only."""
        if self.mode == "vm-bind":
            return self._bo_vm_bind(st, size_text, flag, vm)
        if flag not in ("", "nomap") or vm:
            hint = " ('private VM' needs driver mode vm-bind)" if flag == "private" else ""
            raise ShellError(f"bo: unknown flag {flag!r} (only 'nomap'){hint}")
        n = size(size_text, "bo: SIZE", MAX_BO_SIZE)
        h = self.file.create_bo(n, name=st.target)
        name = self._new_name(st, "bo", h)
        if name in self.bos:
            self.file.close_bo(self.bos[name].handle)
        va = None if flag else self.file.vm_bind(h)
        bo = BoVar(name, h, self.file.bo(h).obj.size, va, zlib.crc32(bytes(n)))
        self.bos[name] = bo
        where = f"GPU VA {va:#x}" if va is not None else "not mapped"
        self.say(f"{name}: handle {h}, {format_size(bo.size)}, {where}")
        return bo

    @command(
        "close",
        1,
        None,
        "close BO|FENCE...",
        "Close BO handles and job fences (their jobs run on and still count).",
    )
    def cmd_close(self, st: Statement, *names: str) -> None:
        """Close BO handles and job fences (a BO a job still uses lives until the job is
        done; a closed fence's job runs on and still counts at power-off)."""
        for name in names:
            if name in self.fences and name not in self.bos:
                with self._count:
                    fv = self.fences.pop(name)
                self._release_fence(fv)
                continue
            bo = self._bo(name)
            self.file.close_bo(bo.handle)
            del self.bos[bo.name]

    @command(
        "map", 1, 2, "map BO [VA]", "Bind a BO into the GPU VM, at VA if given.", mode="per-bo"
    )
    def cmd_map(self, st: Statement, name: str, va: str = "") -> None:
        """Bind a BO into the GPU VM (at VA if given); jobs map its pages when they run."""
        bo = self._bo(name)
        addr = number(va, "map: VA", 0, GPU_VA_LIMIT - 1) if va else None
        bo.va = self.file.vm_bind(bo.handle, addr)
        self.say(f"{bo.name}: GPU VA {bo.va:#x}")

    @command("unmap", 1, 1, "unmap BO", "Unbind an idle BO from the GPU VM.", mode="per-bo")
    def cmd_unmap(self, st: Statement, name: str) -> None:
        """Unbind a BO from the GPU VM (it must be idle)."""
        bo = self._bo(name)
        self.file.vm_unbind(bo.handle)
        bo.va = None

    @command(
        "pin",
        1,
        1,
        "pin BO",
        "Pin a BO's pages: never evicted or purged until unpinned.",
        mode="per-bo",
    )
    def cmd_pin(self, st: Statement, name: str) -> None:
        """Pin a BO's pages: never evicted or purged until unpinned."""
        self.file.pin(self._bo(name).handle)

    @command("unpin", 1, 1, "unpin BO", "Drop a pin.", mode="per-bo")
    def cmd_unpin(self, st: Statement, name: str) -> None:
        """Drop a pin."""
        self.file.unpin(self._bo(name).handle)

    @command(
        "madvise",
        2,
        2,
        "madvise BO dontneed|willneed",
        "Say whether a BO's contents are needed; DONTNEED BOs are purged first.",
        mode="per-bo",
    )
    def cmd_madvise(self, st: Statement, name: str, advice: str) -> None:
        """Tell the kernel whether a BO's contents are needed; DONTNEED BOs are purged first
        under memory pressure, and a purged BO is rejected by submits."""
        if advice not in ("dontneed", "willneed"):
            raise ShellError(f"madvise: {advice!r} is not dontneed or willneed")
        bo = self._bo(name)
        retained = self.file.madvise(bo.handle, willneed=advice == "willneed")
        bo.dontneed = advice == "dontneed" or not retained
        self.say(f"{bo.name}: {'retained' if retained else 'purged'}")

    @command(
        "fill",
        2,
        3,
        "fill BO VALUE | fill BO random SEED",
        "Write the whole BO through its CPU mapping: a 32-bit VALUE or seeded random bytes.",
    )
    def cmd_fill(self, st: Statement, name: str, value: str, seed: str = "") -> None:
        """Write the whole BO through its CPU mapping: a repeated 32-bit VALUE, or
        pseudo-random bytes from SEED. The shell remembers the checksum (see verify)."""
        bo = self._bo(name)
        if value == "random":
            if not seed:
                raise ShellError("fill: random needs a SEED")
            data = random.Random(number(seed, "fill: SEED", 0, U64_MAX)).randbytes(bo.size)
        elif seed:
            raise ShellError(f"fill: unexpected {seed!r} after the value")
        else:
            word = number(value, "fill: VALUE", 0, U32_MAX)
            data = word.to_bytes(4, "little") * (bo.size // 4)
        self.file.write(bo.handle, 0, data)
        bo.expected = zlib.crc32(data)

    @command(
        "write",
        3,
        3,
        "write BO OFFSET HEXBYTES",
        "Write hex bytes at OFFSET through the CPU mapping.",
    )
    def cmd_write(self, st: Statement, name: str, offset: str, hexbytes: str) -> None:
        """Write bytes (hex) at OFFSET through the CPU mapping."""
        bo = self._bo(name)
        try:
            data = bytes.fromhex(hexbytes)
        except ValueError:
            raise ShellError(f"write: {hexbytes!r} is not hex bytes") from None
        if len(data) > bo.size:
            raise ShellError(f"write: {len(data)} bytes do not fit in {bo.name} ({bo.size} bytes)")
        self.file.write(bo.handle, number(offset, "write: OFFSET", 0, bo.size - len(data)), data)
        bo.expected = zlib.crc32(self.file.read(bo.handle, 0, bo.size))

    @command(
        "poke",
        2,
        2,
        "poke BO[+OFFSET] VALUE",
        "Store a 32-bit VALUE through the CPU mapping (e.g. to release a waitmem job).",
    )
    def cmd_poke(self, st: Statement, where: str, value: str) -> None:
        """Store a 32-bit VALUE through the CPU mapping (e.g. release a waitmem job)."""
        bo, off = self._bo_off(where, "poke")
        word = number(value, "poke: VALUE", 0, U32_MAX)
        self.file.write(bo.handle, off, word.to_bytes(4, "little"))
        bo.expected = None

    @command(
        "read",
        1,
        3,
        "read BO [OFFSET [LENGTH]]",
        "Hex dump through the CPU mapping (an evicted BO is swapped in).",
    )
    def cmd_read(self, st: Statement, name: str, offset: str = "0", length: str = "") -> None:
        """Hex dump of a BO read through its CPU mapping (swapped in if evicted)."""
        bo = self._bo(name)
        off = number(offset, "read: OFFSET", 0, bo.size - 1)
        length = length or str(min(64, bo.size - off))
        n = number(length, "read: LENGTH", 1, min(READ_MAX, bo.size - off))
        data = self.file.read(bo.handle, off, n)
        for i in range(0, len(data), 16):
            chunk = data[i : i + 16]
            self.say(f"{off + i:08x}  {chunk.hex(' ')}")

    @command(
        "symbols",
        1,
        None,
        "symbols FILE [F...]",
        "Write a gdb symbol file naming the command buffers of jobs F (default: every job).",
    )
    def cmd_symbols(self, st: Statement, path: str, *names: str) -> None:
        """Write FILE, an ELF symbol file naming the command buffer of each job F by its
        fence name (default: every job submitted so far, bind jobs excepted); in gdb,
        `add-symbol-file FILE` then shows packets as `F+OFFSET` (see docs/gdb.md)."""
        from gemu.host.cmd_gdb import write_job_symbols

        named = {}
        for name in names or list(self.fences):
            fv = self.fences.get(name)
            if fv is None:
                raise ShellError(f"symbols: no job named {name!r}")
            job = fv.fence.job
            if getattr(job, "ib_dwords", 0):
                named[name] = job
            elif names:
                raise ShellError(f"symbols: {name} ({fv.what}) runs no command buffer")
        if not named:
            raise ShellError("symbols: no job with a command buffer submitted yet")
        try:
            write_job_symbols(path, named)
        except (ValueError, OSError) as exc:
            raise ShellError(f"symbols: {exc}") from None
        self.say(f"{path}: {len(named)} command buffer(s) named: {', '.join(named)}")

    @command("crc", 1, 1, "crc BO", "CRC32 of the BO's contents as the CPU reads them.")
    def cmd_crc(self, st: Statement, name: str) -> None:
        """CRC32 of the BO's contents read by the CPU."""
        bo = self._bo(name)
        self.say(f"{bo.name}: crc32 {zlib.crc32(self.file.read(bo.handle, 0, bo.size)):#010x}")

    @command(
        "verify",
        0,
        None,
        "verify [BO...]",
        "Check that BOs still hold what was written into them (lost data fails the run).",
    )
    def cmd_verify(self, st: Statement, *names: str) -> None:
        """Check that BOs still hold what was written into them (all BOs with known
        contents by default, DONTNEED ones excepted). A difference is lost data."""
        self._settle_all()
        bos = [self._bo(n) for n in names] if names else list(self.bos.values())
        checked = 0
        for bo in bos:
            if bo.expected is None or bo.dontneed:
                continue
            got = zlib.crc32(self.file.read(bo.handle, 0, bo.size))
            checked += 1
            if got != bo.expected:
                msg = f"{bo.name}: contents changed (crc32 {got:#010x}, wrote {bo.expected:#010x})"
                if bo.name not in self.expected_lost:
                    self.sum.lost_data.append(msg)
                raise ExpectationFailed(f"verify {msg}")
        self.sum.checks_passed += 1
        self.say(f"verify: {checked} BOs intact")

    # -- jobs --------------------------------------------------------------------------------
    def _va(self, bo: BoVar) -> int:
        if bo.va is None:
            raise ShellError(f"{bo.name} is not mapped in the GPU VM (map it)")
        return bo.va

    @command(
        "submit",
        1,
        None,
        "[NAME =] submit KIND ARGS... [after FENCE...]",
        "Submit a GPU job of KIND (see help submit); after waits for other jobs' fences.",
        binds=True,
        mode="per-bo",
    )
    def cmd_submit(self, st: Statement, kind: str, *rest: str) -> FenceVar:
        """Submit a GPU job (the submit ioctl: its BOs validated, its out-fence bound to
        NAME). ``after F1 F2`` makes the job wait for those jobs' fences (a fence chain),
        signalled or not."""
        args = list(rest)
        after: list[FenceVar] = []
        if "after" in args:
            i = args.index("after")
            after = [self._fence(n) for n in args[i + 1 :]]
            if not after:
                raise ShellError("submit: 'after' needs fence names")
            args = args[:i]
        cmd, bos, writes, what, moved = self._build_job(kind, args)
        fence = self.file.submit(cmd, bos=bos, in_fences=[f.fence for f in after])
        with self._count:
            self._jobs += 1
            self.bytes_moved += moved
            name = self._new_name(st, "f", self._jobs)
            fv = FenceVar(name, fence, what, writes)
            old = self.fences.get(name)
            self.fences[name] = fv
            self._job_fences.append((name, fence.seqno, fence.fence))
        if old is not None:
            self._release_fence(old)
        self._context().last_fence = fv
        for bo, crc in writes:
            bo.expected = crc
        self.say(f"{name}: job {fence.seqno} submitted ({what})")
        return fv

    def _build_job(self, kind: str, args: list[str]):
        def need(n: int, usage: str) -> None:
            if len(args) != n:
                raise ShellError(f"submit {kind}: usage: submit {kind} {usage}")

        if kind == "nop":
            need(0, "")
            return pk.nop(), [], [], "nop", 0
        if kind == "copy":
            need(2, "SRC DST")
            src, dst = self._bo(args[0]), self._bo(args[1])
            n = min(src.size, dst.size)
            crc = src.expected if n == src.size == dst.size else None
            cmd = pk.copy(self._va(src), self._va(dst), n)
            return (
                cmd,
                [(src.handle, READ), (dst.handle, WRITE)],
                [(dst, crc)],
                (f"copy {format_size(n)} {src.name} -> {dst.name}"),
                n,
            )
        if kind == "fill":
            need(2, "DST VALUE")
            dst, value = self._bo(args[0]), number(args[1], "submit fill: VALUE", 0, U32_MAX)
            cmd = pk.fill(self._va(dst), dst.size, value)
            return (
                cmd,
                [(dst.handle, WRITE)],
                [(dst, _pattern_crc(value, dst.size))],
                (f"fill {dst.name} with {value:#010x}"),
                dst.size,
            )
        if kind == "crc":
            need(2, "SRC DST")
            src, dst = self._bo(args[0]), self._bo(args[1])
            cmd = pk.crc32(self._va(src), src.size, self._va(dst))
            bos = [(src.handle, READ | WRITE)] if src is dst else [(src.handle, READ)]
            if src is not dst:
                bos.append((dst.handle, WRITE))
            return cmd, bos, [(dst, None)], f"crc32 of {src.name} into {dst.name}", src.size
        if kind == "atomic":
            need(2, "DST[+OFF] ADD")
            dst, off = self._bo_off(args[0], "submit atomic")
            add = number(args[1], "submit atomic: ADD", 0, U64_MAX)
            cmd = pk.atomic_add(self._va(dst) + off, add)
            return cmd, [(dst.handle, WRITE)], [(dst, None)], f"atomic add to {args[0]}", 8
        if kind == "waitmem":
            need(2, "BO[+OFF] VALUE")
            bo, off = self._bo_off(args[0], "submit waitmem")
            value = number(args[1], "submit waitmem: VALUE", 0, U32_MAX)
            cmd = pk.wait_mem(self._va(bo) + off, value, function=WaitFunc.EQ)
            return cmd, [(bo.handle, READ)], [], f"wait until {args[0]} == {value:#x}", 0
        if kind == "fault":
            need(0, "")
            cmd = pk.fill(FAULT_VA, 4096, 0xDEAD)
            return cmd, [], [], f"fill at unmapped GPU VA {FAULT_VA:#x}", 0
        if kind == "hang":
            need(0, "")
            sem = self.file.create_bo(4096, name="hang-sem")
            va = self.file.vm_bind(sem)
            self.file.pin(sem)
            self._hang_sems.append(sem)
            cmd = pk.wait_mem(va, 1, function=WaitFunc.EQ)
            return cmd, [(sem, READ)], [], "wait for a value nobody writes (hang)", 0
        raise ShellError(f"submit: unknown job kind {kind!r} ({_known(JOB_KINDS)})")

    def _settle(self, fv: FenceVar, timeout: float | None = WAIT_TIMEOUT_S) -> None:
        """Wait for a fence; on failure forget what it would have written."""
        try:
            self.file.wait(fv.fence, timeout)
        except KernelError as exc:
            if exc.errno == errno_mod.ENOENT and fv.fence.closed:
                raise ShellError(f"{fv.name}: closed while waiting (rebound or closed)") from None
            if exc.errno == errno_mod.ETIMEDOUT and not fv.fence.signaled:
                raise
            for bo, _ in fv.writes:
                bo.expected = None
            raise
        finally:
            if fv.fence.signaled:
                fv.settled = True

    def _settle_all(self) -> None:
        for fv in [*self.fences.values(), *self._retired]:
            if not fv.settled:
                with contextlib.suppress(KernelError):
                    self._settle(fv)

    def _release_fence(self, fv: FenceVar) -> None:
        """Close the out-fence of a name that was rebound or closed. A job still running
        keeps it until power-off, where its outcome is judged like any other's."""
        if not fv.fence.closed and fv.fence.signaled:
            self._judge(fv)
            with contextlib.suppress(KernelError):  # closed meanwhile by another task
                fv.fence.close()
        else:
            with self._count:
                self._retired.append(fv)

    def _judge(self, fv: FenceVar) -> None:
        """Count a failed job nobody examined (it fails the run)."""
        f = fv.fence
        if f.signaled and f.error and not fv.examined and not fv.judged:
            fv.judged = True
            self.sum.unexpected_faults.append(
                f"{fv.name} ({fv.what}): {query.errno_name(f.error)}: {f.message}"
            )

    @command(
        "wait",
        1,
        None,
        "wait FENCE... [timeout SECONDS]",
        "Wait for jobs; a failed job is an error with its errno and the GPU's message.",
    )
    def cmd_wait(self, st: Statement, *args: str) -> None:
        """Wait for jobs to finish; a failed job is an error naming why (EFAULT: GPU MMU
        fault, EIO: bad command, ETIMEDOUT: hang reset, ENODEV: device lost). In driver mode
        vm-bind, waiting for a bind or unbind also waits for its cleanup (the BO unpinned,
        what it unmapped released), so the BOs of binds waited for are reclaimable."""
        names = list(args)
        timeout = WAIT_TIMEOUT_S
        if "timeout" in names:
            i = names.index("timeout")
            if i + 2 != len(names):
                raise ShellError("wait: 'timeout' takes one value, at the end")
            timeout = seconds(names[i + 1], "wait: SECONDS", 0, MAX_SECONDS)
            names = names[:i]
        for name in names:
            fv = self._fence(name)
            t0 = runtime.now_ns()
            try:
                self._settle(fv, timeout)
            except KernelError as exc:
                raise ShellError(f"{fv.name}: job failed: {exc}", exc.errno) from None
            if fv.bind_vm is not None:
                self._flush_bind_cleanup(fv)
            self.say(f"{fv.name}: signaled ({(runtime.now_ns() - t0) / 1e6:.1f} ms)")

    def _flush_bind_cleanup(self, fv: FenceVar) -> None:
        """A bind's fence signals when its job ran; its BO stays pinned (and what it unmapped
        referenced) until the VM's cleanup work ran (Panthor's cleanup_op_ctx_work). A script
        that waited for its binds expects their BOs reclaimable, so wait waits for that too."""
        gvm = self.file.vms.get(fv.bind_vm)
        if gvm is not None:
            gvm.flush_cleanup(int(WAIT_TIMEOUT_S * 1e9))

    class ExternalFence(JobFence):
        """A name's reference on an external fence, as on a job's out-fence (the fence's
        sync_file), so wait, after and expect fence take both."""

        __slots__ = ()

        @property
        def message(self) -> str:
            return self.fence.message

    @command(
        "fence",
        2,
        4,
        "X = fence attach BO [read|write] | fence signal X | fence busy BO | "
        "fence wait BO [timeout SECONDS]",
        "External fences, as IGT makes them with vgem: a BO busy without the GPU.",
        binds=True,
        mode="per-bo",
    )
    def cmd_fence(self, st: Statement, op: str, *args: str) -> FenceVar | None:
        """External fences (the driver's fence_attach/fence_signal, vgem's fence ioctls).
        X = fence attach BO [read|write]: a new fence in BO's reservation, a reader (the
        default: writers wait for it) or a writer (everyone waits). It signals with
        'fence signal X', or by itself after 10 s of guest time. Meanwhile 'wait X' and
        'submit ... after X' wait for it, jobs using BO wait for it as their implicit
        dependency, and the shrinker neither evicts nor purges BO.
        fence signal X: signal it (ETIMEDOUT if it had expired; ENOENT the second time).
        fence busy BO: say whether BO has pending fences (jobs' or external ones).
        fence wait BO [timeout SECONDS]: wait until BO is idle (ETIMEDOUT when it is not;
        EBUSY with timeout 0)."""
        from gemu.guest.gemu_drv.uapi import FENCE_WRITE

        usage = f"fence {op}: usage: {self.COMMANDS['fence'].usage}"
        if op == "attach":
            if len(args) not in (1, 2):
                raise ShellError("fence attach: usage: X = fence attach BO [read|write]")
            bo = self._bo(args[0])
            mode = args[1] if len(args) == 2 else "read"
            if mode not in ("read", "write"):
                raise ShellError(f"fence attach: {mode!r} is not read or write")
            fid = self.file.fence_attach(bo.handle, FENCE_WRITE if mode == "write" else 0)
            out = self.ExternalFence(None, None, self.file.ext_fences.fence(fid))
            out.seqno = fid
            with self._count:
                name = self._new_name(st, "x", fid)
                # settled: nothing to wait for at power-off, closing the file signals it
                fv = FenceVar(name, out, f"external {mode} fence on {bo.name}", settled=True)
                old = self.fences.get(name)
                self.fences[name] = fv
            if old is not None:
                self._release_fence(old)
            self.say(f"{name}: external {mode} fence {fid} on {bo.name} (expires in 10 s)")
            return fv
        if op == "signal":
            if len(args) != 1:
                raise ShellError(usage)
            fv = self._fence(args[0])
            if not isinstance(fv.fence, self.ExternalFence):
                raise ShellError(f"fence signal: {fv.name} is a job's fence, not an external one")
            fid = self.file.ext_fences.id_of(fv.fence.fence)
            if fid is None:
                raise ShellError(f"fence signal: {fv.name} was signalled already", errno_mod.ENOENT)
            fv.examined = True
            self.file.fence_signal(fid)
            self.say(f"{fv.name}: signaled")
            return None
        if op == "busy":
            if len(args) != 1:
                raise ShellError(usage)
            bo = self._bo(args[0])
            try:
                self.file.wait_bo(bo.handle, 0)
            except KernelError as exc:
                if exc.errno != errno_mod.EBUSY:
                    raise
                self.say(f"{bo.name}: busy")
            else:
                self.say(f"{bo.name}: idle")
            return None
        if op == "wait":
            if len(args) == 1:
                timeout = WAIT_TIMEOUT_S
            elif len(args) == 3 and args[1] == "timeout":
                timeout = seconds(args[2], "fence wait: SECONDS", 0, MAX_SECONDS)
            else:
                raise ShellError(usage)
            bo = self._bo(args[0])
            t0 = runtime.now_ns()
            self.file.wait_bo(bo.handle, timeout)
            self.say(f"{bo.name}: idle ({(runtime.now_ns() - t0) / 1e6:.1f} ms)")
            return None
        raise ShellError(f"fence: {op!r} is not attach, signal, busy or wait")

    @command(
        "job-timeout",
        1,
        1,
        "job-timeout MILLISECONDS",
        "Set the scheduler's job timeout (a longer job is a hang: GPU reset).",
    )
    def cmd_job_timeout(self, st: Statement, ms: str) -> None:
        """Set the scheduler's job timeout (a job running longer is a hang: GPU reset)."""
        ns = int(seconds(ms, "job-timeout: MILLISECONDS", 0.001, MAX_SECONDS * 1000) * 1e6)
        self.m.driver.timeout_ns = ns
        self.m.driver.sched.timeout = ns
        self.say(f"job timeout {ns // 1_000_000} ms")

    # -- driver mode vm-bind: VMs, bind, unbind, exec --------------------------------------
    @command(
        "driver-mode",
        1,
        1,
        "driver-mode per-bo|vm-bind",
        "Say which driver mode the script needs (gemu run boots that mode).",
    )
    def cmd_driver_mode(self, st: Statement, mode: str) -> None:
        """Say which driver mode the script needs: gemu run boots the machine in the mode its
        scripts name (without --driver-mode). On a machine of another mode the line fails,
        naming both, and the script stops there."""
        if mode not in DRIVER_MODES:
            raise ShellError(
                f"driver-mode: unknown driver mode {mode!r} (known: {_known(DRIVER_MODES)})",
                errno_mod.EINVAL,
            )
        if mode != self.mode:
            raise ShellError(
                f"driver-mode {mode}: this machine runs {self.mode} ({_MODE_HINT[mode]})",
                errno_mod.EOPNOTSUPP,
            )

    def _vm(self, name: str) -> VmVar:
        vm = self.vms.get(name)
        if vm is None:
            raise ShellError(f"no VM named {name!r}" + self._known("VM", self.vms))
        return vm

    def _bo_vm_bind(self, st: Statement, size_text: str, flag: str, vm_name: str) -> BoVar:
        if flag not in ("", "private") or (flag == "private") != bool(vm_name):
            raise ShellError(
                "bo: usage in driver mode vm-bind: bo SIZE [private VM]"
                + (" ('nomap' is for driver mode per-bo)" if flag == "nomap" else "")
            )
        n = size(size_text, "bo: SIZE", MAX_BO_SIZE)
        vm = self._vm(vm_name) if vm_name else None
        h = self.file.bo_create(n, vm_id=vm.vm_id if vm else None, name=st.target)
        name = self._new_name(st, "bo", h)
        self.file.bo(h).label = name  # views of the machine name it as the shell does
        if name in self.bos:
            self.file.close_bo(self.bos[name].handle)
        bo = BoVar(name, h, self.file.bo(h).obj.size, None, zlib.crc32(bytes(n)))
        bo.vm = vm.name if vm else None
        self.bos[name] = bo
        where = f"private to {vm.name}" if vm else "external"
        self.say(f"{name}: handle {h}, {format_size(bo.size)}, {where}")
        return bo

    @command(
        "vm",
        1,
        2,
        "NAME = vm create | vm destroy VM",
        "Create a GPU VM (VM_BIND) or destroy one (its binds and jobs end first).",
        binds=True,
        mode="vm-bind",
    )
    def cmd_vm(self, st: Statement, op: str, name: str = "") -> VmVar | None:
        """NAME = vm create: a new GPU VA space (DRM_IOCTL_PANTHOR_VM_CREATE, a drm_gpuvm with
        its own reservation object). The shell binds its command buffer and a result page at
        the top 16 MiB of the VM; user binds go below. vm destroy VM: waits for the VM's binds
        and jobs, unmaps everything, and drops the VM (its private BOs live on while named)."""
        if op == "create":
            if name:
                raise ShellError("vm create: usage: NAME = vm create")
            return self._vm_create(st)
        if op == "destroy":
            if not name:
                raise ShellError("vm destroy: usage: vm destroy VM")
            vm = self._vm(name)
            with self._count:
                del self.vms[vm.name]
            self._vm_destroy(vm)
            self.say(f"{vm.name}: destroyed")
            return None
        raise ShellError(f"vm: {op!r} is not create or destroy")

    def _vm_create(self, st: Statement) -> VmVar:
        f = self.file
        vm_id = f.vm_create()
        name = self._new_name(st, "vm", vm_id)
        handles: list[int] = []
        ready: list[JobFence] = []
        try:
            handles.append(f.bo_create(CMD_SIZE, vm_id=vm_id, name=f"_{name}-cmd"))
            handles.append(f.bo_create(4096, vm_id=vm_id, name=f"_{name}-out"))
            cmd, out = handles
            ready.append(f.map(vm_id, CMD_VA, CMD_SIZE, cmd, prot=Prot.READ | Prot.EXEC))
            ready.append(f.map(vm_id, OUT_VA, 4096, out, prot=Prot.READ | Prot.WRITE))
        except BaseException:
            f.vm_destroy(vm_id)  # waits for the binds queued so far
            for fence in ready:
                fence.close()
            for h in handles:
                f.close_bo(h)
            raise
        vm = VmVar(name, vm_id, cmd, out, ready)
        with self._count:
            old = self.vms.pop(name, None)
            self.vms[name] = vm
        if old is not None:
            self._vm_destroy(old)
        gvm = f.vms[vm_id]
        self.say(f"{name}: VM {vm_id} ({gvm.name}), VA {VA_START:#x} to {SHELL_VA:#x}")
        return vm

    def _vm_destroy(self, vm: VmVar) -> None:
        self.file.vm_destroy(vm.vm_id)
        for out in vm.ready:
            with contextlib.suppress(KernelError):
                out.close()
        for h in (vm.cmd, vm.out):
            self.file.close_bo(h)

    def _after(self, args: list[str], cmd: str) -> tuple[list[str], list[FenceVar]]:
        """Split ``... after F1 F2`` off a command's arguments."""
        if "after" not in args:
            return args, []
        i = args.index("after")
        after = [self._fence(n) for n in args[i + 1 :]]
        if not after:
            raise ShellError(f"{cmd}: 'after' needs fence names")
        return args[:i], after

    def _user_va(self, text: str, what: str, length: int = 1) -> int:
        va = number(text, what, 0, GPU_VA_LIMIT - 1)
        if va + length > SHELL_VA:
            raise ShellError(
                f"{what} {text}: {va:#x}+{length:#x} reaches the shell's command buffer at "
                f"{SHELL_VA:#x} (bind below it)",
                errno_mod.EINVAL,
            )
        return va

    def _bind_fence(
        self, st: Statement, prefix: str, fence: JobFence, what: str, writes=(), moved: int = 0
    ) -> FenceVar:
        """Name a new out-fence (a bind's, an unbind's or an exec's) as submit does."""
        with self._count:
            self._jobs += 1
            self.bytes_moved += moved
            name = self._new_name(st, prefix, self._jobs)
            fv = FenceVar(name, fence, what, list(writes))
            old = self.fences.get(name)
            self.fences[name] = fv
            self._job_fences.append((name, fence.seqno, fence.fence))
        if old is not None:
            self._release_fence(old)
        self._context().last_fence = fv
        return fv

    @command(
        "bind",
        3,
        None,
        "[NAME =] bind VM VA BO [OFFSET [SIZE]] [ro] [after FENCE...]",
        "VM_BIND map: SIZE bytes of BO from OFFSET at VA of VM, asynchronously (NAME: its "
        "out-fence).",
        binds=True,
        mode="vm-bind",
    )
    def cmd_bind(self, st: Statement, vm_name: str, va_text: str, bo_name: str, *rest: str):
        """Map SIZE bytes of BO, from OFFSET (default: 0 and the rest of the BO), at VA of VM
        (DRM_IOCTL_PANTHOR_VM_BIND, asynchronous: a job on the VM's bind queue; NAME is its
        out-fence). Any page-aligned range of the BO at any page-aligned VA: a BO can be
        bound in pieces, several times, and in several VMs (an external BO). What the range
        overlaps is unmapped first (drm_gpuvm_sm_map: the old mappings are split). ro: the
        GPU may only read it. after F...: the bind waits for those fences (in-fences); binds of
        one VM run in order. Exec jobs do not wait for binds by themselves: give them the
        bind's fence (exec ... after NAME)."""
        args, after = self._after(list(rest), "bind")
        prot = None
        if "ro" in args:
            args.remove("ro")
            prot = Prot.READ
        if len(args) > 2:
            raise ShellError(f"bind: usage: {self.COMMANDS['bind'].usage}")
        vm, bo = self._vm(vm_name), self._bo(bo_name)
        if bo.vm is not None and bo.vm != vm.name:
            raise ShellError(
                f"bind: {bo.name} is private to {bo.vm}, not {vm.name} (an external BO, "
                "made without 'private', can be bound in any VM)",
                errno_mod.EINVAL,
            )
        offset = number(args[0], "bind: OFFSET", 0, bo.size - 1) if args else 0
        n = size(args[1], "bind: SIZE", bo.size - offset) if len(args) == 2 else bo.size - offset
        va = self._user_va(va_text, "bind: VA", n)
        fence = self.file.map(
            vm.vm_id,
            va,
            n,
            bo.handle,
            offset,
            prot,
            in_fences=[f.fence for f in after],
        )
        with self._count:
            vm.bound.setdefault(bo.name, []).append((va, n))
        what = f"bind {bo.name}+{offset:#x} ({format_size(n)}) at {vm.name}:{va:#x}"
        fv = self._bind_fence(st, "b", fence, what + (" read-only" if prot else ""))
        fv.bind_vm = vm.vm_id
        self.say(f"{fv.name}: {what} queued")
        return fv

    @command(
        "unbind",
        3,
        None,
        "[NAME =] unbind VM VA SIZE [after FENCE...]",
        "VM_BIND unmap: SIZE bytes at VA of VM, any part of any mappings (NAME: its out-fence).",
        binds=True,
        mode="vm-bind",
    )
    def cmd_unbind(self, st: Statement, vm_name: str, va_text: str, size_text: str, *rest: str):
        """Unmap SIZE bytes at VA of VM (asynchronous, on the VM's bind queue; NAME is its
        out-fence): any page-aligned range, cutting mappings it covers in part
        (drm_gpuvm_sm_unmap: the parts outside the range stay mapped). after F...: wait for
        those fences first, e.g. the jobs still using the range."""
        args, after = self._after(list(rest), "unbind")
        if args:
            raise ShellError(f"unbind: usage: {self.COMMANDS['unbind'].usage}")
        vm = self._vm(vm_name)
        n = size(size_text, "unbind: SIZE", GPU_VA_LIMIT)
        va = self._user_va(va_text, "unbind: VA", n)
        fence = self.file.unmap(vm.vm_id, va, n, in_fences=[f.fence for f in after])
        what = f"unbind {vm.name}:{va:#x} ({format_size(n)})"
        fv = self._bind_fence(st, "u", fence, what)
        fv.bind_vm = vm.vm_id
        self.say(f"{fv.name}: {what} queued")
        return fv

    @command(
        "exec",
        2,
        None,
        "[NAME =] exec VM KIND ARGS... [after FENCE...]",
        "Run a GPU job on VM, addresses in VM's VA space (see help exec); NAME: its out-fence.",
        binds=True,
        mode="vm-bind",
    )
    def cmd_exec(self, st: Statement, vm_name: str, kind: str, *rest: str) -> FenceVar:
        """Run a GPU job on VM: its packets go into the VM's command buffer and the job names
        only the VM (DRM_IOCTL_PANTHOR_GROUP_SUBMIT): the submit locks the VM and every
        external BO bound in it, brings back what reclaim evicted (drm_gpuvm_validate), and
        publishes the job's fence on all of it. Addresses are GPU VAs of VM; a VA nothing is
        bound at faults (EFAULT). after F...: wait for those fences first (the binds the job
        needs). An exec that writes forgets what the BOs bound in VM should hold (verify skips
        them; check them with expect crc VM ... or expect cpucrc)."""
        args, after = self._after(list(rest), "exec")
        vm = self._vm(vm_name)
        packets, what, moved, written = self._build_exec(kind, args)
        fence = self._exec(vm, lambda slot: packets, [f.fence for f in after])
        forget = []
        if written is not None:
            lo, hi = written
            with self._count:
                hit = [n for n, rs in vm.bound.items() if any(a < hi and lo < a + r for a, r in rs)]
            forget = [(self.bos[n], None) for n in hit if n in self.bos]
        fv = self._bind_fence(st, "e", fence, f"{what} on {vm.name}", forget, moved)
        for bo, _ in forget:
            bo.expected = None
        self.say(f"{fv.name}: job {fence.seqno} submitted ({what} on {vm.name})")
        return fv

    def _build_exec(
        self, kind: str, args: list[str]
    ) -> tuple[bytes, str, int, tuple[int, int] | None]:
        """The packets of an exec job, what it does, the bytes it moves, and the VA range it
        writes (None: none)."""
        usage = EXEC_KINDS.get(kind)
        if usage is None:
            raise ShellError(f"exec: unknown job kind {kind!r} ({_known(EXEC_KINDS)})")
        if len(args) != len(usage[0].split()):
            raise ShellError(f"exec {kind}: usage: exec VM {kind} {usage[0]}".rstrip())

        def va(i: int, what: str) -> int:
            return number(args[i], f"exec {kind}: {what}", 0, GPU_VA_LIMIT - 1)

        def nbytes(i: int) -> int:
            return size(args[i], f"exec {kind}: SIZE", MAX_BO_SIZE)

        if kind == "nop":
            return pk.nop(), "nop", 0, None
        if kind == "copy":
            src, dst, n = va(0, "SRC"), va(1, "DST"), nbytes(2)
            what = f"copy {format_size(n)} {src:#x} -> {dst:#x}"
            return pk.copy(src, dst, n), what, n, (dst, dst + n)
        if kind == "fill":
            dst, n = va(0, "DST"), nbytes(1)
            value = number(args[2], "exec fill: VALUE", 0, U32_MAX)
            return pk.fill(dst, n, value), f"fill {format_size(n)} at {dst:#x}", n, (dst, dst + n)
        if kind == "crc":
            src, n, dst = va(0, "SRC"), nbytes(1), va(2, "DST")
            what = f"crc32 of {src:#x}+{n:#x} into {dst:#x}"
            return pk.crc32(src, n, dst), what, n, (dst, dst + 4)
        if kind == "atomic":
            dst, add = va(0, "DST"), number(args[1], "exec atomic: ADD", 0, U64_MAX)
            return pk.atomic_add(dst, add), f"atomic add {add} at {dst:#x}", 8, (dst, dst + 8)
        addr, value = va(0, "ADDR"), number(args[1], "exec waitmem: VALUE", 0, U32_MAX)
        return (
            pk.wait_mem(addr, value, function=WaitFunc.EQ),
            f"wait until {addr:#x} == {value:#x}",
            0,
            None,
        )

    def _exec(self, vm: VmVar, packets_for: Callable[[int], bytes], after: list) -> JobFence:
        """Write a job's packets into a free slot of the VM's command buffer and exec it; a
        slot is free once the job last run from it ended (waited for at most
        :data:`WAIT_TIMEOUT_S`)."""
        with self._count:
            slot = vm.next_slot
            vm.next_slot = (slot + 1) % CMD_SLOTS
            prev = vm.slots[slot]
        if prev is not None and not prev.closed and not prev.signaled:
            try:
                self.file.wait(prev, WAIT_TIMEOUT_S)
            except KernelError as exc:
                if exc.errno == errno_mod.ETIMEDOUT and not prev.signaled:
                    raise ShellError(
                        f"exec: {vm.name}'s command buffer is full ({CMD_SLOTS} jobs running)",
                        errno_mod.EBUSY,
                    ) from None
        packets = packets_for(slot)
        self.file.write(vm.cmd, slot * CMD_SLOT, packets)
        fence = self.file.exec(
            vm.vm_id, CMD_VA + slot * CMD_SLOT, len(packets), in_fences=[*vm.ready, *after]
        )
        vm.slots[slot] = fence
        return fence

    def _vm_gpu_crc(self, vm: VmVar, va: int, n: int) -> int:
        """The GPU's CRC32 of ``n`` bytes at ``va`` of the VM (a job from the VM's command
        buffer writing into the VM's result page)."""
        slot_of: list[int] = []

        def packets(slot: int) -> bytes:
            slot_of.append(slot)
            return pk.crc32(va, n, OUT_VA + 4 * slot)

        fence = self._exec(vm, packets, [])
        try:
            self.file.wait(fence, WAIT_TIMEOUT_S)
        except KernelError as exc:
            if fence.signaled:  # the shell's own job failed: a GPU fault
                with self._count:
                    self.sum.unexpected_faults.append(
                        f"CRC32 job of {vm.name}:{va:#x}+{n:#x}: {exc}"
                    )
            raise
        finally:
            if fence.signaled:  # else its slot must not be reused: the file closes it
                fence.close()
        self.bytes_moved += n
        return int.from_bytes(self.file.read(vm.out, 4 * slot_of[0], 4), "little")

    def _bo_range(self, text: str, n_text: str | None, what: str) -> tuple[BoVar, int, int]:
        """``BO[+OFFSET]`` and a SIZE (default: to the end of the BO)."""
        base, _, off = text.partition("+")
        bo = self._bo(base)
        offset = number(off, f"{what}: OFFSET", 0, bo.size - 1) if off else 0
        n = size(n_text, f"{what}: SIZE", bo.size - offset) if n_text else bo.size - offset
        return bo, offset, n

    def _cpu_crc(self, bo: BoVar, offset: int, n: int) -> int:
        crc = 0
        for pos in range(offset, offset + n, 1 << 20):  # bounded reads: 1 MiB at a time
            crc = zlib.crc32(self.file.read(bo.handle, pos, min(1 << 20, offset + n - pos)), crc)
        return crc

    # -- memory ------------------------------------------------------------------------------
    @command(
        "pressure",
        1,
        1,
        "pressure SIZE",
        "Run direct reclaim for SIZE bytes, as an allocation under pressure would.",
    )
    def cmd_pressure(self, st: Statement, amount: str) -> None:
        """Run direct reclaim for SIZE bytes, as an allocation under memory pressure would:
        the shrinker purges DONTNEED BOs, then evicts idle BOs to swap."""
        pages = max(1, size(amount, "pressure: SIZE", GPU_VA_LIMIT) // 4096)
        self._reclaim(lambda: self.m.reclaim(pages))

    @command(
        "drop-caches",
        0,
        0,
        "drop-caches",
        "Reclaim everything reclaimable: idle BOs purged or evicted to swap.",
    )
    def cmd_drop_caches(self, st: Statement) -> None:
        """Reclaim everything reclaimable: every idle BO purged (DONTNEED) or evicted to
        swap while swap has room, as ``echo 2 > /proc/sys/vm/drop_caches`` runs the
        shrinkers until they free nothing more."""
        self._reclaim(self.m.allocator.drop_slab)

    def _reclaim(self, run: Callable[[], object]) -> None:
        def counts() -> tuple[int, int]:
            s = self.m.statistics().get("shrinker") or {}
            return s.get("purged", 0), s.get("evicted", 0)

        a = self.m.allocator
        (purged, evicted), free = counts(), a.nr_free
        run()
        (purged2, evicted2), free2 = counts(), a.nr_free
        self.say(
            f"reclaim: {purged2 - purged} purged, {evicted2 - evicted} evicted, "
            f"{free2 - free} pages freed ({free2} free)"
        )

    # -- values ------------------------------------------------------------------------------
    @command("set", 2, 2, "set NAME VALUE", "Set a value that later lines use as $NAME or ${NAME}.")
    def cmd_set(self, st: Statement, name: str, value: str) -> None:
        """Set a value that later lines use as $NAME or ${NAME}."""
        from gemu.host.jobscript import NAME_RE

        if not NAME_RE.match(name):
            raise ShellError(f"set: {name!r} is not a name")
        self.values[name] = value

    @command("echo", 0, None, "echo TEXT...", "Print a line (progress and labels in job scripts).")
    def cmd_echo(self, st: Statement, *words: str) -> None:
        """Print a line (job scripts use it to label their output and show progress)."""
        self.progress(" ".join(words))

    # -- inspection --------------------------------------------------------------------------
    @command("info", 1, 1, f"info {'|'.join(INFO_VIEWS)}", "Show a view of kernel state.")
    def cmd_info(self, st: Statement, what: str) -> None:
        """Show kernel state, as QEMU's ``info`` shows the machine's."""
        if what not in INFO_VIEWS:
            raise ShellError(f"info: unknown view {what!r} ({_known(INFO_VIEWS)})")
        getattr(self, f"_info_{what}")()

    def _info_tasks(self) -> None:
        views = query.tasks(self.m, self)
        if not views:
            self.say("no tasks")
        for t in views:
            state = f"failed at {t['failed_at']}" if t["state"] == "failed" else t["state"]
            joined = ", joined" if t["joined"] else ""
            self.say(f"{t['name']:<12} started at {t['where']}: {state}{joined}")

    def user_bos(self) -> list[BoVar]:
        """The BOs the user created (not the shell's own scratch BO)."""
        return [bo for bo in list(self.bos.values()) if not bo.name.startswith("_")]

    def _obj_state(self, obj) -> str:
        return query.obj_state(obj)

    def _info_objects(self) -> None:
        q = query.objects(self.m, self)
        if self.mode == "vm-bind":  # a BO is bound at any number of VAs: see info vms
            self.say(
                f"{'name':<12} {'handle':>6} {'size':>9} {'state':<9} reclaim state         VM"
            )
            for o in q["objects"]:
                self.say(
                    f"{o['name']:<12} {o['handle']:>6} {format_size(o['size']):>9} "
                    f"{o['state']:<9} {o['reclaim_state']:<21} {o['private_vm'] or 'external'}"
                )
            self.say(f"{q['gem_objects']} GEM objects (the driver's own included)")
            return
        self.say(f"{'name':<12} {'handle':>6} {'size':>9} {'state':<9} use pin madv  GPU VA")
        for o in q["objects"]:
            va = f"{o['va']:#x}" if o["va"] is not None else "-"
            self.say(
                f"{o['name']:<12} {o['handle']:>6} {format_size(o['size']):>9} "
                f"{o['state']:<9} {o['pages_use_count']:>3} {o['pages_pin_count']:>3} "
                f"{o['madv']:>4}  {va}"
            )
        self.say(f"{q['gem_objects']} GEM objects (the driver's own included)")

    def _info_shrinker(self) -> None:
        s = query.shrinker(self.m, self)
        if s is None:
            self.say("no shrinker")
            return
        if "lru_unused_pages" in s:  # the VM_BIND flavour's per-VM shrinker
            self.say(
                f"LRU pages: unused {s['lru_unused_pages']}, mapped in one VM "
                f"{s['lru_private_pages']}, shared {s['lru_shared_pages']}"
            )
            for k in ("scans", "evicted", "last_scan"):
                self.say(f"  {k:<16} {s[k]}")
            self.say(
                f"  skipped: busy {s['skipped_busy']}, contended {s['contended']}, "
                f"harder to reclaim {s['harder']} (see info reclaim)"
            )
            return
        self.say(
            f"LRU pages: evictable {s['lru_evictable_pages']}, evicted "
            f"{s['lru_evicted_pages']}, pinned {s['lru_pinned_pages']}"
        )
        for k in ("scans", "purged", "evicted", "swapped_in"):
            self.say(f"  {k:<16} {s[k]}")
        skipped = {k: v for k, v in s.items() if k.startswith("skipped") or k == "evict_errors"}
        self.say("  " + ", ".join(f"{k} {v}" for k, v in skipped.items()))

    def _info_swap(self) -> None:
        s = query.swap(self.m, self)
        if s is None:
            self.say("no swap")
            return
        self.say(f"swap: {s['used_pages']} of {s['total_pages']} pages used")
        self.say(
            f"  pswpout {s['pswpout']}, pswpin {s['pswpin']}, errors "
            f"{s['write_errors']}/{s['read_errors']}, high water {s['high_water']}"
        )
        self.say(f"  page copy {s['page_copy']}")

    def _info_mem(self) -> None:
        s = query.mem(self.m, self)
        wm = s["watermarks"]
        self.say(
            f"mem: {s['free_pages']} of {s['total_pages']} pages free, "
            f"watermarks {wm['min']}/{wm['low']}/{wm['high']}, high water {s['high_water']}"
        )
        self.say(
            f"  direct reclaim {s['direct_reclaims']} passes ({s['direct_reclaimed']} pages), "
            f"kswapd {s['kswapd_runs']} runs ({s['kswapd_reclaimed']} pages), "
            f"waits for another reclaim {s['reclaim_waits']}, failures {s['failures']}"
        )

    def _info_mmu(self) -> None:
        q = query.mmu(self.m, self)
        for a in q["address_spaces"]:
            self.say(
                f"AS{a['slot']}: {a['vm']} ({a['jobs']} jobs), root table {a['root_table']:#x}"
            )
        self.say(f"{q['vm'] or 'no VM'}: {q['mapped_pages']} pages mapped")
        for mp in q["mappings"]:
            pa = mp["first_page_pa"]
            where = f"pa {pa:#x}" if pa is not None else "not mapped"
            vm = f"{mp['vm']}:" if "vm" in mp else ""
            self.say(
                f"  {vm}{mp['va']:#014x} {mp['name']:<12} {format_size(mp['size']):>9}  "
                f"first page {where}"
            )
        self.say("  " + ", ".join(f"{k} {v}" for k, v in q["stats"].items()))

    def _info_vms(self) -> None:
        views = query.vms(self.m, self)
        if self.mode != "vm-bind":
            self.say("no VMs: driver mode per-bo has one GPU VM per file (see info mmu)")
            return
        if not views:
            self.say("no VMs (NAME = vm create)")
        for v in views:
            order = v["reclaim_order"]
            place = f"reclaimed #{order + 1}" if order is not None else "nothing private to reclaim"
            self.say(
                f"{v['name']}: VM {v['id']} ({v['vm']}), {v['mapped_pages']} pages mapped, {place}"
            )
            for mp in v["mappings"]:
                state = " evicted" if mp["evicted"] else ""
                self.say(
                    f"  {mp['va']:#014x} {format_size(mp['size']):>9} {mp['bo']}+{mp['offset']:#x}"
                    f" {mp['prot']}{state}"
                )
            for vb in v["vm_bos"]:
                kind = "external" if vb["external"] else "private"
                state = ", evicted" if vb["evicted"] else ""
                self.say(f"  vm_bo {vb['bo']}: {kind}, {vb['mappings']} mappings{state}")
            self.say(f"  evict list: {', '.join(v['evict']) or '-'}")
            self.say(f"  extobj list: {', '.join(v['extobj']) or '-'}")
            self.say(f"  LRU of BOs mapped only here: {', '.join(v['private_lru']) or '-'}")

    def _info_reclaim(self) -> None:
        r = query.reclaim(self.m, self)
        if r is None:
            self.say("no VM_BIND reclaim: driver mode per-bo (see info shrinker)")
            return
        st = r["stats"]
        self.say(
            f"reclaim: {st['scans']} scans, {st['evicted']} evicted, last scan {st['last_scan']} "
            f"pages; skipped busy {st['skipped_busy']}, contended {st['contended']}, "
            f"harder {st['harder']}"
        )
        self.say(f"  unused LRU: {', '.join(r['unused']) or '-'}")
        for v in r["vms"]:
            self.say(f"  {v['vm']} LRU ({v['pages']} pages): {', '.join(v['lru']) or '-'}")
        self.say(f"  shared LRU: {', '.join(r['gpu_mapped_shared']) or '-'}")
        for b in r["bos"]:
            private = f", private to {b['private_vm']}" if b["private_vm"] else ""
            self.say(
                f"  {b['name']:<16} {format_size(b['size']):>9} {b['state']:<9} "
                f"{b['reclaim_state']:<21} evicted {b['reclaimed_count']}x{private}"
            )

    def _info_ring(self) -> None:
        r = query.ring(self.m, self)
        self.say(
            f"ring: {r['size'] >> 10} KiB at {r['base']:#x}, {r['slots']} slots, "
            f"tail {r['tail']:#x}, {r['pending']} jobs on the ring, "
            f"completed seqno {r['completed_seqno']}"
        )
        self.say(
            f"  jobs {r['jobs_emitted']}, doorbells {r['doorbells']}, irqs {r['irqs']}, "
            f"faults {r['mmu_faults']}, cp errors {r['cp_errors']}, resets {r['resets']}"
        )

    def _info_fences(self) -> None:
        for f in query.fences(self.m, self):
            state = f"failed {f['error']}" if f["state"] == "failed" else f["state"]
            self.say(f"{f['name']:<8} job {f['seqno']:<5} {state:<16} {f['what']}")

    def _info_lockdep(self) -> None:
        reports = query.lockdep_reports(self.m, self)
        if not reports:
            self.say("lockdep: no reports")
        for r in reports:
            self.say(f"lockdep {r['kind']} (x{r['count']}): {r['message']}")

    def _info_stats(self) -> None:
        def walk(prefix: str, d: dict) -> None:
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(f"{prefix}{k}.", v)
                else:
                    self.say(f"{prefix}{k} = {v}")

        walk("", query.stats(self.m, self))

    @command(
        "events",
        1,
        2,
        "events on|off|clear|show [N]",
        "Record guest tracepoints and show the last N (the event log).",
    )
    def cmd_events(self, st: Statement, what: str, n: str = "40") -> None:
        """Record guest tracepoints (jobs, evictions, swap-ins, shrinker scans, reclaim,
        lock contention) and show the last N: the event log of the run."""
        if what == "on":
            if not self._events_on:
                trace.subscribe(self._record)
                self._events_on = True
        elif what == "off":
            if self._events_on:
                trace.unsubscribe(self._record)
                self._events_on = False
        elif what == "clear":
            self.events.clear()
        elif what == "show":
            count = number(n, "events: N", 0, MAX_EVENTS)
            evs = list(self.events)[-count:] if count else []
            t0 = evs[0].ts_ns if evs else 0
            names = self._object_names()
            for e in evs:
                args = " ".join(
                    f"{k}={names.get(v, v) if k == 'obj' else v}" for k, v in e.args.items()
                )
                span = {"b": "begin ", "e": "end ", "i": "", "C": "counter "}.get(e.phase, "")
                ident = f" #{e.id}" if e.id is not None and "obj" not in e.args else ""
                self.say(
                    f"{(e.ts_ns - t0) / 1e3:>10.1f} us  {e.task:<14} {e.category}.{e.name}"
                    f"{ident} {span}{args}".rstrip()
                )
        else:
            raise ShellError(f"events: {what!r} is not on, off, clear or show")

    def _object_names(self) -> dict[str, str]:
        """Kernel object labels (as tracepoints print them) -> the shell's BO names."""
        out = {}
        for bo in list(self.bos.values()):
            with contextlib.suppress(KernelError):
                out[self.file.bo(bo.handle).obj.resv.lock.name] = bo.name
        return out

    def _record(self, event) -> None:
        self.events.append(event)

    # -- expectations ------------------------------------------------------------------------
    @command(
        "expect",
        1,
        None,
        "expect WHAT ... (see help expect)",
        "Check something; a failure fails the run naming file:line (see help expect).",
    )
    def cmd_expect(self, st: Statement, what: str, *args: str) -> None:
        """Check something; a failure fails the run naming file:line. OP is one of
        == != < <= > >=."""
        if what not in EXPECT_FORMS:
            raise ShellError(f"expect: unknown check {what!r} ({_known(EXPECT_FORMS)})")
        getattr(self, f"_expect_{what}")(*args)
        self.sum.checks_passed += 1

    def _cmp(self, what: str, got, op: str, want) -> None:
        fn = _OPS.get(op)
        if fn is None:
            raise ShellError(f"expect {what}: {op!r} is not one of {' '.join(_OPS)}")
        if not fn(got, want):
            g = f"{got:#x}" if isinstance(got, int) and got > 9 else str(got)
            w = f"{want:#x}" if isinstance(want, int) and want > 9 else str(want)
            raise ExpectationFailed(f"expect {what}: got {g}, expected {op} {w}")

    def _gpu_crc(self, bo: BoVar) -> int:
        out = self._scratch()
        fence = self.file.submit(
            pk.crc32(self._va(bo), bo.size, self.bos["_crc"].va),
            bos=[(bo.handle, READ), (out, WRITE)],
        )
        try:
            self.file.wait(fence, WAIT_TIMEOUT_S)
        except KernelError as exc:
            if fence.signaled:  # the shell's own job on a valid BO failed: a GPU fault
                with self._count:
                    self.sum.unexpected_faults.append(f"CRC32 job of {bo.name}: {exc}")
            raise
        finally:
            fence.close()
        self.bytes_moved += bo.size
        return int.from_bytes(self.file.read(out, 0, 4), "little")

    def _scratch(self) -> int:
        if "_crc" not in self.bos:
            h = self.file.create_bo(4096, name="_crc")
            self.bos["_crc"] = BoVar("_crc", h, 4096, self.file.vm_bind(h), None)
        return self.bos["_crc"].handle

    def _expect_crc(self, *args: str) -> None:
        if self.mode == "vm-bind":
            self._crc_check_vm(*args)
            return
        if len(args) != 3:
            raise ShellError("expect crc: usage: expect crc BO == VALUE|BO2")
        bo = self._bo(args[0])
        got = self._gpu_crc(bo)
        if args[2] in self.bos:
            want = self._gpu_crc(self._bo(args[2]))
        else:
            want = number(args[2], "expect crc: VALUE", 0, U32_MAX)
        self._cmp(f"crc {bo.name}", got, args[1], want)

    def _crc_check_vm(self, *args: str) -> None:
        """vm-bind mode: the GPU reads through a VM, so the range is named by VM and VA."""
        if len(args) != 5:
            raise ShellError(
                "expect crc: usage in driver mode vm-bind: expect crc VM VA SIZE OP "
                "VALUE|BO[+OFF] (the GPU reads through a VM)"
            )
        vm = self._vm(args[0])
        va = number(args[1], "expect crc: VA", 0, GPU_VA_LIMIT - 1)
        n = size(args[2], "expect crc: SIZE", MAX_BO_SIZE)
        if args[4].partition("+")[0] in self.bos:
            bo, off, _ = self._bo_range(args[4], None, "expect crc")
            if off + n > bo.size:
                raise ShellError(f"expect crc: {args[4]} has no {n} bytes from {off:#x}")
            want = self._cpu_crc(bo, off, n)
        else:
            want = number(args[4], "expect crc: VALUE", 0, U32_MAX)
        got = self._vm_gpu_crc(vm, va, n)
        self._cmp(f"crc {vm.name}:{va:#x}+{n:#x}", got, args[3], want)

    def _expect_cpucrc(self, *args: str) -> None:
        if len(args) != 4:
            raise ShellError(
                "expect cpucrc: usage: expect cpucrc BO[+OFF] SIZE OP VALUE|BO2[+OFF2]"
            )
        bo, off, n = self._bo_range(args[0], args[1], "expect cpucrc")
        if args[3].partition("+")[0] in self.bos:
            other, off2, _ = self._bo_range(args[3], None, "expect cpucrc")
            if off2 + n > other.size:
                raise ShellError(f"expect cpucrc: {args[3]} has no {n} bytes from {off2:#x}")
            want = self._cpu_crc(other, off2, n)
        else:
            want = number(args[3], "expect cpucrc: VALUE", 0, U32_MAX)
        self._cmp(f"cpucrc {args[0]} {args[1]}", self._cpu_crc(bo, off, n), args[2], want)

    def _expect_value(self, *args: str) -> None:
        if len(args) != 3:
            raise ShellError("expect value: usage: expect value BO[+OFF] OP VALUE")
        bo, off = self._bo_off(args[0], "expect value")
        want = number(args[2], "expect value: VALUE", 0, U32_MAX)
        got = int.from_bytes(self.file.read(bo.handle, off, 4), "little")
        self._cmp(f"value {args[0]}", got, args[1], want)

    def _last_fence(self) -> FenceVar:
        """The current program's (main or task block's) latest job."""
        fv = self._context().last_fence
        if fv is None:
            raise ShellError("expect: no job submitted yet")
        return fv

    def _expect_fence(self, *args: str) -> None:
        if len(args) not in (2, 3):
            raise ShellError("expect fence: usage: expect fence F signaled|pending|failed [ERRNO]")
        fv = self._fence(args[0])
        state = args[1]
        if state == "pending":
            if fv.fence.signaled:
                raise ExpectationFailed(f"expect fence {fv.name}: it is signaled, not pending")
            return
        if state not in ("signaled", "failed"):
            raise ShellError(f"expect fence: {state!r} is not signaled, pending or failed")
        with_err = self._wait_quiet(fv)
        fv.examined = True
        err = fv.fence.error
        if state == "signaled" and err:
            raise ExpectationFailed(
                f"expect fence {fv.name} signaled: it failed with {query.errno_name(err)}: "
                f"{fv.fence.message}"
            )
        if state == "failed":
            if not err:
                raise ExpectationFailed(f"expect fence {fv.name} failed: it succeeded")
            if len(args) == 3 and query.errno_name(err) != args[2].upper():
                raise ExpectationFailed(
                    f"expect fence {fv.name} failed {args[2]}: failed with "
                    f"{query.errno_name(err)} ({fv.fence.message})"
                )
        del with_err

    def _wait_quiet(self, fv: FenceVar) -> bool:
        try:
            self._settle(fv)
        except KernelError as exc:
            if not fv.fence.signaled:
                raise ExpectationFailed(f"fence {fv.name} did not signal: {exc}") from None
            return True
        return False

    def _expect_fault(self, *args: str) -> None:
        if len(args) > 1:
            raise ShellError("expect fault: usage: expect fault [FENCE]")
        fv = self._fence(args[0]) if args else self._last_fence()
        self._wait_quiet(fv)
        fv.examined = True
        err = fv.fence.error
        if err != -errno_mod.EFAULT:
            got = query.errno_name(err) if err else "no error"
            raise ExpectationFailed(f"expect fault {fv.name}: the job ended with {got}")
        self.say(f"{fv.name}: {fv.fence.message}")

    def _expect_error(self, *args: str) -> None:
        if len(args) != 1:
            raise ShellError("expect error: usage: expect error ERRNO (e.g. ENOMEM)")
        want = args[0].upper()
        if want not in errno_mod.__dict__:
            raise ShellError(f"expect error: {args[0]!r} is not an errno name")
        err = self.last_error
        self.last_error = None
        if err is None:
            raise ExpectationFailed(f"expect error {want}: the previous command succeeded")
        got = query.errno_name(err.errno) if err.errno else "a non-kernel error"
        if got != want and abs(err.errno) != getattr(errno_mod, want):  # aliases: ENOTSUP
            raise ExpectationFailed(f"expect error {want}: it failed with {got}: {err}")
        for fv in list(self.fences.values()):
            if f"{fv.name}: job failed" in str(err):
                fv.examined = True

    def _expect_state(self, *args: str) -> None:
        if len(args) != 2:
            raise ShellError("expect state: usage: expect state BO resident|evicted|purged|pinned")
        bo = self._bo(args[0])
        got = self._obj_state(self.file.bo(bo.handle).obj)
        if args[1] not in ("resident", "evicted", "purged", "pinned", "no-pages"):
            raise ShellError(f"expect state: {args[1]!r} is not a BO state")
        if got != args[1]:
            raise ExpectationFailed(f"expect state {bo.name}: it is {got}, not {args[1]}")

    def _stat(self, name: str):
        node = self.m.statistics()
        for part in name.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ShellError(f"expect stat: no counter {name!r} (see 'info stats')")
            node = node[part]
        return node

    def _expect_stat(self, *args: str) -> None:
        if len(args) != 3:
            raise ShellError("expect stat: usage: expect stat NAME OP VALUE")
        want = number(args[2], "expect stat: VALUE", 0, U64_MAX)
        self._cmp(f"stat {args[0]}", self._stat(args[0]), args[1], want)

    def _expect_event(self, *args: str) -> None:
        if len(args) not in (1, 3):
            raise ShellError("expect event: usage: expect event CATEGORY.NAME [OP COUNT]")
        if not self._events_on and not self.events:
            raise ShellError("expect event: no events recorded (use 'events on' first)")
        cat, _, name = args[0].partition(".")
        n = sum(1 for e in self.events if e.category == cat and (not name or e.name == name))
        if len(args) == 3:
            op, want = args[1], number(args[2], "expect event: COUNT", 0, U64_MAX)
        else:
            op, want = ">", 0
        self._cmp(f"event {args[0]} count", n, op, want)

    def _expect_lockdep(self, *args: str) -> None:
        if len(args) != 1:
            raise ShellError("expect lockdep: usage: expect lockdep N")
        n = len(lockdep.reports()) - self.lockdep_base
        self._cmp("lockdep reports", n, "==", number(args[0], "expect lockdep: N", 0, U32_MAX))
        self.expected_lockdep = n

    def _expect_lost(self, *args: str) -> None:
        if not args:
            raise ShellError("expect lost: usage: expect lost BO...")
        for a in args:
            self.expected_lost.add(self._bo(a).name)

    # -- session -----------------------------------------------------------------------------
    @command("help", 0, 1, "help [COMMAND]", "List the commands, or explain one.")
    def cmd_help(self, st: Statement, name: str = "") -> None:
        """List the commands (usage and summary, from the command table), or explain one:
        its usage, summary and description, and for info, submit and expect their table of
        views, job kinds or checks."""
        if not name:
            for _name, spec in sorted(_TABLE.items()):
                mode = f"  [driver mode {spec.mode}]" if spec.mode else ""
                self.say(f"  {spec.arity.usage}{mode}\n      {spec.summary}")
            self.say("'help COMMAND' explains one; NAME = binds a result; # starts a comment.")
            return
        spec = _TABLE.get(name)
        if spec is None:
            raise ShellError(f"help: no command {name!r} (try 'help')")
        self.say(f"usage: {spec.arity.usage}")
        if spec.mode:
            self.say(f"(driver mode {spec.mode} only; this machine runs {self.mode})")
        self.say(_plain(getattr(Shell, spec.method)._help) or spec.summary)
        if name == "info":
            self.say("VIEW is one of:")
            for view, what in INFO_VIEWS.items():
                self.say(f"  {view:<10} {what}")
        elif name in ("submit", "exec"):
            self.say("KIND is one of:")
            for kind, (args, what) in (JOB_KINDS if name == "submit" else EXEC_KINDS).items():
                self.say(f"  {f'{kind} {args}'.strip():<24} {what}")
        elif name == "expect":
            self.say("WHAT is one of:")
            forms = {
                f"expect {form} {args}".strip(): what for form, (args, what) in EXPECT_FORMS.items()
            }
            width = max(map(len, forms))
            for usage, what in forms.items():
                self.say(f"  {usage:<{width}}  {what}")

    @command("include", 1, 1, "include FILE", "Run the lines of another job script.")
    def cmd_include(self, st: Statement, path: str) -> None:
        """Run the lines of a job script (relative paths: the including script's folder)."""
        base = Path(st.file).parent if st.file not in ("<console>", "<text>") else self.base
        p = Path(path) if Path(path).is_absolute() else base / path
        statements = parse_file(p, commands=self.COMMANDS)
        if not self.run_statements(statements):
            raise _Reported(f"include {path}: stopped at the first failure")

    @command(
        "task",
        1,
        1,
        "task NAME ... end",
        "Run the lines up to end in a concurrent guest task NAME.",
    )
    def cmd_task(self, st: Statement, name: str) -> None:
        """Run the lines up to ``end`` in a concurrent guest task NAME; go on at once.

        The block shares the script's names (BOs, fences, values) and its GPU file, like
        threads of one process sharing a DRM fd; ``expect error`` and ``expect fault``
        without a fence look at the block's own previous line and job. Its output lines start
        with ``[NAME]``; a failure stops the block (the script goes on) and names
        ``file:line: task NAME``. ``join`` waits for tasks; ``poweroff`` joins them all.
        ``gemu explore SCRIPT`` interleaves the tasks with each other and with reclaim."""
        if not st.body:
            raise ShellError(f"task {name}: an empty block (lines up to 'end' run in the task)")
        old = self.tasks.get(name)
        if old is not None and old.ok is None:
            raise ShellError(f"task {name}: still running (started at {old.where}; join it)")
        with self._count:
            self._started += 1
            t = ShellTask(name, st.where, self._started)
        self.tasks[name] = t
        self.say(f"task {name}: started ({len(st.body)} lines)")
        t.task = runtime.spawn(self._task_main, t, list(st.body), name=name)

    def _task_main(self, t: ShellTask, body: list[Statement]) -> None:
        ctx = self._contexts[runtime.current()] = _Context(t.name, t)
        try:
            t.ok = self.run_statements(body)
        except PowerOff:
            ctx.failed_at = ctx.failed_at or t.where
            msg = f"{t.where}: task {t.name}: poweroff inside a task (ends the task only)"
            self.report(msg)
            self._line_failed(msg, error=True)
            t.ok = False
        except DeviceLost as exc:
            ctx.failed_at = ctx.failed_at or t.where
            self.sum.device_lost = self.sum.device_lost or str(exc)
            t.ok = False
        finally:
            t.failed_at = ctx.failed_at
            del self._contexts[runtime.current()]
        if t.ok:
            self.say(f"task {t.name}: done")

    @command(
        "join",
        0,
        None,
        "join [NAME...]",
        "Wait for tasks (default: all not joined yet); fails if one of them failed.",
    )
    def cmd_join(self, st: Statement, *names: str) -> None:
        """Wait for the named tasks (default: every task not joined yet); fails if one of
        them failed (its failure was reported where it happened). Inside a task block, only
        tasks started before it can be joined (so two tasks never wait for each other)."""
        for n in names:
            if n not in self.tasks:
                raise ShellError(f"join: no task {n!r}" + self._known("tasks", self.tasks))
        mine = self._context().shell_task
        todo = [self.tasks[n] for n in names] or [
            t for t in list(self.tasks.values()) if not t.joined
        ]
        if mine is not None:
            if any(t is mine for t in todo) and names:
                raise ShellError("join: a task cannot wait for itself")
            later = [t.name for t in todo if t.seq >= mine.seq and t is not mine]
            if later and names:
                raise ShellError(
                    f"join: task {mine.name} can only join tasks started before it "
                    f"(not {', '.join(later)})"
                )
            todo = [t for t in todo if t.seq < mine.seq]
        failed = self._join(todo)
        if failed:
            raise ShellError(
                "join: " + ", ".join(f"task {t.name} failed at {t.failed_at}" for t in failed)
            )

    def _join(self, tasks: list[ShellTask]) -> list[ShellTask]:
        for t in tasks:
            if t.task is not None:
                t.task.join()
            t.joined = True
        return [t for t in tasks if t.ok is False]

    @command("end", 0, 0, "end", "Close a task NAME block.")
    def cmd_end(self, st: Statement) -> None:
        """Close a ``task NAME`` block."""
        raise ShellError("end without a task")

    @command(
        "poweroff",
        0,
        0,
        "poweroff",
        "Finish: join tasks, wait for jobs, judge the session, power off.",
    )
    def cmd_poweroff(self, st: Statement) -> None:
        """Finish: wait for running jobs, check for unexpected failures, power off."""
        raise PowerOff()

    def poweroff(self) -> Summary:
        """Wait for what is still running, close the file, and return the summary."""
        if self._down:
            return self.sum
        self._down = True
        self.m.end_holds()  # jobs held for a debugger (-S, gdb, QMP stop) run now
        self._typing = None  # a task block typed at the console without its end
        self._settle_pending_failure(None)
        self._join(list(self.tasks.values()))
        if self.m.device_lost() is None:
            self._settle_all()
        s = self.sum
        for fv in [*self.fences.values(), *self._retired]:
            self._judge(fv)
        self._judge_lockdep()
        from gemu.guest import errors

        for msg, n in errors.warn_stats().counts.items():
            s.warnings.append(f"{msg} (x{n})")
        if self._events_on:
            trace.unsubscribe(self._record)
            self._events_on = False
        s.device_lost = s.device_lost or self.m.device_lost()
        try:
            s.stats = self.m.statistics()
        except Exception:  # statistics of a machine whose device went away
            s.stats = {}
        if s.device_lost is None:
            try:
                self.file.close()  # closes the out-fences the names still hold
            except Exception as exc:
                s.device_lost = f"closing the GPU file failed: {exc}"
            else:
                self._check_fence_leaks()
        return s

    def _check_fence_leaks(self) -> None:
        """With the file closed and every job done, nothing may hold a job's fence: a
        reference left is a leak (dma_fence_put missing somewhere)."""
        for name, seqno, fence in self._job_fences:
            if fence.refcount:
                self.sum.leaks.append(
                    f"fence of {name} (job {seqno}) still has {fence.refcount} reference(s) "
                    "after the GPU file was closed"
                )

    def summary(self) -> Summary:
        return self.sum


Shell.COMMANDS = {name: spec.arity for name, spec in _TABLE.items()}
