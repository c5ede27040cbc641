"""DOC: the machine's views as plain data: one function per view, every face formats it.

As QEMU's ``query-*`` commands return structures that HMP's ``info`` merely formats, each
view here returns plain data (dicts, lists, ints, strings, None) that the console's ``info``
formats, :meth:`~gemu.host.machine.Machine.query` returns, and a control socket can send as
JSON. None of them computes its own figures::

    with Machine(ram_size=16 << 20, device="inproc") as m:
        mem = m.query("mem")                 # {"free_pages": ..., "watermarks": {...}, ...}
        sh = Shell(m, print)
        sh.run_text("a = bo 8K\\n")
        objs = query(m, "objects", sh)       # the console session's BOs

Views of the machine (``shrinker``, ``swap``, ``mem``, ``ring``, ``lockdep``, ``stats``)
need only the machine. Views of a console session (``objects``, ``mmu``, ``fences``,
``tasks``) name the session's BOs, fences and tasks, so they need that session (a
:class:`~gemu.host.shell.Shell`); without one they raise :class:`QueryError`.
"""

from __future__ import annotations

import errno as errno_mod
from typing import TYPE_CHECKING, Any

from gemu.guest.locking import lockdep

if TYPE_CHECKING:
    from gemu.host.machine import Machine
    from gemu.host.shell import Shell

__all__ = ["MACHINE_VIEWS", "SESSION_VIEWS", "VIEWS", "QueryError", "query"]

_PA_MASK = ((1 << 48) - 1) & ~0xFFF
"""A PTE's output address bits (what ``info mmu`` shows as a page's physical address)."""


class QueryError(ValueError):
    """A view that does not exist, or one that needs a console session asked without one."""


def errno_name(e: int) -> str:
    """``EFAULT`` for -14 or 14; the number itself for an unknown errno."""
    return errno_mod.errorcode.get(abs(e), str(abs(e)))


def obj_state(obj) -> str:
    """A shmem GEM object's state as the views name it: purged (madvise'd and reclaimed),
    evicted (in swap), pinned, resident, or no-pages (never populated)."""
    if obj.madv < 0:
        return "purged"
    if obj.evicted:
        return "evicted"
    if obj.pages_pin_count:
        return "pinned"
    if obj.pages is not None:
        return "resident"
    return "no-pages"


# -- views of the machine -------------------------------------------------------------------
def shrinker(m: Machine, session: Shell | None = None) -> dict | None:
    """The shmem shrinker's counters and LRU sizes in pages (None: no shrinker)."""
    return m.statistics().get("shrinker")


def swap(m: Machine, session: Shell | None = None) -> dict | None:
    """Swap use and I/O counters (None: the machine has no swap)."""
    return m.statistics().get("swap")


def mem(m: Machine, session: Shell | None = None) -> dict:
    """The page allocator: free and total pages, its counters, and the zone watermarks."""
    wm = m.allocator.watermarks
    return {
        **m.statistics()["mem"],
        "watermarks": {"min": wm.min, "low": wm.low, "high": wm.high},
    }


def ring(m: Machine, session: Shell | None = None) -> dict:
    """The command ring (size and base in bytes, slots, tail) and the GPU's counters."""
    gpu = m.driver.gpu
    return {
        "size": gpu.ring_size,
        "base": gpu.ring_pa,
        "slots": gpu.ring_slots,
        "tail": gpu.tail,
        **gpu.statistics(),
    }


def lockdep_reports(m: Machine, session: Shell | None = None) -> list[dict]:
    """Lockdep's reports, each once with its count (for a session: since it started)."""
    since = session.lockdep_base if session is not None else 0
    return [
        {"kind": r.kind, "count": r.count, "message": r.message, "task": r.task}
        for r in lockdep.reports()[since:]
    ]


def stats(m: Machine, session: Shell | None = None) -> dict:
    """Every counter of the machine, nested as :meth:`Machine.statistics` gives them."""
    return m.statistics()


# -- views of a console session -------------------------------------------------------------
def _need(session: Shell | None, view: str) -> Shell:
    if session is None:
        raise QueryError(f"view {view!r} shows a console session's state: it needs a session")
    return session


def objects(m: Machine, session: Shell | None = None) -> dict:
    """The session's BOs with their page counters, state and GPU VA (None: not mapped), and
    how many GEM objects the device holds (the driver's own included)."""
    sh = _need(session, "objects")
    out = []
    for bo in sh.user_bos():
        obj = sh.file.bo(bo.handle).obj
        out.append(
            {
                "name": bo.name,
                "handle": bo.handle,
                "size": bo.size,
                "state": obj_state(obj),
                "pages_use_count": obj.pages_use_count,
                "pages_pin_count": obj.pages_pin_count,
                "madv": obj.madv,
                "va": bo.va,
            }
        )
    return {"objects": out, "gem_objects": m.dev.object_count}


def mmu(m: Machine, session: Shell | None = None) -> dict:
    """The GPU's address-space slots, the session's VM and where its BOs' first pages are
    (``first_page_pa`` None: not mapped), and the MMU counters."""
    sh = _need(session, "mmu")
    gpu = m.driver.gpu
    slots = [
        {"slot": i, "vm": vm.name, "jobs": vm.as_users, "root_table": vm.root_pa}
        for i, vm in enumerate(gpu.mmu.slots)
        if vm is not None
    ]
    mappings = []
    for bo in sh.user_bos():
        if bo.va is None:
            continue
        pte = sh.file.vm.lookup(bo.va)
        mappings.append(
            {
                "va": bo.va,
                "name": bo.name,
                "size": bo.size,
                "first_page_pa": (pte & _PA_MASK) if pte else None,
            }
        )
    return {
        "address_spaces": slots,
        "vm": sh.file.vm.name,
        "mapped_pages": sh.file.vm.mapped_pages,
        "mappings": mappings,
        "stats": dict(gpu.mmu.stats.__dict__),
    }


def fences(m: Machine, session: Shell | None = None) -> list[dict]:
    """The session's job fences: pending, signaled, or failed with an errno name."""
    sh = _need(session, "fences")
    out = []
    for fv in list(sh.fences.values()):
        f = fv.fence
        if not f.signaled:
            state, error = "pending", None
        elif f.error:
            state, error = "failed", errno_name(f.error)
        else:
            state, error = "signaled", None
        out.append(
            {"name": fv.name, "seqno": f.seqno, "state": state, "error": error, "what": fv.what}
        )
    return out


def tasks(m: Machine, session: Shell | None = None) -> list[dict]:
    """The session's ``task`` blocks: where each started, running/done/failed (and where it
    failed), and whether it was joined."""
    sh = _need(session, "tasks")
    out = []
    for t in list(sh.tasks.values()):
        state = "running" if t.ok is None else ("done" if t.ok else "failed")
        out.append(
            {
                "name": t.name,
                "where": t.where,
                "state": state,
                "failed_at": t.failed_at,
                "joined": t.joined,
            }
        )
    return out


MACHINE_VIEWS = {
    "shrinker": shrinker,
    "swap": swap,
    "mem": mem,
    "ring": ring,
    "lockdep": lockdep_reports,
    "stats": stats,
}
"""The views that need only the machine."""

SESSION_VIEWS = {"objects": objects, "mmu": mmu, "fences": fences, "tasks": tasks}
"""The views of a console session's BOs, fences and tasks."""

VIEWS = {**MACHINE_VIEWS, **SESSION_VIEWS}


def query(m: Machine, view: str, session: Shell | None = None) -> Any:
    """The data of one view; :class:`QueryError` names a view that does not exist."""
    fn = VIEWS.get(view)
    if fn is None:
        raise QueryError(f"unknown view {view!r} (known: {', '.join(VIEWS)})")
    return fn(m, session)
