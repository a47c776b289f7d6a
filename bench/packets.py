"""Ethernet frames for BPF_PROG_TEST_RUN on cgroup_skb: the kernel takes skb->protocol from
the ethertype and pulls the 14-byte L2 header, so the program sees the IP header at offset 0
as it does on a real hook (the same framing as tests/kernel/test_programs_testrun.py)."""

from __future__ import annotations

import ipaddress
import struct

TCP = 6


def tcp(dport: int, sport: int = 40000) -> bytes:
    """A SYN with no options."""
    return struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 5 << 4, 0x02, 65535, 0, 0)


def ipv4_tcp(src: str, dst: str, dport: int) -> bytes:
    payload = tcp(dport)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(payload),
        1,
        0,
        64,
        TCP,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return b"\x00" * 12 + b"\x08\x00" + header + payload


def ipv6_tcp(src: str, dst: str, dport: int) -> bytes:
    payload = tcp(dport)
    header = struct.pack(
        "!IHBB16s16s",
        6 << 28,
        len(payload),
        TCP,
        64,
        ipaddress.IPv6Address(src).packed,
        ipaddress.IPv6Address(dst).packed,
    )
    return b"\x00" * 12 + b"\x86\xdd" + header + payload
