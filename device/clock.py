"""DOC: the device clock.

The device reads time only through a clock object, so the same model runs freely or
deterministically:

- :class:`FreeClock` counts monotonic nanoseconds since the last reset (the default);
- :class:`SteppedClock` stands still until :meth:`SteppedClock.advance` moves it, so a run is
  a pure function of the inputs (the guest scheduler steps the device)::

      clock = SteppedClock()
      clock.advance(1_000)
      assert clock.now_ns() == 1_000

TIMESTAMP and WAIT_MEM timeouts are measured on this clock.
"""

from __future__ import annotations

import time


class FreeClock:
    """Monotonic host time in nanoseconds since construction or :meth:`reset`."""

    stepped = False

    def __init__(self) -> None:
        self._t0 = time.monotonic_ns()

    def now_ns(self) -> int:
        return time.monotonic_ns() - self._t0

    def reset(self) -> None:
        self._t0 = time.monotonic_ns()


class SteppedClock:
    """Virtual time that advances only through :meth:`advance`."""

    stepped = True

    def __init__(self) -> None:
        self._now = 0

    def now_ns(self) -> int:
        return self._now

    def advance(self, ns: int) -> int:
        """Move time forward by ``ns`` (>= 0) nanoseconds; return the new time."""
        if ns < 0:
            raise ValueError(f"time only moves forward, not by {ns} ns")
        self._now += ns
        return self._now

    def reset(self) -> None:
        self._now = 0
