"""DOC: job scripts as ``gemu explore`` scenarios (not supported yet).

``gemu explore FILE`` parses the job script (``gemu.host.jobscript``) so that a bad script is
reported with ``file:line``, then says what is missing to explore it: the shell that runs job
scripts (``gemu.host.shell.Shell``) is built over a ``gemu.host.machine.Machine``, whose device
runs in another process with real time; explore needs it over an explore machine (the driver on
the in-process stepped bus, inside a deterministic runtime), and a job script would need a way
to say which statements run in which task.
"""

from __future__ import annotations

from pathlib import Path


def scenario_for_script(path: Path):
    """Check the script and explain why it cannot be explored yet (ValueError)."""
    from gemu.host import jobscript
    from gemu.host.shell import Shell

    try:
        statements = jobscript.parse_file(path, commands=Shell.COMMANDS)
    except jobscript.ScriptError as exc:
        raise ValueError(str(exc)) from None
    raise ValueError(
        f"{path}: {len(statements)} statements parsed, but job scripts cannot be explored "
        "yet: the shell runs them on a Machine (device in another process, real time), not "
        "on an explore machine (in-process stepped device, deterministic runtime), and a "
        "script has no way to name concurrent tasks; use a built-in scenario (standard, small)"
    )
