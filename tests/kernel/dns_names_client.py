"""Run inside a test's cgroup: resolve names over UDP at a given server, then connect a UDP
socket (which sends nothing: only sockets.connect decides) to what came back, or to given
addresses. Prints one JSON line: per step, the address and "ok" or the errno name.

    dns_names_client.py SERVER_IP ROUNDS NAME_TEMPLATE     # resolve-then-connect rounds
    dns_names_client.py SERVER_IP 0 - ADDRESS...           # connect only, nothing resolved
    dns_names_client.py --unasked ADDRESS                  # wait for an answer nobody asked
                                                           # for, then connect to ADDRESS
"""

from __future__ import annotations

import errno
import json
import random
import socket
import struct
import sys


def query(server: str, name: str) -> list[str]:
    qid = random.randrange(1 << 16)
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    packet = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question + struct.pack("!HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(packet, (server, 53))
        answer, _ = sock.recvfrom(4096)
    count = struct.unpack_from("!H", answer, 6)[0]
    at = 12 + len(question) + 4
    found = []
    for _ in range(count):
        at += 2  # a pointer to the owner name
        kind, _, _, length = struct.unpack_from("!HHIH", answer, at)
        at += 10
        if kind == 1 and length == 4:
            found.append(socket.inet_ntoa(answer[at : at + 4]))
        at += length
    return found


def connect(address: str) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((address, 9))
        except OSError as error:
            return errno.errorcode.get(error.errno or 0, str(error.errno))
    return "ok"


def unasked(address: str) -> None:
    """Bind a UDP socket, say its port, take one datagram (a forged answer), connect."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(10)
        print(json.dumps({"port": sock.getsockname()[1]}), flush=True)
        sock.recvfrom(4096)
    print(json.dumps([["-", address, connect(address)]]))


def main() -> None:
    if sys.argv[1] == "--unasked":
        unasked(sys.argv[2])
        return
    server, rounds, template, *addresses = sys.argv[1:]
    results = []
    for index in range(int(rounds)):
        name = template.format(index)
        for address in query(server, name):  # connect at once, as soon as the answer is read
            results.append([name, address, connect(address)])
    results += [["-", address, connect(address)] for address in addresses]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
