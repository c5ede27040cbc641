"""The register file through the Gpu's MMIO: reset values, access kinds, guest errors."""

from __future__ import annotations

import logging

import pytest

from gemu.device.abi import regs
from gemu.device.abi.enums import Access, Irq
from gemu.device.abi.regs import REGISTER_MAP
from gemu.device.gpu import Gpu
from gemu.device.memory import MappedMemory
from gemu.device.regfile import RegFile, RegisterAccessInfo

GUEST = "gemu.device.guest_error"


@pytest.fixture
def gpu():
    g = Gpu(stepped=True)
    yield g
    assert g.stats()["internal_errors"] == 0


@pytest.mark.parametrize("reg", list(REGISTER_MAP), ids=lambda r: r.name)
def test_reset_value(gpu, reg):
    """Every register reads its declared reset value after power-on (debug path for WO)."""
    assert gpu.debug_read(reg.offset) == reg.reset
    if reg.readable:
        assert gpu.mmio_read(reg.offset) == reg.reset


def test_identification_registers(gpu):
    """GPU_ID reads 'gemu', VERSION 1.0 and FEATURES the ABI constants."""
    assert gpu.mmio_read(regs.GPU_ID.offset).to_bytes(4, "big") == b"gemu"
    assert regs.VERSION.field("MAJOR").ex(gpu.mmio_read(regs.VERSION.offset)) == 1
    feat = gpu.mmio_read(regs.FEATURES.offset)
    assert regs.FEATURES.field("AS_COUNT").ex(feat) == regs.AS_COUNT
    assert regs.FEATURES.field("IB_MAX_DEPTH").ex(feat) == regs.IB_MAX_DEPTH


def test_rw_register_stores(gpu):
    """SCRATCH registers keep what the driver writes."""
    for i, r in enumerate(regs.SCRATCH):
        gpu.mmio_write(r.offset, 0x1000 + i)
    assert [gpu.mmio_read(r.offset) for r in regs.SCRATCH] == [0x1000, 0x1001, 0x1002, 0x1003]


def test_write_to_read_only_is_ignored_and_logged(gpu, caplog):
    """A write to an RO register changes nothing and logs which register and why."""
    with caplog.at_level(logging.WARNING, logger=GUEST):
        gpu.mmio_write(regs.GPU_ID.offset, 0)
    assert gpu.mmio_read(regs.GPU_ID.offset) == regs.GPU_ID_VALUE
    assert "read-only register GPU_ID" in caplog.text
    assert caplog.records[0].name == GUEST


def test_read_of_write_only_returns_zero_and_logs(gpu, caplog):
    """Reads of WO and W1C registers return 0 and log a guest error."""
    gpu.mmio_write(regs.RING_DOORBELL.offset, 5)
    with caplog.at_level(logging.WARNING, logger=GUEST):
        assert gpu.mmio_read(regs.RING_DOORBELL.offset) == 0
        assert gpu.mmio_read(regs.IRQ_CLEAR.offset) == 0
    assert "read of WO register RING_DOORBELL" in caplog.text
    assert "read of W1C register IRQ_CLEAR" in caplog.text


@pytest.mark.parametrize("offset", [0x2, 0x1FFC + 4, -4, 0x050, 0x1100, 10**9])
def test_bad_offsets_never_raise(gpu, caplog, offset):
    """Unaligned, unknown and out-of-window offsets read 0, ignore writes and log."""
    with caplog.at_level(logging.WARNING, logger=GUEST):
        assert gpu.mmio_read(offset) == 0
        gpu.mmio_write(offset, 0xFFFFFFFF)
    assert len(caplog.records) == 2
    assert gpu.debug_read(offset) == 0


def test_value_wider_than_32_bits_is_truncated_and_logged(gpu, caplog):
    """A value outside 32 bits is a guest error; its low 32 bits are written."""
    with caplog.at_level(logging.WARNING, logger=GUEST):
        gpu.mmio_write(regs.SCRATCH[0].offset, (1 << 40) | 0x1234)
        gpu.mmio_write(regs.SCRATCH[1].offset, "7")  # type: ignore[arg-type]
    assert gpu.mmio_read(regs.SCRATCH[0].offset) == 0x1234
    assert gpu.mmio_read(regs.SCRATCH[1].offset) == 0
    assert "not a 32-bit value" in caplog.text


def test_reserved_bits_are_not_stored(gpu):
    """Only declared field bits of a register with fields are kept (IRQ_MASK has 5)."""
    gpu.mmio_write(regs.IRQ_MASK.offset, 0xFFFFFFFF)
    assert gpu.mmio_read(regs.IRQ_MASK.offset) == 0x1F
    gpu.mmio_write(regs.MMU_INT_MASK.offset, 0xFFFFFFFF)
    assert gpu.mmio_read(regs.MMU_INT_MASK.offset) == 0x00FF00FF


def test_w1c_clears_only_written_bits(gpu):
    """IRQ_CLEAR clears exactly the bits written as 1 in IRQ_RAWSTAT."""
    gpu.raise_irq(Irq.FENCE | Irq.CP_IDLE | Irq.RESET_DONE)
    gpu.mmio_write(regs.IRQ_CLEAR.offset, int(Irq.FENCE | Irq.RESET_DONE))
    assert gpu.mmio_read(regs.IRQ_RAWSTAT.offset) == Irq.CP_IDLE


def test_self_clearing_bits_read_zero(gpu):
    """CONTROL.SOFT_RESET and CP_CONTROL.RESUME/RESET_HEAD act and read back as 0."""
    gpu.mmio_write(regs.CP_CONTROL.offset, 0b110)
    assert gpu.mmio_read(regs.CP_CONTROL.offset) == 0
    gpu.mmio_write(regs.CONTROL.offset, 1)
    assert gpu.mmio_read(regs.CONTROL.offset) == 0
    assert gpu.stats()["resets"] == 1


def test_computed_registers(gpu):
    """MEM_PAGES, STATUS.MEM_ATTACHED and TIMESTAMP follow device state."""
    gpu.attach_memory(MappedMemory(bytearray(1 << 20)))
    assert gpu.mmio_read(regs.MEM_PAGES.offset) == 256
    assert regs.STATUS.field("MEM_ATTACHED").ex(gpu.mmio_read(regs.STATUS.offset)) == 1
    gpu.step(0, (5 << 32) + 7)
    assert gpu.mmio_read(regs.TIMESTAMP_LO.offset) == 7
    assert gpu.mmio_read(regs.TIMESTAMP_HI.offset) == 5
    gpu.detach_memory()
    assert gpu.mmio_read(regs.MEM_PAGES.offset) == 0
    assert gpu.mmio_read(regs.STATUS.offset) == 0


def test_debug_read_has_no_side_effects(gpu, caplog):
    """debug_read logs nothing, runs no write hooks and shows a WO register's last value."""
    gpu.mmio_write(regs.as_reg(2, "COMMAND").offset, 0)  # NOP
    before = gpu.stats()
    with caplog.at_level(logging.DEBUG):
        values = [gpu.debug_read(r.offset) for r in REGISTER_MAP]
    assert caplog.records == []
    assert gpu.stats() == before
    assert values[list(REGISTER_MAP).index(regs.GPU_ID)] == regs.GPU_ID_VALUE


def test_internal_error_in_a_hook_is_contained(caplog):
    """A failing behaviour hook is logged and counted; the MMIO call still returns."""
    rf = RegFile()

    def boom(_v):
        raise RuntimeError("model bug")

    rf.bind([RegisterAccessInfo(regs.SCRATCH[0], post_write=boom)])
    with caplog.at_level(logging.ERROR, logger="gemu.device"):
        rf.mmio_write(regs.SCRATCH[0].offset, 1)
    assert rf.internal_errors == 1
    assert "internal error writing" in caplog.text


def test_bind_validates_the_table():
    """The behaviour table must name registers of the map, once each, w1c only on W1C regs."""
    rf = RegFile()
    rf.bind([RegisterAccessInfo(regs.SCRATCH[0])])
    with pytest.raises(ValueError, match="bound twice"):
        rf.bind([RegisterAccessInfo(regs.SCRATCH[0])])
    with pytest.raises(ValueError, match="only W1C"):
        rf.bind([RegisterAccessInfo(regs.SCRATCH[1], clears=regs.IRQ_RAWSTAT)])
    foreign = regs.Register("X", 0x50, Access.RW)
    with pytest.raises(ValueError, match="not a register of this map"):
        rf.bind([RegisterAccessInfo(foreign)])
