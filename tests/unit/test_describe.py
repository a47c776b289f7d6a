"""describe(): the human summary of what a policy would enforce."""

from __future__ import annotations

import ipaddress

from policy_builders import net

from cgpolicy.policy.describe import describe
from cgpolicy.policy.model import (
    DeviceRule,
    DeviceSection,
    Network,
    NetworkRule,
    NetworkSection,
    Policy,
    PortRange,
    SocketAddressRule,
    SocketAddressSection,
    SocketCreateRule,
    SocketCreateSection,
    Sockets,
    SysctlRule,
    SysctlSection,
    Target,
)


def web_policy(mode: str = "enforce") -> Policy:
    return Policy(
        name="web",
        mode=mode,  # type: ignore[arg-type]
        targets=(
            Target("system.slice/nginx.service", is_glob=False),
            Target("kubepods.slice/*/cri-containerd-*.scope", is_glob=True),
        ),
        network=Network(
            egress=NetworkSection(
                default="deny",
                rules=(
                    NetworkRule("allow", net("10.0.0.0/8"), "tcp", (PortRange(443, 443),)),
                    NetworkRule("deny", net("169.254.169.254/32")),
                ),
            ),
            ingress=NetworkSection(
                default="deny",
                rules=(NetworkRule("allow", (), "tcp", (PortRange(80, 80), PortRange(443, 443))),),
            ),
        ),
    )


def test_deny_rules_are_listed_before_allow_rules_then_the_default() -> None:
    text = describe(web_policy())
    egress = text.split("network.egress:\n")[1].splitlines()
    assert egress[0].strip() == "deny any to 169.254.169.254/32"
    assert egress[1].strip() == "allow tcp to 10.0.0.0/8 port 443"
    assert egress[2].strip() == "default deny"


def test_header_names_the_policy_and_mode_and_lists_targets() -> None:
    lines = describe(web_policy()).splitlines()
    assert lines[0] == "policy web (enforce)"
    assert (
        lines[1]
        == "  targets: system.slice/nginx.service, glob kubepods.slice/*/cri-containerd-*.scope"
    )


def test_audit_mode_says_nothing_is_denied() -> None:
    assert "denies nothing" in describe(web_policy(mode="audit")).splitlines()[0]


def test_ingress_ports_are_shown_as_local_ports() -> None:
    assert "allow tcp from any address local ports 80,443" in describe(web_policy())


def test_missing_sections_are_reported_as_left_alone() -> None:
    last = describe(web_policy()).splitlines()[-1]
    assert last == "  left alone: sockets.create, sockets.bind, sockets.connect, devices, sysctl"


def test_long_cidr_lists_are_cut_with_a_count() -> None:
    cidrs = tuple(ipaddress.ip_network(f"10.{i // 256}.{i % 256}.0/24") for i in range(1000))
    policy = Policy(
        name="many",
        mode="enforce",
        targets=(Target("a.slice", is_glob=False),),
        network=Network(egress=NetworkSection("allow", (NetworkRule("deny", cidrs),))),
    )
    text = describe(policy)
    assert "deny any to 10.0.0.0/24,10.0.1.0/24,10.0.2.0/24 (+997 more, 1000 CIDRs)" in text
    assert "10.3.231.0/24" not in text


def test_sockets_devices_and_sysctl_use_names_not_numbers() -> None:
    policy = Policy(
        name="baseline",
        mode="enforce",
        targets=(Target("docker-*.scope", is_glob=True),),
        sockets=Sockets(
            create=SocketCreateSection(
                "allow",
                (SocketCreateRule("deny", family=10, type=3), SocketCreateRule("deny", family=17)),
            ),
            bind=SocketAddressSection(
                "allow", (SocketAddressRule("deny", (), "tcp", (PortRange(1, 1023),)),)
            ),
            connect=SocketAddressSection(
                "allow", (SocketAddressRule("deny", net("fd00:ec2::254")),)
            ),
        ),
        devices=DeviceSection(
            "deny",
            (
                DeviceRule("allow", "char", 1, 3, "rw", path="/dev/null"),
                DeviceRule("allow", "block", None, None, "m"),
            ),
        ),
        sysctl=SysctlSection("allow", (SysctlRule("deny", "net/ipv4/*", "write"),)),
    )
    text = describe(policy)
    assert "deny family inet6 type raw" in text
    assert "deny family packet type any" in text
    assert "deny tcp on any address ports 1-1023" in text
    assert "deny any to fd00:ec2::254/128" in text
    assert "allow c 1:3 rw (/dev/null)" in text
    assert "allow b *:* m" in text
    assert "deny write net/ipv4/*" in text
    assert "left alone: network.egress, network.ingress" in text


def test_ipv4_mapped_addresses_are_shown_dotted() -> None:
    policy = Policy(
        name="mapped",
        mode="enforce",
        targets=(Target("a.slice", is_glob=False),),
        sockets=Sockets(
            connect=SocketAddressSection(
                "allow", (SocketAddressRule("deny", net("::ffff:169.254.169.254/128")),)
            )
        ),
    )
    assert "deny any to ::ffff:169.254.169.254/128" in describe(policy)


def test_section_without_rules_says_so() -> None:
    policy = Policy(
        name="quiet",
        mode="enforce",
        targets=(Target("a.slice", is_glob=False),),
        sysctl=SysctlSection("deny"),
    )
    assert "  sysctl:\n    default deny (no rules)\n" in describe(policy)


def test_describe_is_deterministic() -> None:
    assert describe(web_policy()) == describe(web_policy())
