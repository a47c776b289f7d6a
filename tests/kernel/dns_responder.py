"""The DNS server of the `fqdns` tests (issue 12), built on dnspython: UDP and TCP port 53 on
each of its addresses, in the test process's network namespace or in another one (the
sockets are made there; one thread serves them all).

It answers from `zone` (name -> records), and names under race.test with an address of
their own (rN.race.test: 198.18.0.0 + N + 1), so that every round of a race meets a name and
an address never seen before. A test makes it hostile for one name with `tampered()`: a
function gets the query and the correct response and returns the datagrams to send instead,
each from any of the server's addresses (`Datagram.via`), as raw bytes, so that they can be
anything a hostile server could send.

Its addresses on loopback are the test process's own (`loopback_addresses`): two test
sessions on one machine each have their own port 53.
"""

from __future__ import annotations

import ipaddress
import json
import os
import selectors
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import dns.exception
import dns.flags
import dns.message
import dns.rdata
import dns.rdataclass
import dns.rdatatype


@dataclass(frozen=True)
class Datagram:
    """One UDP datagram to send to the client: ``wire``, from the address asked or from the
    server's address number ``via`` (another server than the one asked)."""

    wire: bytes
    via: int | None = None


Tamper = Callable[[dns.message.Message, dns.message.Message], list[Datagram]]

ZONE: dict[str, list[tuple[str, str]]] = {
    "api.test": [("A", "198.51.100.7")],
    "db.other.test": [("A", "198.51.100.8")],
    "v6.test": [("AAAA", "2001:db8::7")],
    "dual.test": [("A", "198.51.100.9"), ("AAAA", "2001:db8::9")],
}


def loopback_addresses(pid: int | None = None) -> tuple[str, str]:
    """Two IPv4 loopback addresses of this test process's own: 127.0.0.0 + 4 * pid + 1 and
    + 2 (a pid is below 2**22, so every one has its own, never x.x.x.0 or x.x.x.255)."""
    pid = os.getpid() if pid is None else pid
    base = ipaddress.IPv4Address("127.0.0.0") + 4 * (pid % (1 << 22))
    return str(base + 1), str(base + 2)


def race_address(name: str) -> str | None:
    if not name.endswith(".race.test"):
        return None
    index = int(name.split(".")[0].removeprefix("r"))
    return str(ipaddress.IPv4Address("198.18.0.0") + index + 1)


def response(
    query: dns.message.Message, records: list[tuple[str, str]], ttl: int = 300
) -> dns.message.Message:
    """The correct response to ``query``: ``records`` (type, address) for its question
    name, the records of the question's type and class (all of them when its type is ANY)."""
    answer = dns.message.make_response(query)
    answer.flags |= dns.flags.RA
    question = query.question[0]
    for kind, address in records:
        rdtype = dns.rdatatype.from_text(kind)
        if question.rdtype not in (rdtype, dns.rdatatype.ANY):
            continue
        rrset = answer.find_rrset(
            answer.answer, question.name, dns.rdataclass.IN, rdtype, create=True
        )
        rrset.add(dns.rdata.from_text(dns.rdataclass.IN, rdtype, address), ttl)
    return answer


@contextmanager
def _in_netns(netns: str | None) -> Iterator[None]:
    """Make sockets in network namespace ``netns`` (this thread only, and back)."""
    if netns is None:
        yield
        return
    from pyroute2 import netns as namespaces

    namespaces.pushns(netns)
    try:
        yield
    finally:
        namespaces.popns()


class Responder:
    """Serves UDP and TCP port 53 on each of ``addresses`` (in ``netns``) until closed."""

    def __init__(self, *addresses: str, netns: str | None = None) -> None:
        self.addresses = addresses
        self.zone: dict[str, list[tuple[str, str]]] = {k: list(v) for k, v in ZONE.items()}
        self.tamper: dict[str, Tamper] = {}
        self.queries: list[tuple[str, str]] = []  # (name, transport) of every query seen
        self.errors: list[str] = []  # what went wrong while answering (a tamper's bug)
        self.udp: list[socket.socket] = []
        self.tcp: list[socket.socket] = []
        self._selector = selectors.DefaultSelector()
        self._stop_read, self._stop_write = os.pipe()
        try:
            with _in_netns(netns):
                for address in addresses:
                    family = socket.AF_INET6 if ":" in address else socket.AF_INET
                    udp = socket.socket(family, socket.SOCK_DGRAM)
                    self.udp.append(udp)
                    udp.bind((address, 53))
                    tcp = socket.socket(family, socket.SOCK_STREAM)
                    self.tcp.append(tcp)
                    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    tcp.bind((address, 53))
                    tcp.listen(16)
        except BaseException:
            self._close_sockets()
            raise
        for sock in (*self.udp, *self.tcp):
            self._selector.register(sock, selectors.EVENT_READ)
        self._selector.register(self._stop_read, selectors.EVENT_READ)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        """The address clients ask."""
        return self.addresses[0]

    @contextmanager
    def tampered(self, name: str, tamper: Tamper) -> Iterator[None]:
        """Answer queries for ``name`` with what ``tamper`` makes, until the block ends."""
        self.tamper[name] = tamper
        try:
            yield
        finally:
            del self.tamper[name]

    def records(self, name: str) -> list[tuple[str, str]]:
        address = race_address(name)
        return [("A", address)] if address else self.zone.get(name, [])

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        return response(query, self.records(query.question[0].name.to_text(True).lower()))

    def _serve(self) -> None:
        while True:
            for key, _ in self._selector.select():
                if key.fileobj == self._stop_read:
                    return
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    if sock.type == socket.SOCK_DGRAM:
                        self._serve_udp(sock)
                    else:
                        self._serve_tcp(sock)
                except (OSError, dns.exception.DNSException):
                    continue  # a bad query or a client gone: serve the next one
                except Exception as error:  # a test's tamper failed: say so, serve on
                    self.errors.append(repr(error))

    def _serve_udp(self, sock: socket.socket) -> None:
        wire, client = sock.recvfrom(65535)
        query = dns.message.from_wire(wire)
        name = query.question[0].name.to_text(True).lower()
        self.queries.append((name, "udp"))
        correct = self.answer(query)
        tamper = self.tamper.get(name)
        datagrams = tamper(query, correct) if tamper else [Datagram(correct.to_wire())]
        for datagram in datagrams:
            sender = sock if datagram.via is None else self.udp[datagram.via]
            sender.sendto(datagram.wire, client)

    def _serve_tcp(self, listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            (length,) = struct.unpack("!H", _read(conn, 2))
            query = dns.message.from_wire(_read(conn, length))
            self.queries.append((query.question[0].name.to_text(True).lower(), "tcp"))
            wire = self.answer(query).to_wire()
            conn.sendall(struct.pack("!H", len(wire)) + wire)

    def _close_sockets(self) -> None:
        for sock in (*self.udp, *self.tcp):
            sock.close()

    def close(self) -> None:
        os.write(self._stop_write, b"x")
        self.thread.join(timeout=10)
        self._selector.close()
        self._close_sockets()
        os.close(self._stop_read)
        os.close(self._stop_write)


def _read(conn: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = conn.recv(count - len(data))
        if not chunk:
            raise OSError("connection closed")
        data += chunk
    return data


# --- the client, as the tests run it in a target cgroup ------------------------------------

CLIENT = Path(__file__).with_name("dns_names_client.py")


class Cgroup(Protocol):  # conftest.ScratchCgroup; conftest is not importable
    def run(self, argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]: ...


def run_client(cgroup: Cgroup, *args: str | int, netns: str | None = None) -> Any:
    """One dns_names_client.py command in ``cgroup`` (and network namespace ``netns``): its
    JSON output."""
    argv = [sys.executable, str(CLIENT), *map(str, args)]
    done = cgroup.run(["ip", "netns", "exec", netns, *argv] if netns else argv)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def verdicts(cgroup: Cgroup, *addresses: str, netns: str | None = None) -> dict[str, str]:
    """address -> "ok" or the errno name of a UDP connect to it from ``cgroup``."""
    rows = run_client(cgroup, "connect", *addresses, netns=netns)
    return {address: verdict for _, address, verdict in rows}
