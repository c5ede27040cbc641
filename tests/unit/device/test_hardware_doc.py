"""docs/hardware.md is the rendering of the hardware-interface declarations."""

from __future__ import annotations

from pathlib import Path

from gemu.device.abi import docgen, regs
from gemu.device.abi.enums import CpError, MmuFault, Opcode

DOC = Path(__file__).resolve().parents[3] / "docs" / "hardware.md"
REGENERATE = "regenerate it with: .venv/bin/python -m gemu.device.abi.docgen > docs/hardware.md"


def test_doc_matches_declarations():
    """The committed programmer's reference equals what docgen renders from device/abi."""
    assert DOC.exists(), f"docs/hardware.md is missing; {REGENERATE}"
    assert DOC.read_text() == docgen.render(), f"docs/hardware.md is out of date; {REGENERATE}"


def test_doc_covers_the_interface():
    """Every register (the AS block once), opcode, CP error and MMU fault appears in the doc."""
    text = docgen.render()
    for r in regs.REGISTER_MAP:
        if r.block != "AS":
            assert f"`{r.name}`" in text
    for t in regs.AS_TEMPLATE:
        assert f"`{t.name}`" in text
    assert "AS0_" not in text
    for enum in (Opcode, CpError, MmuFault):
        for m in enum:
            assert f"`{m.name}`" in text
    for heading in ("Programming the command ring", "job recovery", "TLB coherence"):
        assert heading in text


def test_enum_comments_are_extracted():
    """Enum member comments become the meaning column (the source is the single truth)."""
    notes = docgen.member_comments(CpError)
    assert notes["MMU_FAULT"].startswith("a GPU VA access faulted")
    assert "NONE" not in notes
