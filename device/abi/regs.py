"""DOC: the gemu GPU register map, declared once as data.

Every register is 32 bits wide at a 4-byte aligned offset in one MMIO window. A register has an
access kind, a reset value and named fields (shift, width); 64-bit quantities are LO/HI pairs.
Behaviour (what a write does) is bound separately by the device model, in the spirit of QEMU's
``REG32``/``FIELD`` and ``RegisterAccessInfo``; the guest driver uses the same declarations::

    from gemu.device.abi import regs
    bus.writel(regs.IRQ_MASK.offset, int(Irq.FENCE | Irq.CP_ERROR))
    state = regs.CP_STATUS.field("STATE").ex(bus.readl(regs.CP_STATUS.offset))

The address-space (AS) block repeats for each of the ``AS_COUNT`` address spaces at
``AS_BASE + as * AS_STRIDE``; :func:`as_reg` gives the register of one AS.
``docs/hardware.md`` is rendered from this module (``gemu.device.abi.docgen``); a test keeps it
in sync.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum

from .enums import Access, CpError, CpState, Irq, MmuCommand, MmuFault, TransCfgMode

GPU_ID_VALUE = 0x67656D75  # "gemu" in ASCII, big-endian reading
VERSION_MAJOR = 1
VERSION_MINOR = 0
AS_COUNT = 8
VA_BITS = 48
PA_BITS = 40
IB_MAX_DEPTH = 4
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
MMIO_SIZE = 0x2000
AS_BASE = 0x1400
AS_STRIDE = 0x40
RING_SIZE_MIN = 4096
RING_SIZE_MAX = 16 << 20
RESPONSE_BOUND_MS = 10  # the device answers registers, resets and gdb within this, busy or not


@dataclass(frozen=True)
class Field:
    """A bit field of a register: ``width`` bits at ``shift``."""

    name: str
    shift: int
    width: int = 1
    doc: str = ""
    enum: type[IntEnum] | None = None

    @property
    def mask(self) -> int:
        return ((1 << self.width) - 1) << self.shift

    def ex(self, value: int) -> int:
        """Extract the field from a register value (QEMU's FIELD_EX32)."""
        return (value & self.mask) >> self.shift

    def dp(self, value: int, field_value: int) -> int:
        """Deposit ``field_value`` into the field of ``value`` (QEMU's FIELD_DP32)."""
        if field_value < 0 or field_value >> self.width:
            raise ValueError(f"{self.name} takes {self.width} bits, not {field_value!r}")
        return (value & ~self.mask) | (field_value << self.shift)


@dataclass(frozen=True)
class Register:
    """One 32-bit register of the MMIO window."""

    name: str
    offset: int
    access: Access
    reset: int = 0
    doc: str = ""
    fields: tuple[Field, ...] = ()
    block: str = "GPU"
    as_index: int | None = None

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"{self.name} has no field {name!r}")

    @property
    def writable(self) -> bool:
        return self.access in (Access.RW, Access.WO, Access.W1C)

    @property
    def readable(self) -> bool:
        return self.access in (Access.RO, Access.RW)


@dataclass
class RegisterMap:
    """The whole register file; validates itself when built."""

    registers: tuple[Register, ...]
    by_offset: dict[int, Register] = field(init=False)
    by_name: dict[str, Register] = field(init=False)

    def __post_init__(self) -> None:
        self.by_offset = {}
        self.by_name = {}
        for r in self.registers:
            if r.offset % 4 or not 0 <= r.offset < MMIO_SIZE:
                raise ValueError(f"{r.name}: offset {r.offset:#x} must be aligned and in MMIO")
            if r.offset in self.by_offset:
                other = self.by_offset[r.offset].name
                raise ValueError(f"{r.name} overlaps {other} at {r.offset:#x}")
            if r.name in self.by_name:
                raise ValueError(f"duplicate register name {r.name}")
            if r.reset >> 32:
                raise ValueError(f"{r.name}: reset {r.reset:#x} exceeds 32 bits")
            used = 0
            for f in r.fields:
                if f.shift + f.width > 32:
                    raise ValueError(f"{r.name}.{f.name} exceeds 32 bits")
                if used & f.mask:
                    raise ValueError(f"{r.name}.{f.name} overlaps another field")
                used |= f.mask
            self.by_offset[r.offset] = r
            self.by_name[r.name] = r

    def __iter__(self):
        return iter(self.registers)

    def __getitem__(self, name: str) -> Register:
        return self.by_name[name]


def _lohi(name: str, offset: int, access: Access, doc: str, **kw) -> tuple[Register, Register]:
    return (
        Register(f"{name}_LO", offset, access, doc=f"{doc} (bits 31:0)", **kw),
        Register(f"{name}_HI", offset + 4, access, doc=f"{doc} (bits 63:32)", **kw),
    )


def _irq_fields(flags: type[Irq]) -> tuple[Field, ...]:
    return tuple(Field(m.name, m.value.bit_length() - 1, 1) for m in flags)


# --- GPU control block -------------------------------------------------------------------
GPU_ID = Register("GPU_ID", 0x000, Access.RO, GPU_ID_VALUE, "Product identifier, 'gemu'.")
VERSION = Register(
    "VERSION",
    0x004,
    Access.RO,
    (VERSION_MAJOR << 16) | VERSION_MINOR,
    "Hardware interface version.",
    (Field("MINOR", 0, 16), Field("MAJOR", 16, 16)),
)
FEATURES = Register(
    "FEATURES",
    0x008,
    Access.RO,
    AS_COUNT | (VA_BITS << 8) | (PA_BITS << 16) | (IB_MAX_DEPTH << 24) | (1 << 28),
    "What this GPU implements.",
    (
        Field("AS_COUNT", 0, 8, "number of GPU address spaces"),
        Field("VA_BITS", 8, 8, "GPU virtual address width"),
        Field("PA_BITS", 16, 8, "physical address width of PTEs"),
        Field("IB_MAX_DEPTH", 24, 4, "deepest indirect-buffer nesting"),
        Field("FENCE_IRQ", 28, 1, "FENCE packets can raise Irq.FENCE"),
    ),
)
MEM_PAGES = Register(
    "MEM_PAGES",
    0x00C,
    Access.RO,
    0,
    "4 KiB pages of guest memory the device can reach: 0 while none is attached (the reset "
    "value); a soft reset keeps guest memory attached, so it keeps this value too.",
)
CONTROL = Register(
    "CONTROL",
    0x010,
    Access.RW,
    0,
    "Device control. SOFT_RESET reads as 0; writing 1 resets every register, the TLBs and the "
    "command processor (guest memory is kept) and raises Irq.RESET_DONE.",
    (Field("SOFT_RESET", 0, 1),),
)
STATUS = Register(
    "STATUS",
    0x014,
    Access.RO,
    0,
    "Summary status.",
    (
        Field("CP_BUSY", 0, 1, "the CP is RUNNING or WAITING"),
        Field("CP_ERROR", 1, 1, "the CP is stopped on an error"),
        Field("MMU_FAULT", 2, 1, "some AS has a latched fault"),
        Field("HALTED", 3, 1, "the debugger holds the CP"),
        Field("MEM_ATTACHED", 4, 1, "guest memory is attached"),
    ),
)
IRQ_RAWSTAT = Register(
    "IRQ_RAWSTAT",
    0x020,
    Access.RO,
    0,
    "Pending interrupt sources, before masking.",
    _irq_fields(Irq),
)
IRQ_CLEAR = Register(
    "IRQ_CLEAR", 0x024, Access.W1C, 0, "Write 1 to clear a bit of IRQ_RAWSTAT.", _irq_fields(Irq)
)
IRQ_MASK = Register(
    "IRQ_MASK", 0x028, Access.RW, 0, "Sources allowed to raise the IRQ line.", _irq_fields(Irq)
)
IRQ_STATUS = Register(
    "IRQ_STATUS",
    0x02C,
    Access.RO,
    0,
    "IRQ_RAWSTAT & IRQ_MASK; the IRQ line is high while this is non-zero.",
    _irq_fields(Irq),
)
SCRATCH = tuple(
    Register(f"SCRATCH{i}", 0x030 + 4 * i, Access.RW, 0, "Free for the driver.") for i in range(4)
)
TIMESTAMP_LO, TIMESTAMP_HI = _lohi(
    "TIMESTAMP", 0x040, Access.RO, "Device clock in nanoseconds (virtual in stepped mode)"
)
FENCE_SEQNO_LO, FENCE_SEQNO_HI = _lohi(
    "FENCE_SEQNO", 0x048, Access.RO, "Seqno written by the last FENCE packet"
)

# --- Command processor and ring ----------------------------------------------------------
RING_BASE_LO, RING_BASE_HI = _lohi(
    "RING_BASE", 0x100, Access.RW, "Guest-physical address of the ring, 4 KiB aligned"
)
RING_SIZE = Register(
    "RING_SIZE",
    0x108,
    Access.RW,
    0,
    f"Ring size in bytes: a power of two from {RING_SIZE_MIN} to {RING_SIZE_MAX}.",
)
RING_HEAD = Register(
    "RING_HEAD", 0x10C, Access.RO, 0, "Byte offset of the next packet the CP reads."
)
RING_TAIL = Register(
    "RING_TAIL", 0x110, Access.RW, 0, "Byte offset up to which the driver wrote packets."
)
RING_DOORBELL = Register(
    "RING_DOORBELL",
    0x114,
    Access.WO,
    0,
    "Any write tells the CP to look at RING_TAIL. Meant as a posted write.",
)
CP_CONTROL = Register(
    "CP_CONTROL",
    0x118,
    Access.RW,
    0,
    "CP control. Setting ENABLE checks RING_BASE/RING_SIZE (CP_ERROR.CODE = RING_CONFIG if "
    "they are invalid; the CP is then in ERROR but not enabled). Clearing ENABLE stops the CP "
    "and leaves ERROR. RESUME leaves the ERROR state and continues at RING_HEAD, skipping the "
    "rest of the failed indirect buffer (CP_IDLE if nothing is left). RESET_HEAD sets "
    "RING_HEAD and RING_TAIL to 0 while ENABLE is clear. RESUME and RESET_HEAD read as 0.",
    (
        Field("ENABLE", 0, 1, "reads 1 while the CP is enabled (0 after a failed enable)"),
        Field("RESUME", 1, 1, "self-clearing"),
        Field("RESET_HEAD", 2, 1, "self-clearing: RING_HEAD = RING_TAIL = 0"),
    ),
)
CP_STATUS = Register(
    "CP_STATUS",
    0x11C,
    Access.RO,
    0,
    "Command-processor state.",
    (
        Field("STATE", 0, 4, enum=CpState),
        Field("IB_DEPTH", 4, 4, "current indirect-buffer nesting"),
        Field("AS", 8, 4, "address space selected by SET_AS"),
    ),
)
CP_ERROR = Register(
    "CP_ERROR",
    0x120,
    Access.RO,
    0,
    "Latched command-processor error; cleared by CP_CONTROL.RESUME or a reset.",
    (
        Field("CODE", 0, 8, enum=CpError),
        Field("OPCODE", 8, 8, "opcode of the failing packet"),
        Field("AS", 16, 4, "AS in use when it failed"),
        Field("IN_IB", 20, 1, "the failing packet was in an indirect buffer (address is a VA)"),
    ),
)
CP_ERROR_ADDR_LO, CP_ERROR_ADDR_HI = _lohi(
    "CP_ERROR_ADDR",
    0x124,
    Access.RO,
    "Address of the failing packet: guest-physical in the ring, GPU VA in an indirect buffer",
)
CP_PC_LO, CP_PC_HI = _lohi(
    "CP_PC", 0x12C, Access.RO, "Address of the next packet the CP executes (same spaces)"
)
CP_PACKETS = Register(
    "CP_PACKETS",
    0x134,
    Access.RO,
    0,
    "Packets executed since the last reset (0 after a soft reset; wraps at 2^32).",
)

# --- MMU ---------------------------------------------------------------------------------
_mmu_int_fields = tuple(Field(f"PAGE_FAULT_AS{i}", i) for i in range(AS_COUNT)) + tuple(
    Field(f"BUS_FAULT_AS{i}", 16 + i) for i in range(AS_COUNT)
)
MMU_INT_RAWSTAT = Register(
    "MMU_INT_RAWSTAT",
    0x1000,
    Access.RO,
    0,
    "Bit n: translation/permission fault in AS n; bit n+16: bus fault in AS n.",
    _mmu_int_fields,
    block="MMU",
)
MMU_INT_CLEAR = Register(
    "MMU_INT_CLEAR",
    0x1004,
    Access.W1C,
    0,
    "Write 1 to clear a fault bit (and the AS's latched fault).",
    _mmu_int_fields,
    block="MMU",
)
MMU_INT_MASK = Register(
    "MMU_INT_MASK",
    0x1008,
    Access.RW,
    0,
    "Fault bits allowed to raise Irq.MMU.",
    _mmu_int_fields,
    block="MMU",
)
MMU_INT_STAT = Register(
    "MMU_INT_STAT",
    0x100C,
    Access.RO,
    0,
    "MMU_INT_RAWSTAT & MMU_INT_MASK; non-zero sets IRQ_RAWSTAT.MMU.",
    _mmu_int_fields,
    block="MMU",
)


@dataclass(frozen=True)
class AsRegisterTemplate:
    """One register of the per-AS block, before it is placed at an AS's offset."""

    name: str
    rel: int
    access: Access
    doc: str
    fields: tuple[Field, ...] = ()


AS_TEMPLATE: tuple[AsRegisterTemplate, ...] = (
    AsRegisterTemplate(
        "TRANSTAB_LO", 0x00, Access.RW, "Level-0 table address, bits 31:12 (latched by UPDATE)"
    ),
    AsRegisterTemplate("TRANSTAB_HI", 0x04, Access.RW, "Level-0 table address, bits 63:32"),
    AsRegisterTemplate(
        "TRANSCFG",
        0x08,
        Access.RW,
        "Translation mode (latched by UPDATE).",
        (Field("MODE", 0, 4, enum=TransCfgMode),),
    ),
    AsRegisterTemplate(
        "LOCKADDR_LO",
        0x0C,
        Access.RW,
        "Lock region: base bits 31:12 | SIZE = log2(bytes) - 1 in bits 5:0 (minimum 4 KiB)",
        (Field("SIZE", 0, 6), Field("BASE", 12, 20)),
    ),
    AsRegisterTemplate("LOCKADDR_HI", 0x10, Access.RW, "Lock region base, bits 63:32"),
    AsRegisterTemplate(
        "COMMAND", 0x14, Access.WO, "MMU command.", (Field("CMD", 0, 8, enum=MmuCommand),)
    ),
    AsRegisterTemplate(
        "FAULTSTATUS",
        0x18,
        Access.RO,
        "Latched fault: kept until the bit is cleared in MMU_INT_CLEAR.",
        (
            Field("EXCEPTION_TYPE", 0, 8, enum=MmuFault),
            Field("ACCESS_TYPE", 8, 2),
            Field("SOURCE", 16, 16, "opcode of the packet that faulted"),
        ),
    ),
    AsRegisterTemplate("FAULTADDRESS_LO", 0x1C, Access.RO, "Faulting GPU VA, bits 31:0"),
    AsRegisterTemplate("FAULTADDRESS_HI", 0x20, Access.RO, "Faulting GPU VA, bits 63:32"),
    AsRegisterTemplate(
        "STATUS",
        0x24,
        Access.RO,
        "AS status. Commands complete synchronously, so ACTIVE always reads 0.",
        (Field("ACTIVE", 0, 1), Field("LOCKED", 1, 1), Field("FAULTED", 2, 1)),
    ),
    AsRegisterTemplate(
        "TLB_ENTRIES", 0x28, Access.RO, "Translations cached in this AS's TLB (for debugging)."
    ),
)


def _as_registers() -> tuple[Register, ...]:
    out = []
    for i in range(AS_COUNT):
        for t in AS_TEMPLATE:
            out.append(
                Register(
                    f"AS{i}_{t.name}",
                    AS_BASE + i * AS_STRIDE + t.rel,
                    t.access,
                    0,
                    t.doc,
                    t.fields,
                    block="AS",
                    as_index=i,
                )
            )
    return tuple(out)


AS_REGISTERS = _as_registers()


def as_reg(as_index: int, name: str) -> Register:
    """The register ``name`` (e.g. ``"COMMAND"``) of address space ``as_index``."""
    reg = _AS_REG.get((as_index, name))  # the driver and the MMU ask on every AS command
    if reg is not None:
        return reg
    if not 0 <= as_index < AS_COUNT:
        raise ValueError(f"AS index must be 0..{AS_COUNT - 1}, not {as_index!r}")
    return REGISTER_MAP.by_name[f"AS{as_index}_{name}"]


def _all() -> Iterable[Register]:
    yield from (GPU_ID, VERSION, FEATURES, MEM_PAGES, CONTROL, STATUS)
    yield from (IRQ_RAWSTAT, IRQ_CLEAR, IRQ_MASK, IRQ_STATUS)
    yield from SCRATCH
    yield from (TIMESTAMP_LO, TIMESTAMP_HI, FENCE_SEQNO_LO, FENCE_SEQNO_HI)
    yield from (RING_BASE_LO, RING_BASE_HI, RING_SIZE, RING_HEAD, RING_TAIL, RING_DOORBELL)
    yield from (CP_CONTROL, CP_STATUS, CP_ERROR, CP_ERROR_ADDR_LO, CP_ERROR_ADDR_HI)
    yield from (CP_PC_LO, CP_PC_HI, CP_PACKETS)
    yield from (MMU_INT_RAWSTAT, MMU_INT_CLEAR, MMU_INT_MASK, MMU_INT_STAT)
    yield from AS_REGISTERS


REGISTER_MAP = RegisterMap(tuple(_all()))
_AS_REG: dict[tuple[int, str], Register] = {
    (r.as_index, r.name.split("_", 1)[1]): r for r in AS_REGISTERS
}
