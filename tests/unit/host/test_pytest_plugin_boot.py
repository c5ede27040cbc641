"""The pytest plugin's ``gemu_boot``: the real ``gemu boot`` process at its prompt, driven
with pexpect, as in the README's CI example; a machine that does not power off clean fails
the test at teardown with its summary; a marker argument it cannot honour is named."""

from __future__ import annotations

pytest_plugins = ["pytester"]

TESTS = """
import pytest

def test_ci(gemu_boot):
    assert "4 KiB" in gemu_boot.run("a = bo 4K")
    gemu_boot.run("fill a 7")
    assert gemu_boot.run("expect value a == 7") == ""

@pytest.mark.gemu(ram="32M", driver_mode="vm-bind")
def test_marker(gemu_boot):
    assert "32 MiB guest RAM" in gemu_boot.boot_log
    assert "driver mode vm-bind" in gemu_boot.boot_log

def test_lines_each_wait_for_the_prompt(gemu_boot):
    out = gemu_boot.run("b = bo 8K\\nfill b 5\\nexpect value b == 5")
    assert out.startswith("b: handle 1, 8 KiB")
    assert gemu_boot.run("c = bo 4K").startswith("c: handle 2, 4 KiB")

def test_failed_expectation(gemu_boot):
    gemu_boot.run("a = bo 4K")
    gemu_boot.run("expect value a == 9")

@pytest.mark.gemu(mutant="no-tlb-flush")
def test_unsupported(gemu_boot):
    pass
"""


def test_gemu_boot_fixture(pytester):
    pytester.makepyfile(test_b=TESTS)
    r = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    r.assert_outcomes(passed=4, errors=2)
    out = r.stdout.str()
    assert "FAIL: <console>:2: expect value a: got 0, expected == 9" in out
    assert "['mutant'] not available with gemu_boot" in out
