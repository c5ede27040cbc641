"""The pytest plugin (``pytest11`` entry point): gemu_machine and gemu_console fixtures
configured by ``@pytest.mark.gemu``, and job scripts as test items, run under pytester."""

from __future__ import annotations

pytest_plugins = ["pytester"]

TESTS = """
import pytest

@pytest.mark.gemu(ram="8M", swap="0")
def test_machine(gemu_machine):
    assert gemu_machine.ram_size == 8 << 20 and gemu_machine.swap is None

@pytest.mark.gemu(ram="16M")
def test_console(gemu_console):
    assert gemu_console.run("a = bo 8K\\nfill a 5\\nexpect value a == 5\\n")
    assert gemu_console.query("objects")["objects"][0]["name"] == "a"

def test_unexamined_fault_fails(gemu_console):
    gemu_console.run("f = submit fault\\n")

@pytest.mark.gemu(mutant="no-tlb-flush")
def test_mutant(gemu_machine):
    assert gemu_machine.driver.mutant.value == "no-tlb-flush"
"""


def test_fixtures_and_marker(pytester):
    """The marker sizes the machine and picks a mutant; the console's run and query work;
    a GPU fault nobody examined fails the test at teardown naming it."""
    pytester.makepyfile(test_g=TESTS)
    r = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    r.assert_outcomes(passed=4, errors=1)
    r.stdout.fnmatch_lines(["*gemu: unexpected GPU fault: f (fill at unmapped GPU VA*"])


def test_job_scripts_are_items_with_their_failing_line(pytester):
    """With --gemu-jobs each .job file is a test; a failing one reports file:line: message;
    without the option they are not collected."""
    pytester.makefile(".job", ok="a = bo 4K\nfill a 5\nexpect value a == 5\n")
    pytester.makefile(".job", bad="a = bo 4K\nfill a 5\nexpect value a == 6\n")
    r = pytester.runpytest_inprocess("--gemu-jobs", "-p", "no:cacheprovider")
    r.assert_outcomes(passed=1, failed=1)
    r.stdout.fnmatch_lines(["*bad.job:3: expect value a: got 5, expected == 6*"])
    r = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    r.assert_outcomes()
