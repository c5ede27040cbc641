"""Run gemu's benchmarks: ``make bench`` (or ``python tests/bench/run.py [--quick] [NAME...]``).

Each ``tests/bench/bench_*.py`` module defines ``bench(quick) -> list[Row]``. Every figure is
printed next to the physical limit measured in the same run, as a ratio, and the whole set is
written to ``out/bench/results.json`` (plus ``out/bench/results.txt``, the table as printed).
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.common import Row  # noqa: E402


def discover(names: list[str]) -> list[str]:
    mods = sorted(p.stem for p in Path(__file__).parent.glob("bench_*.py"))
    if names:
        unknown = [n for n in names if f"bench_{n}" not in mods and n not in mods]
        if unknown:
            raise SystemExit(f"unknown benchmark(s) {unknown}; have {mods}")
        mods = [m for m in mods if m in names or m.removeprefix("bench_") in names]
    return mods


def fmt(v: float) -> str:
    if v == 0 or 1e-3 <= abs(v) < 1e7:
        return f"{v:,.3f}".rstrip("0").rstrip(".") if abs(v) < 100 else f"{v:,.0f}"
    return f"{v:.3e}"


def table(rows: list[Row]) -> str:
    head = (
        "issue",
        "benchmark",
        "value",
        "unit",
        "limit (same run)",
        "limit value",
        "ratio",
        "aim",
    )
    lines = [head]
    for r in rows:
        lines.append(
            (
                str(r.issue),
                r.name,
                fmt(r.value),
                r.unit,
                r.limit_name,
                fmt(r.limit_value),
                f"{r.ratio:.3f}x",
                r.aim,
            )
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = []
    for n, row in enumerate(lines):
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    notes = [f"  - {r.name}: {r.note}" for r in rows if r.note]
    if notes:
        out += ["", "notes:", *notes]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="benchmark modules to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    ap.add_argument("--out", default=str(ROOT / "out" / "bench"), help="result folder")
    args = ap.parse_args(argv)
    rows: list[Row] = []
    failed = []
    for mod_name in discover(args.names):
        print(f"running {mod_name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            mod = importlib.import_module(f"tests.bench.{mod_name}")
            rows += mod.bench(args.quick)
        except Exception:
            failed.append(mod_name)
            traceback.print_exc()
        print(f"  {mod_name}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    text = table(rows)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "python": sys.version,
        "machine": platform.platform(),
        "quick": args.quick,
        "failed": failed,
    }
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "rows": [r.as_dict() for r in rows]}, indent=2)
    )
    (out / "results.txt").write_text(text + "\n")
    print(f"\nwrote {out / 'results.json'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
