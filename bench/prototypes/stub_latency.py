"""Added latency of a userspace DNS stub on loopback: client -> stub -> resolver -> stub ->
client, against client -> resolver, 10,000 queries each, p50 and p99 (the "resolver"
answers at once). Run: python3 bench/prototypes/stub_latency.py"""

from __future__ import annotations

import socket
import threading
import time

QUERY = bytes(60)


def resolver(sock: socket.socket) -> None:
    while True:
        data, client = sock.recvfrom(2048)
        sock.sendto(data, client)


def stub(sock: socket.socket, upstream: tuple[str, int]) -> None:
    """Forward, wait, answer: a real stub would parse the answer and write the learned
    addresses into the kernel's map (one bpf() call each) before answering."""
    up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    while True:
        data, client = sock.recvfrom(2048)
        up.sendto(data, upstream)
        answer, _ = up.recvfrom(2048)
        sock.sendto(answer, client)


def measure(target: tuple[str, int], count: int = 10_000) -> tuple[float, float]:
    """p50 and p99 round trip in µs."""
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    samples = []
    for _ in range(count):
        start = time.perf_counter_ns()
        client.sendto(QUERY, target)
        client.recvfrom(2048)
        samples.append(time.perf_counter_ns() - start)
    samples.sort()
    return samples[count // 2] / 1000, samples[int(count * 0.99)] / 1000


def main() -> None:
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    upstream.bind(("127.0.0.1", 0))
    forwarder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    forwarder.bind(("127.0.0.1", 0))
    threading.Thread(target=resolver, args=(upstream,), daemon=True).start()
    threading.Thread(target=stub, args=(forwarder, upstream.getsockname()), daemon=True).start()
    direct = measure(upstream.getsockname())
    via = measure(forwarder.getsockname())
    print(f"direct: p50 {direct[0]:.0f} µs, p99 {direct[1]:.0f} µs")
    print(f"via the stub: p50 {via[0]:.0f} µs, p99 {via[1]:.0f} µs")


if __name__ == "__main__":
    main()
