"""network.egress / network.ingress (cgroup_skb) enforced on the real kernel.

A probe in the scratch cgroup sends real traffic; a dropped TCP SYN or SYN-ACK shows as a
connect timeout (ETIMEDOUT), a dropped outgoing datagram as EPERM from send(), a dropped
incoming datagram as a receive timeout. A connect that network.egress surely denies fails
at once with EPERM (failFast, test_enforce_failfast.py); with `failFast: false` its SYN is
dropped like any packet. Loopback servers listen on every 127/8 address and
::1 (dual-stack); the veth tests talk to echo servers in another network namespace.
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
from enforcement import ALLOWED, EPERM, ETIMEDOUT, enforced, expect, serve_in_cgroup
from policy_builders import policy_file

from cgpolicy.kernel import bpf
from cgpolicy.kernel.interfaces import resolve_interfaces


def free_ports(count: int) -> list[int]:
    """Ports free for TCP and UDP on loopback right now (bound to 0, then released)."""
    found: list[int] = []
    while len(found) < count:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::", 0))
            port = probe.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as udp:
                udp.bind(("::", port))
        except OSError:
            continue
        if port not in found:
            found.append(port)
    return found


def ifaces_in_map(prog_pin) -> set[int]:
    with bpf.Program.from_pin(prog_pin) as program:
        map_ids = program.info().map_ids
    for map_id in map_ids:
        with bpf.Map.from_id(map_id) as found:
            if found.name == "ifaces":
                # struct cgp_iface_key: the ifindex, then the copy of the rules; both
                # copies hold the same interfaces once a change is complete
                return {int.from_bytes(key[:4], "little") for key in found.keys()}
    return set()


@pytest.mark.parametrize("fail_fast", [True, False], ids=["fail-fast", "drop-only"])
def test_egress_loopback_addresses_ports_and_ranges(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path, loopback_ports, fail_fast
):
    p0, p1, p2, p3, p4 = loopback_ports.ports
    # a TCP connect egress surely denies: refused at once, or its SYN dropped (timeout)
    dropped = EPERM if fail_fast else ETIMEDOUT
    path = policy_file(
        tmp_path,
        "egress-loopback",
        [scratch_cgroup.relative],
        {
            "network": {
                "egress": {
                    "default": "deny",
                    "failFast": fail_fast,
                    "rules": [
                        {
                            "action": "allow",
                            "protocol": "tcp",
                            "cidrs": ["127.0.0.0/8", "::1"],
                            "ports": [f"{p1}-{p3}"],
                        },
                        {"action": "deny", "protocol": "tcp", "cidrs": ["127.0.0.3/32"]},
                        {
                            "action": "allow",
                            "protocol": "udp",
                            "cidrs": ["127.0.0.1"],
                            "ports": [p1],
                        },
                        {"action": "allow", "protocol": "udp", "cidrs": ["::1/128"], "ports": [p2]},
                    ],
                }
            }
        },
    )
    with enforced(cgroup_root, bpf_dir, path):
        expect(
            scratch_cgroup,
            [
                (("connect", "tcp", "127.0.0.1", p1), ALLOWED),  # range start
                (("connect", "tcp", "127.0.0.2", p3), ALLOWED),  # range end
                (("connect", "tcp", "127.0.0.1", p0), dropped),  # just below
                (("connect", "tcp", "127.0.0.1", p4), dropped),  # just above
                (("connect", "tcp", "127.0.0.3", p2), dropped),  # deny inside the allow
                (("connect", "tcp", "::1", p2), ALLOWED),
                (("connect", "tcp", "::1", p4), dropped),
                (("connect", "udp", "127.0.0.1", p1), ALLOWED),
                (("connect", "udp", "127.0.0.1", p2), EPERM),
                (("sendto", "127.0.0.2", p1), EPERM),
                (("connect", "udp", "::1", p2), ALLOWED),
                (("sendto", "::1", p1), EPERM),
                # A dual-stack socket sends IPv4: egress sees 127.0.0.1, not ::ffff:127.0.0.1.
                (("sendto", "::ffff:127.0.0.1", p1), ALLOWED),
                (("sendto", "::ffff:127.0.0.1", p2), EPERM),
            ],
        )
    # Removed: everything goes again.
    expect(scratch_cgroup, [(("connect", "tcp", "127.0.0.1", p0), ALLOWED)])


def test_egress_overlapping_cidrs_deny_wins(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path, loopback_ports
):
    port = loopback_ports.ports[1]
    path = policy_file(
        tmp_path,
        "egress-overlap",
        [scratch_cgroup.relative],
        {
            "network": {
                "egress": {
                    "default": "deny",
                    "rules": [
                        {"action": "allow", "protocol": "udp", "cidrs": ["127.0.0.0/8"]},
                        {"action": "deny", "protocol": "udp", "cidrs": ["127.1.0.0/16"]},
                        {"action": "allow", "protocol": "udp", "cidrs": ["127.1.2.0/24"]},
                    ],
                }
            }
        },
    )
    with enforced(cgroup_root, bpf_dir, path):
        expect(
            scratch_cgroup,
            [
                (("sendto", "127.0.0.1", port), ALLOWED),
                (("sendto", "127.2.0.1", port), ALLOWED),
                (("sendto", "127.1.0.5", port), EPERM),  # deny inside allow
                (("sendto", "127.1.2.3", port), EPERM),  # allow inside deny: still denied
                (("sendto", "::ffff:127.1.2.3", port), EPERM),
                (("sendto", "::1", port), EPERM),  # default
            ],
        )


def test_ingress_loopback_remote_address_and_local_port(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path, loopback_ports
):
    p1, p3 = loopback_ports.ports[1], loopback_ports.ports[3]
    denied_port, allowed_port = free_ports(2)
    path = policy_file(
        tmp_path,
        "ingress-loopback",
        [scratch_cgroup.relative],
        {
            "network": {
                "ingress": {
                    "default": "allow",
                    "rules": [
                        {"action": "deny", "cidrs": ["127.0.0.4/32"]},
                        # The local port on ingress: for a client, its ephemeral port.
                        {"action": "deny", "protocol": "tcp", "ports": [p3, denied_port]},
                        {"action": "deny", "protocol": "udp", "ports": [p3, denied_port]},
                    ],
                }
            }
        },
    )
    with enforced(cgroup_root, bpf_dir, path):
        expect(
            scratch_cgroup,
            [
                (("connect", "tcp", "127.0.0.1", p1), ALLOWED),
                (("connect", "tcp", "127.0.0.4", p1), ETIMEDOUT),  # SYN-ACK from it dropped
                (("connect", "tcp", "::1", p1), ALLOWED),
                (("connect", "tcp", "127.0.0.1", p3), ALLOWED),  # p3 is the server's port
                (("udp-echo", "127.0.0.1", p1), ALLOWED),
                (("udp-echo", "127.0.0.4", p1), ETIMEDOUT),
                (("udp-echo", "::1", p3), ALLOWED),
            ],
        )
        cases = [
            ("tcp", "127.0.0.1", denied_port, ETIMEDOUT, ETIMEDOUT),
            ("tcp", "::1", denied_port, ETIMEDOUT, ETIMEDOUT),
            ("udp", "127.0.0.1", denied_port, ETIMEDOUT, ALLOWED),  # the send itself works
            ("udp", "::1", denied_port, ETIMEDOUT, ALLOWED),
            ("tcp", "127.0.0.1", allowed_port, ALLOWED, ALLOWED),
            ("tcp", "::1", allowed_port, ALLOWED, ALLOWED),
            ("udp", "::1", allowed_port, ALLOWED, ALLOWED),
        ]
        with ThreadPoolExecutor(max_workers=len(cases)) as pool:
            outcomes = list(
                pool.map(
                    lambda case: serve_in_cgroup(scratch_cgroup, case[0], case[1], case[2]),
                    cases,
                )
            )
    wrong = []
    for (protocol, host, port, want_served, want_client), (served, client) in zip(
        cases, outcomes, strict=True
    ):
        got = (ALLOWED if served.ok else served.errno, ALLOWED if client.ok else client.errno)
        if got != (want_served, want_client):
            wrong.append(f"serve {protocol} {host} {port}: {got} != {want_served, want_client}")
    assert not wrong, wrong


def test_egress_and_ingress_between_namespaces(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path, veth_net
):
    net = veth_net
    path = policy_file(
        tmp_path,
        "veth-net",
        [scratch_cgroup.relative],
        {
            "network": {
                "egress": {
                    "default": "allow",
                    "rules": [
                        {"action": "deny", "protocol": "tcp", "cidrs": [net.b4], "ports": [8002]},
                        {"action": "deny", "protocol": "tcp", "cidrs": [net.b6], "ports": [8005]},
                        {
                            "action": "deny",
                            "protocol": "udp",
                            "cidrs": ["fd00:199::/64"],
                            "ports": ["8003-8004"],
                        },
                    ],
                },
                "ingress": {
                    "default": "allow",
                    "rules": [
                        {"action": "deny", "protocol": "udp", "cidrs": [f"{net.b4}/32"]},
                        {
                            "action": "deny",
                            "protocol": "tcp",
                            "cidrs": [net.b4, net.b6],
                            "ports": [9001],
                        },
                    ],
                },
            }
        },
    )
    with enforced(cgroup_root, bpf_dir, path):
        expect(
            scratch_cgroup,
            [
                (("connect", "tcp", net.b4, 8001), ALLOWED),
                (("connect", "tcp", net.b4, 8002), EPERM),  # refused at connect (failFast)
                (("connect", "tcp", net.b4, 8005), ALLOWED),
                (("connect", "tcp", net.b6, 8002), ALLOWED),
                (("connect", "tcp", net.b6, 8005), EPERM),
                (("connect", "udp", net.b6, 8002), ALLOWED),
                (("connect", "udp", net.b6, 8003), EPERM),
                (("sendto", net.b6, 8004), EPERM),
                (("sendto", net.b4, 8003), ALLOWED),
                (("udp-echo", net.b6, 8001), ALLOWED),
                (("udp-echo", net.b4, 8001), ETIMEDOUT),  # the reply from b4 is dropped
            ],
            netns=net.ns_a,
        )
        cases = [
            ("tcp", net.a4, 9001, ETIMEDOUT),
            ("tcp", net.a6, 9001, ETIMEDOUT),
            ("tcp", net.a4, 9002, ALLOWED),
            ("tcp", net.a6, 9002, ALLOWED),
        ]
        with ThreadPoolExecutor(max_workers=len(cases)) as pool:
            outcomes = list(
                pool.map(
                    lambda case: serve_in_cgroup(
                        scratch_cgroup, *case[:3], netns=net.ns_a, client_netns=net.ns_b
                    ),
                    cases,
                )
            )
    for (protocol, host, port, wanted), (served, client) in zip(cases, outcomes, strict=True):
        got = ALLOWED if served.ok else served.errno
        assert got == wanted, f"serve {protocol} {host} {port}: {served} / client {client}"
        assert client.ok == (wanted == ALLOWED), (host, port, client)


def test_interfaces_rules_match_the_named_interface_only(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path, veth_net, loopback_ports
):
    # Interface names resolve in cgpolicy's (the test's) network namespace, so these probes
    # run in the root ns and reach ns b over the root-side veth.
    net = veth_net
    p1 = loopback_ports.ports[1]
    glob = net.veth_root[:-1] + "?"
    path = policy_file(
        tmp_path,
        "interfaces",
        [scratch_cgroup.relative],
        {
            "network": {
                "egress": {
                    "default": "allow",
                    "rules": [
                        {"action": "deny", "protocol": "tcp", "interfaces": [net.veth_root]},
                        {
                            "action": "deny",
                            "protocol": "udp",
                            "ports": [8003],
                            "interfaces": [glob],
                        },
                    ],
                },
                "ingress": {
                    "default": "allow",
                    "rules": [
                        {
                            "action": "deny",
                            "protocol": "udp",
                            "ports": ["1-65535"],
                            "interfaces": [net.veth_root],
                        },
                    ],
                },
            }
        },
    )
    root_ifindex = socket.if_nametoindex(net.veth_root)
    assert resolve_interfaces((net.veth_root,)) == {root_ifindex}
    assert resolve_interfaces((glob,)) == {root_ifindex}
    with enforced(cgroup_root, bpf_dir, path):
        for hook in ("egress", "ingress"):  # the programs' maps hold the resolved index
            assert root_ifindex in ifaces_in_map(bpf_dir / "interfaces" / hook / "prog"), hook
        expect(
            scratch_cgroup,
            [
                # deny rules with interfaces are not known at connect: only dropped
                (("connect", "tcp", net.broot4, 8001), ETIMEDOUT),
                (("connect", "tcp", net.broot6, 8002), ETIMEDOUT),
                (("connect", "tcp", "127.0.0.1", p1), ALLOWED),  # lo: not the interface
                (("connect", "tcp", "::1", p1), ALLOWED),
                (("sendto", net.broot4, 8003), EPERM),
                (("sendto", net.broot6, 8003), EPERM),
                (("sendto", net.broot4, 8002), ALLOWED),
                (("udp-echo", net.broot6, 8002), ETIMEDOUT),  # the reply arrives on the veth
                (("udp-echo", "127.0.0.1", p1), ALLOWED),
            ],
        )
