"""The job-script parser: statements, comments, bindings, includes and located errors."""

from __future__ import annotations

import pytest

from gemu.host.jobscript import ScriptError, expand, parse, parse_file
from gemu.host.shell import Shell

C = Shell.COMMANDS


def test_statements_comments_and_bindings():
    """Blank and comment lines vanish; `NAME = cmd args` binds; a word starting with #
    ends the line; line numbers are the file's."""
    text = "# header\n\nsrc = bo 64K   # a BO\n  fill src random 1\nwait f1 f2 #x\n"
    sts = parse(text, "t.job", commands=C)
    assert [(s.line, s.target, s.argv) for s in sts] == [
        (3, "src", ("bo", "64K")),
        (4, None, ("fill", "src", "random", "1")),
        (5, None, ("wait", "f1", "f2")),
    ]
    assert sts[0].where == "t.job:3"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("frob 1", "t.job:1: unknown command 'frob' (try 'help')"),
        (
            "\n\nbo",
            "t.job:3: bo: takes 1 to 3 arguments, got 0 (usage: [NAME =] bo SIZE [nomap | private VM])",
        ),
        ("1x = bo 4K", "t.job:1: '1x' is not a name"),
        ("x = fill a 1", "t.job:1: fill: gives no result to bind to x"),
        ("x =", "t.job:1: nothing to assign to x"),
        ("= bo 4K", "t.job:1: '=' needs a name on its left"),
        ("echo a\x00b", "t.job:1: control character '\\x00' in the line"),
        ("madvise a", "t.job:1: madvise: takes 2 arguments, got 1"),
    ],
)
def test_errors_name_file_line_and_problem(text, message):
    """Every parse error is a ScriptError starting with file:line and saying what is wrong."""
    with pytest.raises(ScriptError) as info:
        parse(text, "t.job", commands=C)
    assert str(info.value).startswith(message)


def test_include_is_relative_to_the_including_file(tmp_path):
    """include FILE splices the file's statements in place, located in that file."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "common.job").write_text("a = bo 4K\n")
    main = tmp_path / "main.job"
    main.write_text("echo start\ninclude sub/common.job\necho end\n")
    sts = parse_file(main, commands=C)
    assert [s.argv[0] for s in sts] == ["echo", "bo", "echo"]
    assert sts[1].where == f"{tmp_path}/sub/common.job:1"


def test_include_cycles_and_missing_files_are_located(tmp_path):
    """A cycle names the chain; a missing include names the including line."""
    (tmp_path / "a.job").write_text("include b.job\n")
    (tmp_path / "b.job").write_text("\ninclude a.job\n")
    with pytest.raises(ScriptError, match=r"b\.job:2: include a\.job: include cycle"):
        parse_file(tmp_path / "a.job", commands=C)
    (tmp_path / "c.job").write_text("include nope.job\n")
    with pytest.raises(ScriptError, match=r"c\.job:1: include: no such file"):
        parse_file(tmp_path / "c.job", commands=C)
    with pytest.raises(ScriptError, match=r"missing\.job:0: no such file"):
        parse_file(tmp_path / "missing.job", commands=C)


def test_expand_values():
    """$NAME and ${NAME} expand; an unset name is a KeyError naming it."""
    assert expand("${a}b$a", {"a": "x"}) == "xbx"
    with pytest.raises(KeyError, match="nope"):
        expand("$nope", {})


def test_task_blocks_fold_into_their_task_statement(tmp_path):
    """`task NAME` ... `end` becomes one statement whose body holds the block's lines (an
    include inside is spliced into the body); the lines keep their own file:line."""
    (tmp_path / "inner.job").write_text("wait f1\n")
    main = tmp_path / "m.job"
    main.write_text("a = bo 4K\ntask writer\n  fill a 1\n  include inner.job\nend\njoin writer\n")
    sts = parse_file(main, commands=C)
    assert [s.argv for s in sts] == [("bo", "4K"), ("task", "writer"), ("join", "writer")]
    body = sts[1].body
    assert [s.argv for s in body] == [("fill", "a", "1"), ("wait", "f1")]
    assert body[0].where == f"{main}:3" and body[1].where == f"{tmp_path}/inner.job:1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("task a\necho\n", "t.job:1: task a: no 'end' before the end of the file"),
        ("echo\nend\n", "t.job:2: end without a task"),
        (
            "task a\ntask b\nend\nend\n",
            "t.job:2: task b: inside task a (line 1); tasks do not nest",
        ),
        ("task 9x\nend\n", "t.job:1: task: '9x' is not a task name"),
        ("t = task a\nend\n", "t.job:1: task: gives no result to bind to t"),
        ("task\n", "t.job:1: task: takes 1 arguments, got 0"),
    ],
)
def test_task_block_errors_are_located(text, message):
    """Unbalanced or malformed task blocks are ScriptErrors naming file:line."""
    with pytest.raises(ScriptError) as info:
        parse(text, "t.job", commands=C)
    assert str(info.value).startswith(message)


def test_a_block_ends_in_the_file_it_starts_in(tmp_path):
    """An include cannot close the including file's block (nor leave its own open)."""
    (tmp_path / "opens.job").write_text("task a\necho\n")
    (tmp_path / "m.job").write_text("include opens.job\nend\n")
    with pytest.raises(ScriptError, match=r"opens\.job:1: task a: no 'end'"):
        parse_file(tmp_path / "m.job", commands=C)
