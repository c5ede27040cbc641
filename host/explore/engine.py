"""DOC: campaigns: many schedules, in parallel processes or on a Dask cluster.

A campaign runs schedule ``i`` with seed ``seed + i`` for ``i`` in ``0..schedules-1``. Work
goes out in batches, to ``workers`` local processes (``spawn`` start method: a deterministic
run's worker threads do not survive ``fork``) or, with ``cluster``, to a Dask distributed
scheduler (``distributed.Client(address)``; the workers need gemu importable). Results are
always taken in seed order, and a campaign that stops at the first violation counts only the
schedules up to that one, so the report is the same whatever the worker count::

    cfg = ExploreConfig(strategy="pct", mutant="no-tlb-flush")
    report = run_campaign(cfg, schedules=200, seed=0, workers=2)
    report.first.kind              # "content"
    report.schedules_run           # schedules up to and including the first violation

Ctrl-C (KeyboardInterrupt) stops a campaign between two results: :class:`CampaignInterrupted`
carries the partial report (worker processes ignore SIGINT, so only the campaign stops, and
none of them prints a traceback). A Dask scheduler that cannot be reached within
``connect_timeout`` seconds raises :class:`ClusterUnreachable` naming the address.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

from gemu.guest.kernel import runtime
from gemu.host.explore.scenario import (
    ExploreConfig,
    ScheduleResult,
    Violation,
    resolve,
    run_schedule,
    scenario_for_mutant,
)


def run_one(cfg_dict: dict, seed: int) -> dict:
    """Run one schedule; a picklable summary (what travels between processes)."""
    res = run_schedule(ExploreConfig.from_dict(cfg_dict), seed)
    return summarize(res)


def summarize(res: ScheduleResult) -> dict:
    return {
        "seed": res.seed,
        "violations": [(v.kind, v.message) for v in res.violations],
        "steps": res.steps,
        "schedule": res.schedule,
        "interleaving": res.interleaving,
        "stats": res.stats,
    }


def unsummarize(d: dict) -> ScheduleResult:
    return ScheduleResult(
        d["seed"],
        [Violation(k, m) for k, m in d["violations"]],
        d["steps"],
        d["schedule"],
        d["interleaving"],
        None,
        d.get("stats", {}),
    )


@dataclass
class CampaignReport:
    """What a campaign found. ``first`` is the lowest-seed violating schedule."""

    config: ExploreConfig
    seed: int
    schedules_run: int = 0
    interleavings: set[str] = field(default_factory=set)
    by_kind: Counter = field(default_factory=Counter)
    violating: list[ScheduleResult] = field(default_factory=list)
    elapsed_s: float = 0.0
    workers: int = 1
    cluster: str | None = None
    outcomes: dict[tuple, int] = field(default_factory=dict)
    """Each distinct outcome (:attr:`ScheduleResult.outcome`) and the schedule (counted from
    1) that first ended with it: the coverage figure."""

    @property
    def first(self) -> ScheduleResult | None:
        return self.violating[0] if self.violating else None

    @property
    def rate(self) -> float:
        return self.schedules_run / self.elapsed_s if self.elapsed_s else 0.0

    def verdicts(self) -> list[tuple[int, tuple[str, ...], str]]:
        """(seed, kinds, interleaving) of every violating schedule: equal for equal seeds."""
        return [
            (r.seed, tuple(v.kind for v in r.violations), r.interleaving) for r in self.violating
        ]

    def coverage(self) -> str:
        """Whether more schedules would still find new behaviour: the distinct outcomes seen
        and when the last new one came."""
        n = self.schedules_run
        if not n:
            return "coverage: no schedule ran"
        last = max(self.outcomes.values(), default=0)
        verdict = (
            "no new one in the second half: more schedules are unlikely to find new behaviour"
            if last <= n // 2
            else "new ones still came late: more schedules may find new behaviour"
        )
        return (
            f"coverage: {len(self.outcomes)} distinct outcomes (verdicts and end statistics) "
            f"in {n} schedules, the last new one at schedule {last}; {verdict}"
        )

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.by_kind.items())) or "none"
        where = f"cluster {self.cluster}" if self.cluster else f"{self.workers} worker(s)"
        cfg = self.config
        strategy = cfg.strategy
        if strategy == "pct":
            strategy += f" depth {cfg.pct_depth} over {cfg.pct_steps} steps"
        return (
            f"{self.schedules_run} schedules ({strategy}, mutant "
            f"{cfg.mutant}) on {where}: {len(self.interleavings)} distinct "
            f"interleavings, violations by kind: {kinds}; {self.rate:.1f} schedules/s"
        )


class CampaignInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a campaign; ``report`` holds the schedules run until then."""

    def __init__(self, report: CampaignReport) -> None:
        super().__init__(f"interrupted after {report.schedules_run} schedules")
        self.report = report


class ClusterUnreachable(ConnectionError):
    """No Dask scheduler answered at the address within the connect timeout."""


def _init_worker(counter, cpus: list[int]) -> None:
    """Worker process initializer: Ctrl-C is for the campaign (the parent stops it), then
    the next CPU of ``cpus`` for this worker's tasks."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if cpus:
        _pin_worker(counter, cpus)


def _pin_worker(counter, cpus: list[int]) -> None:
    """The next CPU of ``cpus`` for this worker's tasks."""
    with counter.get_lock():
        i = counter.value
        counter.value += 1
    runtime.pin_tasks(cpus[i % len(cpus)])


class _LocalPool:
    """Schedules in this process (one worker) or in spawned worker processes. Each worker
    runs its tasks' threads on one CPU of its own (:func:`runtime.pin_tasks`): a deterministic
    schedule hands a baton between threads at every preemption point, and a hand-off within
    one CPU is about twice as fast as one across CPUs."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pinned = None
        if workers > 1:
            ctx = get_context("spawn")
            cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
            self._ex = ProcessPoolExecutor(
                workers,
                mp_context=ctx,
                initializer=_init_worker,
                initargs=(ctx.Value("i", 0), cpus),
            )
        else:
            self._ex = None
            self._pinned = runtime._task_cpu
            runtime.pin_tasks(runtime.current_cpu())

    def map(self, cfg_dict: dict, seeds: list[int]) -> list[dict]:
        if self._ex is None:
            return [run_one(cfg_dict, s) for s in seeds]
        chunk = max(1, len(seeds) // (self.workers * 4))
        return list(self._ex.map(run_one, [cfg_dict] * len(seeds), seeds, chunksize=chunk))

    def close(self) -> None:
        if self._ex is not None:
            self._ex.shutdown(cancel_futures=True)
        else:
            runtime.pin_tasks(self._pinned)


CONNECT_TIMEOUT_S = 10.0
"""How long a campaign waits for a Dask scheduler to answer."""


class _DaskPool:
    def __init__(self, address: str, connect_timeout: float = CONNECT_TIMEOUT_S) -> None:
        from distributed import Client

        try:
            self.client = Client(address, timeout=connect_timeout)
        except (OSError, TimeoutError, ValueError, TypeError) as exc:
            raise ClusterUnreachable(
                f"no Dask scheduler at {address} answered within {connect_timeout:g} s: {exc}"
            ) from None
        self.workers = max(1, len(self.client.scheduler_info().get("workers", {})))

    def map(self, cfg_dict: dict, seeds: list[int]) -> list[dict]:
        futures = self.client.map(run_one, [cfg_dict] * len(seeds), seeds, pure=False)
        return self.client.gather(futures)

    def close(self) -> None:
        self.client.close()


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def batches(seed: int, schedules: int, size: int) -> Iterator[list[int]]:
    for start in range(0, schedules, size):
        yield [seed + i for i in range(start, min(schedules, start + size))]


def run_campaign(
    cfg: ExploreConfig,
    schedules: int,
    seed: int = 0,
    *,
    workers: int = 1,
    cluster: str | None = None,
    keep_going: bool = False,
    progress: Callable[[CampaignReport], None] | None = None,
    batch: int | None = None,
    connect_timeout: float = CONNECT_TIMEOUT_S,
) -> CampaignReport:
    """Run ``schedules`` schedules of ``cfg``; stop at the first violation unless
    ``keep_going``. ``progress(report)`` is called after every batch.

    Raises:
        CampaignInterrupted: Ctrl-C; its ``report`` is the partial report.
        ClusterUnreachable: ``cluster`` did not answer within ``connect_timeout`` seconds.
    """
    pool = _DaskPool(cluster, connect_timeout) if cluster else _LocalPool(workers)
    try:
        # measured once here, so every worker spreads PCT's drops alike
        cfg = resolve(cfg)
    except BaseException:
        pool.close()
        raise
    report = CampaignReport(cfg, seed, workers=pool.workers, cluster=cluster)
    size = batch or max(8, pool.workers * 32)
    cfg_dict = cfg.as_dict()
    t0 = time.perf_counter()
    try:
        for seeds in batches(seed, schedules, size):
            for d in pool.map(cfg_dict, seeds):
                res = unsummarize(d)
                report.schedules_run += 1
                report.interleavings.add(res.interleaving)
                report.outcomes.setdefault(res.outcome, report.schedules_run)
                if res.violations:
                    report.violating.append(res)
                    for kind in {v.kind for v in res.violations}:
                        report.by_kind[kind] += 1
                    if not keep_going:
                        break
            report.elapsed_s = time.perf_counter() - t0
            if progress is not None:
                progress(report)
            if report.violating and not keep_going:
                break
    except KeyboardInterrupt:
        report.elapsed_s = time.perf_counter() - t0
        raise CampaignInterrupted(report) from None
    finally:
        pool.close()
    report.elapsed_s = time.perf_counter() - t0
    return report


def schedules_to_detection(
    cfg: ExploreConfig, seed: int, limit: int, *, batch: int = 4
) -> tuple[int | None, str | None]:
    """Schedules run until the first violation (None if none within ``limit``) and its kind,
    in this process."""
    report = run_campaign(cfg, limit, seed, workers=1, batch=batch)
    if report.first is None:
        return None, None
    return report.schedules_run, report.first.kind


def mutant_table(
    mutants: list[str],
    strategies: tuple[str, ...] = ("random", "pct"),
    seeds: int = 20,
    limit: int = 500,
    workers: int = 1,
) -> list[dict]:
    """docs/validation.md's table: per mutant and strategy, the median number of schedules to
    the first violation over ``seeds`` campaigns (campaign ``k`` starts at seed ``1000 k``),
    how many campaigns found it within ``limit``, and the invariants that caught it. Each
    mutant runs on its scenario (:func:`~.scenario.scenario_for_mutant`: the standard one but
    for the reset mutant, which needs a hang, and the VM_BIND flavour's, which run on
    ``gpuvm``)."""
    import statistics

    rows = []
    for mutant in mutants:
        row: dict = {"mutant": mutant}
        for strategy in strategies:
            cfg = ExploreConfig(
                scenario=scenario_for_mutant(mutant), strategy=strategy, mutant=mutant
            )
            counts, kinds = [], Counter()
            for k in range(seeds):
                rep = run_campaign(cfg, limit, 1000 * k, workers=workers, batch=4 * workers)
                if rep.first is not None:
                    counts.append(rep.schedules_run)
                    kinds[rep.first.kind] += 1
            row[strategy] = {
                "median": statistics.median(counts) if counts else None,
                "found": len(counts),
                "kinds": dict(kinds),
            }
        rows.append(row)
    return rows
