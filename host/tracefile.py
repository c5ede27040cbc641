"""DOC: ``--trace FILE``: the guest's tracepoints as a Chrome/Perfetto trace-event JSON file.

:class:`TraceWriter` subscribes to :mod:`gemu.guest.kernel.trace` and turns every
:class:`~gemu.guest.kernel.trace.TraceEvent` into one Chrome trace event: ``ph`` ``i``
(instant, thread scope), ``b``/``e`` (async span: a job from submit to fence signal, a lock
wait), ``C`` (counter); ``ts`` in microseconds from the start of the trace; ``pid`` 1 (the
guest kernel), ``tid`` one per task with its name as thread metadata. Open the file at
https://ui.perfetto.dev or chrome://tracing::

    with TraceWriter("run.json"):
        ...                      # boot, run jobs
    # run.json written on exit
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from gemu.guest.kernel import trace

PID = 1


class TraceWriter:
    """Collects trace events while subscribed; :meth:`close` writes the JSON file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.events: list[dict] = []
        self._tids: dict[str, int] = {}
        self._t0: int | None = None
        self._lock = threading.Lock()
        self._open = False

    def __enter__(self) -> TraceWriter:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        if not self._open:
            trace.subscribe(self.record)
            self._open = True

    def record(self, ev: trace.TraceEvent) -> None:
        with self._lock:
            if self._t0 is None:
                self._t0 = ev.ts_ns
            tid = self._tids.setdefault(ev.task, len(self._tids) + 1)
            out = {
                "name": ev.name,
                "cat": ev.category,
                "ph": ev.phase,
                "ts": max(0, ev.ts_ns - self._t0) / 1000,
                "pid": PID,
                "tid": tid,
            }
            if ev.phase == "i":
                out["s"] = "t"
            if ev.id is not None:
                out["id"] = f"{ev.category}:{ev.id:#x}"
            if ev.args:
                out["args"] = {k: _jsonable(v) for k, v in ev.args.items()}
            self.events.append(out)

    def close(self) -> None:
        """Stop listening and write the file (once)."""
        if not self._open:
            return
        trace.unsubscribe(self.record)
        self._open = False
        with self._lock:
            meta = [{"name": "process_name", "ph": "M", "pid": PID, "args": {"name": "gemu guest"}}]
            meta += [
                {"name": "thread_name", "ph": "M", "pid": PID, "tid": tid, "args": {"name": n}}
                for n, tid in self._tids.items()
            ]
            doc = {"traceEvents": meta + self.events, "displayTimeUnit": "ms"}
        self.path.write_text(json.dumps(doc, separators=(",", ":")))

    def counts(self) -> dict[str, int]:
        """Events per ``category.name`` (for summaries and tests)."""
        out: dict[str, int] = {}
        for e in self.events:
            key = f"{e['cat']}.{e['name']}"
            out[key] = out.get(key, 0) + 1
        return out


def _jsonable(v):
    if isinstance(v, bool | int | float | str) or v is None:
        return v
    return str(v)
