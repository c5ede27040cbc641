"""GPU core files (gemu.device.coredump): the ELF layout, capture from a live Gpu, the
reader (pyelftools) and the summary; the real gdb opening them is in tests/hil/test_gdb.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from gemu.device import coredump as cd
from gemu.device.abi import packets as pk
from gemu.device.abi import regs
from gemu.device.gpu import Gpu
from gemu.device.memory import MappedMemory
from tests.support.pagetable import PageTable

RING, IB_VA, DATA_VA = 0x1000, 0x20_0000, 0x40_0000


def faulting_gpu(ib: bytes) -> Gpu:
    """A Gpu whose ring runs SET_AS 1, an IB (at IB_VA) and a FENCE; DATA_VA is 2 pages."""
    gpu = Gpu()
    mem = MappedMemory(bytearray(1 << 20))
    gpu.attach_memory(mem)
    pt = PageTable(mem, 0x80000, 0xC0000)
    pt.map(DATA_VA, 0x10000, 0x2000, write=True)
    pt.map(IB_VA, 0x20000, 0x1000, exec=True)
    mem.write(0x20000, ib)
    for name, value in (("TRANSTAB_LO", pt.root), ("TRANSCFG", 1), ("COMMAND", 1)):
        gpu.mmio_write(regs.as_reg(1, name).offset, value)
    ring = pk.set_as(1) + pk.indirect_buffer(IB_VA, len(ib) // 4) + pk.fence(DATA_VA + 8, 5)
    mem.write(RING, ring)
    gpu.mmio_write(regs.RING_BASE_LO.offset, RING)
    gpu.mmio_write(regs.RING_SIZE.offset, 0x1000)
    gpu.mmio_write(regs.CP_CONTROL.offset, 1)
    gpu.mmio_write(regs.RING_TAIL.offset, len(ring))
    gpu.mmio_write(regs.RING_DOORBELL.offset, 1)
    return gpu


def test_prstatus_has_the_aarch64_layout():
    """NT_PRSTATUS is 392 bytes with pr_reg (x0..x30, sp, pc, pstate) at offset 112, the
    layout bfd expects for an aarch64 core; the ELF and program headers have their sizes."""
    assert cd.PRSTATUS.sizeof() == 392
    blob = cd.PRSTATUS.build(
        dict(
            si_signo=11, si_code=0, si_errno=0, pr_cursig=11, pr_sigpend=0, pr_sighold=0,
            pr_pid=1, pr_ppid=0, pr_pgrp=1, pr_sid=1, pr_times=bytes(64),
            pr_reg=list(range(34)), pr_fpvalid=0,
        )
    )  # fmt: skip
    assert blob[112 + 32 * 8 : 112 + 33 * 8] == (32).to_bytes(8, "little")
    assert cd.PRSTATUS.build(cd.PRSTATUS.parse(blob)) == blob
    assert cd.ELF_HEADER.sizeof() == 64 and cd.PROGRAM_HEADER.sizeof() == 56


def test_fault_core_round_trips_through_pyelftools(tmp_path: Path):
    """A core captured after an MMU fault reads back (ELFFile) with SIGSEGV, pc on the failing
    IB packet, the fault, every MMIO register, and segments holding the ring and AS1 data."""
    gpu = faulting_gpu(pk.fill(DATA_VA, 16, 0xABCDABCD) + pk.fill(0x90_0000, 4, 1))
    dumper = cd.CoreDumper(gpu, tmp_path)
    gpu.run(100)
    dumper.observe()
    dumper.observe()  # one core per error
    (path,) = dumper.written
    assert path.name.endswith("-MMU_FAULT.core")
    info = cd.read_core(path)
    assert info.signal == 11
    assert info.pc == IB_VA + len(pk.fill(0, 0, 0))
    assert info.state.in_ib == 1 and info.state.as_index == 1
    assert "TRANSLATION_L2 on WRITE at GPU VA 0x900000 by FILL" in info.reason()
    assert [(f.as_index, f.faultaddress) for f in info.faults] == [(1, 0x90_0000)]
    assert info.mmio[regs.GPU_ID.offset // 4] == regs.GPU_ID_VALUE
    assert cd.read_segment(path, RING, 8) == pk.set_as(1)
    assert cd.read_segment(path, DATA_VA, 8) == bytes.fromhex("cdabcdab") * 2
    text = cd.summarize(path)
    assert "packet:  0x200014: FILL 0x900000, size=0x4, value=0x1" in text
    assert "0x000000400000-0x000000402000 0x2000 bytes (GPU VA)" in text


def test_reset_of_a_busy_cp_writes_a_hang_core(tmp_path: Path):
    """A soft reset while the CP still has packets to run (the guest recovering a hang) writes
    a core with SIGABRT whose pc is the next packet; a reset of an idle device writes none."""
    gpu = faulting_gpu(pk.nop(1))
    dumper = cd.CoreDumper(gpu, tmp_path)
    gpu.reset_hook = dumper.before_reset
    gpu.mmio_write(regs.CONTROL.offset, 1)  # not started yet: the ring still has work
    assert [p.name.split("-")[-1] for p in dumper.written] == ["HANG_RESET.core"]
    info = cd.read_core(dumper.written[0])
    assert info.signal == 6 and info.pc == RING
    gpu.mmio_write(regs.CONTROL.offset, 1)
    assert len(dumper.written) == 1


def test_read_core_rejects_other_files(tmp_path: Path):
    """A file that is not a gemu core is refused with a message naming it."""
    other = tmp_path / "x.core"
    other.write_bytes(b"not an elf")
    with pytest.raises(ValueError, match="not an ELF file"):
        cd.read_core(other)
