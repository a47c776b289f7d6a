"""What a workload did, written as a policy a person reviews (`cgpolicy learn`).

Pure: observations in (:mod:`cgpolicy.kernel.learn`'s values), YAML text out. The text is
written here line by line rather than by a YAML library, because it carries comments
(counts, first and last seen, executables) and PyYAML writes none. Every string value is
written as a JSON string, which is a valid YAML double-quoted scalar, and every comment
passes through :func:`safe`, so nothing the workload chose (its executables' names, the
sysctl names it made exist) can end a comment or start a YAML node.

What is written (docs/learn.md):

- one rule per distinct thing, merged where the language lets a rule list several things
  without allowing more: addresses that share their ports (or ports that share their
  addresses) share a rule; a rule without ports for a protocol and address makes the
  rules with ports for them redundant; consecutive ports become a range;
- ``default: deny`` in every section that saw activity, and no section for a hook that
  saw none (that hook is left alone);
- return traffic (replies to connections the workload made, responses to connections
  made to it) by address without ports: the kernel classified each packet by its local
  port (bpf/learn.c), so ephemeral ports never appear;
- where the language cannot say exactly what was seen, the nearest rule that allows it
  with a comment saying so (a bind to port 0 needs a rule without ports; a protocol other
  than tcp, udp, icmp and icmpv6 needs ``protocol: any``), or, where no rule can (a
  sysctl name with characters a rule cannot hold), nothing, and a warning.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from cgpolicy.kernel.learn import (
    AddrKey,
    CreateKey,
    DeviceKey,
    IPAddress,
    NetKey,
    Observations,
    Seen,
    SysctlKey,
)
from cgpolicy.learn.names import NameBook, Names

MAX_RULES = 64  # per section (docs/policy.md, Limits)
MAX_PORT_ITEMS = 1024
MAX_CIDRS = 100_000
PLACEHOLDER_TARGET = "EDIT-ME/the-workload.service"

_PROTOCOL_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}
_FAMILY_NAMES = {2: "inet", 10: "inet6"}
_TYPE_NAMES = {1: "stream", 2: "dgram", 3: "raw", 5: "seqpacket"}
_SAFE = re.compile(r"[A-Za-z0-9 ._+:;/@=,()\[\]<>'~%*-]")
_RETURN_TRAFFIC = "with return traffic: its port is the peer's ephemeral one, so none is named"
_RESPONSES = "with responses sent from a server port: to the peer's ephemeral port, none named"
_SYSCTL_NAME = re.compile(r"[A-Za-z0-9_./-]+")  # the schema's, without '*' (a glob)


def safe(text: str, limit: int = 200) -> str:
    """``text`` for a one-line YAML comment: characters outside a small safe set (line
    breaks of every kind, '#', quotes, control and non-ASCII characters) as ``\\xNN`` /
    ``\\uNNNN``, cut to ``limit`` characters."""
    out = []
    for char in text[:limit]:
        if _SAFE.fullmatch(char):
            out.append(char)
        elif ord(char) < 0x100:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(f"\\u{ord(char):04x}")
    return "".join(out) + ("..." if len(text) > limit else "")


def quoted(text: str) -> str:
    """A YAML double-quoted scalar (JSON's string syntax is a subset of it)."""
    return json.dumps(text, ensure_ascii=True)


def _when(ns: int) -> str:
    moment = datetime.datetime.fromtimestamp(ns / 1e9, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _count(number: int, noun: str) -> str:
    plural = noun if number == 1 else noun + ("es" if noun.endswith("s") else "s")
    return f"{number:,} {plural}"


def describe_seen(seen: Seen, noun: str) -> str:
    """``12 packets, 2026-12-01T22:01:02Z..2026-12-01T22:05:07Z, by curl, python3``."""
    span = _when(seen.first_ns)
    if _when(seen.last_ns) != span:
        span += f"..{_when(seen.last_ns)}"
    text = f"{_count(seen.count, noun)}, {span}"
    if seen.comms:
        text += ", by " + ", ".join(seen.comms) + (" and others" if seen.more else "")
    return safe(text, 400)


def _total(seens: Iterable[Seen]) -> Seen:
    items = list(seens)
    out = items[0]
    for item in items[1:]:
        out = out.merged(item)
    return out


def address_text(address: IPAddress | ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    """A host as a bare address, a prefix as CIDR; IPv4-mapped IPv6 as ``::ffff:a.b.c.d``."""
    if isinstance(address, ipaddress.IPv4Network | ipaddress.IPv6Network):
        if address.num_addresses == 1:
            return address_text(address.network_address)
        return str(address)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return f"::ffff:{address.ipv4_mapped}"
    return str(address)


def port_items(ports: Iterable[int]) -> list[str]:
    """Sorted ports with consecutive runs as ranges: [80, "8000-8002"]."""
    out: list[str] = []
    ordered = sorted(set(ports))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else quoted(f"{ordered[i]}-{ordered[j]}"))
        i = j + 1
    return out


# --- rules -----------------------------------------------------------------------------------

Host = IPAddress | ipaddress.IPv4Network | ipaddress.IPv6Network | Names
Remote = IPAddress | Names  # what an address rule names: an address, or DNS names for one


@dataclass
class Rule:
    """One allow rule to write: its fields (already YAML text), the addresses it lists
    with what was seen of each, and comments."""

    fields: list[tuple[str, str]]  # (key, YAML value), in writing order; cidrs go after
    seen: Seen
    what: str  # "packets", "calls", "opens", "accesses"
    hosts: dict[Host, Seen] = field(default_factory=dict)
    after: list[tuple[str, str]] = field(default_factory=list)  # fields after cidrs
    notes: list[str] = field(default_factory=list)
    by_name: bool = False  # hosts are Names: written as fqdns

    def lines(self, indent: str) -> list[str]:
        out = [f"{indent}# {describe_seen(self.seen, self.what)}"]
        out += [f"{indent}# {safe(note, 400)}" for note in self.notes]
        body = [("action", "allow"), *self.fields]
        first = True
        for key, value in body:
            out.append(f"{indent}{'- ' if first else '  '}{key}: {value}")
            first = False
        if self.by_name:
            out.append(f"{indent}  fqdns:")
            written: set[str] = set()
            for host in sorted(self.hosts, key=_host_order):
                assert isinstance(host, Names)
                seen = self.hosts[host]
                for number, name in enumerate(n for n in host.names if n not in written):
                    written.add(name)
                    text = f"{indent}    - {quoted(name)}"
                    if number == 0:
                        what = describe_seen(seen, self.what)
                        text += f"  # {safe(host.address)}: {what}"
                    out.append(text)
        elif self.hosts:
            out.append(f"{indent}  cidrs:")
            for host in sorted(self.hosts, key=_host_order):
                seen = self.hosts[host]
                text = f"{indent}    - {quoted(address_text(host))}"  # type: ignore[arg-type]
                if len(self.hosts) > 1:
                    text += f"  # {describe_seen(seen, self.what)}"
                out.append(text)
        for key, value in self.after:
            out.append(f"{indent}  {key}: {value}")
        return out


def _host_order(host: Host) -> tuple[int, int, int, tuple[str, ...]]:
    if isinstance(host, Names):
        return (9, 0, 0, host.names)
    return _ip_order(host) + ((),)


def _ip_order(
    host: IPAddress | ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> tuple[int, int, int]:
    if isinstance(host, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return (host.version, int(host.network_address), host.prefixlen)
    return (host.version, int(host), 129)


@dataclass(frozen=True)
class Atom:
    """One thing an address rule can allow: a protocol to an address, with a port (or an
    ICMP type), or without (``detail`` None)."""

    protocol: str  # tcp, udp, icmp, icmpv6, any
    address: IPAddress | Names
    detail: int | None = None
    note: str = ""


def _merge_hosts(
    hosts: Mapping[IPAddress, Seen], merge: PrefixMerge | None
) -> tuple[dict[Host, Seen], list[str]]:
    if merge is None:
        return {host: seen for host, seen in hosts.items()}, []
    return merge.apply(hosts)


@dataclass(frozen=True)
class PrefixMerge:
    """--merge-prefixes: hosts become prefixes. Exactly (never allowing an address that was
    not seen): ipaddress.collapse_addresses of the hosts, so a prefix appears only when
    every address in it was seen. With ``min_hosts`` (--merge-min-hosts N) also, on
    purpose wider: every /24 (IPv4) or /64 (IPv6) holding at least N seen hosts of one rule
    becomes that prefix, marked in a comment."""

    min_hosts: int | None = None

    def apply(self, hosts: Mapping[IPAddress, Seen]) -> tuple[dict[Host, Seen], list[str]]:
        notes: list[str] = []
        out: dict[Host, Seen] = {}
        remaining: dict[IPAddress, Seen] = dict(hosts)
        if self.min_hosts:
            groups: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, list[IPAddress]] = (
                defaultdict(list)
            )
            for host in hosts:
                length = 24 if host.version == 4 else 64
                groups[ipaddress.ip_network(f"{host}/{length}", strict=False)].append(host)
            for prefix, members in sorted(groups.items(), key=lambda kv: _ip_order(kv[0])):
                if len(members) >= self.min_hosts and prefix.num_addresses > len(members):
                    out[prefix] = _total(remaining.pop(m) for m in members)
                    notes.append(
                        f"WIDENED by --merge-min-hosts: {prefix} from {len(members)} hosts seen"
                    )
        by_version: dict[int, list[IPAddress]] = defaultdict(list)
        for host in remaining:
            by_version[host.version].append(host)
        for same_version in by_version.values():
            collapsed: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = list(
                ipaddress.collapse_addresses(same_version)  # type: ignore[type-var,arg-type]
            )
            for block in collapsed:
                inside = [m for m in same_version if m in block]
                key: Host = block if block.num_addresses > 1 else block.network_address
                out[key] = _total(remaining[m] for m in inside)
        return out, notes


def address_rules(
    atoms: Mapping[Atom, Seen],
    what: str,
    merge: PrefixMerge | None,
    detail_key: Callable[[str], str],
    notes_for: Callable[[Atom], str] = lambda atom: atom.note,
) -> tuple[list[Rule], list[str]]:
    """The fewest exact rules for ``atoms`` (see the module docstring); warnings when the
    section would need more rules than the language allows, and so was widened."""
    portless: dict[tuple[str, Remote], Seen] = {}
    for atom, seen in atoms.items():
        if atom.detail is None:
            key = (atom.protocol, atom.address)
            portless[key] = portless[key].merged(seen) if key in portless else seen
    notes: dict[tuple[str, Remote], set[str]] = defaultdict(set)
    for atom in atoms:
        if notes_for(atom):
            notes[(atom.protocol, atom.address)].add(notes_for(atom))
    detailed: dict[tuple[str, Remote], dict[int, Seen]] = defaultdict(dict)
    for atom, seen in atoms.items():
        if atom.detail is None:
            continue
        covering = (atom.protocol, atom.address)
        if covering not in portless and ("any", atom.address) in portless:
            covering = ("any", atom.address)
        if covering in portless:  # a rule without ports allows it already
            portless[covering] = portless[covering].merged(seen)
            continue
        detailed[(atom.protocol, atom.address)][atom.detail] = seen

    rules: list[Rule] = []
    # Without ports: one rule per protocol, every address.
    by_protocol: dict[str, dict[Remote, Seen]] = defaultdict(dict)
    for (protocol, address), seen in portless.items():
        by_protocol[protocol][address] = seen
    for protocol, hosts in sorted(by_protocol.items()):
        fields = [] if protocol == "any" else [("protocol", protocol)]
        rule_notes = sorted({n for a in hosts for n in notes.get((protocol, a), ())})
        rules += _with_hosts(fields, [], hosts, what, merge, rule_notes)

    # With ports (or ICMP types): group addresses that share their set, or ports that share
    # their addresses, whichever needs fewer rules; both allow exactly what was seen.
    for protocol in sorted({p for p, _ in detailed}):
        mine = {a: d for (p, a), d in detailed.items() if p == protocol}
        by_set: dict[frozenset[int], dict[Remote, Seen]] = defaultdict(dict)
        for address, details in mine.items():
            by_set[frozenset(details)][address] = _total(details.values())
        by_hosts: dict[frozenset[Remote], set[int]] = defaultdict(set)
        port_hosts: dict[int, set[Remote]] = defaultdict(set)
        for address, details in mine.items():
            for detail in details:
                port_hosts[detail].add(address)
        for detail, hosts_of in port_hosts.items():
            by_hosts[frozenset(hosts_of)].add(detail)
        groups: list[tuple[frozenset[int], dict[Remote, Seen]]]
        if len(by_hosts) < len(by_set):
            groups = [
                (frozenset(details), {a: _total(mine[a][d] for d in details) for a in hosts})
                for hosts, details in by_hosts.items()
            ]
        else:
            groups = list(by_set.items())
        for shared, hosts in sorted(groups, key=lambda g: (sorted(g[0]), sorted(map(str, g[1])))):
            items = (
                port_items(shared)
                if protocol in ("tcp", "udp", "any")
                else [str(d) for d in sorted(shared)]
            )
            rule_notes = sorted({n for a in hosts for n in notes.get((protocol, a), ())})
            for start in range(0, len(items), MAX_PORT_ITEMS):
                chunk = items[start : start + MAX_PORT_ITEMS]
                after = [(detail_key(protocol), "[" + ", ".join(chunk) + "]")]
                fields = [("protocol", protocol)]
                rules += _with_hosts(fields, after, hosts, what, merge, rule_notes)

    warnings: list[str] = []
    if len(rules) > MAX_RULES:
        rules, warnings = _widened(atoms, what, detail_key)
    return rules, warnings


def _with_hosts(
    fields: list[tuple[str, str]],
    after: list[tuple[str, str]],
    hosts: Mapping[Remote, Seen],
    what: str,
    merge: PrefixMerge | None,
    notes: list[str],
) -> list[Rule]:
    named: dict[Host, Seen] = {h: seen for h, seen in hosts.items() if isinstance(h, Names)}
    addresses = {h: seen for h, seen in hosts.items() if not isinstance(h, Names)}
    out = []
    if named:  # a rule names hosts by cidrs or by fqdns, not both
        total = _total(named.values())
        out.append(Rule(list(fields), total, what, named, list(after), notes, True))
    if not addresses:
        return out
    merged, merge_notes = _merge_hosts(addresses, merge)
    ordered = sorted(merged, key=_host_order)
    for start in range(0, len(ordered), MAX_CIDRS):
        chunk = {h: merged[h] for h in ordered[start : start + MAX_CIDRS]}
        rule_notes = notes + merge_notes
        out.append(Rule(list(fields), _total(chunk.values()), what, chunk, list(after), rule_notes))
    return out


def _widened(
    atoms: Mapping[Atom, Seen], what: str, detail_key: Callable[[str], str]
) -> tuple[list[Rule], list[str]]:
    """More than MAX_RULES exact rules: one rule per protocol, every address, and either no
    ports (when some of its traffic needs none) or every port seen. Allows more than was
    seen; said in the rule and in a warning."""
    by_protocol: dict[str, dict[Remote, Seen]] = defaultdict(dict)
    details: dict[str, set[int]] = defaultdict(set)
    portless: set[str] = set()
    for atom, seen in atoms.items():
        hosts = by_protocol[atom.protocol]
        hosts[atom.address] = hosts[atom.address].merged(seen) if atom.address in hosts else seen
        if atom.detail is None:
            portless.add(atom.protocol)
        else:
            details[atom.protocol].add(atom.detail)
    note = (
        f"WIDENED: the exact rules would be more than {MAX_RULES}; this rule allows every "
        "listed address with every listed port"
    )
    rules = []
    for protocol, hosts in sorted(by_protocol.items()):
        fields = [] if protocol == "any" else [("protocol", protocol)]
        after = []
        if protocol not in portless and details[protocol]:
            items = (
                port_items(details[protocol])
                if protocol in ("tcp", "udp")
                else [str(d) for d in sorted(details[protocol])]
            )
            if len(items) <= MAX_PORT_ITEMS:
                after = [(detail_key(protocol), "[" + ", ".join(items) + "]")]
        rules += _with_hosts(fields, after, hosts, what, None, [note])
    return rules, [f"{what}: {note}"]


def _port_or_type(protocol: str) -> str:
    return "icmpTypes" if protocol in ("icmp", "icmpv6") else "ports"


# --- sections --------------------------------------------------------------------------------


@dataclass
class Section:
    """One section to write: where it goes, a heading comment, its rules."""

    path: tuple[str, ...]  # ("network", "egress")
    heading: str
    rules: list[Rule]


def network_atoms(observations: Mapping[NetKey, Seen], direction: str) -> dict[Atom, Seen]:
    atoms: dict[Atom, Seen] = {}
    for key, seen in observations.items():
        if key.direction != direction:
            continue
        name = _PROTOCOL_NAMES.get(key.protocol)
        if key.kind == "port" and name in ("tcp", "udp"):
            atom = Atom(name, key.address, key.port)
        elif key.kind == "icmp" and name in ("icmp", "icmpv6"):
            atom = Atom(name, key.address, key.icmp_type)
        elif key.kind == "reply" and name is not None:
            atom = Atom(name, key.address, None, _RETURN_TRAFFIC)
        elif key.kind == "unknown":
            atom = Atom("any", key.address, None, "protocol unknown (IPv6 extension headers): any")
        elif name is not None:  # a later fragment: no port or type to name
            atom = Atom(name, key.address)
        else:
            atom = Atom(
                "any",
                key.address,
                None,
                f"IP protocol {key.protocol}: rules name only tcp, udp, icmp, icmpv6 or any",
            )
        atoms[atom] = atoms[atom].merged(seen) if atom in atoms else seen
    return atoms


def address_atoms(observations: Mapping[AddrKey, Seen], bind: bool) -> dict[Atom, Seen]:
    atoms: dict[Atom, Seen] = {}
    for key, seen in observations.items():
        if (key.op == "bind") != bind:
            continue
        name = _PROTOCOL_NAMES.get(key.protocol)
        if key.op == "response":  # from a server port, to the peer's ephemeral port
            atom = Atom(name or "any", key.address, None, _RESPONSES)
        elif name in ("tcp", "udp") and key.port:
            atom = Atom(name, key.address, key.port)
        elif name in ("tcp", "udp"):
            note = (
                "port 0 (the kernel picks one): only a rule without ports allows it"
                if bind
                else "port 0: only a rule without ports allows it"
            )
            atom = Atom(name, key.address, None, note)
        else:
            atom = Atom(
                "any",
                key.address,
                None,
                f"a {name or f'protocol {key.protocol}'} socket: only a rule without protocol "
                "and ports allows it",
            )
        atoms[atom] = atoms[atom].merged(seen) if atom in atoms else seen
    return atoms


def create_rules(observations: Mapping[CreateKey, Seen]) -> list[Rule]:
    rules: dict[tuple[str, str, str], tuple[Seen, list[str]]] = {}
    for key, seen in sorted(observations.items()):
        notes = []
        family = _FAMILY_NAMES.get(key.family, "any")
        kind = _TYPE_NAMES.get(key.type)
        if kind is None:
            kind = "any"
            notes.append(f"socket type {key.type}: rules name only stream, dgram, raw, seqpacket")
        protocol = _PROTOCOL_NAMES.get(key.protocol, str(key.protocol))
        fields = (family, kind, protocol)
        if fields in rules:
            old, old_notes = rules[fields]
            rules[fields] = (old.merged(seen), old_notes + notes)
        else:
            rules[fields] = (seen, notes)
    return [
        Rule(
            [("family", f), ("type", t), ("protocol", p)],
            seen,
            "socket",
            notes=notes,
        )
        for (f, t, p), (seen, notes) in rules.items()
    ]


def device_rules(
    observations: Mapping[DeviceKey, Seen], nodes: Mapping[tuple[str, int, int], str]
) -> list[Rule]:
    """One rule per device: the union of the rights asked for (an allow rule grants every
    subset of its rights), by ``path`` when a node for it is under /dev, else by number."""
    by_device: dict[tuple[str, int, int], tuple[set[str], Seen]] = {}
    for key, seen in observations.items():
        device: tuple[str, int, int] = (key.type, key.major, key.minor)
        rights, old = by_device.get(device, (set(), None))
        by_device[device] = (rights | set(key.access), old.merged(seen) if old else seen)
    rules = []
    for device, (rights, seen) in sorted(by_device.items()):
        access = "".join(r for r in "rwm" if r in rights)
        path = nodes.get(device)
        kind, major, minor = device
        number = f"{kind[0]} {major}:{minor}"
        if path is not None:
            fields = [("path", quoted(path)), ("access", access)]
            notes = [f"{number}"]
        else:
            fields = [
                ("type", kind),
                ("major", str(major)),
                ("minor", str(minor)),
                ("access", access),
            ]
            notes = ["no node for it under /dev"]
        rules.append(Rule(fields, seen, "access", notes=notes))
    return rules


def sysctl_name(name: str) -> str | None:
    """The name as a rule writes it (dotted when no component has a dot, else slash
    form); None when a rule cannot name it exactly (a character a rule cannot hold, or a
    '*', which a rule reads as a glob)."""
    if not _SYSCTL_NAME.fullmatch(name) or len(name) > 255:
        return None
    parts = name.split("/")
    if any(not part or "." in part for part in parts):
        return name
    return ".".join(parts)


def sysctl_rules(observations: Mapping[SysctlKey, Seen]) -> tuple[list[Rule], list[str]]:
    by_name: dict[str, tuple[set[str], Seen]] = {}
    warnings = []
    for key, seen in sorted(observations.items()):
        written = None if key.truncated else sysctl_name(key.name)
        if written is None:
            reason = "longer than the kernel's buffer" if key.truncated else "not expressible"
            warnings.append(
                f"sysctl {key.name} ({'write' if key.write else 'read'}, "
                f"{_count(seen.count, 'access')}): {reason} as a rule; not allowed"
            )
            continue
        access, old = by_name.get(written, (set(), None))
        by_name[written] = (
            access | {"write" if key.write else "read"},
            old.merged(seen) if old else seen,
        )
    rules = []
    for written, (access, seen) in sorted(by_name.items()):
        mode = "rw" if len(access) == 2 else next(iter(access))
        rules.append(Rule([("name", quoted(written)), ("access", mode)], seen, "access"))
    return rules, warnings


@dataclass
class Learned:
    """A policy written from observations, and what the writer wants a person to know."""

    text: str
    warnings: list[str]


@dataclass(frozen=True)
class Source:
    """What was observed, for the header: a command (with its exit status) or a cgroup."""

    command: Sequence[str] | None = None
    status: int | None = None
    cgroup: str | None = None


def by_name(atoms: Mapping[Atom, Seen], book: NameBook | None) -> dict[Atom, Seen]:
    """``atoms`` with each address a DNS answer gave the workload before it used it
    replaced by the names (the DNS servers' own addresses stay addresses)."""
    if book is None:
        return dict(atoms)
    servers = book.servers
    out: dict[Atom, Seen] = {}
    for atom, seen in atoms.items():
        new = atom
        if not isinstance(atom.address, Names) and atom.address not in servers:
            names = book.explain(atom.address, seen.first_ns)
            if names is not None:
                new = dataclasses.replace(atom, address=names)
        out[new] = out[new].merged(seen) if new in out else seen
    return out


def connect_as_egress(key: AddrKey) -> NetKey | None:
    """The egress packet a TCP/UDP connect() or sendmsg() stands for: network.egress
    checks these calls themselves and refuses at once what it would drop (docs/policy.md
    "Denials that fail fast"), so an egress allow-list must allow every destination
    connected to, also a UDP connect() after which nothing was sent."""
    if key.op not in ("connect", "sendmsg") or key.protocol not in (6, 17) or not key.port:
        return None
    address = key.address
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # the packets are IPv4
    if address.is_unspecified:
        return None  # connected to a local address; never checked at connect
    return NetKey("egress", address, key.protocol, "port", key.port)


def with_connects_as_egress(observations: Observations) -> Observations:
    """``observations`` with every TCP/UDP connect and sendmsg destination also an egress
    packet, when egress saw activity (a section is written for it); none otherwise."""
    if not any(key.direction == "egress" for key in observations.network):
        return observations
    network = dict(observations.network)
    for key, seen in observations.addresses.items():
        packet = connect_as_egress(key)
        if packet is not None:
            network[packet] = network[packet].merged(seen) if packet in network else seen
    return dataclasses.replace(observations, network=network)


def _sections(
    observations: Observations,
    nodes: Mapping[tuple[str, int, int], str],
    merge: PrefixMerge | None,
    book: NameBook | None,
) -> tuple[list[Section], list[str]]:
    sections: list[Section] = []
    warnings: list[str] = []
    for direction, verb in (("egress", "sent"), ("ingress", "received")):
        atoms = by_name(network_atoms(observations.network, direction), book)
        if atoms:
            rules, widened = address_rules(atoms, "packet", merge, _port_or_type)
            warnings += [f"network.{direction}: {w}" for w in widened]
            port = "remote port" if direction == "egress" else "local port"
            heading = f"packets {verb} (by remote address and {port}; return traffic: no port)"
            sections.append(Section(("network", direction), heading, rules))
    if observations.create:
        sections.append(
            Section(("sockets", "create"), "socket() calls", create_rules(observations.create))
        )
    for name, bind in (("bind", True), ("connect", False)):
        atoms = address_atoms(observations.addresses, bind)
        if not bind:
            atoms = by_name(atoms, book)
        if atoms:
            rules, widened = address_rules(atoms, "call", merge, _port_or_type)
            warnings += [f"sockets.{name}: {w}" for w in widened]
            heading = (
                "bind() calls: local address and port"
                if bind
                else "connect() and sendmsg() calls: remote address and port"
            )
            sections.append(Section(("sockets", name), heading, rules))
    if observations.devices:
        rules = device_rules(observations.devices, nodes)
        sections.append(Section(("devices",), "device node opens and mknods", rules))
    if observations.sysctls:
        rules, sysctl_warnings = sysctl_rules(observations.sysctls)
        warnings += sysctl_warnings
        sections.append(Section(("sysctl",), "reads and writes under /proc/sys", rules))
    return sections, warnings


def write_policy(
    observations: Observations,
    name: str,
    source: Source,
    nodes: Mapping[tuple[str, int, int], str] | None = None,
    merge: PrefixMerge | None = None,
    heading: Sequence[str] = (),
    defaults: Mapping[tuple[str, ...], str] | None = None,
    book: NameBook | None = None,
) -> Learned:
    """The policy text for ``observations`` (see the module docstring). ``defaults``:
    each section's default by its path when not deny (--against: the policy's own);
    ``book``: the DNS answers the workload read, for names instead of addresses."""
    sections, warnings = _sections(observations, nodes or {}, merge, book)
    servers = sorted(book.used_servers, key=_ip_order) if book else []
    text = _render(observations, name, source, sections, warnings, heading, defaults or {}, servers)
    return Learned(text, warnings)


def lost_warning(observations: Observations) -> str | None:
    """A loud line when a full map kept the kernel from recording some actions."""
    lost = {hook: n for hook, n in observations.lost.items() if n}
    if not lost:
        return None
    detail = ", ".join(f"{hook} {n:,}" for hook, n in sorted(lost.items()))
    return (
        f"INCOMPLETE: {sum(lost.values()):,} actions were not recorded because a map was full "
        f"({detail}); the policy does not allow them"
    )


def _render(
    observations: Observations,
    name: str,
    source: Source,
    sections: list[Section],
    warnings: list[str],
    heading: Sequence[str],
    defaults: Mapping[tuple[str, ...], str],
    servers: Sequence[IPAddress],
) -> str:
    total = sum(n for hook, n in observations.seen.items() if hook != "dns")
    lines = []
    if source.command is not None:
        what = "the command: " + " ".join(source.command)
        if source.status is not None:
            what += f" (exit status {source.status})"
    else:
        what = f"the cgroup {source.cgroup}"
    lines.append(f"# Learned by `cgpolicy learn` from {safe(what, 300)}")
    lines.append(
        f"# Observed {_when(observations.started_ns)}..{_when(observations.ended_ns)}: "
        f"{_count(total, 'action')}."
    )
    lost = lost_warning(observations)
    lines.append(f"# {lost}" if lost else "# Every action was recorded (no map was full).")
    lines.extend(f"# {safe(line, 400)}" for line in heading)
    lines += [
        "# It allows exactly what was seen, with default deny in each section that saw",
        "# activity; a hook that saw nothing has no section (it is left alone). Review it;",
        "# try it with `cgpolicy run FILE -- CMD` or `mode: audit` first (docs/learn.md).",
    ]
    lines.extend(f"# WARNING: {safe(w, 400)}" for w in warnings)
    lines += [
        "apiVersion: cgpolicy.dev/v1",
        "kind: CgroupPolicy",
        "metadata:",
        f"  name: {quoted(name)}",
        "spec:",
        "  mode: enforce",
        "  targets:",
    ]
    if source.cgroup is not None:
        lines.append(f"    - path: {quoted(source.cgroup)}")
    else:
        lines.append("    # EDIT: the cgroup the workload runs in (`cgpolicy run` replaces it)")
        lines.append(f"    - path: {quoted(PLACEHOLDER_TARGET)}")
    if servers:
        lines.append("  dns:")
        lines.append("    # the DNS servers whose answers taught the names of the fqdns rules")
        listed = ", ".join(quoted(address_text(server)) for server in servers)
        lines.append(f"    servers: [{listed}]")
    written: list[str] = []
    for section in sections:
        for depth, part in enumerate(section.path):
            if section.path[: depth + 1] != tuple(written[: depth + 1]):
                lines.append(f"  {'  ' * depth}{part}:")
        written = list(section.path)
        indent = "  " * (len(section.path) + 1)
        if section.rules:
            total = _total(r.seen for r in section.rules).count
            counted = _count(total, section.rules[0].what)
        else:
            counted = "nothing a rule can name"
        lines.append(f"{indent}# {safe(section.heading, 300)}: {counted}")
        lines.append(f"{indent}default: {defaults.get(section.path, 'deny')}")
        if section.rules:
            lines.append(f"{indent}rules:")
            for rule in section.rules:
                lines += rule.lines(indent + "  ")
    return "\n".join(lines) + "\n"
