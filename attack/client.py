"""Run inside a target cgroup (unprivileged). Standard library only.

    client.py resolve SERVER NAME...    query each NAME over UDP, then connect a UDP socket to
                                        port 443 of each address of the answer at once:
                                        prints [[name, address, "ok" | error], ...]
    client.py flood SERVER SECONDS      queries to SERVER:53 with every id, from many sockets,
                                        as fast as it can: prints the count sent
    client.py connect ADDRESS...        connect only
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time


def encode(name: str) -> bytes:
    return b"".join(bytes([len(l)]) + l.encode() for l in name.rstrip(".").split(".")) + b"\0"


def connect(address: str) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((address, 443))
            return "ok"
        except OSError as error:
            return os.strerror(error.errno)


def addresses(reply: bytes) -> list[str]:
    at = 12
    while reply[at]:
        at += 1 + reply[at]
    at += 5
    found = []
    for _ in range(struct.unpack("!H", reply[6:8])[0]):
        at += 2
        kind, _cls, _ttl, length = struct.unpack("!HHIH", reply[at : at + 10])
        at += 10
        if kind == 1:
            found.append(socket.inet_ntoa(reply[at : at + 4]))
        at += length
    return found


def resolve(server: str, names: list[str]) -> list:
    out = []
    for name in names:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            qid = int.from_bytes(os.urandom(2), "big")
            s.sendto(struct.pack("!HHHHHH", qid, 0x100, 1, 0, 0, 0) + encode(name) + b"\0\1\0\1", (server, 53))
            try:
                reply, _ = s.recvfrom(4096)
            except TimeoutError:
                out.append([name, None, "timeout"])
                continue
            for address in addresses(reply):
                out.append([name, address, connect(address)])
    return out


def flood(server: str, seconds: float) -> int:
    socks = []
    for _ in range(16):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect((server, 53))
        socks.append(s)
    body = b"\1\0\0\1\0\0\0\0\0\0" + encode("flood.example.test") + b"\0\1\0\1"
    sent, end, qid = 0, time.monotonic() + seconds, 0
    while time.monotonic() < end:
        for _ in range(1000):
            qid = (qid + 1) & 0xFFFF
            try:
                socks[qid & 15].send(qid.to_bytes(2, "big") + body)
                sent += 1
            except OSError:
                pass
    return sent


if __name__ == "__main__":
    command, rest = sys.argv[1], sys.argv[2:]
    if command == "resolve":
        print(json.dumps(resolve(rest[0], rest[1:])))
    elif command == "flood":
        print(json.dumps({"sent": flood(rest[0], float(rest[1]))}))
    else:
        print(json.dumps([["-", a, connect(a)] for a in rest]))
