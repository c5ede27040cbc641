"""Guest tracepoints: silent without subscribers, complete with one."""

from gemu.guest.kernel import runtime, trace


def test_events_reach_subscribers_with_task_and_clock():
    """A subscriber sees instant, span and counter events with the emitting task's name and
    the runtime clock; after unsubscribing, tracepoints are disabled again."""
    seen = []
    trace.subscribe(seen.append)
    try:
        assert trace.enabled
        trace.instant("gem", "evict", pages=4)
        trace.begin("job", "job", 7, seqno=1)
        trace.end("job", "job", 7, error=0)
        trace.counter("mm", "free", frames=12)
    finally:
        trace.unsubscribe(seen.append)
    assert not trace.enabled
    assert [(e.category, e.name, e.phase, e.id) for e in seen] == [
        ("gem", "evict", "i", None),
        ("job", "job", "b", 7),
        ("job", "job", "e", 7),
        ("mm", "free", "C", None),
    ]
    assert seen[0].args == {"pages": 4}
    assert seen[0].task == runtime.current().name
    assert seen[1].ts_ns <= seen[2].ts_ns


def test_deterministic_runtime_stamps_virtual_time():
    """Under the deterministic runtime events carry virtual time, so traces replay exactly."""
    seen = []

    def main():
        trace.instant("x", "start")
        runtime.sleep_ns(5_000)
        trace.instant("x", "later")

    trace.subscribe(seen.append)
    try:
        runtime.Deterministic(seed=1).run(main)
    finally:
        trace.unsubscribe(seen.append)
    assert [e.name for e in seen] == ["start", "later"]
    assert seen[1].ts_ns - seen[0].ts_ns == 5_000
