"""The published hardware interface: register-map validation, golden vectors, fast codecs."""

from __future__ import annotations

import random

import pytest

from gemu.device.abi import packets as pk
from gemu.device.abi import protocol as p
from gemu.device.abi import pte, regs
from gemu.device.abi.enums import Access, Opcode, PteType, WaitFunc
from gemu.device.abi.regs import Field, Register, RegisterMap


@pytest.mark.parametrize(
    "registers, message",
    [
        ((Register("A", 0x2, Access.RW),), "must be aligned"),
        ((Register("A", regs.MMIO_SIZE, Access.RW),), "must be aligned and in MMIO"),
        ((Register("A", 0, Access.RW), Register("B", 0, Access.RW)), "B overlaps A"),
        ((Register("A", 0, Access.RW), Register("A", 4, Access.RW)), "duplicate register name"),
        ((Register("A", 0, Access.RW, reset=1 << 32),), "exceeds 32 bits"),
        ((Register("A", 0, Access.RW, fields=(Field("F", 30, 4),)),), "A.F exceeds 32 bits"),
        (
            (Register("A", 0, Access.RW, fields=(Field("F", 0, 4), Field("G", 3, 2))),),
            "A.G overlaps",
        ),
    ],
)
def test_register_map_validation(registers, message):
    """RegisterMap rejects misplaced, overlapping, duplicate and oversized declarations."""
    with pytest.raises(ValueError, match=message):
        RegisterMap(registers)


def test_register_map_is_consistent():
    """The published map validates, and as_reg() places AS blocks at AS_BASE + n * AS_STRIDE."""
    assert regs.as_reg(3, "COMMAND").offset == regs.AS_BASE + 3 * regs.AS_STRIDE + 0x14
    assert regs.REGISTER_MAP["CP_STATUS"] is regs.CP_STATUS
    with pytest.raises(ValueError, match="AS index"):
        regs.as_reg(regs.AS_COUNT, "COMMAND")
    assert regs.AS_BASE + regs.AS_COUNT * regs.AS_STRIDE <= regs.MMIO_SIZE


def test_golden_protocol_header_reg_read():
    """A REG_READ request with id 1 for one register at 0x0 is exactly these 24 bytes."""
    frame = p.encode(p.Command.REG_READ, 1, p.REG_READ_REQ.build(dict(offset=0, count=1)))
    assert frame == bytes.fromhex("0100 0200 18000000 00000000 00000000 00000000 01000000")
    h = p.decode_header(frame)
    assert (h.msg_id, h.command, h.size, h.payload_size) == (1, p.Command.REG_READ, 24, 8)
    assert p.HEADER.parse(frame[:16]) == dict(msg_id=1, command=2, size=24, flags=0, error=0)


def test_golden_fence_with_irq():
    """FENCE addr=0x1000 seqno=7 with IRQ: opcode 7, flags 1, length 4, LO/HI dwords."""
    assert pk.fence(0x1000, 7, irq=True) == bytes.fromhex(
        "07010400 00100000 00000000 07000000 00000000"
    )


def test_golden_write_data():
    """WRITE_DATA to 0x1_0000_2000 of one dword: length 3, address split LO then HI."""
    assert pk.write_data(0x1_0000_2000, [0xDEADBEEF]) == bytes.fromhex(
        "02000300 00200000 01000000 efbeadde"
    )


def test_golden_pte():
    """A read/write PAGE entry for 0x20_3000 is 0x20301D, little-endian in memory."""
    entry = pte.make(0x20_3000, PteType.PAGE, read=True, write=True)
    assert entry == 0x20301D
    raw = entry.to_bytes(8, "little")
    assert pte.PTE_FORMAT.build(pte.PTE_FORMAT.parse(raw)) == raw
    c = pte.PTE_FORMAT.parse(raw)
    assert (c.valid, c.type, c.read, c.write, c.exec, c.addr) == (
        True,
        "PAGE",
        True,
        True,
        False,
        0x203,
    )
    assert pte.describe(entry) == "page 0x203000 rw-"


@pytest.mark.parametrize("op", [op for op in Opcode if pk.SPECS[op].fast is not None])
def test_fast_body_codecs_equal_construct(op):
    """Each fixed body's struct codec builds and parses exactly like the construct body."""
    body = pk.BODIES[op]
    fast = pk.SPECS[op].fast
    rng = random.Random(op)
    for _ in range(50):
        values = [rng.randrange(1 << 32) for _ in body.subcons]
        if op is Opcode.WAIT_MEM:
            values[4] = rng.choice(list(WaitFunc))
        data = fast.pack(*values)
        names = [s.name for s in body.subcons]
        assert body.build(dict(zip(names, values))) == data
        parsed = body.parse(data)
        assert [int(parsed[n]) for n in names] == list(fast.unpack(data))


@pytest.mark.parametrize(
    "fmt, fast, fields",
    [
        (p.REG_READ_REQ, p.REG_READ_REQ_FAST, ("offset", "count")),
        (p.REG_WRITE_REQ, p.REG_WRITE_REQ_FAST, ("offset", "value")),
        (p.IRQ_MSG, p.IRQ_MSG_FAST, ("level", "irq_status", "mmu_int_stat", "sequence")),
        (p.DMA_READ_REQ, p.DMA_REQ_FAST, ("addr", "size")),
        (p.MEM_READ_REQ, p.MEM_REQ_FAST, ("space", "size", "addr")),
        (p.STEP_REPLY, p.STEP_REPLY_FAST, ("executed", "cp_state", "clock_ns", "irq_level")),
    ],
)
def test_fast_protocol_codecs_equal_construct(fmt, fast, fields):
    """The protocol's hot-path struct codecs match the construct payload definitions."""
    rng = random.Random(len(fields))
    for _ in range(50):
        values = [rng.randrange(1 << (8 * s)) for s in _sizes(fast)]
        assert fmt.build(dict(zip(fields, values))) == fast.pack(*values)


def _sizes(fast):
    return [{"I": 4, "Q": 8, "H": 2}[c] for c in fast.format.lstrip("<")]


def test_decode_reports_problems():
    """decode() names truncated, unknown, mis-sized and mis-flagged packets."""
    assert pk.decode(b"\0\0").error == "truncated header"
    assert "unknown opcode" in pk.decode(bytes([0x99, 0, 0, 0])).error
    assert "past the end" in pk.decode(pk.fence(0, 1)[:-4]).error
    assert "bad length" in pk.decode(pk.header(Opcode.SET_AS, 0)).error
    assert "bad flags" in pk.decode(pk.header(Opcode.NOP, 0, pk.PacketFlags.IRQ)).error
    assert pk.disassemble(pk.fence(0x1000, 7, irq=True)) == [
        "0x000000000000: FENCE.irq 0x1000, seqno=7"
    ]
