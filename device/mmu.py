"""DOC: the GPU MMU: address spaces, page-table walks, TLBs and faults.

There are ``AS_COUNT`` address spaces (AS), each programmed through its register block
(``regs.AS_TEMPLATE``) after Panfrost's. TRANSTAB and TRANSCFG take effect only when the driver
issues ``AS_COMMAND = UPDATE``, which latches them and empties the AS's TLB. A GPU access walks
the 4-level table described in :mod:`gemu.device.abi.pte`.

**TLB.** Each AS caches, per 4 KiB page, the leaf entry found by a successful walk (the
physical page and its R/W/X permissions; a valid leaf is cached even when the access then
fails its permission check). Translations are served from the TLB *without re-reading the page
tables* until the entry is invalidated, so a driver that rewrites a PTE and forgets to flush
keeps seeing the old page. Invalid entries are never cached. Invalidation:

- ``UPDATE``: the whole TLB of the AS;
- ``LOCK`` records the region in LOCKADDR (size ``2 ** (SIZE + 1)`` bytes, at least 4 KiB,
  base aligned down to the size); ``FLUSH_PT``/``FLUSH_MEM`` drop the locked region (the whole
  AS if nothing is locked) and unlock; ``UNLOCK`` unlocks without dropping anything;
- the ``TLB_INVALIDATE`` packet: a VA range, or everything when its size is 0.

Each AS holds at most ``tlb_capacity`` entries; when a fill goes over, the oldest entries are
dropped first (FIFO in fill order; a hit does not refresh an entry), at least
``tlb_capacity // 16`` of them at a time.

**Faults.** A failing GPU access raises :class:`TranslationFault`; the command processor
latches it with :meth:`Mmu.latch_fault` (FAULTSTATUS = EXCEPTION_TYPE | ACCESS_TYPE << 8 |
SOURCE << 16, FAULTADDRESS = the first faulting byte) and sets MMU_INT_RAWSTAT bit *n* (bit
*n* + 16 for TRANSTAB_BUS and BUS faults). While an AS has a latched fault, later faults in that
AS are counted but not latched: the first one is kept until MMU_INT_CLEAR clears its bit.
Checks happen in this order: AS_DISABLED, ADDRESS_SIZE, then page by page in address order:
TRANSLATION_Ln / TRANSTAB_BUS (walk), PERMISSION, BUS.

**Debug access** (:meth:`Mmu.debug_extents`, :meth:`Mmu.walk`, :meth:`Mmu.mappings`) never
fills the TLB, never counts, never latches a fault. Debug translation uses an entry already in
the TLB when there is one (so a debugger sees what the GPU would access, stale entries
included) and otherwise walks the tables in memory; :meth:`Mmu.walk` and :meth:`Mmu.mappings`
always show the tables as they are in memory. Every debug walk is bounded whatever the guest
wrote: a translation or :meth:`Mmu.walk` reads one entry per level (four at most), so
:meth:`Mmu.debug_extents` costs four reads per page of the range its caller asks for (at most
1 MiB from the protocol, one gdb packet from the stub);
:meth:`Mmu.mappings_report` reads each table once (a table reached again through a cycle or an
alias is reported, not followed), at most ``WALK_MAX_TABLES`` (4096) tables, follows at most
``WALK_MAX_ENTRIES`` (65536) table entries, and reports at most ``WALK_MAX_RUNS`` (65536)
ranges.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING

from .abi import pte, regs
from .abi.enums import AccessType, MmuCommand, MmuFault, TransCfgMode
from .abi.regs import AS_COUNT, PAGE_SHIFT, PAGE_SIZE, VA_BITS
from .memory import BusError

if TYPE_CHECKING:
    from .gpu import Gpu

VA_LIMIT = 1 << VA_BITS
_PAGE_MASK = PAGE_SIZE - 1
_RUNS_MAX = 4096  # contiguous ranges remembered per AS (a guest cannot grow it further)
_ADDR = pte.ADDR_MASK
_KIND = pte.VALID | pte.TYPE_MASK  # VALID and TYPE: the bits that make an entry a table/page
_TABLE = pte.TABLE_BITS
_PAGE = pte.PAGE_BITS
_TRANSLATION = (
    MmuFault.TRANSLATION_L0,
    MmuFault.TRANSLATION_L1,
    MmuFault.TRANSLATION_L2,
    MmuFault.TRANSLATION_L3,
)
NEED = {
    AccessType.READ: pte.READ,
    AccessType.WRITE: pte.WRITE,
    AccessType.ATOMIC: pte.READ | pte.WRITE,
    AccessType.EXECUTE: pte.EXEC,
}
_LEVEL_SHIFTS = tuple(pte.BITS_PER_LEVEL * (pte.LEVELS - 1 - lvl) for lvl in range(pte.LEVELS))
_TABLE_ENTRIES = struct.Struct(f"<{pte.ENTRIES_PER_TABLE}Q")
_LOCK_SIZE = regs.AS_TEMPLATE[3].fields[0]  # LOCKADDR_LO.SIZE
_LOCK_MIN_LOG2 = PAGE_SHIFT
_MMU_COMMANDS = {int(c): c for c in MmuCommand}  # MmuCommand(v) without the enum call


WALK_MAX_TABLES = 4096  # page tables one debug walk of an AS reads at most
WALK_MAX_RUNS = 65536  # mapped ranges it reports at most
WALK_MAX_ALIASES = 64  # revisited tables it lists (all are counted)
WALK_MAX_ENTRIES = 65536  # table entries it follows at most (revisits included)


@dataclass
class Mappings:
    """What a bounded walk of an AS found (:meth:`Mmu.mappings_report`)."""

    runs: list[tuple[int, int, int, str]]  # (va, pa, size, perms), coalesced, in VA order
    aliases: list[tuple[int, int, int]]  # (level, table_pa, va): a table reached again
    aliases_total: int  # every revisit, listed or not
    truncated: str | None  # why the walk stopped before the end, or None


class TranslationFault(Exception):
    """A GPU access failed translation: ``code`` at GPU VA ``va``."""

    def __init__(self, code: MmuFault, va: int) -> None:
        super().__init__(f"{code.name} at {va:#x}")
        self.code = code
        self.va = va


class MemFault(Exception):
    """A debug memory access failed; ``code`` is the MMU fault, or None for a non-MMU reason."""

    def __init__(self, code: MmuFault | None, addr: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.addr = addr
        self.msg = msg


def perms_str(entry: int) -> str:
    """``"rwx"`` with ``-`` for a missing permission."""
    return "".join(
        c if entry & bit else "-" for c, bit in (("r", pte.READ), ("w", pte.WRITE), ("x", pte.EXEC))
    )


class AddressSpace:
    """Latched configuration and TLB of one AS."""

    __slots__ = ("fault", "index", "lock", "mode", "runs", "tlb", "transtab")

    def __init__(self, index: int) -> None:
        self.index = index
        self.transtab = 0
        self.mode = TransCfgMode.DISABLED
        self.tlb: dict[int, int] = {}  # VA page number -> leaf entry, oldest first
        # (first VA page, pages) -> leaf entry of the first page, for ranges whose TLB entries
        # form one physically contiguous run with the same permission bits; dropped whenever
        # an entry leaves the TLB, so it never answers what the TLB would not
        self.runs: dict[tuple[int, int], int] = {}
        self.lock: tuple[int, int] | None = None  # locked page numbers [lo, hi)
        self.fault: MmuFault | None = None  # the latched fault, if any


class Mmu:
    """The address spaces of one GPU. ``gpu`` provides ``mem``, ``regs`` and ``update_irq``."""

    def __init__(self, gpu: Gpu, tlb_capacity: int = 65536) -> None:
        if tlb_capacity < 1:
            raise ValueError(f"TLB capacity must be >= 1, not {tlb_capacity}")
        self.gpu = gpu
        self.capacity = tlb_capacity
        self.spaces = [AddressSpace(i) for i in range(AS_COUNT)]
        self.hits = self.misses = self.flushes = self.faults = 0

    def reset(self) -> None:
        """Latched state back to DISABLED, TLBs empty, no lock, no fault (counters are kept)."""
        self.spaces = [AddressSpace(i) for i in range(AS_COUNT)]

    # --- register behaviour --------------------------------------------------------------

    def command(self, as_index: int, value: int) -> None:
        """AS_COMMAND written: run the command synchronously (STATUS.ACTIVE stays 0)."""
        space = self.spaces[as_index]
        rf = self.gpu.regs
        cmd = _MMU_COMMANDS.get(value & 0xFF)
        if cmd is None:
            self.gpu.guest_error(f"AS{as_index}_COMMAND: unknown command {value:#x} ignored")
            return
        if cmd is MmuCommand.UPDATE:
            lo = rf.get(regs.as_reg(as_index, "TRANSTAB_LO"))
            hi = rf.get(regs.as_reg(as_index, "TRANSTAB_HI"))
            space.transtab = ((hi << 32) | lo) & _ADDR
            mode = rf.get(regs.as_reg(as_index, "TRANSCFG")) & 0xF
            if mode not in TransCfgMode._value2member_map_:
                self.gpu.guest_error(
                    f"AS{as_index}_TRANSCFG.MODE {mode} is not a mode; the AS is disabled"
                )
                mode = TransCfgMode.DISABLED
            space.mode = TransCfgMode(mode)
            self._flush(space)
        elif cmd is MmuCommand.LOCK:
            space.lock = self._lock_region(as_index)
        elif cmd is MmuCommand.UNLOCK:
            space.lock = None
        elif cmd in (MmuCommand.FLUSH_PT, MmuCommand.FLUSH_MEM):
            if space.lock is None:
                self._flush(space)
            else:
                self._flush(space, *space.lock)
            space.lock = None

    def _lock_region(self, as_index: int) -> tuple[int, int]:
        rf = self.gpu.regs
        lo = rf.get(regs.as_reg(as_index, "LOCKADDR_LO"))
        hi = rf.get(regs.as_reg(as_index, "LOCKADDR_HI"))
        log2 = _LOCK_SIZE.ex(lo) + 1
        if log2 < _LOCK_MIN_LOG2:
            self.gpu.guest_error(
                f"AS{as_index}_LOCKADDR.SIZE {log2 - 1} is below the 4 KiB minimum; locking 4 KiB"
            )
            log2 = _LOCK_MIN_LOG2
        log2 = min(log2, VA_BITS)
        base = ((hi << 32) | (lo & ~_PAGE_MASK & 0xFFFFFFFF)) & ~((1 << log2) - 1)
        return base >> PAGE_SHIFT, (base + (1 << log2)) >> PAGE_SHIFT

    def status_value(self, as_index: int) -> int:
        space = self.spaces[as_index]
        return (int(space.lock is not None) << 1) | (int(space.fault is not None) << 2)

    def tlb_entries(self, as_index: int) -> int:
        return len(self.spaces[as_index].tlb)

    def clear_faults(self, bits: int) -> None:
        """MMU_INT_CLEAR written (the RAWSTAT bits are already clear): forget latched faults."""
        rf = self.gpu.regs
        for space in self.spaces:
            if space.fault is None:
                continue
            bit = space.index + (16 if space.fault.is_bus_fault else 0)
            if bits >> bit & 1:
                space.fault = None
                for name in ("FAULTSTATUS", "FAULTADDRESS_LO", "FAULTADDRESS_HI"):
                    rf.set(regs.as_reg(space.index, name), 0)
        self.gpu.update_irq()

    def latch_fault(
        self, as_index: int, code: MmuFault, va: int, access: AccessType, source: int
    ) -> None:
        """Record a GPU access fault in the AS (the first one is kept) and raise the MMU IRQ."""
        self.faults += 1
        space = self.spaces[as_index]
        if space.fault is not None:
            return
        space.fault = code
        rf = self.gpu.regs
        rf.set(
            regs.as_reg(as_index, "FAULTSTATUS"),
            int(code) | (int(access) << 8) | ((source & 0xFFFF) << 16),
        )
        rf.set(regs.as_reg(as_index, "FAULTADDRESS_LO"), va & 0xFFFFFFFF)
        rf.set(regs.as_reg(as_index, "FAULTADDRESS_HI"), (va >> 32) & 0xFFFFFFFF)
        bit = as_index + (16 if code.is_bus_fault else 0)
        rf.set(regs.MMU_INT_RAWSTAT, rf.get(regs.MMU_INT_RAWSTAT) | (1 << bit))
        self.gpu.update_irq()

    # --- invalidation --------------------------------------------------------------------

    def invalidate(self, as_index: int, va: int = 0, size: int = 0) -> int:
        """Drop cached translations of ``[va, va + size)``; ``size == 0`` drops all.

        Returns the work done (entries looked at), which the command processor budgets."""
        space = self.spaces[as_index]
        if size <= 0:
            return self._flush(space)
        return self._flush(space, va >> PAGE_SHIFT, ((va + size - 1) >> PAGE_SHIFT) + 1)

    def _flush(self, space: AddressSpace, lo: int | None = None, hi: int | None = None) -> int:
        self.flushes += 1
        tlb = space.tlb
        space.runs.clear()
        if lo is None or hi is None:
            tlb.clear()
            return 1
        if hi - lo <= len(tlb):
            for vpn in range(lo, hi):
                tlb.pop(vpn, None)
            return hi - lo
        for vpn in [k for k in tlb if lo <= k < hi]:
            del tlb[vpn]
        return len(tlb)

    def _evict(self, space: AddressSpace) -> None:
        """Drop the oldest entries once over capacity, at least 1/16 of it at a time (a dict
        keeps fill order; evicting in batches keeps the scan past deleted slots cheap)."""
        tlb = space.tlb
        excess = len(tlb) - self.capacity
        if excess > 0:
            space.runs.clear()
            for vpn in list(islice(tlb, max(excess, self.capacity >> 4))):
                del tlb[vpn]

    # --- walking -------------------------------------------------------------------------

    def _walk_to_l3(self, space: AddressSpace, vpn: int, fault_va: int) -> int:
        """The level-3 table address for page ``vpn`` (walks levels 0-2)."""
        mem = self.gpu.mem
        table = space.transtab
        for level in range(3):
            try:
                entry = mem.read_u64(table + ((vpn >> _LEVEL_SHIFTS[level]) & 511) * 8)
            except BusError:
                raise TranslationFault(MmuFault.TRANSTAB_BUS, fault_va) from None
            if entry & _KIND != _TABLE:
                raise TranslationFault(_TRANSLATION[level], fault_va)
            table = entry & _ADDR
        return table

    def _walk(self, space: AddressSpace, vpn: int, fault_va: int) -> int:
        """The leaf entry of page ``vpn`` from the tables in memory (no TLB, no counters)."""
        table = self._walk_to_l3(space, vpn, fault_va)
        try:
            entry = self.gpu.mem.read_u64(table + (vpn & 511) * 8)
        except BusError:
            raise TranslationFault(MmuFault.TRANSTAB_BUS, fault_va) from None
        if entry & _KIND != _PAGE:
            raise TranslationFault(MmuFault.TRANSLATION_L3, fault_va)
        return entry

    def _fill(self, space: AddressSpace, vpn0: int, vals: list) -> tuple[int, MmuFault] | None:
        """Walk the pages whose ``vals`` slot is None, in order, filling the TLB and ``vals``.

        Runs of missing pages inside one level-3 table are read with one memory access.
        Returns ``(index, fault)`` for the first page that fails its walk, else None.
        """
        tlb = space.tlb
        mem = self.gpu.mem
        n = len(vals)
        i = 0
        try:
            while i < n:
                vpn = vpn0 + i
                idx3 = vpn & 511
                k = min(512 - idx3, n - i)
                chunk = vals[i : i + k]
                if None not in chunk:
                    i += k
                    continue
                if k > 1 and chunk.count(None) == k:
                    try:
                        l3 = self._walk_to_l3(space, vpn, vpn << PAGE_SHIFT)
                    except TranslationFault as f:
                        return i, f.code
                    try:
                        data = mem.read(l3 + idx3 * 8, 8 * k)
                    except BusError:
                        return i, MmuFault.TRANSTAB_BUS
                    entries = struct.unpack(f"<{k}Q", data)
                    if all(b & _KIND == _PAGE for b in set(data[0::8])):
                        vals[i : i + k] = entries
                        tlb.update(zip(range(vpn, vpn + k), entries))
                        i += k
                        continue
                    for j, entry in enumerate(entries):
                        if entry & _KIND != _PAGE:
                            return i + j, MmuFault.TRANSLATION_L3
                        vals[i + j] = entry
                        tlb[vpn + j] = entry
                    raise AssertionError("unreachable: a bad entry was found above")
                for j in range(i, i + k):
                    if vals[j] is None:
                        try:
                            entry = self._walk(space, vpn0 + j, (vpn0 + j) << PAGE_SHIFT)
                        except TranslationFault as f:
                            return j, f.code
                        vals[j] = tlb[vpn0 + j] = entry
                i += k
            return None
        finally:
            self._evict(space)

    def translate_range(
        self, as_index: int, va: int, size: int, access: AccessType
    ) -> list[tuple[int, int]]:
        """Physical extents ``[(pa, n), ...]`` (coalesced) for a GPU access to ``[va, va+size)``.

        Fills the TLB and counts hits/misses; raises :class:`TranslationFault` for the first
        faulting byte. Nothing is latched here: the caller knows the packet that faulted.
        """
        space = self.spaces[as_index]
        if space.mode is not TransCfgMode.PT_4LEVEL:
            raise TranslationFault(MmuFault.AS_DISABLED, va)
        end = va + size
        if end > VA_LIMIT:
            raise TranslationFault(MmuFault.ADDRESS_SIZE, max(va, VA_LIMIT))
        if size <= 0:
            return []
        need = NEED[access]
        tlb = space.tlb
        memsize = self.gpu.mem.size
        vpn0 = va >> PAGE_SHIFT
        n = ((end - 1) >> PAGE_SHIFT) - vpn0 + 1
        if n == 1:
            entry = tlb.get(vpn0)
            if entry is None:
                self.misses += 1
                entry = self._walk(space, vpn0, va)
                tlb[vpn0] = entry
                if len(tlb) > self.capacity:
                    self._evict(space)
            else:
                self.hits += 1
            if entry & need != need:
                raise TranslationFault(MmuFault.PERMISSION, va)
            pa = (entry & _ADDR) | (va & _PAGE_MASK)
            if pa + size > memsize:
                raise TranslationFault(MmuFault.BUS, va + max(0, memsize - pa))
            return [(pa, size)]

        runs = space.runs
        first = runs.get((vpn0, n))
        if first is not None:
            # the same pages as a translation that found one contiguous run, none evicted or
            # flushed since: the TLB would answer the same, page by page
            self.hits += n
            if first & need != need:
                raise TranslationFault(MmuFault.PERMISSION, va)
            pa = (first & _ADDR) | (va & _PAGE_MASK)
            if pa + size > memsize:
                raise TranslationFault(MmuFault.BUS, va + max(0, memsize - pa))
            return [(pa, size)]
        vals = list(map(tlb.get, range(vpn0, vpn0 + n))) if tlb else [None] * n
        missing = vals.count(None)
        self.hits += n - missing
        self.misses += missing
        walk_fault = self._fill(space, vpn0, vals) if missing else None
        if walk_fault is None:
            first = vals[0]
            if vals == list(range(first, first + (n << PAGE_SHIFT), PAGE_SIZE)):
                # One physically contiguous run with identical permission bits.
                if not missing:  # every page was in the TLB before this call
                    if len(runs) >= _RUNS_MAX:
                        runs.clear()
                    runs[vpn0, n] = first
                if first & need != need:
                    raise TranslationFault(MmuFault.PERMISSION, va)
                pa = (first & _ADDR) | (va & _PAGE_MASK)
                if pa + size > memsize:
                    raise TranslationFault(MmuFault.BUS, va + max(0, memsize - pa))
                return [(pa, size)]
            limit = n
        else:
            limit = walk_fault[0]
        extents: list = []
        pos = va
        off = va & _PAGE_MASK
        for entry in vals[:limit]:
            if entry & need != need:
                raise TranslationFault(MmuFault.PERMISSION, pos)
            pa = (entry & _ADDR) + off
            chunk = min(PAGE_SIZE - off, end - pos)
            if pa + chunk > memsize:
                raise TranslationFault(MmuFault.BUS, pos + max(0, memsize - pa))
            if extents and extents[-1][0] + extents[-1][1] == pa:
                extents[-1][1] += chunk
            else:
                extents.append([pa, chunk])
            pos += chunk
            off = 0
        if walk_fault is not None:
            raise TranslationFault(walk_fault[1], pos)
        return [(pa, k) for pa, k in extents]

    # --- debug access (no TLB fill, no counters, no latching) ----------------------------

    def _debug_space(self, as_index: int, addr: int) -> AddressSpace:
        if not isinstance(as_index, int) or not 0 <= as_index < AS_COUNT:
            raise MemFault(None, addr, f"no address space {as_index!r} (0..{AS_COUNT - 1})")
        if self.gpu.mem is None:
            raise MemFault(None, addr, "no guest memory attached")
        return self.spaces[as_index]

    def debug_extents(
        self, as_index: int, va: int, size: int, access: AccessType | None
    ) -> list[tuple[int, int]]:
        """Like :meth:`translate_range` for a debugger: raises :class:`MemFault`, no effects.

        ``access`` None skips the permission check (pages must still be mapped)."""
        space = self._debug_space(as_index, va)
        if space.mode is not TransCfgMode.PT_4LEVEL:
            raise MemFault(MmuFault.AS_DISABLED, va, f"AS{as_index} is disabled")
        if va < 0 or va + size > VA_LIMIT:
            raise MemFault(
                MmuFault.ADDRESS_SIZE, max(va, VA_LIMIT), f"{va:#x}+{size:#x} exceeds 48 bits"
            )
        need = 0 if access is None else NEED[access]
        memsize = self.gpu.mem.size
        out: list[tuple[int, int]] = []
        pos, end = va, va + size
        while pos < end:
            vpn = pos >> PAGE_SHIFT
            entry = space.tlb.get(vpn)
            if entry is None:
                try:
                    entry = self._walk(space, vpn, pos)
                except TranslationFault as f:
                    raise MemFault(
                        f.code, pos, f"AS{as_index}: {f.code.name} at {pos:#x}"
                    ) from None
            if entry & need != need:
                raise MemFault(
                    MmuFault.PERMISSION,
                    pos,
                    f"AS{as_index}: {pos:#x} is {perms_str(entry)}, {access.name} not allowed",  # type: ignore[union-attr]
                )
            off = pos & _PAGE_MASK
            chunk = min(PAGE_SIZE - off, end - pos)
            pa = (entry & _ADDR) + off
            if pa + chunk > memsize:
                raise MemFault(
                    MmuFault.BUS,
                    pos,
                    f"AS{as_index}: {pos:#x} maps to {pa:#x}, outside guest memory",
                )
            if out and out[-1][0] + out[-1][1] == pa:
                out[-1] = (out[-1][0], out[-1][1] + chunk)
            else:
                out.append((pa, chunk))
            pos += chunk
        return out

    def walk(self, as_index: int, va: int) -> list[tuple[int, int, int, int]]:
        """The walk for ``va`` as ``(level, table_pa, index, entry)`` rows, from the tables in
        memory; it ends at the leaf, at the first entry that is not a table, or where a table
        cannot be read (a disabled AS gives no rows)."""
        space = self._debug_space(as_index, va)
        rows: list[tuple[int, int, int, int]] = []
        if space.mode is not TransCfgMode.PT_4LEVEL or not 0 <= va < VA_LIMIT:
            return rows
        table = space.transtab
        for level in range(pte.LEVELS):
            idx = pte.index(va, level)
            try:
                entry = self.gpu.mem.read_u64(table + idx * 8)
            except BusError:
                return rows
            rows.append((level, table, idx, entry))
            if level == pte.LEVELS - 1 or entry & _KIND != _TABLE:
                return rows
            table = entry & _ADDR
        return rows

    def mappings(self, as_index: int) -> list[tuple[int, int, int, str]]:
        """Every valid page of the AS as coalesced ``(va, pa, size, perms)`` runs, from memory
        (bounded: see :meth:`mappings_report`)."""
        return self.mappings_report(as_index).runs

    def mappings_report(self, as_index: int) -> Mappings:
        """The mapped runs of the AS from the tables in memory, walked within bounds.

        Each table is read once: an entry leading to a table already visited (a cycle, or two
        entries sharing a table) is not followed but recorded in ``aliases`` as ``(level,
        table_pa, va)``. The walk reads at most :data:`WALK_MAX_TABLES` tables, follows at most
        :data:`WALK_MAX_ENTRIES` table entries and keeps at most :data:`WALK_MAX_RUNS` runs;
        ``truncated`` says why it stopped early, if it did.
        """
        space = self._debug_space(as_index, 0)
        report = Mappings([], [], 0, None)
        if space.mode is not TransCfgMode.PT_4LEVEL:
            return report
        mem = self.gpu.mem
        runs = report.runs
        seen: set[int] = set()
        followed = 0
        # depth-first, in VA order: (table, level, va_base) still to read
        todo: list[tuple[int, int, int]] = [(space.transtab, 0, 0)]
        while todo:
            table, level, va_base = todo.pop()
            if table in seen:
                report.aliases_total += 1
                if len(report.aliases) < WALK_MAX_ALIASES:
                    report.aliases.append((level, table, va_base))
                continue
            if len(seen) >= WALK_MAX_TABLES:
                report.truncated = f"stopped after {WALK_MAX_TABLES} page tables"
                break
            seen.add(table)
            try:
                entries = _TABLE_ENTRIES.unpack(mem.read(table, PAGE_SIZE))
            except BusError:
                continue
            shift = PAGE_SHIFT + _LEVEL_SHIFTS[level]
            if level < 3:
                below = [
                    (entry & _ADDR, level + 1, va_base | (idx << shift))
                    for idx, entry in enumerate(entries)
                    if entry & _KIND == _TABLE
                ]
                followed += len(below)
                if followed > WALK_MAX_ENTRIES:
                    report.truncated = f"stopped after {WALK_MAX_ENTRIES} table entries"
                    break
                todo.extend(reversed(below))
                continue
            for idx, entry in enumerate(entries):
                if entry & _KIND != _PAGE:
                    continue
                va = va_base | (idx << shift)
                pa = entry & _ADDR
                perms = perms_str(entry)
                last = runs[-1] if runs else None
                if (
                    last is not None
                    and last[0] + last[2] == va
                    and last[1] + last[2] == pa
                    and last[3] == perms
                ):
                    runs[-1] = (last[0], last[1], last[2] + PAGE_SIZE, perms)
                elif len(runs) >= WALK_MAX_RUNS:
                    report.truncated = f"stopped after {WALK_MAX_RUNS} mapped ranges"
                    return report
                else:
                    runs.append((va, pa, PAGE_SIZE, perms))
        return report
