"""docs/emulator.md's one exit-status table says what the code returns: for ``gemu run``,
``gemu boot`` and ``gemu demo``, for ``gemu explore`` and for ``gemu device``, the statuses
with a meaning in the table are exactly the ``EXIT_*`` constants of the command's module, and
the tables in the modules' docstrings list the same statuses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gemu.host import cli, cmd_boot, cmd_device, cmd_explore

ROOT = Path(__file__).resolve().parents[2]
COLUMNS = {1: cmd_boot, 2: cmd_explore, 3: cmd_device}


def _exit_codes(module) -> set[int]:
    return {v for k, v in vars(module).items() if k.startswith("EXIT_") and isinstance(v, int)}


def _doc_table() -> list[list[str]]:
    text = (ROOT / "docs" / "emulator.md").read_text()
    section = text.split("## Exit status", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if re.match(r"\|\s*\d+\s*\|", line)]
    assert rows, "no exit-status table in docs/emulator.md"
    return [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in rows]


@pytest.mark.parametrize("column", COLUMNS, ids=lambda c: COLUMNS[c].__name__.split(".")[-1])
def test_documented_exit_statuses_are_the_code_s(column):
    documented = {int(row[0]) for row in _doc_table() if row[column]}
    # every command shares gemu's own internal-error status
    assert documented == _exit_codes(COLUMNS[column]) | {cli.EXIT_INTERNAL}


@pytest.mark.parametrize("module", [cmd_boot, cmd_explore], ids=lambda m: m.__name__)
def test_module_docstring_tables_agree(module):
    listed = {int(n) for n in re.findall(r"^\s*(\d+)\s{2,}\S", module.__doc__, flags=re.M)}
    assert listed == _exit_codes(module)
