"""TraceWriter: guest TraceEvents as Chrome trace-event JSON."""

from __future__ import annotations

import json

from gemu.guest.kernel import trace
from gemu.host.tracefile import TraceWriter


def test_events_become_chrome_trace_events(tmp_path):
    """Instants, async spans and counters keep their phase; ts is in microseconds from the
    first event; each task is a tid with thread_name metadata; args survive as JSON."""
    path = tmp_path / "t.json"
    with TraceWriter(path) as w:
        trace.instant("gem", "evict", obj="bo1", pages=4)
        trace.begin("job", "job", 7, ring="gemu0")
        trace.end("job", "job", 7, error=0)
        trace.counter("mm", "free_pages", free=12)
    assert not trace.enabled or trace._subscribers  # unsubscribed on exit
    doc = json.loads(path.read_text())
    evs = [e for e in doc["traceEvents"] if e["ph"] != "M"]
    assert [e["ph"] for e in evs] == ["i", "b", "e", "C"]
    assert evs[0]["ts"] == 0 and evs[0]["s"] == "t" and evs[0]["args"] == {"obj": "bo1", "pages": 4}
    assert evs[1]["id"] == evs[2]["id"] == "job:0x7"
    assert evs[3]["args"] == {"free": 12}
    meta = [e for e in doc["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"]
    assert {m["tid"] for m in meta} == {e["tid"] for e in evs}
    assert w.counts() == {"gem.evict": 1, "job.job": 2, "mm.free_pages": 1}
