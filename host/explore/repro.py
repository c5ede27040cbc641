"""DOC: reproductions of a violating schedule, and shrinking them.

:func:`shrink` makes a failing schedule smaller while it still fails with the same invariant:
first the scenario (fewer tasks, jobs, BOs, reclaim rounds; same seed, the strategy picks a
fresh schedule; a job script scenario skips this), then the recorded decisions (runs of decisions are made to continue the
previously picked task, so the schedule has fewer preemptions; a variant the program cannot
follow is dropped).

:func:`write_repro` replays the final schedule with tracing on and writes, into a directory:

- ``repro.json``: seed, configuration, recorded schedule, the violations and the replay
  command (``gemu explore --replay DIR/repro.json``, which reproduces the run exactly);
- ``events.log``: the runtime's event log, one preemption point a line;
- ``trace.json``: the tracepoints (Chrome trace-event format: chrome://tracing, Perfetto);
- ``race.html``: the run drawn as one lane per task with the racing pair highlighted
  (:mod:`.racepage`), open it in any browser.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

from gemu.guest.kernel import runtime
from gemu.host.explore.racepage import Timeline, TimelineCollector, render
from gemu.host.explore.scenario import (
    ExploreConfig,
    ScheduleResult,
    count_switches,
    run_schedule,
)


@dataclass
class Shrunk:
    config: ExploreConfig
    seed: int
    result: ScheduleResult
    runs: int


def _same_failure(res: ScheduleResult, kind: str) -> bool:
    return any(v.kind == kind for v in res.violations)


def _try(cfg: ExploreConfig, seed: int, replay: list[int] | None) -> ScheduleResult | None:
    try:
        return run_schedule(cfg, seed, replay)
    except runtime.ReplayDivergence:
        return None


def shrink(cfg: ExploreConfig, first: ScheduleResult, budget: int = 60) -> Shrunk:
    """A smaller configuration and schedule that still violates ``first``'s invariant."""
    kind = first.kind
    best_cfg, best = cfg, first
    runs = 0
    # 1. a smaller scenario, same seed (a job script is kept as it is)
    progress = not cfg.scenario.script
    while progress and runs < budget // 2:
        progress = False
        sc = best_cfg.scenario
        candidates = []
        if sc.tasks > 1:
            candidates.append(replace(sc, tasks=sc.tasks - 1))
        if sc.jobs > 1:
            candidates.append(replace(sc, jobs=sc.jobs - 1))
        if sc.reclaims > 0:
            candidates.append(replace(sc, reclaims=sc.reclaims - 1))
        if sc.private_bos > 1:
            candidates.append(replace(sc, private_bos=sc.private_bos - 1))
        if sc.shared_bos > 1:
            candidates.append(replace(sc, shared_bos=sc.shared_bos - 1))
        if sc.files > 1:
            candidates.append(replace(sc, files=sc.files - 1))
        for cand in candidates:
            if runs >= budget // 2:
                break
            c = replace(best_cfg, scenario=cand)
            runs += 1
            res = _try(c, first.seed, None)
            if res is not None and _same_failure(res, kind):
                best_cfg, best, progress = c, res, True
                break
    # 2. fewer preemptions: let runs of decisions continue the previous pick
    sched = list(best.schedule)
    chunk = max(1, len(sched) // 4)
    while chunk >= 1 and runs < budget:
        i = 1
        while i < len(sched) and runs < budget:
            prev = sched[i - 1]
            seg = sched[i : i + chunk]
            if all(x == prev for x in seg):
                i += chunk
                continue
            variant = sched[:i] + [prev] * len(seg) + sched[i + chunk :]
            runs += 1
            res = _try(best_cfg, first.seed, variant)
            if res is None:
                runs += 1
                res = _try(best_cfg, first.seed, variant[: i + len(seg)])
            if (
                res is not None
                and _same_failure(res, kind)
                and count_switches(res.schedule) < count_switches(sched)
            ):
                best, sched = res, list(res.schedule)
            i += chunk
        chunk //= 2
    return Shrunk(best_cfg, first.seed, best, runs)


def replay(
    cfg: ExploreConfig,
    seed: int,
    schedule: list[int],
    trace_path: Path | None = None,
    timeline: TimelineCollector | None = None,
) -> ScheduleResult:
    """Run the recorded ``schedule`` again (with the tracepoints written to ``trace_path``
    by :class:`gemu.host.tracefile.TraceWriter` and kept by ``timeline``, if given)."""
    with contextlib.ExitStack() as stack:
        if trace_path is not None:
            from gemu.host.tracefile import TraceWriter

            stack.enter_context(TraceWriter(trace_path))
        if timeline is not None:
            stack.enter_context(timeline.listening())
        return run_schedule(cfg, seed, schedule, keep_log=True)


def replay_command(path: Path) -> str:
    return f"gemu explore --replay {path}"


def write_repro(
    out: Path,
    cfg: ExploreConfig,
    seed: int,
    schedule: list[int],
    *,
    original: dict | None = None,
    full: tuple[ExploreConfig, list[int]] | None = None,
) -> ScheduleResult:
    """Replay ``schedule`` and write repro.json, events.log, trace.json and race.html into
    ``out``; ``full`` (the configuration and schedule before shrinking) becomes the page's
    expandable full view."""
    out.mkdir(parents=True, exist_ok=True)
    events = TimelineCollector()
    res = replay(cfg, seed, schedule, out / "trace.json", events)
    (out / "events.log").write_text("\n".join(res.event_log or []) + "\n")
    full_timeline = None
    if full is not None and (full[0] != cfg or full[1] != schedule):
        full_events = TimelineCollector()
        full_res = replay(full[0], seed, full[1], timeline=full_events)
        full_timeline = Timeline.of(full_res, full_events)
    kinds = ", ".join(v.kind for v in res.violations) or "no violation"
    page = render(
        Timeline.of(res, events),
        title=f"gemu explore: {cfg.scenario.name}, seed {seed}: {kinds}",
        replay=replay_command(out / "repro.json"),
        full=full_timeline,
        config=cfg.as_dict(),
    )
    (out / "race.html").write_text(page, encoding="utf-8")
    doc = {
        "seed": seed,
        "config": cfg.as_dict(),
        "schedule": schedule,
        "preemptions": count_switches(schedule),
        "steps": res.steps,
        "violations": [{"kind": v.kind, "message": v.message} for v in res.violations],
        "replay": replay_command(out / "repro.json"),
        "original": original,
    }
    (out / "repro.json").write_text(json.dumps(doc, indent=1) + "\n")
    return res


def load_repro(path: Path) -> tuple[ExploreConfig, int, list[int], dict]:
    doc = json.loads(Path(path).read_text())
    return ExploreConfig.from_dict(doc["config"]), doc["seed"], doc["schedule"], doc
