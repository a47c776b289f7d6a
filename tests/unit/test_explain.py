"""`cgpolicy explain` as an operator runs it: parsing, output, JSON and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cgpolicy.explain.actions import ExplainError, parse_action, parse_endpoint, sysctl_slash_name
from cgpolicy.reference import DeviceAccess, Packet, SocketAddress, SocketCreate, SysctlAccess

POLICY = """\
apiVersion: cgpolicy.dev/v1
kind: CgroupPolicy
metadata:
  name: web
spec:
  targets:
    - path: system.slice/nginx.service
  network:
    egress:
      default: deny
      rules:
        - {action: allow, protocol: tcp, cidrs: ["10.0.0.0/8"], ports: [443]}
        - action: deny
          protocol: tcp
          cidrs:
            - 10.1.0.0/16
        - {action: allow, protocol: icmp, icmpTypes: [8]}
  sockets:
    create: {default: allow, rules: [{action: deny, family: inet, type: raw}]}
  devices:
    default: deny
    rules:
      - {action: allow, type: char, major: 1, minor: 3, access: rw}
  sysctl:
    default: allow
    rules:
      - {action: deny, name: "net.ipv4.*", access: write}
"""

AUDIT = POLICY.replace("name: web", "name: web-audit").replace("spec:\n", "spec:\n  mode: audit\n")


def cgpolicy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cgpolicy", *args], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def web(tmp_path: Path) -> Path:
    path = tmp_path / "web.yaml"
    path.write_text(POLICY)
    return path


# --- parsing ----------------------------------------------------------------------------------


def test_endpoints() -> None:
    assert parse_endpoint("10.1.2.3:443", True)[1] == 443
    assert str(parse_endpoint("[fd00::1]:443", True)[0]) == "fd00::1"
    assert parse_endpoint("fd00::1", False)[1] is None
    assert parse_endpoint("[fd00::1]", False)[1] is None
    for bad in ("10.1.2.3:70000", "example.com:80", "[fd00::1:443", "fd00::1"):
        with pytest.raises(ExplainError):
            parse_endpoint(bad, True)


def test_actions() -> None:
    packet = parse_action(["egress", "tcp", "10.1.2.3:443"]).action
    assert isinstance(packet, Packet) and (packet.protocol, packet.port) == (6, 443)
    icmp = parse_action(["ingress", "icmpv6", "fd00::1"], icmp_type=129, interface="eth0").action
    assert isinstance(icmp, Packet) and (icmp.icmp_type, icmp.interface) == (129, "eth0")
    assert parse_action(["bind", "udp", "0.0.0.0:53"]).action == SocketAddress(
        "bind", parse_endpoint("0.0.0.0", False)[0], 53, 17
    )
    assert parse_action(["socket", "inet", "stream"]).action == SocketCreate(2, 1, 6)
    assert parse_action(["socket", "inet6", "raw", "icmpv6"]).action == SocketCreate(10, 3, 58)
    assert parse_action(["device", "c", "1:3", "wr"]).action == DeviceAccess("char", 1, 3, "rw")
    assert parse_action(["sysctl", "write", "net.ipv4.ip_forward"]).action == SysctlAccess(
        "net/ipv4/ip_forward", True
    )
    assert sysctl_slash_name("net/ipv4/conf/eth0.100/forwarding").count("/") == 4
    for outside in ("../../etc/shadow", "kernel/../../self/environ", "net/./x", "a\0b"):
        with pytest.raises(ExplainError, match="no sysctl has"):
            sysctl_slash_name(outside)


@pytest.mark.parametrize(
    "words",
    [
        [],
        ["frobnicate"],
        ["egress", "tcp"],
        ["egress", "icmp", "1.1.1.1:80"],
        ["connect", "tcp", "1.1.1.1"],
        ["socket", "carrier-pigeon", "stream"],
        ["device", "x", "1:3", "r"],
        ["device", "c", "1:3", "rr"],
        ["device", "c", "13", "r"],
        ["sysctl", "delete", "kernel.hostname"],
    ],
)
def test_invalid_actions(words: list[str]) -> None:
    with pytest.raises(ExplainError):
        parse_action(words)


# --- the command ------------------------------------------------------------------------------


def test_deny_names_the_rule_with_file_line_and_text(web: Path) -> None:
    done = cgpolicy("explain", str(web), "egress", "tcp", "10.1.2.3:443")
    assert done.returncode == 0, done.stderr
    assert f"{web}:13: deny tcp to 10.1.0.0/16" in done.stdout
    assert "- 10.1.0.0/16" in done.stdout  # the rule as written, all its lines
    assert "overridden" in done.stdout and f"{web}:12" in done.stdout
    assert done.stdout.strip().endswith("verdict: deny")


def test_allow_and_default(web: Path) -> None:
    done = cgpolicy("explain", str(web), "egress", "tcp", "10.2.0.1:443")
    assert done.returncode == 0 and f"{web}:12: allow" in done.stdout
    assert done.stdout.strip().endswith("verdict: allow")
    done = cgpolicy("explain", str(web), "egress", "udp", "[fd00::1]:53")
    assert done.returncode == 0 and "default deny" in done.stdout


def test_other_hooks(web: Path) -> None:
    cases = {
        ("socket", "inet", "raw", "icmp"): "deny family inet type raw",
        ("device", "c", "1:3", "rwm"): "default deny",
        ("sysctl", "write", "net.ipv4.ip_forward"): "deny write net/ipv4/*",
        ("connect", "tcp", "10.2.3.4:443"): "no sockets.connect section",
        # network.egress surely drops it: refused at connect
        ("connect", "tcp", "1.2.3.4:80"): "no rule matches: default deny\n  fails fast",
        ("socket", "unix", "stream"): "only for inet and inet6",
    }
    for words, expected in cases.items():
        done = cgpolicy("explain", str(web), *words)
        assert done.returncode == 0 and expected in done.stdout, (words, done.stdout)


def test_json_and_audit_mode(tmp_path: Path, web: Path) -> None:
    audit = tmp_path / "audit.yaml"
    audit.write_text(AUDIT)
    done = cgpolicy("explain", str(audit), "egress", "tcp", "10.1.2.3:443", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["verdict"] == "allow"
    (entry,) = report["policies"]
    assert (entry["verdict"], entry["effective"], entry["mode"]) == ("deny", "allow", "audit")
    assert entry["rule"]["line"] == 14 and entry["rule"]["text"] == "deny tcp to 10.1.0.0/16"
    # a folder: every policy in it, combined by AND
    done = cgpolicy("explain", str(tmp_path), "egress", "tcp", "10.1.2.3:443", "--json")
    report = json.loads(done.stdout)
    assert report["verdict"] == "deny" and len(report["policies"]) == 2


def test_unknown_fields_are_noted(web: Path) -> None:
    done = cgpolicy("explain", str(web), "egress", "icmp", "8.8.8.8")
    assert done.returncode == 0 and "no --icmp-type given" in done.stdout
    done = cgpolicy("explain", str(web), "egress", "icmp", "8.8.8.8", "--icmp-type", "8")
    assert "allow icmp" in done.stdout and "note:" not in done.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("egress", "tcp", "10.0.0.1:443"),  # neither a policy nor --cgroup
        ("{web}", "egress", "tcp", "not-an-address:443"),
        ("{web}", "connect", "tcp", "10.0.0.1:1", "--icmp-type", "8"),
        ("{web}", "--cgroup", "x", "egress", "tcp", "10.0.0.1:443"),
        ("{web}",),
    ],
)
def test_invalid_input_exits_two(web: Path, args: tuple[str, ...]) -> None:
    done = cgpolicy("explain", *(a.format(web=web) for a in args))
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr


def test_an_invalid_policy_exits_two_with_its_problems(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(POLICY.replace("egress:", "egres:"))
    done = cgpolicy("explain", str(bad), "egress", "tcp", "10.0.0.1:443")
    assert done.returncode == 2 and "egres" in done.stderr


def test_help_documents_the_grammar() -> None:
    done = cgpolicy("explain", "--help")
    assert done.returncode == 0
    for word in ("egress|ingress", "socket FAMILY TYPE", "sysctl read|write", "--cgroup"):
        assert word in done.stdout
