"""A packet action as the Ethernet frame BPF_PROG_TEST_RUN takes for a cgroup_skb program.

The local end is a documentation address (192.0.2.1, 2001:db8::1): the programs look only
at the remote address. A port or ICMP type the action leaves out is a field the program
cannot read: the frame is then a non-first fragment, as the reference evaluates it."""

from __future__ import annotations

import ipaddress
import struct

from cgpolicy.reference import ICMP, ICMPV6, TCP, UDP, Packet

_LOCAL4 = ipaddress.IPv4Address("192.0.2.1")
_LOCAL6 = ipaddress.IPv6Address("2001:db8::1")
_SOURCE_PORT = 40000
_FRAGMENT = 44  # IPv6 next header: fragment


def _transport(packet: Packet) -> bytes | None:
    """The first bytes of the transport header; None when the field the rules test is
    unknown (the frame is then a non-first fragment)."""
    if packet.protocol in (TCP, UDP):
        if packet.port is None:
            return None
        # the rules' port is the destination port: remote on egress, local on ingress
        source, destination = _SOURCE_PORT, packet.port
        if packet.protocol == TCP:
            return struct.pack("!HHIIBBHHH", source, destination, 0, 0, 5 << 4, 0x02, 65535, 0, 0)
        return struct.pack("!HHHH", source, destination, 8 + 4, 0) + b"test"
    if packet.protocol in (ICMP, ICMPV6):
        if packet.icmp_type is None:
            return None
        return struct.pack("!BBHI", packet.icmp_type, 0, 0, 0) + b"test"
    return b"\x00" * 8


def frame(packet: Packet) -> bytes:
    assert packet.remote is not None and packet.protocol is not None
    payload = _transport(packet)
    fragment = payload is None
    body = payload if payload is not None else b"\x00" * 8
    if packet.remote.version == 4:
        local: ipaddress.IPv4Address | ipaddress.IPv6Address = _LOCAL4
        source, destination = (
            (local, packet.remote) if packet.direction == "egress" else (packet.remote, local)
        )
        header = struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(body),
            1,
            1 if fragment else 0,  # fragment offset 1 (8 bytes): a non-first fragment
            64,
            packet.protocol,
            0,
            source.packed,
            destination.packed,
        )
        return b"\x00" * 12 + b"\x08\x00" + header + body
    local = _LOCAL6
    source, destination = (
        (local, packet.remote) if packet.direction == "egress" else (packet.remote, local)
    )
    next_header = packet.protocol
    if fragment:  # offset 1 (8 bytes), more fragments
        body = struct.pack("!BBHI", packet.protocol, 0, (1 << 3) | 1, 7) + body
        next_header = _FRAGMENT
    header = struct.pack(
        "!IHBB16s16s", 6 << 28, len(body), next_header, 64, source.packed, destination.packed
    )
    return b"\x00" * 12 + b"\x86\xdd" + header + body
