"""A Hypothesis state machine over dma_resv: random lock / reserve / add_fence / signal / unlock
sequences against a plain model of which fences the object must report."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gemu.guest.dma_buf import dma_fence, dma_resv
from gemu.guest.dma_buf.dma_fence import DmaFence
from gemu.guest.dma_buf.dma_resv import DmaResvUsage

USAGES = st.sampled_from(list(DmaResvUsage))
N_CONTEXTS = 3


class DmaResvMachine(RuleBasedStateMachine):
    """The model is a list of (fence, usage) that must still be accounted for; the rules
    mirror what add_fence promises (replacement only by a later-or-same fence of the same
    context with equal or weaker old usage, or over a signaled entry)."""

    def __init__(self) -> None:
        super().__init__()
        self.resv = dma_resv.init(name="machine")
        self.contexts = [dma_fence.context_alloc(1) for _ in range(N_CONTEXTS)]
        self.next_seqno = [1] * N_CONTEXTS
        self.fences: list[DmaFence] = []
        self.locked = False
        self.reserved = 0  # slots we reserved since locking and have not used

    # --- rules ---

    @precondition(lambda self: not self.locked)
    @rule()
    def lock(self) -> None:
        dma_resv.lock(self.resv, None)
        self.locked = True
        self.reserved = 0

    @precondition(lambda self: self.locked)
    @rule()
    def unlock(self) -> None:
        dma_resv.unlock(self.resv)
        self.locked = False
        self.reserved = 0
        lst = self.resv.fences
        assert lst is None or lst.max_fences == lst.num_fences, "reservation survived unlock"

    @precondition(lambda self: self.locked)
    @rule(n=st.integers(1, 5))
    def reserve(self, n: int) -> None:
        dma_resv.reserve_fences(self.resv, n)
        self.reserved = n
        lst = self.resv.fences
        assert lst.max_fences - lst.num_fences >= n

    @precondition(lambda self: self.locked and self.reserved > 0)
    @rule(ctx=st.integers(0, N_CONTEXTS - 1), usage=USAGES, reuse=st.booleans())
    def add_fence(self, ctx: int, usage: DmaResvUsage, reuse: bool) -> None:
        same_ctx = [f for f in self.fences if f.context == self.contexts[ctx]]
        if reuse and same_ctx:
            fence = same_ctx[-1]
        else:
            fence = DmaFence(None, self.contexts[ctx], self.next_seqno[ctx])
            self.next_seqno[ctx] += 1
            self.fences.append(fence)
        before = self._entries()
        dma_resv.add_fence(self.resv, fence, usage)
        after = self._entries()
        self.reserved -= 1
        # The fence is now reported with this usage or a stricter one.
        assert any(f is fence and u <= usage for f, u in after)
        # Entries only disappear when a later-or-same fence of their context with a
        # usage no stricter than theirs replaced them, or when they had signaled.
        for f, u in before:
            if (f, u) in after:
                continue
            assert dma_fence.test_signaled_flag(f) or (
                f.context == fence.context and u >= usage and dma_fence.is_later_or_same(fence, f)
            )
        assert len(after) <= len(before) + 1

    @precondition(lambda self: any(not dma_fence.test_signaled_flag(f) for f in self.fences))
    @rule(data=st.data())
    def signal(self, data) -> None:
        pending = [f for f in self.fences if not dma_fence.test_signaled_flag(f)]
        dma_fence.signal(data.draw(st.sampled_from(pending)))

    # --- invariants ---

    def _entries(self) -> list[tuple[DmaFence, DmaResvUsage]]:
        lst = self.resv.fences
        return [] if lst is None else list(lst.table[: lst.num_fences])

    @invariant()
    def slot_accounting(self) -> None:
        lst = self.resv.fences
        if lst is None:
            return
        assert lst.num_fences == len(lst.table) <= lst.max_fences
        if self.locked:
            assert lst.max_fences - lst.num_fences >= self.reserved

    @invariant()
    def usage_filtering_and_test_signaled_agree(self) -> None:
        entries = self._entries()
        for usage in DmaResvUsage:
            want = [f for f, u in entries if u <= usage]
            if self.locked:
                assert list(dma_resv.for_each_fence(self.resv, usage)) == want
            cursor = dma_resv.iter_begin(self.resv, usage)
            unlocked = list(dma_resv.for_each_fence_unlocked(cursor))
            dma_resv.iter_end(cursor)
            pending = [f for f in want if not dma_fence.test_signaled_flag(f)]
            assert unlocked == pending
            assert dma_resv.test_signaled(self.resv, usage) == (not pending)

    @invariant()
    def references_match_entries(self) -> None:
        entries = self._entries()
        for f in self.fences:
            assert f.refcount == 1 + sum(1 for g, _ in entries if g is f)

    def teardown(self) -> None:
        if self.locked:
            dma_resv.unlock(self.resv)
        dma_resv.fini(self.resv)


DmaResvMachine.TestCase.settings = settings(
    derandomize=True, max_examples=150, stateful_step_count=40, deadline=None
)
TestDmaResvMachine = DmaResvMachine.TestCase
