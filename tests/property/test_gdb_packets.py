"""Properties of the gdb stub's packet parser (gemu.device.gdbstub.PacketReader).

Deterministic Hypothesis settings: the same examples on every run.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemu.device.gdbstub import GdbStub, PacketReader, checksum, escape, frame
from gemu.device.gpu import Gpu
from gemu.device.memory import MappedMemory

DET = settings(derandomize=True, max_examples=300, deadline=None)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in [*points, len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


@DET
@given(st.lists(st.binary(max_size=64), max_size=5), st.lists(st.integers(0, 400), max_size=8))
def test_framed_payloads_come_back_whatever_the_read_boundaries(payloads, cuts):
    """Every payload framed by the stub's own encoder (with escapes) is parsed back exactly,
    in order, however the byte stream is split between reads."""
    stream = b"".join(frame(p) for p in payloads)
    reader = PacketReader()
    events = []
    for chunk in _chunks(stream, cuts):
        events += reader.feed(chunk)
    assert events == [("packet", p) for p in payloads]


@DET
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_raise(data):
    """Garbage yields only well-formed events; a valid packet after it is still parsed
    (a stray '$' may swallow bytes, but never the parser's state)."""
    reader = PacketReader(max_payload=256)
    events = reader.feed(data)
    assert all(e[0] in {"packet", "bad", "ack", "nack", "interrupt"} for e in events)
    events = reader.feed(b"#00" + frame(b"qC"))
    assert events[-1] == ("packet", b"qC")


@DET
@given(st.binary(min_size=1, max_size=40), st.integers(3, 97))
def test_run_length_input_expands(prefix, repeat):
    """``X*n`` repeats X n-29 more times (gdb's run-length encoding), checksum over the bytes
    as sent."""
    prefix = prefix.replace(b"*", b"a").replace(b"}", b"b").replace(b"#", b"c")
    prefix = prefix.replace(b"$", b"d")
    count_char = repeat + 29
    if count_char in (ord("#"), ord("$"), ord("+"), ord("-")):
        count_char, repeat = 29 + 3, 3
    body = prefix + b"*" + bytes((count_char,))
    data = b"$" + body + b"#%02x" % checksum(body)
    assert PacketReader().feed(data) == [("packet", prefix + prefix[-1:] * repeat)]


@DET
@given(st.binary(max_size=64))
def test_escape_leaves_no_special_byte(payload):
    """After escaping, the payload holds no '#', '$' or '*', and every '}' starts an escape."""
    body = escape(payload)
    assert not set(body) & set(b"#$*")
    assert len(body) == len(payload) + sum(payload.count(c) for c in b"#$}*")


@pytest.fixture(scope="module")
def stub():
    """A stub on a Gpu with 64 KiB of memory, no gdb connected (replies are dropped)."""
    gpu = Gpu()
    gpu.attach_memory(MappedMemory(bytearray(1 << 16)))
    s = GdbStub(gpu, "tcp:127.0.0.1:0", wait=True)
    yield s
    s.close()


PREFIXES = [b"m", b"M", b"X", b"p", b"P", b"g", b"G", b"Z", b"z", b"q", b"Q", b"v", b"?", b"s"]
PREFIXES += [b"qRcmd,", b"qXfer:features:read:target.xml:", b"vCont;", b"H", b"T", b"c"]


@settings(derandomize=True, max_examples=400, deadline=None)
@given(st.sampled_from(PREFIXES), st.binary(max_size=40))
def test_any_packet_gets_a_reply_and_never_raises(stub, prefix, tail):
    """Whatever follows a known command letter, the stub answers (or defers, for c/s) without
    an exception escaping: malformed numbers, bad hex, huge lengths, odd monitor text."""
    reply = stub.handle(prefix + tail)
    assert reply is None or isinstance(reply, bytes)
    stub.gpu.halt()  # a 'c' released the hold: take it back for the next example
    stub.running = False
