"""Hypothesis state machine: random ww transactions with back-off, run concurrently under
the deterministic scheduler, never deadlock, always finish, never share a lock, and
replay identically from their seed."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gemu.guest.errors import Edeadlk
from gemu.guest.kernel import runtime
from gemu.guest.kernel.runtime import Deterministic
from gemu.guest.locking import ww_mutex as ww

MAX_LOCKS = 6


def _transaction(order, ww_class, holder, use_trylock, inject):
    """Lock ``order`` under one context, backing off on -EDEADLK; check exclusivity."""
    me = runtime.current()
    ctx = ww.acquire_init(ww_class, inject_deadlk=inject)
    contended = None
    while True:
        if contended is not None:
            ww.lock_slow(contended, ctx)
        try:
            for lk in order:
                if lk.ctx is ctx:
                    continue
                if not (use_trylock and ww.trylock(lk, ctx)):
                    ww.lock(lk, ctx)
            break
        except Edeadlk:
            for lk in order:
                if lk.ctx is ctx:
                    ww.unlock(lk)
            contended = ctx.contending_lock
    ww.acquire_done(ctx)
    for lk in order:
        assert holder[lk.name] is None, f"{lk.name} shared by {holder[lk.name]} and {me.name}"
        holder[lk.name] = me.name
    runtime.preempt("critical section")
    for lk in order:
        holder[lk.name] = None
    for lk in reversed(order):
        ww.unlock(lk)
    ww.acquire_fini(ctx)


def _program(plans, wait_die, n_locks, inject):
    ww_class = ww.WD_CLASS("machine") if wait_die else ww.WW_CLASS("machine")
    locks = [ww.WwMutex(ww_class, f"L{i}") for i in range(n_locks)]
    holder = {lk.name: None for lk in locks}
    finished = []

    def worker(i, plan):
        order, use_trylock = plan
        _transaction([locks[j] for j in order], ww_class, holder, use_trylock, inject)
        finished.append(i)

    tasks = [runtime.spawn(worker, i, plan, name=f"txn{i}") for i, plan in enumerate(plans)]
    for t in tasks:
        t.join()
    assert all(not ww.is_locked(lk) for lk in locks)
    return sorted(finished)


class WwTransactions(RuleBasedStateMachine):
    """Queue random transactions, then run the queue concurrently with a drawn seed."""

    @initialize(wait_die=st.booleans(), n_locks=st.integers(2, MAX_LOCKS))
    def choose_class(self, wait_die, n_locks):
        self.wait_die = wait_die
        self.n_locks = n_locks
        self.pending: list[tuple[list[int], bool]] = []
        self.runs = 0

    @rule(
        order=st.lists(st.integers(0, MAX_LOCKS - 1), min_size=1, max_size=MAX_LOCKS),
        use_trylock=st.booleans(),
    )
    def queue_transaction(self, order, use_trylock):
        unique = list(dict.fromkeys(i % self.n_locks for i in order))
        self.pending.append((unique, use_trylock))

    @precondition(lambda self: self.pending)
    @rule(
        seed=st.integers(0, 2**32 - 1),
        strategy=st.sampled_from(["random", "pct"]),
        inject=st.sampled_from([None, 0.3]),
    )
    def run_concurrently(self, seed, strategy, inject):
        rt = Deterministic(seed, strategy=strategy, max_steps=50_000)
        finished = rt.run(_program, self.pending, self.wait_die, self.n_locks, inject)
        assert finished == list(range(len(self.pending)))
        again = Deterministic(seed, strategy=strategy, max_steps=50_000)
        again.run(_program, self.pending, self.wait_die, self.n_locks, inject)
        assert again.event_log == rt.event_log
        self.pending = []
        self.runs += 1

    @invariant()
    def queue_stays_small(self):
        assert len(getattr(self, "pending", [])) <= 12


WwTransactions.TestCase.settings = settings(
    derandomize=True,
    max_examples=100,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestWwTransactions = WwTransactions.TestCase
