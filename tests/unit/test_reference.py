"""The reference evaluator (cgpolicy.reference) on the semantics docs/policy.md states."""

from __future__ import annotations

import ipaddress

import pytest
from policy_builders import egress_policy, net, policy_model, ports

from cgpolicy import reference
from cgpolicy.policy.model import (
    DeviceRule,
    DeviceSection,
    Network,
    NetworkRule,
    NetworkSection,
    Policy,
    SocketAddressRule,
    SocketAddressSection,
    SocketCreateRule,
    SocketCreateSection,
    Sockets,
    SourceLocation,
    SysctlRule,
    SysctlSection,
)
from cgpolicy.reference import (
    UNKNOWN,
    DeviceAccess,
    Packet,
    SocketAddress,
    SocketCreate,
    SysctlAccess,
    evaluate,
)

TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58


def ip(text: str) -> reference.IPAddress:
    return ipaddress.ip_address(text)


def out(address: str, protocol: int | None = TCP, port: int | None = 443, **kw: object) -> Packet:
    return Packet("egress", ip(address), protocol, port, **kw)  # type: ignore[arg-type]


# --- how rules decide -------------------------------------------------------------------------


def test_deny_wins_then_allow_then_default() -> None:
    allow = NetworkRule("allow", net("10.0.0.0/8"))
    deny = NetworkRule("deny", net("10.1.0.0/16"))
    p = egress_policy("deny", allow, deny)
    verdict = evaluate(p, out("10.1.2.3"))
    assert (verdict.allowed, verdict.rule, verdict.decided_by) == (False, deny, "rule")
    assert verdict.matching == (deny, allow)
    assert evaluate(p, out("10.2.0.1")).rule == allow
    default = evaluate(p, out("11.0.0.1"))
    assert (default.allowed, default.decided_by, default.rule) == (False, "default", None)


def test_allow_inside_a_deny_never_wins_whatever_the_order() -> None:
    # docs/policy.md "A common mistake: allowing a subset of a deny"
    deny = NetworkRule("deny", protocol="tcp", ports=ports((443, 443)))
    allow = NetworkRule("allow", net("10.0.0.0/8"), "tcp", ports((443, 443)))
    for p in (egress_policy("allow", deny, allow), egress_policy("allow", allow, deny)):
        assert evaluate(p, out("10.1.1.1")).rule == deny
        assert evaluate(p, out("10.1.1.1", port=80)).decided_by == "default"


def test_conditions_and_list_members_or() -> None:
    rule = NetworkRule(
        "allow", net("10.0.0.0/8", "192.0.2.0/24"), "tcp", ports((443, 443), (8443, 8443))
    )
    p = egress_policy("deny", rule)
    assert evaluate(p, out("192.0.2.7", port=8443)).allowed
    assert not evaluate(p, out("192.0.2.7", port=80)).allowed
    assert not evaluate(p, out("192.0.2.7", UDP, 443)).allowed
    assert not evaluate(p, out("172.16.0.1", port=443)).allowed


def test_audit_mode_reports_but_lets_through() -> None:
    p = egress_policy("deny", mode="audit")
    verdict = evaluate(p, out("10.0.0.1"))
    assert (verdict.allowed, verdict.effective, verdict.audit) == (False, True, True)


def test_a_missing_section_leaves_the_hook_alone() -> None:
    verdict = evaluate(egress_policy("deny"), Packet("ingress", ip("10.0.0.1"), TCP, 22))
    assert (verdict.allowed, verdict.decided_by) == (True, "no-section")


def test_the_named_rule_is_the_first_in_canonical_order_and_keeps_its_source() -> None:
    here = SourceLocation("web.yaml", 12, 11)
    a = NetworkRule("deny", net("10.0.0.0/8"), source=here)
    b = NetworkRule("deny", protocol="tcp", source=SourceLocation("web.yaml", 13, 11))
    for p in (egress_policy("allow", a, b), egress_policy("allow", b, a)):
        verdict = evaluate(p, out("10.0.0.1"))
        assert verdict.rule is not None and verdict.rule.source is not None
        assert {r.source for r in verdict.matching} == {a.source, b.source}
        assert verdict.rule == evaluate(egress_policy("allow", b, a), out("10.0.0.1")).rule


# --- network ----------------------------------------------------------------------------------


def test_remote_address_and_port_by_direction() -> None:
    rule = NetworkRule("allow", net("10.0.0.0/8"), "tcp", ports((22, 22)))
    p = policy_model(network=Network(ingress=NetworkSection("deny", (rule,))))
    # ingress: the remote end is the source; the port is the local (destination) port
    assert evaluate(p, Packet("ingress", ip("10.1.1.1"), TCP, 22)).allowed
    assert not evaluate(p, Packet("ingress", ip("11.1.1.1"), TCP, 22)).allowed


def test_ipv4_mapped_addresses_meet_ipv4_rules_but_not_the_reverse() -> None:
    p = egress_policy("allow", NetworkRule("deny", net("10.0.0.0/8")))
    assert not evaluate(p, out("::ffff:10.1.2.3")).allowed
    assert evaluate(p, out("::ffff:11.1.2.3")).allowed
    mapped = egress_policy("allow", NetworkRule("deny", net("::ffff:10.0.0.0/104")))
    assert not evaluate(mapped, out("::ffff:10.1.2.3")).allowed
    assert evaluate(mapped, out("10.1.2.3")).allowed


def test_families_do_not_mix() -> None:
    p = egress_policy("deny", NetworkRule("allow", net("0.0.0.0/0")))
    assert evaluate(p, out("10.0.0.1")).allowed
    assert not evaluate(p, out("fd00::1")).allowed


def test_protocols_by_number_and_icmp_types() -> None:
    p = egress_policy(
        "deny",
        NetworkRule("allow", protocol="icmp", icmp_types=(8,)),
        NetworkRule("allow", protocol="icmpv6", icmp_types=(128,)),
    )
    assert evaluate(p, out("1.1.1.1", ICMP, None, icmp_type=8)).allowed
    assert evaluate(p, out("fd00::1", ICMP, None, icmp_type=8)).allowed  # ICMP is 1 anywhere
    assert not evaluate(p, out("1.1.1.1", ICMP, None, icmp_type=128)).allowed
    assert evaluate(p, out("fd00::1", ICMPV6, None, icmp_type=128)).allowed
    assert not evaluate(p, out("fd00::1", TCP, 128)).allowed


def test_packets_without_ports_do_not_match_rules_with_ports() -> None:
    p = egress_policy("allow", NetworkRule("deny", protocol="tcp", ports=ports((1, 65535))))
    assert evaluate(p, out("1.1.1.1", ICMP, None, icmp_type=8)).allowed
    assert evaluate(p, out("1.1.1.1", 47, None)).allowed


@pytest.mark.parametrize(
    "packet",
    [
        out("10.0.0.1", TCP, None),  # a non-first fragment: no port
        out("10.0.0.1", None, None),  # protocol unknown (IPv6 extension headers)
        Packet("egress", None, None),  # not IP at all
    ],
)
def test_unknown_fields_match_deny_rules_and_not_allow_rules(packet: Packet) -> None:
    deny = NetworkRule("deny", net("10.0.0.0/8"), "tcp", ports((443, 443)))
    assert not evaluate(egress_policy("allow", deny), packet).allowed
    allow = NetworkRule("allow", net("10.0.0.0/8"), "tcp", ports((443, 443)))
    assert evaluate(egress_policy("deny", allow), packet).decided_by == "default"


def test_an_unknown_field_only_matters_to_rules_that_constrain_it() -> None:
    # A non-first TCP fragment passes an allow rule without ports ...
    assert evaluate(
        egress_policy("deny", NetworkRule("allow", protocol="tcp")), out("1.1.1.1", TCP, None)
    ).allowed
    # ... and a deny rule for another protocol does not stop it.
    assert evaluate(
        egress_policy("allow", NetworkRule("deny", protocol="udp", ports=ports((53, 53)))),
        out("1.1.1.1", TCP, None),
    ).allowed


def test_interfaces_are_globs_and_unknown_without_a_device() -> None:
    p = egress_policy("deny", NetworkRule("allow", interfaces=("wg*", "eth0")))
    assert evaluate(p, out("1.1.1.1", interface="wg3")).allowed
    assert not evaluate(p, out("1.1.1.1", interface="eth1")).allowed
    assert not evaluate(p, out("1.1.1.1")).allowed  # interface None: unknown
    deny = egress_policy("allow", NetworkRule("deny", interfaces=("eth0",)))
    assert not evaluate(deny, out("1.1.1.1")).allowed


def test_three_valued_matching() -> None:
    assert reference.rule_matches(NetworkRule("deny"), [True, UNKNOWN])
    assert not reference.rule_matches(NetworkRule("allow"), [True, UNKNOWN])
    assert not reference.rule_matches(NetworkRule("deny"), [False, UNKNOWN])


# --- sockets ----------------------------------------------------------------------------------


def sockets(**sections: object) -> Policy:
    return policy_model(sockets=Sockets(**sections))  # type: ignore[arg-type]


def test_connect_protocol_any_means_tcp_and_udp_and_others_are_unknown() -> None:
    allow = SocketAddressRule("allow", net("10.0.0.0/8"), "any", ports((53, 53)))
    p = sockets(connect=SocketAddressSection("deny", (allow,)))
    assert evaluate(p, SocketAddress("connect", ip("10.0.0.2"), 53, UDP)).allowed
    assert evaluate(p, SocketAddress("connect", ip("10.0.0.2"), 53, TCP)).allowed
    # an ICMP ping socket has no TCP/UDP port: an allow rule with ports does not let it in
    assert not evaluate(p, SocketAddress("connect", ip("10.0.0.2"), 0, ICMP)).allowed
    deny = SocketAddressRule("deny", net("169.254.169.254/32"), "tcp", ports((80, 80)))
    q = sockets(connect=SocketAddressSection("allow", (deny,)))
    assert not evaluate(q, SocketAddress("connect", ip("169.254.169.254"), 0, ICMP)).allowed


def test_bind_uses_the_local_address_literally_and_port_zero() -> None:
    rule = SocketAddressRule("deny", net("127.0.0.1/32"), "tcp", ports((1, 1023)))
    p = sockets(bind=SocketAddressSection("allow", (rule,)))
    assert not evaluate(p, SocketAddress("bind", ip("127.0.0.1"), 80, TCP)).allowed
    assert evaluate(p, SocketAddress("bind", ip("0.0.0.0"), 80, TCP)).allowed
    assert evaluate(p, SocketAddress("bind", ip("127.0.0.1"), 0, TCP)).allowed


def test_udp_to_mapped_addresses_is_also_a_send_to_the_ipv4_address() -> None:
    mapped, v4 = ip("::ffff:10.0.0.2"), ip("10.0.0.2")
    views = reference.socket_address_views("connect", mapped, 53, UDP)
    assert views == [
        SocketAddress("connect", mapped, 53, UDP),
        SocketAddress("sendmsg", v4, 53, UDP),
    ]
    assert reference.socket_address_views("sendmsg", mapped, 53, UDP) == [
        SocketAddress("sendmsg", v4, 53, UDP)
    ]
    assert reference.socket_address_views("connect", mapped, 53, TCP) == [
        SocketAddress("connect", mapped, 53, TCP)
    ]


def test_socket_create() -> None:
    rule = SocketCreateRule("deny", family=2, type=3)
    p = sockets(create=SocketCreateSection("allow", (rule,)))
    assert not evaluate(p, SocketCreate(2, 3, 1)).allowed
    assert evaluate(p, SocketCreate(2, 2, 1)).allowed  # ICMP datagram (ping) sockets
    assert evaluate(p, SocketCreate(10, 3, 58)).allowed
    unix = evaluate(sockets(create=SocketCreateSection("deny")), SocketCreate(1, 1, 0))
    assert (unix.allowed, unix.decided_by) == (True, "not-checked")


# --- devices ----------------------------------------------------------------------------------


def test_device_allow_must_cover_every_right_deny_matches_any() -> None:
    rw = DeviceRule("allow", "char", 1, 3, "rw")
    p = policy_model(devices=DeviceSection("deny", (rw,)))
    assert evaluate(p, DeviceAccess("char", 1, 3, "rw")).allowed
    assert evaluate(p, DeviceAccess("char", 1, 3, "r")).allowed
    assert not evaluate(p, DeviceAccess("char", 1, 3, "rwm")).allowed
    assert not evaluate(p, DeviceAccess("block", 1, 3, "r")).allowed
    deny_w = DeviceRule("deny", "any", None, None, "w")
    q = policy_model(devices=DeviceSection("allow", (deny_w,)))
    assert not evaluate(q, DeviceAccess("char", 1, 3, "rw")).allowed
    assert evaluate(q, DeviceAccess("block", 8, 0, "rm")).allowed


def test_device_wildcards() -> None:
    pts = DeviceRule("allow", "char", 136, None, "rwm")
    p = policy_model(devices=DeviceSection("deny", (pts,)))
    assert evaluate(p, DeviceAccess("char", 136, 7, "rw")).allowed
    assert not evaluate(p, DeviceAccess("char", 137, 7, "rw")).allowed


# --- sysctl -----------------------------------------------------------------------------------


def test_sysctl_globs_cross_slashes_and_access() -> None:
    rule = SysctlRule("deny", "net/ipv4/*", "write")
    p = policy_model(sysctl=SysctlSection("allow", (rule,)))
    assert not evaluate(p, SysctlAccess("net/ipv4/conf/all/forwarding", True)).allowed
    assert evaluate(p, SysctlAccess("net/ipv4/conf/all/forwarding", False)).allowed
    assert evaluate(p, SysctlAccess("net/ipv6/conf/all/forwarding", True)).allowed
    assert reference.sysctl_name_matches("*", "kernel/hostname")
    assert reference.sysctl_name_matches("kernel/*name", "kernel/hostname")
    assert not reference.sysctl_name_matches("kernel/host", "kernel/hostname")
    assert reference.sysctl_name_matches(
        "net/ipv4/conf/eth0.100/*", "net/ipv4/conf/eth0.100/rp_filter"
    )
    assert not reference.sysctl_name_matches(
        "net/ipv4/conf/eth0.100/*", "net/ipv4/conf/eth0x100/rp_filter"
    )


def test_sysctl_names_too_long_to_read_match_deny_rules_only() -> None:
    long = "net/" + "x" * 300
    deny = policy_model(sysctl=SysctlSection("allow", (SysctlRule("deny", "kernel/*", "write"),)))
    assert not evaluate(deny, SysctlAccess(long, True)).allowed
    assert evaluate(deny, SysctlAccess(long, False)).allowed  # the rule is for writes
    allow = policy_model(sysctl=SysctlSection("deny", (SysctlRule("allow", "*"),)))
    assert not evaluate(allow, SysctlAccess(long, False)).allowed
