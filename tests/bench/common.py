"""Shared pieces of the benchmarks: the physical limits and the result row format.

Every benchmark reports its figure next to a limit measured in the same run on the same
machine, as a ratio, never a bare time alone:

- ``socket_echo_rtt``: a raw socketpair echo between two Python processes, the floor for one
  register round trip across processes;
- ``memoryview_copy``: a memoryview slice copy of the same size, the floor for DMA and swap;
- ``empty_loop``: an empty Python loop over the same item count, the floor for per-item work;
- ``loopback_copy_rate``: bytes over a loopback TCP connection, the link speed of in-band DMA.

A benchmark module ``tests/bench/bench_*.py`` defines ``bench(quick: bool) -> list[Row]``;
``tests/bench/run.py`` collects them, prints a table and writes ``out/bench/results.json``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass
class Row:
    """One benchmark figure and the physical limit it is compared with.

    ``higher_is_better`` says which way the ratio reads: for rates, ratio = value / limit;
    for latencies, ratio = value / limit as well (so 1.25 means 25% slower than the floor).
    """

    issue: int
    name: str
    value: float
    unit: str
    limit_name: str
    limit_value: float
    aim: str
    higher_is_better: bool = True
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.value / self.limit_value if self.limit_value else float("nan")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d


def best_of(fn: Callable[[], float], repeat: int = 5) -> float:
    """Run ``fn`` (which returns seconds) ``repeat`` times and return the median."""
    return statistics.median(fn() for _ in range(repeat))


def empty_loop_rate(n: int) -> float:
    """Iterations per second of an empty Python ``for`` loop over ``n`` items."""

    def once() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            pass
        return time.perf_counter() - t0

    return n / best_of(once)


def thread_handoff_rate(n: int, cpu: int | None = None) -> float:
    """Switches per second of two threads passing a baton through two locks: the floor for
    a deterministic runtime, which hands one baton between task threads. With ``cpu`` both
    threads run on that CPU (as ``gemu explore``'s workers pin their task threads)."""
    mine, theirs = threading.Lock(), threading.Lock()
    mine.acquire()
    theirs.acquire()
    before = os.sched_getaffinity(0)

    def other() -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        for _ in range(n):
            theirs.acquire()
            mine.release()

    th = threading.Thread(target=other, daemon=True)
    th.start()
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            theirs.release()
            mine.acquire()
        dt = time.perf_counter() - t0
    finally:
        os.sched_setaffinity(0, before)
    th.join()
    return 2 * n / dt


def memoryview_copy_rate(nbytes: int) -> float:
    """Bytes per second of a memoryview slice copy of ``nbytes`` between two buffers."""
    src = bytearray(os.urandom(min(nbytes, 1 << 20)) * max(1, nbytes // (1 << 20)))[:nbytes]
    src = src.ljust(nbytes, b"\0")
    dst = bytearray(nbytes)
    s, d = memoryview(src), memoryview(dst)

    def once() -> float:
        t0 = time.perf_counter()
        d[:] = s
        return time.perf_counter() - t0

    return nbytes / best_of(once)


def _echo_server(sock: socket.socket, size: int) -> None:
    buf = bytearray(size)
    view = memoryview(buf)
    while True:
        got = 0
        while got < size:
            n = sock.recv_into(view[got:], size - got)
            if n == 0:
                return
            got += n
        sock.sendall(view)


def socket_echo_rtt(size: int, count: int = 20000, family: int = socket.AF_UNIX) -> float:
    """Seconds per round trip of ``size`` bytes echoed by a second Python process."""
    a, b = socket.socketpair(family)
    ctx = mp.get_context("fork")
    proc = ctx.Process(target=_echo_server, args=(b, size), daemon=True)
    proc.start()
    b.close()
    msg = b"\xa5" * size
    buf = bytearray(size)
    view = memoryview(buf)

    def once() -> float:
        t0 = time.perf_counter()
        for _ in range(count):
            a.sendall(msg)
            got = 0
            while got < size:
                got += a.recv_into(view[got:], size - got)
        return (time.perf_counter() - t0) / count

    try:
        once()  # warm up both processes
        return best_of(once, repeat=3)
    finally:
        a.close()
        proc.join(timeout=5)


def loopback_copy_rate(nbytes: int) -> float:
    """Bytes per second of ``nbytes`` sent over a loopback TCP connection by a thread and
    received into a preallocated buffer: the link speed in-band DMA can reach."""
    listener = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(listener.getsockname())
    b, _ = listener.accept()
    listener.close()
    data = bytes(nbytes)
    buf = bytearray(nbytes)
    view = memoryview(buf)

    def once() -> float:
        sender = threading.Thread(target=a.sendall, args=(data,))
        t0 = time.perf_counter()
        sender.start()
        got = 0
        while got < nbytes:
            got += b.recv_into(view[got:])
        elapsed = time.perf_counter() - t0
        sender.join()
        return elapsed

    try:
        return nbytes / best_of(once, 3)
    finally:
        a.close()
        b.close()
