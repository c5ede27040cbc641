"""DOC: the VM_BIND flavour's explore scenarios (``gpuvm``, ``gpuvm-small``).

The machine is the one of :mod:`.scenario` (guest RAM squeezed to ``free_frames`` free
frames, kswapd, swap, the in-process stepped GPU) with the VM_BIND flavour on top
(:class:`~gemu.guest.gemu_drv.vm_bind.VmBindDriver`, which takes the device's reclaim over
with the per-VM shrinker of :mod:`~gemu.guest.gemu_drv.vm_shrinker`). One open file; every
submitting task has a VM of its own with

- ``shared_bos`` external BOs, created once and bound in *every* VM (each VM at its own VA):
  their resv is their own and they sit on every VM's extobj list; the GPU only reads them;
- ``private_bos`` VM-private BOs (``bo_create(size, vm_id)``: the VM's resv) bound at one of
  two VAs, and a private command BO (one page per exec, each written by the CPU just before
  its exec).

Each task runs a plan of ``jobs`` operations drawn from the seed (:func:`make_plan`):
``copy`` (an exec copying a shared BO into a private one), ``fill`` (an exec filling a private
BO), ``crc`` (an exec checksumming a shared BO into a private one); half the copies and
checksums are *held*: the job first waits on the GPU for the task's semaphore (a private BO
the CPU writes ``HOLD_NS`` of virtual time after the submit), so it stays on the GPU while
the others bind, submit and reclaim; ``rebind`` (unbind a
private BO's mapping after the task's last job and bind it again at the other VA: sm_unmap +
sm_map), ``split`` (unbind the second page of a private mapping and bind it back: a REMAP
that keeps ``prev``, then a MAP beside it), and ``enomem`` (an exec whose first page
allocation fails, as ``fail-nth`` makes it: it must fail before the point of no return and
the retry succeed). Every exec names only the VM and takes the task's last bind out-fence as
its in-fence; an unbind takes the task's last job's out-fence. A ``hog`` task takes and gives
back frames below the watermarks (waking kswapd, reclaiming directly) ``reclaims - 1`` times,
then reclaims as much as RAM holds: the shared BOs, on the LRU scanned last, go too. The
set-up (boot, BOs, binds) and the teardown are quiet (``Scenario.quiet_setup``).
``gpuvm-small`` has a fixed plan (``bind-exec-reclaim``): task 0 copies and checksums the
shared BO, task 1 rebinds its private BO and fills it, against one round of the hog.

Invariants, besides those every scenario has (lockdep, signalling, kernel warnings,
deadlocks, leaks):

- ``content``: every private BO equals the reference model (the task's jobs in order) and
  every shared BO its pattern, read by the CPU at the end of each task and at teardown; a
  job that read stale or foreign frames leaves a wrong copy or checksum behind;
- ``gpu-fault``: a valid job faulted, i.e. the GPU read a VA its VM had bound but whose
  pages were not mapped (evicted and not revalidated, or evicted under the job);
- ``mapped-free``: on every frame free, no page table of a live VM maps the frame through a
  mapping of its VA tree (the GPU could read a VA whose pages are gone);
- ``lru``: the per-VM shrinker's LRUs (``unused``, ``gpu_mapped_shared`` and each VM's) are
  well-formed lists, checked after every scan and at the end;
- ``job-error``: a valid bind or exec failed (an -ENOMEM the plan injected, or one met under
  pressure, is retried, a few times, as userspace would).
"""

from __future__ import annotations

import itertools
import random
import zlib

from gemu.device.abi import packets as pk
from gemu.device.abi.enums import WaitFunc
from gemu.guest.drm import drm_gpuvm, gem_lru
from gemu.guest.errors import Enomem, KernelError
from gemu.guest.gemu_drv.vm_bind import GemuVm, VmBindDriver, VmBindFile
from gemu.guest.kernel import runtime
from gemu.host.explore.scenario import PAGE, Scenario, _pattern, _Run

CMD_VA = 0x10_0000
SEM_VA = 0x0800_0000
HOLD_NS = 50_000
"""How long a task keeps a held job waiting on its semaphore (virtual time)."""
SHARED_VA = 0x4000_0000
PRIVATE_VA = 0x2000_0000
OTHER_VA = 0x0100_0000
"""The offset of a private BO's second VA (``rebind`` alternates between the two)."""
RETRIES = 4
"""How often a task retries an -ENOMEM before it counts as a failure."""


def make_plan(sc: Scenario, seed: int) -> list[list[tuple]]:
    """Each task's operations (independent of the interleaving)."""
    if sc.plan == "bind-exec-reclaim":
        return [
            [("copy", 0, 0, False, False), ("crc", 0, 0, False, False)],
            [("rebind", 0, False), ("fill", 0, 0x5A5A0001, False)],
        ][: sc.tasks]
    if sc.plan:
        raise ValueError(f"unknown gpuvm plan {sc.plan!r}")
    rng = random.Random(seed * 7919 + 29)
    plans = []
    for _t in range(sc.tasks):
        ops: list[tuple] = []
        for _j in range(sc.jobs):
            r = rng.random()
            wait = rng.random() < 0.3
            p = rng.randrange(sc.private_bos)
            held = rng.random() < 0.5
            if r < 0.25:
                ops.append(("copy", rng.randrange(sc.shared_bos), p, held, wait))
            elif r < 0.45:
                ops.append(("fill", p, rng.randrange(1, 1 << 32), wait))
            elif r < 0.6:
                ops.append(("crc", rng.randrange(sc.shared_bos), p, held, wait))
            elif r < 0.75:
                ops.append(("rebind", p, wait))
            elif r < 0.87 and sc.bo_pages > 1:
                ops.append(("split", p, wait))
            else:
                ops.append(("enomem", p, rng.randrange(1, 1 << 32), wait))
        plans.append(ops)
    return plans


class _Task:
    """One submitting task's VM and what it holds."""

    def __init__(self, t: int, vm: int) -> None:
        self.t = t
        self.vm = vm
        self.cmd = 0
        self.cmd_pages = 0
        self.cmd_next = 0
        self.sem = 0
        self.sem_value = 0
        self.private: list[list] = []  # [handle, va, ref bytearray]
        self.last_bind = None
        self.last_job = None
        self.pending: list[tuple[str, object]] = []


class GpuvmRun(_Run):
    """One schedule of a ``vm-bind`` scenario (module documentation)."""

    # -- assembly --------------------------------------------------------------------------
    def boot(self) -> None:
        # the flavour's names (VMs, files) come from process-wide counters too
        GemuVm._serial = itertools.count(1)
        VmBindFile._serial = itertools.count(1)
        super().boot()
        self.vdrv = VmBindDriver(self.drv)
        self.binds = 0
        self._check_lrus_after_scans(self.vdrv.reclaim.shrinker)

    def check_lrus(self) -> None:
        """The ``lru`` invariant on the per-VM shrinker's lists."""
        vdrv = getattr(self, "vdrv", None)
        if vdrv is None:
            return
        reclaim = vdrv.reclaim
        limit = self.dev.object_count + 64
        for lru in reclaim._lrus():
            problem = gem_lru.check(lru, limit)
            if problem is not None:
                self.violate("lru", problem)

    def _check_unmapped(self, pfns) -> None:
        """``mapped-free``: no live VM's page table maps a freed frame through a mapping of
        its VA tree (evicted or not: an evicted mapping must have no PTE left)."""
        vdrv = getattr(self, "vdrv", None)
        if vdrv is None:
            return
        freed = set(pfns)
        for f in vdrv.files:
            for vm in f.vms.values():
                if vm.dead:
                    continue
                for va in drm_gpuvm.for_each_va(vm):
                    if va is vm.kernel_alloc_node or va.gem.obj is None:
                        continue
                    for i in range(va.va.range // PAGE):
                        addr = va.va.addr + i * PAGE
                        entry = vm.pt.lookup(addr)
                        pfn = (entry >> 12) & 0xFFFFFFFFF
                        if entry and pfn in freed:
                            rec = vdrv.records.get(va.gem.obj)
                            name = rec.name if rec is not None else repr(va.gem.obj)
                            self.violate(
                                "mapped-free",
                                f"frame {pfn:#x} of {name} freed while mapped at GPU VA "
                                f"{addr:#x} in {vm.name}",
                            )
                            return

    # -- the scenario ----------------------------------------------------------------------
    def scenario(self) -> None:
        sc = self.sc
        rt = runtime.current_runtime()
        rt.quiet = sc.quiet_setup
        self.boot()
        self.files = []
        self.file = f = self.vdrv.open()
        size = sc.bo_pages * PAGE
        self.plans = make_plan(sc, self.seed)
        self.tasks = [_Task(t, f.vm_create()) for t in range(sc.tasks)]
        # external BOs, bound in every VM at a VA of its own
        self.shared = []
        self.shared_ref: list[bytes] = []
        setup = []
        for s in range(sc.shared_bos):
            h = f.bo_create(size, name=f"shared{s}")
            data = _pattern(self.seed * 1000 + s, size)
            f.write(h, 0, data)
            self.shared.append(h)
            self.shared_ref.append(data)
            for task in self.tasks:
                setup.append(f.map(task.vm, self._shared_va(task, s), size, h))
        for task in self.tasks:
            t = task.t
            for p in range(sc.private_bos):
                h = f.bo_create(size, vm_id=task.vm, name=f"t{t}p{p}")
                data = _pattern(self.seed * 1000 + 100 + t * 10 + p, size)
                f.write(h, 0, data)
                va = self._private_va(p, 0)
                setup.append(f.map(task.vm, va, size, h))
                task.private.append([h, va, bytearray(data)])
            task.sem = f.bo_create(PAGE, vm_id=task.vm, name=f"t{t}sem")
            f.write(task.sem, 0, bytes(4))
            setup.append(f.map(task.vm, SEM_VA, PAGE, task.sem))
            task.cmd_pages = max(2, len(self.plans[t]) + 1)
            task.cmd = f.bo_create(task.cmd_pages * PAGE, vm_id=task.vm, name=f"t{t}cmd")
            setup.append(f.map(task.vm, CMD_VA, task.cmd_pages * PAGE, task.cmd))
        for fence in setup:
            self._wait(fence, "set-up bind")
        for task in self.tasks:
            f.vms[task.vm].flush_cleanup()
        self._squeeze()
        self._race()

    def _shared_va(self, task: _Task, s: int) -> int:
        return SHARED_VA + task.t * 0x100_0000 + s * 0x10_0000

    def _private_va(self, p: int, gen: int) -> int:
        return PRIVATE_VA + p * 0x10_0000 + (gen % 2) * OTHER_VA

    hog_ends_reclaiming_all = True
    """The hog's last round reclaims as much as RAM holds: the BOs mapped in several VMs,
    scanned last, go too."""

    # -- the submitters --------------------------------------------------------------------
    def submitter(self, t: int) -> None:
        task = self.tasks[t]
        size = self.sc.bo_pages * PAGE
        for j, op in enumerate(self.plans[t]):
            kind, wait = op[0], op[-1]
            what = f"task {t} op {j} ({kind})"
            if kind == "rebind":
                self._rebind(task, op[1], what)
            elif kind == "split":
                self._split(task, op[1], what)
            else:
                self._job(task, op, size, what)
            if wait:
                self._wait_pending(task)
        self._wait_pending(task)
        for p, (h, _va, ref) in enumerate(task.private):
            self._compare(h, ref, f"task {t} private BO {p}")

    def _job(self, task: _Task, op: tuple, size: int, what: str) -> None:
        kind = op[0]
        held = kind in ("copy", "crc") and op[3]
        if kind == "copy":
            s, p = op[1], op[2]
            _h, va, ref = task.private[p]
            cmd = pk.copy(self._shared_va(task, s), va, size)
            ref[:] = self.shared_ref[s]
        elif kind == "crc":
            s, p = op[1], op[2]
            _h, va, ref = task.private[p]
            cmd = pk.crc32(self._shared_va(task, s), size, va)
            ref[0:4] = zlib.crc32(self.shared_ref[s]).to_bytes(4, "little")
        else:  # fill, enomem
            p, value = op[1], op[2]
            _h, va, ref = task.private[p]
            cmd = pk.fill(va, size, value)
            ref[:] = value.to_bytes(4, "little") * (size // 4)
        if held:  # the GPU waits for the task's semaphore first: the job stays on the GPU
            task.sem_value += 1
            cmd = pk.wait_mem(SEM_VA, task.sem_value, function=WaitFunc.GE) + cmd
        if task.cmd_next == task.cmd_pages:  # every command page used: wait, start over
            self._wait_pending(task)
            task.cmd_next = 0
        slot = task.cmd_next
        task.cmd_next += 1
        f = self.file

        def write():
            f.write(task.cmd, slot * PAGE, cmd)
            return True

        if not self._retry(write, f"{what}: command"):
            return
        in_fences = [task.last_bind] if task.last_bind is not None else []
        inject = kind == "enomem"

        def submit():
            nonlocal inject
            if inject:  # fail-nth: the next page allocation, whoever makes it, fails
                inject = False
                self.allocator.set_fail_nth(1)
            try:
                return f.exec(task.vm, CMD_VA + slot * PAGE, len(cmd), in_fences=in_fences)
            finally:
                self.allocator.set_fail_nth(0)

        fence = self._retry(submit, f"{what}: exec")
        if fence is None:
            return
        self.submitted(what, fence)
        task.pending.append((what, fence))
        task.last_job = fence
        if held:
            runtime.sleep_ns(HOLD_NS)
            value = task.sem_value.to_bytes(4, "little")

            def release():
                f.write(task.sem, 0, value)
                return True

            self._retry(release, f"{what}: semaphore")

    def _rebind(self, task: _Task, p: int, what: str) -> None:
        """Unbind the private BO once the task's jobs are done with it, bind it at its other
        VA; the task's next jobs use the new VA after the bind's out-fence."""
        f = self.file
        size = self.sc.bo_pages * PAGE
        entry = task.private[p]
        h, old = entry[0], entry[1]
        new = self._private_va(p, 1 if old == self._private_va(p, 0) else 0)
        after = [task.last_job] if task.last_job is not None else []
        gone = self._retry(lambda: f.unmap(task.vm, old, size, in_fences=after), f"{what}: unmap")
        if gone is None:
            return
        self._bound(task, gone, f"{what}: unmap")
        back = self._retry(lambda: f.map(task.vm, new, size, h), f"{what}: map")
        if back is None:
            # the BO is unbound: bind it again where it was (the task's jobs use that VA)
            back = self._retry(lambda: f.map(task.vm, old, size, h), f"{what}: map back")
            if back is None:
                return
            new = old
        entry[1] = new
        self._bound(task, back, f"{what}: map")

    def _split(self, task: _Task, p: int, what: str) -> None:
        """Unbind the second page of the private mapping (drm_gpuvm_sm_unmap: a REMAP keeping
        ``prev``) and bind that page back (a MAP beside it)."""
        f = self.file
        h, va, _ref = task.private[p]
        after = [task.last_job] if task.last_job is not None else []
        hole = self._retry(
            lambda: f.unmap(task.vm, va + PAGE, PAGE, in_fences=after), f"{what}: unmap"
        )
        if hole is None:
            return
        self._bound(task, hole, f"{what}: unmap")
        back = self._retry(lambda: f.map(task.vm, va + PAGE, PAGE, h, offset=PAGE), f"{what}: map")
        if back is not None:
            self._bound(task, back, f"{what}: map")

    def _bound(self, task: _Task, fence, what: str) -> None:
        self.binds += 1
        self.submitted(what, fence)
        task.pending.append((what, fence))
        task.last_bind = fence

    def _retry(self, fn, what: str):
        """``fn()``, retried on -ENOMEM (after a growing pause) as userspace would; any other
        error, or -ENOMEM every time, is a ``job-error``. Returns None on failure."""
        for attempt in range(RETRIES + 1):
            try:
                return fn()
            except Enomem as exc:
                if attempt == RETRIES:
                    self.violate("job-error", f"{what}: {exc} ({RETRIES + 1} attempts)")
                    return None
                runtime.sleep_ns(100_000 << attempt)
            except KernelError as exc:
                self.violate("job-error", f"{what}: {exc}")
                return None
        return None

    def _wait(self, fence, what: str) -> None:
        try:
            self.file.wait(fence, timeout=None)
        except KernelError as exc:
            msg = getattr(fence, "message", "") or str(exc)
            kind = "gpu-fault" if "fault" in msg.lower() else "job-error"
            self.violate(kind, f"{what}: {msg}")

    def _wait_pending(self, task: _Task) -> None:
        for what, fence in task.pending:
            self._wait(fence, what)
        task.pending.clear()

    def _compare(self, h: int, ref: bytes, what: str) -> None:
        got = self._retry(lambda: self.file.read(h, 0, len(ref)), f"{what}: CPU read")
        if got is None:
            return
        if got != bytes(ref):
            off = next(i for i in range(len(ref)) if got[i] != ref[i])
            self.violate(
                "content",
                f"{what} differs from the reference at byte {off}: "
                f"{got[off : off + 8].hex()} != {bytes(ref[off : off + 8]).hex()}",
            )

    # -- the end ---------------------------------------------------------------------------
    def teardown(self) -> None:
        for s, h in enumerate(self.shared):
            self._compare(h, self.shared_ref[s], f"shared BO {s}")
        unsignalled = [what for what, fence in self.fences if not fence.signaled]
        drv = self.drv
        vdrv = self.vdrv
        reclaim_stats = vdrv.reclaim.stats
        self.file.close()
        vdrv.remove()
        for f in list(drv.files):
            f.close()
        sched = drv.sched
        ring_left = len(drv.gpu.pending)
        sched_left = len(sched.pending_list) if sched is not None else 0
        drv.remove()
        self._check_leaks(unsignalled, ring_left, sched_left)
        self.stats = {
            "jobs": len(self.fences) - self.binds,
            "binds": self.binds,
            "gpu_packets": self.bus.packets,
            "kswapd_runs": self.allocator.statistics().kswapd_runs,
            "evicted": reclaim_stats.evicted,
            "contended": reclaim_stats.contended,
            "skipped_busy": reclaim_stats.skipped_busy,
        }


__all__ = ["GpuvmRun", "make_plan"]
