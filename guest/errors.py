"""DOC: kernel error returns and warnings for the guest model.

The kernel returns ``-errno``; the guest model raises :class:`KernelError` carrying the errno
instead, with one subclass per errno the modelled code returns, so callers write
``except Edeadlk:`` where kernel code writes ``if (ret == -EDEADLK)``::

    try:
        ww_mutex.lock(lock, ctx)
    except Edeadlk:
        ...back off...

:func:`warn_on` plays the role of ``WARN_ON()``/``drm_WARN_ON()``: a broken contract is loud.
Under tests (strict mode, the default) it raises :class:`KernelWarning`; in emulator runs it logs,
counts, and returns the condition so the caller can bail out as the kernel does.
"""

from __future__ import annotations

import errno as _errno
import logging
import threading
import traceback
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class KernelError(Exception):
    """A kernel function returned ``-errno``.

    ``KernelError(errno.ENOMEM)`` and ``Enomem()`` are the same error; ``str()`` names the
    errno symbol so messages read like kernel logs ("-ENOMEM: no free frames").
    """

    errno: int = 0

    def __init__(self, err: int | None = None, msg: str = "") -> None:
        if err is not None:
            self.errno = err
        self.msg = msg
        super().__init__(self.errno, msg)

    def __new__(cls, err: int | None = None, msg: str = ""):
        # KernelError(errno.EDEADLK) builds the matching subclass, so except-clauses work
        # whichever spelling raised it.
        if cls is KernelError and err is not None and err in _BY_ERRNO:
            cls = _BY_ERRNO[err]
        return super().__new__(cls)

    @property
    def name(self) -> str:
        return _NAMES.get(self.errno) or _errno.errorcode.get(self.errno, str(self.errno))

    def __str__(self) -> str:
        return f"-{self.name}: {self.msg}" if self.msg else f"-{self.name}"

    def __reduce__(self):
        return (type(self), (self.errno, self.msg))


_BY_ERRNO: dict[int, type[KernelError]] = {}
# Names as kernel code spells them: Linux aliases EDEADLOCK to EDEADLK and Python's errorcode
# table picks the alias.
_NAMES: dict[int, str] = {}


def _errno_class(name: str) -> type[KernelError]:
    code = getattr(_errno, name)
    _NAMES[code] = name
    cls = type(name.capitalize(), (KernelError,), {"errno": code, "__doc__": f"-{name}"})
    cls.__module__ = __name__
    _BY_ERRNO[code] = cls
    return cls


Edeadlk = _errno_class("EDEADLK")
Ealready = _errno_class("EALREADY")
Enomem = _errno_class("ENOMEM")
Eintr = _errno_class("EINTR")
Einval = _errno_class("EINVAL")
Ebusy = _errno_class("EBUSY")
Enoent = _errno_class("ENOENT")
Eio = _errno_class("EIO")
Efault = _errno_class("EFAULT")
Etimedout = _errno_class("ETIMEDOUT")
Eagain = _errno_class("EAGAIN")
Enospc = _errno_class("ENOSPC")
Eperm = _errno_class("EPERM")
Enodev = _errno_class("ENODEV")
Ecanceled = _errno_class("ECANCELED")
Eexist = _errno_class("EEXIST")
Erange = _errno_class("ERANGE")
Enxio = _errno_class("ENXIO")
Efbig = _errno_class("EFBIG")
Eoverflow = _errno_class("EOVERFLOW")
# -ERESTARTSYS is kernel-internal (512); Python's errno has no name for it.
ERESTARTSYS = 512
_NAMES[ERESTARTSYS] = "ERESTARTSYS"


class Erestartsys(KernelError):
    """-ERESTARTSYS: an interruptible wait saw a pending signal."""

    errno = ERESTARTSYS


_BY_ERRNO[ERESTARTSYS] = Erestartsys


class KernelWarning(AssertionError):
    """A ``WARN_ON()`` fired in strict mode. Names the broken contract."""


@dataclass
class WarnStats:
    """Warnings seen in non-strict runs, by message; emulator runs report these at the end."""

    counts: Counter = field(default_factory=Counter)
    first_stack: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class _WarnState(threading.local):
    pass


_strict = True
_stats = WarnStats()
_stats_lock = threading.Lock()


def set_strict(strict: bool) -> None:
    """Choose whether :func:`warn_on` raises (tests) or logs and counts (emulator runs)."""
    global _strict
    _strict = strict


def is_strict() -> bool:
    return _strict


def warn_stats() -> WarnStats:
    return _stats


def reset_warn_stats() -> None:
    global _stats
    with _stats_lock:
        _stats = WarnStats()


def warn_on(cond: object, msg: str, *args: object) -> bool:
    """Report a broken contract when ``cond`` is true; return ``bool(cond)``. With ``args``,
    the message is ``msg % args``, formatted only when ``cond`` is true (a message naming an
    object by its repr costs a repr on every call otherwise, on paths that never warn).

    Kernel: WARN_ON() / drm_WARN_ON() [include/asm-generic/bug.h]
    """
    if not cond:
        return False
    if args:
        msg = msg % args
    if _strict:
        raise KernelWarning(msg)
    stack = "".join(traceback.format_stack(limit=8)[:-1])
    with _stats_lock:
        if msg not in _stats.first_stack:
            _stats.first_stack[msg] = stack
        _stats.counts[msg] += 1
    log.warning("WARNING: %s", msg)
    return True
