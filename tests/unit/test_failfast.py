"""Denials that fail fast (docs/policy.md): network.egress checked at connect time. The
reference's connect-time verdict (reference.egress_at_connect) never refuses what the
packet verdict could allow on any interface; the compiler attaches the checks only where
they can refuse, on the egress program's maps; `failFast` in the language; the event."""

from __future__ import annotations

import ipaddress
import socket

from hypothesis import given, settings
from hypothesis import strategies as st
from policy_builders import egress_policy, net, policy_model, policy_text, ports

from cgpolicy.compiler.compile import compile_policy
from cgpolicy.contract import EGRESS_AT_CONNECT, EVENT, attach_hook
from cgpolicy.events.decode import decode
from cgpolicy.explain.actions import parse_action
from cgpolicy.explain.explanation import Explanation, explain_policies
from cgpolicy.explain.render import to_json
from cgpolicy.policy.model import Network, NetworkRule, NetworkSection
from cgpolicy.policy.validate import load_contents
from cgpolicy.reference import Packet, SocketAddress, egress_at_connect, evaluate

TCP, UDP = 6, 17
INTERFACES = ("lo", "eth0", "eth1", "wg0", None)


def connect(address: str, port: int = 443, protocol: int = TCP, **kw: object) -> SocketAddress:
    return SocketAddress("connect", ipaddress.ip_address(address), port, protocol, **kw)  # type: ignore[arg-type]


def rule(action: str, *cidrs: str, **fields: object) -> NetworkRule:
    return NetworkRule(action, net(*cidrs), **fields)  # type: ignore[arg-type]


WEB = egress_policy(
    "deny",
    rule("allow", "10.0.0.0/8", protocol="tcp", ports=ports((443, 443))),
    rule("deny", "10.66.0.0/16"),
    rule("deny", "10.1.0.0/16", interfaces=("eth0",)),
    rule("allow", "192.168.0.0/16", interfaces=("eth1",)),
    rule("allow", "::ffff:172.16.0.0/108", protocol="tcp"),
    rule("deny", "10.2.0.0/16", protocol="icmp", icmp_types=(8,)),
)


def test_what_fails_fast_and_what_only_drops() -> None:
    refused = egress_at_connect(WEB, connect("10.66.0.1"))
    assert refused is not None and refused.decided_by == "rule"
    assert refused.rule is not None and tuple(refused.rule.cidrs) == net("10.66.0.0/16")
    # the IPv4-mapped form is the IPv4 packet it becomes
    assert egress_at_connect(WEB, connect("::ffff:10.66.0.1")) == refused
    default = egress_at_connect(WEB, connect("8.8.8.8", 53, UDP))
    assert default is not None and default.decided_by == "default" and default.rule is None
    # allowed
    assert egress_at_connect(WEB, connect("10.3.0.1")) is None
    assert egress_at_connect(WEB, connect("::ffff:10.3.0.1")) is None
    # a deny rule naming an interface: only the packet on it drops
    assert egress_at_connect(WEB, connect("10.1.0.1")) is None
    # an allow rule naming an interface may match: not refused
    assert egress_at_connect(WEB, connect("192.168.1.1", 80)) is None
    # written in the mapped form: the IPv4 packet never meets it, so neither does the connect
    assert egress_at_connect(WEB, connect("::ffff:172.16.0.1", 80)) is not None
    # an ICMP rule says nothing of TCP: the allow for 10/8 port 443 decides
    assert egress_at_connect(WEB, connect("10.2.0.1")) is None
    # other protocols, the any address, bind, audit mode, failFast off, no section
    assert egress_at_connect(WEB, connect("8.8.8.8", 0, 1)) is None
    assert egress_at_connect(WEB, connect("0.0.0.0", 80)) is None
    assert egress_at_connect(WEB, connect("::", 80)) is None
    assert egress_at_connect(WEB, connect("::ffff:0.0.0.0", 80)) is None
    bind = SocketAddress("bind", ipaddress.ip_address("8.8.8.8"), 80, TCP)
    assert egress_at_connect(WEB, bind) is None
    audit = egress_policy("deny", mode="audit")
    assert egress_at_connect(audit, connect("8.8.8.8")) is None
    off = policy_model(network=Network(egress=NetworkSection("deny", (), fail_fast=False)))
    assert egress_at_connect(off, connect("8.8.8.8")) is None
    assert egress_at_connect(policy_model(), connect("8.8.8.8")) is None


def test_fqdns_rules_match_by_the_names_learned() -> None:
    policy = egress_policy(
        "deny", NetworkRule("allow", fqdns=("api.test",)), NetworkRule("deny", fqdns=("bad.test",))
    )
    address = "198.51.100.7"
    assert egress_at_connect(policy, connect(address)) is not None  # nothing learned
    assert egress_at_connect(policy, connect(address, names=frozenset({"api.test"}))) is None
    denied = egress_at_connect(policy, connect(address, names=frozenset({"api.test", "bad.test"})))
    assert denied is not None and denied.rule is not None and denied.rule.fqdns == ("bad.test",)


# --- the property: a refusal at connect is a drop of the packet on every interface -----------

CIDRS = st.sampled_from(
    [
        "10.0.0.0/8",
        "10.1.0.0/16",
        "10.1.2.3/32",
        "0.0.0.0/0",
        "fd00::/8",
        "::/0",
        "::ffff:10.0.0.0/104",
    ]
)
ADDRESSES = st.sampled_from(
    [
        "10.1.2.3",
        "10.9.9.9",
        "192.0.2.1",
        "fd00::1",
        "2001:db8::1",
        "::ffff:10.1.2.3",
        "::ffff:192.0.2.1",
    ]
)
PORTS = st.sampled_from([53, 80, 443, 8000, 65535])


@st.composite
def network_rules(draw: st.DrawFn) -> NetworkRule:
    protocol = draw(st.sampled_from(["tcp", "udp", "icmp", "any"]))
    port_items = ()
    if protocol in ("tcp", "udp") and draw(st.booleans()):
        low = draw(PORTS)
        port_items = ports((low, max(low, draw(PORTS))))
    icmp = (8,) if protocol == "icmp" and draw(st.booleans()) else ()
    return NetworkRule(
        draw(st.sampled_from(["allow", "deny"])),  # type: ignore[arg-type]
        net(*draw(st.lists(CIDRS, max_size=2, unique=True))),
        protocol,  # type: ignore[arg-type]
        port_items,
        icmp,
        draw(st.sampled_from([(), (), ("eth0",), ("wg*", "lo")])),
    )


@settings(max_examples=400, deadline=None)
@given(
    st.lists(network_rules(), max_size=8),
    st.sampled_from(["allow", "deny"]),
    ADDRESSES,
    PORTS,
    st.sampled_from([TCP, UDP]),
)
def test_a_refusal_at_connect_is_a_drop_on_every_interface(
    rules: list[NetworkRule], default: str, address: str, port: int, protocol: int
) -> None:
    policy = egress_policy(default, *rules)
    call = connect(address, port, protocol)
    refused = egress_at_connect(policy, call)
    remote = ipaddress.ip_address(address)
    if isinstance(remote, ipaddress.IPv6Address) and remote.ipv4_mapped:
        remote = remote.ipv4_mapped
    packets = [Packet("egress", remote, protocol, port, interface=i) for i in INTERFACES]
    verdicts = [evaluate(policy, packet) for packet in packets]
    if refused is not None:
        assert not any(v.allowed for v in verdicts), (refused, verdicts)
    # and where no interface can let it through and nothing names one, it is refused
    if not any(r.interfaces for r in rules) and not any(v.allowed for v in verdicts):
        assert refused is not None


# --- the compiler ----------------------------------------------------------------------------


def resolve(patterns: tuple[str, ...]) -> set[int]:
    return {2}


def slots(policy: object) -> dict[str, object]:
    return {s.hook: s for s in compile_policy(policy, resolve).programs}  # type: ignore[arg-type]


def test_the_checks_run_on_the_egress_program_s_maps() -> None:
    programs = slots(WEB)
    egress = {m.name: m for m in programs["egress"].maps}  # type: ignore[attr-defined]
    for slot, check in EGRESS_AT_CONNECT.items():
        spec = programs[slot]
        # both families listed: an IPv6 check walks both indexes, an IPv4 one the IPv4 one
        variant = check.function if check.hook.endswith("6") else f"{check.function}_4"
        assert (spec.function, spec.maps_from, attach_hook(slot)) == (  # type: ignore[attr-defined]
            variant,
            "egress",
            check.hook,
        )
        names = {m.name for m in spec.maps}  # type: ignore[attr-defined]
        assert ("cidr6_slots" in names) == check.hook.endswith("6")
        assert {"generation", "config", "counters", "events", "ratelimit"} <= names
        assert "learned" not in names  # no fqdns rules: the plain variant, no DNS maps
        assert all(m == egress[m.name] for m in spec.maps)  # type: ignore[attr-defined]
    compiled = compile_policy(WEB, resolve)
    assert dict(compiled.rules).keys() == {"egress"}  # labels: the egress ones


def test_the_checks_are_attached_only_where_they_can_refuse() -> None:
    checks = set(EGRESS_AT_CONNECT)
    assert checks <= slots(WEB).keys()
    assert not checks & slots(egress_policy("deny", mode="audit")).keys()
    assert not checks & slots(egress_policy("allow")).keys()
    only_interfaces = egress_policy("allow", rule("deny", "10.0.0.0/8", interfaces=("eth0",)))
    assert not checks & slots(only_interfaces).keys()
    only_icmp = egress_policy("allow", rule("deny", protocol="icmp"))
    assert not checks & slots(only_icmp).keys()
    assert checks <= slots(egress_policy("allow", rule("deny", "10.0.0.0/8"))).keys()
    off = policy_model(network=Network(egress=NetworkSection("deny", (), fail_fast=False)))
    assert not checks & slots(off).keys()
    # failFast off changes the revision; the default leaves revisions as they were
    assert compile_policy(off).revision != compile_policy(egress_policy("deny")).revision


def test_fail_fast_in_the_language() -> None:
    spec = """
        network:
          egress:
            default: deny
            failFast: false
    """
    result = load_contents([("p.yaml", policy_text("p", spec).encode())])
    assert result.ok, [p.format() for p in result.problems]
    egress = result.policies[0].network.egress  # type: ignore[union-attr]
    assert egress is not None and egress.fail_fast is False
    bad = load_contents([("p.yaml", policy_text("p", spec.replace("false", "maybe")).encode())])
    assert not bad.ok and "failFast" in bad.problems[0].format()
    ingress = load_contents(
        [("p.yaml", policy_text("p", spec.replace("egress", "ingress")).encode())]
    )
    assert not ingress.ok  # egress only


def test_a_refusal_event_says_where() -> None:
    values = {name: 0 for name in EVENT.fields}
    values.update(
        hook=2,
        flags=2 | 16,
        family=socket.AF_INET,
        type=1,
        protocol=6,
        dport=443,
        pid=7,
        saddr=b"",
        daddr=bytes([10, 66, 0, 1]),
        comm=b"curl",
        name=b"",
    )
    event = decode(EVENT.pack(**values))
    assert event.hook == "egress" and event.what["refused_at"] == "connect"
    assert event.describe() == "egress tcp -> 10.66.0.1:443 refused at connect"
    assert event.pid == 7 and event.comm == "curl"
    values.update(flags=2 | 32, protocol=17, family=socket.AF_INET6, daddr=b"\xfd" + b"\0" * 15)
    event = decode(EVENT.pack(**values))
    assert event.describe() == "egress udp -> [fd00::]:443 refused at sendmsg"
    values.update(flags=0)
    assert decode(EVENT.pack(**values)).what["refused_at"] is None  # a dropped packet


def test_explain_says_whether_a_denial_fails_fast() -> None:
    def at_connect(*words: str, policy: object = WEB) -> list[object]:
        parsed = parse_action(list(words))
        report = to_json(Explanation(parsed, explain_policies([(policy, None)], parsed)))
        return [(p["verdict"], p["section"], p["at_connect"]) for p in report["policies"]]

    assert at_connect("egress", "tcp", "10.66.0.1:443") == [("deny", "network.egress", "refused")]
    assert at_connect("egress", "tcp", "10.1.0.1:443") == [("deny", "network.egress", "dropped")]
    assert at_connect("egress", "tcp", "10.3.0.1:443") == [("allow", "network.egress", None)]
    assert at_connect("egress", "icmp", "10.66.0.1") == [("deny", "network.egress", None)]
    # a connect that egress refuses is explained as refused by it
    assert at_connect("connect", "udp", "8.8.8.8:53") == [("deny", "network.egress", "refused")]
    assert at_connect("connect", "tcp", "10.3.0.1:443") == [("allow", "sockets.connect", None)]
    audit = egress_policy("deny", mode="audit")
    assert at_connect("egress", "tcp", "8.8.8.8:53", policy=audit) == [
        ("deny", "network.egress", None)
    ]


def test_a_plain_compile_leaves_the_names_variant_its_dns_maps() -> None:
    """The IPv4 checks' map set is computed per call: a plain one first must not change
    what the names variant gets after it."""
    from cgpolicy.compiler.compile import _CONNECT_CHECK_MAPS, connect_checks
    from cgpolicy.compiler.spec import MapSpec

    egress = {name: MapSpec(name, "array", 4, 4, 1, 0, ()) for name in _CONNECT_CHECK_MAPS}
    plain = {spec.hook: {m.name for m in spec.maps} for spec in connect_checks(egress)}
    named = {spec.hook: {m.name for m in spec.maps} for spec in connect_checks(egress, names=True)}
    assert "learned" not in plain["egress@connect4"]
    assert {"learned", "dns_targets"} <= named["egress@connect4"]
    assert "cidr6_slots" not in named["egress@connect4"]
