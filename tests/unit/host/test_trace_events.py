"""-trace's list of tracepoints (host/tracefile.EVENTS) is every tracepoint the sources emit,
with its kind, so ``-trace help`` and the pattern check never miss or invent one."""

from __future__ import annotations

import re
from pathlib import Path

from gemu.host.tracefile import EVENTS, TraceFilter, event_name, parse_trace_spec

ROOT = Path(__file__).resolve().parents[3]
CALL = re.compile(r"trace\.(instant|begin|end|counter)\(\s*\"([a-z_]+)\",\s*\"([a-z_]+)\"")
KIND = {"instant": "i", "begin": "b", "end": "b", "counter": "C"}


def test_events_match_the_tracepoints_in_the_sources():
    found = set()
    for sub in ("guest", "device", "host"):
        for path in (ROOT / sub).rglob("*.py"):
            for call, cat, name in CALL.findall(path.read_text()):
                found.add((cat, name, KIND[call]))
    assert found == set(EVENTS)


def test_names_and_filter_order():
    assert event_name("job", "job", "b") == "job_begin"
    assert event_name("gem", "evict", "i") == "gem_evict"
    assert event_name("irq", "irq", "i") == "irq"
    f = TraceFilter(["gem_*", "-gem_purge", "gem_pur*"])
    assert f("gem_evict") and f("gem_purge") and not f("job_begin")
    patterns, out = parse_trace_spec("enable=-irq,file=x.log")
    assert patterns == ["-irq"] and out == "x.log"
