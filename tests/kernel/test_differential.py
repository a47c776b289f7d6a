"""Differential tests: the compiled BPF programs against the reference evaluator.

Hypothesis draws random policies (overlapping CIDRs of both families, IPv4-mapped ones,
port ranges, protocols, ICMP types, interfaces, both defaults, deny inside allow and allow
inside deny, sometimes more than 32 rules so that the high half of the 64-bit masks is used)
and, per policy, the seed of a batch of packets (made with ``random.Random``, see
:func:`skb_packets`) whose addresses, ports and types sit near the policy's own prefixes
and boundaries, so that they hit. Every packet goes through the compiled egress
and ingress programs with BPF_PROG_TEST_RUN and through :mod:`cgpolicy.reference`; the
verdict and the counter slot of the deciding rule must agree. Packets include what the
programs must treat as unknown: IPv4 and IPv6 non-first fragments, IPv6 extension header
chains (longer than the program walks, too), IPv4 options and a malformed IHL, truncated
headers, and frames that are not IP at all. Both shapes of the prefix indexes, IPv4 and
IPv6 (bpf/net.c cgp_cidr_index), are exercised: each policy is compiled either with the
flat lists a short list gets by default, or with markers (buckets, a binary search on
lengths) wherever a list has more than one length (``cidr_flat_max=0``), hypothesis
choosing.

The hooks BPF_PROG_TEST_RUN cannot run (sock_addr, device, sysctl) are compared on real
actions from a process in a scratch cgroup (one process per test, fed a batch per policy),
fewer of them: a denial is EPERM, anything
else (success, ECONNREFUSED, EADDRINUSE, ENXIO, EINVAL, ...) means the policy let the
action through.
"""

from __future__ import annotations

import errno
import fnmatch
import ipaddress
import os
import random
import stat
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
from batch_probe import BatchProbe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from policy_builders import policy_model

from cgpolicy import reference
from cgpolicy.compiler import compile as compile_module
from cgpolicy.compiler.canonical import ordered_rules
from cgpolicy.compiler.compile import compile_policy
from cgpolicy.compiler.spec import ProgramSpec
from cgpolicy.contract import COUNTER, U32
from cgpolicy.enforcer.engine import Enforcer
from cgpolicy.kernel.loader import LoadedProgram, load_program
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
    Sockets,
    SysctlRule,
    SysctlSection,
    Target,
)

TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
IPV6_EXT = (0, 43, 44, 51, 60)
IPV6_EXT_MAX = 6  # bpf/packet.h CGP_IPV6_EXT_MAX
# PROG_TEST_RUN runs cgroup_skb programs on the loopback device; interface globs are
# resolved against this made-up table, in which lo has its real index.
INTERFACES = {"lo": 1, "eth0": 2, "eth1": 3, "wg0": 4}
PACKETS_PER_POLICY = 60
SKB_EXAMPLES = int(os.environ.get("CGP_DIFF_EXAMPLES", "300"))

checked = {"skb": 0, "sock_addr": 0, "device": 0, "sysctl": 0}


def resolve(patterns: tuple[str, ...]) -> set[int]:
    return {i for n, i in INTERFACES.items() if any(fnmatch.fnmatchcase(n, p) for p in patterns)}


# --- policies -----------------------------------------------------------------------------------

PORT_POINTS = (1, 2, 52, 53, 54, 80, 443, 1023, 1024, 8000, 8100, 32768, 65534, 65535)
ICMP_TYPES = (0, 3, 8, 11, 128, 129, 135, 255)
INTERFACE_PATTERNS = (("lo",), ("eth0",), ("l?",), ("eth*", "lo"), ("wg*",), ("*",))


@dataclass(frozen=True)
class Anchors:
    """What a policy's rules are built around; packets are drawn near the same points."""

    v4: tuple[ipaddress.IPv4Address, ...]
    v6: tuple[ipaddress.IPv6Address, ...]


@st.composite
def anchors(draw: st.DrawFn) -> Anchors:
    v4 = draw(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=3))
    v6_low = st.integers(0, 2**128 - 1)
    v6_ula = st.integers(0, 2**120 - 1).map(lambda x: (0xFD << 120) | x)
    v6 = draw(st.lists(st.one_of(v6_low, v6_ula), min_size=1, max_size=3))
    return Anchors(
        tuple(ipaddress.IPv4Address(a) for a in v4), tuple(ipaddress.IPv6Address(a) for a in v6)
    )


def prefix_lengths(width: int) -> st.SearchStrategy[int]:
    common = [0, 1, 8, 16, 24, 31, 32] if width == 32 else [0, 8, 48, 64, 96, 120, 127, 128]
    return st.one_of(st.sampled_from(common), st.integers(0, width))


# Strategies are built once (per module, or per policy where they depend on its anchors) and
# drawn from many times: building a strategy and validating it again for every rule and
# every CIDR cost more than the draws themselves.
PREFIX_LENGTHS = {32: prefix_lengths(32), 128: prefix_lengths(128)}
CIDR_KINDS = st.sampled_from(["v4", "v4", "v6", "mapped"])
PROTOCOLS = st.sampled_from(["tcp", "udp", "icmp", "icmpv6", "any"])
ACTIONS: st.SearchStrategy[Literal["allow", "deny"]] = st.sampled_from(["allow", "deny"])
PORT_POINT = st.one_of(st.sampled_from(PORT_POINTS), st.integers(1, 65535))
ICMP_TYPE_LISTS = st.lists(st.sampled_from(ICMP_TYPES), min_size=1, max_size=3)
INTERFACE_CHOICES = st.sampled_from(INTERFACE_PATTERNS)
ONE_IN_EIGHT = st.integers(0, 7)


def cidr(where: Anchors) -> st.SearchStrategy[reference.IPNetwork]:
    v4, v6 = st.sampled_from(where.v4), st.sampled_from(where.v6)

    @st.composite
    def draw_cidr(draw: st.DrawFn) -> reference.IPNetwork:
        kind = draw(CIDR_KINDS)
        if kind == "v4":
            address = draw(v4)
            return ipaddress.ip_network(f"{address}/{draw(PREFIX_LENGTHS[32])}", strict=False)
        if kind == "v6":
            address6 = draw(v6)
            return ipaddress.ip_network(f"{address6}/{draw(PREFIX_LENGTHS[128])}", strict=False)
        address = draw(v4)
        length = 96 + draw(PREFIX_LENGTHS[32])
        return ipaddress.ip_network(f"::ffff:{address}/{length}", strict=False)

    return draw_cidr()


@st.composite
def port_ranges(draw: st.DrawFn) -> tuple[PortRange, ...]:
    items = []
    for _ in range(draw(st.integers(1, 3))):
        a, b = draw(PORT_POINT), draw(PORT_POINT)
        items.append(PortRange(min(a, b), max(a, b)))
    return tuple(items)


PORT_RANGES = port_ranges()


def network_rule(where: Anchors) -> st.SearchStrategy[NetworkRule]:
    cidr_lists = st.one_of(st.just(()), st.lists(cidr(where), min_size=1, max_size=3))

    @st.composite
    def draw_rule(draw: st.DrawFn) -> NetworkRule:
        protocol = draw(PROTOCOLS)
        cidrs = draw(cidr_lists)
        ports = ()
        icmp_types: tuple[int, ...] = ()
        if protocol in ("tcp", "udp") and draw(st.booleans()):
            ports = draw(PORT_RANGES)
        if protocol in ("icmp", "icmpv6") and draw(st.booleans()):
            icmp_types = tuple(draw(ICMP_TYPE_LISTS))
        interfaces = draw(INTERFACE_CHOICES) if draw(ONE_IN_EIGHT) == 0 else ()
        return NetworkRule(
            draw(ACTIONS),
            tuple(cidrs),
            protocol,  # type: ignore[arg-type]
            ports,
            icmp_types,
            interfaces,
        )

    return draw_rule()


def network_section(where: Anchors) -> st.SearchStrategy[NetworkSection]:
    rule = network_rule(where)
    rule_lists = st.one_of(
        st.lists(rule, max_size=8),
        st.lists(rule, max_size=8),
        st.lists(rule, min_size=33, max_size=64),
    )

    @st.composite
    def draw_section(draw: st.DrawFn) -> NetworkSection:
        rules = draw(rule_lists)
        return NetworkSection(draw(ACTIONS), tuple(rules))

    return draw_section()


# --- packets ------------------------------------------------------------------------------------
#
# A policy's 60 packets come from one seed that hypothesis draws: random.Random, seeded with
# it and the policy's anchors, generates them over the distributions below, at a fraction
# of the cost of 60 composite hypothesis draws. Hypothesis still draws (and shrinks) the
# policy; a failure names the seed and the packet's index, and skb_packets(seed, where,
# policy) gives the same packets again.


def near(address: int, width: int, bits: int, noise: int) -> int:
    """The address with its lowest ``bits`` bits replaced by ``noise``."""
    low = (1 << bits) - 1
    return (address & ~low & ((1 << width) - 1)) | (noise & low)


def integer(rng: random.Random, low: int, high: int) -> int:
    """An integer in [low, high], weighted as hypothesis weighs its integers: the bounds and
    their neighbours, values a few bits away from either bound (so that ``near`` gives
    network and broadcast addresses and their neighbours), and uniform values."""
    roll = rng.random()
    if roll < 0.1:
        return rng.choice((low, high, min(low + 1, high), max(high - 1, low)))
    if roll < 0.6:  # bit lengths skewed towards small offsets
        bits = rng.randint(0, rng.randint(0, (high - low).bit_length()))
        offset = min(rng.getrandbits(bits), high - low)
        return low + offset if rng.random() < 0.5 else high - offset
    return rng.randint(low, high)


def remote_address(
    rng: random.Random, where: Anchors, family: str, networks: tuple[reference.IPNetwork, ...]
) -> reference.IPAddress:
    """Mostly an address near one of the anchors (the lowest 0, 1, 8, 16 or 32/4 bits
    replaced); one time in six an edge of one of the policy's own CIDRs of the family (its
    first or last address or just outside either, or inside it); one in six anything."""
    width = 32 if family in ("v4", "mapped") else 128
    pool = where.v4 if width == 32 else where.v6
    own = [n for n in networks if n.max_prefixlen == width]
    roll = rng.randint(0, 5)
    if roll == 0:
        value = integer(rng, 0, 2**width - 1)
    elif roll == 1 and own:
        network = rng.choice(own)
        first, last = int(network.network_address), int(network.broadcast_address)
        value = rng.choice([first, last, first - 1, last + 1, integer(rng, first, last)])
        value %= 2**width
    else:
        base = int(rng.choice(pool))
        bits = rng.choice([0, 1, 8, 16, width - 96 if width > 32 else 4])
        value = near(base, width, bits, integer(rng, 0, 2**width - 1))
    if family == "mapped":
        return ipaddress.IPv6Address((0xFFFF << 32) | value)
    if width == 32:
        return ipaddress.IPv4Address(value)
    return ipaddress.IPv6Address(value)


def tcp_header(dport: int, sport: int = 40000) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 5 << 4, 0x02, 65535, 0, 0)


def udp_header(dport: int, sport: int = 40000) -> bytes:
    return struct.pack("!HHHH", sport, dport, 12, 0) + b"data"


def icmp_header(icmp_type: int) -> bytes:
    return struct.pack("!BBHI", icmp_type, 0, 0, 0) + b"ping"


@dataclass(frozen=True)
class SkbPacket:
    """A frame for PROG_TEST_RUN with the remote end at ``remote`` and the local at
    ``local``; ``frame(direction)`` puts them in place (remote = destination on egress)."""

    description: str
    ethertype: int
    build: tuple  # (kind, args...) -> see frame()

    def frame(self, direction: str) -> bytes:
        kind, *args = self.build
        if kind == "raw":
            return b"\x00" * 12 + struct.pack("!H", self.ethertype) + args[0]
        if kind == "v4":
            remote, local, proto, payload, frag, ihl, total = args
            src, dst = (local, remote) if direction == "egress" else (remote, local)
            options = b"\x01" * max(0, (ihl - 5) * 4)
            header = struct.pack(
                "!BBHHHBBH4s4s",
                0x40 | ihl,
                0,
                total,
                1,
                frag,
                64,
                proto,
                0,
                src.packed,
                dst.packed,
            )
            return b"\x00" * 12 + b"\x08\x00" + header + options + payload
        remote, local, nexthdr, payload = args
        src, dst = (local, remote) if direction == "egress" else (remote, local)
        header = struct.pack(
            "!IHBB16s16s", 6 << 28, len(payload), nexthdr, 64, src.packed, dst.packed
        )
        return b"\x00" * 12 + b"\x86\xdd" + header + payload


def l4_payload(rng: random.Random, protocol: int, ports: list[int]) -> bytes:
    if protocol == TCP:
        payload = tcp_header(rng.choice(ports))
    elif protocol == UDP:
        payload = udp_header(rng.choice(ports))
    elif protocol in (ICMP, ICMPV6):
        icmp_type = rng.choice(ICMP_TYPES) if rng.random() < 0.5 else integer(rng, 0, 255)
        payload = icmp_header(icmp_type)
    else:
        payload = b"\x00" * 8
    if rng.randint(0, 9) == 0:  # truncated L4 header
        payload = payload[: rng.randint(0, 4)]
    return payload


IPV6_EXT_KINDS = ("hbh", "routing", "dstopts", "ah", "frag0", "frag", "long")


def ipv6_extensions(rng: random.Random, protocol: int, payload: bytes) -> tuple[int, bytes]:
    """A chain of 0 to 8 extension headers in front of the payload: (first nexthdr, bytes).
    Longer than IPV6_EXT_MAX (the most the program walks) about one time in five."""
    kinds = [rng.choice(IPV6_EXT_KINDS) for _ in range(rng.randint(0, 8))]
    nexthdr, data = protocol, payload
    for kind in reversed(kinds):
        if kind in ("frag0", "frag"):
            offset = 0 if kind == "frag0" else integer(rng, 1, 8191) << 3
            data = struct.pack("!BBHI", nexthdr, 0, offset | 1, 7) + data
            nexthdr = 44
        elif kind == "ah":
            length = rng.randint(0, 2)  # (length + 2) * 4 bytes: 8, 12, 16
            size = (length + 2) * 4
            data = struct.pack("!BB", nexthdr, length) + b"\x00" * (size - 2) + data
            nexthdr = 51
        else:
            length = 1 if kind == "long" else 0  # (length + 1) * 8 bytes
            code = {"hbh": 0, "routing": 43, "dstopts": 60, "long": 60}[kind]
            data = struct.pack("!BB", nexthdr, length) + b"\x00" * ((length + 1) * 8 - 2) + data
            nexthdr = code
    if kinds and rng.randint(0, 9) == 0:  # cut inside the chain
        data = data[: integer(rng, 0, len(data))]
    return nexthdr, data


def skb_packet(
    rng: random.Random, where: Anchors, ports: list[int], networks: tuple[reference.IPNetwork, ...]
) -> SkbPacket:
    # PROG_TEST_RUN refuses IPv4/IPv6 frames shorter than the IP header, so a truncated IP
    # header is not drawn; a frame that is not IP at all is.
    family = rng.choice(["v4", "v4", "v6", "v6", "mapped", "other"])
    if family == "other":
        ethertype = rng.choice([0x0806, 0x88CC, 0x8100])
        return SkbPacket(f"non-IP ethertype {ethertype:#06x}", ethertype, ("raw", b"\x00" * 40))
    remote = remote_address(rng, where, family, networks)
    if family == "v4":
        local = ipaddress.IPv4Address(integer(rng, 0, 2**32 - 1))
        protocol = rng.choice([TCP, TCP, UDP, UDP, ICMP, ICMPV6, 47, 0, 132])
        payload = l4_payload(rng, protocol, ports)
        frag = rng.choice([0, 0, 0, 0x2000, 1, 185, 0x2000 | 185])  # MF | offset
        ihl = rng.choice([5, 5, 5, 6, 7, 4, 15])
        total = 20 + len(payload)
        desc = f"IPv4 {remote} proto {protocol} frag {frag:#x} ihl {ihl} payload {payload.hex()}"
        return SkbPacket(desc, 0x0800, ("v4", remote, local, protocol, payload, frag, ihl, total))
    local6 = ipaddress.IPv6Address(integer(rng, 0, 2**128 - 1))
    protocol = rng.choice([TCP, TCP, UDP, UDP, ICMPV6, ICMPV6, ICMP, 47, 132])
    payload = l4_payload(rng, protocol, ports)
    nexthdr, data = ipv6_extensions(rng, protocol, payload)
    desc = f"IPv6 {remote} nexthdr {nexthdr} data {data.hex()}"
    return SkbPacket(desc, 0x86DD, ("v6", remote, local6, nexthdr, data))


def skb_packets(seed: int, where: Anchors, policy: Policy) -> list[SkbPacket]:
    """The policy's packets: PACKETS_PER_POLICY of them, the same for the same arguments.
    The generator is seeded with the anchors too: hypothesis draws the same few seeds again
    and again, and the packets of two policies should still differ in kind."""
    network = policy.network
    assert network is not None
    ports = sorted(set(policy_ports(network.egress)) | set(policy_ports(network.ingress)))
    networks = tuple(
        n
        for section in (network.egress, network.ingress)
        for rule in (section.rules if section else ())
        for n in rule.cidrs
    )
    rng = random.Random(f"{seed} {where}")
    return [skb_packet(rng, where, ports, networks) for _ in range(PACKETS_PER_POLICY)]


def policy_ports(section: NetworkSection | None) -> list[int]:
    points = {0, 1, 53, 443, 65535}
    for rule in section.rules if section else ():
        for r in rule.ports:
            points.update({r.low - 1, r.low, r.high, min(65535, r.high + 1)})
    return sorted(p for p in points if 0 <= p <= 65535)


def observe_packet(frame: bytes, direction: str) -> reference.Packet:
    """What the program can see in a frame, per the rules in bpf/net.c's comments: the
    remote address, the protocol (None if the IPv6 extension headers cannot be walked) and,
    in the first fragment only, the destination port or ICMP type (None if cut off)."""
    ethertype = int.from_bytes(frame[12:14], "big")
    ip = frame[14:]
    egress = direction == "egress"
    if ethertype == 0x0800 and len(ip) >= 20:
        ihl, protocol = ip[0] & 0xF, ip[9]
        remote: reference.IPAddress = ipaddress.IPv4Address(ip[16:20] if egress else ip[12:16])
        first = (int.from_bytes(ip[6:8], "big") & 0x1FFF) == 0 and ihl >= 5
        offset = ihl * 4
    elif ethertype == 0x86DD and len(ip) >= 40:
        remote = ipaddress.IPv6Address(ip[24:40] if egress else ip[8:24])
        nexthdr, offset, first = ip[6], 40, True
        for _ in range(IPV6_EXT_MAX):
            if nexthdr not in IPV6_EXT:
                break
            ext = ip[offset : offset + 8]
            if len(ext) < 8:
                return reference.Packet(direction, remote, None, interface="lo")  # cut off
            if nexthdr == 44:
                nexthdr, offset = ext[0], offset + 8
                if int.from_bytes(ext[2:4], "big") & 0xFFF8:
                    first = False  # a non-first fragment: no L4 header follows
                    break
            elif nexthdr == 51:
                nexthdr, offset = ext[0], offset + (ext[1] + 2) * 4
            else:
                nexthdr, offset = ext[0], offset + (ext[1] + 1) * 8
        else:
            if nexthdr in IPV6_EXT:
                return reference.Packet(direction, remote, None, interface="lo")  # too many
        protocol = nexthdr
    else:
        return reference.Packet(direction, None, None, interface="lo")  # not IP, or cut off
    port = icmp_type = None
    if first and protocol in (TCP, UDP) and offset + 4 <= len(ip):
        port = int.from_bytes(ip[offset + 2 : offset + 4], "big")
    if first and protocol in (ICMP, ICMPV6) and offset + 1 <= len(ip):
        icmp_type = ip[offset]
    return reference.Packet(direction, remote, protocol, port, icmp_type, "lo")  # type: ignore[arg-type]


# --- running ------------------------------------------------------------------------------------


class SkbProgram:
    def __init__(self, spec: ProgramSpec) -> None:
        self.program: LoadedProgram = load_program(spec)

    def run(self, frame: bytes) -> int:
        return self.program.program.test_run(frame).retval

    def slot_count(self, slot: int) -> int:
        values = self.program.maps["counters"].lookup_per_cpu(U32.pack(slot)) or []
        return sum(sum(COUNTER.unpack_from(v).values()) for v in values)

    def close(self) -> None:
        self.program.close()


def expected_slot(order: tuple[NetworkRule, ...], verdict: reference.Verdict) -> int:
    """The counter slot the programs count a decision in: the rule's canonical index."""
    if verdict.rule is None:
        return 64
    return next(i for i, rule in enumerate(order) if rule is verdict.rule)


def check_skb(policy: Policy, where: Anchors, seed: int, markers: bool = False) -> None:
    """The policy's packets (:func:`skb_packets`) through both compiled programs, each
    packet's verdict and counted slot against the reference's."""
    network = policy.network
    assert network is not None
    packets = skb_packets(seed, where, policy)
    flat_max = 0 if markers else None  # 0: markers wherever lengths differ (both families)
    compiled = compile_policy(policy, resolve_interfaces=resolve, cidr_flat_max=flat_max)
    specs = {spec.hook: spec for spec in compiled.programs}
    layout = "index markers" if markers else "index flat"
    for hook in ("egress", "ingress"):
        order = ordered_rules(getattr(network, hook).rules)
        program = SkbProgram(specs[hook])
        try:
            for number, packet in enumerate(packets):
                frame = packet.frame(hook)
                seen = observe_packet(frame, hook)
                verdict = reference.evaluate(policy, seen)
                slot = expected_slot(order, verdict)
                before = program.slot_count(slot)
                kernel = program.run(frame)
                after = program.slot_count(slot)
                checked["skb"] += 1
                which = (
                    f"{hook} ({layout}), packet {number} of skb_packets(seed={seed}, where, "
                    f"policy): {packet.description} (frame {frame.hex()}, seen as {seen})"
                )
                assert kernel == int(verdict.allowed), (
                    f"{which}: the kernel {'allows' if kernel else 'drops'} it; the reference "
                    f"says {verdict.verdict} by {verdict.rule or 'the default'}"
                )
                assert after == before + 1, (
                    f"{which}: same verdict, but the kernel did not count it against slot "
                    f"{slot} ({verdict.rule or 'default'})"
                )
        finally:
            program.close()


@st.composite
def skb_case(draw: st.DrawFn) -> tuple[Policy, Anchors, int]:
    """A policy, the anchors its rules were built around, and the seed of its packets."""
    where = draw(anchors())
    sections = network_section(where)
    egress = draw(sections)
    ingress = draw(sections)
    policy = policy_model(name="diff", network=Network(ingress=ingress, egress=egress))
    return policy, where, draw(st.integers(0, 2**64 - 1))


def test_skb_programs_agree_with_the_reference(kernel_ready: None) -> None:
    started, before = time.monotonic(), checked["skb"]

    @settings(
        max_examples=SKB_EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(skb_case(), st.booleans())
    def run(case: tuple[Policy, Anchors, int], markers: bool) -> None:
        check_skb(*case, markers=markers)

    run()
    cases = checked["skb"] - before
    print(f"\n{cases} packet cases checked in {time.monotonic() - started:.1f} s")
    assert cases >= SKB_EXAMPLES * PACKETS_PER_POLICY * 2 // 2


# --- real actions in a scratch cgroup (sock_addr, device, sysctl) --------------------------------

REAL_EXAMPLES = int(os.environ.get("CGP_DIFF_REAL_EXAMPLES", "50"))
ACTIONS_PER_POLICY = 30
REAL_SETTINGS = settings(
    max_examples=REAL_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture
def batch_probe(scratch_cgroup: object) -> Iterator[BatchProbe]:
    probe = BatchProbe(scratch_cgroup)
    try:
        yield probe
    finally:
        probe.close()


def run_batch(probe: BatchProbe, actions: list[list[object]]) -> list[dict[str, object]]:
    return probe.run(actions)


def applied_to(cgroup: object, root: Path, bpf_dir: Path, policy: Policy) -> Enforcer:
    enforcer = Enforcer(root, bpf_dir)
    target = Policy(
        name=policy.name,
        mode=policy.mode,
        targets=(Target(cgroup.relative, False),),  # type: ignore[attr-defined]
        network=policy.network,
        sockets=policy.sockets,
        devices=policy.devices,
        sysctl=policy.sysctl,
    )
    outcomes = enforcer.apply(enforcer.plan([target]))
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    return enforcer


def remove_policy(enforcer: Enforcer, name: str) -> None:
    outcomes = enforcer.apply(enforcer.plan_removal([name]))
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]


def compare_real(
    kind: str,
    probe: BatchProbe,
    root: Path,
    bpf_dir: Path,
    policy: Policy,
    batch: list[tuple[list[object], reference.Action]],
) -> None:
    enforcer = applied_to(probe.cgroup, root, bpf_dir, policy)
    try:
        results = run_batch(probe, [args for args, _ in batch])
    finally:
        remove_policy(enforcer, policy.name)
    for (args, actions), result in zip(batch, results, strict=True):
        # One system call may run several hooks (reference.socket_address_views): it goes
        # through only if every one allows.
        views = actions if isinstance(actions, list) else [actions]
        verdicts = [reference.evaluate(policy, view) for view in views]
        expected_denied = any(not v.allowed for v in verdicts)
        denied = not result["ok"] and result["errno"] == errno.EPERM
        checked[kind] += 1
        why = [
            f"{v.verdict} by {v.rule or 'the default'} for {a}"
            for a, v in zip(views, verdicts, strict=True)
        ]
        assert denied == expected_denied, (
            f"{args}: the kernel {'denies' if denied else 'allows'} ({result}); the reference "
            f"says {'; '.join(why)}"
        )


# sockets.connect / sockets.bind: loopback addresses only, so every action is instant.

LOOPBACK_V4 = (
    ipaddress.IPv4Address("127.0.0.1"),
    ipaddress.IPv4Address("127.1.2.3"),
    ipaddress.IPv4Address("127.200.0.9"),
)


@st.composite
def loopback_v4(draw: st.DrawFn) -> ipaddress.IPv4Address:
    base = int(draw(st.sampled_from(LOOPBACK_V4)))
    bits = draw(st.sampled_from([0, 1, 8, 16, 23]))
    return ipaddress.IPv4Address(near(base, 32, bits, draw(st.integers(0, 2**32 - 1))))


LOOPBACK_V4_ADDRESSES = loopback_v4()  # built once, drawn from many times (see PREFIX_LENGTHS)
LOOPBACK_CIDR_KINDS = st.sampled_from(["v4", "v4", "v4", "v6", "mapped", "elsewhere"])
LOOPBACK_V6_LENGTHS = st.sampled_from([0, 64, 127, 128])
ELSEWHERE = st.sampled_from(["10.0.0.0/8", "fd00::/8", "0.0.0.0/1"])


@st.composite
def loopback_cidr(draw: st.DrawFn) -> reference.IPNetwork:
    kind = draw(LOOPBACK_CIDR_KINDS)
    if kind == "v4":
        address = draw(LOOPBACK_V4_ADDRESSES)
        return ipaddress.ip_network(f"{address}/{draw(PREFIX_LENGTHS[32])}", False)
    if kind == "v6":
        return ipaddress.ip_network(f"::1/{draw(LOOPBACK_V6_LENGTHS)}", False)
    if kind == "mapped":
        length = 96 + draw(PREFIX_LENGTHS[32])
        return ipaddress.ip_network(f"::ffff:{draw(LOOPBACK_V4_ADDRESSES)}/{length}", False)
    return ipaddress.ip_network(draw(ELSEWHERE))


LOOPBACK_CIDR_LISTS: st.SearchStrategy[list[reference.IPNetwork]] = st.one_of(
    st.just([]), st.lists(loopback_cidr(), min_size=1, max_size=3)
)
SOCKET_PROTOCOLS = st.sampled_from(["tcp", "udp", "any"])


@st.composite
def address_section(draw: st.DrawFn, ports: tuple[int, ...]) -> SocketAddressSection:
    point = st.one_of(st.sampled_from(ports), st.sampled_from([1, 1024, 65535]))
    rules = []
    for _ in range(draw(st.integers(0, 8))):
        protocol = draw(SOCKET_PROTOCOLS)
        cidrs = draw(LOOPBACK_CIDR_LISTS)
        port_items: list[PortRange] = []
        if draw(st.booleans()):
            for _ in range(draw(st.integers(1, 2))):
                a, b = draw(point), draw(point)
                port_items.append(PortRange(min(a, b), max(a, b)))
        action = draw(ACTIONS)
        rules.append(SocketAddressRule(action, tuple(cidrs), protocol, tuple(port_items)))  # type: ignore[arg-type]
    return SocketAddressSection(draw(ACTIONS), tuple(rules))


def socket_address_action(
    ports: tuple[int, ...],
) -> st.SearchStrategy[tuple[list[object], list[reference.SocketAddress]]]:
    families = st.sampled_from(["v4", "v4", "v6", "mapped"])
    operations = st.sampled_from(["connect", "connect", "sendmsg", "bind"])
    transports = st.sampled_from(["tcp", "udp"])
    bind_ports = st.one_of(st.just(0), st.sampled_from(ports), st.integers(40000, 49999))
    peer_ports = st.sampled_from(ports)

    @st.composite
    def draw_action(draw: st.DrawFn) -> tuple[list[object], list[reference.SocketAddress]]:
        family = draw(families)
        if family == "v6":
            address: reference.IPAddress = ipaddress.IPv6Address("::1")
        elif family == "mapped":
            address = ipaddress.IPv6Address(f"::ffff:{draw(LOOPBACK_V4_ADDRESSES)}")
        else:
            address = draw(LOOPBACK_V4_ADDRESSES)
        host = str(address)
        operation = draw(operations)
        protocol = "udp" if operation == "sendmsg" else draw(transports)
        if operation == "bind":
            port = draw(bind_ports)
            args: list[object] = ["bind", protocol, host, port]
        else:
            port = draw(peer_ports)
            args = (
                ["connect", protocol, host, port]
                if operation == "connect"
                else ["sendto", host, port]
            )
        number = TCP if protocol == "tcp" else UDP
        # The probe's UDP connect also sends a datagram: the views include that send.
        return args, reference.socket_address_views(operation, address, port, number)  # type: ignore[arg-type]

    return draw_action()


def test_socket_address_hooks_agree_with_the_reference(
    batch_probe: BatchProbe, cgroup_root: Path, bpf_dir: Path, loopback_ports: object
) -> None:
    ports: tuple[int, ...] = loopback_ports.ports  # type: ignore[attr-defined]
    started, before = time.monotonic(), checked["sock_addr"]

    @REAL_SETTINGS
    @given(
        address_section(ports),
        address_section(ports),
        st.lists(
            socket_address_action(ports), min_size=ACTIONS_PER_POLICY, max_size=ACTIONS_PER_POLICY
        ),
        st.booleans(),
    )
    def run(
        bind: SocketAddressSection, connect: SocketAddressSection, batch: list, markers: bool
    ) -> None:
        policy = policy_model(name="diff", sockets=Sockets(bind=bind, connect=connect))
        flat_max = compile_module.CIDR6_FLAT_MAX
        # The Enforcer compiles with the module's threshold: 0 forces the markers of the
        # IPv4 and IPv6 indexes.
        compile_module.CIDR6_FLAT_MAX = 0 if markers else flat_max
        try:
            compare_real("sock_addr", batch_probe, cgroup_root, bpf_dir, policy, batch)
        finally:
            compile_module.CIDR6_FLAT_MAX = flat_max

    run()
    print(
        f"\n{checked['sock_addr'] - before} bind/connect/sendmsg cases in "
        f"{time.monotonic() - started:.1f} s"
    )


# devices: mknod of nodes in tmp_path, and opens of nodes made there beforehand.

DEVICES = (
    ("char", 1, 3),
    ("char", 1, 5),
    ("char", 1, 7),
    ("char", 1, 9),
    ("char", 10, 200),
    ("char", 240, 7),
    ("block", 7, 0),
    ("block", 240, 3),
)


@st.composite
def device_section(draw: st.DrawFn) -> DeviceSection:
    rules = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["char", "block", "any"]))
        major = draw(st.sampled_from([None, 1, 10, 7, 240]))
        minor = draw(st.sampled_from([None, 3, 5, 7, 9, 0, 200]))
        access = draw(st.sets(st.sampled_from("rwm"), min_size=1))
        text = "".join(a for a in "rwm" if a in access)
        rules.append(DeviceRule(draw(st.sampled_from(["allow", "deny"])), kind, major, minor, text))  # type: ignore[arg-type]
    return DeviceSection(draw(st.sampled_from(["allow", "deny"])), tuple(rules))


def test_device_hook_agrees_with_the_reference(
    batch_probe: BatchProbe, cgroup_root: Path, bpf_dir: Path, tmp_path: Path
) -> None:
    nodes = {}
    for kind, major, minor in DEVICES:
        path = tmp_path / f"{kind}-{major}-{minor}"
        mode = (stat.S_IFCHR if kind == "char" else stat.S_IFBLK) | 0o600
        os.mknod(path, mode, os.makedev(major, minor))
        nodes[(kind, major, minor)] = path
    can_open = not os.statvfs(tmp_path).f_flag & os.ST_NODEV
    opens = ["r", "w", "rw"] if can_open else []
    counter = iter(range(10**9))

    @st.composite
    def device_action(draw: st.DrawFn) -> tuple[list[object], reference.Action]:
        kind, major, minor = draw(st.sampled_from(DEVICES))
        how = draw(st.sampled_from(["mknod", *opens]))
        action = reference.DeviceAccess(kind, major, minor, "m" if how == "mknod" else how)  # type: ignore[arg-type]
        if how == "mknod":
            path = tmp_path / f"new-{next(counter)}"
            return ["mknod", str(path), kind, major, minor], action
        return ["open", str(nodes[(kind, major, minor)]), how], action

    started, before = time.monotonic(), checked["device"]

    @REAL_SETTINGS
    @given(
        device_section(),
        st.lists(device_action(), min_size=ACTIONS_PER_POLICY, max_size=ACTIONS_PER_POLICY),
    )
    def run(section: DeviceSection, batch: list) -> None:
        policy = policy_model(name="diff", devices=section)
        compare_real("device", batch_probe, cgroup_root, bpf_dir, policy, batch)

    run()
    print(f"\n{checked['device'] - before} device cases in {time.monotonic() - started:.1f} s")


# sysctl: reads of real sysctls, and writes of a value every integer sysctl refuses (EINVAL
# after the hook allowed it), so that nothing on the host changes.

INTEGER_SYSCTLS = (
    "vm/swappiness",
    "net/ipv4/ip_default_ttl",
    "net/ipv4/tcp_syn_retries",
    "net/core/somaxconn",
    "kernel/msgmax",
)


def readable_sysctls(limit: int = 40) -> list[str]:
    names = []
    for folder, _, files in os.walk("/proc/sys"):
        for name in files:
            path = os.path.join(folder, name)
            if os.stat(path).st_mode & 0o444 and not path.startswith("/proc/sys/net/ipv6/conf"):
                names.append(os.path.relpath(path, "/proc/sys"))
    names.sort()
    step = max(1, len(names) // limit)
    return names[::step][:limit]


@st.composite
def sysctl_pattern(draw: st.DrawFn, names: list[str]) -> str:
    name = draw(st.sampled_from(names))
    parts = name.split("/")
    shape = draw(st.sampled_from(["exact", "component", "prefix", "suffix", "star"]))
    if shape == "component":
        parts[draw(st.integers(0, len(parts) - 1))] = "*"
    elif shape == "prefix":
        return name[: draw(st.integers(1, len(name)))] + "*"
    elif shape == "suffix":
        return "*" + name[draw(st.integers(0, len(name) - 1)) :]
    elif shape == "star":
        return "*"
    return "/".join(parts)


def test_sysctl_hook_agrees_with_the_reference(
    batch_probe: BatchProbe, cgroup_root: Path, bpf_dir: Path
) -> None:
    names = readable_sysctls()
    writable = list(INTEGER_SYSCTLS)
    # Keep only what behaves as assumed without a policy: reads that work, writes of "x"
    # that fail with EINVAL.
    baseline = run_batch(
        batch_probe,
        [["sysctl-read", n] for n in names] + [["sysctl-write", n, "x"] for n in writable],
    )
    names = [n for n, r in zip(names, baseline, strict=False) if r["ok"]]
    writable = [
        n
        for n, r in zip(writable, baseline[len(baseline) - len(writable) :], strict=True)
        if r["errno"] == errno.EINVAL
    ]
    assert names and writable
    pool = names + writable

    @st.composite
    def sysctl_action(draw: st.DrawFn) -> tuple[list[object], reference.Action]:
        if draw(st.booleans()):
            name = draw(st.sampled_from(writable))
            return ["sysctl-write", name, "x"], reference.SysctlAccess(name, True)
        name = draw(st.sampled_from(pool))
        return ["sysctl-read", name], reference.SysctlAccess(name, False)

    @st.composite
    def sysctl_section(draw: st.DrawFn) -> SysctlSection:
        rules = [
            SysctlRule(
                draw(st.sampled_from(["allow", "deny"])),
                draw(sysctl_pattern(pool)),
                draw(st.sampled_from(["read", "write", "rw"])),
            )
            for _ in range(draw(st.integers(0, 8)))
        ]
        return SysctlSection(draw(st.sampled_from(["allow", "deny"])), tuple(rules))

    started, before = time.monotonic(), checked["sysctl"]

    @REAL_SETTINGS
    @given(
        sysctl_section(),
        st.lists(sysctl_action(), min_size=ACTIONS_PER_POLICY, max_size=ACTIONS_PER_POLICY),
    )
    def run(section: SysctlSection, batch: list) -> None:
        policy = policy_model(name="diff", sysctl=section)
        compare_real("sysctl", batch_probe, cgroup_root, bpf_dir, policy, batch)

    run()
    print(f"\n{checked['sysctl'] - before} sysctl cases in {time.monotonic() - started:.1f} s")
