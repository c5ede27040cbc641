"""A test rig for the device model: a Gpu over a bytearray, driven through its registers.

Tests poke registers through the real MMIO interface, qtest style, on the stepped clock::

    rig = Rig()
    rig.start_ring()
    rig.submit(pk.fence(0x8000, 1, phys=True))
    rig.drain()
    assert rig.mem.read_u64(0x8000) == 1
"""

from __future__ import annotations

from gemu.device.abi import regs
from gemu.device.abi.enums import CpError, Irq, MmuCommand, TransCfgMode
from gemu.device.abi.regs import Register
from gemu.device.gpu import Gpu
from gemu.device.memory import MappedMemory

from .pagetable import PageTable

MEM_SIZE = 16 << 20
RING_BASE = 0x10000
RING_SIZE = 0x4000
TABLES = (0x100000, 0x400000)  # physical area for page tables
DATA = 0x400000  # physical pages tests may map freely start here


class Rig:
    def __init__(
        self, *, mem_size: int = MEM_SIZE, tlb_capacity: int = 65536, stepped: bool = True
    ) -> None:
        self.buf = bytearray(mem_size)
        self.mem = MappedMemory(self.buf)
        self.gpu = Gpu(tlb_capacity=tlb_capacity, stepped=stepped)
        self.gpu.attach_memory(self.mem)
        self.irq_calls: list[tuple[bool, int, int]] = []
        self.gpu.on_irq = lambda *a: self.irq_calls.append(a)
        self.tail = 0
        self._tables_next = TABLES[0]

    # registers
    def r(self, reg: Register) -> int:
        return self.gpu.mmio_read(reg.offset)

    def w(self, reg: Register, value: int) -> None:
        self.gpu.mmio_write(reg.offset, value)

    def ras(self, as_index: int, name: str) -> int:
        return self.r(regs.as_reg(as_index, name))

    def was(self, as_index: int, name: str, value: int) -> None:
        self.w(regs.as_reg(as_index, name), value)

    def field(self, reg: Register, name: str) -> int:
        return reg.field(name).ex(self.r(reg))

    # ring
    def start_ring(self, base: int = RING_BASE, size: int = RING_SIZE) -> None:
        self.w(regs.RING_BASE_LO, base & 0xFFFFFFFF)
        self.w(regs.RING_BASE_HI, base >> 32)
        self.w(regs.RING_SIZE, size)
        self.w(regs.IRQ_MASK, 0x1F)
        self.w(regs.MMU_INT_MASK, 0xFF00FF)
        self.w(regs.CP_CONTROL, 1)
        self.tail = self.r(regs.RING_HEAD)

    def put(self, data: bytes) -> None:
        """Write packets at the ring tail (wrapping) and advance RING_TAIL, no doorbell."""
        base = regs.RING_BASE_LO
        ring = self.r(base) | (self.r(regs.RING_BASE_HI) << 32)
        size = self.r(regs.RING_SIZE)
        for i, b in enumerate(data):
            self.buf[ring + (self.tail + i) % size] = b
        self.tail = (self.tail + len(data)) % size
        self.w(regs.RING_TAIL, self.tail)

    def submit(self, *packets: bytes) -> None:
        self.put(b"".join(packets))
        self.w(regs.RING_DOORBELL, 1)

    def drain(self, max_packets: int = 1 << 20) -> int:
        done = 0
        while self.gpu.has_work() and done < max_packets:
            done += self.gpu.run(max_packets - done)
        return done

    def run(self, *packets: bytes) -> int:
        """Submit ``packets`` and run the CP until it is idle; returns the packets executed."""
        self.submit(*packets)
        return self.drain()

    def cp_error(self) -> tuple[CpError, int, int, int]:
        v = self.r(regs.CP_ERROR)
        f = regs.CP_ERROR.field
        return (
            CpError(f("CODE").ex(v)),
            f("OPCODE").ex(v),
            f("AS").ex(v),
            f("IN_IB").ex(v),
        )

    def cp_error_addr(self) -> int:
        return self.r(regs.CP_ERROR_ADDR_LO) | (self.r(regs.CP_ERROR_ADDR_HI) << 32)

    def resume(self) -> None:
        self.w(regs.CP_CONTROL, 1 | 2)

    def irq_raw(self) -> Irq:
        return Irq(self.r(regs.IRQ_RAWSTAT))

    def clear_irq(self, bits: int = 0x1F) -> None:
        self.w(regs.IRQ_CLEAR, bits)

    # MMU
    def address_space(self, as_index: int) -> PageTable:
        """A fresh page table for ``as_index``, programmed and latched with UPDATE."""
        pt = PageTable(self.mem, self._tables_next, TABLES[1])
        self._tables_next += 64 * 4096
        self.was(as_index, "TRANSTAB_LO", pt.root & 0xFFFFFFFF)
        self.was(as_index, "TRANSTAB_HI", pt.root >> 32)
        self.was(as_index, "TRANSCFG", TransCfgMode.PT_4LEVEL)
        self.mmu(as_index, MmuCommand.UPDATE)
        return pt

    def mmu(self, as_index: int, cmd: MmuCommand) -> None:
        self.was(as_index, "COMMAND", cmd)

    def fault(self, as_index: int) -> tuple[int, int, int, int]:
        """(EXCEPTION_TYPE, ACCESS_TYPE, SOURCE, FAULTADDRESS) of an AS."""
        st = self.ras(as_index, "FAULTSTATUS")
        addr = self.ras(as_index, "FAULTADDRESS_LO") | (self.ras(as_index, "FAULTADDRESS_HI") << 32)
        return st & 0xFF, (st >> 8) & 3, st >> 16, addr
