"""Benchmark: how many dma_resv fence additions per second the model sustains (issue 3).

Two figures, both in the free-running runtime (preemption points cost nothing), each against an
empty Python loop over the same count measured in the same run:

- ``dma_resv submit cycle``: lock(NULL ctx), reserve_fences(1), add_fence, unlock per item, the
  per-buffer cost of one submission; every cycle reallocates the fence list because unlock
  forgets the reservation (the debug-kernel behaviour the model always has).
- ``dma_resv add_fence``: add_fence alone, lock held, slots reserved once, each fence the next
  seqno of one context, so it replaces its predecessor in place (the steady state of a buffer
  used by one timeline).
"""

from __future__ import annotations

import time

from gemu.guest.dma_buf import dma_fence, dma_resv
from gemu.guest.dma_buf.dma_fence import DmaFence
from gemu.guest.dma_buf.dma_resv import DmaResvUsage
from tests.bench.common import Row, best_of, empty_loop_rate


def _fences(n: int) -> list[DmaFence]:
    ctx = dma_fence.context_alloc(1)
    return [DmaFence(None, ctx, i + 1) for i in range(n)]


def _submit_cycle_rate(n: int) -> float:
    def once() -> float:
        obj = dma_resv.init(name="bench")
        fences = _fences(n)
        t0 = time.perf_counter()
        for fence in fences:
            dma_resv.lock(obj, None)
            dma_resv.reserve_fences(obj, 1)
            dma_resv.add_fence(obj, fence, DmaResvUsage.WRITE)
            dma_resv.unlock(obj)
        dt = time.perf_counter() - t0
        dma_resv.fini(obj)
        return dt

    return n / best_of(once)


def _add_fence_rate(n: int) -> float:
    def once() -> float:
        obj = dma_resv.init(name="bench")
        fences = _fences(n)
        dma_resv.lock(obj, None)
        dma_resv.reserve_fences(obj, 1)
        t0 = time.perf_counter()
        for fence in fences:
            dma_resv.add_fence(obj, fence, DmaResvUsage.WRITE)
        dt = time.perf_counter() - t0
        dma_resv.unlock(obj)
        dma_resv.fini(obj)
        return dt

    return n / best_of(once)


def bench(quick: bool) -> list[Row]:
    n = 2_000 if quick else 20_000
    loop = empty_loop_rate(n)
    return [
        Row(
            issue=3,
            name="dma_resv submit cycle (lock+reserve+add_fence+unlock)",
            value=_submit_cycle_rate(n),
            unit="cycles/s",
            limit_name="empty_loop",
            limit_value=loop,
            aim="informational: per-buffer cost of one submission in the model",
            note=f"{n} cycles, free-running runtime, NULL ww ctx, list reallocated every cycle",
        ),
        Row(
            issue=3,
            name="dma_resv add_fence (lock held, one reservation)",
            value=_add_fence_rate(n),
            unit="fences/s",
            limit_name="empty_loop",
            limit_value=loop,
            aim="informational: cost of publishing one fence",
            note=f"{n} fences of one context, each replacing its predecessor in place",
        ),
    ]
