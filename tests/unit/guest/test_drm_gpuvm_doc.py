"""docs/gpuvm.md's example programs run as written."""

from __future__ import annotations

import re
from pathlib import Path

from gemu.guest.kernel import runtime
from gemu.guest.locking import lockdep

DOC = Path(__file__).resolve().parents[3] / "docs" / "gpuvm.md"


def test_gpuvm_doc_examples_run():
    """Every ```python block of docs/gpuvm.md runs in a fresh namespace, leaves no lock held
    and no lockdep report."""
    lockdep.reset()
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/gpuvm.md has no python examples"
    for i, code in enumerate(blocks):
        exec(compile(code, f"gpuvm.md[block {i}]", "exec"), {"__name__": f"gpuvm_doc_{i}"})
    assert not runtime.current().held_locks
    assert not lockdep.reports()
