"""DeviceClient with ``reply_timeout``: no call waits on a silent device for longer.

The "device" is the far end of a socket pair that never answers and never reads: a stopped
device. Register round trips (the hot path and a second thread waiting behind the reader),
posted writes into a full socket buffer, and the wait of a thread without the reader role all
end with :class:`DeviceTimeout` naming what timed out and the limit, within the limit plus a
small margin; afterwards every call fails at once with the same error. Each call runs on a
worker thread joined with a deadline, so a regression fails the test instead of hanging it.
"""

from __future__ import annotations

import threading
import time

import pytest

from gemu.device.abi import link, regs
from gemu.device.abi.client import DeviceClient, DeviceGone, DeviceTimeout

LIMIT = 0.3
MARGIN = 2.0


@pytest.fixture
def silent():
    """A client whose device end neither reads nor answers."""
    mine, theirs = link.socketpair()
    client = DeviceClient(mine, reply_timeout=LIMIT)
    yield client
    client.close()
    theirs.close()


def _bounded(fn) -> tuple[BaseException | None, float]:
    """Run ``fn`` on a thread; (the exception it raised, seconds taken). Fails if it is still
    running after LIMIT + MARGIN."""
    out: list = [None]

    def body() -> None:
        try:
            fn()
        except BaseException as exc:
            out[0] = exc

    t0 = time.monotonic()
    worker = threading.Thread(target=body, daemon=True)
    worker.start()
    worker.join(LIMIT + MARGIN)
    assert not worker.is_alive(), f"{fn} still waiting after {LIMIT + MARGIN} s"
    return out[0], time.monotonic() - t0


def test_register_read_times_out_naming_the_register(silent):
    """readl on the hot path: DeviceTimeout "REG_READ 0x0: reply: ... within 0.3 s"."""
    exc, took = _bounded(lambda: silent.readl(regs.GPU_ID.offset))
    assert isinstance(exc, DeviceTimeout), exc
    assert f"REG_READ {regs.GPU_ID.offset:#x}: reply" in str(exc)
    assert "within 0.3 s" in str(exc)
    assert took >= LIMIT * 0.9
    # the connection is given up: the next call fails at once with the same reason
    exc2, took2 = _bounded(lambda: silent.writel(regs.IRQ_MASK.offset, 1))
    assert exc2 is exc and took2 < LIMIT


def test_write_round_trip_times_out(silent):
    """writel (a request with a reply on the general path) is bounded the same way."""
    exc, _ = _bounded(lambda: silent.writel(regs.IRQ_MASK.offset, 1))
    assert isinstance(exc, DeviceTimeout), exc
    assert f"REG_WRITE {regs.IRQ_MASK.offset:#x}: reply" in str(exc)


def test_posted_writes_into_a_full_socket_buffer_time_out(silent):
    """A device that does not read: posted doorbell writes fill the socket buffer, and the
    send that no longer fits fails after the limit instead of blocking forever."""

    def flood() -> None:
        for _ in range(10_000_000):
            silent.writel_posted(regs.RING_DOORBELL.offset, 1)

    exc, took = _bounded(flood)
    assert isinstance(exc, DeviceTimeout), exc
    assert f"REG_WRITE {regs.RING_DOORBELL.offset:#x}: send" in str(exc)
    assert took < LIMIT + MARGIN


def test_a_thread_behind_the_reader_gets_the_timeout_too(silent):
    """Two threads in round trips at once: the one waiting for the reader role (or for its
    reply to be stashed) ends with the same DeviceGone, not an endless sleep."""
    errors: list[BaseException] = []

    def call() -> None:
        try:
            silent.readl(regs.GPU_ID.offset)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(LIMIT + MARGIN)
    assert not any(t.is_alive() for t in threads)
    assert len(errors) == 2 and all(isinstance(e, DeviceGone) for e in errors), errors


def test_irq_wait_with_a_timeout_stays_a_plain_timeout(silent):
    """wait_irq's own timeout is not a lost device: it returns None and the client lives."""
    assert silent.wait_irq(0.05) is None
    assert silent._gone is None


def test_reply_timeout_must_be_positive():
    mine, theirs = link.socketpair()
    try:
        with pytest.raises(ValueError, match="above 0"):
            DeviceClient(mine, reply_timeout=0)
    finally:
        mine.close()
        theirs.close()
