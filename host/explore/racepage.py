"""DOC: a reproduction you can look at: one self-contained HTML page per violation.

``gemu explore`` writes ``race.html`` next to ``repro.json``: one lane (column) per task, the
GPU's lane among them, time running down, one row per preemption point or tracepoint that
matters (lock and unlock, fence add/signal/wait, arm and push, evict, swap-in and purge, page
allocation and reclaim, TLB flushes, doorbells, interrupts, jobs, GPU steps), the racing pair
highlighted, the violated invariant and its message at the bottom, and the replay command.
The shrunk schedule is the default view; the full one, when the violation was shrunk, is a
collapsed section below it. The page needs nothing but a browser: no network, no files::

    events = TimelineCollector()
    with events.listening():
        res = run_schedule(cfg, seed, schedule, keep_log=True)
    html = render(Timeline.of(res, events), cfg=cfg, seed=seed, replay="gemu explore --replay …")

**The racing pair** is found the way a reader would look for it: going back from where the
first violation was seen (the end, for invariants checked after the run), the last two steps of different tasks on the same object (by the footprint
:mod:`.exhaustive` uses for its reduction: the lock, fence, reservation or memory object a
preemption point names) where the second task reached that object right after a context
switch. It is a pointer for the eye, not a proof: the page says which rule chose it.
"""

from __future__ import annotations

import contextlib
import html
import json
from collections.abc import Iterator
from dataclasses import dataclass

from gemu.guest.kernel import runtime, trace
from gemu.host.explore.exhaustive import GLOBAL, footprint_of

MAX_ROWS = 20_000
"""Rows a page shows at most (a run that long is cut, the cut said at the end)."""

_KINDS = (
    ("lock", ("lock ", "trylock ", "unlock ", "ww_mutex")),
    ("fence", ("dma_fence.", "dma_resv.")),
    ("sched", ("drm_sched.",)),
    ("mm", ("alloc_", "free_pages", "swap", "shrinker", "hog")),
    ("gpu", ("advance ",)),
    ("task", ("spawn ", "start")),
)


def _kind(reason: str) -> str:
    for kind, prefixes in _KINDS:
        if reason.startswith(prefixes):
            return kind
    return "other"


@dataclass
class Row:
    step: int
    task: str
    text: str
    kind: str
    obj: str = GLOBAL
    """The object the step works on (:func:`pair_object`), for the pair."""
    trace: bool = False


class TimelineCollector:
    """Subscribes to the guest tracepoints during a replay and keeps each event with the
    runtime step it happened after."""

    def __init__(self) -> None:
        self.events: list[tuple[int, trace.TraceEvent]] = []

    def __call__(self, event: trace.TraceEvent) -> None:
        rt = runtime.current_runtime()
        if rt.deterministic and len(self.events) < MAX_ROWS:
            self.events.append((rt.steps, event))

    @contextlib.contextmanager
    def listening(self) -> Iterator[TimelineCollector]:
        trace.subscribe(self)
        try:
            yield self
        finally:
            trace.unsubscribe(self)


def _trace_text(ev: trace.TraceEvent) -> str:
    args = ", ".join(f"{k}={v}" for k, v in ev.args.items())
    phase = {"b": " begins", "e": " ends"}.get(ev.phase, "")
    return f"{ev.category}: {ev.name}{phase}" + (f" ({args})" if args else "")


@dataclass
class Timeline:
    rows: list[Row]
    tasks: list[str]
    violations: list[tuple[str, str]]
    cut: bool = False
    pair: tuple[int, int] | None = None
    """Indices into ``rows`` of the racing pair."""

    @classmethod
    def of(cls, res, events: TimelineCollector) -> Timeline:
        """The timeline of a replayed :class:`~.scenario.ScheduleResult` (run with
        ``keep_log``) and the tracepoints collected meanwhile."""
        rows: list[Row] = []
        detected: int | None = None  # the row at which the first violation was seen
        traced = iter(events.events)
        pending = next(traced, None)
        for line in res.event_log or []:
            step_s, _, rest = line.partition(" ")
            task, _, reason = rest.partition(" ")
            try:
                step = int(step_s)
            except ValueError:
                continue
            while pending is not None and pending[0] < step:
                _add_trace(rows, pending)
                pending = next(traced, None)
            if reason.startswith("VIOLATION"):
                if detected is None:
                    detected = len(rows)
                continue
            rows.append(Row(step, task, reason, _kind(reason), pair_object(reason)))
        while pending is not None:
            _add_trace(rows, pending)
            pending = next(traced, None)
        cut = len(rows) > MAX_ROWS
        rows = rows[:MAX_ROWS]
        tasks: list[str] = []
        for r in rows:
            if r.task not in tasks:
                tasks.append(r.task)
        tl = cls(rows, tasks, [(v.kind, v.message) for v in res.violations], cut)
        tl.pair = racing_pair(rows[:detected])
        return tl


def _add_trace(rows: list[Row], item: tuple[int, trace.TraceEvent]) -> None:
    step, ev = item
    rows.append(Row(step, ev.task, _trace_text(ev), ev.category, trace=True))


COARSE = frozenset({"dma_fence", "dma_resv", "drm_sched", "mm"})
"""Footprints that stand for a whole family of objects (their preemption points do not name
the instance); a pair on one of them is taken only when no named object gives one."""


def pair_object(label: str) -> str:
    """The object a step at preemption point ``label`` is paired on: its footprint
    (:func:`~.exhaustive.footprint_of`) or, for a fence or reservation point, whose instance
    the event log does not name (the search then counts it dependent with everything), the
    family it belongs to: a pointer for the eye may be coarse where the reduction must not."""
    obj = footprint_of(label)
    if obj == GLOBAL:
        family = label.partition(".")[0]
        if family in ("dma_fence", "dma_resv"):
            return family
    return obj


def racing_pair(rows: list[Row]) -> tuple[int, int] | None:
    """The last two steps of different tasks on one object, the second right after a
    context switch (module documentation); None if there is none."""
    last_on: dict[str, int] = {}
    best = coarse = None
    prev_task = None
    for i, r in enumerate(rows):
        if r.trace:
            continue
        switched = prev_task is not None and r.task != prev_task
        prev_task = r.task
        if r.obj == GLOBAL:
            continue
        j = last_on.get(r.obj)
        if j is not None and rows[j].task != r.task and switched:
            if r.obj in COARSE:
                coarse = (j, i)
            else:
                best = (j, i)
        last_on[r.obj] = i
    return best or coarse


_CSS = """
body{font:13px/1.35 system-ui,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header,footer{padding:10px 16px;background:#fff;border-bottom:1px solid #ddd}
footer{border-top:1px solid #ddd;border-bottom:0}
h1{font-size:16px;margin:0 0 4px}
h2{font-size:14px;margin:12px 16px 6px}
code{font:12px ui-monospace,monospace;background:#f0f0f0;padding:1px 4px;border-radius:3px}
table{border-collapse:collapse;width:100%;table-layout:fixed}
th{position:sticky;top:0;background:#f3f3f3;border-bottom:1px solid #ccc;padding:4px;
   font-weight:600;text-align:left;z-index:1}
td{border-right:1px solid #eee;padding:1px 4px;vertical-align:top;overflow:hidden;
   text-overflow:ellipsis;white-space:nowrap;font:12px ui-monospace,monospace}
th.step,td.step{width:4.5em;color:#888;text-align:right}
tr.trace td{color:#555;font-style:italic}
td.k-lock{color:#0b5394} td.k-fence{color:#7f3f98} td.k-sched{color:#38761d}
td.k-mm{color:#b45f06} td.k-gpu{color:#666} td.k-task{color:#999}
td.k-gem{color:#b45f06;font-weight:600} td.k-mmu{color:#a61c00;font-weight:600}
td.k-irq,td.k-job{color:#38761d}
tr.pair td.hit{background:#ffe08a;font-weight:700}
tr.pair td.step{background:#ffe08a}
.violation{color:#a61c00;font-weight:600}
.note{color:#555}
details{margin:8px 16px}
"""

_JS = """
(function(){
  var errs=[];
  window.addEventListener('error',function(e){errs.push(String(e.message));});
  var n=document.querySelectorAll('section.shrunk tbody tr').length;
  document.getElementById('rows').textContent=String(n);
  document.body.dataset.rendered=errs.length?('errors: '+errs.join('; ')):'ok';
})();
"""


CONTEXT_ROWS = 12
"""Rows shown before and after the racing pair in the page's opening excerpt."""


def _table(tl: Timeline, anchor: bool = True, window: range | None = None) -> str:
    e = html.escape
    head = "".join(f"<th>{e(t)}</th>" for t in tl.tasks)
    out = [f'<table><thead><tr><th class="step">step</th>{head}</tr></thead><tbody>']
    pair = set(tl.pair or ())
    col = {t: i for i, t in enumerate(tl.tasks)}
    for i in window if window is not None else range(len(tl.rows)):
        r = tl.rows[i]
        cls = ["trace"] if r.trace else []
        if i in pair:
            cls.append("pair")
        cells = ["<td></td>"] * len(tl.tasks)
        hit = " hit" if i in pair else ""
        cells[col[r.task]] = f'<td class="k-{e(r.kind)}{hit}" title="{e(r.text)}">{e(r.text)}</td>'
        attr = f' class="{" ".join(cls)}"' if cls else ""
        if tl.pair is not None and i == tl.pair[0]:
            attr += ' id="race"' if anchor else ""
        out.append(f'<tr{attr}><td class="step">{r.step}</td>{"".join(cells)}</tr>')
    out.append("</tbody></table>")
    if tl.cut:
        out.append(f'<p class="note">cut after {MAX_ROWS} rows</p>')
    return "\n".join(out)


def render(
    shrunk: Timeline,
    *,
    title: str,
    replay: str,
    full: Timeline | None = None,
    config: dict | None = None,
) -> str:
    """The page (a string of HTML with its CSS and script inline)."""
    e = html.escape
    pair_note = "no two tasks met on one object"
    if shrunk.pair is not None:
        a, b = (shrunk.rows[i] for i in shrunk.pair)
        pair_note = (
            f"racing pair: <b>{e(a.task)}</b> <code>{e(a.text)}</code> at step {a.step}, then "
            f"<b>{e(b.task)}</b> <code>{e(b.text)}</code> at step {b.step} "
            f'(<a href="#race">jump</a>; the last two steps of different tasks on one object, '
            "the second right after a context switch)"
        )
    verdicts = (
        "".join(f'<p class="violation">{e(kind)}: {e(msg)}</p>' for kind, msg in shrunk.violations)
        or '<p class="note">no violation in this replay</p>'
    )
    context = ""
    if shrunk.pair is not None:
        lo = max(0, shrunk.pair[0] - CONTEXT_ROWS)
        hi = min(len(shrunk.rows), shrunk.pair[1] + CONTEXT_ROWS + 1)
        context = (
            f"<section class='context'><h2>the race in context (steps {shrunk.rows[lo].step} "
            f"to {shrunk.rows[hi - 1].step})</h2>"
            f"{_table(shrunk, anchor=False, window=range(lo, hi))}</section>"
        )
    full_html = ""
    if full is not None:
        full_html = (
            f"<details><summary>the full schedule before shrinking ({len(full.rows)} rows)"
            f"</summary><section class='full'>{_table(full, anchor=False)}</section></details>"
        )
    cfg = (
        f"<details><summary>configuration</summary><pre>{e(json.dumps(config, indent=1))}"
        "</pre></details>"
        if config
        else ""
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>{_CSS}</style></head>
<body data-rendered="pending">
<header><h1>{e(title)}</h1>
<div class="note">one lane per task, time running down; <span id="rows"></span> rows;
tracepoints in italics</div>
<div>{pair_note}</div></header>
{context}
<section class="shrunk"><h2>the whole run</h2>{_table(shrunk)}</section>
{full_html}
<footer>{verdicts}<p>replay: <code>{e(replay)}</code></p>{cfg}</footer>
<script>{_JS}</script>
</body></html>
"""


__all__ = ["MAX_ROWS", "Row", "Timeline", "TimelineCollector", "racing_pair", "render"]
