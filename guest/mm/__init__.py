"""DOC: guest memory management: physical frames, reclaim, swap and shmem files.

- :mod:`~gemu.guest.mm.page_alloc`: guest RAM (:class:`PhysMem`, one real buffer shared with
  the device) and the page allocator with watermarks, direct reclaim and kswapd;
- :mod:`~gemu.guest.mm.shrinker`: the callbacks reclaim runs to get memory back;
- :mod:`~gemu.guest.mm.swap`: the swap device evicted pages go to;
- :mod:`~gemu.guest.mm.shmem`: the swappable files behind GEM shmem objects.

Usage::

    from gemu.guest.mm import GFP_KERNEL, PAGE_SIZE, PageAllocator, PhysMem

    ram = PhysMem(bytearray(256 * PAGE_SIZE))
    allocator = PageAllocator(ram)
    pfns = allocator.alloc_pages(8, GFP_KERNEL)
    allocator.free_pages(pfns)
    allocator.assert_no_leaks()
"""

from gemu.guest.mm.page_alloc import (
    GFP_ATOMIC,
    GFP_KERNEL,
    GFP_NOFS,
    GFP_NOWAIT,
    PAGE_SHIFT,
    PAGE_SIZE,
    Gfp,
    PageAllocator,
    PhysMem,
    Watermarks,
)
from gemu.guest.mm.shrinker import (
    SHRINK_EMPTY,
    SHRINK_STOP,
    ShrinkControl,
    Shrinker,
    register_shrinker,
    shrink_slab,
    unregister_shrinker,
)

__all__ = [
    "GFP_ATOMIC",
    "GFP_KERNEL",
    "GFP_NOFS",
    "GFP_NOWAIT",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "SHRINK_EMPTY",
    "SHRINK_STOP",
    "Gfp",
    "PageAllocator",
    "PhysMem",
    "ShrinkControl",
    "Shrinker",
    "Watermarks",
    "register_shrinker",
    "shrink_slab",
    "unregister_shrinker",
]
