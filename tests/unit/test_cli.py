"""The command line as an operator runs it: a real subprocess, real exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

POLICIES = Path(__file__).resolve().parents[2] / "policies"

VALID = """\
apiVersion: cgpolicy.dev/v1
kind: CgroupPolicy
metadata: {name: ok}
spec:
  targets: [{path: system.slice/a.service}]
  sysctl: {default: allow, rules: [{action: deny, name: "net.*", access: write}]}
"""

INVALID = """\
apiVersion: cgpolicy.dev/v1
kind: CgroupPolicy
metadata: {name: bad}
spec:
  targets: [{path: /sys/fs/cgroup/x}]
  network:
    egress:
      default: deny
      rules:
        - {action: allow, cidrs: ["10.0.0.1/8"], prots: [443]}
"""


def cgpolicy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cgpolicy", *args], capture_output=True, text=True, timeout=60
    )


def test_version():
    done = cgpolicy("--version")
    assert done.returncode == 0
    assert done.stdout.startswith("cgpolicy ")


def test_validate_shipped_policies_exits_zero():
    done = cgpolicy("validate", str(POLICIES))
    assert done.returncode == 0, done.stderr
    assert "web-egress" in done.stdout


def test_validate_reports_every_problem_with_location_and_exits_two(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(INVALID)
    done = cgpolicy("validate", str(bad))
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith(str(bad))]
    assert len(lines) == 3, done.stderr
    assert any(":10:" in line and "prots" in line and "ports" in line for line in lines)
    assert any("host bits" in line for line in lines)
    assert any("spec.targets[0].path" in line for line in lines)
    assert "Traceback" not in done.stderr


def test_validate_json_gives_the_same_problems_as_objects(tmp_path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(VALID)
    bad.write_text(INVALID)
    done = cgpolicy("validate", "--json", str(good), str(bad))
    assert done.returncode == 2
    report = json.loads(done.stdout)
    assert report["valid"] is False
    assert report["policies"] == ["ok"]
    assert {p["file"] for p in report["problems"]} == {str(bad)}
    assert all(
        {"line", "column", "field", "message", "hint"} <= p.keys() for p in report["problems"]
    )


CHECK_IMPORTS = """
import runpy, sys
sys.argv = ["cgpolicy", *{args!r}]
try:
    runpy.run_module("cgpolicy", run_name="__main__")
except SystemExit:
    pass
heavy = {{"bcc", "pyroute2"}} & set(sys.modules)
assert not heavy, heavy
"""


def test_commands_that_do_not_touch_the_kernel_do_not_import_bcc_or_pyroute2(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(VALID)
    for args in (["--help"], ["validate", str(good)], ["describe", str(good)]):
        code = CHECK_IMPORTS.format(args=args)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.returncode == 0, (args, done.stderr)


def test_describe_says_what_a_policy_enforces(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(VALID)
    done = cgpolicy("describe", str(good))
    assert done.returncode == 0, done.stderr
    assert "deny write net/*" in done.stdout or "deny write net.*" in done.stdout


def test_learn_refuses_an_output_it_cannot_write_before_it_observes(tmp_path):
    marker = tmp_path / "ran"
    for output in (tmp_path, tmp_path / "missing" / "learned.yaml"):
        done = cgpolicy("learn", "-o", str(output), "--", "touch", str(marker))
        assert done.returncode == 2, done
        assert f"-o {output} is" in done.stderr and "Traceback" not in done.stderr
    assert not marker.exists()  # the workload never ran
