"""The policy semantics as plain Python: a reference evaluator, and the spec it implements.

Given a validated :class:`~cgpolicy.policy.model.Policy` and one action (a packet, a
``socket()``, a ``bind``/``connect``/``sendmsg``, a device access, a sysctl read or write),
:func:`evaluate` says what the policy decides and which rule decided it. It is written to be
read: every rule is checked one by one, with no masks, tries or DFAs, so that it can serve as
the oracle the compiled BPF programs are tested against (tests/kernel/test_differential.py)
and as the engine of ``cgpolicy explain``. Nothing here touches the kernel.

How a section decides (docs/policy.md, "How rules decide"):

1. if any ``deny`` rule matches, the action is denied;
2. otherwise, if any ``allow`` rule matches, it is allowed;
3. otherwise the section's ``default`` applies.

A rule matches when every condition it states holds (conditions AND; the members of a list
OR); a condition it leaves out holds for everything.

**Unknown fields.** Some actions do not show every field a rule may test: a non-first IP
fragment has no ports and no ICMP type, an IPv6 packet with too many extension headers has
no known protocol, a packet sent with no device has no interface, a ``connect`` of an ICMP
socket has no TCP/UDP port, a sysctl name too long for the program's buffer cannot be
read. The programs treat a condition on an unknown field as *holding for deny rules and not
holding for allow rules* (bpf/net.c, bpf/sysctl.c): such an action can never slip past a
deny rule by hiding a field, and is never let in by an allow rule it might not satisfy. Here
that is a three-valued condition: :data:`UNKNOWN`, which counts as true for a deny rule and
false for an allow rule. In the action types below, ``None`` means "unknown".

**Which rule is named.** When several rules of the deciding action match, the one named is
the first in the compiler's canonical rule order (:func:`cgpolicy.compiler.canonical.ordered_rules`,
a pure function), because that is the rule the programs count the decision against and name
in deny events; every matching rule is listed in :attr:`Verdict.matching`.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from cgpolicy.compiler.canonical import ordered_rules
from cgpolicy.policy.model import (
    IP_PROTOCOLS,
    SOCKET_FAMILIES,
    DeviceRule,
    IPNetwork,
    NetworkRule,
    Policy,
    PortRange,
    SocketAddressRule,
    SocketCreateRule,
    SysctlRule,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Rule = NetworkRule | SocketCreateRule | SocketAddressRule | DeviceRule | SysctlRule

TCP, UDP, ICMP, ICMPV6 = IP_PROTOCOLS["tcp"], IP_PROTOCOLS["udp"], 1, 58
# sockets.create sees only these families: the kernel runs the hook from inet_create() and
# inet6_create() alone.
INET_FAMILIES = (SOCKET_FAMILIES["inet"], SOCKET_FAMILIES["inet6"])
# bpf/sysctl.c reads the name into a 256-byte buffer: longer names cannot be read.
SYSCTL_NAME_MAX = 255


class _Unknown:
    """The third truth value: the action does not show the field a condition tests."""

    _instance: _Unknown | None = None

    def __new__(cls) -> _Unknown:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNKNOWN"

    def __bool__(self) -> bool:
        raise TypeError("UNKNOWN has no truth value: use rule_matches()")


UNKNOWN = _Unknown()
Truth = bool | _Unknown


# --- actions ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Packet:
    """A packet seen by network.egress (sent) or network.ingress (received).

    ``remote`` is the other end: the destination on egress, the source on ingress.
    ``port`` is the destination port: the remote port on egress, the local port on ingress.
    ``None`` means the program cannot see the field (see the module docstring):
    ``remote`` None for a packet that is not IPv4/IPv6, ``protocol`` None when the IPv6
    extension headers could not be walked, ``port``/``icmp_type`` None for a non-first
    fragment or a truncated header, ``interface`` None for a packet with no device.
    ``port`` is ignored unless the protocol is TCP or UDP, ``icmp_type`` unless it is ICMP
    or ICMPv6 (those packets have no such field, which is not the same as unknown)."""

    direction: Literal["egress", "ingress"]
    remote: IPAddress | None
    protocol: int | None
    port: int | None = None
    icmp_type: int | None = None
    interface: str | None = None
    # The names whose DNS answers, having reached the cgroup, hold ``remote`` now: what
    # `fqdns` rules match (lowercase, no trailing dot). None known: no `fqdns` rule matches.
    names: frozenset[str] = frozenset()
    # Or what the kernel holds instead of names (explain --cgroup): the section's `fqdns`
    # rules that the cgroup's learned entry for ``remote`` matches. Given, it decides them.
    learned: frozenset[Rule] | None = None


@dataclass(frozen=True, slots=True)
class SocketCreate:
    """``socket(family, type, protocol)`` as sockets.create sees it: ``type`` without
    SOCK_NONBLOCK/SOCK_CLOEXEC and ``protocol`` as the kernel chose it (6 for an inet stream
    socket opened with protocol 0, 17 for a datagram one)."""

    family: int
    type: int
    protocol: int


@dataclass(frozen=True, slots=True)
class SocketAddress:
    """``bind`` (sockets.bind: the local address and port asked for) or ``connect`` /
    unconnected-UDP ``sendmsg`` (sockets.connect: the remote address and port), with the
    socket's protocol. An IPv6 socket's IPv4-mapped address (``::ffff:a.b.c.d``) is an
    IPv6Address here, as the IPv6 hooks see it."""

    operation: Literal["bind", "connect", "sendmsg"]
    address: IPAddress
    port: int
    protocol: int
    names: frozenset[str] = frozenset()  # as Packet.names
    learned: frozenset[Rule] | None = None  # as Packet.learned


@dataclass(frozen=True, slots=True)
class DeviceAccess:
    """An open() or mknod() of a device node: the rights asked for, a subset of "rwm"."""

    type: Literal["char", "block"]
    major: int
    minor: int
    access: str


@dataclass(frozen=True, slots=True)
class SysctlAccess:
    """A read or write of ``/proc/sys/<name>``, ``name`` in slash form (net/ipv4/ip_forward)."""

    name: str
    write: bool


Action = Packet | SocketCreate | SocketAddress | DeviceAccess | SysctlAccess


def socket_address_views(
    operation: Literal["bind", "connect", "sendmsg"],
    address: IPAddress,
    port: int,
    protocol: int,
) -> list[SocketAddress]:
    """What the sock_addr hooks see of one system call on a socket of the address's family
    (an IPv4-mapped address means a dual-stack AF_INET6 socket). All must allow.

    The kernel hands UDP traffic of an AF_INET6 socket to an IPv4-mapped peer to the IPv4
    UDP code with the plain IPv4 address: an unconnected ``sendto(::ffff:a.b.c.d)`` runs
    only the sendmsg4 program, with a.b.c.d; a UDP ``connect(::ffff:a.b.c.d)`` runs the
    connect6 program with the mapped address, and then *every* send on that socket runs the
    sendmsg4 program with a.b.c.d. Rules written in the mapped form (``::ffff:a.b.c.d/128``)
    therefore do not meet UDP sends; the IPv4 form does. TCP and bind see the address as
    given."""
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    if mapped is None or protocol != UDP or operation == "bind":
        return [SocketAddress(operation, address, port, protocol)]
    sends = SocketAddress("sendmsg", mapped, port, protocol)
    if operation == "sendmsg":
        return [sends]
    return [SocketAddress(operation, address, port, protocol), sends]


# --- verdicts ---------------------------------------------------------------------------------

Decider = Literal["rule", "default", "no-section", "not-checked"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one policy decides about one action.

    ``decided_by`` says how: ``rule`` (``rule`` is the model's rule, with its source
    location), ``default`` (no rule matched), ``no-section`` (the policy has no section for
    this hook, so it leaves the action alone) or ``not-checked`` (the hook never runs for
    this action, e.g. ``socket(AF_UNIX, ...)``). ``allowed`` is the policy's verdict;
    ``effective`` is what happens: in audit mode a denial is reported but let through."""

    section: str
    allowed: bool
    effective: bool
    audit: bool
    decided_by: Decider
    rule: Rule | None = None
    matching: tuple[Rule, ...] = ()  # every matching rule, deciding action first
    reason: str = ""  # for no-section / not-checked: why

    @property
    def verdict(self) -> str:
        return "allow" if self.allowed else "deny"


def section_name(action: Action) -> str:
    """The policy section that decides ``action``."""
    if isinstance(action, Packet):
        return f"network.{action.direction}"
    if isinstance(action, SocketCreate):
        return "sockets.create"
    if isinstance(action, SocketAddress):
        return "sockets.bind" if action.operation == "bind" else "sockets.connect"
    if isinstance(action, DeviceAccess):
        return "devices"
    return "sysctl"


def policy_section(policy: Policy, action: Action) -> Any:
    """The policy's section that decides ``action``; None when it has none."""
    return section_of(policy, section_name(action))


def section_of(policy: Policy, name: str) -> Any:
    """The policy's section called ``name`` (``network.egress``, ``devices``...), or None.
    A verdict's section is not always the action's (``policy_section``): network.egress
    decides a connect it refuses at connect time (``egress_at_connect``)."""
    group, _, part = name.partition(".")
    if group == "network":
        return getattr(policy.network, part) if policy.network else None
    if group == "sockets":
        return getattr(policy.sockets, part) if policy.sockets else None
    return getattr(policy, name)


def evaluate(policy: Policy, action: Action) -> Verdict:
    """What ``policy`` decides about ``action``, and why."""
    name = section_name(action)
    audit = policy.mode == "audit"
    if isinstance(action, SocketCreate) and action.family not in INET_FAMILIES:
        reason = "the kernel runs sockets.create only for inet and inet6 sockets"
        return Verdict(name, True, True, audit, "not-checked", reason=reason)
    section = policy_section(policy, action)
    if section is None:
        reason = f"the policy has no {name} section: it leaves this hook alone"
        return Verdict(name, True, True, audit, "no-section", reason=reason)

    conditions = _CONDITIONS[type(action)]
    denying: list[Rule] = []
    allowing: list[Rule] = []
    for rule in _canonical_order(section.rules):
        if rule_matches(rule, conditions(rule, action)):
            (denying if rule.action == "deny" else allowing).append(rule)

    decider: Decider
    deciding: Rule | None
    if denying:
        allowed, decider, deciding = False, "rule", denying[0]
    elif allowing:
        allowed, decider, deciding = True, "rule", allowing[0]
    else:
        allowed, decider, deciding = section.default == "allow", "default", None
    return Verdict(
        name,
        allowed,
        allowed or audit,
        audit,
        decider,
        deciding,
        tuple(denying + allowing) if not allowed else tuple(allowing + denying),
    )


def egress_at_connect(policy: Policy, action: SocketAddress) -> Verdict | None:
    """network.egress at a TCP/UDP ``connect`` or unconnected UDP ``sendmsg`` (bpf/net.c
    cgp_egress_at_connect, docs/policy.md "Denials that fail fast"): a denial (EPERM at
    once) when every packet the call would send is certain to be dropped by the section,
    whatever interface it leaves by; None when the call goes on and the egress program
    decides each packet.

    The packets go to ``action.address`` (an IPv4-mapped one sends IPv4 packets, so it is
    looked up as the IPv4 address) and port, with the socket's protocol. Certain: a
    matching deny rule without interfaces (the first in canonical order is named), or no
    allow rule that could match, its interfaces counted as matching, and a deny default.
    Never in audit mode, with ``failFast: false``, for the any address (the kernel
    connects it to a local one) or for other protocols than TCP and UDP."""
    section = policy.network.egress if policy.network else None
    if (
        section is None
        or not section.fail_fast
        or policy.mode == "audit"
        or action.operation == "bind"
        or action.protocol not in (TCP, UDP)
    ):
        return None
    remote: IPAddress = action.address
    if isinstance(remote, ipaddress.IPv6Address) and remote.ipv4_mapped is not None:
        remote = remote.ipv4_mapped
    if remote.is_unspecified:
        return None
    packet = Packet(
        "egress", remote, action.protocol, action.port, names=action.names, learned=action.learned
    )
    denying: list[Rule] = []
    allowing: list[Rule] = []
    rules: Sequence[NetworkRule] = _canonical_order(section.rules)  # type: ignore[assignment]
    for rule in rules:
        # every condition but the interface; none of them is unknown here
        if all(c is True for c in _network_conditions(rule, packet)[:4]):
            if rule.action == "allow":
                allowing.append(rule)
            elif not rule.interfaces:
                denying.append(rule)
    name = "network.egress"
    if denying:
        return Verdict(name, False, False, False, "rule", denying[0], tuple(denying))
    if not allowing and section.default == "deny":
        return Verdict(name, False, False, False, "default")
    return None


_order_cache: dict[int, tuple[tuple[Rule, ...], tuple[Rule, ...]]] = {}


def _canonical_order(rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    """ordered_rules(rules), remembered by identity (not equality: equal rules from two
    files differ in their source locations, which explain shows)."""
    cached = _order_cache.get(id(rules))
    if cached is None or cached[0] is not rules:
        if len(_order_cache) > 256:
            _order_cache.clear()
        cached = _order_cache[id(rules)] = (rules, ordered_rules(rules))
    return cached[1]


def rule_matches(rule: Rule, conditions: Sequence[Truth]) -> bool:
    """A rule matches when all its conditions hold; an unknown one holds for a deny rule
    and not for an allow rule."""
    if rule.action == "deny":
        return all(c is UNKNOWN or c is True for c in conditions)
    return all(c is True for c in conditions)


# --- conditions -------------------------------------------------------------------------------


def address_in(address: IPAddress | None, cidrs: Sequence[IPNetwork]) -> Truth:
    """Is the address in one of the CIDRs (no CIDRs: any address)? An IPv4-mapped IPv6
    address (``::ffff:a.b.c.d``) is also the IPv4 address a.b.c.d, so IPv4 CIDRs apply to it
    as well as IPv6 ones; a plain IPv4 address meets IPv4 CIDRs only."""
    if not cidrs:
        return True
    if address is None:
        return UNKNOWN
    candidates: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        candidates.append(address.ipv4_mapped)
    return any(a in net for a in candidates for net in cidrs if a.version == net.version)


def name_in(names: frozenset[str], fqdns: Sequence[str]) -> bool:
    """Does a name DNS gave for the address match one of the rule's: the same name, or for
    ``*.domain`` a name with one or more labels in front of the domain."""
    for pattern in fqdns:
        if pattern.startswith("*."):
            suffix = pattern[1:]  # ".domain"
            if any(name.endswith(suffix) and len(name) > len(suffix) for name in names):
                return True
        elif pattern in names:
            return True
    return False


def remote_address(action: Action) -> IPAddress | None:
    """The remote address an `fqdns` rule would be matched against; None for an action of
    a section without such rules (bind, socket(), devices, sysctl)."""
    if isinstance(action, Packet):
        return action.remote
    if isinstance(action, SocketAddress) and action.operation != "bind":
        return action.address
    return None


def remote_in(
    address: IPAddress | None,
    rule: NetworkRule | SocketAddressRule,
    names: frozenset[str],
    learned: frozenset[Rule] | None = None,
) -> Truth:
    """The rule's remote-host condition: by its names when it has `fqdns` (or by what the
    kernel learned, when ``learned`` is given), else by CIDRs."""
    if rule.fqdns:
        return rule in learned if learned is not None else name_in(names, rule.fqdns)
    return address_in(address, rule.cidrs)


def port_in(port: int | None, ports: Sequence[PortRange]) -> Truth:
    if not ports:
        return True
    if port is None:
        return UNKNOWN
    return any(port in r for r in ports)


def _network_conditions(rule: NetworkRule, packet: Packet) -> list[Truth]:
    protocol = packet.protocol
    # Protocols by number: "icmp" is protocol 1 and "icmpv6" 58, whichever IP version
    # carries them.
    if rule.protocol == "any":
        protocol_ok: Truth = True
    elif protocol is None:
        protocol_ok = UNKNOWN
    else:
        protocol_ok = protocol == IP_PROTOCOLS[rule.protocol]

    # The destination port exists only in TCP and UDP, the type only in ICMP/ICMPv6;
    # other packets do not satisfy a rule that lists them.
    if not rule.ports:
        port_ok: Truth = True
    elif protocol is None:
        port_ok = UNKNOWN
    elif protocol in (TCP, UDP):
        port_ok = port_in(packet.port, rule.ports)
    else:
        port_ok = False

    if not rule.icmp_types:
        icmp_ok: Truth = True
    elif protocol is None:
        icmp_ok = UNKNOWN
    elif protocol in (ICMP, ICMPV6):
        icmp_ok = UNKNOWN if packet.icmp_type is None else packet.icmp_type in rule.icmp_types
    else:
        icmp_ok = False

    # Interface names and globs (fnmatch, case-sensitive), as resolved to ifindexes.
    if not rule.interfaces:
        interface_ok: Truth = True
    elif packet.interface is None:
        interface_ok = UNKNOWN
    else:
        interface_ok = any(fnmatch.fnmatchcase(packet.interface, p) for p in rule.interfaces)

    remote_ok = remote_in(packet.remote, rule, packet.names, packet.learned)
    return [remote_ok, protocol_ok, port_ok, icmp_ok, interface_ok]


def _address_conditions(rule: SocketAddressRule, action: SocketAddress) -> list[Truth]:
    # Socket rules name tcp, udp or any (= TCP and UDP). A socket of another protocol (an
    # ICMP ping socket's connect) has no TCP/UDP protocol or port to compare: unknown.
    is_tcp_udp = action.protocol in (TCP, UDP)
    if rule.protocol == "any":
        protocol_ok: Truth = True
    elif not is_tcp_udp:
        protocol_ok = UNKNOWN
    else:
        protocol_ok = action.protocol == IP_PROTOCOLS[rule.protocol]
    port_ok = port_in(action.port if is_tcp_udp else None, rule.ports)
    # bind port 0 is port 0 (no range contains it); 0.0.0.0 / :: are those addresses.
    return [remote_in(action.address, rule, action.names, action.learned), protocol_ok, port_ok]


def _create_conditions(rule: SocketCreateRule, action: SocketCreate) -> list[Truth]:
    def equal(wanted: int | None, actual: int) -> bool:
        return wanted is None or wanted == actual

    return [
        equal(rule.family, action.family),
        equal(rule.type, action.type),
        equal(rule.protocol, action.protocol),
    ]


def _device_conditions(rule: DeviceRule, action: DeviceAccess) -> list[Truth]:
    # cgroup v1 device controller semantics: an allow rule must grant every right asked
    # for; a deny rule matches if it names any of them.
    if rule.type is None:  # a path rule not resolved to a device node: matches nothing
        return [False]
    asked, named = set(action.access), set(rule.access)
    rights_ok = asked <= named if rule.action == "allow" else bool(asked & named)
    return [
        rule.type in ("any", action.type),
        rule.major is None or rule.major == action.major,
        rule.minor is None or rule.minor == action.minor,
        rights_ok,
    ]


@lru_cache(maxsize=4096)
def _sysctl_pattern(pattern: str) -> re.Pattern[str]:
    # '*' matches any run of characters, '/' included; every other character is literal.
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")), re.DOTALL)


def sysctl_name_matches(pattern: str, name: str) -> bool:
    return _sysctl_pattern(pattern).fullmatch(name) is not None


def _sysctl_conditions(rule: SysctlRule, action: SysctlAccess) -> list[Truth]:
    access_ok = rule.access == "rw" or rule.access == ("write" if action.write else "read")
    if len(action.name.encode()) > SYSCTL_NAME_MAX:
        return [access_ok, UNKNOWN]
    return [access_ok, sysctl_name_matches(rule.name, action.name)]


_CONDITIONS: dict[type, Callable[[Any, Any], list[Truth]]] = {
    Packet: _network_conditions,
    SocketAddress: _address_conditions,
    SocketCreate: _create_conditions,
    DeviceAccess: _device_conditions,
    SysctlAccess: _sysctl_conditions,
}
