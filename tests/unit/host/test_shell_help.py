"""`help` is generated from the shell's tables (commands, info views, job kinds, expect
forms), so it cannot drift from what the shell does: every command, view, kind and form
appears, every summary is a whole sentence, and no rST markup reaches the console."""

from __future__ import annotations

import pytest

from gemu.guest import errors
from gemu.host.machine import Machine
from gemu.host.shell import EXPECT_FORMS, INFO_VIEWS, JOB_KINDS, Shell


@pytest.fixture(scope="module")
def shell():
    strict = errors.is_strict()
    errors.set_strict(False)
    with Machine(ram_size=8 << 20, swap_size=8 << 20, device="inproc") as m:
        out: list[str] = []
        sh = Shell(m, out.append)
        sh.out = out
        yield sh
        sh.poweroff()
    errors.set_strict(strict)


def _help(shell, *args: str) -> str:
    shell.out.clear()
    assert shell.run_line(" ".join(["help", *args]), "t", 1), shell.out
    return "\n".join(shell.out)


def test_help_lists_every_command_with_a_whole_summary(shell):
    """Each command's usage line, then its one-line summary: none ends mid-sentence."""
    text = _help(shell)
    lines = text.splitlines()
    for name in Shell.COMMANDS:
        usage = next((i for i, line in enumerate(lines) if f" {name}" in f" {line.strip()}"), None)
        assert usage is not None, name
    summaries = [line.strip() for line in lines if line.startswith("      ")]
    assert len(summaries) == len(Shell.COMMANDS)
    for s in summaries:
        assert s.endswith(".") and not s.endswith(("of.", ":.", " is.")), s


def test_every_info_view_job_kind_and_expect_form_is_in_help(shell):
    """`help` shows every info view (tasks too) in info's usage; `help info`, `help submit`
    and `help expect` list every view, kind and form with what it does."""
    usage = next(line for line in _help(shell).splitlines() if line.strip().startswith("info "))
    assert all(view in usage for view in INFO_VIEWS), usage
    assert "tasks" in INFO_VIEWS
    info = _help(shell, "info")
    submit = _help(shell, "submit")
    expect = _help(shell, "expect")
    for view, what in INFO_VIEWS.items():
        assert f"{view:<10} {what}" in info
    for kind, (args, what) in JOB_KINDS.items():
        assert f"{f'{kind} {args}'.strip():<24} {what}" in submit
    for form, (args, what) in EXPECT_FORMS.items():
        assert f"expect {form} {args}".strip() in expect and what in expect


def test_the_tables_match_the_implementation():
    """Every info view and expect form the shell implements is in its table and back."""
    views = {n.removeprefix("_info_") for n in dir(Shell) if n.startswith("_info_")}
    forms = {n.removeprefix("_expect_") for n in dir(Shell) if n.startswith("_expect_")}
    assert views == set(INFO_VIEWS)
    assert forms == set(EXPECT_FORMS)


def test_help_has_no_rst_markup(shell):
    """No backticks anywhere in help, the list or any command's page."""
    pages = [_help(shell)] + [_help(shell, name) for name in Shell.COMMANDS]
    for page in pages:
        assert "`" not in page, page


def test_unknown_kinds_views_and_forms_name_the_known_ones(shell):
    """The errors for an unknown submit kind, info view or expect form list the table."""
    shell.out.clear()
    shell.run_line("x = submit frob", "t", 1)
    shell.run_line("info frob", "t", 2)
    shell.run_line("expect frob", "t", 3)
    text = "\n".join(shell.out)
    assert ", ".join(JOB_KINDS) in text
    assert ", ".join(INFO_VIEWS) in text
    assert ", ".join(EXPECT_FORMS) in text
