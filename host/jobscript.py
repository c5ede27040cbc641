"""DOC: job scripts: the parser of the emulator's guest command language.

A job script is plain text, one shell command a line (the commands of ``gemu boot``'s
console, see :mod:`gemu.host.shell`); docs/job-scripts.md is the grammar::

    # hello.job: one copy job
    src = bo 64K                 # NAME = COMMAND binds the result (a BO, a fence) to NAME
    dst = bo 64K
    fill src random 1
    f1 = submit copy src dst
    wait f1
    expect crc dst == src        # expectations fail the run with file:line
    include common.job           # relative to this file
    task reader                  # the lines up to `end` run in a concurrent guest task
        expect crc dst == src
    end
    join                         # wait for the tasks

:func:`parse` checks every line before anything runs: unknown commands, wrong argument
counts, bad names, include problems and unbalanced ``task``/``end`` blocks are
:class:`ScriptError` naming ``file:line``. A ``task NAME`` statement carries its block's
statements in ``body``.
``$NAME`` / ``${NAME}`` expand values set with ``set NAME VALUE`` when the line runs.

    statements = parse_file("examples/jobs/hello.job", commands=Shell.COMMANDS)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
MAX_INCLUDE_DEPTH = 16
MAX_LINE = 4096


class ScriptError(Exception):
    """A problem in a script, always located: ``file:line: message``."""

    def __init__(self, file: str, line: int, message: str) -> None:
        super().__init__(f"{file}:{line}: {message}")
        self.file = file
        self.line = line
        self.message = message


@dataclass(frozen=True)
class Statement:
    """One command line: ``target = argv[0] argv[1:]`` at ``file:line``."""

    file: str
    line: int
    argv: tuple[str, ...]
    target: str | None = None
    text: str = ""
    body: tuple[Statement, ...] = ()
    """The statements of a ``task NAME`` ... ``end`` block."""

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def command(self) -> str:
        return self.argv[0]


@dataclass(frozen=True)
class Arity:
    """How many arguments a command takes (``max_args`` None: any number) and whether its
    result may be bound to a name."""

    min_args: int
    max_args: int | None
    usage: str
    binds: bool = False


def split_line(text: str) -> list[str]:
    """Words of a line, without its comment: ``#`` starts a comment at the start of a word."""
    words = []
    for word in text.split():
        if word.startswith("#"):
            break
        words.append(word)
    return words


def parse_line(text: str, file: str, line: int, commands: Mapping[str, Arity]) -> Statement | None:
    """One line as a :class:`Statement` (None for blank and comment lines); raises
    :class:`ScriptError` naming ``file:line``."""
    if len(text) > MAX_LINE:
        raise ScriptError(file, line, f"line longer than {MAX_LINE} characters")
    bad = next((c for c in text if ord(c) < 32 and c not in "\t\r\n\f\v"), None)
    if bad is not None:
        raise ScriptError(file, line, f"control character {bad!r} in the line")
    words = split_line(text)
    if not words:
        return None
    target = None
    if len(words) >= 2 and words[1] == "=":
        target = words[0]
        if not NAME_RE.match(target):
            raise ScriptError(
                file, line, f"{target!r} is not a name (letters, digits and _, not first digit)"
            )
        words = words[2:]
        if not words:
            raise ScriptError(file, line, f"nothing to assign to {target}")
    elif "=" in words[:1]:
        raise ScriptError(file, line, "'=' needs a name on its left")
    cmd, args = words[0], words[1:]
    spec = commands.get(cmd)
    if spec is None:
        raise ScriptError(file, line, f"unknown command {cmd!r} (try 'help')")
    n = len(args)
    if n < spec.min_args or (spec.max_args is not None and n > spec.max_args):
        if spec.max_args is None:
            want = f"at least {spec.min_args}"
        elif spec.min_args == spec.max_args:
            want = str(spec.min_args)
        else:
            want = f"{spec.min_args} to {spec.max_args}"
        raise ScriptError(
            file, line, f"{cmd}: takes {want} arguments, got {n} (usage: {spec.usage})"
        )
    if target is not None and not spec.binds:
        raise ScriptError(file, line, f"{cmd}: gives no result to bind to {target}")
    return Statement(file, line, (cmd, *args), target, text.strip())


def parse(
    text: str,
    file: str = "<script>",
    *,
    commands: Mapping[str, Arity],
    base: Path | None = None,
    _stack: tuple[str, ...] = (),
) -> list[Statement]:
    """Every statement of ``text`` with includes expanded in place and ``task`` blocks
    folded into their ``task`` statement (a block ends in the file it starts in)."""
    top: list[Statement] = []
    out = top
    block: Statement | None = None  # the open ``task`` statement
    stack = (*_stack, file)
    for lineno, raw in enumerate(text.splitlines(), 1):
        st = parse_line(raw, file, lineno, commands)
        if st is None:
            continue
        if st.command == "task":
            check_task_name(st, block)
            block, out = st, []
            continue
        if st.command == "end":
            if block is None:
                raise ScriptError(file, lineno, "end without a task")
            top.append(replace(block, body=tuple(out)))
            block, out = None, top
            continue
        if st.command != "include":
            out.append(st)
            continue
        if st.target is not None:
            raise ScriptError(file, lineno, "include gives no result to bind")
        if len(st.argv) != 2:
            raise ScriptError(file, lineno, "include: takes 1 argument (usage: include FILE)")
        path = Path(st.argv[1])
        if not path.is_absolute() and base is not None:
            path = base / path
        name = str(path)
        if name in stack:
            chain = " -> ".join((*stack, name))
            raise ScriptError(file, lineno, f"include {st.argv[1]}: include cycle ({chain})")
        if len(stack) >= MAX_INCLUDE_DEPTH:
            raise ScriptError(
                file, lineno, f"include {st.argv[1]}: nested deeper than {MAX_INCLUDE_DEPTH}"
            )
        try:
            sub = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ScriptError(file, lineno, f"include: no such file {name!r}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ScriptError(file, lineno, f"include {name}: {exc}") from None
        out += parse(sub, name, commands=commands, base=path.parent, _stack=stack)
    if block is not None:
        raise ScriptError(
            file, block.line, f"task {block.argv[1]}: no 'end' before the end of the file"
        )
    return top


def check_task_name(st: Statement, opened: Statement | None = None) -> None:
    """A ``task NAME`` line names its task with a name, outside any block (``opened``: the
    ``task`` line of the block it appears in); ScriptError otherwise."""
    if len(st.argv) != 2 or not NAME_RE.match(st.argv[1]):
        what = st.argv[1] if len(st.argv) > 1 else ""
        raise ScriptError(st.file, st.line, f"task: {what!r} is not a task name (usage: task NAME)")
    if opened is not None:
        raise ScriptError(
            st.file,
            st.line,
            f"task {st.argv[1]}: inside task {opened.argv[1]} (line {opened.line}); "
            "tasks do not nest",
        )


def parse_file(path: str | Path, *, commands: Mapping[str, Arity]) -> list[Statement]:
    """Read and parse a script; a missing or unreadable file is a :class:`ScriptError` at
    line 0."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScriptError(str(path), 0, "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ScriptError(str(path), 0, f"cannot read: {exc}") from None
    return parse(text, str(path), commands=commands, base=p.parent)


_VAR_RE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def expand(word: str, values: Mapping[str, str]) -> str:
    """``$NAME`` and ``${NAME}`` replaced by ``values``; an unset name is a KeyError."""

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(name)
        return values[name]

    return _VAR_RE.sub(sub, word)
