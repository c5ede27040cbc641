"""DOC: bounded exhaustive search: every schedule with at most K preemptions, each class once.

Random and PCT sampling find bugs; this strategy answers the other question, "does any
interleaving of this scenario with at most K preemptions break an invariant?", and ends with a
statement a reviewer can quote::

    search = BoundedSearch(ExploreConfig(scenario=SCENARIOS["race"]), bound=1)
    result = search.run()
    result.statement()   # "all 96 distinct interleavings (up to the order of independent
                         #  steps) of race with at most 1 preemption explored (120 schedules
                         #  run, 247 pruned): 0 violations"

**The enumeration** is CHESS's iterative context bounding, done statelessly: every schedule
re-runs the scenario from the start (it is a pure function of its decisions). A run follows
a prefix of decisions, then the default policy: keep running the task that reached the
preemption point; when it blocks or exits, hand back to the task most recently preempted
that can run (as CHESS returns to the preempted thread), else to the next runnable task
after it in task-id order (round robin). Every choice that differs from the default costs
one preemption. That is CHESS's count for a switch away from a task that could go on; for a
switch at a point where the task blocked, CHESS lets every choice be free, which would make
every blocking point of a driver (each fence wait, each lock sleep, kswapd's and the GPU's
idle waits) a free branch and the small scenario's search tree exponential, so here only
the default is free there (what the literature calls delay bounding at blocking points).
Handing back to the preempted task keeps a preemption's effect local: a task run early
slots into the schedule and the rest goes on as before, so moving the preemption across
steps independent of it gives an equivalent schedule at the same cost, which the reduction
relies on. Each run records, at every decision, the runnable tasks and the cost of
choosing each.

**The reduction** is dynamic partial-order reduction (Flanagan and Godefroid, POPL 2005),
bounded as Coons, Musuvathi and McKinley's bounded partial-order reduction (OOPSLA 2013) is,
without sleep sets (below). A step (transition) is what a task runs from one preemption
point to the next. Its footprint is the object its preemption point names (``lock bo1`` -> ``bo1``; a
fence or reservation point names its instance through ``runtime.preempt(..., on=)``:
``dma_fence 3:1``, ``bo3``; scheduler points share ``drm_sched``, the page allocator and
swap share ``mm``) plus every wait queue it waited on or woke (spinlocks, fence waits,
completions); the GPU's steps (``advance``) work on ``gpu`` and on the owners of the guest
frames they touched (a BO's reservation lock, a VM's page-table lock, the ring lock); a step
that reads the runtime's clock (``runtime.now_ns()``, a timed wait's deadline and expiry)
or moves it (``runtime.advance()``, which the GPU calls after every step while other tasks
can run) works on ``runtime.CLOCK`` too, since a deadline or a timeout taken before the GPU's
step differs from one taken after it; a timestamp nothing compares is read with
``runtime.timestamp_ns()`` and does not count. A point the table does not know is dependent
with everything, and so is a fence or reservation point that did not name its instance. A
task's first step (from its start to its first point) is recorded like the others. Two
steps are dependent when their footprints meet. After each run, its races (dependent steps of two tasks that no step in
between orders, by vector clocks) say which decisions must also try the racing task: the
decision before the first step, and the one that began the run of steps of its task, so
that the reversal is reachable within the bound. A decision tries nothing else: a switch
there only reorders independent steps. Every run also gets a
fingerprint of its Mazurkiewicz trace (each step hashed with its task, footprint and the
steps it directly depends on, summed), and the statement counts the distinct ones.

**No sleep sets.** Unbounded, a task whose next step was tried at a decision above can
sleep until a dependent step runs: its branch there covers every schedule that runs that
step later. Under a preemption bound it does not: the schedule in the sleeping task's own
branch that is equivalent to running its step later has to preempt it to run the steps in
between, so it may need more preemptions than the bound leaves. The search had sleep sets
and lost outcomes to them: on four workers each taking its own lock and then one shared
lock, at K=2 it reached 21 of the 23 orders of the shared lock the naive enumeration
reaches (``tests/unit/host/test_explore_exhaustive_programs.py``). Without them it reaches
all 23, and more of the naive enumeration's trace classes everywhere (the cut-down race at
K=2: 738 of 754 instead of 699), at the price of more runs (1,536 instead of 1,291).

**The state cache** (``cache=True``, ``--state-cache``; off by default) cuts what the
reduction still runs twice. A decision's state is the
fingerprint of the trace run so far (equal for runs that only ordered independent steps
differently, and so, by the same reasoning that lets the reduction skip such runs, the same
machine state), the task at the point, the default choice and the preempted tasks (the same
default policy and the same cost for every choice from here). A run that reaches, at a
decision past its prefix with a preemption left, a state an earlier run reached with no
fewer preemptions left, tries nothing at that decision or below it: the earlier run's search
below that state covered every schedule from it within the bound. The run still goes to its
end, so its races with the steps before the state give the decisions above it their
alternatives as before. The cache assumes what the reduction assumes and adds one more
step: the races between the steps before the state and the schedules searched below it were
read on the earlier run's order of the same steps, whose decisions cost differently under
the bound. That step does not always hold, so the cache is off by default: with and without
it the search reaches the same outcomes on every scenario and program checked, and the same
trace classes on ``race`` and ``small`` at K=1, the cut-down ``race`` at K=2 (1,186 runs
instead of 1,536) and the made-up programs at K=2, but 720 of 723 classes on four workers at
K=3. At K=1 it saves nothing: below a preemption the only schedule left is the default one.

The reduction is exactly as good as the dependency: code between two preemption points that
touches shared state without a lock or wait queue the runtime sees is invisible to it, unless
it names that state with ``runtime.shared()`` (the scenario harness's list of fences). Under
a preemption bound, no partial-order reduction is complete in every case: a class whose
representatives within the bound were not run is missed, so the statement counts the classes
the search ran (on the cut-down race at K=2, 738 of the 754 the naive enumeration runs). The
test suite checks the reduction on scenarios small enough to enumerate without it: both
searches reach the same set of outcomes (verdicts and the machine's end statistics). The
built-in ``small`` at K=2 was checked once by running the naive enumeration in full
(539,661 schedules, an hour on two cores): the same 11 outcomes, with 33,899 schedules
reduced (:func:`naive_schedule_count` gives that naive count without running it).
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
    ("drm_sched.", "drm_sched"),
    ("alloc_", "mm"),
    ("free_pages", "mm"),
    ("swap", "mm"),
    ("shrinker", "mm"),
    ("hog holds", "mm"),
)


def object_key(on: object) -> str:
    """The name of the object a preemption point named with ``on`` (:func:`runtime.preempt`):
    a fence is named as its wait queue is (``dma_fence CONTEXT:SEQNO``), a reservation object
    as its lock is (``bo3``), so the steps that lock, wait on and signal one instance meet."""
    seqno = getattr(on, "seqno", None)
    if seqno is not None:
        return f"dma_fence {on.context}:{seqno}"
    lock = getattr(on, "lock", None)
    name = getattr(lock, "name", None) or getattr(on, "name", None)
    return name if isinstance(name, str) else GLOBAL


def footprint_of(label: str, on: object = None) -> str:
    """The object a step starting at preemption point ``label`` works on (:data:`GLOBAL`
    when the label does not say); ``on`` is the object the point named, if it did.

    Two labels name objects of their own: a task's first step (``start``) and a parent's
    step after starting a task (``spawn NAME``) work on nothing shared the label names
    (what they lock or wake is in the step's other objects); the GPU task's steps
    (``advance``) on the GPU, and on the objects owning the guest memory they touched
    (which the explore bus adds: :class:`~gemu.host.explore.bus.InprocBus`)."""
    if on is not None:
        return object_key(on)
    op, _, rest = label.partition(" ")
    if op == "start" or op == "spawn":
        return f"{op} {rest}"
    if op == "advance":
        return "gpu"
    if op in _OBJECT_OPS and rest:
        return rest
    for prefix, obj in _SHARED_OBJECT_PREFIXES:
        if label.startswith(prefix):
            return obj
    return GLOBAL


def _h(*parts: object) -> int:
    data = "\x1f".join(map(str, parts)).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


@dataclass
class _Step:
    """One transition: what a task ran from one preemption point to the next."""

    tid: int
    objs: frozenset[str]  # contains GLOBAL when dependent with every step
    node: int | None  # the decision that let it run (None: no choice there)
    label: str = ""  # the preemption point it started from


class _Point:
    """A decision of a run; the search keeps it across the runs that share its prefix.
    ``backtrack`` holds the tasks to be tried there (dynamic partial-order reduction, or
    every runnable one without the reduction), ``done`` those already tried."""

    __slots__ = (
        "backtrack",
        "chosen",
        "default",
        "done",
        "runnable",
        "spent",
        "tried",
    )

    def __init__(self, runnable: tuple[int, ...], default: int, chosen: int, spent: int):
        self.runnable = runnable
        self.default = default
        self.chosen = chosen
        self.spent = spent  # preemptions spent before this decision
        self.backtrack = {chosen}
        self.done = {chosen}
        self.tried = 1

    def cost(self, tid: int) -> int:
        """Preemptions spent once ``tid`` is chosen here."""
        return self.spent + (0 if tid == self.default else 1)


class _Run:
    """The chooser and recorder of one run: follow ``prefix``, then the default policy;
    record every decision and every transition with its footprint."""

    def __init__(self, prefix: list[int], visited: dict | None = None, bound: int = 0) -> None:
        self.prefix = prefix
        self.points: list[_Point] = []
        self.steps: list[_Step] = []
        self.spent = 0
        self.preempted: list[runtime.Task] = []
        self.trace = _Fingerprint()
        self.visited = visited
        self.bound = bound
        self.cut: int | None = None
        """The first decision of this run whose state an earlier run reached with at least
        as many preemptions left: everything below it was searched there."""
        self._objects: dict[tuple[str, object], str] = {}
        self._tracked = 0

    def attach(self, rt: runtime.Deterministic) -> None:
        rt.chooser = self.choose
        rt.recorder = self.record
        self._tracked = 0

    def choose(self, rt: runtime.Deterministic, runnable: list[runtime.Task]) -> runtime.Task:
        cur = runtime.current()
        default = self._default(cur, runnable)
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
            if self.visited is not None and self.cut is None and self.spent < self.bound:
                self._check_state(i, cur, default)
        self.points.append(
            _Point(tuple(t.tid for t in runnable), default.tid, chosen.tid, self.spent)
        )
        if chosen is not default:
            self.spent += 1
            if cur in runnable:
                self.preempted.append(cur)
        chosen._node = i
        return chosen

    def _check_state(self, i: int, cur: runtime.Task, default: runtime.Task) -> None:
        """Whether decision ``i`` (past the prefix, a preemption left) is at a state searched
        before (module documentation): the same trace class run so far, the same task at
        the point, the same default choice and the same preempted tasks, reached then with
        no more preemptions spent than now. Sets :attr:`cut` if so, else records the state."""
        key = (
            self.trace.total,
            cur.tid if cur is not None else -1,
            default.tid,
            tuple(t.tid for t in self.preempted if not t.done),
        )
        seen = self.visited.get(key)
        if seen is not None and seen <= self.spent:
            self.cut = i
        elif seen is None or self.spent < seen:
            self.visited[key] = self.spent

    def _default(self, cur: runtime.Task, runnable: list[runtime.Task]) -> runtime.Task:
        """The free choice: the task at the point goes on; one that blocked or exited hands
        back to the task most recently preempted that can run, else to the next runnable
        task in tid order."""
        if cur in runnable:
            return cur
        stack = self.preempted
        for k in range(len(stack) - 1, -1, -1):
            if stack[k] in runnable:
                return stack.pop(k)
        stack[:] = [t for t in stack if not t.done]
        return runtime.round_robin(cur, runnable)

    def record(self, task: runtime.Task, next_label: str | None) -> None:
        label = task._label
        on = getattr(task, "_on", None)
        key = (label, on)
        obj = self._objects.get(key) if on is None else None
        if obj is None:
            obj = footprint_of(label, on)
            if on is None:
                self._objects[key] = obj
        touched = task._touched
        objs = {obj, *touched} if touched else {obj}
        if obj == "start ":
            objs.discard(obj)
            objs.add(f"start {task.tid}")
        objs = frozenset(objs)
        st = _Step(task.tid, objs, getattr(task, "_node", None), label)
        self.steps.append(st)
        self.trace.add(st)
        task._node = None
        task._on = task._next_on
        task._next_on = None
        task._label = next_label or "exit"
        task._touched = set()
        # A task spawned since the last transition records its first one too (what its start
        # waits on or wakes, the object its first point names); the spawner's transition
        # ends right after the spawn, before the new task can run. (The runtime's task list
        # is reached through the task: a search keeps its runs, and a run that kept the
        # runtime would keep the whole machine alive.)
        tasks = task.runtime.tasks
        while self._tracked < len(tasks):
            new = tasks[self._tracked]
            if new._touched is None:
                new._touched = set()
            self._tracked += 1


class _Fingerprint:
    """A hash of a Mazurkiewicz trace, built step by step: every step hashed with its task,
    footprint and the steps it directly depends on, summed, so runs that order only
    independent steps differently get the same fingerprint (counts the distinct
    interleavings). Read ``total`` after any step: the fingerprint of the trace so far."""

    __slots__ = ("last_global", "last_of", "last_task", "total")

    def __init__(self) -> None:
        self.total = 0
        self.last_of: dict[str, int] = {}
        self.last_global = 0
        self.last_task: dict[int, int] = {}

    def add(self, st: _Step) -> None:
        prev_task = self.last_task.get(st.tid, 0)
        last_of = self.last_of
        if GLOBAL in st.objs:
            preds = sorted({self.last_global, *last_of.values()})
            h = _h(st.tid, GLOBAL, prev_task, *preds)
            last_of.clear()
            self.last_global = h
        else:
            last_global = self.last_global
            preds = sorted({last_of.get(o, last_global) for o in st.objs})
            h = _h(st.tid, *sorted(st.objs), prev_task, *preds)
            for o in st.objs:
                last_of[o] = h
        self.last_task[st.tid] = h
        self.total = (self.total + h) & 0xFFFF_FFFF_FFFF_FFFF


def races(steps: list[_Step]) -> list[tuple[int, int]]:
    """The races of a run: pairs (i, j) of steps of different tasks, i before j, that are
    dependent (their footprints meet) and not ordered by happens-before through other
    steps: reversing them may reach a different state. For each object j touches, only the
    last earlier step on it is a candidate (the earlier ones happen before that one).
    Happens-before is tracked with vector clocks over tasks."""
    clock_of_task: dict[int, dict[int, int]] = {}
    clock_of_step: list[dict[int, int]] = []
    last_of: dict[str, int] = {}
    last_global = -1
    out: list[tuple[int, int]] = []
    for j, st in enumerate(steps):
        p = st.tid
        mine = clock_of_task.get(p)
        if mine is None:
            mine = clock_of_task[p] = {}
        if GLOBAL in st.objs:
            preds = set(last_of.values())
            if last_global >= 0:
                preds.add(last_global)
        else:
            preds = {last_of.get(o, last_global) for o in st.objs}
            preds.discard(-1)
        for i in sorted(preds):
            q = steps[i].tid
            if q == p:
                continue
            ci = clock_of_step[i]
            if ci.get(q, 0) > mine.get(q, 0):  # i does not happen before j
                out.append((i, j))
        for i in preds:
            for t, c in clock_of_step[i].items():
                if c > mine.get(t, 0):
                    mine[t] = c
        mine[p] = mine.get(p, 0) + 1
        clock_of_step.append(dict(mine))
        if GLOBAL in st.objs:
            last_of.clear()
            last_global = j
        else:
            for o in st.objs:
                last_of[o] = j
    return out


def _enablers(steps: list[_Step], i: int, j: int, runnable: tuple[int, ...]) -> set[int]:
    """Tasks among ``runnable`` (the decision before step ``i``) whose running first can let
    the task of step ``j``, blocked there, run before step ``i``: the task whose step woke it
    (the last step before its wake-up that touched the queue it slept on), or that task's
    own waker, and so on; none when step ``i`` is the one that woke it. Every runnable task
    when the chain ends elsewhere (a timeout, a task not yet started)."""
    tid = steps[j].tid
    end = j
    for _depth in range(8):
        m = next((k for k in range(i + 1, end + 1) if steps[k].tid == tid), None)
        if m is None or not steps[m].label.startswith("wake "):
            break
        wq = steps[m].label[5:]
        waker = next(
            (k for k in range(m - 1, i - 1, -1) if steps[k].tid != tid and wq in steps[k].objs),
            None,
        )
        if waker == i:
            return set()  # step i itself let it run: nothing can run it earlier from here
        if waker is None:
            break
        tid, end = steps[waker].tid, waker
        if tid in runnable:
            return {tid}
    return set(runnable)


def dependent(a: frozenset[str], b: frozenset[str]) -> bool:
    """Whether two steps with footprints ``a`` and ``b`` may not commute."""
    return GLOBAL in a or GLOBAL in b or not a.isdisjoint(b)


@dataclass
class SearchResult:
    """What a bounded search found."""

    scenario: str
    bound: int
    reduce: bool
    complete: int = 0
    """Schedules run (each to its end)."""
    classes: set[int] = field(default_factory=set)
    """Fingerprints of the distinct Mazurkiewicz traces the runs were (their count is the
    number of distinct interleavings up to the order of independent steps)."""
    merged: int = 0
    """Runs that reached a state an earlier run had searched below with as many
    preemptions left: nothing below that decision was tried again."""
    pruned: int = 0
    """Alternatives within the bound that the reduction did not run: each is a schedule
    equivalent to one run (it only reorders independent steps)."""
    violating: list[ScheduleResult] = field(default_factory=list)
    outcomes: set[tuple] = field(default_factory=set)
    elapsed_s: float = 0.0
    stopped_early: bool = False
    """The search ended at its first violation (``keep_going`` off) or when interrupted."""
    interrupted: bool = False
    """Ctrl-C ended it (``gemu explore`` then exits 130 after the partial statement)."""

    @property
    def run(self) -> int:
        return self.complete

    @property
    def distinct(self) -> int:
        """Distinct interleavings: trace classes with the reduction, schedules without."""
        return len(self.classes) if self.reduce else self.complete

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
        n = self.distinct
        if self.stopped_early:
            head = (
                f"search of {self.scenario} with at most {self.bound} preemption{plural} "
                f"stopped after {n:,} {what}{up_to}"
            )
        else:
            head = (
                f"all {n:,} {what}{up_to} of {self.scenario} with at most "
                f"{self.bound} preemption{plural} explored"
            )
        merged = f", {self.merged:,} at a state searched before" if self.merged else ""
        return (
            f"{head} ({self.run:,} schedules run, {self.pruned:,} pruned{merged}): "
            f"{len(self.violating)} violation{'s' if len(self.violating) != 1 else ''}"
        )


class BoundedSearch:
    """Depth-first enumeration of ``cfg``'s schedules with at most ``bound`` preemptions
    (module documentation). ``reduce`` turns dynamic partial-order reduction on; without it
    every alternative within the bound is run (naive enumeration)."""

    def __init__(
        self,
        cfg: ExploreConfig,
        bound: int,
        *,
        reduce: bool = True,
        cache: bool = False,
        keep_going: bool = False,
        max_schedules: int | None = None,
        progress: Callable[[SearchResult, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        """``should_stop``: asked before each schedule; True ends the search as interrupted
        (the schedule that was running finished first: Ctrl-C never lands inside the model)."""
        if bound < 0:
            raise ValueError(f"the preemption bound must be 0 or more, not {bound}")
        self.cfg = replace(cfg, strategy="exhaustive", backend="greenlet")
        self.bound = bound
        self.reduce = reduce
        self.cache = cache and reduce
        self.visited: dict | None = {} if self.cache else None
        """The state cache: for each state a run reached at a decision with a preemption
        left, the fewest preemptions spent reaching it (:meth:`_Run._check_state`)."""
        self.keep_going = keep_going
        self.max_schedules = max_schedules
        self.progress = progress
        self.should_stop = should_stop

    def run(self, workers: int = 1) -> SearchResult:
        """Search; with ``workers`` > 1 the alternatives at the first schedule's decisions are
        dealt out to that many worker processes, each searching the subtrees it was given
        depth first. Alternatives a worker finds for the decisions of the first schedule
        (races reaching back above its subtrees) come back and are dealt out in a next
        round, until none is left. The result does not depend on ``workers`` but for the
        counts (a class may be run in two workers) and, with several violations, which one
        each worker met first."""
        res = SearchResult(self.cfg.scenario.name, self.bound, self.reduce)
        t0 = time.perf_counter()
        if workers > 1:
            self._parallel(res, workers, t0)
        else:
            self._search(res, [], 0, t0)
        res.elapsed_s = time.perf_counter() - t0
        res.violating.sort(key=lambda r: (len(r.schedule), r.schedule))
        return res

    def _execute(self, res: SearchResult, prefix: list[int]) -> tuple[_Run, ScheduleResult]:
        one = _Run(prefix, self.visited, self.bound)
        sched = self._schedule(one)
        res.complete += 1
        res.merged += one.cut is not None
        res.outcomes.add(outcome(sched))
        res.classes.add(one.trace.total)
        if sched.violations:
            res.violating.append(sched)
        return one, sched

    def _schedule(self, one: _Run) -> ScheduleResult:
        """Run the scenario once with ``one`` making the decisions and recording the steps
        (what a search over something other than a scenario replaces)."""
        return run_schedule(self.cfg, 0, search=one)

    def _search(
        self,
        res: SearchResult,
        path: list[_Point],
        floor: int,
        t0: float,
        *,
        budget: int | None = None,
    ) -> list[_Point]:
        """Depth first below ``path`` (decisions whose alternatives at indices below
        ``floor`` are not this search's to try): run ``path``'s choices, then the default
        policy; add the alternatives the run calls for; go back to the deepest decision
        with an untried one. Returns the path of the first run (for :meth:`_parallel`)."""
        first: list[_Point] | None = None
        prefix = [p.chosen for p in path]
        runs = 0
        try:
            while True:
                if self.max_schedules is not None and res.run >= self.max_schedules:
                    res.stopped_early = True
                    break
                if self.should_stop is not None and self.should_stop():
                    res.stopped_early = res.interrupted = True
                    break
                one, sched = self._execute(res, prefix)
                runs += 1
                path = path[: len(prefix)] + one.points[len(prefix) : one.cut]
                self._add_alternatives(path, one)
                if first is None:
                    first = path
                if self.progress is not None:
                    res.elapsed_s = time.perf_counter() - t0
                    self.progress(res, 0)
                if sched.violations and not self.keep_going:
                    res.stopped_early = True
                    break
                if budget is not None and runs >= budget:
                    break
                nxt = self._next(res, path, floor)
                if nxt is None:
                    break
                path, prefix = nxt
        except KeyboardInterrupt:
            res.stopped_early = res.interrupted = True
        return first or path

    def _add_alternatives(self, path: list[_Point], one: _Run) -> None:
        """What each decision must try besides its choice. Naive: every runnable task.
        Reduced (dynamic partial-order reduction, Flanagan and Godefroid 2005): for each
        race (i, j), the task of j at the decision before i (when it could not run there,
        the task whose step woke it, or every runnable task), and, so that the reversal
        stays within the bound, also at the decision that began the run of i's task that i
        belongs to (Coons, Musuvathi and McKinley 2013, bounded partial-order reduction).

        A task tried in place of j's blocked task must leave a preemption to spare when i's
        task is the one running at the decision before i: that choice preempts it, the
        default hands back to the most recently preempted task (i's) whenever the chosen one
        blocks, so j's task runs before i only at the cost of a second preemption. Trying it
        with no preemption left runs a schedule that cannot reverse the race."""
        if not self.reduce:
            for p in path:
                p.backtrack.update(p.runnable)
            return
        steps = one.steps
        for i, j in races(steps):
            tid = steps[j].tid
            nodes = {steps[i].node}
            k = i
            while k > 0 and steps[k - 1].tid == steps[i].tid:
                k -= 1
            nodes.add(steps[k].node)
            # i's task ran the step before i and reached its point without blocking: at the
            # decision before i it is the running task, so any other choice there puts it on
            # top of the preempted tasks, and the default hands back to it before j's task,
            # blocked there, can run: the reversal costs a second preemption there
            running = k < i and not steps[i].label.startswith("wake ")
            for n in nodes:
                if n is None or n >= len(path):
                    continue
                p = path[n]
                if tid in p.runnable:
                    p.backtrack.add(tid)
                    continue
                tids = _enablers(steps, i, j, p.runnable)
                if running and n == steps[i].node:
                    tids = {t for t in tids if p.cost(t) < self.bound}
                p.backtrack.update(tids)

    def _next(
        self, res: SearchResult, path: list[_Point], floor: int
    ) -> tuple[list[_Point], list[int]] | None:
        """The deepest decision at or above ``floor`` with an alternative left within the
        bound: the path up to it and the prefix that takes the alternative. Decisions left
        behind are finished: the alternatives within the bound they never tried count as
        pruned."""
        for n in range(len(path) - 1, floor - 1, -1):
            p = path[n]
            for tid in sorted(p.backtrack - p.done):
                p.done.add(tid)
                if p.cost(tid) > self.bound:
                    continue
                p.chosen = tid
                p.tried += 1
                return path[: n + 1], [q.chosen for q in path[: n + 1]]
            res.pruned += self._untried(p)
        return None

    def _untried(self, p: _Point) -> int:
        return sum(1 for t in p.runnable if p.cost(t) <= self.bound) - p.tried

    def _parallel(self, res: SearchResult, workers: int, t0: float) -> None:
        root = self._search(res, [], 0, t0, budget=1)
        if not res.stopped_early:
            self._deal_out(res, root, workers, t0)
        for p in root:
            res.pruned += self._untried(p)

    def _deal_out(self, res: SearchResult, root: list[_Point], workers: int, t0: float) -> None:
        args = {
            "cfg": self.cfg.as_dict(),
            "bound": self.bound,
            "reduce": self.reduce,
            "cache": self.cache,
            "keep_going": self.keep_going,
            "max_schedules": self.max_schedules,
            "root": [(p.runnable, p.default, p.chosen, p.spent) for p in root],
        }
        ctx = get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as ex:
            while True:
                items = []
                for n, p in enumerate(root):
                    for tid in sorted(p.backtrack - p.done):
                        p.done.add(tid)
                        if p.cost(tid) <= self.bound:
                            p.tried += 1  # run by a worker: not pruned
                            items.append((n, tid))
                if not items:
                    return
                shares = [items[i::workers] for i in range(workers)]
                futures = [ex.submit(_search_share, args, share) for share in shares if share]
                try:
                    for fut in futures:
                        part, found = fut.result()
                        res.complete += part.complete
                        res.pruned += part.pruned
                        res.merged += part.merged
                        res.classes |= part.classes
                        res.outcomes |= part.outcomes
                        res.violating += part.violating
                        res.stopped_early |= part.stopped_early
                        res.interrupted |= part.interrupted
                        for n, tids in found:
                            root[n].backtrack.update(tids)
                        if self.progress is not None:
                            res.elapsed_s = time.perf_counter() - t0
                            self.progress(res, 0)
                except KeyboardInterrupt:
                    for fut in futures:
                        fut.cancel()
                    res.stopped_early = res.interrupted = True
                    return
                if res.violating and not self.keep_going:
                    res.stopped_early = True
                    return


def naive_schedule_count(cfg: ExploreConfig, bound: int) -> int:
    """How many schedules the naive enumeration (``reduce=False``) of ``cfg`` runs at
    ``bound``, without running the ones with ``bound`` preemptions: the naive enumeration at
    ``bound - 1`` is run, and each of its runs that spent all ``bound - 1`` preemptions adds
    one schedule per choice costing one more at every decision after its last preemption
    (decisions before it belong to the run it branched from, which counted them). The
    schedules with ``bound`` preemptions are the larger part (small at K=2: 539,661 of
    them against 1,058 at K=1), so this measures a reduction factor where the naive
    enumeration itself would take most of an hour. It runs no reduction and no state cache.
    """
    if bound < 1:
        return 1
    extra = 0

    class _Counting(BoundedSearch):
        def _execute(self, res, prefix):
            nonlocal extra
            one, sched = super()._execute(res, prefix)
            if one.spent == bound - 1:
                # the last preemption is the prefix's last decision (none at K=0)
                for p in one.points[len(prefix) :]:
                    extra += len(p.runnable) - 1
            return one, sched

    below = _Counting(cfg, bound - 1, reduce=False, cache=False, keep_going=True).run()
    return below.run + extra


def _search_share(args: dict, share: list[tuple[int, int]]) -> tuple[SearchResult, list]:
    """A worker process's part of a parallel search: for each (decision n of the first
    schedule, task), the subtree below that alternative, depth first. Returns its result and
    the alternatives its runs added to the first schedule's decisions above the subtrees."""
    search = BoundedSearch(
        ExploreConfig.from_dict(args["cfg"]),
        args["bound"],
        reduce=args["reduce"],
        cache=args["cache"],
        keep_going=args["keep_going"],
        max_schedules=args["max_schedules"],
    )
    res = SearchResult(search.cfg.scenario.name, search.bound, search.reduce)
    t0 = time.perf_counter()
    found: dict[int, set[int]] = {}
    for n, tid in share:
        if res.stopped_early:
            break
        path = [_Point(*point) for point in args["root"][: n + 1]]
        for p in path:
            p.backtrack, p.done = set(), set()
        path[n].chosen = tid
        search._search(res, path, n + 1, t0)
        for m, p in enumerate(path[:n]):
            if p.backtrack:
                found.setdefault(m, set()).update(p.backtrack)
        if path[n].backtrack:
            found.setdefault(n, set()).update(path[n].backtrack)
    res.elapsed_s = time.perf_counter() - t0
    return res, sorted((m, sorted(t)) for m, t in found.items())


def outcome(res: ScheduleResult) -> tuple:
    """What a schedule ended with (:attr:`ScheduleResult.outcome`)."""
    return res.outcome


__all__ = [
    "GLOBAL",
    "BoundedSearch",
    "SearchResult",
    "dependent",
    "footprint_of",
    "naive_schedule_count",
    "object_key",
    "outcome",
    "races",
]
