"""Property tests of the job-script parser (Hypothesis, derandomized: the same examples on
every run). Whatever the text, parsing either gives statements that round-trip through the
grammar or raises ScriptError whose message starts with ``file:line:`` of a real line;
it never raises anything else."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from gemu.host.jobscript import NAME_RE, ScriptError, parse, split_line
from gemu.host.shell import Shell

C = Shell.COMMANDS
DETERMINISTIC = settings(derandomize=True, max_examples=400, deadline=None, database=None)

words = st.one_of(
    st.sampled_from([*C, "=", "#", "#x", "after", "64K", "0x10", "$v", "${v}", "random"]),
    st.text(min_size=1, max_size=8).filter(lambda w: not any(c.isspace() for c in w)),
)
lines = st.one_of(
    st.lists(words, max_size=6).map(" ".join),
    st.text(max_size=40),
)
scripts = st.lists(lines, max_size=12).map("\n".join)


def _line_count(text: str) -> int:
    return len(text.splitlines())


@DETERMINISTIC
@given(scripts)
def test_parse_never_crashes_and_errors_name_file_and_line(text):
    """Any text: statements, or a ScriptError located at an existing line of the file."""
    try:
        sts = parse(text, "fuzz.job", commands=C)
    except ScriptError as exc:
        m = re.match(r"fuzz\.job:(\d+): \S", str(exc))
        assert m, str(exc)
        assert 1 <= int(m.group(1)) <= max(1, _line_count(text))
        assert exc.file == "fuzz.job" and exc.line == int(m.group(1))
        return
    flat = [*sts, *(b for s in sts for b in s.body)]  # task blocks hold their lines
    for s in flat:
        assert s.command != "end"  # every end closed a block
        assert not s.body or s.command == "task"
        assert s.file == "fuzz.job" and 1 <= s.line <= _line_count(text)
        assert s.argv[0] in C
        assert s.target is None or NAME_RE.match(s.target)
        arity = C[s.argv[0]]
        n = len(s.argv) - 1
        assert arity.min_args <= n and (arity.max_args is None or n <= arity.max_args)


@DETERMINISTIC
@given(st.lists(words, min_size=1, max_size=6))
def test_comments_cut_the_line_at_a_word_starting_with_hash(ws):
    """Everything from the first word starting with # is a comment; the words before it
    are exactly what the statement holds."""
    text = " ".join(ws)
    kept = split_line(text)
    cut = next((i for i, w in enumerate(text.split()) if w.startswith("#")), None)
    assert kept == text.split()[:cut]
    try:
        sts = parse(text, "c.job", commands=C)
    except ScriptError:
        return
    if sts:
        target = (sts[0].target, "=") if sts[0].target else ()
        assert [*target, *sts[0].argv] == kept
