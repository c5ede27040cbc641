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
