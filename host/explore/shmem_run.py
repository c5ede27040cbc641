"""DOC: the ``shmem`` explore scenario: every kind of user of a GEM shmem object at once.

The machine is the one of :mod:`.scenario` (squeezed guest RAM, kswapd, swap, the in-process
stepped GPU, the gemu driver, the shmem shrinker). The standard workload's GPU jobs and
madvise churn stay; besides them every submitting task draws from its seed a mix of the other
ways a buffer is used, without aiming at any one bug:

``vmap``
    a kernel CPU mapping of a shared BO (what a display driver's framebuffer vmap does): vmap,
    read and compare with the reference, hold the mapping for a while (other tasks' vmaps of
    the same BO nest inside it), read again, vunmap.
``mmap``
    a userspace mapping through the BO's fake mmap offset (``mmap(fd, offset)`` on the DRM
    file: drm_gem_mmap()) of any BO of the task's file, its own or another task's, purgeable
    ones included; read through it (the shared BOs are compared), unmap. A reader task per
    file (a compositor, a capture tool) does the same over and over while the tasks run. A purged BO's offset
    is gone (-EINVAL), and a BO purged while it is being mapped fails with -ENOMEM or raises
    SIGBUS on the access: all right answers.
``import``
    explicit synchronisation: the out-fence of one of the task's earlier jobs (done or not) is
    imported into one of its BOs as a writer (DMA_BUF_IOCTL_IMPORT_SYNC_FILE), as a
    userspace driver that tracks its own fences hands them back to implicit sync.
``upload``
    a staging upload: a new BO written by the CPU, copied by a GPU job into one of the task's
    BOs and closed right after the submit, so its last reference goes when the job is freed.
``recycle``
    a userspace BO cache (Mesa's, in spirit): the task is done with one of its BOs (jobs may
    still use it) and puts it in its cache marked DONTNEED; it takes the oldest cached BO back
    (WILLNEED: reused with new contents when it was not purged), or closes it and makes a new
    one. A cache holds at most :data:`CACHE_MAX` BOs, the oldest is closed: the last reference
    of a BO goes wherever its last user drops it, also while the shrinker walks its LRU.

Invariants: those of every scenario (:mod:`.scenario`: content, gpu-fault, mapped-free, lru,
lifetime, leaks...), ``vmap`` and ``resv-slots`` (checked after every shrinker pass, after
every vmap, mmap and import, and at the end), and ``resv-content``: while a job that uses a
BO (or a fence imported into it) has not signalled, the BO's reservation holds a fence of the
same context that is not earlier, so the BO cannot look idle before that job is done.
"""

from __future__ import annotations

import random

from gemu.device.abi import packets as pk
from gemu.guest.dma_buf import dma_fence, dma_resv
from gemu.guest.dma_buf.dma_resv import DmaResvUsage
from gemu.guest.drm import gem, gem_shmem
from gemu.guest.errors import Ebusy, Einval, Enomem, KernelError
from gemu.guest.gemu_drv.uapi import READ, WRITE, GemuFile
from gemu.guest.kernel import runtime
from gemu.host.explore.scenario import PAGE, _pattern, _Run

HOLD_NS = (2_000, 40_000)
"""How long a vmap user holds its mapping (virtual time, drawn per use)."""
CACHE_MAX = 1
"""BOs a task's userspace cache keeps (DONTNEED) before it closes the oldest."""
MAX_IN_FLIGHT = 2
"""Jobs a task lets run before it waits for them (userspace throttling): more kept every BO
busy at once, and reclaim found nothing to free."""


def make_shmem_plan(sc, seed: int) -> list[list[tuple]]:
    """Each task's operations, drawn from ``seed`` (independent of the interleaving)."""
    rng = random.Random(seed * 6151 + 29)
    plans = []
    for _t in range(sc.tasks):
        ops: list[tuple] = []
        for _j in range(sc.jobs):
            r = rng.random()
            wait = rng.random() < 0.3
            if sc.madvise and r < 0.15:
                ops.append(("scratch", rng.randrange(1, 1 << 32), wait))
            elif r < 0.4:
                k = rng.random()
                if k < 0.3:
                    ops.append(
                        ("fill", rng.randrange(sc.private_bos), rng.randrange(1 << 32), wait)
                    )
                elif k < 0.6:
                    ops.append(
                        ("upload", rng.randrange(sc.private_bos), rng.randrange(1 << 30), wait)
                    )
                else:
                    ops.append(
                        ("copy", rng.randrange(sc.shared_bos), rng.randrange(sc.private_bos), wait)
                    )
            elif r < 0.55:
                ops.append(("vmap", rng.randrange(sc.shared_bos), rng.randrange(*HOLD_NS), wait))
            elif r < 0.7:
                ops.append(("mmap", rng.randrange(1 << 16), wait))
            elif r < 0.85:
                ops.append(("import", rng.randrange(sc.private_bos), rng.randrange(1, 4), wait))
            else:
                ops.append(("recycle", rng.randrange(sc.private_bos), rng.random() < 0.5, wait))
        plans.append(ops)
    return plans


def import_sync_file(obj: gem.DrmGemObject, fence: dma_fence.DmaFence, write: bool) -> None:
    """Add ``fence`` to the object's reservation as a writer (or a reader).

    Kernel: dma_buf_import_sync_file() [drivers/dma-buf/dma-buf.c]
    (DMA_BUF_IOCTL_IMPORT_SYNC_FILE) for a sync_file of one fence. The model skips the export
    the ioctl is called on (an exported BO is never reclaimed, see
    :func:`gem_shmem.is_evictable`): what is imported is the same.

    Raises:
        Enomem: the fence slot could not be reserved.
    """
    usage = DmaResvUsage.WRITE if write else DmaResvUsage.READ
    dma_resv.lock(obj.resv, None)
    try:
        dma_resv.reserve_fences(obj.resv, 1)
        dma_resv.add_fence(obj.resv, fence, usage)
    finally:
        dma_resv.unlock(obj.resv)


class ShmemRun(_Run):
    """One schedule of ``shmem`` (module documentation)."""

    def hog(self) -> None:
        """The standard hog, and beside it a reader per file (:meth:`reader`)."""
        readers = [
            runtime.spawn(self.reader, i, f, name=f"reader{i}") for i, f in enumerate(self.files)
        ]
        super().hog()
        for task in readers:
            task.join()

    def reader(self, i: int, f: GemuFile) -> None:
        """A process sharing the file (a compositor, a capture tool) that maps BOs of the
        file through their mmap offsets and reads them, ``4 * jobs`` times, mostly back to
        back, now and then after a seeded pause."""
        rng = random.Random(self.seed * 4099 + 13 * i)
        for n in range(4 * self.sc.jobs):
            if rng.random() < 0.25:
                runtime.sleep_ns(rng.randrange(5_000, 50_000))
            self._mmap_user(f, rng.randrange(1 << 16), f"reader {i} map {n}")

    def submitter(self, t: int) -> None:
        if not hasattr(self, "shmem_plans"):
            self.shmem_plans = make_shmem_plan(self.sc, self.seed)
            self.tracked: dict[int, tuple[gem.DrmGemObject, list]] = {}
        st = self.states[t]
        f: GemuFile = st["file"]
        st["done"] = []  # this task's out-fences, oldest first
        pending: list = []
        for j, op in enumerate(self.shmem_plans[t]):
            kind, wait = op[0], op[-1]
            what = f"task {t} op {j} ({kind})"
            if kind == "scratch":
                self._scratch_job(t, f, st, op[1], what)
            elif kind in ("fill", "copy"):
                self._job(t, f, st, op, what, pending)
            elif kind == "upload":
                self._upload(t, f, st, op, what, pending)
            elif kind == "vmap":
                self._vmap_user(op[1], op[2], what)
            elif kind == "mmap":
                self._mmap_user(f, op[1], what)
            elif kind == "import":
                self._import(st, op[1], op[2], what)
            else:
                self._recycle(t, f, st, op[1], op[2])
            if wait or len(pending) > MAX_IN_FLIGHT:
                self._wait_all(f, pending)
        self._wait_all(f, pending)
        for p, (ph, _va) in enumerate(st["private"]):
            self._compare(f, ph, st["ref"][p], f"task {t} private BO {p}")

    def _job(self, t: int, f: GemuFile, st: dict, op: tuple, what: str, pending: list) -> None:
        size = self.sc.bo_pages * PAGE
        if op[0] == "fill":
            p, value = op[1], op[2]
            ph, pva = st["private"][p]
            cmd, bos = pk.fill(pva, size, value), [(ph, WRITE)]
            data = value.to_bytes(4, "little") * (size // 4)
        else:
            s, p = op[1], op[2]
            sh, sva = self.shared[s][f]
            ph, pva = st["private"][p]
            cmd, bos = pk.copy(sva, pva, size), [(sh, READ), (ph, WRITE)]
            data = self.shared_ref[s]
        try:
            fence = f.submit(cmd, bos=bos)
        except KernelError as exc:
            self.violate("job-error", f"{what}: submit failed: {exc}")
            return
        st["ref"][p][:] = data
        for h, _access in bos:
            self._track(f.bo(h).obj, fence.acquire())
        self.submitted(what, fence)
        pending.append((what, fence))
        st["done"].append(fence)

    def _upload(self, t: int, f: GemuFile, st: dict, op: tuple, what: str, pending: list) -> None:
        """A staging upload: a new BO written by the CPU, copied by the GPU into private
        ``p``, and closed at once (the job keeps it until it is freed)."""
        size = self.sc.bo_pages * PAGE
        p, tag = op[1], op[2]
        data = _pattern(tag, size)
        try:
            h = f.create_bo(size, name=f"t{t}up{tag & 0xFFFF}")
        except Enomem:
            return
        try:
            f.write(h, 0, data)
            va = f.vm_bind(h)
        except KernelError:
            f.close_bo(h)
            return
        ph, pva = st["private"][p]
        try:
            fence = f.submit(pk.copy(va, pva, size), bos=[(h, READ), (ph, WRITE)])
        except KernelError as exc:
            self.violate("job-error", f"{what}: submit failed: {exc}")
            f.close_bo(h)
            return
        f.close_bo(h)
        st["ref"][p][:] = data
        self._track(f.bo(ph).obj, fence.acquire())
        self.submitted(what, fence)
        pending.append((what, fence))
        st["done"].append(fence)

    def _vmap_user(self, s: int, hold_ns: int, what: str) -> None:
        obj = self.files[0].bo(self.shared[s][self.files[0]][0]).obj
        ref = self.shared_ref[s]
        try:
            vaddr = gem_shmem.vmap(obj)
        except Enomem:
            return  # no frames to pin it in: the display shows nothing new
        try:
            self.check_objects()
            for _ in range(2):
                if vaddr is None or vaddr.is_null:
                    return  # check_objects reported it
                if vaddr.read(0, len(ref)) != ref:
                    self.violate("content", f"{what}: shared BO {s} through its vmap differs")
                    return
                runtime.sleep_ns(hold_ns)
        finally:
            gem_shmem.vunmap(obj, vaddr)
            self.check_objects()

    def _mmap_user(self, f: GemuFile, pick: int, what: str) -> None:
        handles = sorted(f.drm.object_idr)
        if not handles:
            return
        h = handles[pick % len(handles)]
        obj = f.drm.object_idr.get(h)
        if obj is None:
            return
        offset = gem.mmap_offset(obj)  # DRM_IOCTL_GEMU_MMAP_OFFSET
        runtime.preempt("userspace between MMAP_OFFSET and mmap", obj)
        try:
            vma = gem.mmap(self.dev, offset)
        except (Einval, Enomem):
            return  # purged (its offset is gone), or purged while it was being mapped
        try:
            data = vma.read(0, min(obj.size, 64))
        except (gem_shmem.SigBus, Enomem):
            data = None
        finally:
            gem_shmem.vm_close(vma)
            self.check_objects()
        for s, per_file in enumerate(self.shared):
            if per_file[f][0] == h and data is not None and data != self.shared_ref[s][:64]:
                self.violate("content", f"{what}: shared BO {s} through an mmap differs")

    def _import(self, st: dict, p: int, back: int, what: str) -> None:
        done = st["done"]
        if not done:
            return
        jf = done[max(len(done) - back, 0)]
        obj = st["file"].bo(st["private"][p][0]).obj
        fence = jf.acquire()
        try:
            import_sync_file(obj, fence, write=True)
        except Enomem:
            dma_fence.put(fence)
        else:
            self._track(obj, fence)
        self.check_objects()

    def _recycle(self, t: int, f: GemuFile, st: dict, p: int, reuse: bool) -> None:
        """Give private ``p`` another BO, the oldest cached one if ``reuse`` and it is idle
        and was not purged, else a new one, and put the old one in the task's cache
        (DONTNEED). Without memory for the other BO the task keeps the one it has."""
        size = self.sc.bo_pages * PAGE
        gen = st["gen"] = st.get("gen", 0) + 1
        data = _pattern(self.seed * 1000 + 700 + t * 50 + p * 10 + gen, size)
        cache = st.setdefault("cache", [])
        new = None
        if reuse and cache and self._idle(f, cache[0][0]):
            h, va = cache.pop(0)
            if f.madvise(h, willneed=True):
                new = (h, va)
            else:
                f.close_bo(h)  # purged: its contents and its mmap offset are gone
        if new is None:
            try:
                h = f.create_bo(size, name=f"t{t}p{p}g{gen}")
            except Enomem:
                return
            try:
                new = (h, f.vm_bind(h))
            except KernelError:
                f.close_bo(h)
                return
        try:
            f.write(new[0], 0, data)
        except Enomem:
            f.madvise(new[0], willneed=False)
            cache.append(new)
        else:
            old = st["private"][p]
            st["private"][p] = new
            st["ref"][p] = bytearray(data)
            f.madvise(old[0], willneed=False)
            cache.append(old)
        while len(cache) > CACHE_MAX:
            f.close_bo(cache.pop(0)[0])

    @staticmethod
    def _idle(f: GemuFile, h: int) -> bool:
        """Whether no job uses the BO any more (a cache reuses only idle BOs)."""
        try:
            f.wait_bo(h, 0)
        except Ebusy:
            return False
        return True

    # -- resv-content ----------------------------------------------------------------------
    def _track(self, obj: gem.DrmGemObject, fence: dma_fence.DmaFence) -> None:
        """Remember that ``fence`` (a reference the run owns) uses ``obj``."""
        self.tracked.setdefault(id(obj), (obj, []))[1].append(fence)

    def check_objects(self) -> None:
        super().check_objects()
        self.check_resv_content()

    def check_resv_content(self) -> None:
        """The ``resv-content`` invariant (module documentation). Reads the fence tables
        without the lock and without a scheduling point (atomic in the deterministic
        runtime); fences that signalled are forgotten."""
        tracked = getattr(self, "tracked", {})
        for key, (obj, fences) in list(tracked.items()):
            if obj.refcount <= 0:  # freed (its reservation with it): nothing to cover
                for fence in fences:
                    dma_fence.put(fence)
                del tracked[key]
                continue
            live = []
            for fence in fences:
                if dma_fence.test_signaled_flag(fence):
                    dma_fence.put(fence)
                else:
                    live.append(fence)
            fences[:] = live
            if not live or obj.resv is None:
                continue
            lst = obj.resv.fences
            table = lst.table[: lst.num_fences] if lst is not None else []
            for fence in live:
                if not any(
                    e.context == fence.context and e.seqno >= fence.seqno for e, _u in table
                ):
                    self.violate(
                        "resv-content",
                        f"{obj.resv.lock.name}: unsignalled fence {fence.context}:{fence.seqno} "
                        f"of a job using it is not covered by its reservation "
                        f"({', '.join(f'{e.context}:{e.seqno}' for e, _u in table) or 'empty'})",
                    )
                    return

    def teardown(self) -> None:
        for _obj, fences in getattr(self, "tracked", {}).values():
            for fence in fences:
                dma_fence.put(fence)
        self.tracked = {}
        super().teardown()
