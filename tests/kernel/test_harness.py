"""The harness itself: a probe in a scratch cgroup sees what a program there decides."""

from __future__ import annotations

import errno
import os

BPF_F_ALLOW_MULTI = 2

DENY_ALL = b"""
int deny_all(struct __sk_buff *skb) { return 0; }
"""


def test_probe_connects_when_nothing_is_attached(scratch_cgroup, tcp_server):
    result = scratch_cgroup.probe("connect", "tcp", tcp_server.host, tcp_server.port)
    assert result.ok, result


def test_deny_all_egress_program_makes_connect_fail(scratch_cgroup, tcp_server, udp_server):
    # Imported here, after conftest's kernel_ready gate: a host without bcc skips (or, under
    # CI, fails) this test with the gate's reason instead of failing to collect the file.
    from bcc import BPF, BPFAttachType

    bpf = BPF(text=DENY_ALL)
    program = bpf.load_func(b"deny_all", BPF.CGROUP_SKB)
    cgroup_fd = scratch_cgroup.fd()
    try:
        bpf.attach_func(program, cgroup_fd, BPFAttachType.CGROUP_INET_EGRESS, BPF_F_ALLOW_MULTI)
        try:
            denied = scratch_cgroup.probe("connect", "tcp", tcp_server.host, tcp_server.port)
            udp_denied = scratch_cgroup.probe("sendto", udp_server.host, udp_server.port)
            sibling = scratch_cgroup.child("inherits")
            inherited = sibling.probe("connect", "tcp", tcp_server.host, tcp_server.port)
        finally:
            bpf.detach_func(program, cgroup_fd, BPFAttachType.CGROUP_INET_EGRESS)
        allowed_again = scratch_cgroup.probe("connect", "tcp", tcp_server.host, tcp_server.port)
    finally:
        os.close(cgroup_fd)
        bpf.cleanup()
    # A dropped SYN is retried until the probe gives up; a dropped datagram fails the send.
    assert not denied.ok and denied.errno == errno.ETIMEDOUT, denied
    assert not udp_denied.ok and udp_denied.errno == errno.EPERM, udp_denied
    assert not inherited.ok, inherited
    assert allowed_again.ok, allowed_again
