"""sockets.create (cgroup_sock) and sockets.bind / sockets.connect (cgroup_sock_addr: bind4/6,
connect4/6, sendmsg4/6) enforced on the real kernel. A denied system call fails with EPERM
before any packet exists."""

from __future__ import annotations

import socket

from enforcement import ALLOWED, EPERM, enforced, expect
from policy_builders import policy_file

from cgpolicy.policy.validate import load_paths


def free_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.bind(("::", 0))
        return sock.getsockname()[1]


def test_socket_create_raw_and_inet6(scratch_cgroup, bpf_dir, cgroup_root, tmp_path):
    path = policy_file(
        tmp_path,
        "create",
        [scratch_cgroup.relative],
        {
            "sockets": {
                "create": {
                    "default": "allow",
                    "rules": [
                        {"action": "deny", "family": "inet6", "type": "raw"},
                        {"action": "deny", "family": "inet", "type": "raw", "protocol": 255},
                        {"action": "deny", "family": "inet6", "type": "dgram", "protocol": "udp"},
                    ],
                }
            }
        },
    )
    with enforced(cgroup_root, bpf_dir, path):
        expect(
            scratch_cgroup,
            [
                (("socket", "inet6", "raw", "icmpv6"), EPERM),
                (("socket", "inet6", "raw", 255), EPERM),
                (("socket", "inet", "raw", 255), EPERM),
                (("socket", "inet", "raw", "icmp"), ALLOWED),  # only protocol 255 is denied
                (("socket", "inet6", "dgram", "udp"), EPERM),
                (("socket", "inet6", "dgram", 0), EPERM),  # 0 is resolved to udp (17)
                (("socket", "inet6", "stream"), ALLOWED),
                (("socket", "inet", "dgram"), ALLOWED),
                (("socket", "inet", "stream"), ALLOWED),
            ],
        )


def test_socket_create_default_deny_covers_only_inet_families(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path
):
    # The kernel runs sock_create for AF_INET and AF_INET6 only (documented): a default
    # deny leaves unix and packet sockets alone.
    path = policy_file(
        tmp_path,
        "create-deny",
        [scratch_cgroup.relative],
        {
            "sockets": {
                "create": {
                    "default": "deny",
                    "rules": [{"action": "allow", "family": "inet", "type": "stream"}],
                }
            }
        },
    )
    with enforced(cgroup_root, bpf_dir, path):
        expect(
            scratch_cgroup,
            [
                (("socket", "inet", "stream"), ALLOWED),
                (("socket", "inet", "dgram"), EPERM),
                (("socket", "inet6", "stream"), EPERM),
                (("socket", "inet", "raw", "icmp"), EPERM),
                (("socket", "unix", "stream"), ALLOWED),
                (("socket", "packet", "raw"), ALLOWED),
            ],
        )


def test_packet_family_is_refused_at_validation_with_the_reason(tmp_path):
    path = policy_file(
        tmp_path,
        "packet",
        ["cgpolicy-nowhere"],
        {
            "sockets": {
                "create": {"default": "allow", "rules": [{"action": "deny", "family": "packet"}]}
            }
        },
    )
    result = load_paths([path])
    assert not result.ok
    [problem] = result.problems
    text = problem.format()
    assert "spec.sockets.create.rules[0].family" in text
    assert "'packet'" in text
    # Clear: says why the kernel cannot filter it and what to do instead.
    assert "sock_create" in text and "CAP_NET_RAW" in text, text


def test_bind_low_and_high_ports_both_families(scratch_cgroup, bpf_dir, cgroup_root, tmp_path):
    high = free_port()
    path = policy_file(
        tmp_path,
        "bind",
        [scratch_cgroup.relative],
        {
            "sockets": {
                "bind": {
                    "default": "allow",
                    "rules": [
                        {"action": "deny", "protocol": "tcp", "ports": ["1-1023"]},
                        {"action": "deny", "protocol": "udp", "cidrs": ["127.0.0.2", "::1"]},
                    ],
                }
            }
        },
    )
    with enforced(cgroup_root, bpf_dir, path):
        expect(
            scratch_cgroup,
            [
                (("bind", "tcp", "127.0.0.1", 80), EPERM),
                (("bind", "tcp", "127.0.0.1", 1023), EPERM),
                (("bind", "tcp", "::1", 1), EPERM),
                (("bind", "tcp", "0.0.0.0", 443), EPERM),
                (("bind", "tcp", "127.0.0.1", 1024), ALLOWED),
                (("bind", "tcp", "::1", high), ALLOWED),
                (("bind", "tcp", "127.0.0.1", 0), ALLOWED),  # port 0: no range holds it
                (("bind", "udp", "127.0.0.1", 53), ALLOWED),  # the port rule is tcp only
                (("bind", "udp", "127.0.0.2", high), EPERM),
                (("bind", "udp", "::1", high), EPERM),
                (("bind", "udp", "0.0.0.0", high), ALLOWED),  # wildcard is not 127.0.0.2
            ],
        )


def test_connect_overlaps_ports_and_ipv4_mapped(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path, loopback_ports
):
    p0, p1, p2, p3, p4 = loopback_ports.ports
    path = policy_file(
        tmp_path,
        "connect",
        [scratch_cgroup.relative],
        {
            "sockets": {
                "connect": {
                    "default": "deny",
                    "rules": [
                        {"action": "allow", "cidrs": ["127.0.0.0/8"], "ports": [f"{p1}-{p3}"]},
                        {"action": "deny", "cidrs": ["127.1.0.0/16"]},
                        {"action": "allow", "cidrs": ["127.1.2.0/24"]},
                        {"action": "allow", "protocol": "tcp", "cidrs": ["::1"], "ports": [p1]},
                        {"action": "allow", "protocol": "udp", "cidrs": ["::1"], "ports": [p2]},
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
                (("connect", "tcp", "127.0.0.1", p3), ALLOWED),
                (("connect", "tcp", "127.0.0.1", p0), EPERM),
                (("connect", "tcp", "127.0.0.1", p4), EPERM),
                (("connect", "udp", "127.0.0.9", p2), ALLOWED),
                (("connect", "tcp", "127.1.0.5", p2), EPERM),  # deny inside allow
                (("connect", "tcp", "127.1.2.3", p2), EPERM),  # allow inside deny: denied
                (("connect", "udp", "127.1.2.3", p2), EPERM),
                (("connect", "tcp", "::1", p1), ALLOWED),
                (("connect", "tcp", "::1", p2), EPERM),
                (("connect", "udp", "::1", p2), ALLOWED),
                (("connect", "udp", "::1", p1), EPERM),
                # A dual-stack socket reaching IPv4 hosts through IPv4-mapped addresses
                # meets the IPv4 rules.
                (("connect", "tcp", "::ffff:127.0.0.1", p1), ALLOWED),
                (("connect", "tcp", "::ffff:127.1.0.5", p1), EPERM),
                (("connect", "tcp", "::ffff:127.0.0.1", p4), EPERM),
            ],
        )


def test_connect_deny_of_ipv4_address_stops_ipv4_mapped_connect(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path, loopback_ports
):
    port = loopback_ports.ports[0]
    path = policy_file(
        tmp_path,
        "mapped",
        [scratch_cgroup.relative],
        {
            "sockets": {
                "connect": {
                    "default": "allow",
                    "rules": [{"action": "deny", "cidrs": ["127.0.0.7/32"]}],
                }
            }
        },
    )
    with enforced(cgroup_root, bpf_dir, path):
        expect(
            scratch_cgroup,
            [
                (("connect", "tcp", "127.0.0.7", port), EPERM),
                (("connect", "tcp", "::ffff:127.0.0.7", port), EPERM),
                (("connect", "udp", "::ffff:127.0.0.7", port), EPERM),
                (("sendto", "::ffff:127.0.0.7", port), EPERM),
                (("connect", "tcp", "::ffff:127.0.0.8", port), ALLOWED),
                (("connect", "tcp", "::1", port), ALLOWED),
            ],
        )


def test_unconnected_udp_sendto_goes_through_the_sendmsg_hook(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path, loopback_ports
):
    port = loopback_ports.ports[2]
    path = policy_file(
        tmp_path,
        "sendmsg",
        [scratch_cgroup.relative],
        {
            "sockets": {
                "connect": {
                    "default": "allow",
                    "rules": [
                        {"action": "deny", "protocol": "udp", "cidrs": ["127.0.0.5", "::1"]},
                    ],
                }
            }
        },
    )
    with enforced(cgroup_root, bpf_dir, path):
        expect(
            scratch_cgroup,
            [
                (("sendto", "127.0.0.5", port), EPERM),
                (("sendto", "::1", port), EPERM),
                (("sendto", "127.0.0.1", port), ALLOWED),
                (("connect", "tcp", "127.0.0.5", port), ALLOWED),  # the rule is udp only
                (("connect", "tcp", "::1", port), ALLOWED),
            ],
        )


def test_connect_between_namespaces_both_families(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path, veth_net
):
    net = veth_net
    path = policy_file(
        tmp_path,
        "connect-veth",
        [scratch_cgroup.relative],
        {
            "sockets": {
                "connect": {
                    "default": "deny",
                    "rules": [
                        {"action": "allow", "cidrs": ["10.199.0.0/16", "fd00:199::/32"]},
                        {"action": "deny", "cidrs": ["fd00:199:0:0:8000::/65"]},
                        {"action": "deny", "protocol": "tcp", "cidrs": [net.b4], "ports": [8002]},
                        {"action": "deny", "protocol": "udp", "cidrs": [net.b6], "ports": [8003]},
                    ],
                }
            }
        },
    )
    with enforced(cgroup_root, bpf_dir, path):
        expect(
            scratch_cgroup,
            [
                (("connect", "tcp", net.b4, 8001), ALLOWED),
                (("connect", "tcp", net.b4, 8002), EPERM),
                (("connect", "udp", net.b4, 8002), ALLOWED),
                (("connect", "tcp", net.b6, 8002), ALLOWED),
                (("connect", "udp", net.b6, 8003), EPERM),
                (("sendto", net.b6, 8003), EPERM),
                (("sendto", net.b6, 8004), ALLOWED),
                # In the allowed /32 but also in the denied /65: denied.
                (("connect", "udp", "fd00:199::8000:0:0:2", 8001), EPERM),
                # Outside every rule: the default.
                (("connect", "tcp", "127.0.0.1", 8001), EPERM),
                (("connect", "tcp", "::1", 8001), EPERM),
            ],
            netns=net.ns_a,
        )
    # Without the policy the denied ones go through (the servers are there).
    expect(scratch_cgroup, [(("connect", "tcp", net.b4, 8002), ALLOWED)], netns=net.ns_a)
