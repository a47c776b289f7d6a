"""The processes of the DNS benchmark (bench/dns.py), each run as
``python -m bench.dns_peers ROLE ...`` so that it has a CPU and a cgroup of its own:

    responder PREFIX                        answers on port 53 of the first free PREFIX.N
    latency SERVER COUNT FIRST [LETTER]     COUNT blocking query/answer round trips
    rate SERVER PER_SECOND SECONDS FIRST    queries paced at PER_SECOND, answers read
    testrun REPEAT ROUNDS JSON              BPF_PROG_TEST_RUN of pinned programs

The clients print one JSON line. The responder prints ``ready ADDRESS`` once bound, and
the number of answers it sent when it stops.

Names and what the responder answers (stateless, from the first label):

    a<N>.<anything>    one A record, 100.64.0.0 + N
    b<N>.<anything>    16 A records, 100.64.0.0 + 16 N .. + 16 N + 15
    anything else      no record (NOERROR, empty)

every record with TTL ``TTL``. The wire format is written here with ``struct`` rather than
with dnspython: the responder must answer well over 10,000 queries per second from one
Python thread, and it needs only the header, the question and fixed A records.
"""

from __future__ import annotations

import ipaddress
import json
import signal
import socket
import struct
import sys
import time

BASE = int(ipaddress.IPv4Address("100.64.0.0"))
TTL = 300
PER_ANSWER = 16  # records of a b<N> answer (CGP_DNS_ANSWERS: all of them are read)
_HEADER = struct.Struct("!HHHHHH")
_RECORD = struct.Struct("!HHHIH")  # pointer to the question name, type, class, TTL, length
_POINTER = 0xC00C
WARM_UP = 20  # untimed round trips before a latency client's first timed one


def encode_name(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"


def query(query_id: int, name: str) -> bytes:
    """A recursive A/IN query for ``name``."""
    return _HEADER.pack(query_id, 0x0100, 1, 0, 0, 0) + encode_name(name) + b"\0\x01\0\x01"


def addresses(label: bytes) -> list[int]:
    """The addresses the responder gives a name whose first label is ``label``."""
    if len(label) < 2 or not label[1:].isdigit():
        return []
    index = int(label[1:])
    if label[:1] == b"a":
        return [BASE + index]
    if label[:1] == b"b":
        return [BASE + PER_ANSWER * index + j for j in range(PER_ANSWER)]
    return []


def answer(packet: bytes) -> bytes | None:
    """The answer to one query, or None for something that is not one."""
    if len(packet) < 17:
        return None
    at = 12
    while at < len(packet) and packet[at]:
        at += 1 + packet[at]
    end = at + 5  # the root label, QTYPE, QCLASS
    if end > len(packet):
        return None
    found = addresses(packet[13 : 13 + packet[12]])
    (query_id,) = struct.unpack_from("!H", packet)
    parts = [_HEADER.pack(query_id, 0x8180, 1, len(found), 0, 0), packet[12:end]]
    for address in found:
        parts.append(_RECORD.pack(_POINTER, 1, 1, TTL, 4) + address.to_bytes(4, "big"))
    return b"".join(parts)


def _bind(prefix: str) -> socket.socket:
    """A UDP socket on port 53 of the first free loopback address PREFIX.1 .. PREFIX.254
    (the kernel tests and other bench runs may hold some)."""
    for host in range(1, 255):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((f"{prefix}.{host}", 53))
        except OSError:
            sock.close()
            continue
        return sock
    raise SystemExit(f"no free port 53 on {prefix}.1-254")


def responder(prefix: str) -> None:
    sent = 0

    def stop(*_: object) -> None:
        print(json.dumps({"sent": sent}), flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    with _bind(prefix) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        print("ready", sock.getsockname()[0], flush=True)
        receive, send = sock.recvfrom, sock.sendto
        while True:
            packet, client = receive(512)
            reply = answer(packet)
            if reply is not None:
                send(reply, client)
                sent += 1


def _records(reply: bytes) -> int:
    return int(struct.unpack_from("!H", reply, 6)[0])


def latency(server: str, count: int, first: int, letter: str = "a") -> None:
    """``count`` round trips, each for a name never asked before (so each answer teaches
    new addresses under a wildcard rule): the time from sendto until recvfrom returned.
    WARM_UP round trips for a name with no record (nothing learned) go first, untimed."""
    rtt_ns, errors = [], 0
    expect = len(addresses(f"{letter}0".encode()))
    clock = time.perf_counter_ns
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        for n in range(WARM_UP):  # not timed: the first calls of a new process are slow
            sock.sendto(query(n, "warm-up.bench.test"), (server, 53))
            sock.recvfrom(4096)
        for n in range(first, first + count):
            packet = query(n & 0xFFFF, f"{letter}{n}.learn.bench.test")
            start = clock()
            try:
                sock.sendto(packet, (server, 53))
                reply, _ = sock.recvfrom(4096)
            except OSError:
                errors += 1
                continue
            elapsed = clock() - start
            if reply[:2] != packet[:2] or _records(reply) != expect:
                errors += 1
                continue
            rtt_ns.append(elapsed)
    print(json.dumps({"rtt_ns": rtt_ns, "errors": errors}))


def rate(server: str, per_second: float, seconds: float, first: int) -> None:
    """Queries for a<first>.., a<first+1>.. sent at ``per_second`` (paced against the clock,
    not bursts), every answer that comes back read; then up to 2 s for the last ones."""
    total = int(per_second * seconds)
    received = 0
    answered: list[int] = []  # the address of every answer read (its last 4 bytes)
    late_max = 0.0
    clock = time.perf_counter
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        sock.setblocking(False)
        receive = sock.recv
        target = (server, 53)

        def drain() -> None:
            nonlocal received
            while True:
                try:
                    reply = receive(4096)
                except BlockingIOError:
                    return
                received += 1
                if _records(reply) == 1:
                    answered.append(int.from_bytes(reply[-4:], "big"))

        start = clock()
        for i in range(total):
            due = start + i / per_second
            while clock() < due:
                drain()
            late_max = max(late_max, clock() - due)
            n = first + i
            sock.sendto(query(n & 0xFFFF, f"a{n}.learn.bench.test"), target)
        sent_s = clock() - start
        deadline = clock() + 2.0
        while received < total and clock() < deadline:
            drain()
            time.sleep(0.001)
    print(
        json.dumps(
            {
                "sent": total,
                "send_s": sent_s,
                "received": received,
                "answered": answered,
                "late_max_s": late_max,
            }
        )
    )


def testrun(repeat: int, rounds: int, spec: str) -> None:
    """``spec``: {"programs": {label: pin}, "cases": {label: [packet hex, verdict]}}. Every
    program on every case, interleaved, ``rounds`` times; the kernel's mean ns per run.
    Run inside the cgroup whose learned addresses are to be found: a test run's skb
    belongs to a socket of the calling task's cgroup (bpf_skb_cgroup_id)."""
    from cgpolicy.kernel.bpf import Program

    wanted = json.loads(spec)
    programs = {label: Program.from_pin(pin) for label, pin in wanted["programs"].items()}
    cases = {label: (bytes.fromhex(h), v) for label, (h, v) in wanted["cases"].items()}
    wrong = []
    for label, program in programs.items():  # warm-up, and every verdict checked once
        for case, (packet, verdict) in cases.items():
            got = program.test_run(packet, repeat=max(1, repeat // 10)).retval
            if got != verdict:
                wrong.append(f"{label} {case}: returned {got}, expected {verdict}")
    samples: dict[str, list[int]] = {}
    for _ in range(rounds):
        for label, program in programs.items():
            for case, (packet, verdict) in cases.items():
                result = program.test_run(packet, repeat=repeat)
                if result.retval != verdict:
                    wrong.append(f"{label} {case}: returned {result.retval}")
                samples.setdefault(f"{case}.{label}", []).append(result.duration_ns)
    print(json.dumps({"samples": samples, "wrong": wrong}))


def main(argv: list[str]) -> None:
    role, *args = argv
    if role == "responder":
        responder(args[0])
    elif role == "latency":
        latency(args[0], int(args[1]), int(args[2]), *args[3:])
    elif role == "rate":
        rate(args[0], float(args[1]), float(args[2]), int(args[3]))
    elif role == "testrun":
        testrun(int(args[0]), int(args[1]), args[2])
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
