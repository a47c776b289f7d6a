"""Shared helpers for the policy loading and validation tests."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from policy_builders import policy_text

VALID_POLICY = """\
apiVersion: cgpolicy.dev/v1
kind: CgroupPolicy
metadata:
  name: web
  description: the web tier
spec:
  mode: audit
  targets:
    - path: system.slice/nginx.service
    - glob: "kubepods.slice/*/cri-containerd-*.scope"
  network:
    egress:
      default: deny
      rules:
        - action: allow
          cidrs: ["10.0.0.0/8", "fd00::/8", "192.0.2.1"]
          protocol: tcp
          ports: [443, "8000-8100"]
          interfaces: ["eth0", "wg*"]
        - action: allow
          protocol: icmp
          icmpTypes: [0, 8]
  sockets:
    create: {default: allow, rules: [{action: deny, family: inet6, type: raw}]}
    bind: {default: allow, rules: [{action: deny, protocol: tcp, ports: ["1-1023"]}]}
    connect: {default: allow, rules: [{action: deny, cidrs: ["169.254.169.254/32"]}]}
  devices:
    default: deny
    rules:
      - {action: allow, type: char, major: 1, minor: 3, access: rwm}
      - {action: allow, path: /dev/null, access: wr}
  sysctl:
    default: allow
    rules:
      - {action: deny, name: "net.ipv4.*", access: write}
      - {action: deny, name: "net/ipv4/conf/eth0.100/forwarding"}
"""


WriteFile = Callable[..., Path]


@pytest.fixture
def write(tmp_path: Path) -> WriteFile:
    """Write text (dedented) or bytes to a file in tmp_path and return its path."""

    def write_file(content: str | bytes, name: str = "policy.yaml") -> Path:
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(textwrap.dedent(content), encoding="utf-8")
        return path

    return write_file


@pytest.fixture
def valid_policy() -> str:
    return VALID_POLICY


@pytest.fixture
def make_policy() -> Callable[..., str]:
    return policy_text
