"""DOC: lockdep, the validator of lock order and locking context in the guest kernel model.

Every lock of the model reports to lockdep when a task acquires and releases it, naming the
lock's :class:`LockClass` (all reservation objects share one class, as all ``dma_resv`` share
``reservation_ww_class_mutex``). Lockdep keeps, per runtime:

- each task's stack of held locks (``Task.held_locks``), for :func:`assert_held` and for the
  deadlock report of the deterministic scheduler;
- an acquisition-order graph over classes. Taking B while holding A records A -> B together
  with the stack that did it; if B -> ... -> A already exists, the order is inverted and the
  report shows the stack that recorded the existing order and the current one. Trylocks add no
  order. The graph starts primed like the kernel's ``dma_resv_lockdep()``: mmap_lock ->
  reservation_ww_class_acquire -> reservation_ww_class_mutex -> fs_reclaim -> i_mmap_rwsem,
  and fence waits (``dma_fence_map``) allowed under all of them except i_mmap_rwsem;
- the dma_fence signalling critical section: between :func:`dma_fence_begin_signalling` and
  :func:`dma_fence_end_signalling`, as the kernel annotates it. Inside it, a blocking lock of
  a class that fence waits depend on (a reservation lock, mmap_lock), a reclaimable allocation
  (:func:`might_alloc`) or a fence wait (:func:`dma_fence_might_wait`) is reported. The section
  of a fence runs from where the fence becomes visible to other tasks to its
  ``dma_fence_signal()``, across tasks: the submitter annotates from publishing to the push,
  the scheduler's run_job, the driver's interrupt handler and its reset path annotate their
  part.
- the *implicit* section, a stricter gemu mode (:func:`set_implicit_signalling`, ``gemu
  explore --strict-signalling``, ``Machine(strict_signalling=True)``), off by default: from
  :func:`fence_published` (a task installs a fence it must signal into a reservation object,
  the kernel DOC's "the signalling critical section starts as soon as the new fences are
  installed") to :func:`fence_handed_off` (the job is pushed to the scheduler or the fence
  signals), whether or not the code annotates it. Real lockdep has no such section; its
  reports say "gemu model check".

A violation becomes a :class:`LockdepReport`. When the runtime is strict (tests) it is raised
as :class:`LockdepError`, a :class:`~gemu.guest.errors.KernelWarning`; otherwise it is counted
in :func:`reports` (each distinct violation once, with a count) and logged in the event log.

Usage::

    from gemu.guest.locking import lockdep

    class Foo:
        name = "foo#1"

    FOO_CLASS = lockdep.LockClass("foo_lock")
    foo = Foo()
    lockdep.acquire(foo, FOO_CLASS)
    lockdep.assert_held(foo)
    lockdep.might_alloc()            # GFP_KERNEL under foo: records foo_lock -> fs_reclaim
    lockdep.release(foo)

    cookie = lockdep.dma_fence_begin_signalling()
    lockdep.might_alloc()            # reported: reclaim may wait on the fence we must signal
    lockdep.dma_fence_end_signalling(cookie)
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import traceback
from collections import deque
from dataclasses import dataclass, field

from gemu.guest.errors import KernelWarning
from gemu.guest.kernel import runtime
from gemu.guest.kernel.runtime import Task, current
from gemu.guest.mm import gfp as gfp_mod
from gemu.guest.mm.gfp import Gfp


class LockClass:
    """A class of locks ordered as one (the kernel's ``lock_class_key``)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"LockClass({self.name!r})"


MMAP_LOCK = LockClass("mmap_lock")
RESV_ACQUIRE_CLASS = LockClass("reservation_ww_class_acquire")
RESV_CLASS = LockClass("reservation_ww_class_mutex")
FS_RECLAIM = LockClass("fs_reclaim")
I_MMAP = LockClass("i_mmap_rwsem")
MMU_NOTIFIER = LockClass("mmu_notifier_invalidate_range_start")
DMA_FENCE_MAP = LockClass("dma_fence_map")


class LockMap:
    """A lockdep map that is not a lock: something a task can be "inside" (fs_reclaim, a
    fence wait). Kernel: struct lockdep_map."""

    __slots__ = ("cls", "name")

    def __init__(self, cls: LockClass) -> None:
        self.cls = cls
        self.name = cls.name

    def __repr__(self) -> str:
        return f"<LockMap {self.name}>"


_FS_RECLAIM_MAP = LockMap(FS_RECLAIM)
_MMU_NOTIFIER_MAP = LockMap(MMU_NOTIFIER)
_FENCE_WAIT_MAP = LockMap(DMA_FENCE_MAP)


class HeldLock:
    """One entry of a task's held-lock stack. Kernel: struct held_lock."""

    __slots__ = ("cls", "lock", "nest", "read", "trylock")

    def __init__(self, lock: object, cls: LockClass, trylock: bool, read: bool, nest: object):
        self.lock = lock
        self.cls = cls
        self.trylock = trylock
        self.read = read
        self.nest = nest

    def __repr__(self) -> str:
        return f"<held {_name(self.lock)} ({self.cls.name})>"


@dataclass
class LockdepReport:
    """One violation. ``kind`` is one of: inversion, signalling, recursive, not-held,
    unbalanced, held-at-exit, sleep-in-atomic, ww-misuse, mutex-misuse."""

    kind: str
    message: str
    stacks: list[str] = field(default_factory=list)
    task: str = ""
    count: int = 1

    def __str__(self) -> str:
        parts = [f"lockdep {self.kind}: {self.message}"]
        parts += self.stacks
        return "\n".join(parts)


class LockdepError(KernelWarning):
    """A lockdep report raised in strict mode; ``report`` holds the details."""

    def __init__(self, report: LockdepReport) -> None:
        super().__init__(str(report))
        self.report = report


@dataclass(frozen=True)
class _Origin:
    """Where an order A -> B was first seen."""

    task: str
    held: str
    taken: str
    stack: _Stack | None
    label: str = ""

    def format(self, title: str) -> str:
        where = self.label if self.label else _fmt(self.stack)
        return f"{title}: {self.task} took {self.taken} while holding {self.held}\n{where}"


class LockdepState:
    """Lockdep's per-runtime state: the order graph, reports and fence publishers."""

    def __init__(self) -> None:
        self.after: dict[LockClass, dict[LockClass, _Origin]] = {
            cls: dict(succ) for cls, succ in _PRIMED.items()
        }
        self.reports: list[LockdepReport] = []
        self.by_key: dict[object, LockdepReport] = {}
        self.publisher: dict[int, Task] = {}
        self.implicit_signalling = False
        self.lock = threading.Lock()


def set_implicit_signalling(enabled: bool, rt: runtime.Runtime | None = None) -> None:
    """Turn the implicit signalling section (gemu's stricter mode) on or off for a runtime
    (default: the current task's). Off, only explicit dma_fence_begin_signalling() sections
    exist, as with the kernel's lockdep."""
    _state(rt or current().runtime).implicit_signalling = bool(enabled)


def implicit_signalling(rt: runtime.Runtime | None = None) -> bool:
    """Whether the runtime checks the implicit signalling section."""
    return _state(rt or current().runtime).implicit_signalling


def _state(rt: runtime.Runtime | None = None) -> LockdepState:
    rt = rt or current().runtime
    st = rt.lockdep
    if st is None:
        st = rt.lockdep = LockdepState()
    return st


def _name(lock: object) -> str:
    return getattr(lock, "name", None) or repr(lock)


# Thread and runtime plumbing, and the lock implementations themselves.
_PLUMBING = (threading.__file__, runtime.__file__)
_LOCKING_DIR = os.path.dirname(__file__)


_STACK_DEPTH = 16


class _Stack:
    """Where something happened: up to :data:`_STACK_DEPTH` frames as (code object,
    instruction offset), innermost first, without thread and runtime plumbing. Capturing one
    costs a walk of the frame chain; line numbers (the offset's line in the code's line table,
    what ``frame.f_lineno`` computes) and the :class:`traceback.StackSummary` with its source
    lines are made only when a report is formatted, which most captured stacks never are."""

    __slots__ = ("_at",)

    def __init__(self, at: tuple[tuple[object, int], ...]) -> None:
        self._at = at

    def at(self) -> tuple[tuple[object, int], ...]:
        """(code object, instruction offset) of each frame, innermost first."""
        return self._at

    @property
    def frames(self) -> tuple[tuple[str, int, str], ...]:
        """(file, line, function) of each frame, innermost first."""
        return tuple(
            (code.co_filename, _line_of(code, lasti), code.co_name) for code, lasti in self.at()
        )

    def summary(self) -> traceback.StackSummary:
        """Outermost first, as a traceback prints."""
        return traceback.StackSummary.from_list(
            [(file, line, func, None) for file, line, func in reversed(self.frames)]
        )


def _line_of(code, lasti: int) -> int | None:
    """The line of the instruction at byte offset ``lasti`` (``frame.f_lineno`` for a frame
    stopped there)."""
    for start, end, line in code.co_lines():
        if start <= lasti < end:
            return line
    return None


class _SectionStack(_Stack):
    """Where a signalling section began, captured in constant time: the frame that called
    :func:`dma_fence_begin_signalling` and the offset it was at. The frames around it are
    walked only when a report inside the section is formatted. Their offsets are still those
    of the beginning then, because a caller cannot move on while the frame it called runs, and
    that frame still runs: a section begins and ends in one function (its try/finally), and
    the reports that show this stack are made inside it, by the same task.

    Were the frame found returned when a report is formatted (a section left open by a
    function that returned), the outer frames would be read as they are then, and the stack
    says so. The task drops the frame when the section ends (or the task exits), so it never
    keeps a frame's locals alive past that.
    """

    __slots__ = ("_frame", "_lasti")

    def __init__(self, frame, lasti: int) -> None:
        self._frame = frame
        self._lasti = lasti
        self._at = None

    def at(self) -> tuple[tuple[object, int], ...]:
        if self._at is None:
            self._at = _walk(self._frame, self._lasti)
        return self._at

    def running(self) -> bool:
        """Whether the frame that began the section is on the current task's stack."""
        f = sys._getframe(1)
        while f is not None:
            if f is self._frame:
                return True
            f = f.f_back
        return False


_shown: dict[object, bool] = {}  # code object -> whether its frames appear in stacks


def _capture(skip: int = 2) -> _Stack:
    """The caller's stack (``skip`` frames up from here), outermost first when formatted."""
    return _Stack(_walk(sys._getframe(skip)))


def _walk(f, first_lasti: int | None = None) -> tuple[tuple[object, int], ...]:
    """(code, offset) of ``f`` and its callers that stacks show; ``first_lasti`` stands for
    ``f``'s own offset when given."""
    at = []
    shown = _shown
    lasti = first_lasti
    while f is not None:
        code = f.f_code
        keep = shown.get(code)
        if keep is None:
            file = code.co_filename
            keep = shown[code] = file not in _PLUMBING and os.path.dirname(file) != _LOCKING_DIR
        if keep:
            at.append((code, f.f_lasti if lasti is None else lasti))
            if len(at) == _STACK_DEPTH:
                break
        lasti = None
        f = f.f_back
    return tuple(at)


def _fmt(stack: _Stack | None) -> str:
    if stack is None or not stack.at():
        return "  (no stack)"
    return "".join(stack.summary().format()).rstrip()


def _section_stack(task: Task) -> _Stack | None:
    """Where the task's signalling section began: a :class:`_Stack`, or the (frame, offset)
    that :func:`dma_fence_begin_signalling` keeps, made a :class:`_SectionStack` here (once,
    so that every report of the section shows the same stack)."""
    stack = task.signalling_stack
    if type(stack) is tuple:
        stack = task.signalling_stack = _SectionStack(*stack)
    return stack


def _fmt_section(stack: _Stack) -> str:
    """The "signalling section began at" stack of a report made in the current task."""
    returned = isinstance(stack, _SectionStack) and stack._at is None and not stack.running()
    text = _fmt(stack)
    if returned:
        text += "\n  (the function that began the section has returned: its callers' lines are"
        text += " where they are now)"
    return text


# Reporting.


def report(kind: str, message: str, *, key: object = None, stacks: list[str] | None = None):
    """Report a violation in the current task: raise :class:`LockdepError` in strict mode,
    else count it. ``key`` deduplicates repeated reports (default: kind and message)."""
    task = current()
    rt = task.runtime
    st = _state(rt)
    if stacks is None:
        stacks = [f"current stack ({task.name}):\n" + _fmt(_capture())]
    key = (kind, message) if key is None else key
    with st.lock:
        rep = st.by_key.get(key)
        if rep is None:
            rep = LockdepReport(kind, message, stacks, task.name)
            st.by_key[key] = rep
            st.reports.append(rep)
        else:
            rep.count += 1
    rt.log(f"lockdep {kind}: {message.splitlines()[0]}")
    if rt.strict:
        raise LockdepError(rep)
    return rep


def reports() -> list[LockdepReport]:
    """Violations counted in the current runtime (non-strict mode), each once."""
    return list(_state().reports)


def reset(graph: bool = False) -> None:
    """Forget the current runtime's reports (and with ``graph``, the learned lock order)."""
    st = _state()
    with st.lock:
        st.reports.clear()
        st.by_key.clear()
        if graph:
            st.after = {cls: dict(succ) for cls, succ in _PRIMED.items()}


# Acquire and release.


def in_signalling(task: Task | None = None) -> bool:
    """Whether the task is inside a dma_fence signalling critical section."""
    task = task or current()
    return bool(task.fence_signalling_depth or task.published_fences)


def acquire(
    lock: object,
    cls: LockClass,
    *,
    trylock: bool = False,
    read: bool = False,
    nest: object = None,
    task: Task | None = None,
) -> None:
    """Record that the current task has taken (or is about to block on) ``lock``.

    Kernel: lock_acquire() [kernel/locking/lockdep.c]

    ``nest`` is the object under which locks of one class may nest (a ww acquire context,
    the kernel's ``nest_lock``); without it, blocking on a second lock of a held class is
    reported as recursive locking. ``task`` is the current task, when the caller has it.
    """
    if task is None:
        task = current()
    held = task.held_locks
    if held or task.fence_signalling_depth or task.published_fences:
        _check_acquire(task, held, lock, cls, trylock, read, nest)
    held.append(HeldLock(lock, cls, trylock, read, nest))


def acquire_held(entry: HeldLock, task: Task) -> None:
    """:func:`acquire` for a lock that keeps its held-stack entry made once
    (``HeldLock(lock, cls, False, False, None)``: a plain blocking acquisition, the same each
    time): the same checks and the same entry on the stack, without making one per
    acquisition. ``task`` is the current task."""
    held = task.held_locks
    if held or task.fence_signalling_depth or task.published_fences:
        _check_acquire(task, held, entry.lock, entry.cls, False, False, None)
    held.append(entry)


def _check_acquire(task, held, lock, cls, trylock, read, nest) -> None:
    if not held:
        # Nothing held, inside a signalling section (the caller checked): only the section's
        # order, dma_fence_map -> cls, as the code below would find it (a trylock adds none).
        if trylock:
            return
        st = task.runtime.lockdep or _state(task.runtime)
        succ = st.after.get(DMA_FENCE_MAP)
        if succ is None or cls not in succ:
            _order(task, st, DMA_FENCE_MAP, _FENCE_WAIT_MAP, cls, lock)
        return
    same_class = None  # a held lock of cls, taken without an acquire context: recursion
    for entry in held:
        if entry.lock is lock and not (read and entry.read):
            report(
                "recursive",
                f"possible recursive locking: {task.name} takes {_name(lock)} ({cls.name}) "
                f"which it already holds",
                key=("recursive", id(lock)),
            )
            return
        if same_class is None and entry.cls is cls:
            same_class = entry
    if trylock:
        return
    if same_class is not None and nest is None and not read:
        report(
            "recursive",
            f"possible recursive locking: {task.name} takes {_name(lock)} while "
            f"holding {_name(same_class.lock)}, both {cls.name}, without an acquire context",
            key=("recursive-class", cls),
        )
        return
    st = task.runtime.lockdep or _state(task.runtime)
    after = st.after
    if task.fence_signalling_depth or task.published_fences:  # in_signalling()
        mark = min(task.signalling_mark, len(held))
    else:
        mark = -1
    # As the kernel does: order the new lock after the newest held lock, and after any
    # trylocks above it (non-trylock entries already ordered themselves after older ones).
    # A signalling section sits in the stack where it began. A known order is looked up
    # here; _order() records a new one or reports the cycle it closes.
    for i in range(len(held) - 1, -1, -1):
        if i < mark:
            break
        entry = held[i]
        prev_cls = entry.cls
        if prev_cls is not cls:
            succ = after.get(prev_cls)
            if succ is None or cls not in succ:
                _order(task, st, prev_cls, entry.lock, cls, lock)
        if not entry.trylock:
            return
    if mark >= 0:
        succ = after.get(DMA_FENCE_MAP)
        if succ is None or cls not in succ:
            _order(task, st, DMA_FENCE_MAP, _FENCE_WAIT_MAP, cls, lock)


def _order(task, st, prev_cls, prev_lock, cls, lock) -> None:
    succ = st.after.get(prev_cls)
    if succ is not None and cls in succ:
        return
    path = _path(st, cls, prev_cls)
    if path is None:
        origin = _Origin(task.name, _name(prev_lock), _name(lock), _capture(4))
        with st.lock:
            st.after.setdefault(prev_cls, {})[cls] = origin
        return
    _report_cycle(task, st, prev_cls, prev_lock, cls, lock, path)


def _path(st: LockdepState, src: LockClass, dst: LockClass) -> list[LockClass] | None:
    """Classes from src to dst along recorded orders, or None."""
    came_from: dict[LockClass, LockClass | None] = {src: None}
    queue = deque([src])
    while queue:
        node = queue.popleft()
        if node is dst:
            path = [node]
            while came_from[path[-1]] is not None:
                path.append(came_from[path[-1]])
            return path[::-1]
        for nxt in st.after.get(node, ()):
            if nxt not in came_from:
                came_from[nxt] = node
                queue.append(nxt)
    return None


_HINTS = {
    (FS_RECLAIM, RESV_CLASS): "shrinkers run inside fs_reclaim and may only trylock "
    "reservation objects (dma_resv_trylock)",
    (DMA_FENCE_MAP, FS_RECLAIM): "reclaim may wait for the fence this task must signal: "
    "no GFP_KERNEL allocation between publishing a fence and signalling it",
    (DMA_FENCE_MAP, MMU_NOTIFIER): "reclaim runs mmu notifiers, which may wait for the "
    "fence this task must signal: only GFP_NOWAIT/GFP_ATOMIC allocations (or preallocated "
    "memory) between publishing a fence and signalling it",
    (DMA_FENCE_MAP, RESV_CLASS): "fences are waited for under reservation locks: no blocking "
    "dma_resv_lock between publishing a fence and signalling it",
}


def _report_cycle(task, st, prev_cls, prev_lock, cls, lock, path) -> None:
    chain = " -> ".join(c.name for c in path)
    signalling = DMA_FENCE_MAP in (prev_cls, cls)
    if prev_cls is DMA_FENCE_MAP:
        what = (
            "a reclaimable allocation (might_alloc)"
            if cls in (FS_RECLAIM, MMU_NOTIFIER)
            else f"blocking on {_name(lock)} ({cls.name})"
        )
        message = (
            f"{task.name}: {what} inside a dma_fence signalling critical section, but "
            f"{chain} is a recorded order (fences are waited for under {cls.name})"
        )
    elif cls is DMA_FENCE_MAP:
        message = (
            f"{task.name}: fence wait while holding {_name(prev_lock)} ({prev_cls.name}), "
            f"but {chain} is a recorded order ({prev_cls.name} is taken inside a dma_fence "
            f"signalling critical section)"
        )
    else:
        message = (
            f"possible circular locking dependency: {task.name} takes {_name(lock)} "
            f"({cls.name}) while holding {_name(prev_lock)} ({prev_cls.name}), but "
            f"{chain} is a recorded order"
        )
    hint = _HINTS.get((prev_cls, cls))
    if hint:
        message += f"\nhint: {hint}"
    if signalling and _implicit_only(task):
        message = _IMPLICIT_LABEL + message
    stacks = [
        st.after[a][b].format(f"existing order {a.name} -> {b.name}")
        for a, b in itertools.pairwise(path)
    ]
    if signalling and task.signalling_stack is not None and prev_cls is DMA_FENCE_MAP:
        stacks.append(f"signalling section began at:\n{_fmt_section(_section_stack(task))}")
    stacks.append(
        f"new order {prev_cls.name} -> {cls.name}: {task.name} takes {_name(lock)}\n"
        + _fmt(_capture(4))
    )
    report(
        "signalling" if signalling else "inversion",
        message,
        key=("order", prev_cls, cls),
        stacks=stacks,
    )


def release(lock: object, task: Task | None = None) -> None:
    """Record that ``lock`` was released (by default from the current task's stack).

    Kernel: lock_release() [kernel/locking/lockdep.c]
    """
    task = task or current()
    held = task.held_locks
    if held and held[-1].lock is lock:
        held.pop()
        return
    for i in range(len(held) - 1, -1, -1):
        if held[i].lock is lock:
            del held[i]
            return
    report(
        "unbalanced",
        f"bad unlock balance: {task.name} releases {_name(lock)} which it does not hold",
        key=("unbalanced", id(lock)),
    )


def held(lock: object) -> bool:
    """Whether the current task holds ``lock``. Kernel: lockdep_is_held()."""
    return any(entry.lock is lock for entry in current().held_locks)


def assert_held(lock: object) -> None:
    """Report unless the current task holds ``lock``. Kernel: lockdep_assert_held()."""
    task = current()
    for entry in task.held_locks:
        if entry.lock is lock:
            return
    report(
        "not-held",
        f"{task.name} must hold {_name(lock)} here but does not",
        key=("not-held", id(lock)),
    )


def might_sleep() -> None:
    """Report sleeping in atomic context. Kernel: might_sleep() [include/linux/kernel.h]"""
    task = current()
    if task.atomic_depth:
        report("sleep-in-atomic", f"{task.name}: sleeping function called from atomic context")


def might_lock(cls: LockClass) -> None:
    """Record the order of taking a lock of ``cls`` here without taking it.
    Kernel: might_lock() [include/linux/lockdep.h]"""
    probe = LockMap(cls)
    acquire(probe, cls, nest=probe)
    release(probe)


def fs_reclaim_map_acquire() -> None:
    """Enter memory reclaim unconditionally (kswapd, a reclaim pass): the shrinkers run
    inside it. Kernel: __fs_reclaim_acquire() [mm/page_alloc.c]"""
    acquire(_FS_RECLAIM_MAP, FS_RECLAIM)


def fs_reclaim_map_release() -> None:
    """Kernel: __fs_reclaim_release() [mm/page_alloc.c]"""
    release(_FS_RECLAIM_MAP)


def _need_reclaim(gfp: int) -> bool:
    """Kernel: __need_reclaim() [mm/page_alloc.c]: no reclaim without
    ``__GFP_DIRECT_RECLAIM``, none from a task that is reclaim itself (``PF_MEMALLOC``)."""
    return bool(gfp & Gfp.DIRECT_RECLAIM) and not gfp_mod.current_is_memalloc()


def fs_reclaim_acquire(gfp: int = Gfp.KERNEL) -> None:
    """Annotate that an allocation with ``gfp`` may enter reclaim from here on.

    Kernel: fs_reclaim_acquire() [mm/page_alloc.c]: the mask goes through
    current_gfp_context(); if __need_reclaim(), the fs_reclaim map is taken only for
    ``__GFP_FS`` allocations (a GFP_NOFS allocation records no fs_reclaim dependency), and the
    mmu-notifier map is taken and released for every reclaiming allocation (an mmu notifier
    may wait for fences, so even GFP_NOFS is reported inside a signalling section).
    """
    gfp = gfp_mod.current_gfp_context(gfp)
    if not _need_reclaim(gfp):
        return
    if gfp & Gfp.FS:
        acquire(_FS_RECLAIM_MAP, FS_RECLAIM)
    acquire(_MMU_NOTIFIER_MAP, MMU_NOTIFIER)
    release(_MMU_NOTIFIER_MAP)


def fs_reclaim_release(gfp: int = Gfp.KERNEL) -> None:
    """Kernel: fs_reclaim_release() [mm/page_alloc.c]; pass the ``gfp`` given to
    :func:`fs_reclaim_acquire` (the condition is evaluated again, as the kernel does)."""
    gfp = gfp_mod.current_gfp_context(gfp)
    if _need_reclaim(gfp) and gfp & Gfp.FS:
        release(_FS_RECLAIM_MAP)


def might_alloc(gfp: int = Gfp.KERNEL) -> None:
    """Mark a place that may allocate with ``gfp``: lockdep sees the reclaim it could enter,
    and a blocking mask is a might_sleep().

    Kernel: might_alloc() [include/linux/sched/mm.h] = fs_reclaim_acquire(gfp);
    fs_reclaim_release(gfp); might_sleep_if(gfpflags_allow_blocking(gfp)).

    Every allocation site of the guest kernel calls this with the kernel's gfp: page
    allocations (the page allocator), sg tables, page-table frames, job and dependency
    structures, fence arrays and reservation fence lists. GFP_NOWAIT and GFP_ATOMIC record
    nothing; GFP_NOFS (or a :func:`~gemu.guest.mm.gfp.memalloc_nofs_save` scope) records no
    fs_reclaim dependency; inside reclaim (``PF_MEMALLOC``) nothing is recorded.
    """
    # fs_reclaim_acquire(gfp); fs_reclaim_release(gfp); might_sleep_if(...), in plain ints:
    # every job allocates several times, and IntFlag arithmetic cost more than the checks.
    task = current()
    mask = int(gfp)
    if not mask & _DIRECT_RECLAIM:
        return  # GFP_NOWAIT, GFP_ATOMIC: no reclaim, no sleep
    # With nothing held and no signalling section open, taking the maps records nothing:
    # fs_reclaim -> mmu_notifier is primed (_prime) and the graph never loses an order. That
    # is most allocations of a job (the job, its scheduler structures).
    if task.held_locks or task.fence_signalling_depth or task.published_fences:
        pflags = gfp_mod.current_flags()
        if not pflags & gfp_mod.PF_MEMALLOC:  # __need_reclaim()
            if pflags & gfp_mod.PF_MEMALLOC_NOIO:  # current_gfp_context()
                mask &= ~(_IO | _FS)
            elif pflags & gfp_mod.PF_MEMALLOC_NOFS:
                mask &= ~_FS
            if mask & _FS:
                acquire(_FS_RECLAIM_MAP, FS_RECLAIM, task=task)
            acquire(_MMU_NOTIFIER_MAP, MMU_NOTIFIER, task=task)
            release(_MMU_NOTIFIER_MAP, task)
            if mask & _FS:
                release(_FS_RECLAIM_MAP, task)
    if task.atomic_depth:
        might_sleep()


_DIRECT_RECLAIM = int(Gfp.DIRECT_RECLAIM)
_IO = int(Gfp.IO)
_FS = int(Gfp.FS)


# The dma_fence signalling critical section.

_IMPLICIT_LABEL = (
    "gemu model check (strict signalling: the implicit section opened by dma_resv_add_fence), "
    "not a kernel lockdep report: "
)


def _implicit_only(task: Task) -> bool:
    """Whether the task is in a signalling section only through the implicit mode."""
    return not task.fence_signalling_depth and bool(task.published_fences)


def _enter_signalling(task: Task, stack: _Stack) -> None:
    task.signalling_mark = len(task.held_locks)
    task.signalling_stack = stack


def _leave_signalling(task: Task) -> None:
    if not (task.fence_signalling_depth or task.published_fences):
        task.signalling_stack = None


def dma_fence_begin_signalling() -> bool:
    """Enter a fence signalling critical section; returns the cookie for the end.

    Kernel: dma_fence_begin_signalling() [drivers/dma-buf/dma-fence.c]

    The cookie is True when the task already was inside a section (nesting is allowed).
    """
    task = current()
    if task.fence_signalling_depth or task.published_fences:  # in_signalling(): nested
        task.fence_signalling_depth += 1
        return True
    # _enter_signalling() with the caller's frame and offset, made a _SectionStack only for a
    # report: the section ends in the same function (see _SectionStack)
    frame = sys._getframe(1)
    task.signalling_mark = len(task.held_locks)
    task.signalling_stack = (frame, frame.f_lasti)
    task.fence_signalling_depth += 1
    return False


def dma_fence_end_signalling(cookie: bool) -> None:
    """Kernel: dma_fence_end_signalling() [drivers/dma-buf/dma-fence.c]"""
    task = current()
    depth = task.fence_signalling_depth
    if depth <= 0:
        report("unbalanced", f"{task.name}: dma_fence_end_signalling without a begin")
        return
    task.fence_signalling_depth = depth - 1
    if depth == 1 and not task.published_fences:  # _leave_signalling()
        task.signalling_stack = None


def dma_fence_might_wait() -> None:
    """Annotate a fence wait. Kernel: __dma_fence_might_wait() [drivers/dma-buf/dma-fence.c]

    Inside a signalling section a fence wait can wait for the task itself and is reported;
    elsewhere it orders every held lock before ``dma_fence_map``.
    """
    task = current()
    if in_signalling(task):
        stacks = []
        if task.signalling_stack is not None:
            stacks.append(f"signalling section began at:\n{_fmt_section(_section_stack(task))}")
        stacks.append(f"fence wait ({task.name}):\n{_fmt(_capture())}")
        report(
            "signalling",
            (_IMPLICIT_LABEL if _implicit_only(task) else "")
            + f"{task.name}: fence wait inside a dma_fence signalling critical section "
            f"(the fence waited for may need this task to signal first)",
            key=("signalling-wait",),
            stacks=stacks,
        )
        return
    acquire(_FENCE_WAIT_MAP, DMA_FENCE_MAP)
    release(_FENCE_WAIT_MAP)


def fence_published(fence: object) -> None:
    """A fence became visible to other tasks (dma_resv_add_fence). In the implicit mode
    (:func:`set_implicit_signalling`), if the current task must signal it
    (``fence.signal_owner is current()``), the task is now inside the signalling critical
    section until :func:`fence_handed_off`. Not a kernel function: real lockdep sees only the
    explicit annotations."""
    task = current()
    if getattr(fence, "signal_owner", None) is not task:
        return
    if not _state(task.runtime).implicit_signalling:
        return
    key = id(fence)
    if key in task.published_fences:
        return
    if not in_signalling(task):
        # ends wherever the fence is handed off, maybe after this caller returned: a full
        # capture now
        _enter_signalling(task, _capture(2))
    task.published_fences[key] = fence
    _state(task.runtime).publisher[key] = task


def fence_handed_off(fence: object) -> None:
    """The task that published ``fence`` no longer has to signal it (the job was pushed to
    the scheduler, or the fence signalled); its implicit section for this fence ends."""
    st = current().runtime.lockdep
    if st is None or not st.publisher:
        # Nothing published in the implicit mode (always so when it is off). A fence this
        # call could hand off was published by its owner before the push that leads here,
        # so an empty table read without the lock is never stale for it.
        return
    with st.lock:
        task = st.publisher.pop(id(fence), None)
    if task is None:
        return
    task.published_fences.pop(id(fence), None)
    _leave_signalling(task)


def _check_task_exit(task: Task) -> None:
    if task.held_locks:
        names = ", ".join(_name(e.lock) for e in task.held_locks)
        task.held_locks.clear()
        report("held-at-exit", f"task {task.name} exited holding {names}")
    if task.fence_signalling_depth:
        task.fence_signalling_depth = 0
        task.signalling_stack = None
        report("held-at-exit", f"task {task.name} exited inside a dma_fence signalling section")


runtime.add_task_exit_hook(_check_task_exit)


def _prime() -> dict[LockClass, dict[LockClass, _Origin]]:
    """The order graph after the kernel's boot-time dma_resv_lockdep()."""
    after: dict[LockClass, dict[LockClass, _Origin]] = {}
    origin_label = "  primed at boot, as dma_resv_lockdep() [drivers/dma-buf/dma-resv.c] does"

    def order(a: LockClass, b: LockClass) -> None:
        after.setdefault(a, {})[b] = _Origin("boot", a.name, b.name, None, origin_label)

    # mmap_read_lock; ww_acquire_init; dma_resv_lock; fs_reclaim_acquire;
    # i_mmap_lock_write/unlock; mmu notifier map { __dma_fence_might_wait } ...
    order(MMAP_LOCK, RESV_ACQUIRE_CLASS)
    order(MMAP_LOCK, RESV_CLASS)
    order(RESV_ACQUIRE_CLASS, RESV_CLASS)
    order(RESV_CLASS, FS_RECLAIM)
    order(FS_RECLAIM, I_MMAP)
    order(FS_RECLAIM, MMU_NOTIFIER)  # might_alloc() relies on it with nothing held
    order(MMU_NOTIFIER, DMA_FENCE_MAP)
    # Fence waits are allowed under each of these directly as well.
    order(MMAP_LOCK, DMA_FENCE_MAP)
    order(RESV_CLASS, DMA_FENCE_MAP)
    order(FS_RECLAIM, DMA_FENCE_MAP)
    return after


_PRIMED = _prime()
