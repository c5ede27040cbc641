"""DOC: the GPU page-table format.

Each address space translates 48-bit GPU virtual addresses through a 4-level table in guest
memory. A table is one 4 KiB page of 512 little-endian 64-bit entries. The walk uses VA bits
47:39 at level 0, 38:30 at level 1, 29:21 at level 2 and 20:12 at level 3; bits 11:0 are the
offset in the 4 KiB page. Levels 0-2 hold TABLE entries, level 3 holds PAGE entries; any other
combination, or VALID clear, is a translation fault at that level::

    from gemu.device.abi import pte
    entry = pte.make(pa=0x20_3000, type=PteType.PAGE, read=True, write=True)
    assert pte.address(entry) == 0x20_3000

Entry layout (bit 0 is the least significant):

==========  =======  ==================================================================
bits        field    meaning
==========  =======  ==================================================================
0           VALID    entry is present
2:1         TYPE     PteType: 1 TABLE (levels 0-2), 2 PAGE (level 3)
3           READ     PAGE: reads allowed (also needed by COPY/CRC32 sources, WAIT_MEM)
4           WRITE    PAGE: writes allowed (WRITE_DATA, COPY/FILL/CRC32 destinations, FENCE)
5           EXEC     PAGE: the CP may fetch indirect-buffer packets from it
11:6        -        reserved, ignored
47:12       ADDR     physical address of the next table or of the page, bits 47:12
63:48       SW       ignored by the GPU, free for the driver
==========  =======  ==================================================================

ATOMIC needs both READ and WRITE.
"""

from __future__ import annotations

from .enums import PteType
from .regs import PAGE_SHIFT, VA_BITS

LEVELS = 4
ENTRIES_PER_TABLE = 512
ENTRY_SIZE = 8
BITS_PER_LEVEL = 9

VALID = 1 << 0
TYPE_SHIFT = 1
TYPE_MASK = 0b11 << TYPE_SHIFT
READ = 1 << 3
WRITE = 1 << 4
EXEC = 1 << 5
ADDR_MASK = ((1 << 48) - 1) & ~((1 << PAGE_SHIFT) - 1)
SW_SHIFT = 48

TABLE_BITS = VALID | (PteType.TABLE << TYPE_SHIFT)
PAGE_BITS = VALID | (PteType.PAGE << TYPE_SHIFT)


def __getattr__(name: str):
    """``PTE_FORMAT``, the same layout as a construct format, built on first access (the MMU
    and the driver use the bit masks above; importing construct costs more than they do)."""
    if name != "PTE_FORMAT":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from construct import BitsInteger, BitStruct, ByteSwapped, Enum, Flag

    # Fields are listed from bit 63 down to bit 0 because BitStruct is MSB-first, and
    # ByteSwapped makes the 8 bytes little-endian.
    fmt = ByteSwapped(
        BitStruct(
            "sw" / BitsInteger(16),
            "addr" / BitsInteger(36),
            "reserved" / BitsInteger(6),
            "exec" / Flag,
            "write" / Flag,
            "read" / Flag,
            "type" / Enum(BitsInteger(2), PteType),
            "valid" / Flag,
        )
    )
    globals()["PTE_FORMAT"] = fmt
    return fmt


def make(
    pa: int,
    type: PteType = PteType.PAGE,
    *,
    read: bool = False,
    write: bool = False,
    exec: bool = False,
    sw: int = 0,
) -> int:
    """Build a valid entry pointing at ``pa`` (4 KiB aligned)."""
    if pa & ~ADDR_MASK:
        raise ValueError(f"PTE address must be 4 KiB aligned and below 2**48, not {pa:#x}")
    value = pa | VALID | (int(type) << TYPE_SHIFT) | (sw << SW_SHIFT)
    if read:
        value |= READ
    if write:
        value |= WRITE
    if exec:
        value |= EXEC
    return value


def address(entry: int) -> int:
    return entry & ADDR_MASK


def entry_type(entry: int) -> PteType:
    return PteType((entry & TYPE_MASK) >> TYPE_SHIFT)


def index(va: int, level: int) -> int:
    """Index into the level-``level`` table for ``va`` (level 0 is the root)."""
    shift = PAGE_SHIFT + BITS_PER_LEVEL * (LEVELS - 1 - level)
    return (va >> shift) & (ENTRIES_PER_TABLE - 1)


def va_fits(va: int) -> bool:
    return 0 <= va < (1 << VA_BITS)


def describe(entry: int) -> str:
    """Human-readable form of an entry, for dumps and the debugger."""
    if not entry & VALID:
        return "invalid"
    perms = "".join(
        c if entry & bit else "-" for c, bit in (("r", READ), ("w", WRITE), ("x", EXEC))
    )
    return f"{entry_type(entry).name.lower()} {address(entry):#x} {perms}"
