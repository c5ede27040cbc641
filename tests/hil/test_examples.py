"""Every example job script passes under ``gemu run`` (exit 0), and ``--trace`` writes a
trace-event JSON that Perfetto's importer accepts (the fields it requires, one track per task).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.device import gemu_executable

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "jobs").glob("*.job"))
T = 120 * float(os.environ.get("GEMU_TIMEOUT_MULT", "1"))


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_script_passes(script):
    """`gemu run -m 16M SCRIPT` boots, runs the script and exits 0 with no FAIL line."""
    proc = subprocess.run(
        [*gemu_executable(), "run", "-m", "16M", str(script)],
        capture_output=True,
        text=True,
        timeout=T,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout
    assert "0 failed" in proc.stdout


def test_examples_cover_the_issue_list():
    """The examples the documentation promises exist."""
    names = {p.stem for p in EXAMPLES}
    assert {"hello", "pressure", "purgeable", "fault", "hang", "validation"} <= names


def test_trace_file_is_chrome_trace_event_json(tmp_path):
    """--trace writes {"traceEvents": [...]}: every event has name/ph/ts/pid, async spans
    have ids and pair up, instants are thread-scoped, tasks get thread_name metadata; the
    pressure script produces evictions, swap-ins, shrinker scans and reclaim."""
    out = tmp_path / "run.json"
    proc = subprocess.run(
        [
            *gemu_executable(),
            "run",
            "-q",
            "--trace",
            str(out),
            str(ROOT / "examples/jobs/pressure.job"),
        ],
        capture_output=True,
        text=True,
        timeout=T,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    events = json.loads(out.read_text())["traceEvents"]
    names = {(e.get("cat"), e["name"]) for e in events if e["ph"] != "M"}
    assert {("gem", "evict"), ("gem", "swapin"), ("shrinker", "scan")} <= names
    assert ("mm", "direct_reclaim") in names or ("mm", "kswapd") in names
    tids = {e["tid"] for e in events if e["ph"] != "M"}
    named = {e["tid"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert tids <= named
    opened: dict = {}
    for e in events:
        assert {"name", "ph", "pid"} <= e.keys()
        if e["ph"] == "M":
            continue
        assert isinstance(e["ts"], int | float) and e["ts"] >= 0
        if e["ph"] == "i":
            assert e["s"] == "t"
        if e["ph"] in "be":
            key = (e["cat"], e["name"], e["id"])
            opened[key] = opened.get(key, 0) + (1 if e["ph"] == "b" else -1)
    assert all(v == 0 for k, v in opened.items() if k[0] == "gem")
