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

``-trace PATTERN`` (QEMU's spelling) enables tracepoints by name (:func:`event_name`:
``gem_evict``, ``job_begin``...; globs, ``-`` to disable) and prints them to the log
(:class:`TraceLog`, ``-D FILE`` or stderr); with ``--trace FILE`` too, only the enabled
events go into the JSON file.
"""

from __future__ import annotations

import fnmatch
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from gemu.guest.kernel import trace

PID = 1


class TraceWriter:
    """Collects trace events while subscribed; :meth:`close` writes the JSON file."""

    def __init__(self, path: str | Path, enabled: Callable[[str], bool] | None = None) -> None:
        self.path = Path(path)
        self.enabled = enabled
        """Which events (by :func:`event_name`) are written; None: all."""
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
        if self.enabled is not None and not self.enabled(
            event_name(ev.category, ev.name, ev.phase)
        ):
            return
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


# --- QEMU's -trace: trace events by name, printed to the log -------------------------------

EVENTS: tuple[tuple[str, str, str], ...] = (
    ("gem", "evict", "i"),
    ("gem", "purge", "i"),
    ("gem", "swapin", "b"),
    ("gem", "vma_node_unmap", "i"),
    ("gpu", "reset", "i"),
    ("irq", "irq", "i"),
    ("job", "job", "b"),
    ("lock", "wait", "b"),
    ("mm", "direct_reclaim", "b"),
    ("mm", "drop_slab", "b"),
    ("mm", "free_pages", "C"),
    ("mm", "kswapd", "i"),
    ("mmu", "fault", "i"),
    ("sched", "timeout", "i"),
    ("shrinker", "lru_pages", "C"),
    ("shrinker", "scan", "i"),
)
"""Every guest tracepoint (category, name, kind: i instant, b span, C counter);
tests/unit/host/test_trace_events.py checks it against the sources."""


def event_name(category: str, name: str, phase: str) -> str:
    """A tracepoint's name as ``-trace`` matches it, QEMU-style: ``gem_evict``,
    ``shrinker_scan``, ``irq``; a span's two ends are ``job_begin``/``job_end``."""
    base = category if name == category else f"{category}_{name}"
    if phase == "b":
        return f"{base}_begin"
    if phase == "e":
        return f"{base}_end"
    return base


def event_names() -> list[str]:
    """Every name ``-trace`` can enable, sorted (``-trace help`` lists them)."""
    out = []
    for cat, name, kind in EVENTS:
        if kind == "b":
            out += [event_name(cat, name, "b"), event_name(cat, name, "e")]
        else:
            out.append(event_name(cat, name, kind))
    return sorted(out)


class TraceSpecError(ValueError):
    """A ``-trace`` value gemu cannot honour."""


def parse_trace_spec(text: str) -> tuple[list[str], str | None]:
    """QEMU's ``-trace [[enable=]PATTERN][,events=FILE][,file=FILE]``: the glob patterns it
    enables (an events file has one per line, ``#`` comments; a leading ``-`` disables) and
    the output file, if named. :class:`TraceSpecError` names what is wrong."""
    patterns: list[str] = []
    out = None
    for i, part in enumerate(text.split(",")):
        key, eq, value = part.partition("=")
        if not eq:
            if i:
                raise TraceSpecError(f"{text!r}: {part!r}: use enable=, events= or file=")
            key, value = "enable", part
        if key == "enable":
            if not value:
                raise TraceSpecError(f"{text!r}: enable= needs a pattern")
            patterns.append(value)
        elif key == "events":
            try:
                lines = Path(value).read_text().splitlines()
            except OSError as exc:
                raise TraceSpecError(f"events={value}: {exc.strerror or exc}") from None
            patterns += [
                ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")
            ]
        elif key == "file":
            out = value
        else:
            raise TraceSpecError(f"{text!r}: option {key!r} is not supported by gemu")
    for p in patterns:
        name = p.removeprefix("-")
        if name != "help" and not any(fnmatch.fnmatchcase(n, name) for n in event_names()):
            raise TraceSpecError(f"{p!r} matches no trace event (gemu boot -trace help lists them)")
    return patterns, out


class TraceFilter:
    """Which events the ``-trace`` patterns enable: the last pattern that matches a name
    decides (``-name`` disables), as QEMU applies its patterns in order."""

    def __init__(self, patterns: list[str]) -> None:
        self.patterns = patterns
        self._cache: dict[str, bool] = {}

    def __call__(self, name: str) -> bool:
        hit = self._cache.get(name)
        if hit is None:
            hit = False
            for p in self.patterns:
                neg = p.startswith("-")
                if fnmatch.fnmatchcase(name, p.removeprefix("-")):
                    hit = not neg
            self._cache[name] = hit
        return hit


class TraceLog:
    """Prints the enabled events to the log, as QEMU's log backend does:
    ``PID@SECONDS.MICROS:name key=value ...`` (plus the guest task that emitted it)."""

    def __init__(self, enabled: TraceFilter, write: Callable[[str], None]) -> None:
        self.enabled = enabled
        self.write = write
        self.count = 0
        self._pid = os.getpid()

    def start(self) -> None:
        trace.subscribe(self.record)

    def close(self) -> None:
        trace.unsubscribe(self.record)

    def record(self, ev: trace.TraceEvent) -> None:
        name = event_name(ev.category, ev.name, ev.phase)
        if not self.enabled(name):
            return
        now = time.time()
        args = " ".join(f"{k}={_jsonable(v)}" for k, v in ev.args.items())
        ident = f" id={ev.id:#x}" if ev.id is not None else ""
        self.count += 1
        self.write(f"{self._pid}@{now:.6f}:{name}{ident} {args} task={ev.task}".replace("  ", " "))
