"""Exploration test of the fences a job script holds by name: seeded generated scripts,
each run through the shell on ``gemu explore``'s deterministic machine (kswapd, the hog's
reclaim and the scheduler interleaved differently by every seed), that keep fences in names,
pass them as dependencies (``after``) long after they signalled, wait for them twice, rebind
the names and close them. Every schedule must end without a violation: no kernel warning
(a fence used after its last reference went), no leaked fence reference at power-off, no
failed expectation."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from gemu.host.explore.jobscripts import SCRIPT_SCENARIO
from gemu.host.explore.scenario import ExploreConfig, run_schedule

SCRIPTS = 12
SCHEDULES = 2
NAMES = ("f1", "f2", "f3")


def fence_script(seed: int, steps: int = 14) -> str:
    """A job script that juggles fence names: submits that bind or rebind them, chains with
    ``after`` on fences signalled long ago, double waits, ``close`` and expectations."""
    rng = random.Random(seed)
    lines = ["src = bo 64K", "dst = bo 64K", f"fill src random {seed}"]
    live: dict[str, bool] = {}  # name -> waited for
    for _ in range(steps):
        op = rng.choice(["submit", "submit", "chain", "wait", "wait", "close", "expect"])
        if op in ("submit", "chain") or not live:
            name = rng.choice(NAMES)  # often one that is already bound: a rebind
            kind = rng.choice(["copy src dst", "fill dst 0x1234", "crc src dst", "nop"])
            deps = [n for n in live if op == "chain" or rng.random() < 0.3]
            after = f" after {' '.join(deps)}" if deps else ""
            lines.append(f"{name} = submit {kind}{after}")
            live[name] = False
        elif op == "wait":
            name = rng.choice(list(live))
            lines.append(f"wait {name}")
            if live[name] or rng.random() < 0.5:
                lines.append(f"wait {name}")  # waited twice: the fence is still held
            live[name] = True
        elif op == "close":
            name = rng.choice(list(live))
            lines.append(f"close {name}")
            del live[name]
        else:
            name = rng.choice(list(live))
            lines.append(f"expect fence {name} signaled")
            live[name] = True
    lines += [f"wait {n}" for n in live]
    lines.append("f9 = submit copy src dst" + (f" after {' '.join(live)}" if live else ""))
    lines += ["wait f9", "expect crc dst == src", "verify"]
    return "\n".join(lines) + "\n"


def _explore(text: str, seed: int):
    sc = replace(SCRIPT_SCENARIO, script="fences.job", script_text=text, reclaims=8)
    return run_schedule(ExploreConfig(scenario=sc), seed)


def test_the_reported_chain_explores_clean():
    """The script from the bug report: a fence passed as a dependency after it signalled,
    its job freed and another job run on the same entity in between."""
    text = (
        "src = bo 64K\ndst = bo 64K\nfill src random 7\nf1 = submit copy src dst\nwait f1\n"
        "expect crc dst == src\nf2 = submit fill dst 0xdeadbeef after f1\nwait f2\n"
        "expect value dst+8 == 0xdeadbeef\n"
    )
    for seed in range(SCHEDULES):
        r = _explore(text, seed)
        assert r.ok, [str(v) for v in r.violations]


@pytest.mark.parametrize("script_seed", range(SCRIPTS))
def test_generated_fence_scripts_explore_clean(script_seed):
    """Generated scripts (seeded) under seeded schedules: no warning, no leak, no failure."""
    text = fence_script(script_seed)
    for seed in range(SCHEDULES):
        r = _explore(text, seed)
        assert r.ok, f"script seed {script_seed}, schedule seed {seed}:\n{text}\n" + "\n".join(
            str(v) for v in r.violations
        )


def test_the_generator_covers_every_fence_use():
    """The scripts do what this test is for: rebinds, dependencies on waited fences, double
    waits and closes all occur."""
    texts = [fence_script(s) for s in range(SCRIPTS)]
    joined = "\n".join(texts)
    assert "close f" in joined
    assert any(
        "wait f1\nwait f1" in t or "wait f2\nwait f2" in t or "wait f3\nwait f3" in t for t in texts
    )
    rebinds = sum(1 for t in texts for n in NAMES if t.count(f"\n{n} = submit") >= 2)
    assert rebinds >= SCRIPTS
    waited_then_after = 0
    for t in texts:
        lines = t.splitlines()
        for i, line in enumerate(lines):
            if line.startswith("wait "):
                name = line.split()[1]
                if any("after" in later and name in later.split() for later in lines[i + 1 :]):
                    waited_then_after += 1
    assert waited_then_after >= SCRIPTS
