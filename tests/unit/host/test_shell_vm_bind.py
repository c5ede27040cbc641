"""The shell in driver mode vm-bind (in-process device): the VM_BIND commands' errors name
what was wrong and where, commands of the other driver mode are refused naming both modes,
scripts declare their mode, and the vms and reclaim views are plain data shared by the
console, Machine.query and QMP."""

from __future__ import annotations

import contextlib
import json

import pytest

from gemu.guest import errors
from gemu.host import jobscript, query
from gemu.host.jobscript import ScriptError
from gemu.host.machine import Machine
from gemu.host.qmp import machine_commands
from gemu.host.shell import Shell, scripts_driver_mode


@contextlib.contextmanager
def session(mode: str):
    strict = errors.is_strict()
    errors.set_strict(False)
    try:
        with Machine(ram_size=8 << 20, swap_size=16 << 20, device="inproc", driver_mode=mode) as m:
            lines: list[str] = []
            sh = Shell(m, lines.append)
            sh.lines = lines
            yield sh
            sh.poweroff()
            m.check_clean()
    finally:
        errors.set_strict(strict)
        errors.reset_warn_stats()


@pytest.fixture
def vsh():
    with session("vm-bind") as sh:
        yield sh


def fails(sh: Shell, line: str) -> str:
    """Run one console line that must fail; its message."""
    sh.lines.clear()
    assert not sh.run_line(line, "t.job", 7)
    sh._pending_failure = None  # judged here, not at power-off
    sh.sum.checks_failed = sh.sum.errors = 0
    sh.sum.failed_lines.clear()
    return "\n".join(sh.lines)


def test_unknown_driver_mode_is_a_value_error_naming_the_modes():
    """Machine(driver_mode=...) refuses an unknown mode before starting anything."""
    with pytest.raises(
        ValueError, match=r"unknown driver mode 'vmbind' \(known: per-bo, vm-bind\)"
    ):
        Machine(driver_mode="vmbind")


def test_scripts_declare_their_driver_mode():
    """driver-mode lines: the run's mode comes from them; an unknown mode, two modes, or a
    mode other than the one asked for is a ScriptError at the line that says it."""

    def parse(text: str, name: str = "s.job"):
        return jobscript.parse(text, name, commands=Shell.COMMANDS)

    assert scripts_driver_mode([parse("a = bo 4K\n")], None) is None
    assert scripts_driver_mode([parse("driver-mode vm-bind\n")], None) == "vm-bind"
    with pytest.raises(ScriptError, match=r"^s.job:2: driver-mode: unknown driver mode 'vmbind'"):
        scripts_driver_mode([parse("\ndriver-mode vmbind\n")], None)
    with pytest.raises(
        ScriptError, match=r"^b.job:1: driver-mode per-bo: a.job:1 asks for vm-bind"
    ):
        scripts_driver_mode(
            [parse("driver-mode vm-bind\n", "a.job"), parse("driver-mode per-bo\n", "b.job")], None
        )
    with pytest.raises(ScriptError, match=r"^s.job:3: driver-mode vm-bind: the machine is asked"):
        scripts_driver_mode([parse("task t\necho\ndriver-mode vm-bind\nend\n")], "per-bo")


def test_commands_of_the_other_mode_name_both_modes(vsh):
    """In vm-bind, per-bo's commands fail EOPNOTSUPP naming the modes; a per-bo machine
    refuses the VM_BIND commands the same way, and its driver-mode line too."""
    for line in ("submit nop", "map a", "pin a", "fence busy a", "madvise a dontneed"):
        msg = fails(vsh, line)
        assert "a command of driver mode per-bo, and this machine runs vm-bind" in msg, msg
    assert "'nomap' is for driver mode per-bo" in fails(vsh, "a = bo 4K nomap")
    with session("per-bo") as sh:
        for line in ("v = vm create", "bind v 0x100000 a", "unbind v 0 4K", "exec v nop"):
            msg = fails(sh, line)
            assert "of driver mode vm-bind, and this machine runs per-bo (boot with" in msg, msg
        assert "needs driver mode vm-bind" in fails(sh, "a = bo 4K private v")
        assert "driver-mode vm-bind: this machine runs per-bo" in fails(sh, "driver-mode vm-bind")
        sh.run_line("info vms")
        assert "driver mode per-bo has one GPU VM per file" in sh.lines[-1]
        assert sh.m.query("vms", sh) == [] and sh.m.query("reclaim") is None


def test_vm_bind_errors_name_what_was_wrong(vsh):
    """Errors of bind, unbind, exec and the vm-bind forms of bo and expect crc name the
    command, the argument and the problem."""
    assert vsh.run_text("v = vm create\nw = vm create\np = bo 8K private v\nx = bo 8K\n")
    assert "bind: VA 0x7fffff000000: 0x7fffff000000+0x2000 reaches the shell's" in fails(
        vsh, "bind v 0x7fffff000000 x"
    )
    assert "bind: p is private to v, not w (an external BO" in fails(vsh, "bind w 0x100000 p")
    assert "must be whole pages" in fails(vsh, "bind v 0x100800 x")
    assert "bind: SIZE 16K is out of range (1 byte to 8 KiB)" in fails(
        vsh, "bind v 0x100000 x 0 16K"
    )
    assert "no VM named 'nope' (known: v, w)" in fails(vsh, "bind nope 0x100000 x")
    assert "exec: unknown job kind 'frob' (nop, copy, fill, crc, atomic, waitmem)" in fails(
        vsh, "exec v frob"
    )
    assert "exec copy: usage: exec VM copy SRC DST SIZE" in fails(vsh, "exec v copy 0x1000")
    assert "'after' needs fence names" in fails(vsh, "exec v nop after")
    assert "expect crc: usage in driver mode vm-bind: expect crc VM VA SIZE" in fails(
        vsh, "expect crc x == 0"
    )
    assert "vm: 'grow' is not create or destroy" in fails(vsh, "vm grow")
    msg = fails(vsh, "bind v")
    assert msg.startswith("t.job:7: bind: takes at least 3 arguments, got 1 (usage:"), msg


def test_vms_and_reclaim_views_are_the_same_data_everywhere(vsh):
    """The vms and reclaim views are JSON data; the console formats them, Machine.query and
    QMP's query-gemu-vms / query-gemu-reclaim return them, and they show a partial unbind
    and the evict/extobj lists."""
    assert vsh.run_text(
        "v = vm create\np = bo 16K private v\nx = bo 16K\nb1 = bind v 0x200000 p\n"
        "b2 = bind v 0x400000 x 0x1000 8K\nu = unbind v 0x201000 4K after b1\nwait b1 b2 u\n"
        "drop-caches\n"
    ), vsh.lines
    views = vsh.m.query("vms", vsh)
    assert json.loads(json.dumps(views)) == views
    (v,) = views
    mine = [(m["va"], m["size"], m["bo"], m["offset"]) for m in v["mappings"] if m["bo"][0] != "_"]
    assert mine == [
        (0x200000, 0x1000, "p", 0),
        (0x202000, 0x2000, "p", 0x2000),
        (0x400000, 0x2000, "x", 0x1000),
    ]
    assert all(m["evicted"] for m in v["mappings"])
    assert v["extobj"] == ["x"] and "p" in v["evict"] and "x" not in v["evict"]
    cmds = machine_commands(vsh, lambda: None)
    assert cmds["query-gemu-vms"].fn() == views
    reclaim = cmds["query-gemu-reclaim"].fn()
    assert reclaim == vsh.m.query("reclaim") == query.reclaim(vsh.m)
    assert {b["name"]: b["state"] for b in reclaim["bos"]}["x"] == "evicted"
    vsh.lines.clear()
    assert vsh.run_text("info vms\ninfo reclaim\n")
    text = "\n".join(vsh.lines)
    assert "  0x000000201000" not in text and "x+0x1000 rwx evicted" in text
    assert "extobj list: x" in text and "reclaim:" in text


def test_the_job_scripts_doc_example_runs(vsh):
    """docs/job-scripts.md's VM_BIND example runs as written, every check holding."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[3] / "docs" / "job-scripts.md").read_text()
    section = doc.split("## The VM_BIND flavour (driver mode vm-bind)", 1)[1]
    example = section.split("```\n", 2)[1]
    assert example.startswith("driver-mode vm-bind\n")
    assert vsh.run_text(example, "job-scripts.md"), "\n".join(vsh.lines)
    assert vsh.sum.checks_passed == 3


def test_help_lists_exec_kinds_and_marks_modes(vsh):
    """help exec lists every exec kind with what it does; help marks each command of one
    driver mode, and help of a command of the other mode says so."""
    from gemu.host.shell import EXEC_KINDS

    vsh.lines.clear()
    vsh.run_line("help exec")
    text = "\n".join(vsh.lines)
    for kind, (args, what) in EXEC_KINDS.items():
        assert f"{f'{kind} {args}'.strip():<24} {what}" in text
    vsh.lines.clear()
    vsh.run_line("help submit")
    assert "(driver mode per-bo only; this machine runs vm-bind)" in vsh.lines
    vsh.lines.clear()
    vsh.run_line("help")
    listing = "\n".join(vsh.lines)
    assert "exec VM KIND ARGS... [after FENCE...]  [driver mode vm-bind]" in listing
    assert "  help [COMMAND]\n" in listing  # a command of both modes carries no mark


def test_gpu_checks_leave_no_fence_open(vsh):
    """expect crc VM ... runs a job of the shell's own: once it signalled its out-fence is
    closed, so a long session does not pile them up (only the VM's two setup binds stay)."""
    assert vsh.run_text("v = vm create\nx = bo 4K\nb = bind v 0x100000 x\nwait b\n")
    before = len(vsh.file.out_fences)
    assert vsh.run_text("expect crc v 0x100000 4K == x\n" * 20), vsh.lines
    assert len(vsh.file.out_fences) == before
