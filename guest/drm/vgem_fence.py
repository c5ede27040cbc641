"""DOC: external fences, vgem style: make a buffer busy from outside the GPU.

IGT makes buffers busy without running anything on a GPU through vgem's two fence ioctls:
``DRM_IOCTL_VGEM_FENCE_ATTACH`` creates a fence, publishes it in a GEM object's reservation
object as a writer (``VGEM_FENCE_WRITE``) or a reader, and returns a small integer that names
it in the file; ``DRM_IOCTL_VGEM_FENCE_SIGNAL`` signals it. A fence nobody signals expires
after :data:`VGEM_FENCE_TIMEOUT_NS` (10 s, the kernel's ``VGEM_FENCE_TIMEOUT``) on the
runtime clock, so a forgotten fence cannot hang the machine; signalling it afterwards reports
``-ETIMEDOUT``. Closing the file signals every fence it still has.

A :class:`VgemFenceTable` is one file's set of such fences (vgem's ``fence_idr``). A driver
embeds one per open file and exposes the two calls as its uAPI (the gemu driver does)::

    table = VgemFenceTable("file1")
    fid = table.attach(obj, VGEM_FENCE_WRITE)  # obj is now busy for readers and writers
    gem.evict_locked(obj)                      # (resv held) -> Ebusy: the shrinker skips it
    table.signal(fid)                          # idle again: evictable
    table.close()                              # at file close: signals what is left

Everything here is modelled on ``drivers/gpu/drm/vgem/vgem_fence.c``; the timer is a guest task
that sleeps until the fence signals or the timeout passes (the kernel's ``timer_list``).
"""

from __future__ import annotations

import itertools

from gemu.guest.dma_buf import dma_fence, dma_resv
from gemu.guest.dma_buf.dma_fence import DmaFence, DmaFenceCb, DmaFenceOps
from gemu.guest.dma_buf.dma_resv import DmaResvUsage
from gemu.guest.errors import Ebusy, Einval, Enoent, Etimedout
from gemu.guest.kernel import runtime
from gemu.guest.locking.mutex import Mutex

__all__ = [
    "VGEM_FENCE_TIMEOUT_NS",
    "VGEM_FENCE_WRITE",
    "VgemFence",
    "VgemFenceTable",
    "fence_create",
]

VGEM_FENCE_WRITE = 0x1
"""Attach flag: the fence is a writer. Kernel: VGEM_FENCE_WRITE [include/uapi/drm/vgem_drm.h]"""
VGEM_FENCE_TIMEOUT_NS = 10_000_000_000
"""An unsignalled fence expires after this much runtime clock.
Kernel: VGEM_FENCE_TIMEOUT (10*HZ) [drivers/gpu/drm/vgem/vgem_fence.c]"""

_serial = itertools.count(1)


class _VgemFenceOps(DmaFenceOps):
    """Kernel: vgem_fence_ops"""

    def get_driver_name(self, fence: DmaFence) -> str:
        return "vgem"

    def get_timeline_name(self, fence: DmaFence) -> str:
        return "unbound"


_OPS = _VgemFenceOps()


class VgemFence(DmaFence):
    """A fence signalled from outside (userspace), or by its timer. Kernel: struct vgem_fence

    ``expired`` is set when the timer signalled it (nobody did within the timeout);
    ``timer`` is the task playing the kernel's timer_list (``timer.done`` once it ended).
    ``signaled`` and ``message`` give it the view of a job's out-fence
    (:class:`~gemu.guest.gemu_drv.uapi.JobFence`), so tools list and wait for both alike.
    """

    __slots__ = ("_timer_cb", "_timer_wq", "expired", "name", "timer")

    @property
    def signaled(self) -> bool:
        return dma_fence.test_signaled_flag(self)

    @property
    def message(self) -> str:
        return "expired: nobody signalled it in time" if self.expired else ""

    def __repr__(self) -> str:
        state = "signaled" if dma_fence.test_signaled_flag(self) else "pending"
        return f"<VgemFence {self.name} {state}{' expired' if self.expired else ''}>"


def _timer(fence: VgemFence, timeout_ns: int) -> None:
    """The fence's timer: signal it if it is still pending when the timeout passes.
    Kernel: vgem_fence_timeout() (a TIMER_IRQSAFE timer_list)."""
    signaled = fence._timer_wq.wait_event(
        lambda: dma_fence.test_signaled_flag(fence),
        timeout_ns=timeout_ns,
        reason=f"vgem fence {fence.name} timer",
    )
    if not signaled and not dma_fence.check_and_signal(fence):
        fence.expired = True


def fence_create(name: str = "", timeout_ns: int = VGEM_FENCE_TIMEOUT_NS) -> VgemFence:
    """A new pending fence on a fresh context whose timer signals it after ``timeout_ns``.

    Kernel: vgem_fence_create() [drivers/gpu/drm/vgem/vgem_fence.c] (dma_fence_init with
    dma_fence_context_alloc(1) and seqno 1, then mod_timer(jiffies + VGEM_FENCE_TIMEOUT))
    """
    fence = VgemFence(_OPS, dma_fence.context_alloc(1), 1)
    fence.name = name or f"vgem{next(_serial)}"
    fence.expired = False
    fence._timer_wq = runtime.WaitQueue(f"{fence.name}.timer")
    fence._timer_cb = DmaFenceCb()
    dma_fence.add_callback(fence, fence._timer_cb, lambda _f, _cb: fence._timer_wq.wake_up_all())
    fence.timer = runtime.spawn(_timer, fence, timeout_ns, name=f"{fence.name}-timer")
    return fence


class VgemFenceTable:
    """One file's external fences by id. Kernel: vgem_file's ``fence_idr`` + ``fence_mutex``

    Ids start at 1 and are never handed out twice (idr_alloc with an increasing start); a
    signalled id stays reserved, its slot emptied, as ``idr_replace(..., NULL, ...)`` leaves
    it. ``timeout_ns`` is the expiry of the fences it creates.
    """

    def __init__(self, name: str = "file", timeout_ns: int = VGEM_FENCE_TIMEOUT_NS) -> None:
        self.name = name
        self.timeout_ns = timeout_ns
        self.fence_mutex = Mutex(f"{name}.fence_mutex")
        self.fence_idr: dict[int, VgemFence | None] = {}
        self._next_id = 1
        self.closed = False

    def __repr__(self) -> str:
        pending = sum(1 for f in self.fence_idr.values() if f is not None)
        return f"<VgemFenceTable {self.name} {pending} fences>"

    def attach(self, obj, flags: int = 0) -> int:
        """Create a fence, publish it in ``obj``'s reservation object and return its id.

        Kernel: vgem_fence_attach_ioctl() [drivers/gpu/drm/vgem/vgem_fence.c]

        With :data:`VGEM_FENCE_WRITE` the fence is a writer (``DMA_RESV_USAGE_WRITE``: readers
        and writers wait for it), else a reader (``DMA_RESV_USAGE_READ``: writers wait).

        Raises:
            Einval: unknown ``flags``, or the table is closed.
            Ebusy: a conflicting fence is pending on ``obj`` (a writer when attaching a
                reader; any fence when attaching a writer).
        """
        if flags & ~VGEM_FENCE_WRITE:
            raise Einval(msg=f"fence attach: unknown flags {flags:#x}")
        if self.closed:
            raise Einval(msg=f"{self.name}: fence attach after close")
        write = bool(flags & VGEM_FENCE_WRITE)
        fence = fence_create(f"{self.name}.f{self._next_id}", self.timeout_ns)
        resv = obj.resv
        if not dma_resv.test_signaled(resv, dma_resv.usage_rw(write)):
            _discard(fence)
            raise Ebusy(msg=f"{_label(obj)} has a pending {'fence' if write else 'writer'}")
        dma_resv.lock(resv, None)
        try:
            dma_resv.reserve_fences(resv, 1)
            dma_resv.add_fence(resv, fence, DmaResvUsage.WRITE if write else DmaResvUsage.READ)
        except BaseException:
            _discard(fence)
            raise
        finally:
            dma_resv.unlock(resv)
        with self.fence_mutex:
            fid = self._next_id
            self._next_id += 1
            self.fence_idr[fid] = fence
        return fid

    def signal(self, fid: int, flags: int = 0) -> None:
        """Signal and forget fence ``fid``.

        Kernel: vgem_fence_signal_ioctl() [drivers/gpu/drm/vgem/vgem_fence.c]

        Raises:
            Einval: ``flags`` is not 0.
            Enoent: no such fence, or it was signalled through this call already.
            Etimedout: the fence had expired (its timer signalled it); it is forgotten all
                the same.
        """
        if flags:
            raise Einval(msg=f"fence signal: flags must be 0, not {flags:#x}")
        with self.fence_mutex:
            fence = self.fence_idr.get(fid)
            if fence is not None:
                self.fence_idr[fid] = None
        if fence is None:
            raise Enoent(msg=f"{self.name}: no pending external fence {fid}")
        expired = dma_fence.is_signaled(fence)
        dma_fence.check_and_signal(fence)
        dma_fence.put(fence)
        if expired:
            raise Etimedout(
                msg=f"external fence {fid} had expired: nobody signalled it within "
                f"{self.timeout_ns / 1e9:g} s, its timer did"
            )

    def fence(self, fid: int) -> VgemFence | None:
        """The pending fence ``fid``, or None (not modelled after an ioctl: a debug view)."""
        with self.fence_mutex:
            return self.fence_idr.get(fid)

    def id_of(self, fence: DmaFence) -> int | None:
        """The id of a pending ``fence`` of this table, or None (a debug view, no ioctl)."""
        with self.fence_mutex:
            return next((fid for fid, f in self.fence_idr.items() if f is fence), None)

    def close(self) -> None:
        """Signal and drop every fence left. Kernel: vgem_fence_close()"""
        with self.fence_mutex:
            self.closed = True
            left = [f for f in self.fence_idr.values() if f is not None]
            self.fence_idr.clear()
        for fence in left:
            dma_fence.check_and_signal(fence)
            dma_fence.put(fence)


def _discard(fence: VgemFence) -> None:
    """The attach error path: ``dma_fence_signal(fence); dma_fence_put(fence)``."""
    dma_fence.check_and_signal(fence)
    dma_fence.put(fence)


def _label(obj) -> str:
    resv = getattr(obj, "resv", None)
    return resv.lock.name if resv is not None else repr(obj)
