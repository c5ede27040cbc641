"""DOC: guest memory management: physical frames, reclaim, swap and shmem files.

- :mod:`~gemu.guest.mm.page_alloc`: guest RAM (:class:`PhysMem`, one real buffer shared with
  the device) and the page allocator with watermarks, direct reclaim and kswapd;
- :mod:`~gemu.guest.mm.shrinker`: the callbacks reclaim runs to get memory back;
- :mod:`~gemu.guest.mm.swap`: the swap device evicted pages go to;
- :mod:`~gemu.guest.mm.shmem`: the swappable files behind GEM shmem objects.

Usage::

    from gemu.guest.mm import PAGE_SIZE, PageAllocator, PhysMem, ShmemFile, SwapDevice

    ram = PhysMem(bytearray(256 * PAGE_SIZE))
    allocator = PageAllocator(ram)
    swap = SwapDevice(256)
    f = ShmemFile(allocator, swap, 8 * PAGE_SIZE)
    f.get_pages()
    f.writeout()
    f.release()
    allocator.assert_no_leaks()
    swap.assert_no_leaks()
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
from gemu.guest.mm.shmem import ShmemFile
from gemu.guest.mm.shrinker import (
    SHRINK_EMPTY,
    SHRINK_STOP,
    ShrinkControl,
    Shrinker,
    register_shrinker,
    shrink_slab,
    unregister_shrinker,
)
from gemu.guest.mm.swap import SwapDevice

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
    "ShmemFile",
    "ShrinkControl",
    "Shrinker",
    "SwapDevice",
    "Watermarks",
    "register_shrinker",
    "shrink_slab",
    "unregister_shrinker",
]
