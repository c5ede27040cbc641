"""``gemu run --junit-xml FILE --json FILE``: one test case per job script, failures with
file:line and message, scripts after a failure skipped, power-off as its own case; the XML
read back by junitparser (the reader CI tools use) and checked element by element."""

from __future__ import annotations

import json
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from junitparser import Failure, JUnitXml, Skipped

from gemu.host.machine import _gemu_command


def _run(tmp_path, *scripts: str):
    paths = []
    for i, text in enumerate(scripts):
        p = tmp_path / f"s{i}.job"
        p.write_text(text)
        paths.append(str(p))
    xml, js = tmp_path / "r.xml", tmp_path / "r.json"
    r = subprocess.run(
        [*_gemu_command(), "run", "-q", "--device", "inproc", "--junit-xml", str(xml)]
        + ["--json", str(js), *paths],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return r, paths, xml, json.loads(js.read_text())


OK = "a = bo 4K\nfill a 5\nexpect value a == 5\n"
BAD = "a = bo 4K\nfill a 5\nexpect value a == 6\n"


def test_junit_and_json_name_each_script_and_the_failing_line(tmp_path):
    """ok, failing, then a script never run: passed, failed at s1.job:3 with the message,
    skipped naming why; poweroff passes; the exit status is 1."""
    r, paths, xml, doc = _run(tmp_path, OK, BAD, OK)
    assert r.returncode == 1, r.stderr
    suites = list(JUnitXml.fromfile(str(xml)))
    assert len(suites) == 1
    suite = suites[0]
    # three scripts, poweroff, and a sub-case for each expect line that ran
    assert (suite.tests, suite.failures, suite.errors, suite.skipped) == (6, 2, 0, 1)
    cases = list(suite)
    assert [(c.classname, c.name) for c in cases] == [
        ("gemu.jobs", paths[0]),
        (paths[0], "3: expect value a == 5"),
        ("gemu.jobs", paths[1]),
        (paths[1], "3: expect value a == 6"),
        ("gemu.jobs", paths[2]),
        ("gemu.jobs", "poweroff"),
    ]
    assert cases[0].is_passed and cases[1].is_passed and cases[5].is_passed
    (fail,) = cases[2].result
    assert isinstance(fail, Failure)
    assert fail.message == f"{paths[1]}:3: expect value a: got 5, expected == 6"
    (sub,) = cases[3].result
    assert isinstance(sub, Failure) and sub.message == fail.message
    (skip,) = cases[4].result
    assert isinstance(skip, Skipped) and skip.message == f"not run: {paths[1]} failed"
    assert doc["tests"] == 4 and doc["failures"] == 1 and doc["skipped"] == 1
    assert doc["cases"][1]["failures"] == [
        {"message": "expect value a: got 5, expected == 6", "file": paths[1], "line": 3}
    ]
    assert doc["cases"][1]["checks"] == [
        {
            "file": paths[1],
            "line": 3,
            "text": "expect value a == 6",
            "status": "failed",
            "message": "expect value a: got 5, expected == 6",
        }
    ]
    assert [k["status"] for k in doc["cases"][0]["checks"]] == ["passed"]


def test_the_xml_is_valid_against_the_jenkins_junit_schema(tmp_path):
    """Validated with a real XML Schema validator (xmlschema) against the JUnit structure
    Jenkins accepts (tests/data/junit-jenkins.xsd), for a run with passed, failed, skipped
    and sub-cases; a report that breaks the structure is refused by the same check."""
    import xmlschema

    schema = xmlschema.XMLSchema(str(Path(__file__).parents[2] / "data" / "junit-jenkins.xsd"))
    _, _, xml, _ = _run(tmp_path, OK, BAD, OK)
    schema.validate(str(xml))
    broken = xml.read_text().replace('<testsuite name="gemu run"', "<testsuite", 1)
    assert not schema.is_valid(broken)  # the required suite name is missing


def test_xml_has_only_the_elements_and_attributes_ci_schemas_allow(tmp_path):
    """Strict structure check of the Jenkins/GitLab (xunit2) shape: element names, required
    attributes, counts that add up, numeric times; a job failing with EFAULT fails its script at the wait line."""
    r, paths, xml, _ = _run(tmp_path, "f = submit fault\nwait f\n", OK)
    assert r.returncode == 1
    root = ET.parse(xml).getroot()
    assert root.tag == "testsuites"
    assert set(root.attrib) <= {"name", "time", "tests", "failures", "disabled", "errors"}
    (suite,) = list(root)
    assert suite.tag == "testsuite"
    allowed = {"name", "tests", "failures", "errors", "skipped", "time", "timestamp", "hostname"}
    assert set(suite.attrib) <= allowed and {"name", "tests"} <= set(suite.attrib)
    cases = list(suite)
    assert all(c.tag == "testcase" for c in cases)
    assert int(suite.get("tests")) == len(cases)
    for c in cases:
        assert set(c.attrib) == {"classname", "name", "time"}
        float(c.get("time"))
        for child in c:
            assert child.tag in ("failure", "skipped")
            assert set(child.attrib) <= {"message", "type"}
    failed = [c for c in cases if c.find("failure") is not None]
    assert int(suite.get("failures")) == len(failed)
    msg = failed[0].find("failure").get("message")
    assert failed[0].get("name") == paths[0] and msg.startswith(
        f"{paths[0]}:2: f: job failed: -EFAULT"
    )


def test_all_passing_run_exits_0_with_every_case_passed(tmp_path):
    """Two passing scripts: exit 0, three passed cases (two scripts and poweroff)."""
    r, _, xml, doc = _run(tmp_path, OK, OK)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [c["status"] for c in doc["cases"]] == ["passed"] * 3
    assert JUnitXml.fromfile(str(xml)).failures == 0
