"""DOC: bounded exhaustive search: every schedule with at most K preemptions, each class once.

Random and PCT sampling find bugs; this strategy answers the other question, "does any
interleaving of this scenario with at most K preemptions break an invariant?", and ends with a
statement a reviewer can quote::

    search = BoundedSearch(ExploreConfig(scenario=SCENARIOS["small"]), bound=1)
    result = search.run()
    result.statement()   # "all 412 distinct interleavings of small with at most 1 preemption
                         #  explored (1,530 schedules run, 1,118 pruned): 0 violations"

**The enumeration** is CHESS's iterative context bounding, done statelessly: every schedule
re-runs the scenario from the start (it is a pure function of its decisions). A run follows
a prefix of decisions, then the default policy: keep running the task that reached the
preemption point; when it blocks or exits, run the next runnable task after it in task-id
order (round robin). Every choice that differs from the default costs one preemption. That
is CHESS's count for a switch away from a task that could go on; for a switch at a point
where the task blocked, CHESS lets every choice be free, which would make every blocking
point of a driver (each fence wait, each lock sleep, kswapd's and the GPU's idle waits) a
free branch and the small scenario's search tree exponential, so here only the round-robin
successor is free there (what the literature calls delay bounding at blocking points). Each
run records, at every decision it made after its prefix, the runnable tasks and the cost of
choosing each; every alternative within the bound becomes a new prefix on the search stack.

**The reduction** merges schedules that differ only in the order of independent steps. A
step (transition) is what a task runs from one preemption point to the next. Its footprint
is the object named at the preemption point it started from (``lock bo1`` -> ``bo1``; fence,
reservation, scheduler and memory-manager operations each share one object, since their
points do not name the instance) plus every wait queue it waited on or woke (spinlocks,
fence waits, completions); a point the table below does not know, a task's start, and the
runtime's clock (``advance``, the GPU's steps) are dependent with everything. Two steps are
dependent when their footprints meet or they are steps of one task. Each step is hashed with
its task, label, footprint and the hashes of the steps it depends on directly, and the
schedule so far is the sum of its step hashes: two prefixes that order only independent
steps differently get the same hash (a Mazurkiewicz trace fingerprint). A decision reached
again with the same fingerprint, the same task at the point and no more preemptions left
than when it was first reached has a future already being explored, and the run is
abandoned there (counted as pruned). This is stateful reduction over trace equivalence:
unlike sleep sets or DPOR alone it stays sound under a preemption bound, because a merged
state is only skipped when the earlier visit had at least the budget left.

The reduction is exactly as good as the dependency: code between two preemption points that
touches shared state without a lock or wait queue the runtime sees is invisible to it. The
test suite checks the reduction on a scenario small enough to enumerate without it: both
searches reach the same set of outcomes (verdicts and the machine's end statistics).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_context

from gemu.guest.kernel import runtime
from gemu.host.explore.scenario import ExploreConfig, ScheduleResult, run_schedule

GLOBAL = "*"
"""The footprint of a step that is dependent with every other step."""

_OBJECT_OPS = {
    "lock",
    "trylock",
    "unlock",
    "ww_mutex_lock",
    "ww_mutex_lock_slow",
    "ww_mutex_lock_interruptible",
    "ww_mutex_trylock",
    "ww_mutex_unlock",
    "wake",
}
_SHARED_OBJECT_PREFIXES = (
    ("dma_fence.", "dma_fence"),
    ("dma_resv.", "dma_resv"),
    ("drm_sched.", "drm_sched"),
    ("alloc_", "mm"),
    ("free_pages", "mm"),
    ("swap", "mm"),
    ("shrinker", "mm"),
    ("hog holds", "mm"),
)


def footprint_of(label: str) -> str:
    """The object a step starting at preemption point ``label`` works on (:data:`GLOBAL`
    when the label does not say)."""
    op, _, rest = label.partition(" ")
    if op in _OBJECT_OPS and rest:
        return rest
    for prefix, obj in _SHARED_OBJECT_PREFIXES:
        if label.startswith(prefix):
            return obj
    return GLOBAL


def _h(*parts: object) -> int:
    data = "\x1f".join(map(str, parts)).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class _TraceHasher:
    """Hashes one run's steps into a fingerprint of its Mazurkiewicz trace."""

    def __init__(self) -> None:
        self.total = 0
        self._last_of: dict[str, int] = {}  # object -> hash of the last step that touched it
        self._last_global = 0
        self._last_task: dict[int, int] = {}
        self._objects: dict[str, str] = {}

    def record(self, task: runtime.Task, next_label: str | None) -> None:
        label = task._label
        obj = self._objects.get(label)
        if obj is None:
            obj = self._objects[label] = footprint_of(label)
        touched = task._touched
        objs = {obj} | touched if touched else {obj}
        last_of = self._last_of
        prev_task = self._last_task.get(task.tid, 0)
        if GLOBAL in objs:
            preds = sorted({self._last_global, *last_of.values()})
            h = _h(task.tid, label, GLOBAL, prev_task, *preds)
            last_of.clear()
            self._last_global = h
        else:
            preds = sorted({last_of.get(o, self._last_global) for o in objs})
            h = _h(task.tid, label, *sorted(objs), prev_task, *preds)
            for o in objs:
                last_of[o] = h
        self._last_task[task.tid] = h
        self.total = (self.total + h) & 0xFFFF_FFFF_FFFF_FFFF
        task._label = next_label or "exit"
        task._touched = set()


@dataclass
class _Point:
    runnable: tuple[int, ...]
    default: int
    chosen: int
    spent: int  # preemptions spent before this decision


class _Run:
    """The chooser and recorder of one run: follow ``prefix``, then the default policy."""

    def __init__(self, search: BoundedSearch, prefix: list[int]) -> None:
        self.search = search
        self.prefix = prefix
        self.points: list[_Point] = []
        self.spent = 0
        self.trace = _TraceHasher() if search.reduce else None

    def attach(self, rt: runtime.Deterministic) -> None:
        rt.chooser = self.choose
        if self.trace is not None:
            rt.recorder = self.trace.record

    def choose(self, rt: runtime.Deterministic, runnable: list[runtime.Task]) -> runtime.Task:
        cur = runtime.current()
        default = runtime.round_robin(cur, runnable)
        i = len(self.points)
        if i < len(self.prefix):
            chosen = rt._by_tid.get(self.prefix[i])
            if chosen is None or chosen not in runnable:
                raise runtime.ReplayDivergence(
                    f"search decision {i} picks task {self.prefix[i]}, but only "
                    f"{[t.tid for t in runnable]} can run"
                )
        else:
            chosen = default
            if self.trace is not None:
                self.search._visit(self.trace.total, cur.tid, cur is default, self.spent)
        self.points.append(
            _Point(tuple(t.tid for t in runnable), default.tid, chosen.tid, self.spent)
        )
        if chosen is not default:
            self.spent += 1
        return chosen


@dataclass
class SearchResult:
    """What a bounded search found."""

    scenario: str
    bound: int
    reduce: bool
    complete: int = 0
    """Schedules run to the end: the distinct interleavings (classes, with the reduction)."""
    pruned: int = 0
    """Schedules abandoned because their future was already being explored."""
    violating: list[ScheduleResult] = field(default_factory=list)
    outcomes: set[tuple] = field(default_factory=set)
    elapsed_s: float = 0.0
    stopped_early: bool = False
    """The search ended at its first violation (``keep_going`` off) or when interrupted."""
    interrupted: bool = False
    """Ctrl-C ended it (``gemu explore`` then exits 130 after the partial statement)."""

    @property
    def run(self) -> int:
        return self.complete + self.pruned

    @property
    def first(self) -> ScheduleResult | None:
        return self.violating[0] if self.violating else None

    @property
    def rate(self) -> float:
        return self.run / self.elapsed_s if self.elapsed_s else 0.0

    def statement(self) -> str:
        """The one-line result, quotable in a review."""
        plural = "" if self.bound == 1 else "s"
        what = "distinct interleavings"
        up_to = " (up to the order of independent steps)" if self.reduce else ""
        if self.stopped_early:
            head = (
                f"search of {self.scenario} with at most {self.bound} preemption{plural} "
                f"stopped after {self.complete:,} {what}{up_to}"
            )
        else:
            head = (
                f"all {self.complete:,} {what}{up_to} of {self.scenario} with at most "
                f"{self.bound} preemption{plural} explored"
            )
        return (
            f"{head} ({self.run:,} schedules run, {self.pruned:,} pruned): "
            f"{len(self.violating)} violation{'s' if len(self.violating) != 1 else ''}"
        )


class BoundedSearch:
    """Depth-first enumeration of ``cfg``'s schedules with at most ``bound`` preemptions
    (module documentation). ``reduce`` turns the trace-equivalence reduction on."""

    def __init__(
        self,
        cfg: ExploreConfig,
        bound: int,
        *,
        reduce: bool = True,
        keep_going: bool = False,
        max_schedules: int | None = None,
        progress: Callable[[SearchResult, int], None] | None = None,
    ) -> None:
        if bound < 0:
            raise ValueError(f"the preemption bound must be 0 or more, not {bound}")
        self.cfg = replace(cfg, strategy="exhaustive", backend="greenlet")
        self.bound = bound
        self.reduce = reduce
        self.keep_going = keep_going
        self.max_schedules = max_schedules
        self.progress = progress
        self._visited: dict[tuple[int, int, bool], int] = {}

    def _visit(self, trace: int, cur: int, preemptive: bool, spent: int) -> None:
        key = (trace, cur, preemptive)
        seen = self._visited.get(key)
        if seen is not None and seen <= spent:
            raise runtime.RunAbandoned("explored")
        self._visited[key] = spent

    def run(self, workers: int = 1) -> SearchResult:
        """Search; with ``workers`` > 1 the branches of the first schedule are dealt out to
        that many worker processes, each searching its share depth first with its own record
        of visited states (pruning stays sound within a worker; across workers a class may be
        run twice, never missed). The result does not depend on ``workers`` but for those
        counts and, with several violations, which one each worker met first."""
        res = SearchResult(self.cfg.scenario.name, self.bound, self.reduce)
        t0 = time.perf_counter()
        stack: list[list[int]] = [[]]
        if workers > 1:
            self._search(res, stack, budget=1)  # the first schedule, its branches pending
            if stack and not (res.violating and not self.keep_going):
                self._parallel(res, stack, workers)
                stack = []
        else:
            self._search(res, stack)
        res.elapsed_s = time.perf_counter() - t0
        res.violating.sort(key=lambda r: (len(r.schedule), r.schedule))
        return res

    def _search(self, res: SearchResult, stack: list[list[int]], budget: int | None = None):
        t0 = time.perf_counter() - res.elapsed_s
        runs = 0
        try:
            while stack:
                if budget is not None and runs >= budget:
                    return
                if self.max_schedules is not None and res.run >= self.max_schedules:
                    res.stopped_early = True
                    return
                prefix = stack.pop()
                runs += 1
                one = _Run(self, prefix)
                try:
                    sched = run_schedule(self.cfg, 0, search=one)
                except runtime.RunAbandoned:
                    res.pruned += 1
                    sched = None
                else:
                    res.complete += 1
                    res.outcomes.add(outcome(sched))
                    if sched.violations:
                        res.violating.append(sched)
                self._branch(one, stack)
                if self.progress is not None:
                    res.elapsed_s = time.perf_counter() - t0
                    self.progress(res, len(stack))
                if sched is not None and sched.violations and not self.keep_going:
                    res.stopped_early = bool(stack)
                    return
        except KeyboardInterrupt:
            res.stopped_early = res.interrupted = True

    def _parallel(self, res: SearchResult, stack: list[list[int]], workers: int) -> None:
        shares = [stack[i::workers] for i in range(workers)]
        args = {
            "cfg": self.cfg.as_dict(),
            "bound": self.bound,
            "reduce": self.reduce,
            "keep_going": self.keep_going,
            "max_schedules": None
            if self.max_schedules is None
            else max(0, self.max_schedules - res.run) // workers,
        }
        ctx = get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as ex:
            futures = [ex.submit(_search_share, args, share) for share in shares if share]
            try:
                for fut in futures:
                    part = fut.result()
                    res.complete += part.complete
                    res.pruned += part.pruned
                    res.outcomes |= part.outcomes
                    res.violating += part.violating
                    res.stopped_early |= part.stopped_early
                    res.interrupted |= part.interrupted
                    if self.progress is not None:
                        self.progress(res, 0)
            except KeyboardInterrupt:
                for fut in futures:
                    fut.cancel()
                res.stopped_early = res.interrupted = True

    def _branch(self, one: _Run, stack: list[list[int]]) -> None:
        """Push every alternative within the bound at the decisions this run made after its
        prefix (later decisions first popped: depth first)."""
        chosen = [p.chosen for p in one.points]
        for i in range(len(one.prefix), len(one.points)):
            p = one.points[i]
            for tid in p.runnable:
                if tid == p.chosen:
                    continue
                cost = p.spent + (0 if tid == p.default else 1)
                if cost <= self.bound:
                    stack.append([*chosen[:i], tid])


def _search_share(args: dict, share: list[list[int]]) -> SearchResult:
    """A worker process's part of a parallel search: depth first from its prefixes."""
    search = BoundedSearch(
        ExploreConfig.from_dict(args["cfg"]),
        args["bound"],
        reduce=args["reduce"],
        keep_going=args["keep_going"],
        max_schedules=args["max_schedules"],
    )
    res = SearchResult(search.cfg.scenario.name, search.bound, search.reduce)
    stack = list(share)  # the order the single-process search would pop them in
    search._search(res, stack)
    return res


def outcome(res: ScheduleResult) -> tuple:
    """What a schedule ended with (:attr:`ScheduleResult.outcome`)."""
    return res.outcome


__all__ = ["GLOBAL", "BoundedSearch", "SearchResult", "footprint_of", "outcome"]
