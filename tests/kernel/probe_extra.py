"""More probe actions for the enforcement tests, on top of probe.py's (same output: one JSON
line with ok/errno/error). Standard library only, so it also runs under `ip netns exec`.

    probe_extra.py ACTION ...                 every action of probe.py, and:
    probe_extra.py udp-echo HOST PORT          send a datagram and wait for the echo
    probe_extra.py mknod PATH char|block MAJOR MINOR
    probe_extra.py serve tcp|udp HOST PORT     bind here, print {"ready": true}, then wait
                                               for one connection or datagram
    probe_extra.py echo-servers HOST PORT...   TCP and UDP echo listeners until killed
                                               (dual-stack when HOST is '::')
    probe_extra.py loop STOPFILE PORT ALLOWED DENIED
                                               connect and sendto, again and again, until
                                               STOPFILE exists; report every wrong verdict
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import sys
import threading
import time

from probe import ACTIONS, TIMEOUT, family_of
from probe import main as probe_main


def do_udp_echo(host: str, port: str) -> None:
    with socket.socket(family_of(host), socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect((host, int(port)))
        sock.send(b"echo")
        if sock.recv(64) != b"echo":
            raise OSError(errno.EPROTO, "wrong echo")


def do_mknod(path: str, kind: str, major: str, minor: str) -> None:
    mode = (stat.S_IFCHR if kind == "char" else stat.S_IFBLK) | 0o600
    os.mknod(path, mode, os.makedev(int(major), int(minor)))
    os.unlink(path)


def do_serve(protocol: str, host: str, port: str) -> None:
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(family_of(host), kind) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        if protocol == "tcp":
            sock.listen(8)
        sock.settimeout(TIMEOUT * 1.5)
        print(json.dumps({"ready": True}), flush=True)
        if protocol == "tcp":
            sock.accept()[0].close()
        else:
            sock.recv(64)


def _echo_tcp(sock: socket.socket) -> None:
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        conn.close()


def _echo_udp(sock: socket.socket) -> None:
    while True:
        try:
            data, peer = sock.recvfrom(2048)
            sock.sendto(data, peer)
        except OSError:
            continue


def echo_servers(host: str, *ports: str) -> int:
    family = family_of(host)
    sockets = []
    for port in ports:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            sock = socket.socket(family, kind)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            try:
                sock.bind((host, int(port)))
            except OSError as error:
                print(json.dumps({"ready": False, "error": str(error)}), flush=True)
                return 1
            if kind == socket.SOCK_STREAM:
                sock.listen(4096)
            target = _echo_tcp if kind == socket.SOCK_STREAM else _echo_udp
            threading.Thread(target=target, args=(sock,), daemon=True).start()
            sockets.append(sock)
    print(json.dumps({"ready": True}), flush=True)
    while True:
        time.sleep(3600)


def _outcome(action: object, *args: str) -> int:
    try:
        action(*args)  # type: ignore[operator]
    except TimeoutError:
        return errno.ETIMEDOUT
    except OSError as error:
        return error.errno or -1
    return 0


def verdict_loop(stop_file: str, port: str, allowed: str, denied: str) -> int:
    """Both hooks kinds in one loop: TCP connect (sock_addr connect) and unconnected UDP
    sendto (sock_addr sendmsg and cgroup_skb egress). ``allowed`` must always work,
    ``denied`` must always fail with EPERM."""

    def connect(_: str, host: str, port: str) -> None:
        # A long timeout: under load a SYN dropped by a full accept queue is retransmitted
        # after a second, which is no verdict; a denied connect fails at once with EPERM.
        with socket.socket(family_of(host), socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect((host, int(port)))

    actions = connect, ACTIONS["sendto"]
    iterations = 0
    wrong: list[str] = []
    while not os.path.exists(stop_file):
        for host, expected in ((allowed, 0), (denied, errno.EPERM)):
            got = _outcome(actions[0], "tcp", host, port)
            if got != expected:
                wrong.append(f"connect tcp {host}: errno {got}, expected {expected}")
            got = _outcome(actions[1], host, port)
            if got != expected:
                wrong.append(f"sendto {host}: errno {got}, expected {expected}")
        iterations += 1
        if iterations == 1:
            print(json.dumps({"started": True}), flush=True)
    print(json.dumps({"iterations": iterations, "wrong": wrong[:20], "nwrong": len(wrong)}))
    return 0


EXTRA = {"udp-echo": do_udp_echo, "mknod": do_mknod, "serve": do_serve}


def main(argv: list[str]) -> int:
    if argv[0] == "echo-servers":
        return echo_servers(*argv[1:])
    if argv[0] == "loop":
        return verdict_loop(*argv[1:])
    ACTIONS.update(EXTRA)
    return probe_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
