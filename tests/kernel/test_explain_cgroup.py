"""`cgpolicy explain --cgroup`: what cgpolicy applied to a cgroup and its ancestors, read
back from the pins, explained, and checked against what the kernel really does."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

from cgpolicy.enforcer.engine import Enforcer
from cgpolicy.policy.validate import load_paths

PARENT = """\
apiVersion: cgpolicy.dev/v1
kind: CgroupPolicy
metadata: {{name: explain-parent}}
spec:
  targets: [{{path: "{target}"}}]
  sockets:
    connect:
      default: allow
      rules:
        - {{action: deny, protocol: tcp, cidrs: ["127.0.0.2/32"]}}
"""

CHILD = """\
apiVersion: cgpolicy.dev/v1
kind: CgroupPolicy
metadata: {{name: explain-child}}
spec:
  mode: audit
  targets: [{{path: "{target}"}}]
  sockets:
    connect:
      default: deny
      rules:
        - {{action: allow, cidrs: ["127.0.0.0/8"]}}
"""


def explain(root: Path, bpf_dir: Path, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "cgpolicy", "--cgroup-root", str(root), "--bpf-dir", str(bpf_dir)]
        + ["explain", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_explain_a_cgroup_and_its_ancestors(
    scratch_cgroup, cgroup_root: Path, bpf_dir: Path, tmp_path: Path, tcp_server
) -> None:
    child = scratch_cgroup.child("leaf")
    (tmp_path / "parent.yaml").write_text(PARENT.format(target=scratch_cgroup.relative))
    (tmp_path / "child.yaml").write_text(CHILD.format(target=child.relative))
    enforcer = Enforcer(cgroup_root, bpf_dir)
    result = load_paths([tmp_path])
    assert result.ok, result.problems
    outcomes = enforcer.apply(enforcer.plan(result.policies))
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    try:
        denied = explain(
            cgroup_root,
            bpf_dir,
            "--cgroup",
            child.relative,
            "connect",
            "tcp",
            f"127.0.0.2:{tcp_server.port}",
        )
        assert denied["verdict"] == "deny"
        by_name = {p["policy"]: p for p in denied["policies"]}
        assert by_name["explain-parent"]["rule"]["line"] == 10
        assert by_name["explain-parent"]["cgroups"] == [scratch_cgroup.relative]
        assert by_name["explain-child"]["effective"] == "allow"
        probe = child.probe("connect", "tcp", "127.0.0.2", tcp_server.port)
        assert probe.errno == errno.EPERM

        allowed = explain(
            cgroup_root,
            bpf_dir,
            "--cgroup",
            child.relative,
            "connect",
            "tcp",
            f"127.0.0.1:{tcp_server.port}",
        )
        assert allowed["verdict"] == "allow"
        assert child.probe("connect", "tcp", "127.0.0.1", tcp_server.port).ok

        # The parent alone: the child's policy is below it and does not apply.
        parent = explain(
            cgroup_root,
            bpf_dir,
            "--cgroup",
            "/" + scratch_cgroup.relative,
            "connect",
            "tcp",
            "10.9.9.9:80",
        )
        assert [p["policy"] for p in parent["policies"]] == ["explain-parent"]
        assert parent["verdict"] == "allow"
    finally:
        enforcer.apply(enforcer.plan_removal(["explain-parent", "explain-child"]))
