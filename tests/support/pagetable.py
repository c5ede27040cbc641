"""A tiny GPU page-table builder for tests: 4-level tables in guest memory, per :mod:`pte`.

Tables come from a bump allocator over a physical range the test sets aside::

    pt = PageTable(mem, table_base=0x100000, table_end=0x200000)
    pt.map(va=0x4000_0000, pa=0x30_0000, size=0x2000, write=True)
    gpu.mmio_write(regs.as_reg(1, "TRANSTAB_LO").offset, pt.root)
"""

from __future__ import annotations

from gemu.device.abi import pte
from gemu.device.abi.enums import PteType
from gemu.device.abi.regs import PAGE_SIZE
from gemu.device.memory import GuestMemory


class PageTable:
    """One address space's tables; ``root`` is the level-0 table address for TRANSTAB."""

    def __init__(self, mem: GuestMemory, table_base: int, table_end: int) -> None:
        self.mem = mem
        self._next = table_base
        self._end = table_end
        self.root = self.alloc_table()

    def alloc_table(self) -> int:
        if self._next + PAGE_SIZE > self._end:
            raise MemoryError("test page-table area exhausted")
        pa, self._next = self._next, self._next + PAGE_SIZE
        self.mem.write(pa, bytes(PAGE_SIZE))
        return pa

    def entry_addr(self, va: int, *, create: bool = True) -> int:
        """Physical address of the level-3 entry for ``va`` (creating tables on the way)."""
        table = self.root
        for level in range(3):
            slot = table + 8 * pte.index(va, level)
            entry = self.mem.read_u64(slot)
            if not entry & pte.VALID:
                if not create:
                    raise KeyError(f"{va:#x} has no level-{level + 1} table")
                entry = pte.make(self.alloc_table(), PteType.TABLE)
                self.mem.write_u64(slot, entry)
            table = pte.address(entry)
        return table + 8 * pte.index(va, 3)

    def map(
        self,
        va: int,
        pa: int,
        size: int,
        *,
        read: bool = True,
        write: bool = False,
        exec: bool = False,
    ) -> None:
        """Map ``size`` bytes (whole pages) of ``va`` to consecutive physical pages at ``pa``."""
        for off in range(0, size, PAGE_SIZE):
            entry = pte.make(pa + off, PteType.PAGE, read=read, write=write, exec=exec)
            self.mem.write_u64(self.entry_addr(va + off), entry)

    def set_entry(self, va: int, entry: int) -> None:
        self.mem.write_u64(self.entry_addr(va), entry)

    def unmap(self, va: int, size: int) -> None:
        for off in range(0, size, PAGE_SIZE):
            self.mem.write_u64(self.entry_addr(va + off), 0)
