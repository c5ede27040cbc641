"""The device protocol server keeps the contract docs/protocol.md states.

Each test drives a real :class:`DeviceServer` (the real device model, on a thread) over a UNIX
socket frame by frame, checks what the device does, and where the page states a rule, that the
page states it: feature bits, MEM_MAP's base, the register-offset rule, a second VERSION, error
replies that are never answered, and a DMA the client fails.
"""

from __future__ import annotations

import logging
import re
import socket
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemu.device.abi import docgen, regs
from gemu.device.abi import protocol as p
from gemu.device.abi.client import SharedMemory
from tests.support.device import inproc_device
from tests.unit.device.test_server import Raw, error_of

DOC = Path(__file__).resolve().parents[3] / "docs" / "protocol.md"
SCRATCH0 = regs.SCRATCH[0].offset
UNMAPPED = min(
    off
    for off in range(0, regs.MMIO_SIZE, 4)
    if all(not r.offset <= off < r.offset + 4 for r in regs.REGISTER_MAP)
)


@pytest.fixture
def dev():
    with inproc_device() as d:
        yield d


@pytest.fixture
def raw(dev):
    r = Raw(dev.spec)
    yield r
    r.close()


def hello(raw: Raw, features: int) -> p.Features:
    hdr, data = raw.call(
        p.Command.VERSION,
        p.VERSION_REQ.build(dict(major=1, minor=0, features=features, name=b"contract")),
    )
    assert not hdr.is_error, data
    return p.Features(p.VERSION_REPLY.parse(data).features)


def map_in_band(raw: Raw, size: int = 1 << 16) -> tuple[p.Header, bytes]:
    req = p.MEM_MAP_REQ.build(dict(base=0, size=size, flags=p.MemMapFlags.IN_BAND))
    return raw.call(p.Command.MEM_MAP, req)


# --- VERSION ----------------------------------------------------------------------------------


def test_every_feature_bit_is_documented_as_declared():
    """protocol.md's feature table is the Features declaration: bit, name and the member's
    comment, row for row."""
    notes = docgen.member_comments(p.Features)
    rows = [
        f"| {int(f).bit_length() - 1} | `{f.name}` | {notes[f.name]} |"
        for f in sorted(p.Features, key=int)
    ]
    table = re.search(r"<!-- features:.*?-->\n(.*?)<!-- end features -->", DOC.read_text(), re.S)
    assert table, "docs/protocol.md has no generated features table"
    assert table.group(1).splitlines()[2:] == rows


def test_a_driver_announcing_no_features_gets_einval_naming_in_band_dma(raw):
    """IN_BAND_DMA is the one enforced bit: without it MEM_MAP IN_BAND is refused, saying so;
    announcing it (as the page tells a driver to) maps memory."""
    offered = hello(raw, 0)
    assert p.Features.IN_BAND_DMA in offered
    code, text = error_of(map_in_band(raw))
    assert code == "EINVAL" and "IN_BAND_DMA" in text
    assert "A driver that wants in-band memory must\nannounce `IN_BAND_DMA`" in DOC.read_text()


def test_a_second_version_is_refused_with_eproto(raw):
    """Features are fixed for a connection: a second VERSION gets EPROTO and changes nothing
    (the connection keeps the in-band memory it mapped)."""
    hello(raw, int(p.Features.IN_BAND_DMA))
    assert not map_in_band(raw)[0].is_error
    req = p.VERSION_REQ.build(dict(major=1, minor=0, features=0, name=b"again"))
    code, text = error_of(raw.call(p.Command.VERSION, req))
    assert code == "EPROTO" and "already negotiated" in text
    hdr, _ = raw.call(p.Command.MEM_UNMAP)
    assert not hdr.is_error
    assert "a second one is refused with `EPROTO`" in DOC.read_text()


# --- MEM_MAP ----------------------------------------------------------------------------------


def test_mem_map_base_must_be_zero_as_documented(raw):
    """MEM_MAP's base is guest-physical 0; any other base is EINVAL."""
    hello(raw, int(p.Features.IN_BAND_DMA))
    req = p.MEM_MAP_REQ.build(dict(base=0x1000, size=4096, flags=p.MemMapFlags.IN_BAND))
    code, text = error_of(raw.call(p.Command.MEM_MAP, req))
    assert code == "EINVAL" and "guest memory starts at 0" in text
    assert "with `base` = 0 (any other base\nis `EINVAL`" in DOC.read_text()


# --- register offsets -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "offset, count",
    [(SCRATCH0 + 2, 1), (regs.MMIO_SIZE, 1), (regs.MMIO_SIZE - 4, 2), (0xFFFFFFFC, 1)],
    ids=["unaligned", "past-window", "batch-runs-past", "far-out"],
)
def test_unaligned_or_outside_offsets_are_einval(raw, offset, count, caplog):
    """An unaligned offset, or one outside the MMIO window, is an EINVAL error reply and a
    guest-error log line, for reads and writes alike."""
    hello(raw, 0)
    with caplog.at_level(logging.WARNING, logger="gemu.device.guest_error"):
        read = p.REG_READ_REQ.build(dict(offset=offset, count=count))
        assert error_of(raw.call(p.Command.REG_READ, read))[0] == "EINVAL"
        if count == 1:
            write = p.REG_WRITE_REQ.build(dict(offset=offset, value=1))
            assert error_of(raw.call(p.Command.REG_WRITE, write))[0] == "EINVAL"
    logged = [r for r in caplog.records if r.name == "gemu.device.guest_error"]
    assert len(logged) == (2 if count == 1 else 1)


def test_an_aligned_offset_with_no_register_reads_zero_and_ignores_writes(raw, caplog):
    """Inside the window, an aligned offset with no register reads 0 and drops writes (no
    error reply), logged as a guest error; this is the rule the page states."""
    hello(raw, 0)
    write = p.REG_WRITE_REQ.build(dict(offset=UNMAPPED, value=0xDEADBEEF))
    with caplog.at_level(logging.WARNING, logger="gemu.device.guest_error"):
        hdr, _ = raw.call(p.Command.REG_WRITE, write)
        assert not hdr.is_error
        hdr, data = raw.call(
            p.Command.REG_READ, p.REG_READ_REQ.build(dict(offset=UNMAPPED, count=1))
        )
    assert not hdr.is_error
    assert p.REG_READ_REPLY.parse(data)["values"] == b"\0\0\0\0"
    assert any(r.name == "gemu.device.guest_error" for r in caplog.records)
    text = DOC.read_text()
    assert "| not a multiple of 4 | `EINVAL` error reply" in text
    assert "no register there | reads return 0, writes are ignored" in text


# --- error replies are never answered ---------------------------------------------------------


def test_a_stray_error_reply_is_logged_and_never_answered(raw, caplog):
    """A reply nobody asked for gets EPROTO, but an error reply is never answered: it is
    logged and dropped (the next frame from the device is the answer to the next request)."""
    hello(raw, 0)
    with caplog.at_level(logging.WARNING, logger="gemu.device.server"):
        code, _ = error_of(raw.call(p.Command.REG_READ, b"", flags=p.MsgFlags.REPLY, msg_id=77))
        assert code == "EPROTO"
        raw.send(p.Command.REG_READ, b"", flags=p.MsgFlags.REPLY | p.MsgFlags.ERROR, msg_id=78)
        hdr, _ = raw.call(p.Command.REG_READ, p.REG_READ_REQ.build(dict(offset=0, count=1)))
    assert not hdr.is_error and hdr.msg_id != 78
    assert any("id 78" in r.getMessage() for r in caplog.records)
    assert "An error reply is never answered" in DOC.read_text()


def test_an_oversize_error_reply_closes_the_connection_without_an_answer(raw, caplog):
    """A frame whose size lost the framing gets EMSGSIZE and a close, except an error reply,
    which is closed on without an answer (and logged)."""
    hello(raw, 0)
    with caplog.at_level(logging.WARNING, logger="gemu.device.server"):
        raw.send(
            p.Command.REG_READ,
            flags=p.MsgFlags.REPLY | p.MsgFlags.ERROR,
            size=p.MAX_MESSAGE + 1,
        )
        assert raw.closed_by_peer()
    assert any("EMSGSIZE" in r.getMessage() for r in caplog.records)
    assert "(unless the frame is flagged as an error reply)" in DOC.read_text()


# --- in-band DMA the client fails -------------------------------------------------------------


def test_a_dma_read_the_client_fails_fails_the_request_with_eio(raw):
    """A debugger MEM_READ of in-band memory: the device asks the client (DMA_READ), the
    client answers EIO, and the MEM_READ fails with EIO naming the client's error, not
    EFAULT."""
    hello(raw, int(p.Features.IN_BAND_DMA))
    assert not map_in_band(raw)[0].is_error
    read = p.MEM_READ_REQ.build(dict(space=p.SPACE_PHYS, size=16, addr=0x100))
    msg_id = raw.send(p.Command.MEM_READ, read)
    dma, _ = raw.recv()
    assert dma.command == p.Command.DMA_READ and not dma.is_reply
    raw.sock.sendall(p.error_frame(dma, p.ProtoError.EIO, "medium error"))
    hdr, data = raw.recv()
    assert hdr.msg_id == msg_id
    code, text = error_of((hdr, data))
    assert code == "EIO" and "EIO" in text and "medium error" in text


# --- frames split anyhow ----------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 0x40000), min_size=1, max_size=4),
    chunk=st.integers(256, 100_000),
)
def test_large_frames_split_anyhow_are_all_handled_in_order(sizes, chunk):
    """MEM_WRITEs of up to 256 KiB (frames beyond the first receive buffer) sent back to back in
    arbitrary chunks: every one is answered, in order, and lands in guest memory."""
    with inproc_device() as d, SharedMemory(1 << 20) as ram:
        raw = Raw(d.spec)
        hello(raw, int(p.Features.FD_PASSING))
        req = p.MEM_MAP_REQ.build(dict(base=0, size=ram.size, flags=p.MemMapFlags.FD))
        socket.send_fds(raw.sock, [p.encode(p.Command.MEM_MAP, 1, req)], [ram.fd])
        assert not raw.recv()[0].is_error
        stream = b""
        for i, size in enumerate(sizes):
            data = bytes([i + 1]) * size
            payload = p.MEM_WRITE_REQ.build(
                dict(space=p.SPACE_PHYS, size=size, addr=i * 0x40000, data=data)
            )
            stream += p.encode(p.Command.MEM_WRITE, 100 + i, payload)
        for start in range(0, len(stream), chunk):
            raw.sock.sendall(stream[start : start + chunk])
        for i, size in enumerate(sizes):
            hdr, _ = raw.recv()
            assert hdr.msg_id == 100 + i and not hdr.is_error
            assert ram.read(i * 0x40000, size) == bytes([i + 1]) * size
        raw.close()
