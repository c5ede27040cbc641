"""The device clock stops while the command processor is held (a debugger's halt or the
machine's stop), so TIMESTAMP and WAIT_MEM timeouts do not count that time."""

from __future__ import annotations

import time

from gemu.device.abi import regs
from gemu.device.clock import FreeClock, SteppedClock
from gemu.device.gpu import Gpu


def _let_time_pass(ns: int) -> None:
    """Wait (bounded) until the host's monotonic clock moved by ``ns``."""
    start = time.monotonic_ns()
    while time.monotonic_ns() - start < ns:
        time.sleep(ns / 4e9)


def test_free_clock_stands_still_while_held_and_runs_on_from_there():
    clock = FreeClock()
    clock.hold(True)
    held_at = clock.now_ns()
    _let_time_pass(2_000_000)
    assert clock.now_ns() == held_at
    clock.hold(True)  # a second hold changes nothing
    clock.hold(False)
    after = clock.now_ns()
    assert held_at <= after < held_at + 2_000_000
    clock.reset()
    clock.hold(True)
    clock.reset()  # the hold survives a reset, at 0
    assert clock.now_ns() == 0


def test_timestamp_stops_while_gdb_holds_the_cp_and_the_stepped_clock_ignores_holds():
    """Gpu.halt (gdb) and Gpu.pause (QMP stop) hold the clock; resume/unpause restart it."""
    gpu = Gpu()
    gpu.halt()
    t = gpu.debug_read(regs.TIMESTAMP_LO.offset)
    _let_time_pass(2_000_000)
    assert gpu.debug_read(regs.TIMESTAMP_LO.offset) == t
    gpu.resume()
    _let_time_pass(1_000_000)
    assert gpu.debug_read(regs.TIMESTAMP_LO.offset) > t
    gpu.pause()
    t = gpu.debug_read(regs.TIMESTAMP_LO.offset)
    _let_time_pass(2_000_000)
    assert gpu.debug_read(regs.TIMESTAMP_LO.offset) == t
    gpu.unpause()
    _let_time_pass(1_000_000)
    assert gpu.debug_read(regs.TIMESTAMP_LO.offset) > t
    stepped = SteppedClock()
    stepped.hold(True)
    assert stepped.advance(5) == 5
