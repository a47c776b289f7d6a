"""`cgpolicy learn`'s writer: observations in, a valid, minimal, commented policy out; and
nothing a workload names (executables, sysctl names) can change the YAML's structure."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

import pytest
import yaml
from policy_builders import policy_file

from cgpolicy import reference
from cgpolicy.kernel.learn import (
    AddrKey,
    CreateKey,
    DeviceKey,
    NetKey,
    Observations,
    Seen,
    SysctlKey,
)
from cgpolicy.learn.against import denied
from cgpolicy.learn.main import policy_name
from cgpolicy.learn.session import parse_duration
from cgpolicy.learn.write import (
    MAX_RULES,
    PrefixMerge,
    Source,
    lost_warning,
    safe,
    sysctl_name,
    with_connects_as_egress,
    write_policy,
)
from cgpolicy.policy.validate import load_contents

T0 = 1_764_000_000 * 10**9
A = ipaddress.ip_address


def seen(count: int = 1, *comms: str) -> Seen:
    return Seen(count, T0, T0 + 10**9, comms or ("app",))


def observed(**sections: dict) -> Observations:
    obs = Observations(started_ns=T0, ended_ns=T0 + 5 * 10**9)
    for name, entries in sections.items():
        getattr(obs, name).update(entries)
    obs.seen = {"egress": sum(s.count for s in obs.network.values())}
    obs.lost = {}
    return obs


def learned(obs: Observations, **kwargs) -> tuple[str, dict, object]:
    """What `cgpolicy learn` writes for ``obs`` (connect destinations in egress too)."""
    out = write_policy(
        with_connects_as_egress(obs), "web", Source(command=["app"], status=0), **kwargs
    )
    result = load_contents([("learned.yaml", out.text.encode())])
    assert result.ok, [p.format() for p in result.problems]
    return out.text, yaml.safe_load(out.text), result.policies[0]


def rules(doc: dict, *path: str) -> list[dict]:
    section = doc["spec"]
    for part in path:
        section = section[part]
    assert section["default"] == "deny"
    return section.get("rules", [])


def test_connect_destinations_are_allowed_on_egress_too_when_egress_saw_packets():
    """network.egress refuses at connect what it would drop (fail fast): a UDP connect()
    with nothing sent after it needs an egress rule as well; with no egress activity at
    all there is no egress section, and nothing to add."""
    connects = {
        AddrKey("connect", A("192.0.2.20"), 17, 9): seen(),  # connected, nothing sent
        AddrKey("connect", A("::ffff:192.0.2.21"), 6, 443): seen(),  # IPv4 packets
        AddrKey("connect", A("0.0.0.0"), 6, 80): seen(),  # to a local address: no check
        AddrKey("bind", A("0.0.0.0"), 6, 8080): seen(),
    }
    dns = {NetKey("egress", A("10.0.0.53"), 17, "port", 53): seen()}
    _, doc, policy = learned(observed(addresses=connects, network=dns))
    egress = rules(doc, "network", "egress")
    assert len(egress) == 3
    for rule in (
        {"action": "allow", "protocol": "tcp", "cidrs": ["192.0.2.21"], "ports": [443]},
        {"action": "allow", "protocol": "udp", "cidrs": ["10.0.0.53"], "ports": [53]},
        {"action": "allow", "protocol": "udp", "cidrs": ["192.0.2.20"], "ports": [9]},
    ):
        assert rule in egress
    _, alone, _ = learned(observed(addresses=connects))
    assert "network" not in alone["spec"]
    # --against a policy whose egress lacks them: egress rules to add, not only connect ones
    egress = dataclasses.replace(policy.network.egress, rules=())
    narrower = dataclasses.replace(
        policy, network=dataclasses.replace(policy.network, egress=egress)
    )
    kept = denied(narrower, observed(addresses=connects, network=dns), Path("/nonexistent"))
    assert {(k.address, k.port) for k in kept.network} == {
        (A("10.0.0.53"), 53),
        (A("192.0.2.20"), 9),
        (A("192.0.2.21"), 443),
    }


def test_return_traffic_is_allowed_by_address_without_ports_and_covers_port_rules():
    obs = observed(
        network={
            NetKey("egress", A("10.0.0.1"), 6, "port", 443): seen(5),
            NetKey("egress", A("10.0.0.2"), 6, "port", 443): seen(2),
            NetKey("egress", A("10.0.0.3"), 6, "reply"): seen(3),
            NetKey("egress", A("10.0.0.3"), 6, "port", 80): seen(1),
            NetKey("ingress", A("10.0.0.1"), 6, "reply"): seen(4),
            NetKey("ingress", A("10.0.0.3"), 6, "port", 8080): seen(4),
        }
    )
    text, doc, policy = learned(obs)
    egress = rules(doc, "network", "egress")
    assert {"action": "allow", "protocol": "tcp", "cidrs": ["10.0.0.3"]} in egress
    # one rule for the two addresses that share their port; 10.0.0.3:80 is covered
    assert {
        "action": "allow",
        "protocol": "tcp",
        "cidrs": ["10.0.0.1", "10.0.0.2"],
        "ports": [443],
    } in egress
    assert len(egress) == 2
    ingress = rules(doc, "network", "ingress")
    assert {"action": "allow", "protocol": "tcp", "cidrs": ["10.0.0.1"]} in ingress
    assert {"action": "allow", "protocol": "tcp", "cidrs": ["10.0.0.3"], "ports": [8080]} in ingress
    assert "sockets" not in doc["spec"] and "devices" not in doc["spec"]  # nothing seen
    assert "# 4 packets, 2025-11-24T16:00:00Z..2025-11-24T16:00:01Z, by app" in text


def test_every_observation_is_allowed_and_a_neighbour_is_not():
    """The property learn promises, checked with the reference evaluator."""
    obs = observed(
        network={
            NetKey("egress", A("10.0.0.1"), 17, "port", 53): seen(),
            NetKey("ingress", A("10.0.0.1"), 17, "reply"): seen(),
            NetKey("egress", A("fd00::1"), 58, "icmp", icmp_type=128): seen(),
            NetKey("egress", A("10.0.0.9"), 132, "bare"): seen(),
        },
        create={CreateKey(2, 2, 17): seen(), CreateKey(10, 1, 6): seen()},
        addresses={
            AddrKey("connect", A("10.0.0.1"), 17, 53): seen(),
            AddrKey("sendmsg", A("::ffff:10.0.0.1"), 17, 53): seen(),
            AddrKey("bind", A("0.0.0.0"), 6, 8080): seen(),
            AddrKey("bind", A("127.0.0.1"), 17, 0): seen(),
        },
        devices={DeviceKey("char", 1, 3, "rw"): seen(), DeviceKey("char", 1, 3, "m"): seen()},
        sysctls={SysctlKey("net/core/somaxconn", False): seen()},
    )
    _, _, policy = learned(obs, nodes={("char", 1, 3): "/dev/null"})
    policy = _bound(policy)
    assert not denied(policy, obs, Path("/nonexistent")).network
    for action in [
        reference.Packet("egress", A("10.0.0.1"), 17, 53),
        reference.Packet("ingress", A("10.0.0.1"), 17, 40000),  # a reply, any port
        reference.Packet("egress", A("fd00::1"), 58, icmp_type=128),
        reference.SocketCreate(2, 2, 17),
        reference.SocketAddress("connect", A("10.0.0.1"), 53, 17),
        reference.SocketAddress("bind", A("0.0.0.0"), 8080, 6),
        reference.SocketAddress("bind", A("127.0.0.1"), 0, 17),
        reference.DeviceAccess("char", 1, 3, "rwm"),
        reference.SysctlAccess("net/core/somaxconn", False),
    ]:
        assert reference.evaluate(policy, action).allowed, action
    for action in [
        reference.Packet("egress", A("10.0.0.1"), 17, 54),
        reference.Packet("egress", A("10.0.0.2"), 17, 53),
        reference.Packet("egress", A("fd00::1"), 58, icmp_type=1),
        reference.SocketCreate(2, 3, 1),
        reference.SocketAddress("connect", A("10.0.0.1"), 80, 6),
        reference.SocketAddress("bind", A("0.0.0.0"), 8081, 6),
        reference.DeviceAccess("char", 1, 5, "r"),
        reference.SysctlAccess("net/core/somaxconn", True),
    ]:
        assert not reference.evaluate(policy, action).allowed, action


def _bound(policy):
    from cgpolicy.compiler.compile import bind_device_paths
    from cgpolicy.compiler.spec import DeviceNode

    bound, _ = bind_device_paths(policy, lambda rule: DeviceNode("char", 1, 3))
    return bound


def test_ports_become_ranges_and_ports_sharing_addresses_share_a_rule():
    network = {NetKey("egress", A("10.0.0.1"), 6, "port", p): seen() for p in (80, 81, 82, 443)}
    network |= {NetKey("egress", A(f"10.1.0.{i}"), 6, "port", 9000): seen() for i in range(5)}
    _, doc, _ = learned(observed(network=network))
    egress = rules(doc, "network", "egress")
    assert {
        "action": "allow",
        "protocol": "tcp",
        "cidrs": ["10.0.0.1"],
        "ports": ["80-82", 443],
    } in egress
    assert [r["cidrs"] for r in egress if r["ports"] == [9000]] == [
        [f"10.1.0.{i}" for i in range(5)]
    ]


def test_more_rules_than_the_language_allows_are_widened_and_said():
    network = {NetKey("egress", A(f"10.0.{i}.1"), 6, "port", 1000 + i): seen() for i in range(70)}
    network |= {NetKey("egress", A(f"10.0.{i}.1"), 6, "port", 2000 + i): seen() for i in range(70)}
    out = write_policy(observed(network=network), "web", Source(command=["x"]))
    assert any("WIDENED" in w for w in out.warnings)
    doc = yaml.safe_load(out.text)
    assert len(rules(doc, "network", "egress")) <= MAX_RULES
    assert load_contents([("x.yaml", out.text.encode())]).ok


def test_merge_prefixes_is_exact_unless_asked_to_widen():
    network = {NetKey("egress", A(f"10.0.0.{i}"), 6, "port", 443): seen() for i in range(4)}
    network[NetKey("egress", A("10.0.1.7"), 6, "port", 443)] = seen()
    _, doc, _ = learned(observed(network=network), merge=PrefixMerge())
    assert rules(doc, "network", "egress")[0]["cidrs"] == ["10.0.0.0/30", "10.0.1.7"]
    text, doc, _ = learned(observed(network=network), merge=PrefixMerge(min_hosts=4))
    assert rules(doc, "network", "egress")[0]["cidrs"] == ["10.0.0.0/24", "10.0.1.7"]
    assert "WIDENED by --merge-min-hosts: 10.0.0.0/24 from 4 hosts seen" in text


HOSTILE = [
    "x\n- action: allow\n  cidrs: [0.0.0.0/0]",
    'a" # b',
    "evil\r\u2028\x85{x}: *y",
    "x\\",
]


@pytest.mark.parametrize("comm", HOSTILE)
def test_executable_names_cannot_inject_yaml(comm):
    obs = observed(
        network={NetKey("egress", A("10.0.0.1"), 6, "port", 443): seen(1, comm, "ok")},
        sysctls={SysctlKey("kernel/ostype", False): seen(1, comm)},
    )
    text, doc, _ = learned(obs)
    assert rules(doc, "network", "egress") == [
        {"action": "allow", "protocol": "tcp", "cidrs": ["10.0.0.1"], "ports": [443]}
    ]
    assert rules(doc, "sysctl") == [{"action": "allow", "name": "kernel.ostype", "access": "read"}]
    for line in text.splitlines():
        if "#" in line:
            assert "\r" not in line and "\u2028" not in line and "\x85" not in line
    assert safe(comm) in text


def test_sysctl_names_a_rule_cannot_hold_are_left_out_and_warned():
    obs = observed(
        sysctls={
            SysctlKey("net/ipv4/conf/*/forwarding", False): seen(),  # an interface named '*'
            SysctlKey('net/ipv4/conf/a"b\n/x', False): seen(),
            SysctlKey("net/ipv4/conf/eth0.100/forwarding", True): seen(),
            SysctlKey("net/ipv4/conf/eth0.100/forwarding", False): seen(),
            SysctlKey("x" * 300, False, truncated=True): seen(),
        }
    )
    out = write_policy(obs, "web", Source(cgroup="a/b"))
    doc = yaml.safe_load(out.text)
    assert rules(doc, "sysctl") == [
        {"action": "allow", "name": "net/ipv4/conf/eth0.100/forwarding", "access": "rw"}
    ]
    assert len(out.warnings) == 3
    assert doc["spec"]["targets"] == [{"path": "a/b"}]
    assert load_contents([("x.yaml", out.text.encode())]).ok


def test_sysctl_name_forms():
    assert sysctl_name("net/ipv4/ip_forward") == "net.ipv4.ip_forward"
    assert sysctl_name("net/ipv4/conf/eth0.1/rp_filter") == "net/ipv4/conf/eth0.1/rp_filter"
    assert sysctl_name("net/*/x") is None


def test_devices_by_path_when_a_node_exists_else_by_number():
    obs = observed(
        devices={
            DeviceKey("char", 1, 3, "r"): seen(),
            DeviceKey("char", 1, 3, "w"): seen(),
            DeviceKey("block", 8, 0, "r"): seen(),
        }
    )
    _, doc, _ = learned(obs, nodes={("char", 1, 3): "/dev/null"})
    assert rules(doc, "devices") == [
        {"action": "allow", "type": "block", "major": 8, "minor": 0, "access": "r"},
        {"action": "allow", "path": "/dev/null", "access": "rw"},
    ]


def test_lost_actions_are_reported_loudly():
    obs = observed(sysctls={SysctlKey("kernel/ostype", False): seen()})
    obs.lost = {"sysctl": 3, "egress": 0}
    assert "INCOMPLETE: 3 actions were not recorded" in (lost_warning(obs) or "")
    text = write_policy(obs, "web", Source(command=["x"])).text
    assert "# INCOMPLETE: 3 actions were not recorded because a map was full" in text


def test_against_keeps_only_what_the_policy_denies(tmp_path):
    existing = policy_file(
        tmp_path,
        "web",
        ["a"],
        {
            "sockets": {
                "connect": {
                    "default": "deny",
                    "rules": [{"action": "allow", "protocol": "tcp", "ports": [443]}],
                }
            }
        },
    )
    policy = load_contents([("p.yaml", existing.read_bytes())]).policies[0]
    obs = observed(
        addresses={
            AddrKey("connect", A("10.0.0.1"), 6, 443): seen(),
            AddrKey("connect", A("10.0.0.1"), 6, 80): seen(),
        },
        sysctls={SysctlKey("kernel/ostype", False): seen()},
    )
    kept = denied(policy, obs, tmp_path)
    assert list(kept.addresses) == [AddrKey("connect", A("10.0.0.1"), 6, 80)]
    assert not kept.sysctls  # the policy has no sysctl section: it leaves sysctls alone


def test_placeholder_target_and_names():
    text, doc, _ = learned(observed(sysctls={SysctlKey("kernel/ostype", False): seen()}))
    assert "# EDIT: the cgroup the workload runs in" in text
    assert policy_name("Python3.11") == "python3-11"
    assert policy_name("___") == "learned"


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("2h", 7200), ("0.5s", 0.5)]
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-1s", "1y", "1e9", "10 m", "9" * 20])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def _answer(name: str, *records: tuple[str, str], time_ns: int = T0, cut: bool = False):
    import dns.message
    import dns.rdata
    import dns.rdataclass
    import dns.rdatatype

    from cgpolicy.kernel.learn import DnsAnswer

    query = dns.message.make_query(name, "A")
    answer = dns.message.make_response(query)
    for kind, value in records:
        rdtype = dns.rdatatype.from_text(kind)
        rrset = answer.find_rrset(
            answer.answer, query.question[0].name, dns.rdataclass.IN, rdtype, create=True
        )
        rrset.add(dns.rdata.from_text(dns.rdataclass.IN, rdtype, value), 300)
    wire = answer.to_wire()
    return DnsAnswer(time_ns, A("10.0.0.53"), wire[:20] if cut else wire, cut)


def test_names_replace_addresses_an_earlier_answer_gave():
    from cgpolicy.learn.names import NameBook

    book = NameBook()
    book.add(_answer("API.Example.com.", ("A", "192.0.2.7")))
    book.add(_answer("late.example.com", ("A", "192.0.2.8"), time_ns=T0 + 10 * 10**9))
    book.add(_answer("cut.example.com", ("A", "192.0.2.9"), cut=True))
    assert book.answers == 3 and book.refused == 1
    obs = observed(
        addresses={
            AddrKey("connect", A("192.0.2.7"), 6, 443): seen(),
            AddrKey("connect", A("::ffff:192.0.2.7"), 6, 443): seen(),
            AddrKey("connect", A("192.0.2.8"), 6, 443): seen(),  # used before its answer
            AddrKey("connect", A("192.0.2.9"), 6, 443): seen(),
            AddrKey("sendmsg", A("10.0.0.53"), 17, 53): seen(),
        },
        network={NetKey("egress", A("192.0.2.7"), 6, "port", 443): seen()},
    )
    text, doc, policy = learned(obs, book=book)
    assert doc["spec"]["dns"] == {"servers": ["10.0.0.53"]}
    connect = rules(doc, "sockets", "connect")
    assert {"action": "allow", "protocol": "tcp", "fqdns": ["api.example.com"], "ports": [443]} in (
        connect
    )
    assert {
        "action": "allow",
        "protocol": "tcp",
        "cidrs": ["192.0.2.8", "192.0.2.9"],
        "ports": [443],
    } in connect
    assert {"action": "allow", "protocol": "udp", "cidrs": ["10.0.0.53"], "ports": [53]} in connect
    # egress checks connects itself (fail fast): every destination connected to is there
    egress = rules(doc, "network", "egress")
    assert egress == [
        {"action": "allow", "protocol": "tcp", "fqdns": ["api.example.com"], "ports": [443]},
        {"action": "allow", "protocol": "tcp", "cidrs": ["192.0.2.8", "192.0.2.9"], "ports": [443]},
        {"action": "allow", "protocol": "udp", "cidrs": ["10.0.0.53"], "ports": [53]},
    ]
    # --against sees the names too: a policy allowing the name denies nothing of it
    kept = denied(policy, obs, Path("/nonexistent"), book)
    assert not kept.addresses and not kept.network


@pytest.mark.parametrize(
    "wire",
    [b"", b"\x00" * 11, b"\xff" * 40],
)
def test_answers_that_do_not_parse_teach_nothing(wire):
    from cgpolicy.kernel.learn import DnsAnswer
    from cgpolicy.learn.names import NameBook

    book = NameBook()
    book.add(DnsAnswer(T0, A("10.0.0.53"), wire, False))
    assert book.refused == 1 and not book.given


def test_the_fast_readers_agree_with_the_layouts():
    from cgpolicy.kernel import learn

    comm = ({"w": (0x6F6874796170, 0)},) + ({"w": (0, 0)},) * 3
    raw = learn.VALUE.pack(count=7, first_ns=1, last_ns=2, comm=comm, more_comms=1, pad=0)
    count, first, last, *rest = learn._VALUE.unpack(raw)
    assert (count, first, last, rest[0][:6], rest[-2]) == (7, 1, 2, b"paytho", 1)
    key = learn.NET_KEY.pack(
        addr=b"\x7f\0\0\1" + bytes(12),
        port=443,
        family=4,
        proto=6,
        kind=1,
        icmp_type=0,
        pad=b"\0\0",
    )
    assert learn._NET_KEY.unpack(key)[1:] == (443, 4, 6, 1, 0)
    addr = learn.ADDR_KEY.pack(addr=bytes(16), port=53, family=6, proto=17, op=3, pad=bytes(3))
    assert learn._ADDR_KEY.unpack(addr)[1:] == (53, 6, 17, 3)
    assert learn._SYSCTL_KEY.size == learn.SYSCTL_KEY.size
    assert learn._DNS_HEAD.size == learn.DNS_ANSWER.fields["data"].offset
    assert learn._SERVER_KEY.pack(6, 80) == learn.SERVER_KEY.pack(proto=6, pad=0, port=80)
    assert learn._STAT.size == learn.STAT.size and learn._CREATE_KEY.size == learn.CREATE_KEY.size
    assert learn._DEVICE_KEY.size == learn.DEVICE_KEY.size
