"""The struct codecs the device and the machine use equal the construct formats that define
the ABI: every protocol payload (fields, consts, sized and greedy tails, the errors of
malformed payloads) and every packet body (field order, the builders' bytes)."""

from __future__ import annotations

import random

import pytest
from construct import Bytes, Const, Enum, GreedyBytes, GreedyRange, Int32ul

from gemu.device.abi import packets as pk
from gemu.device.abi import protocol as p
from gemu.device.abi.enums import Opcode, PacketFlags, WaitFunc

PROTOCOL_FORMATS = sorted(n for n in p._CONSTRUCT_NAMES if n != "REQUESTS")


def _random_values(fmt, rng: random.Random) -> dict:
    """Values for every field of a construct payload format; a sized tail gets the length
    its size field says."""
    out: dict = {}
    for sub in fmt.subcons:
        inner = sub.subcon
        if isinstance(inner, Const):
            continue
        if inner is GreedyBytes:
            out[sub.name] = rng.randbytes(rng.randrange(0, 40))
        elif isinstance(inner, Bytes):  # Bytes(this.size) or Bytes(this.count * 4)
            if "count" in out:
                out["count"] = rng.randrange(0, 9)
                out[sub.name] = rng.randbytes(4 * out["count"])
            else:
                out["size"] = rng.randrange(0, 40)
                out[sub.name] = rng.randbytes(out["size"])
        else:
            out[sub.name] = rng.randrange(1 << (8 * inner.sizeof()))
    return out


def test_every_construct_format_has_a_codec_of_its_name():
    assert set(p.CODECS) == set(PROTOCOL_FORMATS)
    assert set(p.REQUEST_CODECS) == set(p.REQUESTS)
    for command, (req, rep) in p.REQUESTS.items():
        codec_req, codec_rep = p.REQUEST_CODECS[command]
        for fmt, codec in ((req, codec_req), (rep, codec_rep)):
            assert (fmt is None) == (codec is None), command
            if fmt is not None:
                assert getattr(p, codec.name) is fmt, (command, codec.name)


@pytest.mark.parametrize("name", PROTOCOL_FORMATS)
def test_protocol_codec_builds_and_parses_like_construct(name):
    fmt, codec = getattr(p, name), p.CODECS[name]
    rng = random.Random(name)
    for _ in range(100):
        values = _random_values(fmt, rng)
        raw = fmt.build(values)
        assert codec.build(values) == raw
        fields, used = codec.parse(raw)
        assert used == len(raw)
        parsed = fmt.parse(raw)
        assert dict(fields) == {k: v for k, v in parsed.items() if not k.startswith("_")}


@pytest.mark.parametrize("name", PROTOCOL_FORMATS)
def test_codec_refuses_what_construct_refuses(name):
    """A payload cut short is malformed for both; bytes past a sized payload are trailing for
    both (parse_payload with the construct format, decode_payload with the codec)."""
    fmt, codec = getattr(p, name), p.CODECS[name]
    rng = random.Random(name)
    raw = fmt.build(_random_values(fmt, rng))
    cases = [raw + b"\x01\x02\x03"] + [raw[:n] for n in range(len(raw))]
    for payload in cases:
        for decode, f in ((p.parse_payload, fmt), (p.decode_payload, codec)):
            try:
                decode(f, p.Command.VERSION, payload)
            except p.FrameError as exc:
                assert exc.code == p.ProtoError.EBADMSG
                outcome = "trailing" if "trailing" in str(exc) else "malformed"
            else:
                outcome = "ok"
            if decode is p.parse_payload:
                expected = outcome
            else:
                assert outcome == expected, (payload, outcome, expected)


def test_codec_consts_and_sizes_are_checked():
    mem_map = p.CODECS["MEM_MAP_REQ"]
    bad = mem_map.struct.pack(0, 4096, 1, 7)
    with pytest.raises(p.FrameError, match=r"MEM_MAP request payload of 24 bytes is malformed"):
        p.decode_payload(mem_map, p.Command.MEM_MAP, bad)
    with pytest.raises(ValueError, match="reserved must be 0"):
        mem_map.build(dict(base=0, size=4096, flags=1, reserved=7))
    with pytest.raises(ValueError, match="has 3 bytes, not the 4"):
        p.CODECS["DMA_WRITE_REQ"].build(dict(addr=0, size=4, data=b"abc"))
    with pytest.raises(ValueError, match="REG_WRITE_REQ"):
        p.CODECS["REG_WRITE_REQ"].build(dict(offset=1 << 32, value=0))


def _fixed_fields_from_construct() -> dict:
    """The fixed-size bodies as construct declares them: all fields u32 (or an enum of u32)."""
    out = {}
    for op, body in pk.BODIES.items():
        names = []
        for sub in body.subcons:
            inner = sub.subcon
            inner = inner.subcon if isinstance(inner, Enum) else inner
            if inner is not Int32ul:
                break
            names.append(sub.name)
        else:
            out[op] = tuple(names)
    return out


def test_fixed_fields_are_the_construct_bodies():
    assert _fixed_fields_from_construct() == pk.FIXED_FIELDS
    assert {op for op in Opcode if pk.SPECS[op].fast is not None} == set(pk.FIXED_FIELDS)


def _random_body(op: Opcode, rng: random.Random) -> dict:
    body = pk.BODIES[op]
    values: dict = {}
    for sub in body.subcons:
        if isinstance(sub.subcon, GreedyRange):
            values[sub.name] = [rng.randrange(1 << 32) for _ in range(rng.randrange(0, 6))]
        elif isinstance(sub.subcon, Enum):
            values[sub.name] = rng.choice(list(WaitFunc))
        else:
            values[sub.name] = rng.randrange(1 << 32)
    return values


@pytest.mark.parametrize("op", list(Opcode))
def test_builders_make_the_construct_bytes(op):
    """pk.build (struct codecs) equals HEADER + BODIES built by construct, for the fields by
    their construct names and for 64-bit fields passed whole."""
    rng = random.Random(int(op))
    for _ in range(50):
        values = _random_body(op, rng)
        flags = rng.choice([PacketFlags(0), pk.SPECS[op].flags])
        body = pk.BODIES[op].build(values)
        want = pk.HEADER.build(dict(opcode=op, flags=flags, length=len(body) // 4)) + body
        assert pk.build(op, flags, **values) == want
        whole = {k: v for k, v in values.items() if not k.endswith(("_lo", "_hi"))}
        for name in values:
            if name.endswith("_lo"):
                whole[name[:-3]] = values[name] | (values[name[:-3] + "_hi"] << 32)
        assert pk.build(op, flags, **whole) == want


def test_builders_refuse_missing_and_oversized_fields():
    with pytest.raises(TypeError, match="COPY needs field 'size'"):
        pk.build(Opcode.COPY, src=0, dst=0)
    with pytest.raises(ValueError, match="FILL"):
        pk.fill(0x1000, 1 << 32, 0)
    with pytest.raises(ValueError, match="64 bits"):
        pk.fence(1 << 64, 1)
    with pytest.raises(ValueError, match="WRITE_DATA"):
        pk.write_data(0, [1 << 32])
