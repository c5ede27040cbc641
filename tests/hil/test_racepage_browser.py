"""explore's race.html in a real browser: headless Chromium (Debian's package, installed by
ci/setup.sh) renders it without a script error and takes a screenshot."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace

from gemu.host.explore import repro
from gemu.host.explore.scenario import SCENARIOS, ExploreConfig, run_schedule


def _chromium(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium")
    assert exe, "chromium is missing: ci/setup.sh installs it (apt-get install chromium)"
    return subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_race_page_renders_in_chromium_without_script_errors(tmp_path):
    cfg = replace(ExploreConfig(scenario=SCENARIOS["race"]), mutant="evict-frees-before-unmap")
    first = next(r for s in range(50) if (r := run_schedule(cfg, s)).violations)
    repro.write_repro(tmp_path, cfg, first.seed, first.schedule)
    page = tmp_path / "race.html"
    dom = _chromium("--dump-dom", page.as_uri()).stdout
    # the page's script marks the body once it ran; an exception would leave "pending" or
    # record the error there
    assert 'data-rendered="ok"' in dom, dom[-2000:]
    assert 'id="race"' in dom and 'class="pair"' in dom  # the racing pair, anchored
    shot = tmp_path / "race.png"
    _chromium("--window-size=1400,1000", f"--screenshot={shot}", page.as_uri())
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
