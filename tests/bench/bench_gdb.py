"""Benchmark of GPU memory reads through the gdb stub (issue 6).

``x/1024xw`` over a 4 KiB buffer mapped in AS1, run by the real gdb-multiarch against a
spawned ``gemu device --gdb``. The command is timed inside gdb (its Python runs
``gdb.execute("x/1024xw ...", to_string=True)`` in a loop), so gdb's start-up, connection and
terminal output are not counted; gdb's own formatting of 1024 words is. Two rows:

- with the extension's ``gemu cache on`` (gdb fetches the 4 KiB as one ``m`` packet; the cache
  is flushed before every read, so every read goes to the device);
- gdb's default, which sends one ``m`` packet per word and is bound by the round trip.

The limit is a raw socket echo of the same reply size (the ``m`` reply: 8 KiB of hex plus
framing) between two Python processes, as bytes per second. Aim: >= 1 MB/s.

A third row times ``stepi`` (one packet per step, here NOPs of an indirect buffer) inside gdb:
each step is a ``vCont;s`` round trip plus gdb reading the registers back (``g``: the core
registers and the whole MMIO file), against a raw echo of that ``g`` reply's size.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
from pathlib import Path

from gemu.device.abi import packets as pk
from gemu.device.gdb_target import REGISTERS
from gemu.host.cmd_gdb import EXTENSION
from tests.bench.common import Row, socket_echo_rtt
from tests.support.device import attached_client
from tests.support.gdb import DATA_VA, GDB, setup_job, spawn_gdb_device

WORDS = 1024
STEPS = 100
G_FRAME = 2 * sum(r.size for r in REGISTERS) + 4  # the `g` reply gdb reads after each step
REPLY_FRAME = 2 * 4 * WORDS + 4  # hex payload + '$' '#' and two checksum digits

TIMER = """
import json, time
import gdb
def per_read(n, flush):
    out = []
    for _ in range(n):
        if flush:
            gdb.execute("maintenance flush dcache", to_string=True)
        t0 = time.perf_counter()
        text = gdb.execute("x/%(words)dxw %(addr)#x", to_string=True)
        out.append(time.perf_counter() - t0)
        assert text.count("\\n") == %(words)d // 4, text[-200:]
    return sorted(out)[len(out) // 2]
gdb.execute("gemu cache on", to_string=True)
cached = per_read(%(reads)d, True)
gdb.execute("gemu cache off", to_string=True)
uncached = per_read(%(slow_reads)d, False)
gdb.execute("stepi", to_string=True)  # into the IB: the steps below are NOPs
t0 = time.perf_counter()
for _ in range(%(steps)d):
    gdb.execute("stepi", to_string=True)
step = (time.perf_counter() - t0) / %(steps)d
print("RESULT " + json.dumps(dict(cached=cached, uncached=uncached, step=step)))
"""


def bench(quick: bool) -> list[Row]:
    if GDB is None:
        return []
    reads = 50 if quick else 200
    slow_reads = 5 if quick else 20
    with (
        spawn_gdb_device(wait=True) as dev,
        attached_client(dev.spec, size=1 << 20) as client,
        tempfile.TemporaryDirectory(prefix="gemu-bench-gdb-") as tmp,
    ):
        job = setup_job(client, [pk.nop()] * (STEPS + 8))
        client.memory.buf[job.data_pa : job.data_pa + 4 * WORDS] = bytes(range(256)) * 16
        script = Path(tmp) / "timer.py"
        script.write_text(
            TIMER % dict(words=WORDS, addr=DATA_VA, reads=reads, slow_reads=slow_reads, steps=STEPS)
        )
        argv = [GDB, "-nx", "-batch", "-ex", f"source {EXTENSION}"]
        argv += ["-ex", f"target remote 127.0.0.1:{dev.gdb_port}", "-ex", "gemu as 1"]
        argv += ["-ex", f"source {script}"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=600).stdout
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"the gdb timing script printed no result:\n{out[-2000:]}")
    result = json.loads(lines[0][len("RESULT ") :])
    echo = statistics.median(socket_echo_rtt(REPLY_FRAME, count=2000) for _ in range(3))
    g_echo = statistics.median(socket_echo_rtt(G_FRAME, count=2000) for _ in range(3))
    rows = []
    for key, label, aim, n in (
        ("cached", "with `gemu cache on` (one m packet per 4 KiB)", ">= 1 MB/s", reads),
        ("uncached", "gdb default (one m packet per word)", "(reference)", slow_reads),
    ):
        secs = result[key]
        rows.append(
            Row(
                6,
                f"gdb x/{WORDS}xw of AS1 memory through the stub, {label}",
                4 * WORDS / secs,
                "B/s",
                f"socket_echo_rtt({REPLY_FRAME} B) as bytes/s",
                4 * WORDS / echo,
                aim,
                note=f"median of {n} reads timed inside gdb (terminal output excluded); "
                f"{secs * 1e3:.2f} ms per read incl. gdb's formatting",
            )
        )
    step = result["step"]
    rows.append(
        Row(
            17,
            "gdb stepi through the stub (one packet per step)",
            1 / step,
            "steps/s",
            f"socket_echo_rtt({G_FRAME} B) as round trips/s",
            1 / g_echo,
            "(reference)",
            note=f"mean of {STEPS} steps over NOPs timed inside gdb; {step * 1e3:.2f} ms per "
            "step incl. gdb's register read and frame logic",
        )
    )
    return rows
