"""DOC: tracepoints of the guest kernel model.

Guest code marks interesting moments with tracepoints, in the spirit of the kernel's
``TRACE_EVENT()`` and QEMU's trace-events; whoever wants them (the emulator's ``--trace``
writer, a test) subscribes. With no subscriber a tracepoint costs one attribute test, so hot
paths guard argument building with :data:`enabled`::

    from gemu.guest.kernel import trace

    if trace.enabled:
        trace.instant("shrinker", "scan", nr_to_scan=n, freed=freed)
    trace.begin("job", "job", job_id, ring="gemu", seqno=seqno)   # async span ...
    trace.end("job", "job", job_id, error=0)                      # ... closed later

Events carry the runtime clock (virtual nanoseconds in deterministic mode, monotonic in free
runs) and the name of the running task, so a trace shows who did what when.

Categories in use: ``job`` (submit to fence signal, per ring), ``sched`` (run_job, timeout),
``irq``, ``mmu`` (faults, TLB flushes), ``gem`` (evict, swapin, purge), ``shrinker`` (scans),
``mm`` (direct reclaim, kswapd), ``lock`` (contention), ``lockdep`` (reports).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: True while at least one subscriber listens; test it before building costly arguments.
enabled = False

_subscribers: list[Callable[[TraceEvent], None]] = []
_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """One event. ``phase`` follows the Chrome trace-event format: ``i`` instant, ``b``/``e``
    begin/end of an async span identified by ``(category, name, id)``, ``C`` a counter."""

    ts_ns: int
    task: str
    category: str
    name: str
    phase: str
    id: int | None = None
    args: dict[str, Any] = field(default_factory=dict)


def subscribe(fn: Callable[[TraceEvent], None]) -> None:
    """Call ``fn(event)`` for every event from now on (in the task that emits it)."""
    global enabled
    with _lock:
        _subscribers.append(fn)
        enabled = True


def unsubscribe(fn: Callable[[TraceEvent], None]) -> None:
    global enabled
    with _lock:
        if fn in _subscribers:
            _subscribers.remove(fn)
        enabled = bool(_subscribers)


def _emit(category: str, name: str, phase: str, id: int | None, args: dict[str, Any]) -> None:
    from gemu.guest.kernel import runtime

    task = runtime.current()
    try:
        ts = task.runtime.now_ns()
    except Exception:  # a runtime that is shutting down still gets its events out
        ts = 0
    event = TraceEvent(ts, task.name, category, name, phase, id, args)
    for fn in tuple(_subscribers):
        fn(event)


def instant(category: str, name: str, **args: Any) -> None:
    """Something happened now."""
    if enabled:
        _emit(category, name, "i", None, args)


def begin(category: str, name: str, id: int, **args: Any) -> None:
    """An async span starts (it may end in another task)."""
    if enabled:
        _emit(category, name, "b", id, args)


def end(category: str, name: str, id: int, **args: Any) -> None:
    """The async span ``(category, name, id)`` ends."""
    if enabled:
        _emit(category, name, "e", id, args)


def counter(category: str, name: str, **values: float) -> None:
    """Sampled values (free frames, swap used...) shown as a counter track."""
    if enabled:
        _emit(category, name, "C", None, values)
