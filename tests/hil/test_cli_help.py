"""``gemu SUBCOMMAND --help`` as a user reads it, from the installed script: no rST/Markdown
backticks, every option that has a default shows it (the parser's own value, so help and
behaviour cannot drift apart), and the ``-m`` default each of ``run`` and ``boot`` shows is
the RAM it boots. The demo titles each script by a whole sentence of its header.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from gemu.host import cli
from gemu.host.demo import CURATED, examples_dir, header, title
from tests.support.device import gemu_executable

ROOT = Path(__file__).resolve().parents[2]
MULT = float(os.environ.get("GEMU_TIMEOUT_MULT", "1"))
T = 60 * MULT
SUBCOMMANDS = sorted(cli.build_parser()._subparsers._group_actions[0].choices)


def _help(*words: str) -> str:
    proc = subprocess.run(
        [*gemu_executable(), *words, "--help"], capture_output=True, text=True, timeout=T
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _option_help(text: str, option: str) -> str:
    """The help entry of ``option`` (its lines, joined) in an argparse help text: entries
    start at a two-space indent, continuation lines are indented further."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        names = re.split(r",\s*", line.strip().split("  ")[0]) if line.startswith("  -") else []
        if any(n.split(" ")[0] == option for n in names):
            block = [line]
            for nxt in lines[i + 1 :]:
                if not nxt.startswith("   "):
                    break
                block.append(nxt)
            return " ".join(part.strip() for part in block)
    raise AssertionError(f"{option} not in help:\n{text}")


@pytest.mark.parametrize("command", ["", *SUBCOMMANDS])
def test_help_has_no_markup_and_shows_every_default(command):
    """No backtick anywhere; each option with a non-empty default says "(default: X)" with
    the value the parser uses."""
    words = [command] if command else []
    text = _help(*words)
    assert "`" not in text, text
    parser = cli.build_parser()
    if command:
        parser = parser._subparsers._group_actions[0].choices[command]
    for action in parser._actions:
        default = action.default
        if (
            not action.option_strings
            or action.nargs == 0
            or default is None
            or isinstance(default, bool)
        ):
            continue
        shown = _option_help(text, action.option_strings[-1])
        want = str(default)
        assert f"(default: {want})" in re.sub(r"\s+", " ", shown), (action.dest, shown)


def _booted_ram(args: list[str], stdin: str | None = None) -> str:
    proc = subprocess.run(
        [*gemu_executable(), *args], input=stdin, capture_output=True, text=True, timeout=T
    )
    m = re.search(r"booting with (\S+ \S+) RAM", proc.stdout)
    assert m, proc.stdout + proc.stderr
    return m.group(1)


def _help_default(command: str) -> str:
    m = re.search(r"\(default: (\w+)\)", _help_ram := _option_help(_help(command), "--memory"))
    assert m, _help_ram
    return m.group(1)


def test_run_and_boot_boot_the_ram_their_help_shows(tmp_path):
    """`gemu run --help` and `gemu boot --help` name the -m default, and a run/boot without
    -m boots exactly that much RAM (run 16M, boot 64M)."""
    script = tmp_path / "nothing.job"
    script.write_text("echo nothing\n")
    want = {"16M": "16 MiB", "64M": "64 MiB"}
    run_default = _help_default("run")
    boot_default = _help_default("boot")
    assert _booted_ram(["run", str(script)]) == want[run_default]
    assert _booted_ram(["boot"], stdin="poweroff\n") == want[boot_default]


def test_demo_titles_are_whole_sentences():
    """Each curated script's title is the first sentence (or clause) of its header, ending
    where the header has '.' or ';' (the pressure title was cut at a line break)."""
    for name in CURATED:
        path = examples_dir() / f"{name}.job"
        text, got = header(path), title(path)
        start = text.index(got)
        rest = text[start + len(got) :]
        assert rest == "" or rest[0] in ".;", (name, got, rest[:40])
    pressure = title(examples_dir() / "pressure.job")
    assert pressure.endswith("every byte verified"), pressure
