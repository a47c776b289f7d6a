"""Differential test of the connect checks (network.egress at connect time, bpf/net.c
cgp_egress_at_connect) against the reference evaluator and the egress packet program.

Hypothesis draws egress sections with test_differential.py's strategies (overlapping CIDRs
of both families and IPv4-mapped ones, ports, protocols, ICMP types, interfaces, both
defaults, sometimes more than 32 rules) and, per section, the seed of a batch of TCP and UDP
connects and UDP sends near its prefixes and ports, over IPv4, IPv6 and IPv4-mapped
addresses. They run for real in a scratch cgroup inside a network namespace whose loopback
is down: nothing can be sent, so a call the checks let through fails with ENETUNREACH (or
another error of its own) and only a refusal is EPERM (the any address, which the kernel
sends to a local one, is left to test_enforce_failfast.py). For every call:

- EPERM if and only if ``reference.egress_at_connect`` refuses it;
- the egress program's counters count exactly the refusals, each on the rule (or default)
  the reference names (nothing else runs in that cgroup and namespace);
- a refused call's packet is one the packet path drops: the reference denies it on every
  interface, and so does the compiled egress program (BPF_PROG_TEST_RUN).

The last is the property that matters: a connect check never refuses what egress could
let through.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from batch_probe import BatchProbe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from policy_builders import policy_model
from test_differential import (
    INTERFACES,
    Anchors,
    SkbPacket,
    SkbProgram,
    anchors,
    applied_to,
    expected_slot,
    network_section,
    policy_ports,
    remote_address,
    remove_policy,
    resolve,
    tcp_header,
    udp_header,
)

from cgpolicy import reference
from cgpolicy.compiler.canonical import ordered_rules
from cgpolicy.compiler.compile import compile_policy
from cgpolicy.contract import COUNTER, COUNTER_SLOTS, U32
from cgpolicy.kernel.applied import program_maps, read_named
from cgpolicy.policy.model import Network, Policy

TCP, UDP = 6, 17
EXAMPLES = int(os.environ.get("CGP_FAILFAST_EXAMPLES", "25"))
CALLS_PER_POLICY = 40
LOCAL4, LOCAL6 = ipaddress.IPv4Address("10.9.9.9"), ipaddress.IPv6Address("fd00::9")


@pytest.fixture
def netns_probe(scratch_cgroup: object, kernel_ready: None) -> Iterator[BatchProbe]:
    from pyroute2 import netns

    name = f"cgp-ff-{os.getpid()}"
    netns.create(name)  # its loopback stays down
    try:
        probe = BatchProbe(scratch_cgroup, name)
        try:
            yield probe
        finally:
            probe.close()
    finally:
        netns.remove(name)


def calls(
    seed: int, where: Anchors, policy: Policy
) -> list[tuple[list[object], reference.SocketAddress]]:
    """The batch of one policy: (probe arguments, what the hook sees)."""
    rng = random.Random(f"{seed}/{where}")
    egress = policy.network.egress if policy.network else None
    networks = tuple(net for rule in (egress.rules if egress else ()) for net in rule.cidrs)
    ports = [p for p in policy_ports(egress) if p > 0] or [80]
    found = []
    for _ in range(CALLS_PER_POLICY):
        family = rng.choice(["v4", "v4", "v6", "mapped"])
        address = remote_address(rng, where, family, networks)
        mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
        if (mapped or address).is_unspecified:  # sent to a local one (test_enforce_failfast)
            continue
        port = rng.choice(ports) if rng.random() < 0.8 else rng.randint(1, 65535)
        kind = rng.choice(["tcp", "udp", "sendto"])
        protocol = TCP if kind == "tcp" else UDP
        operation = "sendmsg" if kind == "sendto" else "connect"
        args: list[object] = (
            ["sendto", str(address), port]
            if kind == "sendto"
            else ["connect-now", kind, str(address), port]
        )
        found.append((args, reference.SocketAddress(operation, address, port, protocol)))  # type: ignore[arg-type]
    return found


def packet_frame(address: reference.IPAddress, protocol: int, port: int) -> bytes:
    """The first packet such a call sends: IPv4 for a mapped address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    payload = tcp_header(port) if protocol == TCP else udp_header(port)
    if address.version == 4:
        build = ("v4", address, LOCAL4, protocol, payload, 0, 5, 20 + len(payload))
        return SkbPacket("", 0x0800, build).frame("egress")
    return SkbPacket("", 0x86DD, ("v6", address, LOCAL6, protocol, payload)).frame("egress")


def egress_counters(bpf_dir: Path, name: str) -> dict[int, tuple[int, int]]:
    applied = read_named(bpf_dir, name)
    prog_id = applied.hooks["egress"].prog_id
    assert prog_id
    maps = program_maps(prog_id, {"counters"})
    try:
        found = {}
        for slot in range(COUNTER_SLOTS):
            values = maps["counters"].lookup_per_cpu(U32.pack(slot)) or []
            rows = [COUNTER.unpack_from(v) for v in values]
            found[slot] = (sum(r["allowed"] for r in rows), sum(r["denied"] for r in rows))
        return found
    finally:
        for opened in maps.values():
            opened.close()


@st.composite
def case(draw: st.DrawFn) -> tuple[Policy, Anchors, int]:
    where = draw(anchors())
    egress = draw(network_section(where))
    policy = policy_model(name="ffdiff", network=Network(egress=egress))
    return policy, where, draw(st.integers(0, 2**64 - 1))


checked = Counter[str]()


def test_connect_checks_agree_with_the_reference_and_the_packet_program(
    netns_probe: BatchProbe, cgroup_root: Path, bpf_dir: Path
) -> None:
    started = time.monotonic()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.function_scoped_fixture,
            HealthCheck.data_too_large,
        ],
    )
    @given(case())
    def run(drawn: tuple[Policy, Anchors, int]) -> None:
        policy, where, seed = drawn
        batch = calls(seed, where, policy)
        enforcer = applied_to(netns_probe.cgroup, cgroup_root, bpf_dir, policy)
        try:
            results = netns_probe.run([args for args, _ in batch])
            counted = egress_counters(bpf_dir, policy.name)
        finally:
            remove_policy(enforcer, policy.name)
        egress = policy.network.egress  # type: ignore[union-attr]
        assert egress is not None
        order = ordered_rules(egress.rules)
        expected_counts: Counter[int] = Counter()
        program = SkbProgram(
            next(s for s in compile_policy(policy, resolve).programs if s.hook == "egress")
        )
        try:
            for number, ((args, call), result) in enumerate(zip(batch, results, strict=True)):
                verdict = reference.egress_at_connect(policy, call)
                refused = not result["ok"] and result["errno"] == errno.EPERM
                which = f"call {number} of calls(seed={seed}, where, policy): {args}"
                checked["calls"] += 1
                assert refused == (verdict is not None), (
                    f"{which}: the kernel {'refuses' if refused else 'lets it through'} "
                    f"({result}); the reference {'refuses it by ' if verdict else 'does not'}"
                    f"{(verdict.rule or 'the default') if verdict else ''}"
                )
                if verdict is None:
                    continue
                checked["refused"] += 1
                expected_counts[expected_slot(order, verdict)] += 1
                remote = call.address
                if isinstance(remote, ipaddress.IPv6Address) and remote.ipv4_mapped:
                    remote = remote.ipv4_mapped
                for interface in [*INTERFACES, None]:
                    packet = reference.Packet(
                        "egress", remote, call.protocol, call.port, None, interface
                    )
                    assert not reference.evaluate(policy, packet).allowed, (
                        f"{which}: refused at connect, but egress allows its packet on {interface}"
                    )
                assert program.run(packet_frame(call.address, call.protocol, call.port)) == 0, (
                    f"{which}: refused at connect, but the egress program passes its packet"
                )
        finally:
            program.close()
        wanted = {slot: (0, n) for slot, n in expected_counts.items()}
        got = {slot: value for slot, value in counted.items() if value != (0, 0)}
        assert got == wanted, f"egress counters {got}, expected the refusals {wanted}"

    run()
    print(
        f"\n{checked['calls']} calls checked, {checked['refused']} refused, in "
        f"{time.monotonic() - started:.1f} s"
    )
    assert checked["refused"] > 0 and checked["calls"] > checked["refused"]
