"""A workload that touches every hook cgpolicy enforces, for `cgpolicy learn`'s tests.

    learn_workload.py PORT TMPDIR [--extra]

On loopback (IPv4 and IPv6): a TCP server on PORT and a client that connects to it and
exchanges a message (socket, bind, connect, packets both ways); a UDP server on PORT+1
answering an unconnected client (sendmsg) and a connected one (connect); a UDP socket
bound to port 0. A character device node 1:3 made with mknod in TMPDIR, opened, written and
read. Two sysctls read. With --extra it also does one thing more at every kind of hook
it can (a connect to PORT+2, a sysctl read of kernel/hostname), which a policy learned
without --extra must deny. Any failure exits non-zero.
"""

from __future__ import annotations

import os
import socket
import stat
import sys
import threading

TIMEOUT = 20


def tcp_exchange(family: int, host: str, port: int) -> None:
    server = socket.socket(family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen()
    server.settimeout(TIMEOUT)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(conn.recv(100).upper())

    thread = threading.Thread(target=serve)
    thread.start()
    with socket.create_connection((host, port), timeout=TIMEOUT) as client:
        client.sendall(b"ping")
        assert client.recv(100) == b"PING"
    thread.join()
    server.close()


def udp_exchange(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind((host, port))
        server.settimeout(TIMEOUT)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(TIMEOUT)
            client.sendto(b"ask", (host, port))
            data, peer = server.recvfrom(100)
            server.sendto(data.upper(), peer)
            assert client.recv(100) == b"ASK"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as connected:
            connected.settimeout(TIMEOUT)
            connected.connect((host, port))
            connected.send(b"hello")
            data, peer = server.recvfrom(100)
            server.sendto(data.upper(), peer)
            assert connected.recv(100) == b"HELLO"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as anywhere:
        anywhere.bind((host, 0))


def device(folder: str) -> None:
    node = os.path.join(folder, "null")
    if os.path.exists(node):
        os.unlink(node)
    os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    with open(node, "r+b", buffering=0) as handle:
        handle.write(b"x")
        assert handle.read() == b""
    os.unlink(node)


def sysctls(*names: str) -> None:
    for name in names:
        with open(f"/proc/sys/{name}") as handle:
            handle.read()


def main() -> int:
    port, folder = int(sys.argv[1]), sys.argv[2]
    extra = "--extra" in sys.argv[3:]
    tcp_exchange(socket.AF_INET, "127.0.0.1", port)
    tcp_exchange(socket.AF_INET6, "::1", port)
    udp_exchange("127.0.0.1", port + 1)
    device(folder)
    sysctls("net/core/somaxconn", "kernel/ostype")
    if extra:
        try:
            socket.create_connection(("127.0.0.1", port + 2), timeout=TIMEOUT).close()
        except ConnectionRefusedError:
            pass  # nothing listens: only a denial (EPERM) is a failure
        sysctls("kernel/hostname")
    print("workload done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
