"""The pytest plugin in driver mode vm-bind: ``@pytest.mark.gemu(driver_mode=...)`` boots the
VM_BIND flavour (an unknown mode fails the test naming the known ones), a VM_BIND mutant
reaches the flavour's driver, and ``--gemu-jobs`` runs each script in the mode its
``driver-mode`` line names, run under pytester."""

from __future__ import annotations

pytest_plugins = ["pytester"]

TESTS = """
import pytest

@pytest.mark.gemu(driver_mode="vm-bind")
def test_vm_bind_console(gemu_console, gemu_machine):
    assert gemu_machine.driver_mode == "vm-bind" and gemu_machine.vm_bind is not None
    assert gemu_console.run(
        "v = vm create\\nx = bo 8K\\nfill x 5\\nb = bind v 0x100000 x\\nwait b\\n"
        "expect crc v 0x100000 8K == x\\n"
    )
    assert gemu_console.query("vms")[0]["extobj"] == ["x"]

@pytest.mark.gemu(driver_mode="vm-bind", mutant="fence-vm-resv-only")
def test_vm_bind_mutant(gemu_machine):
    assert gemu_machine.vm_bind.mutant.value == "fence-vm-resv-only"

@pytest.mark.gemu(driver_mode="vmbind")
def test_bad_mode(gemu_machine):
    pass
"""


def test_marker_boots_the_vm_bind_flavour(pytester):
    """driver_mode="vm-bind" gives a VM_BIND machine and console; a mutant of the flavour
    reaches its driver; an unknown mode fails naming the known ones."""
    pytester.makepyfile(test_v=TESTS)
    r = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    r.assert_outcomes(passed=2, errors=1)
    r.stdout.fnmatch_lines(["*unknown driver mode 'vmbind' (known: per-bo, vm-bind)*"])


def test_job_scripts_run_in_their_driver_mode(pytester):
    """--gemu-jobs: a script with driver-mode vm-bind runs on a VM_BIND machine, one without
    on the default; a failing line is reported as file:line: message."""
    pytester.makefile(
        ".job",
        vm="driver-mode vm-bind\nv = vm create\nx = bo 4K\nb = bind v 0x100000 x\nwait b\n",
    )
    pytester.makefile(".job", legacy="a = bo 4K\nfill a 5\nexpect value a == 5\n")
    pytester.makefile(
        ".job", bad="driver-mode vm-bind\nv = vm create\nx = bo 4K\nexpect cpucrc x 4K == 1\n"
    )
    r = pytester.runpytest_inprocess("--gemu-jobs", "-p", "no:cacheprovider")
    r.assert_outcomes(passed=2, failed=1)
    r.stdout.fnmatch_lines(["*bad.job:4: expect cpucrc x 4K: got 0x*, expected == 1*"])
