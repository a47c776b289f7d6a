"""The typed policy model: what every layer after validation works with.

Instances are built only by :mod:`cgpolicy.policy.build` from documents that passed the
JSON Schema and the semantic checks, so code that receives a :class:`Policy` can trust it.
Everything is frozen and hashable: a policy is a value, and rule order carries no meaning
(a matching ``deny`` wins, then a matching ``allow``, then the section's ``default``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Literal

from cgpolicy.policy.prefixes import IPNetwork, Prefixes

Action = Literal["allow", "deny"]
Mode = Literal["enforce", "audit"]
NO_PREFIXES = Prefixes()

NetworkProtocol = Literal["tcp", "udp", "icmp", "icmpv6", "any"]
SocketProtocol = Literal["tcp", "udp", "any"]
DeviceType = Literal["char", "block", "any"]
SysctlAccess = Literal["read", "write", "rw"]

# Socket families and types by name, with their Linux numbers (socket(2)).
SOCKET_FAMILIES: dict[str, int] = {
    "unix": 1,
    "inet": 2,
    "inet6": 10,
    "netlink": 16,
    "packet": 17,
    "vsock": 40,
}
SOCKET_TYPES: dict[str, int] = {"stream": 1, "dgram": 2, "raw": 3, "seqpacket": 5}
IP_PROTOCOLS: dict[str, int] = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58}


@dataclass(frozen=True, slots=True)
class SourceLocation:
    """Where something was written, for messages and for `cgpolicy explain`."""

    file: str
    line: int  # 1-based
    column: int  # 1-based


@dataclass(frozen=True, slots=True)
class PortRange:
    low: int
    high: int

    def __contains__(self, port: int) -> bool:
        return self.low <= port <= self.high

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


@dataclass(frozen=True, slots=True)
class Target:
    """A cgroup v2 path relative to the cgroup2 mount, literal or an fnmatch-style glob."""

    pattern: str
    is_glob: bool


@dataclass(frozen=True, slots=True)
class NetworkRule:
    """A cgroup_skb rule. Empty means "any"."""

    action: Action
    cidrs: Prefixes = NO_PREFIXES  # remote address (a tuple of networks is taken too)
    protocol: NetworkProtocol = "any"
    ports: tuple[PortRange, ...] = ()  # remote port on egress, local port on ingress
    icmp_types: tuple[int, ...] = ()  # only with icmp/icmpv6
    interfaces: tuple[str, ...] = ()  # names or globs, resolved to ifindexes at apply time
    # remote address by DNS name instead of cidrs: lowercase, no trailing dot, "*." in front
    # for a wildcard; matches an address only while a DNS answer for the name holds it
    fqdns: tuple[str, ...] = ()
    source: SourceLocation | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        _take_prefixes(self)


@dataclass(frozen=True, slots=True)
class NetworkSection:
    default: Action
    rules: tuple[NetworkRule, ...] = ()
    # egress only: refuse at connect/sendmsg what this section surely drops (docs/policy.md)
    fail_fast: bool = True


@dataclass(frozen=True, slots=True)
class Network:
    ingress: NetworkSection | None = None
    egress: NetworkSection | None = None


@dataclass(frozen=True, slots=True)
class SocketCreateRule:
    """A sock_create rule; None means "any". Numbers are the socket(2) arguments."""

    action: Action
    family: int | None = None
    type: int | None = None
    protocol: int | None = None
    source: SourceLocation | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class SocketAddressRule:
    """A bind or connect (and sendmsg) rule: local address on bind, remote on connect."""

    action: Action
    cidrs: Prefixes = NO_PREFIXES  # (a tuple of networks is taken too)
    protocol: SocketProtocol = "any"
    ports: tuple[PortRange, ...] = ()
    fqdns: tuple[str, ...] = ()  # connect only: as NetworkRule.fqdns
    source: SourceLocation | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        _take_prefixes(self)


def _take_prefixes(rule: NetworkRule | SocketAddressRule) -> None:
    """A rule made with a tuple of networks (tests, code that builds rules) holds them as
    Prefixes, as a rule built from a file does: one kind, compared by value."""
    if not isinstance(rule.cidrs, Prefixes):
        object.__setattr__(rule, "cidrs", Prefixes.of(rule.cidrs))


@dataclass(frozen=True, slots=True)
class SocketCreateSection:
    default: Action
    rules: tuple[SocketCreateRule, ...] = ()


@dataclass(frozen=True, slots=True)
class SocketAddressSection:
    default: Action
    rules: tuple[SocketAddressRule, ...] = ()


@dataclass(frozen=True, slots=True)
class Sockets:
    create: SocketCreateSection | None = None
    bind: SocketAddressSection | None = None
    connect: SocketAddressSection | None = None


@dataclass(frozen=True, slots=True)
class DeviceRule:
    """A cgroup_device rule, by numbers or by ``path``. None for major/minor means any ('*').

    A ``path:`` rule comes out of validation unresolved: ``type`` is None (and major/minor
    too), because what a path names depends on the node, and validation must give the same
    answer everywhere. The node that applies the policy resolves it
    (:func:`cgpolicy.compiler.compile.bind_device_paths`); an unresolved rule matches nothing.
    """

    action: Action
    type: DeviceType | None  # None: a path rule not resolved (yet, or not on this node)
    major: int | None
    minor: int | None
    access: str  # a non-empty subset of "rwm", in that order
    path: str | None = None
    source: SourceLocation | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class DeviceSection:
    default: Action
    rules: tuple[DeviceRule, ...] = ()


@dataclass(frozen=True, slots=True)
class SysctlRule:
    """A cgroup_sysctl rule. `name` is normalised to the slash form the kernel reports
    (``net/ipv4/ip_forward``); '*' matches any characters including '/'."""

    action: Action
    name: str
    access: SysctlAccess = "rw"
    source: SourceLocation | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class SysctlSection:
    default: Action
    rules: tuple[SysctlRule, ...] = ()


DEFAULT_MIN_TTL = 30  # seconds: an answer's TTL is raised to at least this
DEFAULT_MAX_TTL = 3600  # and cut to at most this
DEFAULT_MAX_LEARNED = 65536  # learned (cgroup, address) entries per policy at most


@dataclass(frozen=True, slots=True)
class DnsSettings:
    """How long an address learned from a DNS answer matches `fqdns` rules: the answer's
    TTL, raised to ``min_ttl`` and cut to ``max_ttl`` (seconds); how many learned addresses
    the policy keeps (a full map learns nothing more: it fails closed); and which DNS
    servers' answers teach."""

    min_ttl: int = DEFAULT_MIN_TTL
    max_ttl: int = DEFAULT_MAX_TTL
    max_learned: int = DEFAULT_MAX_LEARNED
    # the servers whose answers teach (queries to others are not noted); empty: any
    servers: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True, weakref_slot=True)
class Policy:
    name: str
    mode: Mode
    targets: tuple[Target, ...]
    network: Network | None = None
    sockets: Sockets | None = None
    devices: DeviceSection | None = None
    sysctl: SysctlSection | None = None
    dns: DnsSettings = DnsSettings()
    source: SourceLocation | None = field(default=None, compare=False)
    # how it was made from the file's previous reading, when only CIDR items were rewritten
    derived: Derivation | None = field(default=None, compare=False, repr=False)


AddressRule = NetworkRule | SocketAddressRule


@dataclass(frozen=True, slots=True)
class CidrEdit:
    """One rule of a policy whose CIDR items were rewritten in place in its file."""

    where: str  # the section: network.ingress, network.egress, sockets.bind, sockets.connect
    old: AddressRule
    new: AddressRule
    removed: tuple[IPNetwork, ...]  # the items' networks before (repeats kept)
    added: tuple[IPNetwork, ...]  # and after


class Derivation:
    """A policy that differs from ``base`` (a policy of the file's previous reading) only in
    the CIDR items of ``edits``, each rule in the same place (policy/splice.py). The
    compiler may then change ``base``'s compilation rather than start again. Not a
    dataclass: it is no part of the policy's value. ``base`` is held weakly, so that a
    chain of changes does not keep every reading alive."""

    __slots__ = ("_base", "edits")

    def __init__(self, base: Policy, edits: tuple[CidrEdit, ...]) -> None:
        self._base = weakref.ref(base)
        self.edits = edits

    def base(self) -> Policy | None:
        return self._base()
