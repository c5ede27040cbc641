"""DOC: one explored schedule: a machine, a scenario, the invariants.

:func:`run_schedule` assembles an explore machine inside a fresh
:class:`~gemu.guest.kernel.runtime.Deterministic` runtime (guest RAM, page allocator with
kswapd, swap, GEM device with the shmem shrinker, the gemu driver on an in-process stepped GPU,
:mod:`.bus`), runs the built-in scenario to completion and checks the invariants. The result
is a pure function of the :class:`ExploreConfig` and the seed: the same seed gives the same
event log, schedule and verdict.

The built-in scenario (``standard``): ``tasks`` submitting tasks share ``files`` open files
(tasks ``i`` and ``i + files`` submit on the same scheduler entity). Every task owns private BOs
and a scratch BO; ``shared_bos`` BOs are imported into every file and only read by the GPU.
Each task runs a plan of ``jobs`` jobs drawn from the seed (COPY shared→private, FILL private,
CRC32 of shared into private, and madvise churn on the scratch BO: DONTNEED, a job, WILLNEED,
re-creating the BO when the shrinker purged it). Guest RAM is squeezed by a balloon to
``free_frames`` free frames (watermarks min 2, low 4, high 8), so swap-ins wake kswapd, and a
``hog`` task takes a working set of frames ``reclaims`` times (reclaiming directly when it must)
and gives it back. The GPU executes a few packets per step as a runtime task. With ``hangs``
(the ``hang`` scenario) the first ``hangs`` tasks start with a job that waits forever: the
scheduler's timeout resets the GPU while the others submit and reclaim, and that job must
fail with -ETIMEDOUT. A mutant that only a GPU reset exercises (``reset-allocates``) is
explored on that scenario (:data:`MUTANT_SCENARIO`).

A job script scenario (``Scenario.script``, :mod:`.jobscripts`) runs the script through the
shell in the main task instead of the submitters, on a machine that is not squeezed; its hog
(:meth:`_Run.script_hog`) also reclaims directly until the script ends.

Invariants (the ``kind`` of a :class:`Violation`):

==================== ==========================================================================
``gpu-fault``        a valid job failed on the GPU (MMU fault, command error)
``job-error``        a valid submit or job failed otherwise
``content``          a BO's contents differ from the reference model's
``lockdep``          a lockdep report (lock order, misuse)
``signalling``       a dma_fence signalling-section report (allocation, lock or wait inside)
``lifetime``         an object used after it was freed or freed twice: drm_sched used a job
                     free_job had freed, a dma_fence reference was put once too often, a GEM
                     object got or put after its last reference, an LRU's lock reached after
                     the scan that owned the list returned
``fence-order``      a drm_sched job freed with its finished fence signalled but not its
                     scheduled fence, or before one of its dependencies signalled
``vmap``             a shmem object's vmap and pin counts disagree with its state: ``vaddr``
                     None while ``vmap_use_count`` > 0 (or set at 0), a vmap without its pin,
                     a pin without resident pages, a count below 0
``resv-slots``       a dma_resv fence added without a reserved slot, or a fence list holding
                     more fences than it has slots (the kernel's BUG_ON in
                     dma_resv_add_fence(), with CONFIG_DEBUG_MUTEXES' slot reset at unlock)
``resv-content``     (``shmem``) a BO's reservation no longer covers an unsignalled fence of a
                     job using it: no fence of that context as late (the BO looks idle early)
``kernel-warning``   a WARN_ON (a broken contract, e.g. drm_sched's arm/push rules)
``mapped-free``      a frame freed while a GPU page table still maps it
``expectation``      a job script's ``expect`` failed or one of its lines failed (``file:line``)
``deadlock``         no task can run, no end within ``max_steps``, or a hang (``HANG_NS``)
``leak``             a frame, swap slot, object, ring slot, AS or fence left at the end
``lru``              a GEM LRU whose structure is broken (links, ``obj.lru``, page count),
                     checked after every shrinker pass and at the end, or a list operation
                     that found its node's neighbours inconsistent (CONFIG_DEBUG_LIST)
``crash``            an unexpected exception in a task
==================== ==========================================================================
"""

from __future__ import annotations

import _random
import functools
import gc
import hashlib
import itertools
import logging
import mmap
import random
import struct
import traceback
import zlib
from dataclasses import asdict, dataclass, field, replace

from gemu.device.abi import packets as pk
from gemu.device.abi import pte
from gemu.device.abi.enums import WaitFunc
from gemu.guest import errors
from gemu.guest.dma_buf import dma_fence
from gemu.guest.dma_buf.dma_resv import DmaResvUsage
from gemu.guest.drm import gem, gem_lru, gem_shmem
from gemu.guest.drm import sched as drm_sched
from gemu.guest.errors import Einval, Enomem, Etimedout, KernelError
from gemu.guest.gemu_drv.job import Mutant
from gemu.guest.gemu_drv.uapi import DEFAULT_TIMEOUT_NS, READ, WRITE, GemuDriver, GemuFile
from gemu.guest.kernel import runtime
from gemu.guest.locking import lockdep
from gemu.guest.mm.page_alloc import PageAllocator, PhysMem
from gemu.guest.mm.swap import SwapDevice
from gemu.host.explore.bus import InprocBus

PAGE = 4096
HANG_NS = 20_000_000_000
"""Virtual time after which an unfinished scenario is a hang (ten job timeouts)."""


class HangError(RuntimeError):
    """The scenario made no progress: every task waits for something that never comes."""


KINDS = (
    "gpu-fault",
    "job-error",
    "content",
    "lockdep",
    "signalling",
    "lifetime",
    "fence-order",
    "vmap",
    "resv-slots",
    "resv-content",
    "kernel-warning",
    "mapped-free",
    "expectation",
    "deadlock",
    "leak",
    "lru",
    "crash",
)


@dataclass(frozen=True)
class Scenario:
    """Parameters of the built-in scenario (see the module documentation)."""

    name: str = "standard"
    tasks: int = 3
    files: int = 2
    jobs: int = 5
    shared_bos: int = 2
    private_bos: int = 2
    bo_pages: int = 2
    free_frames: int = 6
    reclaims: int = 3
    madvise: bool = True
    ram_pages: int = 512
    cmd_pool_pages: int = 4
    swap_pages: int = 0
    """Swap slots (0: as many as ``ram_pages``)."""
    hangs: int = 0
    """Tasks (the first ``hangs``) whose first job hangs the GPU until the timeout's reset."""
    job_timeout_ns: int = 0
    """drm_sched's job timeout (0: the driver's default, 2 s). The hang scenario uses a short
    one: every step of virtual time the hang waits is a step of the schedule."""
    script: str = ""
    """A job script's path (``name`` "script"): the main task runs it through the shell
    (:mod:`.jobscripts`) instead of the built-in submitters."""
    script_text: str = ""
    """The script's text as it was when the campaign started (replays use this copy)."""
    quiet_setup: bool = False
    """Make no scheduling decision before the submitters start and after they and the hog
    have finished (the runtime's ``quiet``): booting, creating the BOs, squeezing RAM and the
    teardown run as one fixed sequence, so a systematic search spends its budget on the race
    itself. The invariants are checked all the same."""
    flavour: str = "legacy"
    """The driver flavour the scenario runs: ``legacy`` (a BO list per submit) or ``vm-bind``
    (VMs on drm_gpuvm, binds and exec on a VM, the per-VM shrinker; :mod:`.gpuvm`)."""
    plan: str = ""
    """``vm-bind``: the tasks' plan; empty draws it from the seed, ``bind-exec-reclaim`` is the
    fixed plan of ``gpuvm-small`` (:func:`.gpuvm.make_plan`)."""
    workload: str = ""
    """A workload of :mod:`.sched_run` on drm_sched's rarer paths instead of the standard
    submitters: ``timeouts`` (slow jobs near the job timeout) or ``exit`` (processes killed
    with jobs queued behind dependencies)."""
    slow_jobs: int = 0
    """``timeouts``: jobs of each file's slow task, each about as long as the job timeout."""
    fail_deps: int = 0
    """One in this many of drm_sched's dependency-table allocations fails (0: none)."""
    skip_reset_on_progress: bool = False
    """The driver's timeout policy is v3d's and etnaviv's: no reset while the GPU progresses
    (``GemuDriver.skip_reset_on_progress``)."""


SCENARIOS = {
    "standard": Scenario(),
    "small": Scenario(name="small", tasks=2, files=1, jobs=3),
    "hang": Scenario(name="hang", hangs=1, job_timeout_ns=100_000_000),
    # built for --strategy exhaustive: two submitters (one file each) against one reclaimer
    # over one shared and one private BO each, the set-up quiet
    "race": Scenario(
        name="race",
        tasks=2,
        files=2,
        jobs=2,
        shared_bos=1,
        private_bos=1,
        reclaims=1,
        quiet_setup=True,
    ),
    # drm_sched's timeout and teardown paths (:mod:`.sched_run`)
    "timeouts": Scenario(
        name="timeouts",
        hangs=1,
        job_timeout_ns=200_000,
        slow_jobs=2,
        skip_reset_on_progress=True,
        workload="timeouts",
    ),
    "exit": Scenario(
        name="exit",
        tasks=3,
        files=3,
        jobs=4,
        madvise=False,
        fail_deps=6,
        workload="exit",
    ),
    # every kind of user of a shmem object at once (:mod:`.shmem_run`): GPU jobs, madvise,
    # kernel vmaps, userspace mmaps, explicit-sync fence imports, BOs closed and re-created
    "shmem": Scenario(name="shmem", tasks=4, files=2, jobs=8, free_frames=10, workload="shmem"),
    # the VM_BIND flavour (:mod:`.gpuvm`): one VM per task, external BOs bound in every
    # VM, VM-private BOs, binds and unbinds racing execs and reclaim
    "gpuvm": Scenario(
        name="gpuvm",
        tasks=3,
        files=1,
        jobs=6,
        shared_bos=2,
        private_bos=2,
        free_frames=6,
        reclaims=3,
        madvise=False,
        quiet_setup=True,
        flavour="vm-bind",
    ),
    # built for --strategy exhaustive: a task rebinding its BO against a task executing on
    # a BO shared with it, against one reclaimer; the set-up quiet
    "gpuvm-small": Scenario(
        name="gpuvm-small",
        tasks=2,
        files=1,
        jobs=2,
        shared_bos=1,
        private_bos=1,
        reclaims=1,
        madvise=False,
        quiet_setup=True,
        flavour="vm-bind",
        plan="bind-exec-reclaim",
    ),
}


MUTANT_SCENARIO = {
    "gem-lru-remove-unlocked": "shmem",
    "resv-replace-older": "shmem",
    "vunmap-clears-vaddr": "shmem",
    "mmap-errant-put": "shmem",
    "reset-allocates": "hang",
    "tdr-frees-job": "timeouts",
    "no-hang-drops-job": "timeouts",
    "kill-skips-scheduled": "exit",
    "kill-skips-deps": "exit",
    "dep-error-double-put": "exit",
    "kill-leaks-prev": "exit",
    "bind-allocates-pt": "gpuvm",
    "fence-vm-resv-only": "gpuvm",
    "validate-skips-other-vm": "gpuvm",
    "evict-marks-one-vm": "gpuvm",
    "gpuvm-fence-before-validate": "gpuvm",
    "gpuvm-fence-after-unlock": "gpuvm",
    "gpuvm-arm-before-validate": "gpuvm",
}
"""The built-in scenario a mutant is explored on when none is named: the reset path only
runs when a job hangs, and the VM_BIND flavour's mutants need that flavour."""


def scenario_for_mutant(mutant: str) -> Scenario:
    """The built-in scenario ``gemu explore --mutant M`` and the mutant table use for M."""
    return SCENARIOS[MUTANT_SCENARIO.get(mutant, "standard")]


@dataclass(frozen=True)
class ExploreConfig:
    """What every schedule of a campaign shares."""

    scenario: Scenario = field(default_factory=Scenario)
    strategy: str = "random"
    pct_depth: int = 3
    pct_steps: int = 0
    """PCT's estimate of a schedule's length in preemption points, over which it spreads its
    ``pct_depth - 1`` priority drops; 0: measured (:func:`measured_pct_steps`)."""
    mutant: str = "none"
    max_steps: int = 200_000
    backend: str = "greenlet"
    """How the deterministic runtime switches tasks (:data:`runtime.BACKENDS`); schedules do not
    depend on it."""
    strict_signalling: bool = False
    """lockdep's implicit signalling section (``--strict-signalling``): publishing a fence in a
    reservation object opens it, annotated or not. Off: only the kernel's explicit
    annotations count, as with real lockdep."""

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ExploreConfig:
        d = dict(d)
        d["scenario"] = Scenario(**d["scenario"])
        return cls(**d)


@dataclass
class Violation:
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


@dataclass
class ScheduleResult:
    """The verdict of one schedule. ``schedule`` is the runtime's recorded decisions,
    ``interleaving`` a digest of them (distinct interleavings are distinct digests)."""

    seed: int
    violations: list[Violation]
    steps: int
    schedule: list[int]
    interleaving: str
    event_log: list[str] | None = None
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def kind(self) -> str | None:
        return self.violations[0].kind if self.violations else None

    @property
    def preemptions(self) -> int:
        return count_switches(self.schedule)

    @property
    def outcome(self) -> tuple:
        """What the schedule ended with: its verdicts and the machine's end statistics (jobs,
        GPU packets, kswapd runs, evictions, purges, swap-ins). Two schedules with the same
        outcome may still have interleaved differently; a new outcome is new behaviour."""
        kinds = tuple(sorted({v.kind for v in self.violations}))
        return kinds, tuple(sorted(self.stats.items()))


def count_switches(schedule: list[int]) -> int:
    """Decisions that picked a different task than the previous decision did."""
    return sum(1 for a, b in itertools.pairwise(schedule) if a != b)


def digest(schedule: list[int]) -> str:
    """The blake2b digest of ``repr(schedule)``, the text built from each task id's string
    made once (repr of a list of some 450 ints was 30 us a schedule)."""
    try:
        text = "[" + ", ".join(map(_TID_TEXT.__getitem__, schedule)) + "]"
    except IndexError:  # a task id beyond the table
        text = repr(schedule)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


_TID_TEXT = [str(tid) for tid in range(256)]


# -- the plan -------------------------------------------------------------------------------


def make_plan(sc: Scenario, seed: int) -> list[list[tuple]]:
    """Each task's jobs, drawn from ``seed`` (independent of the interleaving)."""
    rng = random.Random(seed * 7919 + 17)
    plans = []
    for _t in range(sc.tasks):
        ops: list[tuple] = []
        for _j in range(sc.jobs):
            r = rng.random()
            wait = rng.random() < 0.3
            if sc.madvise and r < 0.2:
                ops.append(("scratch", rng.randrange(1, 1 << 32), wait))
            elif r < 0.5:
                ops.append(
                    ("copy", rng.randrange(sc.shared_bos), rng.randrange(sc.private_bos), wait)
                )
            elif r < 0.75:
                ops.append(("fill", rng.randrange(sc.private_bos), rng.randrange(1 << 32), wait))
            else:
                ops.append(
                    ("crc", rng.randrange(sc.shared_bos), rng.randrange(sc.private_bos), wait)
                )
        plans.append(ops)
    return plans


def page_entries(
    mem, root_pa: int, va: int, npages: int, leaves: dict[tuple[int, int], int | None] | None = None
) -> list[int]:
    """The PAGE entries the GPU would use for the ``npages`` pages from ``va`` under the table
    at ``root_pa`` (0 for a page it cannot translate), as :func:`.vm.walk` finds each, with
    one walk down to each leaf table instead of one per page. ``leaves`` keeps the leaf
    tables found, for further calls while no table changes."""
    out: list[int] = []
    last = pte.LEVELS - 1
    if leaves is None:
        leaves = {}
    while npages > 0:
        key = (root_pa, va >> _LEAF_SHIFT)
        table = leaves.get(key, -1)  # -1: not looked up yet (None: no leaf table)
        if table == -1:
            table = leaves[key] = _leaf_table(mem, root_pa, va)
        first = pte.index(va, last)
        n = min(npages, pte.ENTRIES_PER_TABLE - first)
        if table is None:
            out += [0] * n
        else:
            entries = _u64s(n).unpack_from(mem, table + 8 * first)
            out += [e if e & pte.VALID else 0 for e in entries]
        va += n * PAGE
        npages -= n
    return out


def _leaf_table(mem, root_pa: int, va: int) -> int | None:
    """The address of the leaf table translating ``va`` under ``root_pa`` (None: none)."""
    table = root_pa
    for level in range(pte.LEVELS - 1):
        (entry,) = _U64.unpack_from(mem, table + 8 * pte.index(va, level))
        if not entry & pte.VALID:
            return None
        table = pte.address(entry)
    return table


_U64 = struct.Struct("<Q")
_LEAF_SHIFT = 12 + pte.BITS_PER_LEVEL  # the VA bits above those one leaf table translates
_LEAF_INDEX = pte.ENTRIES_PER_TABLE - 1
_VALID = pte.VALID
_PFN = 0xFFFFFFFFF  # the frame number bits of an entry, above the page offset
_U64S: dict[int, struct.Struct] = {}


def _u64s(n: int) -> struct.Struct:
    fmt = _U64S.get(n)
    if fmt is None:
        fmt = _U64S[n] = struct.Struct(f"<{n}Q")
    return fmt


@functools.lru_cache(maxsize=256)
def _pattern(tag: int, size: int) -> bytes:
    """A BO's initial contents: ``random.Random(tag).randbytes(size)``, made by the C
    generator directly (the Python class seeds twice, in ``__new__`` and ``__init__``, and
    wraps getrandbits: 29 -> 21 us for 8 KiB, a dozen per standard schedule). Kept: a
    bounded search runs every schedule with one seed."""
    return _random.Random(tag).getrandbits(size * 8).to_bytes(size, "little")


# -- the machine ----------------------------------------------------------------------------


class _Run:
    """State of one run: the machine, the reference model, the violations."""

    def __init__(self, cfg: ExploreConfig, seed: int) -> None:
        self.cfg = cfg
        self.sc = cfg.scenario
        self.seed = seed
        self.violations: list[Violation] = []
        self.fences: list[tuple[str, object]] = []
        self.stats: dict[str, int] = {}
        self.lockdep_before_abort: int | None = None

    def submitted(self, what: str, fence: object) -> None:
        """Keep ``fence`` (a job's or a bind's) for the end-of-run checks. Every submitter
        appends to the one list and the end reads it in order, so the step doing it is
        marked as working on that list (:func:`runtime.shared`): a systematic search then
        orders two submitters' appends as it orders any other dependent steps."""
        runtime.shared("scenario fences")
        self.fences.append((what, fence))

    def violate(self, kind: str, message: str) -> None:
        runtime.shared("scenario violations")
        if not any(v.kind == kind and v.message == message for v in self.violations):
            self.violations.append(Violation(kind, message))
            runtime.log(f"VIOLATION {kind}: {message}")

    # -- assembly --------------------------------------------------------------------------
    def boot(self) -> None:
        sc = self.sc
        # Names in the event log come from process-wide counters (object and file serials,
        # fence contexts); each run numbers from 1 so that a run depends on its seed alone.
        GemuFile._serial = 0
        gem._serial = itertools.count(1)
        dma_fence._context_counter = itertools.count(1)
        lockdep.set_implicit_signalling(self.cfg.strict_signalling)
        # anonymous pages read as zero until written; bytearray(n) zeroed (touched) every
        # page of RAM at every schedule, most of which the balloon then holds untouched
        self.ram = mmap.mmap(-1, sc.ram_pages * PAGE, flags=mmap.MAP_PRIVATE)
        rt = runtime.current_runtime()
        self.bus = InprocBus(self.ram, track=getattr(rt, "recorder", None) is not None)
        self.gpu_task = runtime.spawn(self.bus.device_task, name="gpu")
        self.allocator = PageAllocator(
            PhysMem(self.ram), reserved_frames=1, watermarks=(2, 4, 8), poison_on_free=True
        )
        self._watch_frees()
        self.swap = SwapDevice(sc.swap_pages or sc.ram_pages)
        self.dev = gem.DrmDevice(
            self.allocator, self.swap, idle_usage=DmaResvUsage.BOOKKEEP, unique="gemu0"
        )
        self.drv = GemuDriver(
            self.dev,
            self.bus,
            mutant=Mutant(self.cfg.mutant),
            cmd_pool_size=sc.cmd_pool_pages * PAGE,
            timeout_ns=sc.job_timeout_ns or DEFAULT_TIMEOUT_NS,
        )
        self.drv.probe()
        self.bus.owner_of = self._frame_owners
        self._watch_lrus()
        self.allocator.start_kswapd()

    def _frame_owners(self, pfns: set[int]) -> set[str]:
        """The objects whose locks guard the frames ``pfns`` (for a search: what a GPU step
        worked on): a BO's frames its reservation lock, a VM's page tables its page-table
        lock, the ring and the fence page the ring lock. Any other frame (a free one, reached
        through a stale mapping) makes the step dependent with every other (``*``)."""
        owner: dict[int, str] = {}
        drv = self.drv
        for obj in drv.bos:
            pages = obj.pages
            if pages:
                name = obj.resv.lock.name
                for pfn in pages:
                    owner[pfn] = name
        for f in drv.files:
            vm = f.vm
            for pa in vm._tables.values():
                owner[pa >> 12] = vm.lock.name
        gpu = drv.gpu
        ring = gpu.lock.name
        for i in range(gpu.ring_pages):
            owner[(gpu.ring_pa >> 12) + i] = ring
        owner[gpu.fence_pa >> 12] = ring
        return {owner.get(pfn, "*") for pfn in pfns}

    def _watch_frees(self) -> None:
        """Check every freed frame against the GPU page tables (a KASAN for the GPU)."""
        alloc = self.allocator
        free_extents = alloc.free_extents

        # free_extents is where every free ends (free_pages and free_page call it, the shmem
        # backing store calls it directly)
        def checked_free_extents(runs):
            self._check_unmapped({pfn for start, n in runs for pfn in range(start, start + n)})
            free_extents(runs)

        alloc.free_extents = checked_free_extents

    def _watch_lrus(self) -> None:
        """Check the GEM LRUs after every pass of the shmem shrinker (and at the end)."""
        mm = self.dev.shmem_mm
        if mm is not None:
            self._check_lrus_after_scans(mm.shrinker)

    def _check_lrus_after_scans(self, shrinker) -> None:
        """Run :meth:`check_lrus` after every ``scan_objects`` pass of ``shrinker``."""
        scan = shrinker.scan_objects

        def checked_scan(sc):
            try:
                return scan(sc)
            finally:
                self.check_lrus()

        shrinker.scan_objects = checked_scan

    def check_lrus(self) -> None:
        """The ``lru`` invariant: every LRU of the shmem shrinker is a well-formed list."""
        mm = self.dev.shmem_mm
        if mm is None:
            return
        limit = self.dev.object_count + 64  # a guard: the walk also stops at a repeated node
        for lru in (mm.lru_pinned, mm.lru_evictable, mm.lru_evicted):
            problem = gem_lru.check(lru, limit)
            if problem is not None:
                self.violate("lru", problem)
        self.check_objects()

    def check_objects(self) -> None:
        """The ``vmap`` and ``resv-slots`` invariants over the driver's live BOs."""
        for obj in list(getattr(self.drv, "bos", ())):
            if isinstance(obj, gem_shmem.DrmGemShmemObject):
                problem = check_shmem_counts(obj)
                if problem is not None:
                    self.violate("vmap", problem)
            problem = check_fence_slots(obj.resv) if obj.resv is not None else None
            if problem is not None:
                self.violate("resv-slots", problem)

    def _check_unmapped(self, pfns) -> None:
        drv = getattr(self, "drv", None)
        if drv is None:
            return
        freed = pfns if isinstance(pfns, set) else set(pfns)
        leaves: dict = {}
        for bo in list(drv.bos.values()):
            for m in bo.mappings:
                vm = m.vm
                if not m.mapped or vm.dead:
                    continue
                va, n = m.va, m.npages
                first = (va >> 12) & _LEAF_INDEX
                if first + n <= pte.ENTRIES_PER_TABLE:
                    # the usual mapping, inside one leaf table: its entries read in place;
                    # page_entries below only for a hit, to name the page
                    key = (vm.root_pa, va >> _LEAF_SHIFT)
                    table = leaves.get(key, -1)
                    if table == -1:
                        table = leaves[key] = _leaf_table(vm.mem, vm.root_pa, va)
                    if table is None:
                        continue
                    for e in _u64s(n).unpack_from(vm.mem, table + 8 * first):
                        if e & _VALID and (e >> 12) & _PFN in freed:
                            break
                    else:
                        continue
                entries = page_entries(vm.mem, vm.root_pa, va, n, leaves)
                for i, entry in enumerate(entries):
                    if entry and (entry >> 12) & 0xFFFFFFFFF in freed:
                        self.violate(
                            "mapped-free",
                            f"frame {(entry >> 12) & 0xFFFFFFFFF:#x} of {bo.name} freed while "
                            f"mapped at GPU VA {m.va + i * PAGE:#x} in {m.vm.name}",
                        )
                        return

    # -- the scenario ----------------------------------------------------------------------
    def main(self) -> None:
        self.done_wq = runtime.WaitQueue("scenario done")
        self.done = False
        runtime.spawn(self.watchdog, name="watchdog")
        try:
            self.scenario()
        finally:
            with self.done_wq.lock:
                self.done = True
            self.done_wq.wake_up_all()

    def watchdog(self) -> None:
        """A hang is a deadlock too: every task waits, but the interrupt task's polling keeps
        the virtual clock moving, so the runtime alone would wait forever."""
        if self.done_wq.wait_event(lambda: self.done, timeout_ns=HANG_NS, reason="watchdog"):
            return
        rt = runtime.current_runtime()
        # what lockdep said before the hang counts; the unwinding that follows does not
        self.lockdep_before_abort = len(rt.lockdep.reports) if rt.lockdep is not None else 0
        stuck = [runtime.describe_task(t) for t in rt.tasks if not t.done and t.name != "watchdog"]
        raise HangError(
            f"hang: the scenario did not finish within {HANG_NS / 1e9:.0f} s of virtual time"
            " | " + " | ".join(line.strip() for line in stuck)
        )

    def scenario(self) -> None:
        sc = self.sc
        if sc.script:
            self.script_scenario()
            return
        rt = runtime.current_runtime()
        rt.quiet = sc.quiet_setup
        self.boot()
        self.files = [self.drv.open() for _ in range(min(sc.files, sc.tasks))]
        self._setup_shared()
        self.plans = make_plan(sc, self.seed)
        self.states = [self._task_setup(t) for t in range(sc.tasks)]
        self._squeeze()
        self._race()

    def _race(self) -> None:
        """The race: a submitter per task and the hog, scheduling decisions on; then, quiet
        again if the set-up was, the LRU check and the teardown."""
        sc = self.sc
        rt = runtime.current_runtime()
        rt.quiet = False
        tasks = [runtime.spawn(self.submitter, t, name=f"submit{t}") for t in range(sc.tasks)]
        if sc.reclaims:
            tasks.append(runtime.spawn(self.hog, name="hog"))
        for task in tasks:
            task.join()
        rt.quiet = sc.quiet_setup
        self.check_lrus()
        self.teardown()

    def _setup_shared(self) -> None:
        """The shared BOs: created in file 0, imported into the others (PRIME), GPU-read
        only."""
        sc = self.sc
        size = sc.bo_pages * PAGE
        f0 = self.files[0]
        self.shared: list[dict[GemuFile, tuple[int, int]]] = []
        self.shared_ref: list[bytes] = []
        for s in range(sc.shared_bos):
            h = f0.create_bo(size, name=f"shared{s}")
            data = _pattern(self.seed * 1000 + s, size)
            f0.write(h, 0, data)
            per_file = {f0: (h, f0.vm_bind(h))}
            obj = f0.bo(h).obj
            for f in self.files[1:]:
                h2 = gem.handle_create(f.drm, obj)
                per_file[f] = (h2, f.vm_bind(h2))
            self.shared.append(per_file)
            self.shared_ref.append(data)

    def script_scenario(self) -> None:
        """A job script in this (main) task while the hog reclaims (:mod:`.jobscripts`)."""
        from gemu.host.explore.jobscripts import run_script

        self.boot()
        self.files, self.shared = [], []
        self._squeeze()
        self.script_done = False
        hog = runtime.spawn(self.script_hog, name="hog") if self.sc.reclaims else None
        try:
            run_script(self)
        finally:
            self.script_done = True
        if hog is not None:
            hog.join()
        self.teardown()

    def script_hog(self) -> None:
        """The hog of a script scenario: a script's BOs are not squeezed, so besides taking
        frames and giving them back it reclaims directly (the shrinker evicts and purges the
        script's idle BOs), ``reclaims`` rounds or until the script ends. It never sleeps: a
        running script advances no virtual time, so a sleeping hog would wake too late."""
        n = self.sc.bo_pages * 2
        for _ in range(self.sc.reclaims):
            if self.script_done:
                return
            try:
                pfns = self.allocator.alloc_pages(n)
            except KernelError:
                pfns = []
            runtime.preempt("hog holds its frames")
            if pfns:
                self.allocator.free_pages(pfns)
            self.allocator.direct_reclaim(n)

    def _task_setup(self, t: int) -> dict:
        sc = self.sc
        f = self.files[t % len(self.files)]
        size = sc.bo_pages * PAGE
        st = {"file": f, "private": [], "ref": [], "scratch": None, "sem": None}
        if t < sc.hangs:
            h = f.create_bo(PAGE, name=f"t{t}sem")
            st["sem"] = (h, f.vm_bind(h))
        for p in range(sc.private_bos):
            h = f.create_bo(size, name=f"t{t}p{p}")
            data = _pattern(self.seed * 1000 + 100 + t * 10 + p, size)
            f.write(h, 0, data)
            st["private"].append((h, f.vm_bind(h)))
            st["ref"].append(bytearray(data))
        if sc.madvise:
            st["scratch"] = self._new_scratch(f, t, 0)
        return st

    def _new_scratch(self, f: GemuFile, t: int, gen: int) -> list:
        size = self.sc.bo_pages * PAGE
        h = f.create_bo(size, name=f"t{t}s{gen}")
        data = _pattern(self.seed * 1000 + 500 + t * 10 + gen, size)
        f.write(h, 0, data)
        return [h, f.vm_bind(h), bytearray(data), gen]

    def _squeeze(self) -> None:
        """Take free frames away until ``free_frames`` are left (a balloon)."""
        extra = self.allocator.nr_free - self.sc.free_frames
        self.balloon = self.allocator.alloc_pages(extra) if extra > 0 else []

    hog_ends_reclaiming_all = False
    """Whether the hog's last round reclaims as much as RAM holds instead (what a large
    allocation under pressure asks of the shrinkers)."""

    def hog(self) -> None:
        """A memory hog: take a working set's worth of frames (below the watermarks, so
        kswapd wakes and the allocation reclaims directly), hold them, give them back."""
        n = self.sc.bo_pages * 2
        for r in range(self.sc.reclaims):
            if self.hog_ends_reclaiming_all and r == self.sc.reclaims - 1:
                self.allocator.direct_reclaim(self.sc.ram_pages)
                continue
            try:
                pfns = self.allocator.alloc_pages(n)
            except KernelError:
                self.allocator.direct_reclaim(n)
                continue
            runtime.sleep_ns(20_000)
            self.allocator.free_pages(pfns)
            runtime.sleep_ns(20_000)

    def submitter(self, t: int) -> None:
        sc = self.sc
        st = self.states[t]
        f: GemuFile = st["file"]
        size = sc.bo_pages * PAGE
        pending = []
        hang = None
        if st["sem"] is not None:  # WAIT_MEM for a value nobody writes: only a reset ends it
            sh, sva = st["sem"]
            hang = f.submit(pk.wait_mem(sva, 1, function=WaitFunc.EQ), bos=[(sh, READ)])
            self.submitted(f"task {t} hang", hang)
        for j, op in enumerate(self.plans[t]):
            kind, wait = op[0], op[-1]
            what = f"task {t} job {j} ({kind})"
            if kind == "scratch":
                self._scratch_job(t, f, st, op[1], what)
                continue
            if kind == "copy":
                _s, p = op[1], op[2]
                sh, sva = self.shared[_s][f]
                ph, pva = st["private"][p]
                cmd = pk.copy(sva, pva, size)
                bos = [(sh, READ), (ph, WRITE)]
                st["ref"][p][:] = self.shared_ref[_s]
            elif kind == "fill":
                p, value = op[1], op[2]
                ph, pva = st["private"][p]
                cmd = pk.fill(pva, size, value)
                bos = [(ph, WRITE)]
                st["ref"][p][:] = value.to_bytes(4, "little") * (size // 4)
            else:  # crc
                _s, p = op[1], op[2]
                sh, sva = self.shared[_s][f]
                ph, pva = st["private"][p]
                cmd = pk.crc32(sva, size, pva)
                bos = [(sh, READ), (ph, WRITE)]
                st["ref"][p][0:4] = zlib.crc32(self.shared_ref[_s]).to_bytes(4, "little")
            try:
                fence = f.submit(cmd, bos=bos)
            except KernelError as exc:
                self.violate("job-error", f"{what}: submit failed: {exc}")
                continue
            self.submitted(what, fence)
            pending.append((what, fence))
            if wait:
                self._wait_all(f, pending)
        self._wait_all(f, pending)
        if hang is not None:
            self._wait_hang(f, hang, f"task {t} hang")
        for p, (ph, _va) in enumerate(st["private"]):
            self._compare(f, ph, st["ref"][p], f"task {t} private BO {p}")

    def _scratch_job(self, t: int, f: GemuFile, st: dict, value: int, what: str) -> None:
        scr = st["scratch"]
        if scr is None:
            return
        h, va, ref, gen = scr
        size = self.sc.bo_pages * PAGE
        f.madvise(h, willneed=False)
        submitted = False
        try:
            fence = f.submit(pk.fill(va, size, value), bos=[(h, WRITE)])
            submitted = True
        except Einval:
            pass  # purged by the shrinker before the submit: the right answer
        except KernelError as exc:
            self.violate("job-error", f"{what}: submit failed: {exc}")
        if submitted:
            self.submitted(what, fence)
            self._wait_all(f, [(what, fence)])
            ref[:] = value.to_bytes(4, "little") * (size // 4)
        if f.madvise(h, willneed=True):
            self._compare(f, h, ref, f"task {t} scratch BO")
        else:  # purged: userspace re-creates its buffer (retrying a transient -ENOMEM)
            f.close_bo(h)
            for attempt in range(5):
                try:
                    st["scratch"] = self._new_scratch(f, t, gen + 1)
                    return
                except Enomem:
                    runtime.sleep_ns(100_000 << attempt)
            self.violate("job-error", f"{what}: re-creating the purged scratch BO: -ENOMEM")
            st["scratch"] = None

    def _wait_all(self, f: GemuFile, pending: list) -> None:
        for what, fence in pending:
            try:
                f.wait(fence, timeout=None)
            except KernelError as exc:
                msg = fence.message or str(exc)
                kind = "gpu-fault" if "fault" in msg.lower() else "job-error"
                self.violate(kind, f"{what}: {msg}")
        pending.clear()

    def _wait_hang(self, f: GemuFile, fence, what: str) -> None:
        """The hanging job must end by the timeout's reset, with -ETIMEDOUT."""
        try:
            f.wait(fence, timeout=None)
        except Etimedout:
            return
        except KernelError as exc:
            self.violate("job-error", f"{what}: {fence.message or exc}")
            return
        self.violate("job-error", f"{what}: a job waiting forever completed without a reset")

    def _compare(self, f: GemuFile, h: int, ref: bytes, what: str) -> None:
        try:
            got = f.read(h, 0, len(ref))
        except KernelError as exc:
            self.violate("job-error", f"{what}: CPU read failed: {exc}")
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
        for f in self.files:
            for s in range(len(self.shared)):
                self._compare(f, self.shared[s][f][0], self.shared_ref[s], f"shared BO {s}")
                break
        unsignalled = [what for what, fence in self.fences if not fence.signaled]
        drv = self.drv
        sched = drv.sched
        for f in list(drv.files):
            f.close()
        ring_left = len(drv.gpu.pending)
        sched_left = len(sched.pending_list) if sched is not None else 0
        mm_stats = self.dev.shmem_mm.stats if self.dev.shmem_mm is not None else None
        drv.remove()
        self._check_leaks(unsignalled, ring_left, sched_left)
        self.stats = {
            "jobs": len(self.fences),
            "gpu_packets": self.bus.packets,
            "kswapd_runs": self.allocator.statistics().kswapd_runs,
        }
        if mm_stats is not None:
            self.stats.update(
                evicted=mm_stats.evicted, purged=mm_stats.purged, swapped_in=mm_stats.swapped_in
            )

    def _check_leaks(self, unsignalled: list[str], ring_left: int, sched_left: int) -> None:
        """After the driver is removed: stop kswapd and the bus, give the balloon back, and
        report as one ``leak`` violation every fence never signalled, object or frame or
        swap slot still held, job left on the ring or in the scheduler, AS still bound."""
        drv = self.drv
        alloc = self.allocator
        alloc.stop_kswapd()
        self.bus.stop()
        if self.balloon:
            # With the driver gone no page table maps a frame and nothing reads guest memory
            # again: the balloon (most of RAM) goes back without the mapped-free check and
            # the poisoning, which were a tenth of a schedule; the allocator's own checks stay.
            del alloc.free_extents  # _watch_frees' wrapper
            alloc.poison_on_free = False
            alloc.free_pages(self.balloon)
        problems = []
        if unsignalled:
            problems.append(f"fences never signalled: {', '.join(unsignalled)}")
        if self.dev.object_count:
            problems.append(f"{self.dev.object_count} GEM objects alive")
        if self.dev.leaked:
            problems.append(f"leaked objects {self.dev.leaked!r}")
        if drv.frames.frames:
            problems.append(f"{drv.frames.frames} driver frames not freed")
        if self.allocator.nr_used:
            problems.append(f"{self.allocator.nr_used} frames in use")
        if self.swap.nr_used_slots:
            problems.append(f"{self.swap.nr_used_slots} swap slots in use")
        if ring_left or sched_left:
            problems.append(f"{ring_left} ring slots and {sched_left} scheduler jobs left")
        busy = [vm.name for vm in drv.gpu.mmu.slots if vm is not None]
        if busy:
            problems.append(f"address spaces still bound: {busy}")
        if problems:
            self.violate("leak", "; ".join(problems))


class ExploreRuntime(runtime.Deterministic):
    """The deterministic runtime with forgiving replay: a replayed decision that names a task
    which cannot run is replaced by the lowest runnable task id (counted in ``diverged``),
    so an edited schedule (shrinking) still gives a deterministic run. A recorded schedule
    replays exactly, with ``diverged == 0``."""

    diverged = 0

    def _replay_diverges(self, runnable: list[runtime.Task]) -> runtime.Task:
        self._replay[self._replay_pos - 1] = runnable[0].tid
        self.diverged += 1
        return runnable[0]


_MEASURED_STEPS: dict[tuple, int] = {}

CALIBRATION_SEEDS = (0, 1, 2)
"""Seeds of the runs that measure a scenario's length for PCT."""


def measured_pct_steps(cfg: ExploreConfig) -> int:
    """The median length, in preemption points, of the scenario's schedules: the correct
    driver under the random strategy with :data:`CALIBRATION_SEEDS`. A pure function of the
    scenario (cached per process), so every worker and every cluster node derives the same.

    PCT draws its priority-change points uniformly from ``1..pct_steps``; an estimate much
    longer than the runs puts most of them after the end, where they do nothing (the standard
    scenario runs about 800 steps: a fixed estimate of 2000 found ``arm-before-failing-step``
    in 12 of 20 campaigns, the measured one in 19)."""
    key = (cfg.scenario, cfg.max_steps)
    steps = _MEASURED_STEPS.get(key)
    if steps is None:
        base = replace(cfg, strategy="random", mutant="none", pct_steps=1)
        lengths = sorted(run_schedule(base, seed).steps for seed in CALIBRATION_SEEDS)
        steps = _MEASURED_STEPS[key] = max(lengths[len(lengths) // 2], 1)
    return steps


def resolve(cfg: ExploreConfig) -> ExploreConfig:
    """``cfg`` with a measured ``pct_steps`` where it asks for one (PCT, ``pct_steps`` 0)."""
    if cfg.strategy != "pct" or cfg.pct_steps:
        return cfg
    return replace(cfg, pct_steps=measured_pct_steps(cfg))


def run_schedule(
    cfg: ExploreConfig,
    seed: int,
    replay: list[int] | None = None,
    *,
    keep_log: bool = False,
    search=None,
) -> ScheduleResult:
    """Run one schedule of ``cfg`` with ``seed`` (or the recorded ``replay`` decisions).

    ``search`` (:mod:`.exhaustive`) makes the decisions instead of the strategy: its
    ``attach(rt)`` installs the runtime's chooser and recorder; a run it abandons raises
    :class:`~gemu.guest.kernel.runtime.RunAbandoned`.

    Python's cyclic garbage collector is off while the schedule runs and collects the
    youngest generation once the schedule's machine is garbage: most of what a schedule
    allocates lives until its end, so the collections during the run freed next to nothing
    and promoted the machine into an older generation, whose collection then walked it
    again (about a tenth of a standard schedule). Nothing in a run depends on when memory
    is freed."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _run_schedule(cfg, seed, replay, keep_log, search)
    finally:
        if enabled:
            gc.enable()
            gc.collect(0)


def _run_schedule(cfg, seed, replay, keep_log, search) -> ScheduleResult:
    cfg = resolve(cfg)
    rt = ExploreRuntime(
        seed,
        # an exhaustive search's chooser makes every decision (see .exhaustive)
        strategy="random" if cfg.strategy == "exhaustive" else cfg.strategy,
        pct_depth=cfg.pct_depth,
        pct_steps=cfg.pct_steps,
        replay=replay,
        max_steps=cfg.max_steps,
        strict=False,
        backend=cfg.backend,
    )
    if search is not None:
        search.attach(rt)
    if cfg.scenario.flavour == "vm-bind":
        from gemu.host.explore.gpuvm import GpuvmRun

        run = GpuvmRun(cfg, seed)
    elif cfg.scenario.workload == "shmem":
        from gemu.host.explore.shmem_run import ShmemRun

        run = ShmemRun(cfg, seed)
    elif cfg.scenario.workload:
        from gemu.host.explore.sched_run import SchedRun

        run = SchedRun(cfg, seed)
    else:
        run = _Run(cfg, seed)
    was_strict = errors.is_strict()
    errors.set_strict(False)
    # GPU faults and warnings are verdicts here, not log lines
    quiet = logging.getLogger("gemu")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL + 1)
    errors.reset_warn_stats()
    corrupted = False
    try:
        rt.run(run.main)
    except runtime.DeadlockError as exc:
        run.violate(
            "deadlock",
            str(exc).splitlines()[0]
            + " | "
            + " | ".join(line.strip() for line in str(exc).splitlines()[1:-1]),
        )
    except HangError as exc:
        run.violate("deadlock", str(exc).split("\n")[0])
    except runtime.LivelockError as exc:
        run.violate("deadlock", f"livelock: {str(exc).splitlines()[0]}")
    except gem_lru.ListCorruption as exc:
        run.violate("lru", str(exc))
        corrupted = True
    except (runtime.ReplayDivergence, runtime.RunAbandoned, KeyboardInterrupt):
        raise  # Ctrl-C stops the search; it is not a crash of the schedule
    except BaseException as exc:
        if isinstance(exc, runtime.ReplayDivergence):
            raise
        tb = traceback.format_exception(exc)
        run.violate("crash", f"{type(exc).__name__}: {exc} | {''.join(tb[-3:]).strip()}")
    finally:
        stats = errors.warn_stats()
        errors.set_strict(was_strict)
        quiet.setLevel(level)
        cleanup = getattr(run, "cleanup", None)
        if cleanup is not None:
            cleanup()
    aborted = corrupted or any(v.kind in ("deadlock", "crash") for v in run.violations)
    for msg in stats.counts:
        run.violate(warning_kind(msg), msg)
    st = rt.lockdep
    # an aborted run unwinds every task from wherever it was: what lockdep says then is noise
    keep = run.lockdep_before_abort if aborted else None
    if st is not None and (not aborted or keep):
        for rep in st.reports[:keep]:
            kind = "signalling" if rep.kind == "signalling" else "lockdep"
            run.violate(kind, f"{rep.kind}: {rep.message.splitlines()[0]}")
    errors.reset_warn_stats()
    order = {k: i for i, k in enumerate(KINDS)}
    # one primary verdict per schedule: the most specific invariant first
    run.violations.sort(key=lambda v: order.get(v.kind, len(order)))
    result = ScheduleResult(
        seed,
        run.violations,
        rt.steps,
        list(rt.schedule),
        digest(rt.schedule),
        list(rt.event_log) if keep_log else None,
        run.stats,
    )
    # freed now rather than walked by run_schedule's collection (half of what it found)
    rt.forget_events()
    return result


_LIFETIME_WARNINGS = (
    drm_sched.LIFETIME_CHECK,
    "dma_fence_put: refcount underflow",
    "dma_fence_get on a released fence",
    "drm_gem_object_get on freed",
    "drm_gem_object_put: refcount underflow",
    "use after free:",
)
_SLOT_WARNINGS = ("add_fence on",)


def warning_kind(message: str) -> str:
    """The invariant a kernel warning belongs to: ``lifetime`` for a use after free or a
    reference put once too often, ``fence-order`` for drm_sched's fence-order check, else
    ``kernel-warning``."""
    if message.startswith(_LIFETIME_WARNINGS):
        return "lifetime"
    if message.startswith(drm_sched.FENCE_ORDER_CHECK):
        return "fence-order"
    if message.startswith(_SLOT_WARNINGS):
        return "resv-slots"
    return "kernel-warning"


def check_shmem_counts(obj: gem_shmem.DrmGemShmemObject) -> str | None:
    """What is wrong with a shmem object's vmap and pin counts, or None (the ``vmap``
    invariant): ``vaddr`` is a live mapping exactly while ``vmap_use_count`` > 0, a vmap
    holds a pin, a pinned object is resident (pages, not evicted or purged), and a pin holds
    a page reference. An imported object (its exporter counts) is not checked. Reads without
    the lock, which the deterministic runtime makes atomic."""
    if obj.import_attach is not None:
        return None
    vmaps, pins, uses = obj.vmap_use_count, obj.pages_pin_count, obj.pages_use_count
    name = obj.resv.lock.name if obj.resv is not None else "?"
    if vmaps < 0 or pins < 0 or uses < 0:
        return f"{name}: counts below 0 (vmap {vmaps}, pin {pins}, pages {uses})"
    if vmaps and (obj.vaddr is None or obj.vaddr.is_null):
        return f"{name}: vmap_use_count {vmaps} but vaddr is {obj.vaddr!r}"
    if not vmaps and obj.vaddr is not None:
        return f"{name}: vaddr {obj.vaddr!r} set with vmap_use_count 0"
    if vmaps and not pins:
        return f"{name}: vmapped ({vmaps}) but not pinned"
    if pins and (obj.pages is None or obj.evicted or obj.madv < 0 or not uses):
        return (
            f"{name}: pinned ({pins}) but pages {'present' if obj.pages else 'gone'}, "
            f"evicted {obj.evicted}, madv {obj.madv}, pages_use_count {uses}"
        )
    return None


def check_fence_slots(resv) -> str | None:
    """What is wrong with a reservation object's fence list, or None (the ``resv-slots``
    invariant): no more fences than slots, and as many entries as it counts."""
    lst = resv.fences
    if lst is None:
        return None
    if lst.num_fences > lst.max_fences:
        return f"{resv.lock.name}: {lst.num_fences} fences in {lst.max_fences} slots"
    if len(lst.table) != lst.num_fences:
        return f"{resv.lock.name}: num_fences {lst.num_fences} but {len(lst.table)} entries"
    return None


def scenario_from_args(name: str, **overrides) -> Scenario:
    base = SCENARIOS.get(name)
    if base is None:
        raise ValueError(f"unknown scenario {name!r} (built-in: {', '.join(SCENARIOS)})")
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


__all__ = [
    "KINDS",
    "MUTANT_SCENARIO",
    "SCENARIOS",
    "ExploreConfig",
    "Scenario",
    "ScheduleResult",
    "Violation",
    "count_switches",
    "make_plan",
    "measured_pct_steps",
    "resolve",
    "run_schedule",
    "scenario_for_mutant",
]
