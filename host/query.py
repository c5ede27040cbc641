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

Views of the machine (``shrinker``, ``swap``, ``mem``, ``ring``, ``lockdep``, ``stats``,
``reclaim``) need only the machine. Views of a console session (``objects``, ``mmu``,
``fences``, ``tasks``, ``vms``) name the session's BOs, VMs, fences and tasks, so they need
that session (a :class:`~gemu.host.shell.Shell`); without one they raise
:class:`QueryError`. ``vms`` and ``reclaim`` show the VM_BIND driver flavour (driver mode
``vm-bind``): a session's VMs with their mappings, vm_bos, evict and extobj lists, and the
per-VM shrinker's LRUs and BO reclaim states; in driver mode per-bo they are ``[]`` and None.
"""

from __future__ import annotations

import errno as errno_mod
from typing import TYPE_CHECKING, Any

from gemu.guest.locking import lockdep
from gemu.guest.mm import extents

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
    """Swap use and I/O counters (None: the machine has no swap), and which page copy moves
    fragmented batches: ``"C"`` (guest/mm/_pagecopy.c) or ``"python"`` (not built, or
    ``GEMU_PAGECOPY=python``)."""
    out = m.statistics().get("swap")
    if out is not None:
        out["page_copy"] = "python" if extents.native_copy_pages is None else "C"
    return out


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


def _vm_bind(m: Machine):
    return getattr(m, "vm_bind", None)


def _bo_name(drv, obj) -> str:
    rec = drv.records.get(obj)
    return rec.name if rec is not None else repr(obj)


def reclaim(m: Machine, session: Shell | None = None) -> dict | None:
    """The VM_BIND flavour's per-VM shrinker (Panthor's): its counters, the BOs on each LRU
    (least recently used first), the VMs in reclaim order (least recently active first, each
    with its LRU of private BOs), and every BO's reclaim state. None in driver mode per-bo."""
    drv = _vm_bind(m)
    if drv is None:
        return None
    r = drv.reclaim
    with r.lock:  # the LRUs and the VM list change only under it
        unused = [_bo_name(drv, o) for o in r.unused]
        shared = [_bo_name(drv, o) for o in r.gpu_mapped_shared]
        vms = [
            {
                "vm": vm.name,
                "pages": vm.reclaim_lru.count,
                "lru": [_bo_name(drv, o) for o in vm.reclaim_lru],
            }
            for vm in r.vms
        ]
    bos = [
        {
            "name": rec.name,
            "size": obj.size,
            "state": obj_state(obj),
            "reclaim_state": rec.reclaim_state.name,
            "reclaimed_count": rec.reclaimed_count,
            "private_vm": rec.exclusive_vm.name if rec.exclusive_vm is not None else None,
        }
        for obj, rec in list(drv.records.items())
    ]
    return {
        "stats": r.stats.as_dict(),
        "unused": unused,
        "gpu_mapped_shared": shared,
        "vms": vms,
        "bos": sorted(bos, key=lambda b: b["name"]),
    }


# -- views of a console session -------------------------------------------------------------
def _need(session: Shell | None, view: str) -> Shell:
    if session is None:
        raise QueryError(f"view {view!r} shows a console session's state: it needs a session")
    return session


def objects(m: Machine, session: Shell | None = None) -> dict:
    """The session's BOs with their page counters, state and GPU VA (None: not mapped), and
    how many GEM objects the device holds (the driver's own included). Driver mode vm-bind:
    ``va`` is None (a BO may be bound at many VAs, see ``vms``), ``private_vm`` names the VM
    a BO is private to (None: external) and ``reclaim_state`` is its per-VM shrinker state."""
    sh = _need(session, "objects")
    out = []
    vm_bind = _vm_bind(m) is not None
    for bo in sh.user_bos():
        rec = sh.file.bo(bo.handle)
        obj = rec.obj
        extra = {}
        if vm_bind:
            extra = {"private_vm": bo.vm, "reclaim_state": rec.reclaim_state.name}
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
                **extra,
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
    if _vm_bind(m) is not None:
        return _mmu_vm_bind(m, sh, slots)
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


def _mmu_vm_bind(m: Machine, sh: Shell, slots: list[dict]) -> dict:
    """``mmu`` in driver mode vm-bind: every mapping of the session's VMs with where its first
    page is (``first_page_pa`` None: not in the page table, e.g. evicted)."""
    mappings = []
    pages = 0
    names = []
    for vv in list(sh.vms.values()):
        gvm = sh.file.vms.get(vv.vm_id)
        if gvm is None:
            continue
        names.append(gvm.name)
        pages += gvm.pt.mapped_pages
        for va in _vas(gvm):
            pte = gvm.pt.lookup(va.va.addr)
            mappings.append(
                {
                    "va": va.va.addr,
                    "name": _bo_name(m.vm_bind, va.gem.obj),
                    "size": va.va.range,
                    "first_page_pa": (pte & _PA_MASK) if pte else None,
                    "vm": vv.name,
                }
            )
    return {
        "address_spaces": slots,
        "vm": ", ".join(names),
        "mapped_pages": pages,
        "mappings": mappings,
        "stats": dict(m.driver.gpu.mmu.stats.__dict__),
    }


def _prot(prot) -> str:
    """A mapping's protection as ``rwx`` letters (``r--``: read-only)."""
    from gemu.guest.gemu_drv.vm import Prot

    return "".join(
        c if prot & p else "-" for p, c in ((Prot.READ, "r"), (Prot.WRITE, "w"), (Prot.EXEC, "x"))
    )


def _vas(gvm) -> list:
    from gemu.guest.drm import drm_gpuvm

    return [va for va in list(drm_gpuvm.for_each_va(gvm)) if va is not gvm.kernel_alloc_node]


def vms(m: Machine, session: Shell | None = None) -> list[dict]:
    """The session's VMs (driver mode vm-bind; ``[]`` in per-bo): for each, its mappings (VA,
    size, BO, offset into it, protection, evicted), its vm_bos (one per BO bound in it:
    evicted, external, how many mappings), the BOs on its evict list and extobj list (the
    external BOs an exec locks), and its place in reclaim (``reclaim_order``: 0 is reclaimed
    first, None: no private BO reclaimable; ``private_lru``: its private BOs on the per-VM
    LRU, least recently used first)."""
    sh = _need(session, "vms")
    drv = _vm_bind(m)
    if drv is None:
        return []
    from gemu.guest.drm import drm_gpuvm

    with drv.reclaim.lock:  # the VM list and the LRUs change only under it
        order = list(drv.reclaim.vms)
        lrus = {vv.vm_id: [] for vv in list(sh.vms.values())}
        for vv in list(sh.vms.values()):
            gvm = sh.file.vms.get(vv.vm_id)
            if gvm is not None:
                lrus[vv.vm_id] = [_bo_name(drv, o) for o in gvm.reclaim_lru]
    out = []
    for vv in list(sh.vms.values()):
        gvm = sh.file.vms.get(vv.vm_id)
        if gvm is None:
            continue
        mappings = [
            {
                "va": va.va.addr,
                "size": va.va.range,
                "bo": _bo_name(drv, va.gem.obj),
                "offset": va.gem.offset,
                "prot": _prot(va.prot),
                "evicted": va.evicted,
            }
            for va in _vas(gvm)
        ]
        vm_bos = []
        for va in _vas(gvm):
            vb = va.vm_bo
            if vb is None or any(v["bo"] == _bo_name(drv, vb.obj) for v in vm_bos):
                continue
            vm_bos.append(
                {
                    "bo": _bo_name(drv, vb.obj),
                    "evicted": vb.evicted,
                    "external": drm_gpuvm.is_extobj(gvm, vb.obj),
                    "mappings": len(vb.gpuva),
                }
            )
        out.append(
            {
                "name": vv.name,
                "id": vv.vm_id,
                "vm": gvm.name,
                "mapped_pages": gvm.pt.mapped_pages,
                "mappings": mappings,
                "vm_bos": vm_bos,
                "evict": [_bo_name(drv, vb.obj) for vb in gvm.evict],
                "extobj": [_bo_name(drv, vb.obj) for vb in gvm.extobj],
                "reclaim_order": order.index(gvm) if gvm in order else None,
                "private_lru": lrus.get(vv.vm_id, []),
            }
        )
    return out


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
    "reclaim": reclaim,
}
"""The views that need only the machine."""

SESSION_VIEWS = {"objects": objects, "mmu": mmu, "fences": fences, "tasks": tasks, "vms": vms}
"""The views of a console session's BOs, fences and tasks."""

VIEWS = {**MACHINE_VIEWS, **SESSION_VIEWS}


def query(m: Machine, view: str, session: Shell | None = None) -> Any:
    """The data of one view; :class:`QueryError` names a view that does not exist."""
    fn = VIEWS.get(view)
    if fn is None:
        raise QueryError(f"unknown view {view!r} (known: {', '.join(VIEWS)})")
    return fn(m, session)
