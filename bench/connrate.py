"""The connection-rate load of ``bench.compare``: a server and a client, each its own process.

    python -m bench.connrate serve                   listen on 0.0.0.0 (a free port, printed
                                                     on stdout), accept and close until killed
    python -m bench.connrate connect HOST PORT SEC   connect + close as fast as possible for
                                                     SEC seconds; prints JSON
    python -m bench.connrate probe HOST PORT SEC     exit 0 if one connect succeeds within SEC

The client closes with ``SO_LINGER {on, 0}``: the close sends a RST and leaves no TIME_WAIT
socket behind, so the ephemeral port range is never exhausted however long it runs. Each
connection is therefore SYN, ACK and RST from the client (three egress packets through the
filter under test) and SYN-ACK from the server. The caller puts the client into the cgroup
under test; the server stays outside it.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

_LINGER_RST = struct.pack("ii", 1, 0)


def serve() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("0.0.0.0", 0))  # 127.0.0.2 must reach it too: the blocked probe
    server.listen(4096)
    print(server.getsockname()[1], flush=True)
    accept = server.accept
    while True:
        conn, _ = accept()
        conn.close()


def connect(host: str, port: int, seconds: float) -> dict[str, float]:
    address = (host, port)
    new = socket.socket
    family, kind = socket.AF_INET, socket.SOCK_STREAM
    level, option = socket.SOL_SOCKET, socket.SO_LINGER
    count = errors = 0
    start = time.perf_counter()
    deadline = start + seconds
    now = start
    while now < deadline:
        for _ in range(64):
            sock = new(family, kind)
            sock.setsockopt(level, option, _LINGER_RST)
            try:
                sock.connect(address)
                count += 1
            except OSError:
                errors += 1
            sock.close()
        now = time.perf_counter()
    elapsed = now - start
    return {"connections": count, "errors": errors, "seconds": elapsed, "rate": count / elapsed}


def probe(host: str, port: int, seconds: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=seconds):
            return True
    except OSError:
        return False


def main(argv: list[str]) -> int:
    command, args = argv[0], argv[1:]
    if command == "serve":
        serve()
        return 0
    if command == "connect":
        print(json.dumps(connect(args[0], int(args[1]), float(args[2]))))
        return 0
    if command == "probe":
        return 0 if probe(args[0], int(args[1]), float(args[2])) else 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
