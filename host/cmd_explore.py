"""``gemu explore``: search thread interleavings of the driver against reclaim for violations.

Exit status:

====  =====================================================================================
 0    no schedule violated an invariant (a replay: the schedule held)
 1    a violation was found (reproduction written) or the replayed schedule violates one
 2    bad command line, a job script that does not parse, a --replay file that is not a
      repro.json of gemu explore
 3    the search could not run: no Dask scheduler answered at --cluster in time
130   interrupted (Ctrl-C): the partial report was printed
====  =====================================================================================
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from gemu.host.cli import int_in, seconds_in

EXIT_OK, EXIT_VIOLATION, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
SEED_MAX = 2**63 - 1
SCHEDULES_MAX = 10**9
WORKERS_MAX = 256
TASKS_MAX, JOBS_MAX = 32, 100
CONNECT_TIMEOUT_S = 10.0  # gemu.host.explore.engine.CONNECT_TIMEOUT_S, without importing it

MUTANTS = (
    "none",
    "fence-after-unlock",
    "fence-before-swapin",
    "arm-before-failing-step",
    "push-outside-entity-lock",
    "no-tlb-flush",
    "shrinker-skips-busy",
    "idle-read-fences-bookkeep",
    "cpu-map-get-pages",
    "evict-frees-before-unmap",
    "shrinker-blocking-lock",
    "pt-alloc-under-lock",
    "reset-allocates",
    "madvise-list-add",
    "gem-lru-remove-unlocked",
    "shrinker-scan-ticket",
    "resv-replace-older",
    "vunmap-clears-vaddr",
    "mmap-errant-put",
    "tdr-frees-job",
    "no-hang-drops-job",
    "kill-skips-scheduled",
    "kill-skips-deps",
    "dep-error-double-put",
    "kill-leaks-prev",
    "bind-allocates-pt",
    "fence-vm-resv-only",
    "validate-skips-other-vm",
    "evict-marks-one-vm",
    "gpuvm-fence-before-validate",
    "gpuvm-fence-after-unlock",
    "gpuvm-arm-before-validate",
)
"""The values of :class:`gemu.guest.gemu_drv.job.Mutant` (spelled out: the CLI parser is
built without importing the guest; a test keeps the two equal)."""


_natural = int_in("number", 0, 16)


def _duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``12s``."""
    s = int(seconds + 0.5)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _out_dir(text: str) -> Path:
    """--out DIR: a writable directory or one that can be made, checked before the search
    (a reproduction is written after it, when an error would cost the whole run)."""
    import os

    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    parent = path
    while not parent.exists():  # the directories --out creates; bounded by the path's depth
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: cannot write into {str(parent)!r}")
    return path


_seed = int_in("seed", 0, SEED_MAX)
_count = int_in("number", 1, SCHEDULES_MAX)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explore",
        help="search schedules of submitters against the shrinker for invariant violations",
        description="Run a scenario under the deterministic scheduler, one seeded schedule "
        "after another, and check after each: no GPU fault on a valid job, every BO equal to "
        "the reference model, no lockdep or fence-signalling report, no deadlock, no leaked "
        "frame, slot, fence or reference. Stops at the first violation (unless --keep-going), "
        "shrinks it and writes a reproduction (seed, schedule, replay command, event log, "
        "trace). Exit status: 0 no violation, 1 violations found, 2 bad arguments, 3 the "
        "--cluster scheduler did not answer, 130 interrupted (partial report printed).",
    )
    p.add_argument(
        "scenario",
        nargs="?",
        default=None,
        help="a built-in scenario (standard, small, race, hang, timeouts, exit, gpuvm, "
        "gpuvm-small) or a job script file (default: standard; hang for --mutant "
        "reset-allocates, which needs a GPU reset; timeouts or exit for the drm_sched corpus "
        "mutants; gpuvm for the VM_BIND flavour's mutants)",
    )
    p.add_argument(
        "--strategy",
        choices=("random", "pct", "exhaustive"),
        default="random",
        help="random or pct sample --schedules seeded schedules; exhaustive enumerates every "
        "schedule with at most --preemption-bound preemptions",
    )
    p.add_argument(
        "--preemption-bound",
        type=_natural,
        default=1,
        metavar="K",
        help="exhaustive: the most preemptions a schedule may have (0 to 16)",
    )
    p.add_argument(
        "--no-reduction",
        action="store_true",
        help="exhaustive: run every schedule, also those equivalent to one already explored",
    )
    p.add_argument(
        "--state-cache",
        action="store_true",
        help="exhaustive: with the reduction, do not search again below a state an earlier "
        "schedule reached with as many preemptions left (fewer schedules; see docs/explore.md "
        "for what it assumes)",
    )
    p.add_argument(
        "--schedules",
        type=_count,
        default=100,
        metavar="N",
        help=f"schedules to run (1 to {SCHEDULES_MAX:,})",
    )
    p.add_argument(
        "--seed",
        type=_seed,
        default=0,
        metavar="S",
        help="seed of schedule 0 (schedule i has seed S + i; 0 to 2**63-1)",
    )
    p.add_argument(
        "--workers",
        type=int_in("number", 1, WORKERS_MAX),
        default=None,
        metavar="W",
        help="parallel processes on this machine (default: the usable CPUs)",
    )
    p.add_argument(
        "--cluster",
        metavar="ADDRESS",
        help="send the schedules to a Dask distributed scheduler (tcp://HOST:PORT) instead",
    )
    p.add_argument(
        "--connect-timeout",
        type=seconds_in(0, 3600),
        default=CONNECT_TIMEOUT_S,
        metavar="SECONDS",
        help="how long to wait for the --cluster scheduler to answer (then exit 3)",
    )
    p.add_argument("--keep-going", action="store_true", help="run every schedule")
    p.add_argument(
        "--mutant",
        choices=MUTANTS,
        default="none",
        help="run a deliberately wrong driver (docs/validation.md lists them)",
    )
    p.add_argument(
        "--bug",
        metavar="NAME",
        help="explore a historical kernel bug of the corpus: its mutant on its scenario "
        "(--list-bugs names them; docs/bugs.md)",
    )
    p.add_argument(
        "--list-bugs",
        action="store_true",
        help="list the corpus of historical kernel bugs (name, fixing commit, subject) and exit",
    )
    p.add_argument(
        "--strict-signalling",
        action="store_true",
        help="gemu's stricter lockdep mode: publishing a fence in a reservation object opens "
        "the signalling section even where the code does not annotate one (real lockdep sees "
        "only dma_fence_begin_signalling sections; docs/validation.md)",
    )
    p.add_argument(
        "--pct-depth",
        type=int_in("number", 1, 64),
        default=3,
        metavar="D",
        help="PCT: the bug depth targeted (D - 1 priority drops per schedule; 1 to 64)",
    )
    p.add_argument(
        "--pct-steps",
        type=int_in("number", 1, 10**9),
        default=None,
        metavar="K",
        help="PCT: a schedule's length in preemption points, over which the drops are spread "
        "(default: measured from three runs of the scenario)",
    )
    p.add_argument(
        "--tasks",
        type=int_in("number", 1, TASKS_MAX),
        default=None,
        help=f"submitting tasks (1 to {TASKS_MAX}; default: the scenario's)",
    )
    p.add_argument(
        "--jobs",
        type=int_in("number", 1, JOBS_MAX),
        default=None,
        help=f"jobs per task (1 to {JOBS_MAX}; default: the scenario's)",
    )
    p.add_argument(
        "--out",
        type=_out_dir,
        default=Path("explore-out"),
        metavar="DIR",
        help="where reproductions go",
    )
    p.add_argument("--no-shrink", action="store_true", help="write the violation unshrunk")
    p.add_argument(
        "--replay",
        metavar="REPRO|SEED",
        help="run one schedule again: a repro.json written by explore, or a seed",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_explore)


def _config(args: argparse.Namespace, parser: argparse.ArgumentParser):
    from gemu.host.explore.scenario import (
        ExploreConfig,
        scenario_for_mutant,
        scenario_from_args,
    )

    if args.bug is not None:
        from gemu.host.explore.bugs import lookup

        try:
            bug = lookup(args.bug)
        except ValueError as exc:
            parser.error(str(exc))
        if args.mutant != "none" or args.scenario:
            parser.error("--bug picks its own mutant and scenario: drop --mutant and SCENARIO")
        args.mutant = bug.mutant
        args.scenario = bug.scenario
    if args.scenario and Path(args.scenario).is_file():
        from gemu.host.explore.jobscripts import scenario_for_script

        try:
            sc = scenario_for_script(Path(args.scenario))
        except (ValueError, OSError) as exc:
            parser.error(str(exc))
    else:
        name = args.scenario or scenario_for_mutant(args.mutant).name
        try:
            sc = scenario_from_args(name, tasks=args.tasks, jobs=args.jobs)
        except ValueError as exc:
            parser.error(str(exc))
    return ExploreConfig(
        scenario=sc,
        strategy=args.strategy,
        pct_depth=args.pct_depth,
        pct_steps=args.pct_steps or 0,
        mutant=args.mutant,
        strict_signalling=args.strict_signalling,
    )


def _print_result(res, out=None) -> None:
    out = out or sys.stdout
    if not res.violations:
        print(f"seed {res.seed}: no violation ({res.steps} steps)", file=out)
    for v in res.violations:
        print(f"seed {res.seed}: VIOLATION {v.kind}: {v.message}", file=out)


def _load_repro(target: str):
    """(config, seed, schedule) of a repro.json; a bad or foreign file is a usage error
    naming the file and what is wrong (exit 2)."""
    import json

    from gemu.host.explore import repro

    def bad(why: str):
        print(
            f"gemu explore: --replay {target}: not a repro.json written by gemu explore: {why}",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_USAGE)

    try:
        cfg, seed, schedule, _doc = repro.load_repro(Path(target))
    except UnicodeDecodeError:
        bad("not text")
    except json.JSONDecodeError as exc:
        bad(f"not JSON ({exc})")
    except OSError as exc:
        bad(exc.strerror or str(exc))
    except KeyError as exc:
        bad(f"no {exc.args[0]!r} field")
    except (TypeError, ValueError, AttributeError) as exc:
        bad(f"a field does not fit ({exc})")
    if not isinstance(seed, int) or isinstance(seed, bool):
        bad(f"seed {seed!r} is not a whole number")
    if not isinstance(schedule, list) or not all(
        isinstance(x, int) and not isinstance(x, bool) for x in schedule
    ):
        bad("schedule is not a list of whole numbers")
    return cfg, seed, schedule


def _replay(args, parser) -> int:
    from gemu.guest.kernel import runtime
    from gemu.host.explore import repro
    from gemu.host.explore.scenario import run_schedule

    target = args.replay
    if Path(target).is_file():
        cfg, seed, schedule = _load_repro(target)
        out = Path(target).parent
        try:
            res = repro.replay(cfg, seed, schedule, out / "trace.json")
        except runtime.ReplayDivergence as exc:
            print(
                f"gemu explore: --replay {target}: its schedule does not fit the program it "
                f"names (written by another gemu version?): {exc}",
                file=sys.stderr,
            )
            return EXIT_USAGE
        (out / "events.log").write_text("\n".join(res.event_log or []) + "\n")
        same = res.schedule == schedule
        print(
            f"replayed {target}: {res.steps} steps, schedule "
            f"{'identical' if same else 'DIFFERS'}; event log and trace rewritten in {out}"
        )
    else:
        try:
            seed = int(target, 0)
        except ValueError:
            parser.error(f"--replay {target!r}: neither a repro.json nor a seed")
        res = run_schedule(_config(args, parser), seed)
    _print_result(res)
    return 1 if res.violations else 0


def cmd_explore(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from gemu.host.explore import engine

    if args.list_bugs:
        from gemu.host.explore.bugs import list_lines

        print("\n".join(list_lines()))
        return EXIT_OK
    if args.replay:
        return _replay(args, parser)
    cfg = _config(args, parser)
    if args.bug is not None:
        from gemu.host.explore.bugs import lookup

        bug = lookup(args.bug)
        print(
            f"explore: bug {bug.name}: fixed by {bug.fix[:12]} ({bug.subject!r}); mutant "
            f"{bug.mutant} on scenario {bug.scenario}, caught by {bug.invariant}",
            flush=True,
        )
    workers = args.workers or engine.default_workers()
    if cfg.strategy == "exhaustive":
        return _exhaustive(args, cfg, workers)

    def progress(rep) -> None:
        if not args.quiet:
            left = args.schedules - rep.schedules_run
            eta = f", ETA {_duration(left / rep.rate)}" if rep.rate and left > 0 else ""
            print(
                f"explore: {rep.schedules_run}/{args.schedules} schedules, "
                f"{len(rep.interleavings)} interleavings, {len(rep.outcomes)} outcomes, "
                f"{sum(rep.by_kind.values())} violations, {rep.rate:.1f} schedules/s{eta}",
                file=sys.stderr,
                flush=True,
            )

    try:
        report = engine.run_campaign(
            cfg,
            args.schedules,
            args.seed,
            workers=workers,
            cluster=args.cluster,
            keep_going=args.keep_going,
            progress=progress,
            connect_timeout=args.connect_timeout,
        )
    except engine.ClusterUnreachable as exc:
        print(f"gemu explore: --cluster: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except engine.CampaignInterrupted as exc:
        _interrupted(exc.report.summary(), exc.report.violating)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        _interrupted("before the first schedule ran", [])
        return EXIT_INTERRUPTED
    print(f"explore: {report.summary()}")
    print(f"explore: {report.coverage()}")
    return _report_violation(args, cfg, report.first)


def _interrupted(summary: str, violating: list) -> None:
    """The partial report of a search stopped by Ctrl-C: what ran, each violation found so
    far with its replay (no shrinking: the user asked to stop)."""
    print(f"explore: interrupted: {summary}", flush=True)
    for res in violating:
        _print_result(res)
        print(f"replay: gemu explore --replay {res.seed} (with the same options)")


def _exhaustive(args: argparse.Namespace, cfg, workers: int) -> int:
    from gemu.host.explore.exhaustive import BoundedSearch

    def progress(res, pending: int) -> None:
        if not args.quiet and res.run % 100 == 0:
            print(
                f"explore: {res.run} schedules ({res.distinct} distinct interleavings, "
                f"{res.pruned} pruned), {len(res.violating)} violations, "
                f"{res.rate:.1f} schedules/s",
                file=sys.stderr,
                flush=True,
            )

    seen: list = []

    def tracked(res, pending: int) -> None:
        seen[:] = [res]
        progress(res, pending)

    # In one process, the first Ctrl-C asks the search to stop once the running schedule has
    # ended: a KeyboardInterrupt raised inside the guest model's tasks had to unwind every
    # task of that schedule, which could take longer than a user waits. A second Ctrl-C
    # interrupts at once.
    stop = threading.Event()

    def on_sigint(signum, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    search = BoundedSearch(
        cfg,
        args.preemption_bound,
        reduce=not args.no_reduction,
        cache=args.state_cache,  # BoundedSearch ignores it without the reduction
        keep_going=args.keep_going,
        progress=tracked,
        should_stop=stop.is_set,
    )
    graceful = workers == 1 and threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, on_sigint) if graceful else None
    try:
        result = search.run(workers=workers)
    except KeyboardInterrupt:
        if seen:
            res = seen[0]
            _interrupted(
                f"{res.run} schedules ({res.distinct} distinct interleavings, {res.pruned} pruned)",
                res.violating,
            )
        else:
            _interrupted("before the first schedule ended", [])
        return EXIT_INTERRUPTED
    finally:
        if graceful:
            signal.signal(signal.SIGINT, old)
    if result.interrupted:
        _interrupted(result.statement(), result.violating)
        return EXIT_INTERRUPTED
    print(f"explore: {result.statement()}; {result.rate:.1f} schedules/s")
    return _report_violation(args, search.cfg, result.first)


def _report_violation(args: argparse.Namespace, cfg, first) -> int:
    from gemu.host.explore import repro

    if first is None:
        return 0
    _print_result(first)
    cfg_final, seed, schedule = cfg, first.seed, first.schedule
    if not args.no_shrink:
        shrunk = repro.shrink(cfg, first)
        cfg_final, schedule = shrunk.config, shrunk.result.schedule
        sc0, sc1 = cfg.scenario, cfg_final.scenario
        smaller = (
            ""
            if sc0.script
            else (f"{sc0.tasks}->{sc1.tasks} tasks, {sc0.jobs}->{sc1.jobs} jobs per task, ")
        )
        print(
            f"shrunk in {shrunk.runs} runs: {smaller}preemptions "
            f"{first.preemptions}->{shrunk.result.preemptions}; still {shrunk.result.kind}"
        )
    out = args.out / f"seed-{seed}"
    try:
        res = repro.write_repro(
            out,
            cfg_final,
            seed,
            schedule,
            original={"config": cfg.as_dict(), "schedule_len": len(first.schedule)},
            full=(cfg, first.schedule),
        )
    except OSError as exc:
        # the violation stands; only its files are missing, and the seed still replays it
        print(
            f"gemu explore: cannot write the reproduction into {out}: {exc.strerror or exc}; "
            f"replay by seed: gemu explore --replay {seed} (with the same options)",
            file=sys.stderr,
        )
        return EXIT_VIOLATION
    print(f"reproduction in {out}: repro.json, events.log, trace.json, race.html")
    print(f"replay: {repro.replay_command(out / 'repro.json')}")
    if res.kind != first.kind and not any(v.kind == first.kind for v in res.violations):
        print("warning: the replay did not show the same violation", file=sys.stderr)
    return 1
