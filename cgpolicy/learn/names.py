"""DNS names for what was learned: the answers the workload read (copied by the ingress
program, cgpolicy/kernel/learn.py), parsed with dnspython, say which names an address was
given for. Where an address the workload used was given by an answer *before* it used it,
`learn` writes the name (an `fqdns` rule) instead of the address, and names the servers
whose answers taught it in ``spec.dns.servers``.

An answer is read as the kernel's learning reads it (docs/policy.md, "DNS names"): a
response to a standard query, no error, not truncated, one question for A or AAAA in class
IN; the question name decides (through CNAMEs), and every A and AAAA record of the answer
section is an address for it. Anything else, or an answer cut short by the copy, teaches
nothing: the address stays an address.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype

from cgpolicy.kernel.learn import DnsAnswer, IPAddress
from cgpolicy.policy.semantic import fqdn_problem

_ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)


@dataclass(frozen=True, order=True)
class Names:
    """The names DNS answers gave one address for: written as ``fqdns`` instead of it."""

    names: tuple[str, ...]
    address: str = field(compare=False, default="")  # for the comment

    def __str__(self) -> str:
        return ", ".join(self.names)


def _plain(address: IPAddress) -> IPAddress:
    """IPv4 for an IPv4-mapped IPv6 address: an A record explains both."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass
class NameBook:
    """Which names answers gave which addresses, when first, and from which server."""

    # address -> name -> (time of the first answer, server)
    given: dict[IPAddress, dict[str, tuple[int, IPAddress]]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    answers: int = 0
    refused: int = 0  # not an answer a rule could learn from (or cut short)
    used_servers: set[IPAddress] = field(default_factory=set)

    def add(self, answer: DnsAnswer) -> None:
        self.answers += 1
        parsed = _parse(answer.wire) if not answer.cut else None
        if parsed is None:
            self.refused += 1
            return
        name, addresses = parsed
        for address in addresses:
            known = self.given[address].get(name)
            if known is None or known[0] > answer.time_ns:
                self.given[address][name] = (answer.time_ns, answer.server)

    def explain(self, address: IPAddress, first_ns: int) -> Names | None:
        """The names that explained ``address`` by ``first_ns`` (when the workload first
        used it); None when none did (it stays an address)."""
        given = self.given.get(_plain(address), {})
        names = sorted(n for n, (when, _) in given.items() if when <= first_ns)
        if not names:
            return None
        self.used_servers.update(given[n][1] for n in names)
        return Names(tuple(names), str(address))

    @property
    def servers(self) -> set[IPAddress]:
        return {server for names in self.given.values() for _, server in names.values()}


def _parse(wire: bytes) -> tuple[str, list[IPAddress]] | None:
    try:
        message = dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError, UnicodeError):
        return None
    if not message.flags & dns.flags.QR or message.flags & dns.flags.TC:
        return None
    if message.opcode() != dns.opcode.QUERY or message.rcode() != dns.rcode.NOERROR:
        return None
    if len(message.question) != 1:
        return None
    question = message.question[0]
    if question.rdclass != dns.rdataclass.IN or question.rdtype not in _ADDRESS_TYPES:
        return None
    name = question.name.to_text(omit_final_dot=True).lower()
    if name.startswith("*") or fqdn_problem(name) is not None:
        return None
    addresses: list[IPAddress] = []
    for rrset in message.answer:
        if rrset.rdclass == dns.rdataclass.IN and rrset.rdtype in _ADDRESS_TYPES:
            addresses += [ipaddress.ip_address(rdata.address) for rdata in rrset]
    return (name, addresses) if addresses else None
