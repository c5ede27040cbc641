"""The gdb extension's own packet decoder (host/gdb_extension.py) agrees with the ABI.

The extension runs in gdb's embedded Python and cannot import the project, so it carries a
copy of the packet table; these tests keep the copy equal to gemu.device.abi.packets."""

from __future__ import annotations

import pytest

from gemu.device.abi import packets as pk
from gemu.device.abi.enums import Opcode, WaitFunc
from gemu.host import gdb_extension as ext

SAMPLES = [
    pk.nop(),
    pk.nop(3),
    pk.set_as(2),
    pk.write_data(0x1000, [1, 2]),
    pk.write_data(0x1000, [1, 2, 3, 4, 5, 6], phys=True),
    pk.copy(0x1000, 0x2000, 0x40),
    pk.fill(0x3000, 0x100, 0xA5A5A5A5),
    pk.crc32(0x1000, 0x80, 0x4000),
    pk.atomic_add(0x5000, 3),
    pk.fence(0x6000, 42, irq=True),
    pk.wait_mem(0x7000, 1, mask=0xFF, function=WaitFunc.GE, timeout_us=100),
    pk.indirect_buffer(0x20_0000, 12),
    pk.tlb_invalidate(1, 0x10_0000, 0x2000),
    pk.header(Opcode.FENCE, 2) + bytes(8),  # bad length
    pk.header(Opcode.SET_AS, 1, flags=pk.PacketFlags.IRQ) + bytes(4),  # bad flags
    bytes.fromhex("7f000000"),  # unknown opcode
]


def test_table_matches_the_abi():
    """Every opcode: same name, length rule and accepted flags as SPECS."""
    assert set(ext.OPCODES) == {int(op) for op in pk.SPECS}
    for op, spec in pk.SPECS.items():
        assert ext.OPCODES[int(op)][0] == op.name
        assert ext.LENGTHS[int(op)] == (spec.min_length, spec.max_length)
        assert ext.ACCEPTED_FLAGS.get(int(op), 0) == int(spec.flags)
    assert tuple(w.name for w in WaitFunc) == ext.WAIT_FUNCS


@pytest.mark.parametrize("raw", SAMPLES, ids=lambda b: b[:4].hex())
def test_text_matches_disassemble_one(raw):
    """The extension prints each packet exactly as the ABI's disassembler does."""
    assert ext.disassemble(raw) == pk.disassemble_one(pk.decode(raw))
    assert ext.packet_length(int.from_bytes(raw[:4], "little")) == pk.decode(raw).size


def test_gdbinit_sources_the_extension(capsys):
    """`gemu gdbinit --port N` prints a `source` line naming this file and `target remote`."""
    from gemu.host.cli import main

    assert main(["gdbinit", "--port", "1234"]) == 0
    out = capsys.readouterr().out
    assert f"source {ext.__file__}" in out
    assert out.rstrip().endswith("target remote 127.0.0.1:1234")


def test_coredump_refuses_a_missing_file(capsys, tmp_path):
    """`gemu coredump` on a missing file is a usage error that names the file."""
    from gemu.host.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["coredump", str(tmp_path / "nope.core")])
    assert exc.value.code == 2
    assert "nope.core': no such file" in capsys.readouterr().err
