"""The documentation's runnable examples run, and the docs link only to pages that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
# Pages whose ```python blocks are complete programs (others show fragments in context).
RUNNABLE = ["guest.md"]


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("name", RUNNABLE)
def test_python_examples_run(name):
    """Every ```python block of the page runs as written (each in a fresh namespace)."""
    blocks = _python_blocks(ROOT / "docs" / name)
    assert blocks, f"{name} has no python examples"
    for i, code in enumerate(blocks):
        exec(compile(code, f"{name}[block {i}]", "exec"), {"__name__": f"doc_{i}"})


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(path):
    """Every relative markdown link points at a file of the repository."""
    text = path.read_text()
    missing = []
    for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", text):
        if not (path.parent / target).exists():
            missing.append(target)
    assert not missing, f"{path.name} links to missing files: {missing}"
