"""DOC: the device clock.

The device reads time only through a clock object, so the same model runs freely or
deterministically:

- :class:`FreeClock` counts monotonic nanoseconds since the last reset (the default);
- :class:`SteppedClock` stands still until :meth:`SteppedClock.advance` moves it, so a run is
  a pure function of the inputs (the guest scheduler steps the device)::

      clock = SteppedClock()
      clock.advance(1_000)
      assert clock.now_ns() == 1_000

TIMESTAMP and WAIT_MEM timeouts are measured on this clock. It stops while the command
processor is held (:meth:`FreeClock.hold`: a debugger or the machine's ``stop`` holds it), so
time spent looking at a stopped GPU counts against neither a WAIT_MEM's timeout nor the guest
driver's job timeout, which compares TIMESTAMP with its own clock::

    clock = FreeClock()
    clock.hold(True)       # gdb stops the CP: now_ns() stands still
    clock.hold(False)      # gdb continues: time runs on from where it stood
"""

from __future__ import annotations

import time


class FreeClock:
    """Monotonic host time in nanoseconds since construction or :meth:`reset`."""

    stepped = False

    def __init__(self) -> None:
        self._t0 = time.monotonic_ns()
        self._held_at: int | None = None  # host time the hold began (None: running)

    def now_ns(self) -> int:
        held_at = self._held_at
        return (time.monotonic_ns() if held_at is None else held_at) - self._t0

    def hold(self, held: bool) -> None:
        """Stop (True) or restart (False) the clock; time held is never counted."""
        if held and self._held_at is None:
            self._held_at = time.monotonic_ns()
        elif not held and self._held_at is not None:
            self._t0 += time.monotonic_ns() - self._held_at
            self._held_at = None

    def reset(self) -> None:
        self._t0 = time.monotonic_ns()
        if self._held_at is not None:  # the hold survives a reset, as the CP's does
            self._held_at = self._t0


class SteppedClock:
    """Virtual time that advances only through :meth:`advance`."""

    stepped = True

    def __init__(self) -> None:
        self._now = 0

    def now_ns(self) -> int:
        return self._now

    def hold(self, held: bool) -> None:
        """Nothing to do: virtual time moves only when the guest steps the device."""

    def advance(self, ns: int) -> int:
        """Move time forward by ``ns`` (>= 0) nanoseconds; return the new time."""
        if ns < 0:
            raise ValueError(f"time only moves forward, not by {ns} ns")
        self._now += ns
        return self._now

    def reset(self) -> None:
        self._now = 0
