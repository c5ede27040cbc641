"""``gemu boot`` and ``gemu run``: assemble the machine, boot the guest, run its shell.

``boot`` gives the shell on a console (stdio, a pty, a socket, a serial port); ``run`` runs
job scripts and powers off. Both exit with:

====  =====================================================================================
 0    every expectation held; no unexpected GPU fault, lockdep report, lost data or warning
 1    something failed: an expectation, a command of a script, or one of the above
 2    bad command line or a job script that does not parse (file:line on stderr)
 3    the machine could not boot or lost its device (unreachable, died, or silent for
      --device-timeout seconds mid-run)
130   interrupted (Ctrl-C); the machine was still powered off cleanly
143   terminated (SIGTERM); the machine was still powered off cleanly
====  =====================================================================================
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time

from gemu.host.cli import _transport_spec, seconds_in

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_MACHINE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_TERMINATED = 143


class Terminated(Exception):
    """SIGTERM: power off cleanly, then exit 143 (QEMU: "terminating on signal 15")."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


LOG_ITEMS = ("guest_errors", "guest", "device", "debug", "none")
DEVICE_TIMEOUT_S = 5.0  # gemu.host.machine.DEVICE_TIMEOUT_S, without importing the guest
DEVICE_TIMEOUT_MAX_S = 3600.0
JOB_TIMEOUT_MS = 2000  # gemu.guest.gemu_drv.uapi.DEFAULT_TIMEOUT_NS, in ms
JOB_TIMEOUT_MAX_MS = 3_600_000
RAM_MAX = 16 << 30
"""The largest guest RAM: the page allocator keeps per-frame state (4 M frames at 16 GiB)."""
SWAP_MAX = 64 << 30
"""The largest swap device (a sparse file; 16 M slots at 64 GiB)."""
BOOT_RAM, RUN_RAM = "64M", "16M"
DEVICE_PROBE_S = 1.0  # how often an idle console checks that the device still answers


def _size_arg(text: str) -> int:
    from gemu.host.sizes import parse_size

    try:
        n = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not 1 << 20 <= n <= RAM_MAX or n % 4096:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: 1M to {RAM_MAX >> 30}G and a multiple of 4K"
        )
    return n


def _swap_arg(text: str) -> int:
    from gemu.host.sizes import parse_size

    try:
        n = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if n > SWAP_MAX or n % 4096:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: 0 to {SWAP_MAX >> 30}G and a multiple of 4K"
        )
    return n


def _device_arg(text: str) -> str:
    if text in ("spawn", "inproc"):
        return text
    return _transport_spec(text)


def _serial_arg(text: str) -> str:
    from gemu.host.console import ConsoleSpecError, check_spec

    try:
        return check_spec(text)
    except ConsoleSpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _chardev_arg(text: str) -> str:
    """QEMU's chardev syntax (``unix:PATH,server,nowait``, ``tcp:HOST:PORT,server=on,
    wait=off``, ``stdio``, ``pty``) as a console spec; what gemu cannot honour is refused."""
    spec, *opts = text.split(",")
    kind = spec.partition(":")[0]
    if kind not in ("stdio", "pty", "unix", "tcp"):
        raise argparse.ArgumentTypeError(
            f"{text!r}: gemu's console is stdio, pty, unix:PATH,server or tcp:HOST:PORT,server"
        )
    server = False
    for opt in opts:
        key, _, value = opt.partition("=")
        on = value in ("", "on")
        if key in ("server", "wait", "nowait") and value not in ("", "on", "off"):
            raise argparse.ArgumentTypeError(f"{text!r}: {key}={value}: use on or off")
        if key == "server":
            server = on
        elif key == "nowait" or (key == "wait" and not on):
            # the console is the only way in: gemu waits for its client before booting
            # either way, so nothing the boot prints is lost
            continue
        elif key != "wait":
            raise argparse.ArgumentTypeError(f"{text!r}: option {key!r} is not supported by gemu")
    if kind in ("unix", "tcp") and not server:
        # QEMU's client chardev: connect out to a terminal server already listening
        return _serial_arg(f"connect:{spec}")
    return _serial_arg(spec)


def _log_arg(text: str) -> tuple[str, ...]:
    items = tuple(i.strip() for i in text.split(",") if i.strip())
    bad = [i for i in items if i not in LOG_ITEMS]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"invalid log item {(bad or [text])[0]!r} (choose from {', '.join(LOG_ITEMS)})"
        )
    return items


def _ms_arg(text: str) -> int:
    """A job timeout in milliseconds; nanoseconds."""
    return int(seconds_in(0, JOB_TIMEOUT_MAX_MS, "ms")(text) * 1_000_000)


_seconds_arg = seconds_in(0, DEVICE_TIMEOUT_MAX_S)


def _trace_arg(text: str) -> str:
    """--trace FILE: checked before the boot, so a typo does not cost the whole run."""
    import os

    path = os.path.abspath(text)
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file name")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"{text!r}: no such directory {folder!r}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: directory {folder!r} is not writable")
    return text


def _qmp_arg(text: str) -> tuple[str, bool]:
    from gemu.host.qmp import QmpSpecError, parse_spec

    try:
        return parse_spec(text)
    except QmpSpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _trace_events_arg(text: str) -> tuple[list[str], str | None]:
    from gemu.host.tracefile import TraceSpecError, parse_trace_spec

    try:
        return parse_trace_spec(text)
    except TraceSpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _gdb_arg(text: str) -> str:
    from gemu.host.cmd_device import _gdb_spec

    return _gdb_spec(text)


def _device_options(args: argparse.Namespace) -> list[str]:
    """The options ``gemu boot`` passes on to the device process it spawns."""
    out = []
    if args.gdb is not None:
        out += ["--gdb", args.gdb]
    if args.gdb_wait and args.gdb is not None:
        out.append("-S")
    if args.coredump_dir is not None:
        out += ["--coredump-dir", args.coredump_dir]
    return out


def check_device_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """--gdb, -S and --coredump-dir configure the device process gemu boot spawns."""
    if args.gdb_wait and args.gdb is None and not args.qmp:
        parser.error(
            "argument -S: needs --gdb or --qmp (nothing could continue the machine: gdb's "
            "continue releases the GPU, QMP's cont starts the console or the scripts)"
        )
    if args.device != "spawn" and _device_options(args):
        parser.error(
            f"arguments --gdb/-S/--coredump-dir: they configure the device gemu boot spawns, "
            f"not --device {args.device}; pass them to `gemu device` instead"
        )


def _driver_mode_arg(text: str) -> str:
    from gemu.host.machine import check_driver_mode

    try:
        return check_driver_mode(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _machine_options(p: argparse.ArgumentParser, ram: str) -> None:
    p.add_argument(
        "-m",
        "--memory",
        type=_size_arg,
        default=ram,  # a string default goes through _size_arg, and --help shows it as given
        metavar="SIZE",
        help=f"guest RAM, e.g. 16M, 256M, 1G (plain numbers are MiB; 1M to {RAM_MAX >> 30}G)",
    )
    p.add_argument(
        "--swap",
        type=_swap_arg,
        default=None,
        metavar="SIZE",
        help=f"swap device size, at most {SWAP_MAX >> 30}G (default: four times the RAM; "
        "0: no swap)",
    )
    p.add_argument(
        "--device",
        type=_device_arg,
        default="spawn",
        metavar="SPEC",
        help="spawn (a child `gemu device`), inproc, or unix:PATH | tcp:HOST:PORT | "
        "serial:PORT-or-URL of a `gemu device` started separately",
    )
    p.add_argument(
        "--job-timeout",
        type=_ms_arg,
        default=str(JOB_TIMEOUT_MS),
        metavar="MS",
        help=f"GPU job timeout before a hang is declared and the GPU reset (above 0, at most "
        f"{JOB_TIMEOUT_MAX_MS} ms)",
    )
    p.add_argument(
        "--device-timeout",
        type=_seconds_arg,
        default=DEVICE_TIMEOUT_S,
        metavar="SECONDS",
        help="how long any request waits for the device (a register round trip, a send into "
        f"its full socket buffer) before the device is declared lost: exit 3, naming what "
        f"timed out (above 0, at most {DEVICE_TIMEOUT_MAX_S:g})",
    )
    p.add_argument(
        "--driver-mode",
        type=_driver_mode_arg,
        default=None,
        metavar="MODE",
        help="the GPU driver flavour: per-bo (the default: a GPU VM per file, a BO list per "
        "submit) or vm-bind (VMs on drm_gpuvm, VM_BIND with fences, exec on a VM, per-VM "
        "shrinker; see docs/gpuvm.md); gemu run takes the mode its scripts' driver-mode "
        "lines name",
    )
    p.add_argument(
        "--no-kswapd", action="store_true", help="do not start background reclaim (kswapd)"
    )
    p.add_argument(
        "--strict-signalling",
        action="store_true",
        help="also treat adding a fence to a reservation as opening a fence signalling "
        "section (gemu's stricter mode; by default only the dma_fence_begin_signalling "
        "annotations count, as in the kernel's lockdep; see docs/validation.md)",
    )
    p.add_argument(
        "--trace",
        type=_trace_arg,
        metavar="FILE",
        help="write a Chrome/Perfetto trace-event JSON of the run to FILE",
    )
    p.add_argument(
        "--gdb",
        type=_gdb_arg,
        metavar="SPEC",
        help="serve the GDB remote protocol from the device process on tcp::PORT or "
        "tcp:127.0.0.1:PORT (loopback only); see docs/gdb.md",
    )
    p.add_argument(
        "-s",
        dest="gdb",
        action="store_const",
        const="tcp::1234",
        help="QEMU's shorthand for --gdb tcp::1234",
    )
    p.add_argument(
        "-nographic",
        action="store_true",
        help="accepted for QEMU command lines; gemu has no display",
    )
    p.add_argument(
        "-S",
        dest="gdb_wait",
        action="store_true",
        help="QEMU's -S: with --gdb, hold the GPU's command processor until gdb continues; "
        "with --qmp (no --gdb), boot and wait in prelaunch for QMP cont before the console "
        "or the scripts start",
    )
    for flag in ("--qmp", "-qmp"):
        p.add_argument(
            flag,
            dest="qmp",
            type=_qmp_arg,
            metavar="SPEC",
            help="QMP control socket (QEMU's protocol): unix:PATH or tcp:127.0.0.1:PORT "
            "(port 0 picks one; the boot log prints it), QEMU's ,server[,nowait] accepted"
            if flag == "--qmp"
            else "QEMU's spelling of --qmp",
        )
    p.add_argument(
        "--coredump-dir",
        metavar="DIR",
        help="the device writes an ELF core file of the GPU into DIR on each command-processor "
        "error and each reset of a busy GPU (read with `gemu coredump FILE`)",
    )
    p.add_argument(
        "-trace",
        dest="trace_events",
        action="append",
        type=_trace_events_arg,
        metavar="[enable=]PATTERN[,events=FILE][,file=FILE]",
        help="QEMU's -trace: print the guest tracepoints whose names match PATTERN (a glob; "
        "-PATTERN disables; repeatable) to the log (-D FILE, file=FILE, or stderr); "
        "'-trace help' lists them. With --trace FILE, only these go into the JSON too",
    )
    p.add_argument(
        "-D",
        dest="logfile",
        type=_trace_arg,
        metavar="FILE",
        help="QEMU's -D: write the log (the --log/-d items, the device model's log as it "
        "happens, -trace events) to FILE instead of the console and stderr",
    )
    p.add_argument(
        "-pidfile",
        type=_trace_arg,
        metavar="FILE",
        help="write gemu's process id to FILE (locked while it runs, removed at exit)",
    )
    p.add_argument(
        "-d",
        "--log",
        type=_log_arg,
        default="guest_errors",
        metavar="ITEMS",
        help="comma list, QEMU -d style: guest_errors (guest kernel warnings and errors), "
        "guest (guest info too), device (the device model log: on stderr at power-off, or "
        "live in the -D file), "
        "debug, none",
    )


def register(sub: argparse._SubParsersAction) -> None:
    boot = sub.add_parser(
        "boot",
        help="boot the emulated machine and give its shell on a console",
        description="Assemble guest RAM, swap and the GPU device model, boot the guest kernel "
        "model and run its shell (prompt 'gemu# ') on a console.",
    )
    _machine_options(boot, BOOT_RAM)
    boot.add_argument(
        "--serial",
        type=_serial_arg,
        default="stdio",
        metavar="SPEC",
        help="console: stdio, pty, unix:PATH, tcp:127.0.0.1:PORT, serial:PORT-or-URL",
    )
    boot.add_argument(
        "-serial",
        dest="serial",
        type=_chardev_arg,
        metavar="CHARDEV",
        help="QEMU's spelling of --serial: stdio, pty, unix:PATH,server[,nowait], "
        "tcp:127.0.0.1:PORT,server[,nowait]",
    )
    boot.add_argument(
        "-monitor",
        type=_chardev_arg,
        metavar="CHARDEV",
        help="the same console (gemu's shell is its monitor): as -serial",
    )
    boot.add_argument(
        "-daemonize",
        action="store_true",
        help="QEMU's -daemonize: detach once the machine has booted (the console must be a "
        "pty or a socket, not stdio); with -pidfile, the detached process's id is there",
    )
    boot.set_defaults(func=cmd_boot)
    run = sub.add_parser(
        "run",
        help="boot, run job scripts, power off; exit 0 only if every check held",
        description="Boot the machine, run each job script in order (stopping at the first "
        "failure), power off and exit 0 only if every expectation held and nothing "
        "unexpected (GPU fault, lockdep report, lost data, kernel warning) happened.",
    )
    run.add_argument("scripts", nargs="+", metavar="SCRIPT", help="job script files")
    _machine_options(run, RUN_RAM)
    run.add_argument(
        "-q", "--quiet", action="store_true", help="print only failures and the summary"
    )
    run.add_argument(
        "--junit-xml",
        type=_trace_arg,
        metavar="FILE",
        help="write a JUnit XML report (one test case per script) for CI",
    )
    run.add_argument(
        "--json",
        type=_trace_arg,
        metavar="FILE",
        help="write the same report as JSON",
    )
    run.set_defaults(func=cmd_run)


class _KmsgHandler(logging.Handler):
    """Guest kernel messages on the console, printk-style: ``[    1.234567] text``."""

    def __init__(self, write, t0: float) -> None:
        super().__init__()
        self.write_line = write
        self.t0 = t0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:
            msg = str(record.msg)
        self.write_line(f"[{time.monotonic() - self.t0:12.6f}] {msg}")


def _setup_logs(items: tuple[str, ...], write, t0: float, logfile=None) -> _KmsgHandler:
    from gemu.host.cli import setup_logging

    setup_logging(logging.WARNING, "gemu")
    if logfile is not None:  # -D: the emulator's own log lines go to the file too
        for h in logging.getLogger("gemu").handlers:
            h.setStream(logfile)
    level = logging.WARNING
    if "guest" in items:
        level = logging.INFO
    if "debug" in items:
        level = logging.DEBUG
    if "none" in items:
        level = logging.CRITICAL + 1
    handler = _KmsgHandler(write, t0)
    guest = logging.getLogger("gemu.guest")
    guest.handlers[:] = [handler]
    guest.setLevel(level)
    guest.propagate = False
    logging.getLogger("gemu").setLevel(min(level, logging.WARNING))
    return handler


def _prespawn_device(args: argparse.Namespace):
    """Start ``gemu device`` now, before the guest's modules are imported, so the two
    start-ups overlap (``Machine(device_process=...)`` waits for its ready line). Returns
    (process, temporary directory) or None when the device is not spawned."""
    if args.device != "spawn":
        return None
    import os
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    exe = Path(sys.executable).parent / "gemu"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "gemu.host"]
    if not exe.exists() and shutil.which("gemu"):
        cmd = [shutil.which("gemu")]
    tmp = tempfile.mkdtemp(prefix="gemu-boot-")
    level = "info" if "device" in args.log else "warning"
    logfile = getattr(args, "logfile", None)
    with open(logfile or os.path.join(tmp, "device.log"), "ab" if logfile else "wb") as logf:
        proc = subprocess.Popen(
            [
                *cmd,
                "device",
                "--listen",
                f"unix:{tmp}/device.sock",
                "--log",
                level,
                *_device_options(args),
            ],
            stdout=subprocess.PIPE,
            stderr=logf,
            stdin=subprocess.DEVNULL,
        )
    return proc, tmp


class Session:
    """One boot: machine + shell + trace, with the output function of the console."""

    def __init__(self, args: argparse.Namespace, write) -> None:
        self.args = args
        self.write = write
        self.t0 = time.monotonic()
        self.machine = None
        self.shell = None
        self.summary = None  # the power-off summary, once finished
        self.tracer = None
        self.trace_log = None
        self._logf = self._tracef = None
        self.prespawned = _prespawn_device(args)

    def discard(self) -> None:
        """Stop a device started for a boot that will not happen."""
        if self.prespawned is not None:
            import shutil

            proc, tmp = self.prespawned
            proc.kill()
            proc.wait(10)
            proc.stdout.close()
            shutil.rmtree(tmp, ignore_errors=True)
            self.prespawned = None

    def _log_line(self, text: str) -> None:
        self._logf.write(text + "\n")

    def kmsg(self, text: str) -> None:
        self.write(f"[{time.monotonic() - self.t0:12.6f}] {text}")

    def boot(self) -> int | None:
        """Boot; returns an exit status if it failed."""
        from gemu.guest import errors
        from gemu.host.machine import DEFAULT_DRIVER_MODE, DRIVER_MODES, Machine, format_size
        from gemu.host.shell import Shell

        args = self.args
        errors.set_strict(False)
        log_write = self.write
        if args.logfile:
            # line-buffered append: the device process appends its own lines to the file
            self._logf = open(args.logfile, "a", buffering=1)  # noqa: SIM115 (closed in finish)
            log_write = self._log_line
        _setup_logs(args.log, log_write, self.t0, self._logf)
        enabled = None
        if args.trace_events:
            from gemu.host.tracefile import TraceFilter, TraceLog

            patterns = [p for spec, _ in args.trace_events for p in spec]
            enabled = TraceFilter(patterns)
            outs = [out for _, out in args.trace_events if out]
            if outs:
                self._tracef = open(outs[-1], "a", buffering=1)  # noqa: SIM115 (closed in finish)
                trace_write = lambda text: self._tracef.write(text + "\n")  # noqa: E731
            elif args.logfile:
                trace_write = self._log_line
            else:
                trace_write = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
            self.trace_log = TraceLog(enabled, trace_write)
            self.trace_log.start()
        if args.trace:
            from gemu.host.tracefile import TraceWriter

            self.tracer = TraceWriter(args.trace, enabled)
            self.tracer.start()
        ram = args.memory
        swap = 4 * ram if args.swap is None else args.swap
        self.kmsg(
            f"gemu: booting with {format_size(ram)} RAM, "
            f"{format_size(swap) if swap else 'no'} swap, device {args.device}"
        )
        extra = {"timeout_ns": args.job_timeout}
        dev_args = (*(("--log", "info") if "device" in args.log else ()), *_device_options(args))
        if self.prespawned is not None:
            extra["device_process"] = self.prespawned[0]
        try:
            self.machine = Machine(
                ram_size=ram,
                swap_size=swap,
                device=args.device,
                kswapd=not args.no_kswapd,
                strict_signalling=args.strict_signalling,
                device_args=dev_args,
                device_timeout=args.device_timeout,
                driver_mode=args.driver_mode or DEFAULT_DRIVER_MODE,
                **extra,
            )
        except Exception as exc:
            self.kmsg(f"gemu: cannot boot: device {args.device} unreachable or failing: {exc}")
            return EXIT_MACHINE
        for line in self.machine.boot_log():
            self.kmsg(line)
        mode = self.machine.driver_mode
        self.kmsg(f"gemu0: driver mode {mode}: {DRIVER_MODES[mode]}")
        self.shell = Shell(self.machine, self.write)
        self.kmsg(f"gemu: boot done in {(time.monotonic() - self.t0) * 1e3:.0f} ms")
        return None

    def finish(self, interrupted: bool = False) -> int:
        """Power off: summary, shutdown, trace file; returns the exit status."""
        sh, m = self.shell, self.machine
        status = EXIT_OK
        if sh is not None:
            s = self.summary = sh.poweroff()
            st = s.stats
            gpu = st.get("gpu", {})
            shr = st.get("shrinker", {})
            self.write(
                f"summary: {s.commands} commands, {s.checks_passed} checks passed, "
                f"{s.checks_failed} failed; jobs {gpu.get('jobs_emitted', 0)}, "
                f"evictions {shr.get('evicted', 0)}, swap-ins {shr.get('swapped_in', 0)}, "
                f"purges {shr.get('purged', 0)}, GPU faults {gpu.get('mmu_faults', 0)}, "
                f"resets {gpu.get('resets', 0)}"
            )
            for p in s.problems():
                self.write(f"FAIL: {p}")
            if s.device_lost:
                status = EXIT_MACHINE
            elif not s.ok:
                status = EXIT_FAILED
        if m is not None:
            m.shutdown()
        if self.prespawned is not None:
            import shutil
            from pathlib import Path

            proc, tmp = self.prespawned
            if proc.poll() is None:  # the machine never took it (boot failed early)
                proc.kill()
                proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()
            if "device" in self.args.log and not self.args.logfile:
                sys.stderr.write((Path(tmp) / "device.log").read_text(errors="replace"))
            shutil.rmtree(tmp, ignore_errors=True)
        elif m is not None and "device" in self.args.log:
            sys.stderr.write(m.device_log())
        if self.tracer is not None:
            self.tracer.close()
            self.write(f"trace: {len(self.tracer.events)} events written to {self.args.trace}")
        if self.trace_log is not None:
            self.trace_log.close()
        for f in (self._tracef, self._logf):
            if f is not None:
                f.close()
        self.write("reboot: Power down")
        return EXIT_INTERRUPTED if interrupted else status


def _trace_help(args: argparse.Namespace) -> bool:
    """``-trace help``: list the tracepoint names (QEMU prints its list and exits)."""
    if not any(p == "help" for spec, _ in args.trace_events or () for p in spec):
        return False
    from gemu.host.tracefile import event_names

    print("\n".join(event_names()))
    return True


class PidFile:
    """``-pidfile FILE``: the process id, locked (lockf) while gemu runs, removed at exit, so
    two machines never share one (QEMU's qemu_write_pidfile)."""

    def __init__(self, path: str) -> None:
        import fcntl

        self.path = os.path.abspath(path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OSError(f"{path} is locked by another gemu (pid {other})") from None
        self.fd = fd
        self.write()

    def write(self) -> None:
        """(Re)write the current pid: after -daemonize's fork it is the detached child's."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)


def _daemonize():
    """QEMU's -daemonize: fork; the parent waits until the child says the machine booted
    (then exits 0) or the child exits (then exits with its status). The child leaves the
    terminal's session; :func:`_detached` hands it the call that releases the parent."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        data = os.read(r, 1)
        if data:
            os._exit(data[0])
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status))
    os.close(r)
    os.setsid()

    def ready() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(w, bytes([EXIT_OK]))
        os.close(w)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)

    return ready


def _open_qmp(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The QMP server of ``--qmp``, listening before the boot (None without --qmp). With
    QEMU's ``,server`` and no ``nowait`` it waits for its first client, as QEMU does."""
    if not args.qmp:
        return None
    from gemu.host.qmp import QmpServer, QmpSpecError

    spec, wait = args.qmp
    try:
        qmp = QmpServer(spec, {}, notice=lambda text: None)
    except QmpSpecError as exc:
        parser.error(f"argument --qmp: {exc}")
    if wait:
        print(f"gemu: QMP waiting for connection on {qmp.address},server=on", file=sys.stderr)
        sys.stderr.flush()
        try:
            while not qmp.connected.wait(DEVICE_PROBE_S):  # Ctrl-C ends the wait
                pass
        except BaseException:
            qmp.close()
            raise
    return qmp


def _serve_qmp(qmp, session: Session, console: str | None, on_quit, prelaunch=None):
    """Give the booted machine's commands to ``qmp``; returns the events' unsubscribe."""
    from gemu.host.qmp import machine_commands, subscribe_events

    def chardevs() -> list[dict]:
        # QEMU's ChardevInfo (qapi/char.json); QEMU labels a -qmp socket compat_monitor0
        # and its gdbstub's chardev gdb
        out = []
        if console is not None:
            out.append({"label": "serial0", "filename": console, "frontend-open": True})
        out.append(
            {
                "label": "compat_monitor0",
                "filename": f"{qmp.address},server=on",
                "frontend-open": True,
            }
        )
        gdb = session.machine.gdb_address
        if gdb is not None:
            out.append({"label": "gdb", "filename": f"{gdb},server=on", "frontend-open": True})
        return out

    qmp.serve(machine_commands(session.shell, on_quit, qmp, chardevs, prelaunch))
    unsubscribe = subscribe_events(qmp)
    session.kmsg(f"gemu: QMP listening on {qmp.address}")
    return unsubscribe


def _prelaunch_for_qmp(args: argparse.Namespace) -> list[bool] | None:
    """QEMU's -S with QMP and no gdb: the machine boots, then waits for QMP's ``cont``."""
    return [True] if args.gdb_wait and args.gdb is None and args.qmp else None


def _wait_for_cont(qmp, prelaunch: list[bool], quit_requested) -> None:
    """Serve QMP until ``cont`` (or ``quit``, which raises PowerOff)."""
    from gemu.host.shell import PowerOff

    while prelaunch[0]:
        qmp.pump()
        if quit_requested():
            raise PowerOff
        qmp.requests_ready(DEVICE_PROBE_S)


def cmd_boot(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    check_device_options(args, parser)
    if _trace_help(args):
        return EXIT_OK
    if args.daemonize and (args.monitor or args.serial) == "stdio":
        parser.error(
            "argument -daemonize: the console is stdio, which a detached gemu cannot keep; "
            "use --serial pty, unix:PATH or tcp:127.0.0.1:PORT (or -serial CHARDEV)"
        )
    pidfile = None
    if args.pidfile:
        try:
            pidfile = PidFile(args.pidfile)
        except OSError as exc:
            parser.error(f"argument -pidfile: {exc}")
    ready = _daemonize() if args.daemonize else None
    if pidfile is not None:
        pidfile.write()
    try:
        return _boot(args, parser, ready)
    finally:
        if pidfile is not None:
            pidfile.close()


def _boot(args: argparse.Namespace, parser: argparse.ArgumentParser, ready) -> int:
    from gemu.host.console import ConsoleInterrupt, ConsoleSpecError, open_console

    if args.monitor is not None:
        if args.serial != "stdio" and args.serial != args.monitor:
            parser.error(
                f"argument -monitor: gemu has one console, its monitor: -monitor {args.monitor} "
                f"and -serial {args.serial} name two"
            )
        args.serial = args.monitor
    unsubscribe = None
    try:
        qmp = _open_qmp(args, parser)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    try:
        con = open_console(args.serial)
    except (ConsoleSpecError, OSError, KeyboardInterrupt) as exc:
        if qmp is not None:
            qmp.close()
        if isinstance(exc, KeyboardInterrupt):
            return EXIT_INTERRUPTED
        if isinstance(exc, ConsoleSpecError):
            parser.error(f"argument --serial: {exc}")
        where = f" {exc.filename}" if exc.filename else ""
        parser.error(f"argument --serial: {args.serial}:{where} {exc.strerror or exc}")
    session = Session(args, con.line)
    try:  # the guest kernel model: imported while the device process starts
        from gemu.host.shell import DeviceLost, PowerOff
    except BaseException as exc:
        session.discard()
        con.close()
        if isinstance(exc, KeyboardInterrupt):
            return EXIT_INTERRUPTED
        raise

    interrupted = terminated = False
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        failed = session.boot()
        if failed is not None:
            if qmp is not None:
                qmp.close(reason="guest-panic")
            session.finish()
            return failed
        sh = session.shell
        lineno = 0
        next_probe = time.monotonic() + DEVICE_PROBE_S
        quit_requested = False
        if con.filename != "stdio":
            session.kmsg(f"gemu: console serial0 on {con.filename}")
        if qmp is not None:

            def on_quit() -> None:
                nonlocal quit_requested
                quit_requested = True

            prelaunch = _prelaunch_for_qmp(args)
            unsubscribe = _serve_qmp(qmp, session, con.filename, on_quit, prelaunch)
            if prelaunch is not None:
                session.kmsg("gemu: -S: waiting for QMP cont before the console starts")
                if ready is not None:
                    ready()
                    ready = None
                with contextlib.suppress(PowerOff):  # a QMP quit before cont
                    _wait_for_cont(qmp, prelaunch, lambda: quit_requested)
        if ready is not None:
            ready()  # -daemonize: booted; the parent exits 0 and we go on detached

        def idle() -> None:
            # a device stopped while the console waits would only be noticed by the next
            # command; a bounded probe now and then reports it from the prompt
            nonlocal next_probe
            if time.monotonic() >= next_probe:
                session.machine.probe_device()
                next_probe = time.monotonic() + DEVICE_PROBE_S
            sh._check_device()
            if qmp is not None:
                qmp.pump()
                if quit_requested:
                    raise PowerOff

        while not quit_requested:
            try:
                text = con.readline(sh.prompt, idle)
            except PowerOff:  # QMP quit
                break
            if text is None:
                con.line("")
                break
            lineno += 1
            try:
                sh.run_line(text, "<console>", lineno)
            except PowerOff:
                break
    except (ConsoleInterrupt, KeyboardInterrupt):
        con.line("gemu: interrupted; powering off")
        interrupted = True
    except Terminated:
        con.line("gemu: terminating on signal 15; powering off")
        terminated = True
    except DeviceLost as exc:
        session.kmsg(f"gemu0: device lost: {exc}; powering off")
        if qmp is not None:
            qmp.event("GEMU_DEVICE_LOST", {"reason": str(exc)})
    try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if qmp is not None:
            qmp.pump()  # a quit's reply is sent before the socket closes
            if unsubscribe is not None:
                unsubscribe()
            qmp.close()
        code = session.finish(interrupted)
        return EXIT_TERMINATED if terminated else code
    finally:
        con.close()


def cmd_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    check_device_options(args, parser)
    if _trace_help(args):
        return EXIT_OK
    pidfile = None
    if args.pidfile:
        try:
            pidfile = PidFile(args.pidfile)
        except OSError as exc:
            parser.error(f"argument -pidfile: {exc}")
    try:
        qmp = _open_qmp(args, parser)
    except KeyboardInterrupt:
        if pidfile is not None:
            pidfile.close()
        return EXIT_INTERRUPTED
    try:
        return _run(args, parser, qmp)
    finally:
        if qmp is not None:
            qmp.close()
        if pidfile is not None:
            pidfile.close()


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser, qmp) -> int:
    def write(text: str) -> None:
        print(text, flush=True)

    session = Session(args, write)  # the device starts now, while the scripts are read
    from gemu.host.jobscript import ScriptError, parse_file
    from gemu.host.shell import PROMPT, DeviceLost, PowerOff, Shell, scripts_driver_mode

    scripts = []
    try:
        for path in args.scripts:
            scripts.append(parse_file(path, commands=Shell.COMMANDS))
        args.driver_mode = scripts_driver_mode(scripts, args.driver_mode)
    except ScriptError as exc:
        session.discard()
        print(f"gemu run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.quiet:
        session.write = lambda text: None
    from gemu.host.report import RunRecorder

    recorder = RunRecorder()
    unsubscribe = None
    interrupted = terminated = False
    status = None
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        failed = session.boot()
        if failed is not None:
            session.write = write
            session.finish()
            return failed
        sh = session.shell
        sh.echo = not args.quiet
        if qmp is not None:
            quit_requested = False

            def on_quit() -> None:
                nonlocal quit_requested
                quit_requested = True

            prelaunch = _prelaunch_for_qmp(args)
            unsubscribe = _serve_qmp(qmp, session, None, on_quit, prelaunch)
            if prelaunch is not None:
                write("gemu: -S: waiting for QMP cont before the scripts run")
                try:
                    _wait_for_cont(qmp, prelaunch, lambda: quit_requested)
                except PowerOff:  # QMP quit before cont: no script runs
                    for path in args.scripts:
                        recorder.skip(path, "not run: QMP quit before cont")
                    scripts = []

            def serve_qmp() -> None:
                # QMP commands run between the main script's lines, never beside one
                qmp.pump()
                if quit_requested:
                    raise PowerOff

            sh.idle = serve_qmp
        if args.quiet:
            sh.write = lambda text: None
            sh.report = write
        for i, (path, statements) in enumerate(zip(args.scripts, scripts)):
            if not args.quiet:
                write(f"{PROMPT}# {path}")
            recorder.start(sh.sum)
            t0 = time.monotonic()
            try:
                ok = sh.run_script(statements)
            except PowerOff:
                recorder.finish(path, sh.sum, time.monotonic() - t0)
                for rest in args.scripts[i + 1 :]:
                    recorder.skip(rest, f"not run: {path} powered the machine off")
                break
            recorder.finish(path, sh.sum, time.monotonic() - t0, ok)
            if not ok:
                status = EXIT_FAILED
                for rest in args.scripts[i + 1 :]:
                    recorder.skip(rest, f"not run: {path} failed")
                break
    except KeyboardInterrupt:
        write("gemu: interrupted; powering off")
        interrupted = True
    except Terminated:
        write("gemu: terminating on signal 15; powering off")
        terminated = True
    except DeviceLost as exc:
        write(f"gemu0: device lost: {exc}; powering off")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if qmp is not None:
        qmp.pump()  # a quit's reply is sent before the socket closes
        if unsubscribe is not None:
            unsubscribe()
    session.write = write
    if session.shell is not None:
        recorder.start(session.shell.sum)
    code = session.finish(interrupted)
    if session.summary is not None:
        recorder.poweroff(session.summary)
    _write_reports(args, recorder)
    if terminated:
        return EXIT_TERMINATED
    if status is not None and code == EXIT_OK:
        code = status
    return code


def _write_reports(args: argparse.Namespace, recorder) -> None:
    """Write the --junit-xml and --json reports; a file that cannot be written is said."""
    from gemu.host.report import write_json, write_junit

    for path, writer in ((args.junit_xml, write_junit), (args.json, write_json)):
        if path is None:
            continue
        try:
            writer(path, recorder.cases)
        except OSError as exc:
            print(f"gemu run: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
