"""`cgpolicy test` through the reference evaluator: the shipped test files, the command's
exit codes and reports, JUnit XML, and the checks of test files (docs/testing.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from cgpolicy.policy.validate import load_paths
from cgpolicy.testing import run_tests
from cgpolicy.testing.evaluate import KernelRun
from cgpolicy.testing.report import junit, render, to_json
from cgpolicy.testing.spec import load_tests

POLICIES = Path(__file__).resolve().parents[2] / "policies"

POLICY = """\
apiVersion: cgpolicy.dev/v1
kind: CgroupPolicy
metadata: {name: web}
spec:
  targets: [{path: system.slice/web.service}]
  network:
    egress:
      default: deny
      rules:
        - {action: allow, cidrs: ["10.0.0.0/8"], protocol: tcp, ports: [443]}
        - {action: deny, cidrs: ["10.1.0.0/16"]}
        - {action: allow, protocol: icmp, icmpTypes: [8]}
"""

HEAD = """\
apiVersion: cgpolicy.dev/v1
kind: CgroupPolicyTest
policies: [web.yaml]
cases:
"""


def cgpolicy(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cgpolicy", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def write_test(folder: Path, cases: str, name: str = "web.test.yaml") -> Path:
    (folder / "web.yaml").write_text(POLICY)
    path = folder / name
    path.write_text(HEAD + cases)
    return path


# --- the shipped test files --------------------------------------------------------------


def test_every_shipped_policy_has_a_test_file_that_passes_and_decides_every_rule() -> None:
    loaded = load_tests([POLICIES])
    assert loaded.ok, [p.format() for p in loaded.problems]
    tested = {policy.name for test in loaded.files for policy in test.policies}
    shipped = {policy.name for policy in load_paths([POLICIES]).policies}
    assert tested == shipped
    report = run_tests(loaded.files)
    bad = [(r.case.name, r.failures) for r in report.results() if r.status != "pass"]
    assert not bad
    assert [u for f in report.files for u in f.unexercised] == []


def test_policy_folders_skip_test_files_and_say_so() -> None:
    result = load_paths([POLICIES])
    assert result.ok
    assert {Path(s.file).name for s in result.skipped} == {
        p.name for p in POLICIES.glob("*.test.yaml")
    }
    assert all("CgroupPolicyTest" in s.message for s in result.skipped)


def test_a_test_file_named_as_a_policy_is_refused(tmp_path: Path) -> None:
    path = write_test(tmp_path, '  - {name: a, action: "egress tcp 10.2.0.1:443", expect: allow}\n')
    done = cgpolicy("apply", path)
    assert done.returncode == 2
    assert f"{path}:1:1: kind: holds a CgroupPolicyTest (test cases), not a policy" in done.stderr
    done = cgpolicy("validate", tmp_path)
    assert done.returncode == 0
    assert "1 policy valid" in done.stdout
    assert f"note: {path}:1:1: kind: a CgroupPolicyTest document" in done.stderr


# --- the command ------------------------------------------------------------------------


def test_passing_cases_exit_0_and_name_unexercised_rules(tmp_path: Path) -> None:
    path = write_test(
        tmp_path,
        '  - {name: https, action: "egress tcp 10.2.0.1:443", expect: allow, '
        'rule: "network.egress.rules[0]"}\n'
        '  - {name: other, action: "egress udp 192.0.2.1:53", expect: deny, rule: default}\n',
    )
    done = cgpolicy("test", path)
    assert done.returncode == 0, done
    assert f"not exercised: {tmp_path / 'web.yaml'}:11: web network.egress.rules[1]: " in (
        done.stdout
    )
    assert "2 cases: 2 passed, 0 failed, 0 disagreements" in done.stdout
    assert "2 rules decided no case" in done.stdout


def test_a_failing_case_exits_1_with_what_was_expected_and_what_decided(tmp_path: Path) -> None:
    path = write_test(
        tmp_path,
        '  - {name: wrong verdict, action: "egress tcp 10.1.2.3:443", expect: allow}\n'
        '  - {name: wrong rule, action: "egress tcp 10.1.2.3:443", expect: deny, '
        'rule: "network.egress.rules[0]"}\n'
        "  - {name: ping, action: egress icmp 10.0.0.1 --icmp-type 8, expect: allow}\n",
    )
    done = cgpolicy("test", path, "--json")
    assert done.returncode == 1, done
    report = json.loads(done.stdout)
    cases = {case["name"]: case for case in report["files"][0]["cases"]}
    assert cases["wrong verdict"]["failures"] == ["expected allow, the policies deny"]
    assert cases["wrong rule"]["failures"] == [
        "expected the deciding rule network.egress.rules[0], got network.egress.rules[1]"
    ]
    assert cases["ping"]["status"] == "pass"
    assert report["summary"]["failed"] == 2


def test_junit_xml_has_a_suite_per_file_and_a_case_per_case(tmp_path: Path) -> None:
    first = write_test(
        tmp_path,
        '  - {name: ok, action: "egress tcp 10.2.0.1:443", expect: allow}\n'
        '  - {name: "bad <&>", action: "egress tcp 10.1.2.3:443", expect: allow}\n',
    )
    second = tmp_path / "second.test.yaml"
    second.write_text(HEAD + '  - {name: ping, action: "egress icmp 10.0.0.1", expect: deny}\n')
    out = tmp_path / "junit.xml"
    done = cgpolicy("test", tmp_path, "--junit", out)
    assert done.returncode == 1, done
    root = ET.parse(out).getroot()
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures")) == ("3", "1")
    suites = {suite.get("name"): suite for suite in root.iter("testsuite")}
    assert set(suites) == {str(second), str(first)}
    cases = suites[str(first)].findall("testcase")
    assert [c.get("name") for c in cases] == ["ok", "bad <&>"]
    assert cases[0].find("failure") is None
    failure = cases[1].find("failure")
    assert failure is not None and failure.get("type") == "fail"
    assert failure.get("message") == "expected allow, the policies deny"


def test_a_disagreement_is_reported_as_its_own_failure() -> None:
    loaded = load_tests([POLICIES / "web-egress.test.yaml"])
    report = run_tests(loaded.files)
    result = report.results()[0]
    result.kernel = KernelRun(
        True,
        disagreements=[
            "verdict: reference allow by network.egress.rules[0], kernel deny by "
            "network.egress.default"
        ],
    )
    assert result.status == "disagreement" and not result.failures
    assert not report.ok
    text = render(report)
    assert "DISAGREEMENT  DNS over UDP to a resolver: egress udp 10.0.0.2:53" in text
    assert "THE KERNEL AND THE REFERENCE EVALUATOR DISAGREE" in text
    assert "1 disagreements between reference and kernel" in text
    assert to_json(report)["summary"]["disagreements"] == 1
    root = ET.fromstring(junit(report))
    failures = [f for f in root.iter("failure") if f.get("type") == "disagreement"]
    assert len(failures) == 1
    assert failures[0].get("message", "").startswith("reference and kernel disagree: verdict")


def test_reference_only_cases_are_reported_not_silently_passed() -> None:
    loaded = load_tests([POLICIES / "build-sandbox.test.yaml"])
    report = run_tests(loaded.files)
    report.kernel = True
    report.results()[0].kernel = KernelRun(False, "rules name interfaces")
    assert "[reference only: rules name interfaces]" in render(report)
    assert "1 reference only" in render(report)


# --- invalid test files -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cases", "expected"),
    [
        (
            '  - {name: a, action: "egress tcp 10.0.0.1:443", expect: alow}\n',
            "web.test.yaml:5:58: cases[0].expect: the string 'alow' is not one of: allow, deny",
        ),
        (
            '  - {name: a, action: "egress tcp 10.0.0.1:443", expect: allow, rules: x}\n',
            "web.test.yaml:5:65: cases[0].rules: unknown field 'rules' (hint: did you mean 'rule'?",
        ),
        (
            '  - {name: a, action: "egress tcp 10.0.0.300:443", expect: allow}\n',
            "web.test.yaml:5:23: cases[0].action: '10.0.0.300' is not an IPv4 or IPv6 address",
        ),
        (
            '  - {name: a, action: "egress tcp 10.0.0.1:443 --mtu 9", expect: allow}\n',
            "web.test.yaml:5:23: cases[0].action: unknown option '--mtu'",
        ),
        (
            '  - {name: a, action: "egress tcp 10.0.0.1:443", expect: allow, '
            'rule: "network.egress.rules[3]"}\n',
            "web.test.yaml:5:71: cases[0].rule: network.egress has 3 rules (rules[0] to rules[2])",
        ),
        (
            '  - {name: a, action: "egress tcp 10.0.0.1:443", expect: allow, '
            'rule: "network.ingress.rules[0]"}\n',
            "cases[0].rule: the action 'egress tcp 10.0.0.1:443' is decided by network.egress, "
            "not network.ingress",
        ),
        (
            '  - {name: a, action: "connect tcp 10.0.0.1:443", expect: allow, '
            'rule: "network.ingress.default"}\n',
            "cases[0].rule: the action 'connect tcp 10.0.0.1:443' is decided by sockets.connect "
            "or network.egress, not network.ingress",
        ),
        (
            '  - {name: a, action: "sysctl read kernel.hostname", expect: allow, rule: default}\n',
            "cases[0].rule: no policy of this test has a sysctl section",
        ),
        (
            '  - {name: a, action: "egress tcp 10.0.0.1:443", expect: allow}\n'
            '  - {name: a, action: "egress tcp 10.0.0.2:443", expect: allow}\n',
            "web.test.yaml:6:12: cases[1].name: case name 'a' is used already, on line 5",
        ),
        ("  - {name: a, action: [egress], expect: allow\n", "web.test.yaml:6:1: invalid YAML"),
    ],
)
def test_bad_test_files_exit_2_with_file_line_and_field(
    tmp_path: Path, cases: str, expected: str
) -> None:
    path = write_test(tmp_path, cases)
    done = cgpolicy("test", path)
    assert done.returncode == 2, done
    assert expected in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_missing_or_invalid_policy_is_an_invalid_test_file(tmp_path: Path) -> None:
    path = write_test(tmp_path, '  - {name: a, action: "egress tcp 10.0.0.1:443", expect: allow}\n')
    path.write_text(path.read_text().replace("[web.yaml]", "[nothere.yaml]"))
    done = cgpolicy("test", path)
    assert done.returncode == 2
    assert f"{path}:3:12: policies[0]: 'nothere.yaml': no such file or folder here" in done.stderr
    (tmp_path / "web.yaml").write_text(POLICY.replace("deny\n", "dney\n", 1))
    path.write_text(path.read_text().replace("[nothere.yaml]", "[web.yaml]"))
    done = cgpolicy("test", path)
    assert done.returncode == 2
    assert f"{tmp_path / 'web.yaml'}:8:16: spec.network.egress.default:" in done.stderr


def test_a_folder_without_test_files_and_a_policy_named_as_a_test_are_invalid(
    tmp_path: Path,
) -> None:
    (tmp_path / "web.yaml").write_text(POLICY)
    done = cgpolicy("test", tmp_path)
    assert done.returncode == 2
    assert "folder holds no CgroupPolicyTest file" in done.stderr
    done = cgpolicy("test", tmp_path / "web.yaml")
    assert done.returncode == 2
    assert "web.yaml:1:1: kind: not a CgroupPolicyTest file" in done.stderr


NAMES_POLICY = """\
apiVersion: cgpolicy.dev/v1
kind: CgroupPolicy
metadata: {name: names}
spec:
  targets: [{path: x}]
  network:
    egress:
      default: deny
      rules:
        - {action: allow, fqdns: ["api.example.com", "*.s3.example.com"], protocol: tcp}
"""


def test_names_say_which_dns_answers_taught_the_address(tmp_path: Path) -> None:
    (tmp_path / "names.yaml").write_text(NAMES_POLICY)
    path = tmp_path / "names.test.yaml"
    path.write_text(
        "apiVersion: cgpolicy.dev/v1\nkind: CgroupPolicyTest\npolicies: [names.yaml]\n"
        "cases:\n"
        '  - {name: api, action: "egress tcp 192.0.2.7:443", names: [API.example.com.],'
        ' expect: allow, rule: "rules[0]"}\n'
        '  - {name: bucket, action: "egress tcp 192.0.2.8:443", names: [b.s3.example.com],'
        " expect: allow}\n"
        '  - {name: apex, action: "egress tcp 192.0.2.8:443", names: [s3.example.com],'
        " expect: deny, rule: default}\n"
        '  - {name: nothing learned, action: "egress tcp 192.0.2.7:443", expect: deny}\n'
    )
    loaded = load_tests([path])
    assert loaded.ok, [p.format() for p in loaded.problems]
    report = run_tests(loaded.files)
    assert [r.status for r in report.results()] == ["pass"] * 4
    path.write_text(
        path.read_text().replace(
            '"egress tcp 192.0.2.7:443", names', '"bind tcp 0.0.0.0:80", names'
        )
    )
    done = cgpolicy("test", path)
    assert done.returncode == 2
    assert "cases[0].names: names apply to egress, ingress, connect and sendmsg only" in (
        done.stderr
    )
