"""A probe: performs one action and prints its outcome as one JSON line.

Tests run it inside a scratch cgroup, so that what the kernel allows or denies is what a
real process in that cgroup would see. It uses only the standard library and starts fast.

    probe.py connect tcp|udp HOST PORT      connect() (and a send for udp)
    probe.py connect-now tcp|udp HOST PORT  connect() alone, non-blocking: fails only if the
                                             call itself is refused (a TCP handshake still
                                             under way counts as not refused)
    probe.py sendto HOST PORT                unconnected UDP sendto()
    probe.py bind tcp|udp ADDR PORT
    probe.py socket FAMILY TYPE [PROTO]      numbers or names: inet, inet6, packet; stream, raw
    probe.py open PATH r|w|rw
    probe.py sysctl-read NAME                NAME in slash form: net/ipv4/ip_forward
    probe.py sysctl-write NAME VALUE
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys

FAMILIES = {"inet": socket.AF_INET, "inet6": socket.AF_INET6, "packet": 17, "unix": socket.AF_UNIX}
TYPES = {"stream": socket.SOCK_STREAM, "dgram": socket.SOCK_DGRAM, "raw": socket.SOCK_RAW}
PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}
# A dropped SYN is retransmitted, not refused: on loopback an allowed connect is instant,
# so a connect that has not completed within this time was dropped.
TIMEOUT = 1.0


def family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def do_connect(protocol: str, host: str, port: str) -> None:
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(family_of(host), kind) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect((host, int(port)))
        if protocol == "udp":
            sock.send(b"probe")


def do_connect_now(protocol: str, host: str, port: str) -> None:
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(family_of(host), kind) as sock:
        sock.setblocking(False)
        code = sock.connect_ex((host, int(port)))
        if code not in (0, errno.EINPROGRESS):
            raise OSError(code, os.strerror(code))


def do_sendto(host: str, port: str) -> None:
    with socket.socket(family_of(host), socket.SOCK_DGRAM) as sock:
        sock.sendto(b"probe", (host, int(port)))


def do_bind(protocol: str, address: str, port: str) -> None:
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(family_of(address), kind) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, int(port)))


def number(table: dict[str, int], value: str) -> int:
    return table[value] if value in table else int(value)


def do_socket(family: str, kind: str, protocol: str = "0") -> None:
    socket.socket(
        number(FAMILIES, family), number(TYPES, kind), number(PROTOCOLS, protocol)
    ).close()


def do_open(path: str, mode: str) -> None:
    flags = {"r": os.O_RDONLY, "w": os.O_WRONLY, "rw": os.O_RDWR}[mode]
    os.close(os.open(path, flags))


def do_sysctl_read(name: str) -> None:
    with open(f"/proc/sys/{name}") as handle:
        handle.read()


def do_sysctl_write(name: str, value: str) -> None:
    with open(f"/proc/sys/{name}", "w") as handle:
        handle.write(value)


ACTIONS = {
    "connect": do_connect,
    "connect-now": do_connect_now,
    "sendto": do_sendto,
    "bind": do_bind,
    "socket": do_socket,
    "open": do_open,
    "sysctl-read": do_sysctl_read,
    "sysctl-write": do_sysctl_write,
}


def main(argv: list[str]) -> int:
    action = ACTIONS[argv[0]]
    try:
        action(*argv[1:])
    except TimeoutError:
        print(json.dumps({"ok": False, "errno": errno.ETIMEDOUT, "error": "timed out"}))
        return 1
    except OSError as error:
        print(json.dumps({"ok": False, "errno": error.errno or 0, "error": str(error)}))
        return 1
    print(json.dumps({"ok": True, "errno": 0, "error": ""}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
