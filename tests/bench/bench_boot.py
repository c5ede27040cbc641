"""Benchmarks of booting the emulator (issue 5).

- **boot to prompt**: ``gemu boot -m 16M`` on a pty until the ``gemu# `` prompt (pexpect,
  as CI sees it), median of several runs. Aim: at most 0.5 s.
- **gemu run hello.job**: boot, one copy job with its checks, power off; whole wall time.
- **where the time goes**: the floor is a bare ``python -c pass`` measured in the same run;
  the emulator's own imports (``python -c "import gemu.host.cmd_boot, machine, shell,
  console"`` minus that floor); and the device model's start (``gemu device`` until its ready
  line), which the boot now overlaps with its own imports. The note of the first row splits
  the boot into these.

Every process runs as a user's would, with Python's bytecode cache (kept under
``out/bench/pycache``, not in the tree). An environment with ``PYTHONDONTWRITEBYTECODE=1``
recompiles every module in every process; the last row shows boot to prompt that way.

Issue 18 (boot like a microVM): boot to the prompt at most 0.2 s with a bytecode cache and
0.35 s without. With ``GEMU_BENCH_BASELINE`` naming a checkout of an earlier commit
(:mod:`tests.bench.baseline`), that design's boot runs in the same loop, alternating with the
current one, with and without the cache, and both are reported. On a loaded machine wall
times swing with the load; the CPU time of a whole boot (both processes, ``gemu boot`` with
``poweroff`` on stdin, from ``getrusage(RUSAGE_CHILDREN)``) does not, and is reported too.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pexpect

from tests.bench import baseline
from tests.bench.common import Row
from tests.support.device import gemu_executable

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
CACHED = {
    **{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
    "PYTHONPYCACHEPREFIX": str(ROOT / "out" / "bench" / "pycache"),
}
UNCACHED = {
    **{k: v for k, v in os.environ.items() if k != "PYTHONPYCACHEPREFIX"},
    "PYTHONDONTWRITEBYTECODE": "1",
}


def _median(fn, n: int) -> float:
    fn()  # warm the page cache and the .pyc files
    return statistics.median(fn() for _ in range(n))


def _python_floor() -> float:
    t0 = time.perf_counter()
    subprocess.run([PY, "-c", "pass"], check=True, env=CACHED)
    return time.perf_counter() - t0


def _imports() -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [
            PY,
            "-c",
            "import gemu.host.cli, gemu.host.cmd_boot, gemu.host.machine, gemu.host.shell, "
            "gemu.host.console",
        ],
        check=True,
        env=CACHED,
    )
    return time.perf_counter() - t0


def _device_ready() -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [*gemu_executable(), "device", "--listen", f"unix:{tmp}/d.sock", "--log", "error"],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=CACHED,
        )
        proc.stdout.readline()
        took = time.perf_counter() - t0
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()
    return took


def _boot_to_prompt(env: dict = CACHED) -> float:
    exe, *pre = gemu_executable()
    t0 = time.perf_counter()
    child = pexpect.spawn(exe, [*pre, "boot", "-m", "16M"], timeout=30, encoding="utf-8", env=env)
    child.expect_exact("gemu# ")
    took = time.perf_counter() - t0
    child.sendline("poweroff")
    child.expect(pexpect.EOF)
    child.close()
    return took


def _run_hello() -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [*gemu_executable(), "run", "-q", str(ROOT / "examples/jobs/hello.job")],
        check=True,
        stdout=subprocess.DEVNULL,
        env=CACHED,
    )
    return time.perf_counter() - t0


def _importtime_top(n: int = 6) -> str:
    """The slowest modules by cumulative import time (python -X importtime)."""
    proc = subprocess.run(
        [
            PY,
            "-X",
            "importtime",
            "-c",
            "import gemu.host.cmd_boot, gemu.host.machine, gemu.host.shell, gemu.host.console",
        ],
        capture_output=True,
        text=True,
        env=CACHED,
    )
    rows = []
    for line in proc.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), parts[2].rstrip()))
    top = [r for r in rows if r[1].lstrip() == r[1] or r[1].startswith("  ")]
    top.sort(reverse=True)
    return ", ".join(f"{name.strip()} {us / 1000:.0f} ms" for us, name in top[:n])


def _boot_cpu(env: dict = CACHED) -> float:
    """CPU seconds (user + system) of ``gemu boot -m 16M`` with ``poweroff`` on stdin: the
    boot process and the device it spawns and waits for."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(
        [*gemu_executable(), "boot", "-m", "16M"],
        input=b"poweroff\n",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        check=True,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def _python_cpu() -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([PY, "-c", "pass"], check=True, env=CACHED)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def _alternating(n: int, fns: dict) -> dict:
    """Median of ``n`` runs of each function, run in turn (one of each per round), after one
    warm-up run each: a load that changes during the run weighs on all of them alike."""
    for fn in fns.values():
        fn()
    runs: dict = {name: [] for name in fns}
    for _ in range(n):
        for name, fn in fns.items():
            runs[name].append(fn())
    return {name: statistics.median(v) for name, v in runs.items()}


def _boots(n: int) -> dict:
    """Boot to the prompt with and without the bytecode cache and the CPU time of a boot,
    for the current design and (with a baseline) the previous one, all in one alternating
    loop."""
    with baseline.checkout_env(CACHED) as old_cached, baseline.checkout_env(UNCACHED) as old_un:
        fns = {
            "cached": _boot_to_prompt,
            "uncached": lambda: _boot_to_prompt(UNCACHED),
            "cpu": _boot_cpu,
            "python_cpu": _python_cpu,
        }
        if old_cached is not None:
            fns["old_cached"] = lambda: _boot_to_prompt(old_cached)
            fns["old_uncached"] = lambda: _boot_to_prompt(old_un)
            fns["old_cpu"] = lambda: _boot_cpu(old_cached)
        return _alternating(n, fns)


def _issue18_rows(n: int, floor: float, got: dict) -> list[Row]:
    old = "old_cached" in got

    def prev(key: str, new: float) -> str:
        if not old:
            return ""
        return f"; previous design {got[key]:.3f} s, {new / got[key]:.2f}x of it"

    rows = [
        Row(
            18,
            "boot: to the prompt with a bytecode cache",
            got["cached"],
            "s",
            "python -c pass",
            floor,
            "<= 0.2 s",
            higher_is_better=False,
            note=f"median of {n}{prev('old_cached', got['cached'])}",
        ),
        Row(
            18,
            "boot: to the prompt without a bytecode cache",
            got["uncached"],
            "s",
            "python -c pass",
            floor,
            "<= 0.35 s",
            higher_is_better=False,
            note=f"median of {n}{prev('old_uncached', got['uncached'])}",
        ),
        Row(
            18,
            "boot: CPU time of a whole boot and power-off (both processes)",
            got["cpu"],
            "s",
            "python -c pass (CPU)",
            got["python_cpu"],
            "informative: steady on a loaded machine",
            higher_is_better=False,
            note=f"median of {n}{prev('old_cpu', got['cpu'])}",
        ),
    ]
    if old:
        for key, name, limit in (
            ("old_cached", "to the prompt with a bytecode cache", floor),
            ("old_uncached", "to the prompt without a bytecode cache", floor),
            ("old_cpu", "CPU time of a whole boot and power-off", got["python_cpu"]),
        ):
            rows.append(
                Row(
                    18,
                    f"boot: {name}: previous design",
                    got[key],
                    "s",
                    "python -c pass" + (" (CPU)" if key == "old_cpu" else ""),
                    limit,
                    "informational: the baseline checkout, in the same alternating loop",
                    higher_is_better=False,
                    note=f"{baseline.ENV}={baseline.checkout()}",
                )
            )
    return rows


def bench(quick: bool) -> list[Row]:
    n = 3 if quick else 7
    floor = _median(_python_floor, n)
    imports = _median(_imports, n) - floor
    device = _median(_device_ready, n)
    boots = _boots(n)
    boot, uncached = boots["cached"], boots["uncached"]
    hello = _median(_run_hello, n)
    rest = boot - floor - imports - device
    top = _importtime_top()
    return [
        Row(
            5,
            "boot: gemu boot -m 16M to the prompt (pty)",
            boot,
            "s",
            "python -c pass",
            floor,
            "<= 0.5 s",
            higher_is_better=False,
            note=(
                f"python start {floor * 1e3:.0f} ms + emulator imports {imports * 1e3:.0f} ms "
                f"+ device process to ready line {device * 1e3:.0f} ms (started before the "
                f"imports, so the two overlap) + connect, probe, boot log "
                f"{rest * 1e3:.0f} ms (negative: the overlap); "
                f"slowest imports: {top}"
            ),
        ),
        Row(
            5,
            "run: gemu run hello.job (boot, one copy job, checks, power off)",
            hello,
            "s",
            "python -c pass",
            floor,
            "informative",
            higher_is_better=False,
        ),
        Row(
            5,
            "boot: to the prompt without a bytecode cache (PYTHONDONTWRITEBYTECODE=1)",
            uncached,
            "s",
            "python -c pass",
            floor,
            "informative",
            higher_is_better=False,
            note="every module compiled from source in both processes, every time",
        ),
        Row(
            5,
            "boot: emulator imports (host + guest + device abi)",
            imports,
            "s",
            "python -c pass",
            floor,
            "informative",
            higher_is_better=False,
        ),
        Row(
            5,
            "boot: gemu device process start to ready line",
            device,
            "s",
            "python -c pass",
            floor,
            "informative",
            higher_is_better=False,
        ),
    ] + _issue18_rows(n, floor, boots)
