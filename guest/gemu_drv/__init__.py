"""DOC: the gemu GPU driver (the guest's kernel driver for the gemu virtual GPU).

Modelled on panfrost: the driver policy lives here, the generic helpers (gem_shmem, its
shrinker, drm_sched, drm_exec, dma_resv) live in their own modules.

- :mod:`.vm`: GPU virtual memory (AS slots, VA allocator, page tables, TLB flushes);
- :mod:`.gpu`: probe, ring, interrupts, fences, MMU faults, reset and recovery;
- :mod:`.job`: a submitted job and the validation sequence;
- :mod:`.uapi`: what a guest program calls (the ioctl layer).
"""
