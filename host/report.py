"""DOC: CI reports of ``gemu run``: JUnit XML (``--junit-xml``) and JSON (``--json``).

One test case per job script; a script's failures are the problems counted while it ran
(failed lines with ``file:line``, unexpected GPU faults, lockdep reports, lost data, kernel
warnings); scripts after the first failing one are not run and are reported skipped; what
power-off finds (leaks, a lost device) is one more case, ``poweroff``::

    rec = RunRecorder()
    rec.start(shell.sum)
    ok = shell.run_script(statements)
    rec.finish("a.job", shell.sum, seconds)
    write_junit(path, rec.cases)

The XML is the JUnit dialect Jenkins and GitLab read (pytest's ``xunit2``): ``<testsuites>``
holding one ``<testsuite>`` whose ``<testcase classname name time>`` carry ``<failure message
type>`` (the message starts with ``file:line:``) or ``<skipped message>``.
"""

from __future__ import annotations

import json
import re
import socket
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

_LISTS = ("failed_lines", "unexpected_faults", "unexpected_lockdep", "lost_data", "warnings")
_PREFIX = {
    "failed_lines": "",
    "unexpected_faults": "unexpected GPU fault: ",
    "unexpected_lockdep": "unexpected lockdep report: ",
    "lost_data": "lost data: ",
    "warnings": "kernel warning: ",
}
_WHERE = re.compile(r"^(?P<file>[^:\n]+):(?P<line>\d+): (?P<message>.*)$", re.S)


@dataclass
class Failure:
    """One problem: its message, and the script line it names (None if none)."""

    message: str
    file: str | None = None
    line: int | None = None

    @classmethod
    def parse(cls, text: str) -> Failure:
        m = _WHERE.match(text)
        if m is None:
            return cls(text)
        return cls(m["message"], m["file"], int(m["line"]))


@dataclass
class Check:
    """One ``expect`` line of a script: where, its text, and the message if it failed."""

    file: str | None
    line: int | None
    text: str
    status: str  # passed, failed
    message: str = ""


@dataclass
class Case:
    """A test case: a script (or ``poweroff``), its outcome and its failures; ``checks``
    are its ``expect`` lines (sub-cases in the JUnit XML)."""

    name: str
    status: str  # passed, failed, skipped
    seconds: float = 0.0
    failures: list[Failure] = field(default_factory=list)
    skipped: str = ""
    checks: list[Check] = field(default_factory=list)


class RunRecorder:
    """Turns the shell's run summary into per-script cases by what each script added."""

    def __init__(self) -> None:
        self.cases: list[Case] = []
        self._before: dict[str, int] = {}
        self._failed_before = 0

    def start(self, summary) -> None:
        self._before = {k: len(getattr(summary, k)) for k in _LISTS}
        self._failed_before = summary.checks_failed
        self._checks_before = len(summary.checks)

    def _checks(self, summary) -> list[Check]:
        out = []
        for where, text, message in summary.checks[self._checks_before :]:
            m = re.match(r"^(?P<file>[^:\n]+):(?P<line>\d+)", where)
            file, line = (m["file"], int(m["line"])) if m else (None, None)
            out.append(Check(file, line, text, "failed" if message else "passed", message))
        return out

    def _new(self, summary) -> list[Failure]:
        out = []
        for k in _LISTS:
            for text in getattr(summary, k)[self._before.get(k, 0) :]:
                out.append(Failure.parse(_PREFIX[k] + text))
        unlisted = summary.checks_failed - self._failed_before
        unlisted -= len(summary.failed_lines) - self._before.get("failed_lines", 0)
        if unlisted > 0:
            out.append(Failure(f"{unlisted} more failed line(s)"))
        return out

    def finish(self, name: str, summary, seconds: float, ok: bool = True) -> Case:
        failures = self._new(summary)
        if not ok and not failures:
            failures.append(Failure("the script stopped at a failing line"))
        case = Case(name, "failed" if failures else "passed", seconds, failures)
        case.checks = self._checks(summary)
        self.cases.append(case)
        return case

    def skip(self, name: str, why: str) -> None:
        self.cases.append(Case(name, "skipped", skipped=why))

    def poweroff(self, summary, seconds: float = 0.0) -> None:
        """The power-off checks: leaks, a lost device, and what no script was charged with."""
        failures = self._new(summary)
        failures += [Failure(f"leak: {w}") for w in summary.leaks]
        if summary.device_lost:
            failures.append(Failure(f"device lost: {summary.device_lost}"))
        self.cases.append(Case("poweroff", "failed" if failures else "passed", seconds, failures))


def junit_xml(cases: list[Case], suite: str = "gemu run") -> ET.Element:
    """The JUnit XML tree of ``cases``: a test case per script (classname ``gemu.jobs``),
    then one per ``expect`` line of it (classname the script, name ``LINE: TEXT``)."""
    total = sum(c.seconds for c in cases)
    checks = [k for c in cases for k in c.checks]
    counts = {
        "tests": str(len(cases) + len(checks)),
        "failures": str(
            sum(c.status == "failed" for c in cases) + sum(k.status == "failed" for k in checks)
        ),
        "errors": "0",
        "skipped": str(sum(c.status == "skipped" for c in cases)),
        "time": f"{total:.3f}",
    }
    root = ET.Element(
        "testsuites", {"name": suite, **{k: v for k, v in counts.items() if k != "skipped"}}
    )
    ts = ET.SubElement(
        root,
        "testsuite",
        {
            "name": suite,
            **counts,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
            "hostname": socket.gethostname(),
        },
    )
    for c in cases:
        # no file/line attributes: the xunit2 schema Jenkins validates against has none
        # (the failure message carries file:line)
        attrs = {"classname": "gemu.jobs", "name": c.name, "time": f"{c.seconds:.3f}"}
        tc = ET.SubElement(ts, "testcase", attrs)
        if c.status == "skipped":
            ET.SubElement(tc, "skipped", {"message": c.skipped})
        for f in c.failures:
            where = f"{f.file}:{f.line}: " if f.file is not None else ""
            el = ET.SubElement(tc, "failure", {"message": f"{where}{f.message}", "type": "failure"})
            el.text = f"{where}{f.message}"
        for k in c.checks:
            sub = ET.SubElement(
                ts,
                "testcase",
                {"classname": c.name, "name": f"{k.line}: {k.text}", "time": "0.000"},
            )
            if k.status == "failed":
                msg = f"{k.file}:{k.line}: {k.message}"
                el = ET.SubElement(sub, "failure", {"message": msg, "type": "expectation"})
                el.text = msg
    return root


def write_junit(path: str | Path, cases: list[Case]) -> None:
    tree = ET.ElementTree(junit_xml(cases))
    ET.indent(tree)
    tree.write(path, encoding="utf-8", xml_declaration=True)


def write_json(path: str | Path, cases: list[Case]) -> None:
    """``{"tests": N, "failures": N, "skipped": N, "cases": [{name, status, seconds,
    failures: [{message, file, line}], skipped, checks: [{file, line, text, status,
    message}]}]}`` (``checks``: the script's ``expect`` lines)."""
    doc = {
        "tests": len(cases),
        "failures": sum(c.status == "failed" for c in cases),
        "skipped": sum(c.status == "skipped" for c in cases),
        "cases": [asdict(c) for c in cases],
    }
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")
