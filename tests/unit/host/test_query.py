"""The query layer: every console ``info`` view is plain data from one function, the same
data :meth:`Machine.query` returns, and the console only formats it."""

from __future__ import annotations

import json
import os

import pytest

from gemu.host import query
from gemu.host.machine import Machine
from gemu.host.shell import INFO_VIEWS, Shell

SCRIPT = (
    "a = bo 8K\nb = bo 16K\nfill a 7\nf = submit copy a b\nwait f\npin a\n"
    "g = submit fault\nwait g\nexpect error EFAULT\nmadvise b dontneed\npressure 4M\n"
    "task t1\necho hi\nend\njoin t1\n"
)


@pytest.fixture
def session():
    with Machine(ram_size=8 << 20, swap_size=16 << 20, device="inproc") as m:
        lines: list[str] = []
        sh = Shell(m, lines.append)
        sh.lines = lines
        assert sh.run_text(SCRIPT), lines
        yield sh
        sh.run_line("unpin a")
        sh.poweroff()
        m.check_clean()


def test_every_info_view_is_a_query_and_json_data(session):
    """The console's views and the query layer's are the same set, and each view's data
    survives a JSON round trip unchanged (plain data, fit for a control socket)."""
    assert set(query.VIEWS) == set(INFO_VIEWS)
    for view in INFO_VIEWS:
        data = session.m.query(view, session)
        assert json.loads(json.dumps(data)) == data, view


def test_session_views_carry_the_sessions_state(session):
    """objects, mmu, fences and tasks name the session's BOs, fences and tasks, with the
    states the console shows."""
    m = session.m
    objs = {o["name"]: o for o in m.query("objects", session)["objects"]}
    assert objs["a"]["state"] == "pinned" and objs["a"]["pages_pin_count"] == 1
    assert objs["b"]["state"] == "purged" and objs["b"]["madv"] == -1
    assert m.query("objects", session)["gem_objects"] == m.dev.object_count
    fences = {f["name"]: f for f in m.query("fences", session)}
    assert fences["f"]["state"] == "signaled" and fences["f"]["error"] is None
    assert fences["g"]["state"] == "failed" and fences["g"]["error"] == "EFAULT"
    assert m.query("tasks", session) == [
        {"name": "t1", "where": "<text>:12", "state": "done", "failed_at": None, "joined": True}
    ]
    maps = {mp["name"]: mp for mp in m.query("mmu", session)["mappings"]}
    assert maps["a"]["first_page_pa"] is not None and maps["b"]["first_page_pa"] is None


def test_machine_views_match_the_counters(session):
    """mem, ring and shrinker carry the machine's own counters, and the console prints
    those very figures."""
    m = session.m
    mem = m.query("mem")
    wm = m.allocator.watermarks
    assert mem["watermarks"] == {"min": wm.min, "low": wm.low, "high": wm.high}
    assert mem["free_pages"] == m.allocator.nr_free
    ring = m.query("ring")
    assert ring["jobs_emitted"] == 2 and ring["mmu_faults"] == 1
    assert m.query("shrinker")["purged"] == 1
    assert m.query("lockdep") == []
    session.lines.clear()
    session.run_line("info mem")
    assert session.lines[0].startswith(f"mem: {mem['free_pages']} of {mem['total_pages']} pages")
    session.lines.clear()
    session.run_line("info ring")
    assert f"jobs {ring['jobs_emitted']}, " in session.lines[1]


def test_session_view_without_a_session_and_unknown_view_are_refused(session):
    """A session view asked of the bare machine, and a view that does not exist, raise
    QueryError naming the view."""
    with pytest.raises(query.QueryError, match=r"'objects'.*needs a session"):
        session.m.query("objects")
    with pytest.raises(query.QueryError, match=r"unknown view 'nope'.*known: shrinker"):
        session.m.query("nope")


def test_the_swap_view_names_the_page_copy(session, monkeypatch):
    """``info swap`` and query-gemu-swap say which copy moves fragmented batches: the C
    one this install built, or the Python one (GEMU_PAGECOPY=python, or not built)."""
    from gemu.guest.mm import extents

    # ci/setup.sh builds the C copy; GEMU_PAGECOPY=python keeps the model off it
    want = "python" if os.environ.get("GEMU_PAGECOPY") == "python" else "C"
    assert session.m.query("swap", session)["page_copy"] == want
    session.lines.clear()
    session.run_line("info swap")
    assert f"  page copy {want}" in session.lines
    monkeypatch.setattr(extents, "native_copy_pages", None)
    assert session.m.query("swap", session)["page_copy"] == "python"
