"""An in-process machine in the emulator's non-strict mode, as ``gemu run`` runs it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from gemu.guest import errors
from gemu.host.machine import Machine


@contextlib.contextmanager
def emulator_machine(ram_size: int, swap_size: int) -> Iterator[Machine]:
    """A booted in-process machine with warnings counted rather than raised (the emulator's
    mode); strictness and the warning counts are restored afterwards."""
    strict = errors.is_strict()
    errors.set_strict(False)
    try:
        with Machine(ram_size=ram_size, swap_size=swap_size, device="inproc") as m:
            yield m
    finally:
        errors.set_strict(strict)
        errors.reset_warn_stats()
