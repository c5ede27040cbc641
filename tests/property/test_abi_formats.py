"""Hypothesis properties of every binary format in the hardware interface.

For each packet body, protocol payload and the PTE: parse(build(x)) == x and
build(parse(b)) == b; Field.dp/ex are inverse; packet decoding never raises on arbitrary bytes.
Deterministic: every test runs with ``derandomize=True``.
"""

from __future__ import annotations

from construct import Bytes, Const, FormatField, GreedyBytes, GreedyRange, Int32ul
from construct import Enum as CEnum
from hypothesis import given, settings
from hypothesis import strategies as st

from gemu.device.abi import packets as pk
from gemu.device.abi import protocol as p
from gemu.device.abi import pte
from gemu.device.abi.enums import Opcode, PteType, WaitFunc
from gemu.device.abi.regs import REGISTER_MAP

DET = settings(derandomize=True, max_examples=150, deadline=None)
U32 = st.integers(0, (1 << 32) - 1)
_INT_BITS = {"<H": 16, "<L": 32, "<I": 32, "<Q": 64}


def _field_strategy(sub):
    inner = sub.subcon
    if isinstance(inner, CEnum):
        return st.sampled_from([f.name for f in WaitFunc])
    if isinstance(inner, GreedyRange):
        return st.lists(U32, max_size=16)
    if isinstance(inner, FormatField):
        return st.integers(0, (1 << _INT_BITS[inner.fmtstr]) - 1)
    if inner is Int32ul:
        return U32
    raise AssertionError(f"no strategy for {sub.name}")


@st.composite
def body_values(draw, op: Opcode):
    return {s.name: draw(_field_strategy(s)) for s in pk.BODIES[op].subcons}


@DET
@given(st.data())
def test_packet_bodies_round_trip(data):
    """Every packet body: parse(build(x)) == x, and the built packet decodes to the same body."""
    op = data.draw(st.sampled_from(list(Opcode)))
    x = data.draw(body_values(op))
    body = pk.BODIES[op]
    raw = body.build(x)
    parsed = body.parse(raw)
    assert {k: parsed[k] for k in x} == x
    packet = pk.header(op, len(raw) // 4) + raw
    decoded = pk.decode(packet)
    spec = pk.SPECS[op]
    if spec.min_length <= len(raw) // 4 <= spec.max_length:
        assert decoded.error == "" and decoded.body == parsed


@DET
@given(st.data())
def test_packet_bodies_bytes_round_trip(data):
    """Every packet body: build(parse(b)) == b for any bytes of a valid body size."""
    op = data.draw(st.sampled_from(list(Opcode)))
    spec = pk.SPECS[op]
    n = data.draw(st.integers(spec.min_length, min(spec.max_length, 24)))
    raw = data.draw(st.binary(min_size=4 * n, max_size=4 * n))
    body = pk.BODIES[op]
    assert body.build(body.parse(raw)) == raw


@DET
@given(st.binary(max_size=96), st.integers(0, 8))
def test_decode_never_raises(raw, offset):
    """decode/disassemble accept arbitrary bytes, reporting problems in Packet.error."""
    pkt = pk.decode(raw, offset)
    str(pkt)
    pk.disassemble(raw)


def _payload_formats():
    seen = []
    for req, rep in p.REQUESTS.values():
        for fmt in (req, rep):
            if fmt is not None and fmt not in seen:
                seen.append(fmt)
    return seen


@st.composite
def payload_values(draw, fmt):
    names = [s.name for s in fmt.subcons]
    out = {}
    for sub in fmt.subcons:
        inner = sub.subcon
        if isinstance(inner, Const):
            continue
        if isinstance(inner, FormatField):
            out[sub.name] = draw(st.integers(0, (1 << _INT_BITS[inner.fmtstr]) - 1))
        elif inner is GreedyBytes:
            out[sub.name] = draw(st.binary(max_size=64))
        elif isinstance(inner, Bytes):
            # Sized by an earlier field: size (bytes) or count (registers of 4 bytes).
            if "count" in names:
                out["count"] = draw(st.integers(0, 16))
                out[sub.name] = draw(
                    st.binary(min_size=4 * out["count"], max_size=4 * out["count"])
                )
            else:
                blob = draw(st.binary(max_size=64))
                out["size"] = len(blob)
                out[sub.name] = blob
        else:
            raise AssertionError(f"no strategy for {sub.name}")
    return out


@DET
@given(st.data())
def test_protocol_payloads_round_trip(data):
    """Every protocol payload: parse(build(x)) == x and build(parse(b)) == b."""
    fmt = data.draw(st.sampled_from(_payload_formats()))
    x = data.draw(payload_values(fmt))
    raw = fmt.build(x)
    parsed = fmt.parse(raw)
    assert {k: parsed[k] for k in x} == x
    assert fmt.build(parsed) == raw


@DET
@given(
    st.integers(0, (1 << 36) - 1),
    st.sampled_from(list(PteType)),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.integers(0, 0xFFFF),
)
def test_pte_round_trip(page, kind, read, write, exec_, sw):
    """pte.make and PTE_FORMAT agree; the format round-trips both ways."""
    entry = pte.make(page << 12, kind, read=read, write=write, exec=exec_, sw=sw)
    raw = entry.to_bytes(8, "little")
    c = pte.PTE_FORMAT.parse(raw)
    assert (c.addr, int(c.type), c.read, c.write, c.exec, c.sw) == (
        page,
        int(kind),
        read,
        write,
        exec_,
        sw,
    )
    assert pte.PTE_FORMAT.build(c) == raw
    assert pte.address(entry) == page << 12 and pte.entry_type(entry) is kind


@DET
@given(st.binary(min_size=8, max_size=8))
def test_pte_bytes_round_trip(raw):
    """Any 8 bytes parse as a PTE and build back to the same bytes."""
    assert pte.PTE_FORMAT.build(pte.PTE_FORMAT.parse(raw)) == raw


_FIELDS = [f for r in REGISTER_MAP for f in r.fields]


@DET
@given(st.sampled_from(_FIELDS), U32, st.data())
def test_field_dp_ex_inverse(field, value, data):
    """ex(dp(v, x)) == x, dp(v, ex(v)) == v, and dp leaves the other bits alone."""
    x = data.draw(st.integers(0, (1 << field.width) - 1))
    deposited = field.dp(value, x)
    assert field.ex(deposited) == x
    assert field.dp(value, field.ex(value)) == value
    assert deposited & ~field.mask == value & ~field.mask
