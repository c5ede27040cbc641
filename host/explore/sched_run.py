"""DOC: explore scenarios of drm_sched's timeout, reset and teardown paths (``timeouts``,
``exit``).

The machine is the one of :mod:`.scenario` (squeezed guest RAM, kswapd, swap, the in-process
stepped GPU, the gemu driver). Both scenarios keep the standard workload's BOs and jobs and
add what makes the scheduler's rarer paths run, without aiming at any one bug:

``timeouts``: the ``hang`` scenario's workload (task 0's first job waits forever, so every
schedule resets the GPU) with a 200 µs job timeout and, on every file, a *slow* task: it
submits a job that waits on the GPU for a semaphore, sleeps a duration drawn from the seed
between half and one and a half job timeouts, releases the semaphore with a CPU write and
waits for the job, ``slow_jobs`` times. A slow job may finish well before its timeout, be
reset as hung (it then fails with -ETIMEDOUT, which is a right answer), or finish just as
the timeout fires, when the driver finds the timeout spurious (the job's hardware fence has
signalled: ``DRM_GPU_SCHED_STAT_NO_HANG``). The innocent jobs queued behind a reset one are
resubmitted and must finish.

``exit``: every task is a process with a file of its own (its own scheduler entity); the
shared BOs are imported into every file and a *gate* file holds an external writer fence
(vgem's fence_attach) on shared BO 0 that a gate task signals after a seeded delay of up to
two seconds, so every job reading it queues behind the gate. Every task's jobs also take as
in-fence the latest out-fence of the task before it (a cross-process dependency, as a
sync_file passes). Each task exits with probability one half after submitting its plan: its
file is closed as a killed process's is (``GemuFile.close(exiting=True)``:
drm_sched_entity_flush() waits at most one second, drm_sched_entity_fini() kills what is
still queued). The others wait for their jobs and compare their BOs with the reference
model. One in ``fail_deps`` of drm_sched's dependency-table allocations fails (-ENOMEM, as
failslab makes it): the submit fails and nothing of it runs, and userspace carries on.

Besides the invariants of every scenario, both rely on two of drm_sched's own checks
(:mod:`gemu.guest.drm.sched`): ``lifetime`` (the scheduler used a job after it was freed;
a fence reference put once too often) and ``fence-order`` (a job freed with its finished
fence signalled and its scheduled fence not, or before a dependency of it signalled); and
the teardown checks that no job's finished fence is still referenced (``leak``).
"""

from __future__ import annotations

import random
import zlib

from gemu.device.abi import packets as pk
from gemu.device.abi.enums import WaitFunc
from gemu.guest.dma_buf import dma_fence
from gemu.guest.drm import gem
from gemu.guest.drm import sched as drm_sched
from gemu.guest.errors import Enomem, Etimedout, KernelError
from gemu.guest.gemu_drv.uapi import FENCE_WRITE, READ, WRITE, GemuFile
from gemu.guest.kernel import runtime
from gemu.host.explore.scenario import PAGE, _Run, make_plan

GATE_MAX_NS = 2 * drm_sched.MAX_WAIT_SCHED_ENTITY_Q_EMPTY_NS
"""The gate of ``exit`` opens within this much virtual time: about half the exits find jobs
still queued when the flush gives up."""


class SchedRun(_Run):
    """One schedule of ``timeouts`` or ``exit`` (module documentation)."""

    def boot(self) -> None:
        super().boot()
        self.drv.skip_reset_on_progress = self.sc.skip_reset_on_progress
        self._saved_fail_hook = drm_sched.should_fail_alloc
        if self.sc.fail_deps:
            rng = random.Random(self.seed * 104729 + 5)
            n = self.sc.fail_deps
            drm_sched.should_fail_alloc = lambda _job: rng.randrange(n) == 0

    def cleanup(self) -> None:
        """Undo :meth:`boot`'s fault injection (the hook is process-wide)."""
        if hasattr(self, "_saved_fail_hook"):
            drm_sched.should_fail_alloc = self._saved_fail_hook

    def scenario(self) -> None:
        sc = self.sc
        rt = runtime.current_runtime()
        rt.quiet = sc.quiet_setup
        self.boot()
        nfiles = sc.tasks if sc.workload == "exit" else min(sc.files, sc.tasks)
        self.files = [self.drv.open() for _ in range(nfiles)]
        self._setup_shared()
        self.plans = make_plan(sc, self.seed)
        self.states = [self._task_setup(t) for t in range(sc.tasks)]
        if sc.workload == "exit":
            tasks = self._setup_exit()
        else:
            tasks = self._setup_timeouts()
        self._squeeze()
        rt.quiet = False
        spawned = [runtime.spawn(fn, *args, name=name) for fn, args, name in tasks]
        if sc.reclaims:
            spawned.append(runtime.spawn(self.hog, name="hog"))
        for task in spawned:
            task.join()
        rt.quiet = sc.quiet_setup
        for ref in getattr(self, "exported", []):
            dma_fence.put(ref)
        # the files of exited processes are gone; teardown looks at the others
        self.files = [f for f in self.files if not f.closed]
        self.check_lrus()
        self.teardown()

    def teardown(self) -> None:
        super().teardown()
        # every reference on a job's finished fence belongs to something the teardown
        # released (the job, its out-fence, reservation objects, the entity's last_scheduled)
        held = [what for what, out in self.fences if out.fence.refcount > 0]
        if held:
            self.violate(
                "leak",
                f"finished fences still referenced after teardown: {', '.join(held[:4])}"
                + (f" and {len(held) - 4} more" if len(held) > 4 else ""),
            )

    # -- timeouts --------------------------------------------------------------------------
    def _setup_timeouts(self) -> list:
        tasks = [(self.submitter, (t,), f"submit{t}") for t in range(self.sc.tasks)]
        for i, f in enumerate(self.files):
            h = f.create_bo(PAGE, name=f"slow{i}")
            f.write(h, 0, bytes(4))
            tasks.append((self.slow_task, (i, f, h, f.vm_bind(h)), f"slow{i}"))
        return tasks

    def slow_task(self, i: int, f: GemuFile, h: int, va: int) -> None:
        """Jobs that run about as long as the job timeout: each waits on the GPU for a
        semaphore this task writes after a seeded delay."""
        rng = random.Random(self.seed * 7907 + 31 * i)
        timeout = self.sc.job_timeout_ns
        for gen in range(1, self.sc.slow_jobs + 1):
            what = f"slow task {i} job {gen}"
            delay = rng.randrange(timeout // 2, timeout * 3 // 2)
            try:
                fence = f.submit(pk.wait_mem(va, gen, function=WaitFunc.EQ), bos=[(h, READ)])
            except KernelError as exc:
                self.violate("job-error", f"{what}: submit failed: {exc}")
                return
            self.submitted(what, fence)
            runtime.sleep_ns(delay)
            f.write(h, 0, gen.to_bytes(4, "little"))
            try:
                f.wait(fence, timeout=None)
            except Etimedout:
                pass  # reset as hung before the semaphore came: the right answer
            except KernelError as exc:
                self.violate("job-error", f"{what}: {fence.message or exc}")

    # -- exit ------------------------------------------------------------------------------
    def _setup_exit(self) -> list:
        sc = self.sc
        rng = random.Random(self.seed * 6007 + 3)
        self.exiting = [rng.random() < 0.5 for _ in range(sc.tasks)]
        self.exported: list = []
        self.latest: list = [None] * sc.tasks
        gate = self.drv.open()
        obj = self.files[0].bo(self.shared[0][self.files[0]][0]).obj
        self.gate_id = gate.fence_attach(gem.handle_create(gate.drm, obj), FENCE_WRITE)
        self.gate_file = gate
        delay = rng.randrange(GATE_MAX_NS)
        tasks = [(self.exit_submitter, (t,), f"submit{t}") for t in range(sc.tasks)]
        tasks.append((self.open_gate, (delay,), "gate"))
        return tasks

    def open_gate(self, delay: int) -> None:
        runtime.sleep_ns(delay)
        self.gate_file.fence_signal(self.gate_id)

    def exit_submitter(self, t: int) -> None:
        sc = self.sc
        st = self.states[t]
        f: GemuFile = st["file"]
        size = sc.bo_pages * PAGE
        pending = []
        exiting = self.exiting[t]
        for j, op in enumerate(self.plans[t]):
            kind, wait = op[0], op[-1]
            what = f"task {t} job {j} ({kind})"
            if kind == "scratch":
                continue
            if kind == "fill":
                p, value = op[1], op[2]
                ph, pva = st["private"][p]
                cmd, bos = pk.fill(pva, size, value), [(ph, WRITE)]
                ref = value.to_bytes(4, "little") * (size // 4)
            else:
                s, p = op[1], op[2]
                sh, sva = self.shared[s][f]
                ph, pva = st["private"][p]
                bos = [(sh, READ), (ph, WRITE)]
                if kind == "copy":
                    cmd, ref = pk.copy(sva, pva, size), self.shared_ref[s]
                else:
                    cmd = pk.crc32(sva, size, pva)
                    ref = bytearray(st["ref"][p])
                    ref[0:4] = zlib.crc32(self.shared_ref[s]).to_bytes(4, "little")
            before = self.latest[(t - 1) % sc.tasks]
            try:
                out = f.submit(cmd, bos=bos, in_fences=[before] if before is not None else [])
            except Enomem:
                if not sc.fail_deps:
                    self.violate("job-error", f"{what}: submit failed: -ENOMEM")
                continue  # the ioctl failed and nothing of it runs: userspace carries on
            except KernelError as exc:
                self.violate("job-error", f"{what}: submit failed: {exc}")
                continue
            st["ref"][p][:] = ref
            self.submitted(what, out)
            # exported as a sync_file: a reference of its own, valid after the file closes
            self.latest[t] = out.acquire()
            self.exported.append(self.latest[t])
            pending.append((what, out))
            if wait and not exiting:
                self._wait_all(f, pending)
        if exiting:
            f.close(exiting=True)  # killed with its jobs still queued
            return
        self._wait_all(f, pending)
        for p, (ph, _va) in enumerate(st["private"]):
            self._compare(f, ph, st["ref"][p], f"task {t} private BO {p}")
