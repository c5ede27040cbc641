"""Fixtures every test module can use."""

import pytest


@pytest.fixture
def gdb_installed() -> None:
    """Fail (not skip) when gdb-multiarch is missing: setup installs it."""
    from tests.support.gdb import _require_gdb

    _require_gdb()


@pytest.fixture(autouse=True)
def _guest_globals_restored():
    """A test that runs ``gemu run``/``boot`` in-process (cli.main) leaves the guest kernel's
    process-wide modes as a booted machine sets them (kernel warnings logged instead of
    raised, the signalling mode of its command line); put them back after every test, so
    the next test in the same worker starts from the defaults whatever ran before it."""
    from gemu.guest import errors
    from gemu.guest.locking import lockdep

    strict = errors.is_strict()
    implicit = lockdep.implicit_signalling()
    yield
    errors.set_strict(strict)
    lockdep.set_implicit_signalling(implicit)
