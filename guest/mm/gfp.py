"""DOC: allocation flags and the per-task allocation scopes of the guest kernel model.

Every allocation the guest kernel makes names what it may do to get memory, as a :class:`Gfp`
mask with the kernel's flag names: may it sleep and reclaim directly (``__GFP_DIRECT_RECLAIM``),
may that reclaim call into filesystems (``__GFP_FS``) or start I/O (``__GFP_IO``), should it
give up early (``__GFP_NORETRY``), quietly (``__GFP_NOWARN``)? A task can narrow every
allocation it makes for a while with a scope, instead of passing a narrower mask down a call
chain it does not own:

- :func:`memalloc_nofs_save` / :func:`memalloc_nofs_restore`: no ``__GFP_FS`` (a lock that
  reclaim also takes is held);
- :func:`memalloc_noio_save` / :func:`memalloc_noio_restore`: no ``__GFP_IO`` nor ``__GFP_FS``;
- :func:`memalloc_noreclaim_save` / :func:`memalloc_noreclaim_restore`: the task *is* reclaim
  (``PF_MEMALLOC``): it never recurses into reclaim and may dip into the reserves.

:func:`current_gfp_context` applies the scopes to a mask; the page allocator and lockdep's
:func:`~gemu.guest.locking.lockdep.might_alloc` both see the mask through it.

Usage::

    from gemu.guest.mm.gfp import GFP_KERNEL, GFP_NOFS, current_gfp_context
    from gemu.guest.mm.gfp import memalloc_nofs_restore, memalloc_nofs_save

    flags = memalloc_nofs_save()
    try:
        assert current_gfp_context(GFP_KERNEL) == GFP_NOFS
    finally:
        memalloc_nofs_restore(flags)

Kernel: include/linux/gfp_types.h (the flags), include/linux/sched/mm.h (the scopes and
current_gfp_context()). The scopes are per task, as the kernel's ``current->flags`` are.
"""

from __future__ import annotations

from enum import IntFlag

from gemu.guest.kernel import runtime


class Gfp(IntFlag):
    """Allocation flags. Kernel: gfp_t [include/linux/gfp_types.h]

    Members drop the kernel's ``__GFP_`` prefix; the module also exports the kernel spellings
    (``GFP_KERNEL``, ``__GFP_ZERO``, ...). The bit values are the model's own; only the names
    and the composite masks follow the kernel.
    """

    DIRECT_RECLAIM = 1 << 0
    """The caller may sleep and run reclaim itself."""
    KSWAPD_RECLAIM = 1 << 1
    """Wake kswapd when free memory runs low."""
    IO = 1 << 2
    """Reclaim may start physical I/O (swap-out)."""
    FS = 1 << 3
    """Reclaim may call into filesystems and shrinkers that take fs-level locks; lockdep
    records the fs_reclaim dependency only for these allocations."""
    HIGH = 1 << 4
    """The caller is high priority: it may use part of the min reserve."""
    NORETRY = 1 << 5
    """One reclaim pass at most, then fail."""
    NOWARN = 1 << 6
    """No allocation-failure warning in the log."""
    ZERO = 1 << 7
    """Return zeroed memory."""
    NOMEMALLOC = 1 << 8
    """Never use the reserves, even when the caller could."""

    RECLAIM = DIRECT_RECLAIM | KSWAPD_RECLAIM
    KERNEL = RECLAIM | IO | FS
    NOFS = RECLAIM | IO
    NOIO = RECLAIM
    NOWAIT = KSWAPD_RECLAIM | NOWARN
    ATOMIC = HIGH | KSWAPD_RECLAIM


GFP_KERNEL = Gfp.KERNEL
_DIRECT_RECLAIM = int(Gfp.DIRECT_RECLAIM)
GFP_NOFS = Gfp.NOFS
GFP_NOIO = Gfp.NOIO
GFP_NOWAIT = Gfp.NOWAIT
GFP_ATOMIC = Gfp.ATOMIC
__GFP_DIRECT_RECLAIM = Gfp.DIRECT_RECLAIM
__GFP_KSWAPD_RECLAIM = Gfp.KSWAPD_RECLAIM
__GFP_RECLAIM = Gfp.RECLAIM
__GFP_IO = Gfp.IO
__GFP_FS = Gfp.FS
__GFP_HIGH = Gfp.HIGH
__GFP_NORETRY = Gfp.NORETRY
__GFP_NOWARN = Gfp.NOWARN
__GFP_ZERO = Gfp.ZERO
__GFP_NOMEMALLOC = Gfp.NOMEMALLOC


def gfpflags_allow_blocking(gfp: int) -> bool:
    """Whether the allocation may sleep. Kernel: gfpflags_allow_blocking()
    [include/linux/gfp.h]"""
    return int(gfp) & _DIRECT_RECLAIM != 0


# Per-task allocation scope flags. Kernel: current->flags [include/linux/sched.h]
PF_MEMALLOC = 1 << 0
"""The task runs reclaim: no recursion into it, reserves allowed."""
PF_MEMALLOC_NOFS = 1 << 1
"""Every allocation of the task drops ``__GFP_FS``."""
PF_MEMALLOC_NOIO = 1 << 2
"""Every allocation of the task drops ``__GFP_IO`` and ``__GFP_FS``."""

_task_flags: dict[runtime.Task, int] = {}


def current_flags() -> int:
    """The current task's PF_MEMALLOC* flags."""
    if not _task_flags:  # no task is in a scope: every allocation takes this path
        return 0
    return _task_flags.get(runtime.current(), 0)


def _save(flag: int) -> int:
    task = runtime.current()
    old = _task_flags.get(task, 0)
    _task_flags[task] = old | flag
    return old & flag


def _restore(flag: int, saved: int) -> None:
    task = runtime.current()
    new = (_task_flags.get(task, 0) & ~flag) | (saved & flag)
    if new:
        _task_flags[task] = new
    else:
        _task_flags.pop(task, None)


def memalloc_nofs_save() -> int:
    """Start a scope in which every allocation of this task is ``GFP_NOFS`` at most.
    Kernel: memalloc_nofs_save() [include/linux/sched/mm.h]"""
    return _save(PF_MEMALLOC_NOFS)


def memalloc_nofs_restore(flags: int) -> None:
    """End the scope :func:`memalloc_nofs_save` started (nested scopes keep theirs).
    Kernel: memalloc_nofs_restore() [include/linux/sched/mm.h]"""
    _restore(PF_MEMALLOC_NOFS, flags)


def memalloc_noio_save() -> int:
    """Start a scope in which every allocation of this task is ``GFP_NOIO`` at most.
    Kernel: memalloc_noio_save() [include/linux/sched/mm.h]"""
    return _save(PF_MEMALLOC_NOIO)


def memalloc_noio_restore(flags: int) -> None:
    """Kernel: memalloc_noio_restore() [include/linux/sched/mm.h]"""
    _restore(PF_MEMALLOC_NOIO, flags)


def memalloc_noreclaim_save() -> int:
    """Mark the task as reclaim itself (``PF_MEMALLOC``): its allocations never enter direct
    reclaim (so lockdep records no fs_reclaim dependency for them) and may use the reserves.
    Kernel: memalloc_noreclaim_save() [include/linux/sched/mm.h]"""
    return _save(PF_MEMALLOC)


def memalloc_noreclaim_restore(flags: int) -> None:
    """Kernel: memalloc_noreclaim_restore() [include/linux/sched/mm.h]"""
    _restore(PF_MEMALLOC, flags)


def current_is_memalloc() -> bool:
    """Whether the current task runs reclaim. Kernel: current->flags & PF_MEMALLOC."""
    return bool(current_flags() & PF_MEMALLOC)


def current_gfp_context(gfp: int) -> Gfp:
    """``gfp`` narrowed by the current task's NOIO/NOFS scopes.
    Kernel: current_gfp_context() [include/linux/sched/mm.h]"""
    pflags = current_flags()
    if type(gfp) is not Gfp:
        gfp = Gfp(gfp)
    if not pflags:
        return gfp
    if pflags & PF_MEMALLOC_NOIO:
        gfp &= ~(Gfp.IO | Gfp.FS)
    elif pflags & PF_MEMALLOC_NOFS:
        gfp &= ~Gfp.FS
    return gfp
