"""Differential tests: the compiled BPF programs against the reference evaluator.

Hypothesis draws random policies (overlapping CIDRs of both families, IPv4-mapped ones,
port ranges, protocols, ICMP types, interfaces, both defaults, deny inside allow and allow
inside deny, sometimes more than 32 rules so that the high half of the 64-bit masks is used)
and, per policy, a batch of packets whose addresses, ports and types sit near the policy's
own prefixes and boundaries, so that they hit. Every packet goes through the compiled egress
and ingress programs with BPF_PROG_TEST_RUN and through :mod:`cgpolicy.reference`; the
verdict and the counter slot of the deciding rule must agree. Packets include what the
programs must treat as unknown: IPv4 and IPv6 non-first fragments, IPv6 extension header
chains (longer than the program walks, too), IPv4 options and a malformed IHL, truncated
headers, and frames that are not IP at all. Both IPv4 CIDR layouts are exercised: each policy
is compiled either with the default threshold (its short lists take the LPM trie) or with the
/16 index forced (``cidr4_index_min=0``, bpf/net.c cgp_cidr4_mask), hypothesis choosing.

The hooks BPF_PROG_TEST_RUN cannot run (sock_addr, device, sysctl) are compared on real
actions from a process in a scratch cgroup, fewer of them: a denial is EPERM, anything
else (success, ECONNREFUSED, EADDRINUSE, ENXIO, EINVAL, ...) means the policy let the
action through.
"""

from __future__ import annotations

import errno
import fnmatch
import ipaddress
import json
import os
import stat
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cgpolicy import reference
from cgpolicy.compiler import compile as compile_module
from cgpolicy.compiler.compile import compile_policy, ordered_rules
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
IPV6_EXT_MAX = 6  # bpf/net.c CGP_IPV6_EXT_MAX
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


@st.composite
def cidr(draw: st.DrawFn, where: Anchors) -> reference.IPNetwork:
    kind = draw(st.sampled_from(["v4", "v4", "v6", "mapped"]))
    if kind == "v4":
        address = draw(st.sampled_from(where.v4))
        return ipaddress.ip_network(f"{address}/{draw(prefix_lengths(32))}", strict=False)
    if kind == "v6":
        address6 = draw(st.sampled_from(where.v6))
        return ipaddress.ip_network(f"{address6}/{draw(prefix_lengths(128))}", strict=False)
    address = draw(st.sampled_from(where.v4))
    length = 96 + draw(prefix_lengths(32))
    return ipaddress.ip_network(f"::ffff:{address}/{length}", strict=False)


@st.composite
def port_ranges(draw: st.DrawFn) -> tuple[PortRange, ...]:
    point = st.one_of(st.sampled_from(PORT_POINTS), st.integers(1, 65535))
    items = []
    for _ in range(draw(st.integers(1, 3))):
        a, b = draw(point), draw(point)
        items.append(PortRange(min(a, b), max(a, b)))
    return tuple(items)


@st.composite
def network_rule(draw: st.DrawFn, where: Anchors) -> NetworkRule:
    protocol = draw(st.sampled_from(["tcp", "udp", "icmp", "icmpv6", "any"]))
    cidrs = draw(st.one_of(st.just(()), st.lists(cidr(where), min_size=1, max_size=3)))
    ports = ()
    icmp_types: tuple[int, ...] = ()
    if protocol in ("tcp", "udp") and draw(st.booleans()):
        ports = draw(port_ranges())
    if protocol in ("icmp", "icmpv6") and draw(st.booleans()):
        icmp_types = tuple(draw(st.lists(st.sampled_from(ICMP_TYPES), min_size=1, max_size=3)))
    interfaces = draw(st.sampled_from(INTERFACE_PATTERNS)) if draw(st.integers(0, 7)) == 0 else ()
    return NetworkRule(
        draw(st.sampled_from(["allow", "deny"])),
        tuple(cidrs),
        protocol,  # type: ignore[arg-type]
        ports,
        icmp_types,
        interfaces,
    )


@st.composite
def network_section(draw: st.DrawFn, where: Anchors) -> NetworkSection:
    rule = network_rule(where)
    rules = draw(
        st.one_of(
            st.lists(rule, max_size=8),
            st.lists(rule, max_size=8),
            st.lists(rule, min_size=33, max_size=64),
        )
    )
    return NetworkSection(draw(st.sampled_from(["allow", "deny"])), tuple(rules))


def make_policy(**sections: object) -> Policy:
    return Policy(name="diff", mode="enforce", targets=(Target("x", False),), **sections)  # type: ignore[arg-type]


# --- packets ------------------------------------------------------------------------------------


def near(address: int, width: int, bits: int, noise: int) -> int:
    """The address with its lowest ``bits`` bits replaced by ``noise``."""
    low = (1 << bits) - 1
    return (address & ~low & ((1 << width) - 1)) | (noise & low)


@st.composite
def remote_address(draw: st.DrawFn, where: Anchors, family: str) -> reference.IPAddress:
    width = 32 if family in ("v4", "mapped") else 128
    pool = where.v4 if width == 32 else where.v6
    if draw(st.integers(0, 5)) == 0:
        value = draw(st.integers(0, 2**width - 1))
    else:
        base = int(draw(st.sampled_from(pool)))
        bits = draw(st.one_of(st.sampled_from([0, 1, 8, 16, width - 96 if width > 32 else 4])))
        value = near(base, width, max(0, bits), draw(st.integers(0, 2**width - 1)))
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


@st.composite
def l4_payload(draw: st.DrawFn, protocol: int, ports: list[int]) -> bytes:
    if protocol == TCP:
        payload = tcp_header(draw(st.sampled_from(ports)))
    elif protocol == UDP:
        payload = udp_header(draw(st.sampled_from(ports)))
    elif protocol in (ICMP, ICMPV6):
        icmp_type = draw(st.one_of(st.sampled_from(ICMP_TYPES), st.integers(0, 255)))
        payload = icmp_header(icmp_type)
    else:
        payload = b"\x00" * 8
    if draw(st.integers(0, 9)) == 0:  # truncated L4 header
        payload = payload[: draw(st.integers(0, 4))]
    return payload


@st.composite
def ipv6_extensions(draw: st.DrawFn, protocol: int, payload: bytes) -> tuple[int, bytes]:
    """A chain of extension headers in front of the payload: (first nexthdr, bytes)."""
    kinds = draw(
        st.lists(
            st.sampled_from(["hbh", "routing", "dstopts", "ah", "frag0", "frag", "long"]),
            max_size=8,
        )
    )
    nexthdr, data = protocol, payload
    for kind in reversed(kinds):
        if kind in ("frag0", "frag"):
            offset = 0 if kind == "frag0" else draw(st.integers(1, 8191)) << 3
            data = struct.pack("!BBHI", nexthdr, 0, offset | 1, 7) + data
            nexthdr = 44
        elif kind == "ah":
            length = draw(st.integers(0, 2))  # (length + 2) * 4 bytes: 8, 12, 16
            size = (length + 2) * 4
            data = struct.pack("!BB", nexthdr, length) + b"\x00" * (size - 2) + data
            nexthdr = 51
        else:
            length = 1 if kind == "long" else 0  # (length + 1) * 8 bytes
            code = {"hbh": 0, "routing": 43, "dstopts": 60, "long": 60}[kind]
            data = struct.pack("!BB", nexthdr, length) + b"\x00" * ((length + 1) * 8 - 2) + data
            nexthdr = code
    if kinds and draw(st.integers(0, 9)) == 0:  # cut inside the chain
        data = data[: draw(st.integers(0, len(data)))]
    return nexthdr, data


@st.composite
def skb_packet(draw: st.DrawFn, where: Anchors, ports: list[int]) -> SkbPacket:
    # PROG_TEST_RUN refuses IPv4/IPv6 frames shorter than the IP header, so a truncated IP
    # header is not drawn; a frame that is not IP at all is.
    family = draw(st.sampled_from(["v4", "v4", "v6", "v6", "mapped", "other"]))
    if family == "other":
        ethertype = draw(st.sampled_from([0x0806, 0x88CC, 0x8100]))
        return SkbPacket("non-IP", ethertype, ("raw", b"\x00" * 40))
    remote = draw(remote_address(where, family))
    if family == "v4":
        local = ipaddress.IPv4Address(draw(st.integers(0, 2**32 - 1)))
        protocol = draw(st.sampled_from([TCP, TCP, UDP, UDP, ICMP, ICMPV6, 47, 0, 132]))
        payload = draw(l4_payload(protocol, ports))
        frag = draw(st.sampled_from([0, 0, 0, 0x2000, 1, 185, 0x2000 | 185]))  # MF | offset
        ihl = draw(st.sampled_from([5, 5, 5, 6, 7, 4, 15]))
        total = 20 + len(payload)
        desc = f"IPv4 {remote} proto {protocol} frag {frag:#x} ihl {ihl} payload {payload.hex()}"
        return SkbPacket(desc, 0x0800, ("v4", remote, local, protocol, payload, frag, ihl, total))
    local6 = ipaddress.IPv6Address(draw(st.integers(0, 2**128 - 1)))
    protocol = draw(st.sampled_from([TCP, TCP, UDP, UDP, ICMPV6, ICMPV6, ICMP, 47, 132]))
    payload = draw(l4_payload(protocol, ports))
    nexthdr, data = draw(ipv6_extensions(protocol, payload))
    desc = f"IPv6 {remote} nexthdr {nexthdr} data {data.hex()}"
    return SkbPacket(desc, 0x86DD, ("v6", remote, local6, nexthdr, data))


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
    def __init__(self, policy: Policy, hook: str, cidr4_index: bool = False) -> None:
        index_min = 0 if cidr4_index else None  # 0: the /16 index layout whatever the size
        compiled = compile_policy(policy, resolve_interfaces=resolve, cidr4_index_min=index_min)
        (spec,) = [p for p in compiled.programs if p.hook == hook]
        self.program: LoadedProgram = load_program(spec)
        self.totals: dict[int, int] = {}

    def run(self, frame: bytes) -> int:
        return self.program.program.test_run(frame).retval

    def slot_count(self, slot: int) -> int:
        values = self.program.maps["counters"].lookup_per_cpu(struct.pack("<I", slot)) or []
        return sum(sum(struct.unpack_from("<QQ", v)) for v in values)

    def close(self) -> None:
        self.program.close()


def expected_slot(order: tuple[NetworkRule, ...], verdict: reference.Verdict) -> int:
    """The counter slot the programs count a decision in: the rule's canonical index."""
    if verdict.rule is None:
        return 64
    return next(i for i, rule in enumerate(order) if rule is verdict.rule)


def check_skb(policy: Policy, packets: list[SkbPacket], cidr4_index: bool = False) -> None:
    assert policy.network is not None
    for hook in ("egress", "ingress"):
        order = ordered_rules(getattr(policy.network, hook).rules)
        program = SkbProgram(policy, hook, cidr4_index)
        try:
            for packet in packets:
                frame = packet.frame(hook)
                seen = observe_packet(frame, hook)
                verdict = reference.evaluate(policy, seen)
                slot = expected_slot(order, verdict)
                before = program.slot_count(slot)
                kernel = program.run(frame)
                after = program.slot_count(slot)
                checked["skb"] += 1
                assert kernel == int(verdict.allowed), (
                    f"{hook} ({'/16 index' if cidr4_index else 'trie'}): kernel "
                    f"{'allows' if kernel else 'drops'} {packet.description} "
                    f"(seen as {seen}); the reference says {verdict.verdict} by "
                    f"{verdict.rule or 'the default'}"
                )
                assert after == before + 1, (
                    f"{hook}: {packet.description} (seen as {seen}): same verdict, but the "
                    f"kernel did not count it against slot {slot} ({verdict.rule or 'default'})"
                )
        finally:
            program.close()


@st.composite
def skb_case(draw: st.DrawFn) -> tuple[Policy, list[SkbPacket]]:
    where = draw(anchors())
    egress = draw(network_section(where))
    ingress = draw(network_section(where))
    policy = make_policy(network=Network(ingress=ingress, egress=egress))
    ports = sorted(set(policy_ports(egress)) | set(policy_ports(ingress)))
    packets = draw(
        st.lists(skb_packet(where, ports), min_size=PACKETS_PER_POLICY, max_size=PACKETS_PER_POLICY)
    )
    return policy, packets


def test_skb_programs_agree_with_the_reference(kernel_ready: None) -> None:
    started, before = time.monotonic(), checked["skb"]

    @settings(
        max_examples=SKB_EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(skb_case(), st.booleans())
    def run(case: tuple[Policy, list[SkbPacket]], cidr4_index: bool) -> None:
        check_skb(*case, cidr4_index=cidr4_index)

    run()
    cases = checked["skb"] - before
    print(f"\n{cases} packet cases checked in {time.monotonic() - started:.1f} s")
    assert cases >= SKB_EXAMPLES * PACKETS_PER_POLICY * 2 // 2


# --- real actions in a scratch cgroup (sock_addr, device, sysctl) --------------------------------

BATCH_PROBE = Path(__file__).with_name("probe_batch.py")
REAL_EXAMPLES = int(os.environ.get("CGP_DIFF_REAL_EXAMPLES", "50"))
ACTIONS_PER_POLICY = 30
REAL_SETTINGS = settings(
    max_examples=REAL_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def run_batch(cgroup: object, actions: list[list[object]]) -> list[dict[str, object]]:
    done = cgroup.run([sys.executable, str(BATCH_PROBE)], input=json.dumps(actions))  # type: ignore[attr-defined]
    if not done.stdout.strip():
        raise RuntimeError(f"batch probe failed: {done.stderr}")
    return json.loads(done.stdout)


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
    cgroup: object,
    root: Path,
    bpf_dir: Path,
    policy: Policy,
    batch: list[tuple[list[object], reference.Action]],
) -> None:
    enforcer = applied_to(cgroup, root, bpf_dir, policy)
    try:
        results = run_batch(cgroup, [args for args, _ in batch])
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


@st.composite
def loopback_cidr(draw: st.DrawFn) -> reference.IPNetwork:
    kind = draw(st.sampled_from(["v4", "v4", "v4", "v6", "mapped", "elsewhere"]))
    if kind == "v4":
        return ipaddress.ip_network(f"{draw(loopback_v4())}/{draw(prefix_lengths(32))}", False)
    if kind == "v6":
        return ipaddress.ip_network(f"::1/{draw(st.sampled_from([0, 64, 127, 128]))}", False)
    if kind == "mapped":
        length = 96 + draw(prefix_lengths(32))
        return ipaddress.ip_network(f"::ffff:{draw(loopback_v4())}/{length}", False)
    return ipaddress.ip_network(draw(st.sampled_from(["10.0.0.0/8", "fd00::/8", "0.0.0.0/1"])))


@st.composite
def address_section(draw: st.DrawFn, ports: tuple[int, ...]) -> SocketAddressSection:
    point = st.one_of(st.sampled_from(ports), st.sampled_from([1, 1024, 65535]))
    rules = []
    for _ in range(draw(st.integers(0, 8))):
        protocol = draw(st.sampled_from(["tcp", "udp", "any"]))
        cidrs = draw(st.one_of(st.just([]), st.lists(loopback_cidr(), min_size=1, max_size=3)))
        port_items: list[PortRange] = []
        if draw(st.booleans()):
            for _ in range(draw(st.integers(1, 2))):
                a, b = draw(point), draw(point)
                port_items.append(PortRange(min(a, b), max(a, b)))
        action = draw(st.sampled_from(["allow", "deny"]))
        rules.append(SocketAddressRule(action, tuple(cidrs), protocol, tuple(port_items)))  # type: ignore[arg-type]
    return SocketAddressSection(draw(st.sampled_from(["allow", "deny"])), tuple(rules))


@st.composite
def socket_address_action(
    draw: st.DrawFn, ports: tuple[int, ...]
) -> tuple[list[object], list[reference.SocketAddress]]:
    family = draw(st.sampled_from(["v4", "v4", "v6", "mapped"]))
    if family == "v6":
        address: reference.IPAddress = ipaddress.IPv6Address("::1")
    elif family == "mapped":
        address = ipaddress.IPv6Address(f"::ffff:{draw(loopback_v4())}")
    else:
        address = draw(loopback_v4())
    host = str(address)
    operation = draw(st.sampled_from(["connect", "connect", "sendmsg", "bind"]))
    protocol = "udp" if operation == "sendmsg" else draw(st.sampled_from(["tcp", "udp"]))
    if operation == "bind":
        port = draw(st.one_of(st.just(0), st.sampled_from(ports), st.integers(40000, 49999)))
        args: list[object] = ["bind", protocol, host, port]
    else:
        port = draw(st.sampled_from(ports))
        args = (
            ["connect", protocol, host, port] if operation == "connect" else ["sendto", host, port]
        )
    number = TCP if protocol == "tcp" else UDP
    # The probe's UDP connect also sends a datagram: the views include that send.
    return args, reference.socket_address_views(operation, address, port, number)  # type: ignore[arg-type]


def test_socket_address_hooks_agree_with_the_reference(
    scratch_cgroup: object, cgroup_root: Path, bpf_dir: Path, loopback_ports: object
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
        bind: SocketAddressSection, connect: SocketAddressSection, batch: list, cidr4_index: bool
    ) -> None:
        policy = make_policy(sockets=Sockets(bind=bind, connect=connect))
        default = compile_module.CIDR4_INDEX_MIN
        # The Enforcer compiles with the module's threshold: 0 forces the /16 index layout.
        compile_module.CIDR4_INDEX_MIN = 0 if cidr4_index else default
        try:
            compare_real("sock_addr", scratch_cgroup, cgroup_root, bpf_dir, policy, batch)
        finally:
            compile_module.CIDR4_INDEX_MIN = default

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
    scratch_cgroup: object, cgroup_root: Path, bpf_dir: Path, tmp_path: Path
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
        policy = make_policy(devices=section)
        compare_real("device", scratch_cgroup, cgroup_root, bpf_dir, policy, batch)

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
    scratch_cgroup: object, cgroup_root: Path, bpf_dir: Path
) -> None:
    names = readable_sysctls()
    writable = list(INTEGER_SYSCTLS)
    # Keep only what behaves as assumed without a policy: reads that work, writes of "x"
    # that fail with EINVAL.
    baseline = run_batch(
        scratch_cgroup,
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
        policy = make_policy(sysctl=section)
        compare_real("sysctl", scratch_cgroup, cgroup_root, bpf_dir, policy, batch)

    run()
    print(f"\n{checked['sysctl'] - before} sysctl cases in {time.monotonic() - started:.1f} s")
