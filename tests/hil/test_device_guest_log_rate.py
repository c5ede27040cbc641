"""A guest looping over register holes cannot flood the device log.

Through the real ``gemu device`` process: 100,000 reads of an aligned offset with no register
each count a guest error in STATS, exactly, while the log holds only the first
``GUEST_LOG_BURST`` of them and at most one "not logged" summary per ``GUEST_LOG_INTERVAL_S``.
"""

from __future__ import annotations

import time
from pathlib import Path

from gemu.device.abi import regs
from gemu.device.regfile import GUEST_LOG_BURST, GUEST_LOG_INTERVAL_S
from tests.support.device import attached_client, spawn_device

HOLE = next(o for o in range(0, regs.MMIO_SIZE, 4) if o not in regs.REGISTER_MAP.by_offset)
READS = 100_000


def test_100k_unassigned_reads_log_a_bounded_number_of_lines_and_count_exactly():
    with spawn_device() as dev, attached_client(dev.spec) as client:
        before = client.stats()["guest_errors"]
        t0 = time.monotonic()
        for _ in range(READS):
            assert client.readl(HOLE) == 0
        elapsed = time.monotonic() - t0
        assert client.stats()["guest_errors"] - before == READS
        lines = [line for line in dev.log().splitlines() if f"{HOLE:#x}" in line]
        summaries = [line for line in lines if "not logged" in line]
        assert len(lines) - len(summaries) == GUEST_LOG_BURST
        assert 1 <= len(summaries) <= 1 + elapsed / GUEST_LOG_INTERVAL_S, summaries
        print(f"{READS} unassigned reads in {elapsed:.2f} s: {len(lines)} log lines")


def test_the_hardware_reference_states_the_rate_limit():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "hardware.md").read_text()
    text = " ".join(doc.split())
    assert f"the first {GUEST_LOG_BURST} of each kind and offset" in text
    assert f"at most every {GUEST_LOG_INTERVAL_S:g} s" in text
