"""Benchmarks of the per-job and per-BO cost of the driver model against the previous design.

The previous design is gemu as it was before the per-job and per-BO work of this round
(:data:`PREVIOUS_DESIGN`, a commit of this repository). Its figures are measured in the same
run, on the same machine: its ``device``, ``guest`` and ``host`` trees are exported with
``git archive`` into ``out/bench/previous-<commit>/`` once, and the same measuring code (this
file, run as a script) imports ``gemu`` from there instead of from the working tree. A figure
is then a ratio to the previous design's, which a loaded machine slows down alike.

- **NOP jobs/s**: as ``bench_driver``'s pipelined rate (the full validation sequence per job,
  the device in its own process), the best of three windows.
- **RSS per BO**: ``RssAnon`` growth per 4 KiB BO created and bound in a 1 GiB guest (guest
  RAM is a memfd counted in ``RssShmem``, so it is not part of the figure), projected to 100k
  BOs.

Run alone: ``python tests/bench/run.py --quick job_rate``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if __name__ == "__main__":
    sys.path.insert(1, str(ROOT))  # after the previous design's tree, which comes first

from tests.bench.common import Row  # noqa: E402

PREVIOUS_DESIGN = "152c596"
"""The last commit before the per-job and per-BO work (lazy lockdep stacks, fewer objects per
job, wait queues made on first contention)."""
MEASURE_TIMEOUT_S = 900


def _previous_tree(commit: str) -> Path:
    """``out/bench/previous-<commit>/`` holding ``gemu/{device,guest,host}`` of ``commit``."""
    dest = ROOT / "out" / "bench" / f"previous-{commit}"
    pkg = dest / "gemu"
    if (pkg / "guest").is_dir():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        archive = Path(tmp) / "tree.tar"
        subprocess.run(
            [
                "git",
                "-C",
                str(ROOT),
                "archive",
                "-o",
                str(archive),
                commit,
                "device",
                "guest",
                "host",
            ],
            check=True,
            timeout=120,
        )
        staging = Path(tmp) / "gemu"
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter="data")
        staging.rename(pkg)
    return dest


def run_in_tree(script: str, args: list[str], tree: Path | None, what: str) -> dict:
    """Run the benchmark module ``script`` as a script with ``args``, with ``tree`` (from
    :func:`_previous_tree`) as its gemu if given; the JSON object its last line prints.

    Raises:
        RuntimeError: the script failed (``what`` names the measurement, with its stderr).
    """
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, script, *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=MEASURE_TIMEOUT_S,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{what} ({tree or 'working tree'}) failed:\n{out.stderr}")
    return json.loads(out.stdout.splitlines()[-1])


def _measure(what: str, n: int, tree: Path | None) -> dict:
    """Run this file as a script measuring ``what``; with ``tree``, against that gemu."""
    return run_in_tree(__file__, [what, str(n)], tree, f"measuring {what}")


def _nop(n: int) -> dict:
    from gemu.host.machine import Machine
    from tests.bench.bench_driver import _nop_rate

    with Machine(ram_size=64 << 20, swap_size=0, device="spawn") as m:
        f = m.open()
        _nop_rate(f, 500)  # warm up
        rate = max(_nop_rate(f, n) for _ in range(3))
        f.close()
    return {"rate": rate}


def _rss_per_bo(n: int) -> dict:
    import gc

    from gemu.host.machine import Machine
    from tests.bench.bench_driver import _rss

    with Machine(ram_size=1 << 30, swap_size=0, device="spawn") as m:
        f = m.open()
        for _ in range(200):  # warm up: first-use allocations are not per BO
            f.vm_bind(f.create_bo(4096))
        gc.collect()
        before = _rss()
        for _ in range(n):
            f.vm_bind(f.create_bo(4096))
        after = _rss()
        f.close()
    return {"per_bo": (after["RssAnon"] - before["RssAnon"]) / n, "gemu": _gemu_origin()}


def _gemu_origin() -> str:
    import gemu.guest

    return str(Path(gemu.guest.__file__).resolve().parent.parent)


def bench(quick: bool) -> list[Row]:
    tree = _previous_tree(PREVIOUS_DESIGN)
    jobs = 3000 if quick else 30000
    bos = 20_000 if quick else 100_000
    # alternate old and new so that a slow patch of a shared machine hits both
    old_rate = _measure("nop", jobs, tree)["rate"]
    new_rate = _measure("nop", jobs, None)["rate"]
    old_rate = max(old_rate, _measure("nop", jobs, tree)["rate"])
    new_rate = max(new_rate, _measure("nop", jobs, None)["rate"])
    old_mem = _measure("rss", bos, tree)
    new_mem = _measure("rss", bos, None)
    if Path(old_mem["gemu"]) == Path(new_mem["gemu"]):
        raise RuntimeError(f"the previous design was not imported from {tree}")
    mib = 100_000 / (1 << 20)
    return [
        Row(
            18,
            "driver: NOP jobs/s, full validation sequence, device in its own process",
            new_rate,
            "jobs/s",
            f"previous design ({PREVIOUS_DESIGN})",
            old_rate,
            ">= 20,000 jobs/s",
            note=f"pipelined, best of 3 windows of {jobs} jobs, each design measured twice "
            "alternately in the same run",
        ),
        Row(
            18,
            "driver: RSS beyond guest RAM per 4 KiB BO (1 GiB guest), projected to 100k BOs",
            new_mem["per_bo"] * mib,
            "MiB",
            f"previous design ({PREVIOUS_DESIGN})",
            old_mem["per_bo"] * mib,
            "<= 100 MiB",
            higher_is_better=False,
            note=f"RssAnon growth over {bos} BOs created and bound: "
            f"{new_mem['per_bo']:.0f} B/BO, previous design {old_mem['per_bo']:.0f} B/BO",
        ),
    ]


if __name__ == "__main__":
    what, count = sys.argv[1], int(sys.argv[2])
    result = _nop(count) if what == "nop" else _rss_per_bo(count)
    print(json.dumps(result))
