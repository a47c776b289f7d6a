"""Policies for tests, built the same way in every test file: typed models (what the
compiler, the reference evaluator and describe() take), YAML text (what validation reads,
at known lines) and policy files (what the CLI, the enforcer and the service read).

pytest puts tests/ on sys.path (the folder of the top conftest.py), so tests/unit and
tests/kernel both import this as ``policy_builders``. (Not ``policies``: that is the folder of
shipped example policies at the top of the repository.)
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cgpolicy.policy.model import (
    IPNetwork,
    Network,
    NetworkRule,
    NetworkSection,
    Policy,
    PortRange,
    Target,
)

# --- typed models -----------------------------------------------------------------------------


def net(*cidrs: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


def ports(*ranges: tuple[int, int]) -> tuple[PortRange, ...]:
    return tuple(PortRange(low, high) for low, high in ranges)


def policy_model(
    mode: str = "enforce", *, name: str = "p", target: str = "x", **sections: Any
) -> Policy:
    """A policy on one cgroup path with the given sections (network=, sockets=, devices=,
    sysctl=), as validation would build it."""
    return Policy(name, mode, (Target(target, False),), **sections)  # type: ignore[arg-type]


def egress_policy(default: str, *rules: NetworkRule, mode: str = "enforce") -> Policy:
    """A policy whose only section is network.egress."""
    section = NetworkSection(default, rules)  # type: ignore[arg-type]
    return policy_model(mode, network=Network(egress=section))


# --- YAML text --------------------------------------------------------------------------------


def policy_text(name: str = "web", spec: str = "") -> str:
    """A minimal valid policy (7 lines: one target, no section), with extra spec lines
    (dedented, then indented by two spaces) appended."""
    return (
        "apiVersion: cgpolicy.dev/v1\nkind: CgroupPolicy\n"
        f"metadata:\n  name: {name}\nspec:\n  targets:\n    - path: system.slice/a.service\n"
        + textwrap.indent(textwrap.dedent(spec), "  ")
    )


def glob_policy_text(name: str, port: int, target: str = "a/*") -> str:
    """A policy on the glob ``target`` denying connects to ``port``: what the reconcile
    tests put in a policy folder (a port per version tells which one is enforced)."""
    return (
        "apiVersion: cgpolicy.dev/v1\nkind: CgroupPolicy\n"
        f'metadata: {{name: {name}}}\nspec:\n  targets: [{{glob: "{target}"}}]\n'
        "  sockets:\n    connect:\n      default: allow\n"
        f"      rules: [{{action: deny, ports: [{port}]}}]\n"
    )


# A policy whose egress rule names interfaces: compiled again when links change.
INTERFACES_POLICY = """\
apiVersion: cgpolicy.dev/v1
kind: CgroupPolicy
metadata: {name: wired}
spec:
  targets: [{glob: "a/*"}]
  network:
    egress:
      default: allow
      rules: [{action: deny, protocol: tcp, interfaces: ["eth*"]}]
"""


# A valid policy with every section and most fields: the fixture `valid_policy` of the unit
# tests, and the seed the fuzz tests mutate.
EVERY_SECTION_POLICY = """\
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


def section_text(where: str, *rules: str, default: str = "allow") -> str:
    """One section of a spec in block style, for policy_text's ``spec``: ``where`` is its
    place (``network.egress``, ``devices``, ...), each rule (flow style) on a line of its
    own::

        section_text("sockets.connect", "{action: deny, ports: [22]}")
    """
    keys = where.split(".")
    text = "".join(f"{'  ' * depth}{key}:\n" for depth, key in enumerate(keys))
    indent = "  " * len(keys)
    text += f"{indent}default: {default}\n{indent}rules:\n"
    return text + "".join(f"{indent}  - {rule}\n" for rule in rules)


# --- files ------------------------------------------------------------------------------------

_files = itertools.count()


def policy_file(
    folder: Path,
    name: str,
    targets: Sequence[str],
    spec: dict[str, Any],
    mode: str = "enforce",
) -> Path:
    """A policy document in a file of its own (JSON is YAML; no anchors, no surprises)."""
    document = {
        "apiVersion": "cgpolicy.dev/v1",
        "kind": "CgroupPolicy",
        "metadata": {"name": name},
        "spec": {"mode": mode, "targets": [{"path": t} for t in targets], **spec},
    }
    path = folder / f"{name}-{next(_files)}.yaml"
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def dns_connect_policy(
    folder: Path,
    name: str,
    targets: Sequence[str | dict[str, str]],
    servers: Sequence[str],
    rules: Sequence[dict[str, Any]],
    dns: dict[str, Any] | None = None,
    dns_protocol: str = "udp",
) -> Path:
    """What the `fqdns` tests enforce: sockets.connect, default deny, port 53 to ``servers``
    by address (over ``dns_protocol``, "any" for both), then ``rules``. ``targets`` are
    paths, or targets as the policy writes them ({"glob": ...})."""
    dns_rule: dict[str, Any] = {
        "action": "allow",
        "cidrs": [host_cidr(server) for server in servers],
        "ports": [53],
    }
    if dns_protocol != "any":
        dns_rule["protocol"] = dns_protocol
    spec: dict[str, Any] = {
        "targets": [{"path": t} if isinstance(t, str) else t for t in targets],
        **({"dns": dns} if dns else {}),
        "sockets": {"connect": {"default": "deny", "rules": [dns_rule, *rules]}},
    }
    return policy_file(folder, name, [], spec)


def host_cidr(address: str) -> str:
    """The one-address CIDR of ``address`` (/32 or /128)."""
    return f"{address}/128" if ":" in address else f"{address}/32"
