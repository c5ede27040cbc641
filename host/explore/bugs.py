"""Real kernel bugs, found again: historical DRM memory-management bugs as mutants of the model.

Each :class:`Bug` names an upstream fix (commit id, subject, the Fixes: tag's commit), says
where the id and subject were checked, what went wrong in the kernel, the
:class:`gemu.guest.gemu_drv.job.Mutant` that puts the pre-fix behaviour back into the model,
the built-in scenario explore runs it on (a general one, not built around the bug) and the
invariant (a :data:`.scenario.KINDS` value) that catches it. ``gemu explore --list-bugs``
lists them, ``gemu explore --bug NAME`` explores one; docs/bugs.md is the table with the
measured schedules to first detection, and the bugs the model cannot express.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bug:
    """One historical bug and how gemu explore finds it again."""

    name: str
    fix: str
    """The mainline fixing commit, at least 12 hex digits."""
    subject: str
    fixes: str
    """The Fixes: tag's commit (id and subject), or "" where the fix has none."""
    verified: str
    """Where the fix's id, subject and Fixes: tag were read."""
    kernel: str
    """What went wrong in the kernel."""
    mutant: str
    model: str
    """How the mutant puts the pre-fix behaviour into the model."""
    scenario: str
    """The built-in explore scenario (:data:`.scenario.SCENARIOS`)."""
    invariant: str
    """The :data:`.scenario.KINDS` value a schedule that hits the bug violates."""
    seed: int = 3
    """A seed whose first schedule (random strategy) hits the bug: the test suite's fixed
    seed (``gemu explore --bug NAME --seed SEED --schedules 1`` reproduces it)."""


BUGS: tuple[Bug, ...] = (
    # GEM shmem, the GEM LRU and shrinkers, dma_resv, dma_fence
    Bug(
        name="panfrost-madvise-list",
        fix="9fc33eaaa979d112d10fea729edcd2a2e21aa912",
        subject="drm/panfrost: Fix shrinker list corruption by madvise IOCTL",
        fixes='013b65101315 ("drm/panfrost: Add madvise and shrinker support")',
        verified="stable backport mail (commit 9fc33eaaa979d112d10fea729edcd2a2e21aa912 "
        "upstream, with the Fixes: tag and the diff list_add_tail -> list_move_tail); the "
        "kernel CVE team's record of CVE-2022-49645 (git.kernel.org/stable/c/9fc33eaaa979...); "
        "linux-next merge log (drm-misc-fixes)",
        kernel="panfrost_ioctl_madvise() linked a retained BO into the shrinker list with "
        "list_add_tail() whenever userspace marked it DONTNEED, without taking it off the list "
        "first: a BO already on the list was linked twice, its old neighbours kept pointing at "
        "it, and the next list walk or list_del crashed",
        mutant="madvise-list-add",
        model="drm_gem_shmem_madvise_locked() links a DONTNEED, not purged object at the tail "
        "of the evictable LRU with a raw list_add_tail (gem_lru.add_tail_locked) instead of "
        "moving it there; an object that has pages is already on an LRU",
        scenario="standard",
        invariant="lru",
    ),
    Bug(
        name="gem-lru-lock-via-obj",
        fix="379e8f1ca5e919b130b40d8115d92a536e5f8d7a",
        subject="drm/gem: Make the GEM LRU lock part of drm_device",
        fixes='e7c2af13f811 ("drm/gem: Add LRU/shrinker helper")',
        verified="the commit page at git.ipfire.org (thirdparty/kernel/linux.git, "
        "a=commit h=379e8f1ca5e919b130b40d8115d92a536e5f8d7a: subject, message, Fixes: "
        "e7c2af13f811, Reported-by Chia-I Wu, Closes panfrost work item 86); the v4 patch mails "
        "quoting the same Fixes: tag; e7c2af13f811d0c23340154b7b2795876c71e4be with its subject "
        "in a kernel.org revlist mail; review replies quoting the Fixes: tag",
        kernel="the LRU lock was reached through obj->lru, the very pointer that lock "
        "protects: drm_gem_lru_remove() (from drm_gem_object_release() on the last put) read "
        "obj->lru without the lock, then took lru->lock. drm_gem_lru_scan() moves objects to "
        "its on-stack still_in_lru list and back under that lock, skipping objects whose last "
        "reference is gone; a remover that read obj->lru while the object sat on still_in_lru "
        "then locked through a list whose scan had returned, a use after free of the scan's "
        "stack. The fix moves the lock to drm_device (dev->gem_lru_mutex)",
        mutant="gem-lru-remove-unlocked",
        model="gemu's LRUs already share one lock and drm_gem_lru_remove() reads obj.lru and "
        "its lock with no scheduling point between them, which is what the device-wide lock "
        "gives. The mutant puts the kernel's window back: a preemption point between reading "
        "obj.lru and locking lru.lock. When drm_gem_lru_scan() returns, its still_in_lru's lock "
        "field is poisoned (the stack frame is gone), and locking through it is reported as a "
        "use after free",
        scenario="shmem",
        invariant="lifetime",
        seed=155,
    ),
    Bug(
        name="msm-shrinker-ticket",
        fix="3392291fc509d8ad6e4ad90f15b0a193f721cbc9",
        subject="drm/msm: Fix shrinker deadlock",
        fixes='fe4952b5f27c ("drm/msm: Convert vm locking")',
        verified="the kernel CVE team's record of CVE-2026-64100 (cve/published/2026/"
        "CVE-2026-64100.mbox in a GitHub mirror of the vulns repository: subject, commit "
        "message with the lockdep report, 'fixed in 7.1 with commit 3392291fc509...', "
        "introduced in 6.17 with fe4952b5f27cca5d143d3de249562d4cc984c1d6); fe4952b5f27c's "
        "subject read on its commit page at git.kernel.dk",
        kernel="kswapd, holding fs_reclaim, ran the msm shrinker, whose drm_gem_lru_scan() "
        "was given a ww_acquire_ctx (ticket): ww_acquire_init() takes "
        "reservation_ww_class_acquire inside fs_reclaim, while dma_resv_lockdep() primes "
        "reservation_ww_class_acquire -> reservation_ww_class_mutex -> fs_reclaim, a circular "
        "dependency (a real deadlock once a resv holder allocates and reclaim waits for it). "
        "The fix uses dma_resv_trylock() and drops the ticket",
        mutant="shrinker-scan-ticket",
        model="the shmem shrinker passes ticket to gemu's drm_gem_lru_scan(), which then "
        "starts a ww acquire context of the reservation class per object (and trylocks with "
        "it) from kswapd and direct reclaim; gemu's lockdep starts primed as "
        "dma_resv_lockdep() does",
        scenario="standard",
        invariant="lockdep",
        seed=0,
    ),
    Bug(
        name="resv-older-fence-replaces",
        fix="a3f7c10a269d5b77dd5822ade822643ced3057f0",
        subject="dma-buf/dma-resv: check if the new fence is really later",
        fixes="",
        verified="the kernel CVE team's record of CVE-2022-49935 (cve/published/2022/"
        "CVE-2022-49935.mbox: subject, message, 'fixed in 6.0 with commit "
        "a3f7c10a269d5b77dd5822ade822643ced3057f0', no introducing commit); the 5.19 stable "
        "patch mail (commit a3f7c10a269d... upstream, no Fixes: tag, the diff adding "
        "dma_fence_is_later()); the drm-misc-fixes pull naming it",
        kernel="dma_resv_add_fence() replaced a fence of the same context whatever its seqno, "
        "assuming every new fence is newer. Importing a sync_file into a dma-buf "
        "(DMA_BUF_IOCTL_IMPORT_SYNC_FILE) broke that: an older fence of a timeline replaced "
        "the newer one of a job still using the buffer, so the buffer looked idle early; the "
        "commit says userspace could force a use after free",
        mutant="resv-replace-older",
        model="dma_resv.add_fence()'s same-context test (replaces_same_context, "
        "dma_fence_is_later_or_same) is replaced by one that always answers yes, the "
        "condition before the fix; the scenario's tasks import the out-fences of their earlier "
        "jobs into their BOs as writers (import_sync_file, the ioctl's effect)",
        scenario="shmem",
        invariant="resv-content",
        seed=8,
    ),
    Bug(
        name="shmem-vunmap-clears-vaddr",
        fix="dd717762761807452ca25634652e180a80349cd8",
        subject="drm/shmem-helper: Fix unsetting shmem vaddr while vmap refcount > 0",
        fixes='e1fc39a92332 ("drm/shmem-helper: Use refcount_t for vmap_use_count")',
        verified="the v1 patch mail of 3 Apr 2025 on linux-kernel (subject, Fixes: "
        "e1fc39a92332, the diff moving shmem->vaddr = NULL under refcount_dec_and_test()); a "
        "linux-next revlist mail listing dd717762761807452ca25634652e180a80349cd8 with this "
        "subject; a drm pull request's shortlog listing it after 'drm/shmem-helper: Use "
        "refcount_t for vmap_use_count'. Not cross-checked against a stable backport",
        kernel="when vmap_use_count became a refcount_t, drm_gem_shmem_vunmap_locked() kept "
        "'shmem->vaddr = NULL' after the refcount block, so every vunmap cleared the cached "
        "mapping, also a nested one while another user still held it; the next nested vmap "
        "returned NULL (ast, cirrus, simpledrm broke)",
        mutant="vunmap-clears-vaddr",
        model="gem_shmem.vunmap_locked() sets shmem.vaddr = None when the count does not "
        "reach 0, as the pre-fix code did after its refcount block; the mapping itself "
        "(the IosysMap) stays until the last vunmap",
        scenario="shmem",
        invariant="vmap",
        seed=0,
    ),
    Bug(
        name="shmem-mmap-errant-put",
        fix="24013314be6ee4ee456114a671e9fa3461323de8",
        subject="drm/shmem-helper: Remove errant put in error path",
        fixes='2194a63a818d ("drm: Add library for shmem backed GEM objects")',
        verified="the kernel CVE team's record of CVE-2022-48981 (cve/published/2022/"
        "CVE-2022-48981.mbox: subject, message, 'fixed in 6.1 with commit 24013314be6e', "
        "introduced in 5.2 with 2194a63a818d, git.kernel.org/stable/c/"
        "24013314be6ee4ee456114a671e9fa3461323de8); the stable patch mail (commit "
        "24013314be6e... upstream, Fixes: 2194a63a818d, the diff removing drm_gem_vm_close() "
        "from the get_pages error path)",
        kernel="when drm_gem_shmem_get_pages() failed in drm_gem_shmem_mmap(), the helper "
        "called drm_gem_vm_close(), a drm_gem_object_put() of the reference drm_gem_mmap_obj() "
        "owns and drops itself on the error: the object was freed while a handle still named "
        "it, a later use after free (found by syzbot)",
        mutant="mmap-errant-put",
        model="gem_shmem.mmap() puts the object once more on its error path; getting the "
        "pages fails when the shrinker purges the object while the mmap waits for its "
        "reservation lock (the v19 helper's pages never need allocating there). The freed "
        "object's later get or put through its handle is reported",
        scenario="shmem",
        invariant="lifetime",
        seed=18,
    ),
    # end of GEM shmem, the GEM LRU and shrinkers, dma_resv, dma_fence
    # drm_sched, reset paths, VM_BIND
    Bug(
        name="msm-reset-reclaim",
        fix="4625fe5bbdaccd45be274c30ff0a42e30d4e38cf",
        subject="drm: gpu: msm: forbid mem reclaim from reset",
        fixes="",
        verified="kernel.org revlist mail (4625fe5bbdaccd45be274c30ff0a42e30d4e38cf with this "
        "subject) and an AUTOSEL stable mail ([ Upstream commit 4625fe5bbdac... ], no Fixes: "
        "tag)",
        kernel="msm's recover_worker held gpu->lock while msm_gpu_crashstate_capture() "
        "kvmalloc'ed; under memory pressure that entered direct reclaim, where the shrinker's "
        "active_purge waited on BO fences that could only signal once msm_job_run, blocked on "
        "gpu->lock, submitted more work: nothing progressed and hangcheck fired again and "
        "again. The fix brackets the capture with memalloc_noreclaim_save/restore",
        mutant="reset-allocates",
        model="the timeout handler's crash-state capture allocates with GFP_KERNEL (may "
        "reclaim) inside the reset's fence signalling section, as recover_worker did before "
        "the fix (the invented mutant of the same shape, now tied to its real fix)",
        scenario="hang",
        invariant="signalling",
    ),
    Bug(
        name="xe-tdr-frees-job",
        fix="82926f52d7a09c65d916c0ef8d4305fc95d68c0c",
        subject="drm/xe: Don't free job in TDR",
        fixes="e275d61c5f3f (introducing commit per the CVE record; v6.10)",
        verified="the kernel CVE team's record of CVE-2024-50149 "
        "(cve/published/2024/CVE-2024-50149.mbox in a GitHub mirror of the vulns repository, "
        "thefossguy-ciq/kernel-security-vulns): subject, commit message, 'Issue introduced in "
        "6.10 with commit e275d61c5f3f and fixed in 6.12 with commit 82926f52d7a0', "
        "git.kernel.org/stable/c/82926f52d7a09c65d916c0ef8d4305fc95d68c0c",
        kernel="xe's timeout handler (guc_exec_queue_timedout_job) freed the timed-out job "
        "itself; the TDR can overtake the run_job path, and drm_sched still held the job, so "
        "the job was used after it was freed. Only the scheduler's free_job may free a job; "
        "the fix puts it back on the pending list instead",
        mutant="tdr-frees-job",
        model="GemuSchedOps.timedout_job frees the job (free_job: its BO references, command "
        "space, drm_sched_job_cleanup) after the reset while drm_sched_stop() has put it back "
        "on the pending list; drm_sched_job_timedout then touches a freed job",
        scenario="timeouts",
        invariant="lifetime",
    ),
    Bug(
        name="v3d-skipped-reset-leak",
        fix="35e4079bf1a2570abffce6ababa631afcf8ea0e5",
        subject="drm/v3d: Add job to pending list if the reset was skipped",
        fixes="57692c94dcbe99a1e0444409a3da13fb3443562c (introducing commit per the CVE "
        "record, v4.18)",
        verified="the kernel CVE team's record of CVE-2025-37951 "
        "(cve/published/2025/CVE-2025-37951.mbox, thefossguy-ciq/kernel-security-vulns): "
        "subject, commit message, 'Issue introduced in 4.18 with commit 57692c94dcbe... and "
        "fixed in 6.15 with commit 35e4079bf1a2570abffce6ababa631afcf8ea0e5'",
        kernel="drm_sched takes the timed-out job off the pending list before calling the "
        "driver; when v3d saw the GPU had made progress it skipped the reset and re-armed the "
        "timer but left the job off the list, so free_job never ran for it when it finished: "
        "the job, its BO references and fences leaked. The fix re-adds it, as etnaviv's "
        "704d3d60fec4 does",
        mutant="no-hang-drops-job",
        model="the timeouts scenario runs the driver with v3d's policy (no reset while "
        "CP_PACKETS advanced since the last timeout); on NO_HANG the scheduler does not "
        "re-insert the job (drm_sched before v6.17 left that to the driver) and the driver "
        "does not either",
        scenario="timeouts",
        invariant="deadlock",
    ),
    Bug(
        name="sched-kill-scheduled-fence",
        fix="471db2c2d4f80ee94225a1ef246e4f5011733e50",
        subject="drm/scheduler: signal scheduled fence when kill job",
        fixes="a72ce6f84109c1dec1ab236d65979d3250668af3 (introducing commit per the CVE "
        "record, v4.3)",
        verified="the kernel CVE team's record of CVE-2025-38436 "
        "(cve/published/2025/CVE-2025-38436.mbox, thefossguy-ciq/kernel-security-vulns): "
        "subject, commit message, 'fixed in 6.16 with commit 471db2c2d4f8...'; the fixed "
        "drm_sched_entity_kill_jobs_work() read in torvalds/linux "
        "drivers/gpu/drm/scheduler/sched_entity.c at 0755a4e3e809",
        kernel="when an entity was killed (its process exited), drm_sched_entity_kill_jobs_work "
        "completed each queued job by signalling its finished fence only; a job of another "
        "process that waited on a killed job's scheduled fence (drm_sched pipelines a "
        "dependency on a job of the same scheduler that way) waited forever",
        mutant="kill-skips-scheduled",
        model="the model's kill work (sched._kill_job) signals finished with -ESRCH and frees "
        "the job without signalling scheduled",
        scenario="exit",
        invariant="fence-order",
    ),
    Bug(
        name="sched-kill-before-deps",
        fix="0b10ab80695d61422337ede6ff496552d8ace99d",
        subject="drm/sched: Avoid data corruptions",
        fixes="a72ce6f84109c1dec1ab236d65979d3250668af3 (introducing commit per the CVE "
        "record, v4.3)",
        verified="the kernel CVE team's record of CVE-2021-47354 "
        "(cve/published/2021/CVE-2021-47354.mbox, thefossguy-ciq/kernel-security-vulns): "
        "subject, commit message 'Wait for all dependencies of a job to complete before "
        "killing it to avoid data corruptions', 'fixed in 5.14 with commit 0b10ab80695d...'",
        kernel="on entity teardown the queued jobs were completed with an error at once, "
        "while their dependencies (a copy or clear still running on the GPU) had not "
        "finished: the killed job's finished fence signalled early and the memory it "
        "protected could be reused while the GPU still wrote it",
        mutant="kill-skips-deps",
        model="the kill work signals and frees a killed job without first waiting, callback "
        "by callback, for the dependencies it still holds",
        scenario="exit",
        invariant="fence-order",
    ),
    Bug(
        name="sched-resv-deps-double-put",
        fix="5801e65206b065b0b2af032f7f1eef222aa2fd83",
        subject="drm/sched: Fix potential double free in drm_sched_job_add_resv_dependencies",
        fixes='963d0b3569354230f6e2c36a286ef270a8901878 ("drm/scheduler: fix '
        'drm_sched_job_add_implicit_dependencies harder", v5.16)',
        verified="the kernel CVE team's record of CVE-2025-40096 "
        "(cve/published/2025/CVE-2025-40096.mbox, thefossguy-ciq/kernel-security-vulns): "
        "subject, commit message naming 963d0b356935 as the Fixes: target, 'fixed in 6.18 "
        "with commit 5801e65206b065b0b2af032f7f1eef222aa2fd83'",
        kernel="drm_sched_job_add_dependency() consumes the fence reference on success and on "
        "failure; when the dependency xarray could not grow, "
        "drm_sched_job_add_resv_dependencies() also put the fence on its error path: a "
        "double put that frees a fence the reservation object still holds",
        mutant="dep-error-double-put",
        model="job_add_resv_dependencies puts the reference again when job_add_dependency "
        "raised -ENOMEM (the exit scenario fails one in six dependency-table allocations)",
        scenario="exit",
        invariant="lifetime",
    ),
    Bug(
        name="sched-kill-prev-leak",
        fix="a952f1ab696873be124e31ce5ef964d36bce817f",
        subject="drm/sched: Fix fence reference count leak",
        fixes="2fdb8a8f07c2f1353770a324fd19b8114e4329ac (introducing commit per the CVE "
        "record, v6.2)",
        verified="the kernel CVE team's record of CVE-2025-21995 "
        "(cve/published/2025/CVE-2025-21995.mbox, thefossguy-ciq/kernel-security-vulns): "
        "subject, commit message, 'Issue introduced in 6.2 with commit 2fdb8a8f07c2... and "
        "fixed in 6.14 with commit a952f1ab6968...'; the fixed drm_sched_entity_kill() "
        "(dma_fence_put(prev) when dma_fence_add_callback() fails) read in torvalds/linux "
        "drivers/gpu/drm/scheduler/sched_entity.c at 0755a4e3e809",
        kernel="drm_sched_entity_kill() takes a reference on the entity's last_scheduled "
        "fence, then on each killed job's finished fence, to chain the kills; when adding the "
        "kill callback to that fence failed because it had already signalled, the reference "
        "was never dropped, and the fence leaked",
        mutant="kill-leaks-prev",
        model="entity_kill's already-signalled branch calls the kill callback without the "
        "reference it took on the previous fence, as the pre-fix code called "
        "drm_sched_entity_kill_jobs_cb(NULL, ...)",
        scenario="exit",
        invariant="leak",
    ),
    # end of drm_sched, reset paths, VM_BIND
)

BY_NAME = {b.name: b for b in BUGS}


def lookup(name: str) -> Bug:
    """The entry called ``name``; ValueError naming the known ones otherwise."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(
            f"no bug {name!r} in the corpus (gemu explore --list-bugs: {', '.join(BY_NAME)})"
        ) from None


def list_lines() -> list[str]:
    """``gemu explore --list-bugs``: name, the fix's first 12 hex digits, its subject."""
    width = max(len(b.name) for b in BUGS)
    return [f"{b.name:<{width}}  {b.fix[:12]}  {b.subject}" for b in BUGS]
