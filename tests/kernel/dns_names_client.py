"""Run inside a test's cgroup (and network namespace): resolve names over DNS at a given
server with dnspython, connect a UDP socket to each address at once, as soon as the answer
is read (a UDP connect sends nothing: only sockets.connect decides), and print one JSON line.
An address with ':' is connected from an IPv6 socket (dual-stack, so `::ffff:a.b.c.d`
reaches IPv4), any other from an IPv4 one.

    dns_names_client.py resolve SERVER NAME... [--rounds N] [--type A|AAAA] [--tcp]
        each NAME (a template for str.format when --rounds: one name per round) resolved,
        each address of the answer connected: [[name, address, "ok" or errno name], ...]
    dns_names_client.py connect ADDRESS...
        connect only: [["-", address, verdict], ...]
    dns_names_client.py exchange SERVER NAME [--type T] [--class C] [--datagrams N]
        one query from an unconnected socket, then N datagrams taken from whoever sends
        them, each parsed if it parses: {"received": [{"from", "size", "parsed",
        "addresses"}, ...]} (fewer than N when none came for 10 s)
    dns_names_client.py unasked ADDRESS
        bind a UDP socket, say its port ({"port": P}), take one datagram (a forged answer)
        that no query asked for, then connect to ADDRESS: [["-", address, verdict]]
"""

from __future__ import annotations

import argparse
import errno
import json
import socket
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rdataclass
import dns.rdatatype

WAIT = 10.0  # seconds for an answer: generous, a slow machine only makes it longer


def addresses(answer: dns.message.Message) -> list[str]:
    """The A and AAAA addresses of an answer, in the order of the packet."""
    found = []
    for rrset in answer.answer:
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            found += [rdata.address for rdata in rrset]
    return found


def family_of(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def connect(address: str) -> str:
    with socket.socket(family_of(address), socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((address, 9))
        except OSError as error:
            return errno.errorcode.get(error.errno or 0, str(error.errno))
    return "ok"


def resolve(server: str, name: str, kind: str, tcp: bool) -> list[str]:
    query = dns.message.make_query(name, kind)
    if tcp:
        return addresses(dns.query.tcp(query, server, timeout=WAIT))
    return addresses(dns.query.udp(query, server, timeout=WAIT))


def exchange(server: str, name: str, kind: str, rdclass: str, datagrams: int) -> dict[str, Any]:
    query = dns.message.make_query(name, kind, rdclass=dns.rdataclass.from_text(rdclass))
    received = []
    with socket.socket(family_of(server), socket.SOCK_DGRAM) as sock:
        sock.settimeout(WAIT)
        sock.sendto(query.to_wire(), (server, 53))
        for _ in range(datagrams):
            try:
                wire, source = sock.recvfrom(65535)
            except TimeoutError:
                break
            row: dict[str, Any] = {"from": source[0], "size": len(wire)}
            try:
                # not dns.query's checks (id, source): the test decides what to send
                parsed = dns.message.from_wire(wire)
            except dns.exception.DNSException as error:
                row.update(parsed=False, addresses=[], error=type(error).__name__)
            else:
                row.update(parsed=True, addresses=addresses(parsed))
            received.append(row)
    return {"received": received}


def unasked(address: str) -> list[list[str]]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(WAIT)
        print(json.dumps({"port": sock.getsockname()[1]}), flush=True)
        sock.recvfrom(4096)
    return [["-", address, connect(address)]]


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("resolve")
    p.add_argument("server")
    p.add_argument("names", nargs="+")
    p.add_argument("--rounds", type=int)
    p.add_argument("--type", default="A")
    p.add_argument("--tcp", action="store_true")
    p = commands.add_parser("connect")
    p.add_argument("addresses", nargs="+")
    p = commands.add_parser("exchange")
    p.add_argument("server")
    p.add_argument("name")
    p.add_argument("--type", default="A")
    p.add_argument("--class", dest="rdclass", default="IN")
    p.add_argument("--datagrams", type=int, default=1)
    p = commands.add_parser("unasked")
    p.add_argument("address")
    args = parser.parse_args()

    result: Any
    if args.command == "resolve":
        names = args.names
        if args.rounds is not None:
            names = [template.format(i) for i in range(args.rounds) for template in names]
        result = []
        for name in names:
            for address in resolve(args.server, name, args.type, args.tcp):
                result.append([name, address, connect(address)])  # at once
    elif args.command == "connect":
        result = [["-", address, connect(address)] for address in args.addresses]
    elif args.command == "exchange":
        result = exchange(args.server, args.name, args.type, args.rdclass, args.datagrams)
    else:
        result = unasked(args.address)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
