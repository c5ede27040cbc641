"""DOC: guest memory as the device reaches it.

The device sees guest RAM as one flat range of physical addresses ``[0, size)``. Two backends
give the same interface:

- :class:`MappedMemory` wraps a writable buffer: a ``bytearray`` in tests, or the machine's
  memfd mapped ``MAP_SHARED`` (:meth:`MappedMemory.from_fd`), so device DMA is a plain memory
  access with no message. Only a memfd sealed against shrinking (``F_SEAL_SHRINK``) of exactly
  the announced size is mapped: a page of a shared mapping that the file no longer covers
  raises SIGBUS on access, so a file the client could truncate (an unsealed memfd, a regular
  file) would let it kill the device; ``/dev/zero`` and other special files are refused too;
- :class:`InBandMemory` forwards every access to two callables that the protocol server
  provides (they issue DMA_READ/DMA_WRITE messages), split into chunks of at most
  ``protocol.MAX_DMA`` bytes.

Any access that does not lie entirely inside ``[0, size)`` raises :class:`BusError`; the
command processor turns it into a CP error or an MMU bus fault, never an ``IndexError``::

    mem = MappedMemory(bytearray(1 << 20))
    mem.write_u32(0x1000, 0xCAFE)
    assert mem.read(0x1000, 4) == b"\\xfe\\xca\\0\\0"
    mem.view(0x1000, 4)[0] = 0xFF      # zero-copy when mapped
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from collections.abc import Callable

from .abi.protocol import MAX_DMA

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class BusError(Exception):
    """An access to ``[pa, pa + n)`` does not lie inside guest memory."""

    def __init__(self, pa: int, n: int, msg: str = "") -> None:
        super().__init__(msg or f"bus error: {n} bytes at {pa:#x} outside guest memory")
        self.pa = pa
        self.n = n


class GuestMemory:
    """Guest-physical memory ``[0, size)``. Subclasses implement :meth:`read` and :meth:`write`."""

    size: int

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"memory size must be >= 0, not {size}")
        self.size = size

    def check(self, pa: int, n: int) -> None:
        """Raise :class:`BusError` unless ``[pa, pa + n)`` lies inside guest memory."""
        if pa < 0 or n < 0 or pa + n > self.size:
            raise BusError(pa, n)

    def read(self, pa: int, n: int) -> bytes:
        raise NotImplementedError

    def write(self, pa: int, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError

    def view(self, pa: int, n: int) -> memoryview | None:
        """A zero-copy view of ``[pa, pa + n)`` when memory is mapped, else None."""
        self.check(pa, n)
        return None

    def read_u32(self, pa: int) -> int:
        return _U32.unpack(self.read(pa, 4))[0]

    def write_u32(self, pa: int, value: int) -> None:
        self.write(pa, _U32.pack(value & 0xFFFFFFFF))

    def read_u64(self, pa: int) -> int:
        return _U64.unpack(self.read(pa, 8))[0]

    def write_u64(self, pa: int, value: int) -> None:
        self.write(pa, _U64.pack(value & 0xFFFFFFFFFFFFFFFF))

    def copy(self, src_pa: int, dst_pa: int, n: int) -> None:
        """Copy ``n`` bytes inside guest memory (overlapping ranges behave like memmove)."""
        self.check(src_pa, n)
        self.check(dst_pa, n)
        offsets = range(0, n, MAX_DMA)
        if src_pa < dst_pa < src_pa + n:
            offsets = reversed(offsets)  # overlapping forward copy: move the tail first
        for off in offsets:
            chunk = min(MAX_DMA, n - off)
            self.write(dst_pa + off, self.read(src_pa + off, chunk))

    def close(self) -> None:
        """Release the backing resources; the object must not be used afterwards."""


class MappedMemory(GuestMemory):
    """Guest memory over a writable buffer; every access is a slice of one memoryview."""

    def __init__(self, buffer, *, _owned: mmap.mmap | None = None) -> None:
        mv = memoryview(buffer)
        if mv.readonly:
            mv.release()
            raise ValueError("guest memory must be a writable buffer")
        mv = mv.cast("B")
        super().__init__(mv.nbytes)
        self._mv: memoryview | None = mv
        self._owned = _owned

    @classmethod
    def from_fd(cls, fd: int, size: int) -> MappedMemory:
        """Map ``size`` bytes of the machine's memfd ``MAP_SHARED``; ValueError unless
        :func:`check_sealed_memfd` accepts it."""
        check_sealed_memfd(fd, size)
        m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        return cls(m, _owned=m)

    @property
    def mv(self) -> memoryview:
        """The whole of guest memory as one memoryview (the CP's hot path uses it directly)."""
        if self._mv is None:
            raise ValueError("guest memory is closed")
        return self._mv

    def read(self, pa: int, n: int) -> bytes:
        if pa < 0 or n < 0 or pa + n > self.size:
            raise BusError(pa, n)
        return self.mv[pa : pa + n].tobytes()

    def write(self, pa: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        if pa < 0 or pa + n > self.size:
            raise BusError(pa, n)
        self.mv[pa : pa + n] = data

    def view(self, pa: int, n: int) -> memoryview:
        if pa < 0 or n < 0 or pa + n > self.size:
            raise BusError(pa, n)
        return self.mv[pa : pa + n]

    def read_u32(self, pa: int) -> int:
        if pa < 0 or pa + 4 > self.size:
            raise BusError(pa, 4)
        return _U32.unpack_from(self.mv, pa)[0]

    def write_u32(self, pa: int, value: int) -> None:
        if pa < 0 or pa + 4 > self.size:
            raise BusError(pa, 4)
        _U32.pack_into(self.mv, pa, value & 0xFFFFFFFF)

    def read_u64(self, pa: int) -> int:
        if pa < 0 or pa + 8 > self.size:
            raise BusError(pa, 8)
        return _U64.unpack_from(self.mv, pa)[0]

    def write_u64(self, pa: int, value: int) -> None:
        if pa < 0 or pa + 8 > self.size:
            raise BusError(pa, 8)
        _U64.pack_into(self.mv, pa, value & 0xFFFFFFFFFFFFFFFF)

    def copy(self, src_pa: int, dst_pa: int, n: int) -> None:
        self.check(src_pa, n)
        self.check(dst_pa, n)
        mv = self.mv
        mv[dst_pa : dst_pa + n] = mv[src_pa : src_pa + n]

    def close(self) -> None:
        if self._mv is not None:
            self._mv.release()
            self._mv = None
        if self._owned is not None:
            self._owned.close()
            self._owned = None


def check_sealed_memfd(fd: int, size: int) -> None:
    """ValueError naming what is wrong unless ``fd`` is a memfd (or another sealable shmem
    file) that can never shrink below ``size`` bytes: ``F_GET_SEALS`` works on it, its seals
    include ``F_SEAL_SHRINK`` and it holds exactly ``size`` bytes. Seals cannot be removed, so
    what is checked here holds for as long as the mapping lives."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        raise ValueError(
            f"the descriptor is not a memfd (F_GET_SEALS: {exc.strerror}); guest memory must be "
            "a memfd sealed with F_SEAL_SHRINK"
        ) from None
    if not seals & fcntl.F_SEAL_SHRINK:
        raise ValueError(
            "the memfd is not sealed with F_SEAL_SHRINK (seals "
            f"{seals:#x}), so it could be truncated under the device; create it with "
            "MFD_ALLOW_SEALING and add F_SEAL_SHRINK (fcntl F_ADD_SEALS) before MEM_MAP"
        )
    held = os.fstat(fd).st_size
    if held != size:
        raise ValueError(f"the memfd holds {held:#x} bytes, but MEM_MAP announces {size:#x}")


class InBandMemory(GuestMemory):
    """Guest memory reached through messages: ``read_fn(pa, n) -> bytes``, ``write_fn(pa, data)``.

    Requests are split into chunks of at most ``protocol.MAX_DMA`` bytes. A ``read_fn`` that
    returns the wrong number of bytes is a broken peer: :class:`BusError` is raised.
    """

    def __init__(
        self,
        size: int,
        read_fn: Callable[[int, int], bytes],
        write_fn: Callable[[int, bytes], None],
    ) -> None:
        super().__init__(size)
        self._read_fn = read_fn
        self._write_fn = write_fn

    def read(self, pa: int, n: int) -> bytes:
        self.check(pa, n)
        if n <= MAX_DMA:
            data = self._read_fn(pa, n)
        else:
            data = b"".join(
                self._read_fn(pa + off, min(MAX_DMA, n - off)) for off in range(0, n, MAX_DMA)
            )
        if len(data) != n:
            raise BusError(pa, n, f"DMA read of {n} bytes at {pa:#x} returned {len(data)}")
        return bytes(data)

    def write(self, pa: int, data: bytes | bytearray | memoryview) -> None:
        data = bytes(data)
        n = len(data)
        self.check(pa, n)
        if n <= MAX_DMA:
            self._write_fn(pa, data)
            return
        for off in range(0, n, MAX_DMA):
            self._write_fn(pa + off, data[off : off + MAX_DMA])
