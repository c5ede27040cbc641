"""Fixtures shared by the device model's unit tests."""

from __future__ import annotations

import pytest

from tests.support.device_rig import Rig


@pytest.fixture
def rig():
    """A started device model (ring set up); after the test, no internal error was counted."""
    r = Rig()
    r.start_ring()
    yield r
    assert r.gpu.stats()["internal_errors"] == 0
