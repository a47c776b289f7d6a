"""The compiler's map contents, without a kernel."""

from __future__ import annotations

import fnmatch
import ipaddress
import random
import struct
from collections.abc import Callable

import pytest
from policy_builders import egress_policy, net, policy_model
from test_cidr6_index import ipv4_lookup

from cgpolicy.compiler.canonical import ordered_rules
from cgpolicy.compiler.compile import compile_policy
from cgpolicy.compiler.spec import CompiledPolicy, CompileError, MapSpec
from cgpolicy.contract import PORT_HI
from cgpolicy.policy.model import (
    DeviceRule,
    DeviceSection,
    NetworkRule,
    Policy,
    PortRange,
    SocketAddressRule,
    SocketAddressSection,
    SocketCreateRule,
    SocketCreateSection,
    Sockets,
    SourceLocation,
    SysctlRule,
    SysctlSection,
    Target,
)
from cgpolicy.policy.sysctl_patterns import sysctl_dfa


def maps_of(compiled: CompiledPolicy, hook: str) -> dict[str, MapSpec]:
    (program,) = [p for p in compiled.programs if p.hook == hook]
    return {m.name: m for m in program.maps}


def port_lookup(maps: dict[str, MapSpec]) -> Callable[[int], int]:
    """What bpf/net.c cgp_port_mask computes (any_port aside) in copy 0, as a function of
    the port."""
    ranges = {
        struct.unpack("<I", key)[0]: PORT_HI.unpack_from(value)
        for key, value in maps["ports"].entries
    }
    blocks = {
        struct.unpack("<I", k)[0]: struct.unpack("<Q", v)[0] for k, v in maps["port_blocks"].entries
    }
    copy = maps["port_blocks"].max_entries // 2

    def mask(port: int) -> int:
        found = ranges.get(port >> 8)
        if found is None:
            return 0
        if not found["block"]:
            return found["mask"]
        assert found["copy_size"] == copy
        at = (found["block"] - 1) * 256 + (port & 0xFF)
        assert at < copy  # inside copy 0
        return blocks.get(at, 0)

    return mask


def index_lookup(maps: dict[str, MapSpec]) -> Callable[[int], int]:
    """What bpf/net.c cgp_cidr4_mask computes (any_cidr aside) as a function of the IPv4
    address: the IPv4 index (test_cidr6_index checks the probe bounds)."""
    find = ipv4_lookup(maps)
    return lambda address: find(address)[0]


def test_the_port_table_gives_each_port_the_rules_listing_it() -> None:
    """Every port of 0-65535 against random rules' ranges (overlapping, adjacent, at the
    ends of the port space, inside one block of 256 and across many)."""
    rng = random.Random(1)
    edges = [(0, 0), (1, 1023), (443, 443), (8000, 8100), (65535, 65535), (0, 65535)]
    for case in range(40):
        rules = []
        for _ in range(rng.randint(1, 8)):
            ranges = []
            for _ in range(rng.randint(1, 4)):
                if rng.random() < 0.3:
                    ranges.append(rng.choice(edges))
                else:
                    low = rng.randrange(65536)
                    width = rng.choice([0, 1, 5, 255, 256, 300, 5000, 65535])
                    ranges.append((low, min(65535, low + width)))
            rules.append(
                NetworkRule("allow", protocol="tcp", ports=tuple(PortRange(*r) for r in ranges))
            )
        compiled = compile_policy(egress_policy("deny", *rules))
        maps = maps_of(compiled, "egress")
        find = port_lookup(maps)
        ordered = ordered_rules(tuple(rules))
        bits = [1 << ordered.index(rule) for rule in rules]
        for port in range(65536):
            wanted = 0
            for rule, bit in zip(rules, bits, strict=True):
                if any(p.low <= port <= p.high for p in rule.ports):
                    wanted |= bit
            assert find(port) == wanted, (case, port)
        # sized to the blocks split (one at least)
        used = len(
            {
                at // 256
                for at in (struct.unpack("<I", k)[0] for k, _ in maps["port_blocks"].entries)
            }
        )
        assert maps["port_blocks"].max_entries == 2 * 256 * max(1, used)


def test_allow_inside_deny_map_contents() -> None:
    compiled = compile_policy(
        egress_policy(
            "deny",
            NetworkRule("deny", net("10.0.0.0/8")),
            NetworkRule("allow", net("10.1.0.0/16"), "tcp", (PortRange(443, 443),)),
        )
    )
    maps = maps_of(compiled, "egress")
    rules = ordered_rules(
        compiled_rules := (
            NetworkRule("deny", net("10.0.0.0/8")),
            NetworkRule("allow", net("10.1.0.0/16"), "tcp", (PortRange(443, 443),)),
        )
    )
    deny_bit = 1 << rules.index(compiled_rules[0])
    allow_bit = 1 << rules.index(compiled_rules[1])
    cidr4 = index_lookup(maps)
    # 10.1.2.3 hits both rules: the deny wins in the program.
    assert cidr4(int(ipaddress.IPv4Address("10.1.2.3"))) == deny_bit | allow_bit
    assert cidr4(int(ipaddress.IPv4Address("10.2.0.1"))) == deny_bit
    assert cidr4(int(ipaddress.IPv4Address("11.0.0.1"))) == 0
    find_port = port_lookup(maps)
    assert [find_port(p) for p in (442, 443, 444)] == [0, allow_bit, 0]
    allow, deny, default, audit = struct.unpack_from("<QQII", maps["config"].entries[0][1])
    assert (allow, deny, default, audit) == (allow_bit, deny_bit, 0, 0)
    any_cidr, any_port, any_icmp, any_iface, *proto = struct.unpack_from(
        "<9Q", maps["config"].entries[0][1], 24
    )
    assert any_cidr == 0 and any_port == deny_bit and any_icmp == any_iface == deny_bit | allow_bit
    # tcp, udp, icmp, icmpv6, other
    assert proto == [deny_bit | allow_bit, deny_bit, deny_bit, deny_bit, deny_bit]
    # two copies of the root; a /8 and a /16: one marker-free list of two lengths
    assert maps["cidr4_root"].max_entries == 2 and len(maps["cidr4_slots"].entries) == 2
    # no IPv6 prefix: the variant without the IPv6 walk, and no IPv6 index
    assert next(p for p in compiled.programs if p.hook == "egress").function == "cgp_egress_4"
    assert "cidr6_root" not in maps and "cidr6_slots" not in maps


def test_random_cidrs_match_python_semantics() -> None:
    rng = random.Random(3)
    rules = []
    for action in ("allow", "deny", "allow", "deny"):
        cidrs = {
            ipaddress.IPv4Network((rng.randrange(1 << 32), rng.randint(4, 28)), strict=False)
            for _ in range(40)
        }
        rules.append(NetworkRule(action, tuple(cidrs)))  # type: ignore[arg-type]
    compiled = compile_policy(egress_policy("deny", *rules))
    ordered = ordered_rules(rules)
    cidr4 = index_lookup(maps_of(compiled, "egress"))
    for _ in range(2000):
        address = ipaddress.IPv4Address(rng.randrange(1 << 32))
        expected = sum(
            1 << i for i, rule in enumerate(ordered) if any(address in c for c in rule.cidrs)
        )
        assert cidr4(int(address)) == expected


def test_100k_cidrs_compile_into_the_index_layout() -> None:
    """100,000 CIDRs compile into the IPv4 index and every sampled address gets its rules.
    How long that takes is a `make bench` figure (compile_cidrs_s), not asserted here."""
    rng = random.Random(5)
    cidrs = tuple(
        {ipaddress.IPv4Network((rng.randrange(1 << 24) << 8, 24)) for _ in range(100_000)}
    )
    wide = net("10.0.0.0/8", "192.168.0.0/16")
    rules = (NetworkRule("deny", cidrs), NetworkRule("allow", wide))
    policy = egress_policy("deny", *rules)
    compiled = compile_policy(policy)
    maps = maps_of(compiled, "egress")
    # /24s, a /8 and a /16: a root listing the three lengths, no marker
    slots = maps["cidr4_slots"]
    assert len(slots.entries) == len(set(cidrs)) + 2
    assert 4 * len(slots.entries) <= slots.max_entries <= 8 * len(slots.entries) + 16
    find = index_lookup(maps)
    stored = set(cidrs)
    deny_bit, allow_bit = (1 << ordered_rules(policy.network.egress.rules).index(r) for r in rules)  # type: ignore[union-attr]
    for address in ("10.1.2.3", "192.168.7.7", "11.0.0.1", *(str(c[5]) for c in cidrs[:50])):
        value = int(ipaddress.IPv4Address(address))
        in_deny = ipaddress.IPv4Network((value >> 8 << 8, 24)) in stored
        in_allow = any(ipaddress.IPv4Address(address) in c for c in wide)
        assert find(value) == deny_bit * in_deny | allow_bit * in_allow


@pytest.mark.parametrize("seed", range(4))
def test_cidr4_index_matches_the_python_semantics(seed: int) -> None:
    """The IPv4 index gives every address the rules whose lists contain it, flat and with
    markers forced (cidr_flat_max=0), including /16s holding every length."""
    rng = random.Random(seed)
    crowded = [rng.randrange(1 << 16) for _ in range(3)]  # /16s holding every length
    rules = []
    for action in ("allow", "deny", "allow", "deny", "allow"):
        cidrs = set()
        for _ in range(60):
            if rng.random() < 0.5:
                top = rng.choice(crowded)
                length = rng.randint(0, 32)
                value = top << 16 | rng.randrange(1 << 16)
            else:
                length = rng.choice([0, 4, 8, 12, 16, 17, 20, 24, 25, 28, 31, 32])
                value = rng.randrange(1 << 32)
            cidrs.add(ipaddress.IPv4Network((value, length), strict=False))
        rules.append(NetworkRule(action, tuple(cidrs)))  # type: ignore[arg-type]
    policy = egress_policy("deny", *rules)
    ordered = ordered_rules(rules)
    points = [c.network_address for rule in rules for c in rule.cidrs]
    points += [c.broadcast_address for rule in rules for c in rule.cidrs]
    points += [
        ipaddress.IPv4Address(rng.choice(crowded) << 16 | rng.randrange(1 << 16))
        for _ in range(2000)
    ]
    points += [ipaddress.IPv4Address(rng.randrange(1 << 32)) for _ in range(1000)]
    for flat_max in (None, 0):
        find = index_lookup(maps_of(compile_policy(policy, cidr_flat_max=flat_max), "egress"))
        for address in points:
            expected = sum(
                1 << i for i, rule in enumerate(ordered) if any(address in c for c in rule.cidrs)
            )
            assert find(int(address)) == expected, address


def test_revision_is_stable_and_semantic() -> None:
    a = NetworkRule("allow", net("10.0.0.0/8", "fd00::/8"), "tcp", (PortRange(443, 443),))
    b = NetworkRule("deny", net("10.1.0.0/16"))
    base = compile_policy(egress_policy("deny", a, b)).revision
    assert len(base) == 16
    # Rule order, list order, duplicates and source positions do not count.
    a_moved = NetworkRule(
        "allow",
        net("fd00::/8", "10.0.0.0/8"),
        "tcp",
        (PortRange(443, 443),),
        source=SourceLocation("web.yaml", 9, 3),
    )
    assert compile_policy(egress_policy("deny", b, a_moved, a)).revision == base
    # Any semantic change does.
    assert compile_policy(egress_policy("deny", a)).revision != base
    assert compile_policy(egress_policy("allow", a, b)).revision != base
    assert compile_policy(egress_policy("deny", a, b, mode="audit")).revision != base
    c = NetworkRule("allow", net("10.0.0.0/8", "fd00::/8"), "tcp", (PortRange(443, 444),))
    assert compile_policy(egress_policy("deny", c, b)).revision != base


def test_interfaces_need_a_resolver_and_count_in_the_revision() -> None:
    policy = egress_policy("deny", NetworkRule("allow", interfaces=("eth0", "wg*")))
    with pytest.raises(CompileError):
        compile_policy(policy)
    one = compile_policy(policy, resolve_interfaces=lambda names: {2})
    two = compile_policy(policy, resolve_interfaces=lambda names: {2, 5})
    assert one.revision != two.revision
    ifaces = maps_of(two, "egress")["ifaces"]
    assert ifaces.entries == (
        (struct.pack("<II", 2, 0), struct.pack("<Q", 1)),
        (struct.pack("<II", 5, 0), struct.pack("<Q", 1)),
    )


def test_icmp_types_table() -> None:
    compiled = compile_policy(
        egress_policy("deny", NetworkRule("allow", protocol="icmp", icmp_types=(8, 0)))
    )
    icmp = maps_of(compiled, "egress")["icmp_types"]
    assert icmp.max_entries == 2 * 256  # two copies
    assert dict(icmp.entries) == {
        struct.pack("<I", 0): struct.pack("<Q", 1),
        struct.pack("<I", 8): struct.pack("<Q", 1),
    }


def test_sockets_programs_and_maps() -> None:
    policy = Policy(
        name="s",
        mode="enforce",
        targets=(Target("a", False),),
        sockets=Sockets(
            create=SocketCreateSection("allow", (SocketCreateRule("deny", family=10, type=3),)),
            bind=SocketAddressSection(
                "allow", (SocketAddressRule("deny", ports=(PortRange(1, 1023),)),)
            ),
            connect=SocketAddressSection(
                "allow", (SocketAddressRule("deny", net("169.254.169.254/32")),)
            ),
        ),
    )
    compiled = compile_policy(policy)
    hooks = {p.hook: p for p in compiled.programs}
    assert set(hooks) == {
        "sock_create",
        "bind4",
        "bind6",
        "connect4",
        "connect6",
        "sendmsg4",
        "sendmsg6",
    }
    events = {"events", "ratelimit"}  # deny events, in every program
    # no fqdns rules: the plain programs, which read no DNS maps (contract.names_variant),
    # in the variant that walks the indexes holding a prefix (contract.family_variant):
    # bind lists none, connect IPv4 prefixes only
    assert {p.hook: p.function for p in compiled.programs} == {
        "sock_create": "cgp_sock_create",
        "bind4": "cgp_bind4_0",
        "bind6": "cgp_bind6_0",
        "connect4": "cgp_connect4_4",
        "connect6": "cgp_connect6_4",
        "sendmsg4": "cgp_sendmsg4_4",
        "sendmsg6": "cgp_sendmsg6_4",
    }
    assert {m.name for m in hooks["bind6"].maps} == {
        *events,
        "generation",
        "config",
        "ports",
        "port_blocks",
        "counters",
    }
    assert {m.name for m in hooks["connect4"].maps} == {
        "generation",  # the copy of the rule maps in force
        "config",
        "cidr4_root",
        "cidr4_slots",
        "ports",
        "port_blocks",
        "counters",
        *events,
    }
    assert {m.name for m in hooks["connect6"].maps} == {
        *events,
        "generation",
        "config",
        "cidr4_root",  # IPv4-mapped addresses
        "cidr4_slots",
        "ports",
        "port_blocks",
        "counters",
    }
    assert all(p.prog_name.startswith("cgp_") and len(p.prog_name) <= 15 for p in compiled.programs)
    config = hooks["sock_create"].maps[0]
    assert config.name == "config" and config.value_size == 2736
    families = struct.unpack_from("<64Q", config.entries[0][1], 48)
    types = struct.unpack_from("<16Q", config.entries[0][1], 48 + 512)
    assert families[10] == 1 and families[2] == 0 and types[3] == 1 and types[1] == 0


def test_device_rules() -> None:
    policy = Policy(
        name="d",
        mode="audit",
        targets=(Target("a", False),),
        devices=DeviceSection(
            "deny",
            (DeviceRule("allow", "char", 1, 3, "rw"), DeviceRule("deny", "any", None, None, "m")),
        ),
    )
    (program,) = compile_policy(policy).programs
    value = program.maps[0].entries[0][1]
    assert len(value) == 24 + 8 + 64 * 24
    allow, deny, default, audit, nrules = struct.unpack_from("<QQIII", value)
    assert (default, audit, nrules) == (0, 1, 2)
    rules = [struct.unpack_from("<QIIII", value, 32 + 24 * i) for i in range(2)]
    assert [bit for bit, *_ in rules] == [1, 2]
    assert {tuple(rest) for _, *rest in rules} == {(2, 1, 3, 6), (0, 0xFFFFFFFF, 0xFFFFFFFF, 1)}


@pytest.mark.parametrize(
    "patterns",
    [
        ["net/ipv4/*", "kernel/hostname", "*forwarding", "net/*/conf/*/rp_filter", "*", "a**b"],
        ["net/ipv4/ip_forward"],
        [],
    ],
)
def test_sysctl_dfa_matches_like_fnmatch(patterns: list[str]) -> None:
    dfa = sysctl_dfa(patterns)
    names = [
        "net/ipv4/ip_forward",
        "net/ipv6/conf/all/forwarding",
        "net/ipv4/conf/eth0.100/rp_filter",
        "kernel/hostname",
        "kernel/hostnamex",
        "ab",
        "axxb",
        "",
        "net/ipv4/",
        "vm/swappiness",
    ]
    for name in names:
        expected = sum(1 << i for i, p in enumerate(patterns) if fnmatch.fnmatchcase(name, p))
        assert dfa.match(name) == expected, (name, patterns)


def test_sysctl_maps() -> None:
    policy = Policy(
        name="y",
        mode="enforce",
        targets=(Target("a", False),),
        sysctl=SysctlSection(
            "allow",
            (SysctlRule("deny", "net/ipv4/*", "write"), SysctlRule("allow", "kernel/*", "rw")),
        ),
    )
    (program,) = compile_policy(policy).programs
    maps = {m.name: m for m in program.maps}
    assert set(maps) == {
        "config",
        "sysctl_next",
        "sysctl_accept",
        "counters",
        "events",
        "ratelimit",
    }
    config = maps["config"].entries[0][1]
    assert len(config) == 304
    rules = ordered_rules(policy.sysctl.rules)  # type: ignore[union-attr]
    read, write, nclasses = struct.unpack_from("<QQI", config, 24)
    kernel_bit = 1 << [r.name for r in rules].index("kernel/*")
    assert read == kernel_bit and write == 0b11
    assert maps["sysctl_next"].max_entries % nclasses == 0


def test_sysctl_patterns_needing_too_many_states_are_a_compile_error() -> None:
    """Validation refuses them first; a policy built without it still fails as a policy."""
    rules = tuple(SysctlRule("deny", f"*a*b*b*b*{i}*c*d*e*f*g") for i in range(64))
    with pytest.raises(CompileError, match="matcher states"):
        compile_policy(policy_model(sysctl=SysctlSection("allow", rules)))
