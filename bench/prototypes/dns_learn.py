"""Prototype measurement for issue 12: the cost of learning addresses from DNS answers in
the kernel, at cgroup_skb ingress, per DNS packet (BPF_PROG_TEST_RUN). Run as root:

    .venv/bin/python -m bench.prototypes.dns_learn
"""

from __future__ import annotations

import ctypes
import ipaddress
import statistics
import struct
from pathlib import Path

from bcc import BPF

from cgpolicy.compiler.names import name_table
from cgpolicy.kernel.syscall import prog_test_run

SOURCE = Path(__file__).with_name("dns_learn.c")


def wire(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.lower().split(".")) + b"\0"


KEY = bytes(range(16))  # the prototype's; cgpolicy draws one per load


def dns_answer(question: str, answers: list[tuple[str, str]], ttl: int = 300) -> bytes:
    """A response to ``question``: each answer ("A", address) or ("CNAME", target)."""
    header = struct.pack("!HHHHHH", 0x1234, 0x8180, 1, len(answers), 0, 0)
    body = wire(question) + struct.pack("!HH", 1, 1)
    for kind, value in answers:
        if kind == "A":
            body += b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, ttl, 4)
            body += ipaddress.IPv4Address(value).packed
        else:
            target = wire(value)
            body += b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, ttl, len(target)) + target
    udp = struct.pack("!HHHH", 53, 40000, 8 + len(header) + len(body), 0) + header + body
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        0,
        0,
        64,
        17,
        0,
        bytes([10, 0, 0, 53]),
        bytes([10, 0, 0, 2]),
    )
    return b"\0" * 12 + b"\x08\x00" + ip + udp


def main() -> None:
    bpf = BPF(src_file=str(SOURCE))
    fn = bpf.load_func("dns_learn", BPF.CGROUP_SKB)
    answers = bpf.load_func("dns_answers", BPF.CGROUP_SKB)
    bpf["jump"][ctypes.c_int(0)] = ctypes.c_int(answers.fd)
    key = bpf["hash_key"]
    key[ctypes.c_int(0)] = key.Leaf(
        int.from_bytes(KEY[:8], "little"), int.from_bytes(KEY[8:], "little")
    )
    names = bpf["names"]
    rules = [(0, ["api.example.com"]), (1, ["*.s3.amazonaws.com"]), (2, ["github.com"])]
    for hashed, entry in name_table(KEY, 1, [(0, i, n) for i, n in rules]).items():
        names[ctypes.c_uint64(hashed)] = names.Leaf(entry.exact[0], entry.wildcard[0])
    cases = {
        "miss (name not in any rule)": dns_answer("www.other.org", [("A", "192.0.2.9")]),
        "exact, CNAME + 2 A": dns_answer(
            "api.example.com",
            [("CNAME", "edge.cdn.example.net"), ("A", "192.0.2.7"), ("A", "192.0.2.8")],
        ),
        "wildcard, 16 A": dns_answer(
            "bucket.s3.amazonaws.com", [("A", f"192.0.2.{i}") for i in range(16)]
        ),
        "hostile: 250-byte name, 16 A": dns_answer(
            ".".join(["a" * 60] * 4) + ".github.com"[:0] + "x", [("A", "192.0.2.1")] * 16
        ),
    }
    print(f"{'case':40s} ns/packet (median of 5 x 100k)")
    for what, packet in cases.items():
        runs = [prog_test_run(fn.fd, packet, repeat=100_000).duration_ns for _ in range(5)]
        print(f"{what:40s} {statistics.median(runs):8.0f}")
    stats = bpf["stats"]
    print("learned:", stats[ctypes.c_int(0)].value, "refused:", stats[ctypes.c_int(1)].value)
    learned = bpf["learned"]
    print(
        "entries:",
        sorted(str(ipaddress.IPv4Address(k.addr.to_bytes(4, "little"))) for k in learned.keys())[
            :5
        ],
    )


if __name__ == "__main__":
    main()
