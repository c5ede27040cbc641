"""Fixtures every test module can use."""

import pytest


@pytest.fixture
def gdb_installed() -> None:
    """Fail (not skip) when gdb-multiarch is missing: setup installs it."""
    from tests.support.gdb import _require_gdb

    _require_gdb()
