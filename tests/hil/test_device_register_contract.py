"""The register contract of docs/hardware.md, through the real ``gemu device`` process.

An unaligned offset or one outside the MMIO window gets EINVAL; an aligned offset inside the
window with no register reads 0, ignores writes and counts a guest error in STATS; a RESUME that
finds nothing to run sends a CP_IDLE interrupt; CP_PACKETS restarts at 0 after RESET.
"""

from __future__ import annotations

import errno

import pytest

from gemu.device.abi import packets as pk
from gemu.device.abi import regs
from gemu.device.abi.client import DeviceError
from gemu.device.abi.enums import CpState, Irq
from gemu.host.demo import Ring
from tests.support.device import attached_client, device_process
from tests.support.hostile import cp_state

__all__ = ["device_process"]  # fixture

HOLE = next(o for o in range(0, regs.MMIO_SIZE, 4) if o not in regs.REGISTER_MAP.by_offset)


@pytest.mark.parametrize("offset", [2, regs.SCRATCH[0].offset + 1, regs.MMIO_SIZE, 1 << 31])
def test_unaligned_or_outside_the_window_is_einval(device_process, offset):
    with attached_client(device_process.spec) as client:
        for call in (lambda: client.readl(offset), lambda: client.writel(offset, 1)):
            with pytest.raises(DeviceError) as exc:
                call()
            assert exc.value.errno == errno.EINVAL
        assert client.readl(regs.GPU_ID.offset) == regs.GPU_ID_VALUE


def test_an_unassigned_offset_reads_0_and_counts_a_guest_error(device_process):
    with attached_client(device_process.spec) as client:
        before = client.stats()["guest_errors"]
        client.writel(HOLE, 0xDEAD)
        assert client.readl(HOLE) == 0
        assert client.stats()["guest_errors"] == before + 2


def test_resume_on_an_empty_ring_interrupts_and_packets_count_since_reset(device_process):
    """The only packet faults (a physical FILL past the end of memory); ENABLE|RESUME finds the
    ring empty and the driver gets its CP_IDLE interrupt. After RESET, CP_PACKETS reads 0."""
    with attached_client(device_process.spec) as client:
        mem = client.memory
        ring = Ring(client, mem, base=0x10000, size=0x1000)
        client.writel(regs.IRQ_MASK.offset, int(Irq.CP_IDLE | Irq.CP_ERROR))
        ring.submit(pk.nop() + pk.fill(mem.size, 4, 0, phys=True))
        assert ring.wait_idle(timeout=10) is CpState.ERROR
        client.writel(regs.IRQ_CLEAR.offset, 0x1F)
        client.drain_irqs()
        client.writel(regs.CP_CONTROL.offset, 0b11)  # ENABLE | RESUME
        event = client.wait_irq(timeout=10)
        while event is not None and not event.irq_status & Irq.CP_IDLE:
            event = client.wait_irq(timeout=10)
        assert event is not None, "no CP_IDLE interrupt after RESUME"
        assert cp_state(client) is CpState.IDLE
        assert client.readl(regs.CP_PACKETS.offset) == 1
        client.reset()
        assert client.readl(regs.CP_PACKETS.offset) == 0
