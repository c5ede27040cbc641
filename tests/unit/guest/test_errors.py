"""Kernel errno exceptions and warn_on()."""

import errno

import pytest

from gemu.guest import errors
from gemu.guest.errors import Edeadlk, Enomem, Erestartsys, KernelError, KernelWarning


def test_errno_builds_the_matching_subclass():
    """KernelError(errno.X) and the X subclass are interchangeable in except clauses."""
    err = KernelError(errno.EDEADLK, "contended")
    assert isinstance(err, Edeadlk)
    assert err.errno == errno.EDEADLK
    with pytest.raises(Enomem):
        raise KernelError(errno.ENOMEM)


def test_names_read_like_kernel_logs():
    """Messages name the errno as the kernel spells it, EDEADLK rather than its alias."""
    assert str(Edeadlk(msg="wait-die")) == "-EDEADLK: wait-die"
    assert str(Erestartsys()) == "-ERESTARTSYS"
    assert str(KernelError(errno.EINTR)) == "-EINTR"


def test_warn_on_raises_in_strict_mode_and_counts_otherwise():
    """warn_on() is loud under tests and counted (not raised) in emulator runs."""
    assert errors.warn_on(False, "never") is False
    with pytest.raises(KernelWarning, match="pages_use_count"):
        errors.warn_on(True, "pages_use_count != 0")
    errors.set_strict(False)
    try:
        errors.reset_warn_stats()
        assert errors.warn_on(1, "leak") is True
        assert errors.warn_on(1, "leak") is True
        assert errors.warn_stats().counts["leak"] == 2
        assert errors.warn_stats().total == 2
    finally:
        errors.set_strict(True)
        errors.reset_warn_stats()
