"""The previous design's figures, measured in the same run as the current ones.

``GEMU_BENCH_BASELINE=/path/to/checkout`` names a checkout of an earlier commit (``git worktree
add /tmp/gemu-old <commit>``). :func:`in_checkout` runs a snippet of Python there, in a
subprocess whose ``gemu`` package is that checkout's (and so is a device it spawns), and returns
the number the snippet prints. Without the variable it returns None and the benchmarks leave
the previous design's rows out.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ENV = "GEMU_BENCH_BASELINE"
TIMEOUT_S = 600


def checkout() -> Path | None:
    """The baseline checkout, if one is named."""
    root = os.environ.get(ENV)
    return Path(root) if root else None


def in_checkout(code: str) -> float | None:
    """Run ``code`` with the baseline checkout as ``gemu`` and as the working directory;
    return the float it prints last, or None without a baseline.

    Raises:
        RuntimeError: the checkout is not a gemu tree, or the snippet failed (its stderr).
    """
    root = checkout()
    if root is None:
        return None
    if not (root / "guest" / "mm").is_dir():
        raise RuntimeError(f"{ENV}={root} is not a gemu checkout (no guest/mm)")
    with tempfile.TemporaryDirectory(prefix="gemu-baseline-") as shim:
        pkg = Path(shim) / "gemu"
        pkg.mkdir()
        for part in ("device", "guest", "host"):
            (pkg / part).symlink_to(root / part)
        env = dict(os.environ, PYTHONPATH=f"{shim}{os.pathsep}{root}")
        env.pop(ENV)
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"baseline run in {root} failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.split()[-1])


@contextlib.contextmanager
def checkout_env(env: dict) -> Iterator[dict | None]:
    """``env`` with the baseline checkout as the ``gemu`` package (on PYTHONPATH), for timing
    the baseline's own processes side by side with the current ones (the venv's ``gemu``
    script then runs that checkout, and so does a device it spawns); None without a baseline.

    Raises:
        RuntimeError: the checkout is not a gemu tree.
    """
    root = checkout()
    if root is None:
        yield None
        return
    if not (root / "guest" / "mm").is_dir():
        raise RuntimeError(f"{ENV}={root} is not a gemu checkout (no guest/mm)")
    with tempfile.TemporaryDirectory(prefix="gemu-baseline-") as shim:
        pkg = Path(shim) / "gemu"
        pkg.mkdir()
        for part in ("device", "guest", "host"):
            (pkg / part).symlink_to(root / part)
        out = {k: v for k, v in env.items() if k != ENV}
        out["PYTHONPATH"] = f"{shim}{os.pathsep}{root}"
        yield out
