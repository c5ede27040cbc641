"""The guest tracepoints the emulator's --trace and event log rely on: GEM evict, swap-in
and purge, shrinker scans, direct reclaim, and lock contention (mutex and ww_mutex)."""

from __future__ import annotations

import threading

import pytest

from gemu.guest.kernel import trace
from gemu.guest.locking import ww_mutex
from gemu.guest.locking.mutex import Mutex
from gemu.host.machine import Machine
from gemu.host.shell import Shell


@pytest.fixture
def events():
    seen: list[trace.TraceEvent] = []
    trace.subscribe(seen.append)
    yield seen
    trace.unsubscribe(seen.append)


def _names(events, phase=None):
    return [f"{e.category}.{e.name}" for e in events if phase is None or e.phase == phase]


def test_reclaim_evict_swapin_purge_are_traced(events):
    """drop-caches shows as a drop_slab span with a shrinker scan inside that evicts (or
    purges) objects; using an evicted BO shows a swap-in span naming it."""
    with Machine(ram_size=8 << 20, swap_size=16 << 20, device="inproc") as m:
        sh = Shell(m, lambda line: None)
        assert sh.run_text(
            "a = bo 64K\nb = bo 64K\nfill a 1\nmadvise b dontneed\ndrop-caches\n"
            "expect state a evicted\nexpect state b purged\nread a 0 4\n"
        )
        sh.poweroff()
    names = _names(events)
    assert names.index("mm.drop_slab") < names.index("shrinker.scan")
    assert {"gem.evict", "gem.purge", "mm.free_pages", "shrinker.lru_pages"} <= set(names)
    swapins = [e for e in events if e.name == "swapin"]
    assert [e.phase for e in swapins] == ["b", "e"] and swapins[0].id == swapins[1].id
    assert swapins[1].args["ok"] is True
    scan = next(e for e in events if e.name == "scan")
    assert scan.args["freed"] >= 16 and "nr_to_scan" in scan.args


def test_contended_mutex_wait_is_a_span(events):
    """A task that must wait for a mutex emits lock.wait begin (naming the lock and its
    holder) and, once it has the lock, the matching end; an uncontended lock emits none."""
    lock = Mutex("test_lock")
    waiting = threading.Event()
    got = threading.Event()

    def on_event(e):
        if e.category == "lock" and e.phase == "b" and e.args["lock"] == "test_lock":
            waiting.set()

    trace.subscribe(on_event)
    try:
        lock.lock()
        t = threading.Thread(target=lambda: (lock.lock(), got.set(), lock.unlock()))
        t.start()
        assert waiting.wait(10)
        lock.unlock()
        t.join(10)
    finally:
        trace.unsubscribe(on_event)
    assert got.is_set()
    waits = [e for e in events if e.category == "lock" and e.args["lock"] == "test_lock"]
    assert [e.phase for e in waits] == ["b", "e"] and waits[0].id == waits[1].id
    assert waits[0].args["lock"] == "test_lock" and "held by" in waits[0].args["holder"]


def test_contended_ww_mutex_wait_is_a_span(events):
    """The same for a ww_mutex taken without a context."""
    wl = ww_mutex.WwMutex(ww_mutex.WD_CLASS("test_ww"), "ww_test")
    waiting = threading.Event()

    def on_event(e):
        if e.category == "lock" and e.phase == "b" and e.args["lock"] == "ww_test":
            waiting.set()

    trace.subscribe(on_event)
    try:
        ww_mutex.lock(wl, None)
        t = threading.Thread(target=lambda: (ww_mutex.lock(wl, None), ww_mutex.unlock(wl)))
        t.start()
        assert waiting.wait(10)
        ww_mutex.unlock(wl)
        t.join(10)
    finally:
        trace.unsubscribe(on_event)
    waits = [e for e in events if e.category == "lock" and e.args["lock"] == "ww_test"]
    assert [e.phase for e in waits] == ["b", "e"]
    assert waits[0].args["lock"] == "ww_test" and waits[1].args["died"] is False
