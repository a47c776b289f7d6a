"""The BPF programs on the real kernel: every program passes the verifier, and the cgroup_skb
programs decide real packets (BPF_PROG_TEST_RUN) as the policy semantics say.

For cgroup_skb, PROG_TEST_RUN takes an Ethernet frame: the kernel sets skb->protocol from its
ethertype and pulls the L2 header, so the program sees the IP header at offset 0, as it
does on a real hook.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import random
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from policy_builders import net, policy_model, ports

from cgpolicy.compiler.compile import compile_policy
from cgpolicy.compiler.spec import CompiledPolicy
from cgpolicy.contract import COUNTER, U32
from cgpolicy.kernel.bpf import CgroupLink
from cgpolicy.kernel.hooks import hook
from cgpolicy.kernel.loader import LoadedProgram, load_program
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
    SysctlRule,
    SysctlSection,
    Target,
)

ALLOW, DROP = 1, 0
TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58


# --- packets ----------------------------------------------------------------------------------


def ipv4(src: str, dst: str, proto: int, payload: bytes, frag_offset: int = 0) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(payload),
        1,
        frag_offset // 8,
        64,
        proto,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return b"\x00" * 12 + b"\x08\x00" + header + payload


def ipv6(src: str, dst: str, nexthdr: int, payload: bytes) -> bytes:
    header = struct.pack(
        "!IHBB16s16s",
        6 << 28,
        len(payload),
        nexthdr,
        64,
        ipaddress.IPv6Address(src).packed,
        ipaddress.IPv6Address(dst).packed,
    )
    return b"\x00" * 12 + b"\x86\xdd" + header + payload


def tcp(dport: int, sport: int = 40000) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 5 << 4, 0x02, 65535, 0, 0)


def udp(dport: int, sport: int = 40000) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + 4, 0) + b"data"


def icmp(icmp_type: int) -> bytes:
    return struct.pack("!BBHI", icmp_type, 0, 0, 0) + b"ping"


def ext(nexthdr: int, payload: bytes) -> bytes:
    """An 8-byte hop-by-hop / routing / destination-options header in front of payload."""
    return struct.pack("!BB6x", nexthdr, 0) + payload


def fragment(nexthdr: int, offset: int, payload: bytes, more: bool = True) -> bytes:
    return struct.pack("!BBHI", nexthdr, 0, offset | int(more), 7) + payload


# --- loading ----------------------------------------------------------------------------------


def policy(
    egress: NetworkSection | None = None,
    ingress: NetworkSection | None = None,
    mode: str = "enforce",
) -> Policy:
    return policy_model(mode, name="test", network=Network(ingress=ingress, egress=egress))


class Skb:
    """The loaded program of one network hook of a compiled policy."""

    def __init__(self, compiled: CompiledPolicy, hook: str) -> None:
        (spec,) = [p for p in compiled.programs if p.hook == hook]
        self.program: LoadedProgram = load_program(spec)

    def run(self, packet: bytes) -> int:
        return self.program.program.test_run(packet).retval

    def counters(self, slot: int) -> tuple[int, int]:
        """(allowed, denied) of a counter slot, summed over CPUs."""
        per_cpu = self.program.maps["counters"].lookup_per_cpu(U32.pack(slot))
        assert per_cpu is not None
        counters = [COUNTER.unpack_from(value) for value in per_cpu]
        return sum(c["allowed"] for c in counters), sum(c["denied"] for c in counters)

    def close(self) -> None:
        self.program.close()


@pytest.fixture
def loaded(kernel_ready: None) -> Iterator[list[Skb]]:
    programs: list[Skb] = []
    yield programs
    for program in programs:
        program.close()


def load(loaded: list[Skb], p: Policy, hook: str = "egress") -> Skb:
    program = Skb(compile_policy(p), hook)
    loaded.append(program)
    return program


# --- every program loads ----------------------------------------------------------------------

FULL = Policy(
    name="full",
    mode="enforce",
    targets=(Target("x", False),),
    network=Network(
        ingress=NetworkSection(
            "allow", (NetworkRule("deny", protocol="tcp", ports=ports((22, 22))),)
        ),
        egress=NetworkSection(
            "deny",
            (
                NetworkRule("allow", net("10.0.0.0/8", "fd00::/8"), "tcp", ports((443, 443))),
                NetworkRule("allow", protocol="icmp", icmp_types=(8,)),
                NetworkRule("allow", interfaces=("lo",)),
            ),
        ),
    ),
    sockets=Sockets(
        create=SocketCreateSection("allow", (SocketCreateRule("deny", family=10, type=3),)),
        bind=SocketAddressSection(
            "allow", (SocketAddressRule("deny", protocol="tcp", ports=ports((1, 1023))),)
        ),
        connect=SocketAddressSection(
            "allow", (SocketAddressRule("deny", net("169.254.169.254/32")),)
        ),
    ),
    devices=DeviceSection(
        "deny",
        (
            DeviceRule("allow", "char", 1, 3, "rwm"),
            DeviceRule("deny", "block", None, None, "w"),
        ),
    ),
    sysctl=SysctlSection(
        "allow",
        (SysctlRule("deny", "net/ipv4/*", "write"), SysctlRule("allow", "kernel/*name", "read")),
    ),
)


def test_every_program_passes_the_verifier(kernel_ready: None) -> None:
    compiled = compile_policy(FULL, resolve_interfaces=lambda names: {1})
    hooks = [spec.hook for spec in compiled.programs]
    assert hooks == [
        "ingress",
        "egress",
        "sock_create",
        "bind4",
        "bind6",
        "connect4",
        "connect6",
        "sendmsg4",
        "sendmsg6",
        "egress@connect4",  # network.egress checked at connect time
        "egress@connect6",
        "egress@sendmsg4",
        "egress@sendmsg6",
        "device",
        "sysctl",
    ]
    for spec in compiled.programs:
        # load_program also checks that the spec's maps are exactly the ones the code uses,
        # with the key and value sizes of the C declarations.
        with load_program(spec) as program:
            info = program.info()
            assert info.name == spec.prog_name
            assert len(info.map_ids) == len(spec.maps)


# --- semantics ------------------------------------------------------------------------------------


def test_allow_list(loaded: list[Skb]) -> None:
    prog = load(
        loaded,
        policy(
            egress=NetworkSection(
                "deny", (NetworkRule("allow", net("10.0.0.0/8"), "tcp", ports((443, 443))),)
            )
        ),
    )
    assert prog.run(ipv4("192.168.0.2", "10.1.2.3", TCP, tcp(443))) == ALLOW
    assert prog.run(ipv4("192.168.0.2", "10.1.2.3", TCP, tcp(80))) == DROP
    assert prog.run(ipv4("192.168.0.2", "11.0.0.1", TCP, tcp(443))) == DROP
    assert prog.run(ipv4("192.168.0.2", "10.1.2.3", UDP, udp(443))) == DROP
    # Egress matches the destination: the source being in 10/8 does not help.
    assert prog.run(ipv4("10.1.2.3", "11.0.0.1", TCP, tcp(443))) == DROP


def test_deny_inside_allow(loaded: list[Skb]) -> None:
    section = NetworkSection(
        "deny", (NetworkRule("allow", net("10.0.0.0/8")), NetworkRule("deny", net("10.1.0.0/16")))
    )
    prog = load(loaded, policy(egress=section))
    assert prog.run(ipv4("1.1.1.1", "10.2.0.1", UDP, udp(53))) == ALLOW
    assert prog.run(ipv4("1.1.1.1", "10.1.2.3", UDP, udp(53))) == DROP


def test_allow_inside_deny_is_denied(loaded: list[Skb]) -> None:
    section = NetworkSection(
        "allow", (NetworkRule("deny", net("10.0.0.0/8")), NetworkRule("allow", net("10.1.0.0/16")))
    )
    prog = load(loaded, policy(egress=section))
    assert prog.run(ipv4("1.1.1.1", "10.1.2.3", TCP, tcp(443))) == DROP
    assert prog.run(ipv4("1.1.1.1", "10.9.9.9", TCP, tcp(443))) == DROP
    assert prog.run(ipv4("1.1.1.1", "192.168.1.1", TCP, tcp(443))) == ALLOW


def test_port_ranges(loaded: list[Skb]) -> None:
    rule = NetworkRule(
        "allow", protocol="tcp", ports=ports((8000, 8100), (443, 443), (65535, 65535))
    )
    prog = load(loaded, policy(egress=NetworkSection("deny", (rule,))))
    for port, verdict in [
        (7999, DROP),
        (8000, ALLOW),
        (8050, ALLOW),
        (8100, ALLOW),
        (8101, DROP),
        (443, ALLOW),
        (444, DROP),
        (65535, ALLOW),
        (1, DROP),
    ]:
        assert prog.run(ipv4("1.1.1.1", "2.2.2.2", TCP, tcp(port))) == verdict, port


def test_protocols(loaded: list[Skb]) -> None:
    prog = load(
        loaded, policy(egress=NetworkSection("allow", (NetworkRule("deny", protocol="udp"),)))
    )
    assert prog.run(ipv4("1.1.1.1", "2.2.2.2", UDP, udp(53))) == DROP
    assert prog.run(ipv6("fd00::1", "fd00::2", UDP, udp(53))) == DROP
    assert prog.run(ipv4("1.1.1.1", "2.2.2.2", TCP, tcp(53))) == ALLOW
    assert prog.run(ipv4("1.1.1.1", "2.2.2.2", ICMP, icmp(8))) == ALLOW


def test_icmp_types(loaded: list[Skb]) -> None:
    section = NetworkSection(
        "deny",
        (
            NetworkRule("allow", protocol="icmp", icmp_types=(8, 0)),
            NetworkRule("allow", protocol="icmpv6", icmp_types=(128,)),
        ),
    )
    prog = load(loaded, policy(egress=section))
    assert prog.run(ipv4("1.1.1.1", "2.2.2.2", ICMP, icmp(8))) == ALLOW
    assert prog.run(ipv4("1.1.1.1", "2.2.2.2", ICMP, icmp(13))) == DROP
    assert prog.run(ipv4("1.1.1.1", "2.2.2.2", ICMP, icmp(128))) == DROP  # v6 type, v4 rule
    assert prog.run(ipv6("fd00::1", "fd00::2", ICMPV6, icmp(128))) == ALLOW
    assert prog.run(ipv6("fd00::1", "fd00::2", ICMPV6, icmp(8))) == DROP
    assert prog.run(ipv4("1.1.1.1", "2.2.2.2", TCP, tcp(8))) == DROP


def test_ingress_matches_source_address_and_local_port(loaded: list[Skb]) -> None:
    rule = NetworkRule("allow", net("10.0.0.0/8"), "tcp", ports((22, 22)))
    prog = load(loaded, policy(ingress=NetworkSection("deny", (rule,))), "ingress")
    assert prog.run(ipv4("10.1.1.1", "192.168.0.2", TCP, tcp(22, sport=50000))) == ALLOW
    assert prog.run(ipv4("11.1.1.1", "192.168.0.2", TCP, tcp(22))) == DROP
    assert prog.run(ipv4("192.168.0.2", "10.1.1.1", TCP, tcp(22))) == DROP


def test_ipv6_extension_headers_and_fragments_do_not_bypass_a_deny(loaded: list[Skb]) -> None:
    deny = NetworkSection(
        "allow", (NetworkRule("deny", net("fd00::/8"), "tcp", ports((443, 443))),)
    )
    prog = load(loaded, policy(egress=deny))
    src, dst = "2001:db8::1", "fd00::2"
    assert prog.run(ipv6(src, dst, TCP, tcp(443))) == DROP
    assert prog.run(ipv6(src, dst, TCP, tcp(80))) == ALLOW
    assert prog.run(ipv6(src, "2001:db8::2", TCP, tcp(443))) == ALLOW
    # Hop-by-hop, then destination options, then TCP: walked.
    assert prog.run(ipv6(src, dst, 0, ext(60, ext(TCP, tcp(443))))) == DROP
    assert prog.run(ipv6(src, dst, 0, ext(60, ext(TCP, tcp(80))))) == ALLOW
    # First fragment: ports are there.
    assert prog.run(ipv6(src, dst, 44, fragment(TCP, 0, tcp(443)))) == DROP
    assert prog.run(ipv6(src, dst, 44, fragment(TCP, 0, tcp(80)))) == ALLOW
    # Non-first fragment: no ports, so the port condition is unknown and the deny matches.
    assert prog.run(ipv6(src, dst, 44, fragment(TCP, 1448, b"x" * 40))) == DROP
    # ... but only for the rule's protocol and addresses.
    assert prog.run(ipv6(src, dst, 44, fragment(UDP, 1448, b"x" * 40))) == ALLOW
    # More extension headers than the program walks: protocol unknown, deny matches.
    chain = tcp(443)
    for _ in range(7):
        chain = ext(60, chain)
    assert prog.run(ipv6(src, dst, 60, chain[8:])) == DROP
    # Truncated inside the extension headers.
    assert prog.run(ipv6(src, dst, 0, b"\x06\x00")) == DROP
    # IPv4 non-first fragment.
    v4 = NetworkSection("allow", (NetworkRule("deny", net("10.0.0.0/8"), "udp", ports((53, 53))),))
    prog4 = load(loaded, policy(egress=v4))
    assert prog4.run(ipv4("1.1.1.1", "10.0.0.1", UDP, b"x" * 16, frag_offset=1480)) == DROP
    assert prog4.run(ipv4("1.1.1.1", "10.0.0.1", UDP, udp(54))) == ALLOW


def test_unknown_fields_do_not_satisfy_an_allow(loaded: list[Skb]) -> None:
    allow = NetworkSection(
        "deny", (NetworkRule("allow", net("fd00::/8"), "tcp", ports((443, 443))),)
    )
    prog = load(loaded, policy(egress=allow))
    src, dst = "2001:db8::1", "fd00::2"
    assert prog.run(ipv6(src, dst, 44, fragment(TCP, 0, tcp(443)))) == ALLOW
    assert prog.run(ipv6(src, dst, 44, fragment(TCP, 1448, b"x" * 40))) == DROP
    chain = tcp(443)
    for _ in range(7):
        chain = ext(60, chain)
    assert prog.run(ipv6(src, dst, 60, chain[8:])) == DROP
    # A rule without ports still allows the fragment: only the unknown condition is held back.
    any_port = NetworkSection("deny", (NetworkRule("allow", net("fd00::/8"), "tcp"),))
    prog2 = load(loaded, policy(egress=any_port))
    assert prog2.run(ipv6(src, dst, 44, fragment(TCP, 1448, b"x" * 40))) == ALLOW


def test_ipv4_mapped_ipv6_meets_ipv4_rules(loaded: list[Skb]) -> None:
    prog = load(
        loaded, policy(egress=NetworkSection("allow", (NetworkRule("deny", net("10.0.0.0/8")),)))
    )
    assert prog.run(ipv6("::1", "::ffff:10.1.2.3", UDP, udp(53))) == DROP
    assert prog.run(ipv6("::1", "::ffff:11.1.2.3", UDP, udp(53))) == ALLOW


def test_interfaces(loaded: list[Skb]) -> None:
    section = NetworkSection("deny", (NetworkRule("allow", interfaces=("lo",)),))
    compiled = compile_policy(policy(egress=section), resolve_interfaces=lambda names: {1})
    prog = Skb(compiled, "egress")
    loaded.append(prog)
    # PROG_TEST_RUN runs the program on the loopback device (ifindex 1).
    assert prog.run(ipv4("1.1.1.1", "2.2.2.2", TCP, tcp(1))) == ALLOW
    other = compile_policy(policy(egress=section), resolve_interfaces=lambda names: {7})
    prog7 = Skb(other, "egress")
    loaded.append(prog7)
    assert prog7.run(ipv4("1.1.1.1", "2.2.2.2", TCP, tcp(1))) == DROP


def test_counters_and_audit_mode(loaded: list[Skb]) -> None:
    section = NetworkSection("allow", (NetworkRule("deny", net("10.0.0.0/8")),))
    enforce = load(loaded, policy(egress=section))
    audit = load(loaded, policy(egress=section, mode="audit"))
    denied = ipv4("1.1.1.1", "10.0.0.1", TCP, tcp(1))
    passed = ipv4("1.1.1.1", "11.0.0.1", TCP, tcp(1))
    assert enforce.run(denied) == DROP
    assert audit.run(denied) == ALLOW  # audit: counted as would-deny, let through
    audit.run(passed)
    assert enforce.counters(0) == (0, 1)
    assert audit.counters(0) == (0, 1)
    assert audit.counters(64) == (1, 0)  # the default decided


def test_100k_cidrs(loaded: list[Skb]) -> None:
    rng = random.Random(7)
    blocks = {rng.randrange(1 << 24) << 8 for _ in range(100_000)}
    cidrs = tuple(ipaddress.IPv4Network((block, 24)) for block in blocks)
    section = NetworkSection(
        "allow", (NetworkRule("deny", cidrs), NetworkRule("deny", net("0.0.0.0/1"), "udp"))
    )
    compiled = compile_policy(policy(egress=section))  # its time: compile_cidrs_s (bench)
    prog = Skb(compiled, "egress")
    loaded.append(prog)
    inside = [str(ipaddress.IPv4Address(block + 77)) for block in rng.sample(sorted(blocks), 50)]
    for address in inside:
        assert prog.run(ipv4("1.1.1.1", address, TCP, tcp(443))) == DROP
        # an IPv4-mapped address: the IPv4 walk as a subprogram (bpf/net.c cgp_cidr_walk4)
        assert prog.run(ipv6("::1", f"::ffff:{address}", TCP, tcp(443))) == DROP
    outside = 0
    while outside < 50:
        candidate = rng.randrange(1 << 32)
        if candidate & ~0xFF not in blocks:
            outside += 1
            address = str(ipaddress.IPv4Address(candidate))
            expected = DROP if candidate < 1 << 31 else ALLOW  # udp to 0.0.0.0/1 is denied
            assert prog.run(ipv4("1.1.1.1", address, UDP, udp(53))) == expected
            assert prog.run(ipv4("1.1.1.1", address, TCP, tcp(53))) == ALLOW
            assert prog.run(ipv6("::1", f"::ffff:{address}", UDP, udp(53))) == expected
            assert prog.run(ipv6("::1", f"::ffff:{address}", TCP, tcp(53))) == ALLOW


# --- the other hooks, by real actions in a scratch cgroup (PROG_TEST_RUN does not run them) ----

REAL = Policy(
    name="real",
    mode="enforce",
    targets=(Target("x", False),),
    sockets=Sockets(
        create=SocketCreateSection(
            "allow", (SocketCreateRule("deny", type=3), SocketCreateRule("deny", family=1))
        ),
        bind=SocketAddressSection(
            "allow", (SocketAddressRule("deny", protocol="tcp", ports=ports((1, 1023))),)
        ),
        connect=SocketAddressSection("allow", (SocketAddressRule("deny", net("10.0.0.0/8")),)),
    ),
    devices=DeviceSection("allow", (DeviceRule("deny", "char", 1, 3, "w"),)),
    sysctl=SysctlSection(
        "allow",
        (SysctlRule("deny", "net/ipv4/*", "write"), SysctlRule("deny", "kernel/host*", "read")),
    ),
)

REAL_CASES = [
    (("socket", "inet", "raw", "icmp"), False),
    (("socket", "inet", 3 | 0o4000, "icmp"), False),  # SOCK_RAW | SOCK_NONBLOCK: flags stripped
    (("socket", "inet", "stream"), True),
    # sock_create runs for AF_INET/AF_INET6 only: a unix-family rule never fires.
    (("socket", "unix", "stream"), True),
    (("connect", "udp", "10.1.1.1", 53), False),
    (("connect", "udp", "::ffff:10.1.1.1", 53), False),  # IPv4-mapped meets IPv4 rules
    (("sendto", "10.1.1.1", 53), False),
    (("connect", "udp", "127.0.0.1", 53), True),
    (("bind", "tcp", "127.0.0.1", 80), False),
    (("bind", "tcp", "127.0.0.1", 0), True),  # port 0: no port range contains it
    (("bind", "udp", "127.0.0.1", 80), True),
    (("open", "/dev/null", "r"), True),
    (("open", "/dev/null", "rw"), False),  # a deny covering any requested right matches
    (("open", "/dev/zero", "rw"), True),
    (("sysctl-read", "net/ipv4/ip_forward"), True),
    (("sysctl-read", "kernel/hostname"), False),
    (("sysctl-read", "kernel/ostype"), True),
]


def test_real_actions(scratch_cgroup: Any) -> None:  # conftest.ScratchCgroup
    held: list[LoadedProgram | CgroupLink] = []
    cgroup_fd = scratch_cgroup.fd()
    try:
        for spec in compile_policy(REAL).programs:
            program = load_program(spec)
            held.append(program)
            held.append(CgroupLink.create(program.fd, cgroup_fd, hook(spec.hook).attach_type))
        for action, allowed in REAL_CASES:
            result = scratch_cgroup.probe(*action)
            assert result.ok == allowed, (action, result)
            if not allowed:
                assert result.errno == errno.EPERM
        with open("/proc/sys/net/ipv4/ip_forward") as handle:
            current = handle.read().strip()
        assert not scratch_cgroup.probe("sysctl-write", "net/ipv4/ip_forward", current).ok
    finally:
        for item in reversed(held):
            item.close()
        os.close(cgroup_fd)
