"""Guest memory backends: bounds, zero-copy views, chunked in-band DMA."""

from __future__ import annotations

import fcntl
import mmap
import os

import pytest

from gemu.device.abi.protocol import MAX_DMA
from gemu.device.memory import BusError, InBandMemory, MappedMemory


@pytest.fixture
def mem():
    m = MappedMemory(bytearray(64 * 1024))
    yield m
    m.close()


def test_mapped_read_write_and_words(mem):
    """Bytes and little-endian u32/u64 round-trip through the mapped backend."""
    mem.write(0x100, b"abcd")
    assert mem.read(0x100, 4) == b"abcd"
    mem.write_u32(0x200, 0xDEADBEEF)
    assert mem.read(0x200, 4) == bytes.fromhex("efbeadde")
    assert mem.read_u32(0x200) == 0xDEADBEEF
    mem.write_u64(0x208, 0x0123456789ABCDEF)
    assert mem.read_u64(0x208) == 0x0123456789ABCDEF
    assert mem.size == 64 * 1024


def test_mapped_view_is_zero_copy():
    """view() aliases the buffer: writes through it are visible in the backing bytearray."""
    buf = bytearray(8192)
    mem = MappedMemory(buf)
    mem.view(0x10, 2)[:] = b"\x01\x02"
    assert buf[0x10:0x12] == b"\x01\x02"


@pytest.mark.parametrize(
    "op",
    [
        lambda m: m.read(65536 - 3, 4),
        lambda m: m.read(-1, 1),
        lambda m: m.write(65535, b"ab"),
        lambda m: m.view(0, 65537),
        lambda m: m.read_u32(65534),
        lambda m: m.write_u32(-4, 0),
        lambda m: m.read_u64(65532),
        lambda m: m.write_u64(65536, 1),
        lambda m: m.copy(0, 65000, 1000),
    ],
)
def test_out_of_range_is_bus_error(mem, op):
    """Every access outside [0, size) raises BusError (never IndexError or a short read)."""
    with pytest.raises(BusError) as info:
        op(mem)
    assert "outside guest memory" in str(info.value)


def test_bus_error_carries_range(mem):
    """BusError names the physical address and size of the failed access."""
    with pytest.raises(BusError) as info:
        mem.read(0xFFF0, 0x20)
    assert (info.value.pa, info.value.n) == (0xFFF0, 0x20)


def test_copy_overlapping_behaves_like_memmove(mem):
    """copy() of overlapping ranges gives memmove's result in both directions."""
    mem.write(0, bytes(range(16)))
    mem.copy(0, 4, 8)
    assert mem.read(0, 16) == bytes([0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15])


def test_readonly_buffer_rejected():
    """A read-only buffer cannot back guest memory."""
    with pytest.raises(ValueError, match="writable"):
        MappedMemory(b"\0" * 4096)


def test_from_fd_shares_memory_with_other_mappings():
    """from_fd maps MAP_SHARED: a write by the device is seen through another mapping."""
    fd = os.memfd_create("gemu-test", os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, 1 << 16)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        mem = MappedMemory.from_fd(fd, 1 << 16)
        other = mmap.mmap(fd, 1 << 16, flags=mmap.MAP_SHARED)
        mem.write_u32(0x40, 0xA5A5A5A5)
        assert other[0x40:0x44] == b"\xa5" * 4
        other[0x80:0x84] = b"wxyz"
        assert mem.read(0x80, 4) == b"wxyz"
        other.close()
        mem.close()
    finally:
        os.close(fd)


def test_close_releases_the_view():
    """After close() the memory is unusable (no dangling access to the buffer)."""
    mem = MappedMemory(bytearray(4096))
    mem.close()
    with pytest.raises(ValueError, match="closed"):
        mem.read(0, 1)
    mem.close()  # idempotent


class _Peer:
    """The protocol server's side of in-band DMA, recording each request."""

    def __init__(self, size: int) -> None:
        self.ram = bytearray(size)
        self.calls: list[tuple[str, int, int]] = []

    def read(self, pa: int, n: int) -> bytes:
        self.calls.append(("r", pa, n))
        return bytes(self.ram[pa : pa + n])

    def write(self, pa: int, data: bytes) -> None:
        self.calls.append(("w", pa, len(data)))
        self.ram[pa : pa + len(data)] = data


def test_in_band_round_trip_and_no_view():
    """In-band memory reads and writes through the peer and offers no zero-copy view."""
    peer = _Peer(1 << 16)
    mem = InBandMemory(1 << 16, peer.read, peer.write)
    mem.write_u64(0x100, 7)
    assert mem.read_u64(0x100) == 7
    assert mem.view(0x100, 8) is None
    assert peer.calls == [("w", 0x100, 8), ("r", 0x100, 8)]


def test_in_band_chunks_to_max_dma():
    """Large accesses are split into requests of at most protocol.MAX_DMA bytes."""
    size = 3 * MAX_DMA
    peer = _Peer(size)
    mem = InBandMemory(size, peer.read, peer.write)
    mem.write(10, b"\x5a" * (2 * MAX_DMA + 5))
    assert [c[2] for c in peer.calls] == [MAX_DMA, MAX_DMA, 5]
    peer.calls.clear()
    assert mem.read(10, 2 * MAX_DMA + 5) == b"\x5a" * (2 * MAX_DMA + 5)
    assert all(n <= MAX_DMA for _, _, n in peer.calls)


def test_in_band_bounds_and_short_reads():
    """In-band memory checks bounds before any message, and a short peer reply is a BusError."""
    peer = _Peer(4096)
    mem = InBandMemory(4096, peer.read, peer.write)
    with pytest.raises(BusError):
        mem.read(4090, 8)
    assert peer.calls == []
    short = InBandMemory(4096, lambda pa, n: b"\0", peer.write)
    with pytest.raises(BusError, match="returned 1"):
        short.read(0, 4)


def test_in_band_overlapping_copy():
    """The chunked copy of the base class is memmove-correct for overlapping ranges."""
    size = 3 * MAX_DMA
    peer = _Peer(size)
    peer.ram[: 2 * MAX_DMA] = bytes(range(256)) * (2 * MAX_DMA // 256)
    expect = bytes(peer.ram[: 2 * MAX_DMA])
    mem = InBandMemory(size, peer.read, peer.write)
    mem.copy(0, 100, 2 * MAX_DMA)
    assert bytes(peer.ram[100 : 100 + 2 * MAX_DMA]) == expect
