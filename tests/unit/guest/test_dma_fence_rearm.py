"""dma_fence: a callback that re-arms another callback slot of the same signal on a second
fence (the model's callbacks may reach preemption points, where the slot's owner can run)."""

from __future__ import annotations

from gemu.guest.dma_buf import dma_fence
from gemu.guest.dma_buf.dma_fence import DmaFence, DmaFenceCb


def test_callback_rearmed_by_an_earlier_callback_runs_once_per_fence():
    """Before the signal took each callback's function up front, the second slot, re-armed
    on ``b`` by the first callback, ran ``b``'s function for ``a`` and then crashed when ``b``
    signalled (its function was already cleared)."""
    a = DmaFence(None, dma_fence.context_alloc(1), 1)
    b = DmaFence(None, dma_fence.context_alloc(1), 1)
    first, second = DmaFenceCb(), DmaFenceCb()
    calls = []

    def on_b(fence, cb):
        calls.append(("on_b", fence))

    def on_first(fence, cb):
        calls.append(("on_first", fence))
        dma_fence.add_callback(b, second, on_b)  # its owner re-arms it on the next fence

    def on_second(fence, cb):
        calls.append(("on_second", fence))

    dma_fence.add_callback(a, first, on_first)
    dma_fence.add_callback(a, second, on_second)
    dma_fence.signal(a)
    dma_fence.signal(b)
    assert calls == [("on_first", a), ("on_second", a), ("on_b", b)]
