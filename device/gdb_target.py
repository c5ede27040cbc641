"""DOC: the register layout the gdb stub presents, and its target description.

gdb accepts a target description only for an architecture it knows, so the GPU poses as an
``aarch64`` target (feature ``org.gnu.gdb.aarch64.core``): with it ``stepi`` is a hardware
step (``vCont;s``), so the stub decides that one step is one command-stream packet. The core
registers carry the command processor's state under fixed names (:data:`CORE_MAP`), ``pc`` is
the address of the next packet, and a second feature, ``org.gemu.gpu``, lists every MMIO
register by its lower-case name in register group ``gpu``::

    (gdb) p/x $pc            # next packet: ring PA or IB GPU VA
    (gdb) p $x1              # RING_HEAD (see CORE_MAP)
    (gdb) p $ring_head       # the MMIO register itself
    (gdb) info registers gpu

Register numbers follow :data:`REGISTERS`; the ``g`` packet carries them all in that order,
little-endian.
"""

from __future__ import annotations

from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

from .abi.regs import REGISTER_MAP, Register

ARCHITECTURE = "aarch64"
CORE_FEATURE = "org.gnu.gdb.aarch64.core"
GPU_FEATURE = "org.gemu.gpu"
GPU_GROUP = "gpu"

# What each aarch64 core register holds; registers not named here read as 0.
CORE_MAP: dict[str, str] = {
    "x0": "CP state (CpState: 0 STOPPED, 1 IDLE, 2 RUNNING, 3 WAITING, 4 ERROR, 5 HALTED)",
    "x1": "RING_HEAD: byte offset of the next ring packet",
    "x2": "latched ring tail: the CP executes up to this offset",
    "x3": "current address space (selected by SET_AS)",
    "x4": "CP_ERROR (code, opcode, AS, IN_IB)",
    "x5": "CP_ERROR_ADDR: the failing packet",
    "x6": "indirect-buffer nesting depth",
    "x7": "CP_PACKETS: packets executed since reset",
    "x8": "latched RING_BASE (guest-physical)",
    "x9": "latched RING_SIZE",
    "x10": "FENCE_SEQNO: the last seqno a FENCE wrote",
    "x11": "1 while pc is in an indirect buffer (a GPU VA), 0 in the ring (guest-physical)",
    "x12": "STATUS",
    "x13": "IRQ_STATUS",
    "x14": "MMU_INT_RAWSTAT",
    "pc": "address of the next packet (the failing one while the CP is in ERROR)",
}


@dataclass(frozen=True)
class GdbRegister:
    """One register as gdb numbers it: ``mmio`` is the device register behind it, if any."""

    regnum: int
    name: str
    bits: int
    type: str
    group: str | None = None
    mmio: Register | None = None

    @property
    def size(self) -> int:
        return self.bits // 8


def _registers() -> tuple[GdbRegister, ...]:
    out = [GdbRegister(i, f"x{i}", 64, "int") for i in range(31)]
    out.append(GdbRegister(31, "sp", 64, "data_ptr"))
    out.append(GdbRegister(32, "pc", 64, "code_ptr"))
    out.append(GdbRegister(33, "cpsr", 32, "int"))
    for reg in REGISTER_MAP:
        out.append(GdbRegister(len(out), reg.name.lower(), 32, "uint32", GPU_GROUP, reg))
    return tuple(out)


REGISTERS = _registers()
BY_NAME = {r.name: r for r in REGISTERS}
PC_REGNUM = BY_NAME["pc"].regnum
CORE_COUNT = 34  # x0..x30, sp, pc, cpsr


def _reg_xml(r: GdbRegister) -> str:
    attrs = f'name="{r.name}" bitsize="{r.bits}" regnum="{r.regnum}" type="{r.type}"'
    if r.group:
        attrs += f' group="{r.group}"'
    return f"    <reg {attrs}/>"


def target_xml() -> str:
    """The whole target description, inline (no xi:include)."""
    core = "\n".join(_reg_xml(r) for r in REGISTERS[:CORE_COUNT])
    gpu = "\n".join(_reg_xml(r) for r in REGISTERS[CORE_COUNT:])
    return (
        '<?xml version="1.0"?>\n'
        '<!DOCTYPE target SYSTEM "gdb-target.dtd">\n'
        '<target version="1.0">\n'
        f"  <architecture>{ARCHITECTURE}</architecture>\n"
        f"  <feature name={quoteattr(CORE_FEATURE)}>\n{core}\n  </feature>\n"
        f"  <feature name={quoteattr(GPU_FEATURE)}>\n{gpu}\n  </feature>\n"
        "</target>\n"
    )


TARGET_XML = target_xml().encode()

__all__ = [
    "BY_NAME",
    "CORE_COUNT",
    "CORE_MAP",
    "PC_REGNUM",
    "REGISTERS",
    "TARGET_XML",
    "GdbRegister",
    "target_xml",
]
