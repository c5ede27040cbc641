"""Enumerations of the gemu GPU's hardware interface.

These classes are shared by the register declarations, the construct formats, the device model
and the guest driver, so a value has one name everywhere.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag


class Access(IntEnum):
    """How a register (or field) reacts to reads and writes."""

    RO = 0  # writes are ignored and logged as a guest error
    RW = 1
    WO = 2  # reads return 0
    W1C = 3  # writing 1 to a bit clears it; reads return 0 (clear registers are write-only)


class Irq(IntFlag):
    """Interrupt sources of the GPU block (IRQ_RAWSTAT / IRQ_MASK / IRQ_STATUS / IRQ_CLEAR)."""

    FENCE = 1 << 0  # a FENCE packet with the IRQ flag wrote its seqno
    CP_ERROR = 1 << 1  # the command processor stopped on an error (CP_ERROR says which)
    MMU = 1 << 2  # summary of MMU_INT_STAT; cleared through MMU_INT_CLEAR, not IRQ_CLEAR
    RESET_DONE = 1 << 3  # a soft reset finished
    CP_IDLE = 1 << 4  # the ring drained (head caught up with tail)


class CpState(IntEnum):
    """CP_STATUS.STATE: what the command processor is doing."""

    STOPPED = 0  # CP_CONTROL.ENABLE is clear
    IDLE = 1  # enabled, ring empty
    RUNNING = 2  # executing packets
    WAITING = 3  # blocked in WAIT_MEM
    ERROR = 4  # stopped on an error until RESUME or reset
    HALTED = 5  # held by the debugger


class CpError(IntEnum):
    """CP_ERROR.CODE: why the command processor stopped."""

    NONE = 0
    UNKNOWN_OPCODE = 1
    BAD_LENGTH = 2  # body length wrong for the opcode, or past the ring/IB end
    BAD_FLAGS = 3  # reserved flag bits set, or a flag the opcode does not take
    PRIVILEGED = 4  # SET_AS, TLB_INVALIDATE or PHYS addressing inside an indirect buffer
    MMU_FAULT = 5  # a GPU VA access faulted; the AS block has the details
    BUS_ERROR = 6  # a physical (PHYS flag or ring fetch) access outside guest memory
    WAIT_TIMEOUT = 7  # WAIT_MEM's condition did not hold within its timeout
    IB_TOO_DEEP = 8  # indirect buffers nested deeper than FEATURES.IB_MAX_DEPTH
    BAD_ALIGNMENT = 9
    BAD_ARGUMENT = 10  # e.g. SET_AS to an AS that does not exist, WAIT_MEM function > GT
    RING_CONFIG = 11  # RING_BASE/RING_SIZE invalid when the CP was enabled
    NO_MEMORY = 12  # the CP ran with no guest memory attached


class Opcode(IntEnum):
    """Command-stream packet opcodes (PACKET_HEADER.OPCODE)."""

    NOP = 0x00
    SET_AS = 0x01
    WRITE_DATA = 0x02
    COPY = 0x03
    FILL = 0x04
    CRC32 = 0x05
    ATOMIC = 0x06
    FENCE = 0x07
    WAIT_MEM = 0x08
    INDIRECT_BUFFER = 0x09
    TLB_INVALIDATE = 0x0A


class PacketFlags(IntFlag):
    """PACKET_HEADER.FLAGS."""

    IRQ = 1 << 0  # FENCE only: raise Irq.FENCE after the seqno is written
    PHYS = 1 << 1  # addresses are guest-physical (ring only; privileged)


class WaitFunc(IntEnum):
    """WAIT_MEM comparison: (memory & mask) FUNC reference."""

    ALWAYS = 0
    LT = 1
    LE = 2
    EQ = 3
    NE = 4
    GE = 5
    GT = 6


class MmuCommand(IntEnum):
    """AS_COMMAND values, after Panfrost's address-space commands."""

    NOP = 0
    UPDATE = 1  # latch TRANSTAB/TRANSCFG and invalidate the whole TLB of the AS
    LOCK = 2  # lock the region in LOCKADDR
    UNLOCK = 3  # unlock without invalidating
    FLUSH_PT = 4  # invalidate TLB entries in the locked region (whole AS if none), unlock
    FLUSH_MEM = 5  # same as FLUSH_PT (there are no GPU caches in this model)


class TransCfgMode(IntEnum):
    """AS_TRANSCFG.MODE."""

    DISABLED = 0  # every access faults with AS_DISABLED
    PT_4LEVEL = 1  # 4-level page table at TRANSTAB


class MmuFault(IntEnum):
    """AS_FAULTSTATUS.EXCEPTION_TYPE, numbered in the style of Mali's MMU exception codes."""

    NONE = 0x00
    TRANSLATION_L0 = 0xC0  # invalid or wrongly typed entry at level 0
    TRANSLATION_L1 = 0xC1
    TRANSLATION_L2 = 0xC2
    TRANSLATION_L3 = 0xC3
    PERMISSION = 0xC8  # leaf present but lacks the R/W/X permission the access needs
    TRANSTAB_BUS = 0xD0  # a page-table address lies outside guest memory
    BUS = 0xD4  # the translated address lies outside guest memory
    ADDRESS_SIZE = 0xD8  # the VA does not fit in 48 bits
    AS_DISABLED = 0xE0  # the AS has TRANSCFG.MODE == DISABLED

    @property
    def is_bus_fault(self) -> bool:
        return self in (MmuFault.TRANSTAB_BUS, MmuFault.BUS)


class AccessType(IntEnum):
    """AS_FAULTSTATUS.ACCESS_TYPE (Panfrost's encoding)."""

    ATOMIC = 0
    EXECUTE = 1
    READ = 2
    WRITE = 3


class PteType(IntEnum):
    """PTE.TYPE: what a valid entry points at."""

    RESERVED = 0
    TABLE = 1  # next-level table (levels 0-2 only)
    PAGE = 2  # 4 KiB page (level 3 only)
    RESERVED3 = 3
