"""DOC: the register file and the one table that binds register behaviour.

The register *declarations* (offset, access, reset value, fields) live in
:mod:`gemu.device.abi.regs`. This module stores their values and binds what a read or write
*does*, in one table (:func:`access_table`) in the spirit of QEMU's ``RegisterAccessInfo``:

- ``read``: the register is computed from device state (CP_STATUS, RING_HEAD, TIMESTAMP...);
  the function must be free of side effects, because the debug path uses it too;
- ``pre_write(value) -> value``: adjusts the value before it is stored;
- ``post_write(value)``: acts on the write after it is stored (commands, doorbells);
- ``clears``: for a write-1-to-clear register, the register whose bits it clears;
- ``self_clearing``: bits that act on the write and always read back as 0.

Writes only keep the bits of declared fields (registers without fields keep all 32 bits).
A guest can never crash the device: unaligned or unknown offsets, writes to read-only
registers and reads of write-only ones are logged as guest errors on the logger
``gemu.device.guest_error`` (QEMU's ``LOG_GUEST_ERROR``), reads return 0 and writes are
ignored. The log is rate-limited like the kernel's ``printk_ratelimit``: the first
``GUEST_LOG_BURST`` errors of each kind and offset are logged, later ones are counted and
summed up in one "suppressed" line at most every ``GUEST_LOG_INTERVAL_S``, so a guest looping
over a hole cannot flood the log; ``guest_errors`` (STATS) counts every one::

    rf = RegFile()
    rf.bind(access_table(gpu))
    rf.mmio_write(regs.SCRATCH[0].offset, 7)
    assert rf.mmio_read(regs.SCRATCH[0].offset) == 7
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

from .abi import regs
from .abi.enums import Access
from .abi.regs import AS_COUNT, MMIO_SIZE, REGISTER_MAP, Register, RegisterMap

if TYPE_CHECKING:
    from .gpu import Gpu

guest_error = logging.getLogger("gemu.device.guest_error")
log = logging.getLogger("gemu.device")

_MASK32 = 0xFFFFFFFF
GUEST_LOG_BURST = 5  # guest errors logged per kind and offset before they are only counted
GUEST_LOG_INTERVAL_S = 5.0  # at most one "suppressed" summary line per interval
_CP_ENABLE = regs.CP_CONTROL.field("ENABLE").mask
_CP_SELF_CLEARING = regs.CP_CONTROL.field("RESUME").mask | regs.CP_CONTROL.field("RESET_HEAD").mask
_AS_BOUND = tuple(
    (regs.as_reg(i, "COMMAND"), regs.as_reg(i, "STATUS"), regs.as_reg(i, "TLB_ENTRIES"))
    for i in range(AS_COUNT)
)
"""Each AS's registers with bound behaviour, looked up once per process."""


class RegisterAccessInfo(NamedTuple):
    """The behaviour of one register, after QEMU's ``RegisterAccessInfo``. Immutable; a
    tuple, not a frozen dataclass, because every device built binds some forty of them
    (explore builds one per schedule)."""

    reg: Register
    read: Callable[[], int] | None = None
    pre_write: Callable[[int], int] | None = None
    post_write: Callable[[int], None] | None = None
    clears: Register | None = None
    self_clearing: int = 0


def _write_mask(reg: Register) -> int:
    if not reg.fields:
        return _MASK32
    mask = 0
    for f in reg.fields:
        mask |= f.mask
    return mask


class _MapTables:
    """What every register file of one map shares, made once per map and process: the
    register at each index, the bits a write keeps, which registers a guest may write and
    read, the reset values."""

    def __init__(self, regmap: RegisterMap) -> None:
        n = MMIO_SIZE // 4
        self.regs: list[Register | None] = [None] * n
        self.wmask = [0] * n
        self.writable = [False] * n
        self.readable = [False] * n
        self.reset = [0] * n
        for r in regmap:
            i = r.offset >> 2
            self.regs[i] = r
            self.wmask[i] = _write_mask(r)
            self.writable[i] = r.writable
            self.readable[i] = r.readable
            self.reset[i] = r.reset


_TABLES: dict[int, tuple[RegisterMap, _MapTables]] = {}


def _tables(regmap: RegisterMap) -> _MapTables:
    """The shared tables of ``regmap`` (keyed by identity: the map is kept alive with them)."""
    entry = _TABLES.get(id(regmap))
    if entry is None or entry[0] is not regmap:
        entry = _TABLES[id(regmap)] = (regmap, _MapTables(regmap))
    return entry[1]


class RegFile:
    """Values of every register of a :class:`~gemu.device.abi.regs.RegisterMap`.

    ``values`` is indexed by ``offset // 4``; the device model reads and writes it directly
    through :meth:`get`/:meth:`set` (no hooks, no logging).
    """

    def __init__(self, regmap: RegisterMap = REGISTER_MAP) -> None:
        self.regmap = regmap
        tables = self._tables = _tables(regmap)
        n = MMIO_SIZE // 4
        self.values = list(tables.reset)
        # read-only tables shared by every register file of the map
        self._regs = tables.regs
        self._wmask = tables.wmask
        self._writable = tables.writable
        self._readable = tables.readable
        self._info: list[RegisterAccessInfo | None] = [None] * n
        self.guest_errors = 0
        self.internal_errors = 0
        self._logged: dict[tuple, int] = {}  # guest errors logged per (kind, offset)
        self._suppressed = 0  # not logged since the last summary line
        self._summary_at = 0.0  # monotonic time the next summary may be logged

    def bind(self, table: Iterable[RegisterAccessInfo]) -> None:
        """Install a behaviour table; every entry must name a register of the map."""
        for info in table:
            if self.regmap.by_offset.get(info.reg.offset) is not info.reg:
                raise ValueError(f"{info.reg.name} is not a register of this map")
            idx = info.reg.offset >> 2
            if self._info[idx] is not None:
                raise ValueError(f"{info.reg.name} is bound twice")
            if info.clears is not None and info.reg.access is not Access.W1C:
                raise ValueError(f"{info.reg.name}: only W1C registers clear another register")
            self._info[idx] = info

    def reset(self) -> None:
        """Every register back to its declared reset value (in place: the device model keeps
        references to ``values``)."""
        self.values[:] = self._tables.reset

    def get(self, reg: Register) -> int:
        return self.values[reg.offset >> 2]

    def set(self, reg: Register, value: int) -> None:
        self.values[reg.offset >> 2] = value & _MASK32

    def _guest_error(self, key: tuple, msg: str, *args) -> None:
        """Count a guest error; log it if its ``key`` (kind, offset) is within its burst,
        else leave it to the next summary line (at most one per GUEST_LOG_INTERVAL_S)."""
        self.guest_errors += 1
        seen = self._logged.get(key, 0)
        if seen < GUEST_LOG_BURST:
            self._logged[key] = seen + 1
            guest_error.warning(msg, *args)
            return
        self._suppressed += 1
        now = time.monotonic()
        if now >= self._summary_at:
            self._summary_at = now + GUEST_LOG_INTERVAL_S
            guest_error.warning(
                "%d guest register errors not logged (each kind and offset logs its first %d; "
                "%d in all), the last: " + msg,
                self._suppressed,
                GUEST_LOG_BURST,
                self.guest_errors,
                *args,
            )
            self._suppressed = 0

    def _lookup(self, offset: int, what: str) -> Register | None:
        if not isinstance(offset, int) or offset % 4 or not 0 <= offset < MMIO_SIZE:
            self._guest_error(
                ("bad offset", what),
                "%s at bad offset %r: not an aligned offset below %#x",
                what,
                offset,
                MMIO_SIZE,
            )
            return None
        reg = self._regs[offset >> 2]
        if reg is None:
            self._guest_error((what, offset), "%s at offset %#x: no register there", what, offset)
        return reg

    def mmio_read(self, offset: int) -> int:
        """A guest read: never raises; bad accesses log a guest error and read 0."""
        try:
            idx = offset >> 2 if type(offset) is int and 0 <= offset < MMIO_SIZE else -1
            if idx >= 0 and not offset & 3 and self._readable[idx]:
                info = self._info[idx]  # the common case: a readable register
                if info is not None and info.read is not None:
                    return info.read() & _MASK32
                return self.values[idx]
            reg = self._lookup(offset, "read")
            if reg is None:
                return 0
            if not reg.readable:
                self._guest_error(
                    ("read", offset),
                    "read of %s register %s (%#x) returns 0",
                    reg.access.name,
                    reg.name,
                    offset,
                )
                return 0
            info = self._info[offset >> 2]
            if info is not None and info.read is not None:
                return info.read() & _MASK32
            return self.values[offset >> 2]
        except Exception:
            self.internal_errors += 1
            log.exception("internal error reading register at %#x", offset)
            return 0

    def mmio_write(self, offset: int, value: int) -> None:
        """A guest write: never raises; bad accesses log a guest error and are ignored."""
        try:
            idx = offset >> 2 if type(offset) is int and 0 <= offset < MMIO_SIZE else -1
            if (
                idx >= 0
                and not offset & 3
                and self._writable[idx]
                and type(value) is int
                and 0 <= value <= _MASK32
            ):
                # the common case: a 32-bit value to a writable register
                info = self._info[idx]
                if info is None:
                    self.values[idx] = value & self._wmask[idx]
                    return
                self._write(idx, info, value)
                return
            reg = self._lookup(offset, "write")
            if reg is None:
                return
            if not isinstance(value, int) or not 0 <= value <= _MASK32:
                self._guest_error(
                    ("value", offset), "write of %r to %s is not a 32-bit value", value, reg.name
                )
                if not isinstance(value, int):
                    return
                value &= _MASK32
            if not reg.writable:
                self._guest_error(
                    ("write", offset),
                    "write of %#x to read-only register %s (%#x) ignored",
                    value,
                    reg.name,
                    offset,
                )
                return
            idx = offset >> 2
            info = self._info[idx]
            if info is None:
                self.values[idx] = value & self._wmask[idx]
            else:
                self._write(idx, info, value)
        except Exception:
            self.internal_errors += 1
            log.exception("internal error writing %#x to register at %#x", value, offset)

    def _write(self, idx: int, info: RegisterAccessInfo, value: int) -> None:
        """Store a checked guest write to a register with bound behaviour, and act on it."""
        if info.clears is not None:
            cidx = info.clears.offset >> 2
            self.values[cidx] &= ~(value & self._wmask[idx]) & _MASK32
        else:
            if info.pre_write is not None:
                value = info.pre_write(value) & _MASK32
            self.values[idx] = value & self._wmask[idx] & ~info.self_clearing
        if info.post_write is not None:
            info.post_write(value & self._wmask[idx])

    def debug_read(self, offset: int) -> int:
        """Side-effect-free read for debuggers and dumps: no hooks with effects, no logging.

        Unknown or unaligned offsets read 0; write-only registers read their last written
        value (clear registers read 0).
        """
        if not isinstance(offset, int) or offset % 4 or not 0 <= offset < MMIO_SIZE:
            return 0
        idx = offset >> 2
        if self._regs[idx] is None:
            return 0
        info = self._info[idx]
        if info is not None and info.read is not None:
            try:
                return info.read() & _MASK32
            except Exception:
                log.exception("internal error in debug read at %#x", offset)
                return 0
        return self.values[idx]


def access_table(gpu: Gpu) -> list[RegisterAccessInfo]:
    """THE table binding register behaviour to the device model (one place, no offset chains)."""
    cp, mmu = gpu.cp, gpu.mmu
    R = RegisterAccessInfo
    table = [
        R(regs.MEM_PAGES, read=gpu.mem_pages),
        R(regs.CONTROL, post_write=gpu.control_written, self_clearing=_MASK32),
        R(regs.STATUS, read=gpu.status_value),
        R(regs.IRQ_CLEAR, clears=regs.IRQ_RAWSTAT, post_write=lambda _v: gpu.update_irq()),
        R(regs.IRQ_MASK, post_write=lambda _v: gpu.update_irq()),
        R(regs.TIMESTAMP_LO, read=lambda: gpu.clock.now_ns() & _MASK32),
        R(regs.TIMESTAMP_HI, read=lambda: (gpu.clock.now_ns() >> 32) & _MASK32),
        R(regs.RING_HEAD, read=lambda: cp.head),
        R(regs.RING_DOORBELL, post_write=lambda _v: cp.doorbell()),
        R(
            regs.CP_CONTROL,
            # ENABLE reads back whether the CP is enabled: 0 after a failed enable
            read=lambda: (
                (gpu.regs.get(regs.CP_CONTROL) & ~_CP_ENABLE) | (cp.enabled and _CP_ENABLE)
            ),
            post_write=cp.control_written,
            self_clearing=_CP_SELF_CLEARING,
        ),
        R(regs.CP_STATUS, read=cp.status_value),
        R(regs.CP_PC_LO, read=lambda: cp.pc() & _MASK32),
        R(regs.CP_PC_HI, read=lambda: cp.pc() >> 32),
        R(regs.CP_PACKETS, read=lambda: (cp.packets - cp.packets_at_reset) & _MASK32),
        R(regs.MMU_INT_CLEAR, clears=regs.MMU_INT_RAWSTAT, post_write=mmu.clear_faults),
        R(regs.MMU_INT_MASK, post_write=lambda _v: gpu.update_irq()),
    ]
    for i, (command, status, tlb_entries) in enumerate(_AS_BOUND):
        table += [
            R(command, None, None, partial(mmu.command, i)),
            R(status, partial(mmu.status_value, i)),
            R(tlb_entries, partial(mmu.tlb_entries, i)),
        ]
    return table
