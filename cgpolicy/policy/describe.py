"""A short human summary of what a policy would enforce.

Used by ``cgpolicy validate`` output and the README demo. Pure: it reads a validated
:class:`~cgpolicy.policy.model.Policy` and returns text; no kernel access.

Rules are listed deny first, then allow, then the default, because that is the order in
which they decide (a matching deny wins, then a matching allow, then the default); within
one action they keep the order they were written in. Long address or port lists are cut
to the first few with a count, so the summary stays readable for policies with thousands
of CIDRs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar

from cgpolicy.policy.model import (
    IP_PROTOCOLS,
    SOCKET_FAMILIES,
    SOCKET_TYPES,
    DeviceRule,
    DeviceSection,
    IPNetwork,
    NetworkRule,
    NetworkSection,
    Policy,
    PortRange,
    SocketAddressRule,
    SocketAddressSection,
    SocketCreateRule,
    SocketCreateSection,
    SysctlRule,
    SysctlSection,
    Target,
)

# How many members of a list are shown before "(+N more)".
MAX_LISTED = 4

_FAMILY_NAMES = {number: name for name, number in SOCKET_FAMILIES.items()}
_TYPE_NAMES = {number: name for name, number in SOCKET_TYPES.items()}
_PROTOCOL_NAMES = {number: name for name, number in IP_PROTOCOLS.items()}
_DEVICE_TYPE_LETTER = {"char": "c", "block": "b", "any": "a"}

Rule = TypeVar("Rule", NetworkRule, SocketCreateRule, SocketAddressRule, DeviceRule, SysctlRule)
AnyRule = NetworkRule | SocketCreateRule | SocketAddressRule | DeviceRule | SysctlRule


def describe(policy: Policy) -> str:
    """A multi-line summary (no trailing newline): header, targets, one block per section
    present, then the hooks the policy leaves alone."""
    lines = [_header(policy), "  targets: " + ", ".join(_target(t) for t in policy.targets)]
    left_alone: list[str] = []

    network = policy.network
    for direction in ("egress", "ingress"):
        section: NetworkSection | None = getattr(network, direction) if network else None
        if section is None:
            left_alone.append(f"network.{direction}")
        else:
            where = "to" if direction == "egress" else "from"
            lines += _section(
                f"network.{direction}",
                section.default,
                section.rules,
                partial(_network_rule, where=where),
            )
            if not section.fail_fast:
                lines.append(
                    "    (failFast off: a connect it denies is not refused at once; its packets "
                    "are dropped)"
                )

    sockets = policy.sockets
    create: SocketCreateSection | None = sockets.create if sockets else None
    if create is None:
        left_alone.append("sockets.create")
    else:
        lines += _section("sockets.create", create.default, create.rules, _create_rule)
    for hook in ("bind", "connect"):
        address: SocketAddressSection | None = getattr(sockets, hook) if sockets else None
        if address is None:
            left_alone.append(f"sockets.{hook}")
        else:
            render = _bind_rule if hook == "bind" else _connect_rule
            lines += _section(f"sockets.{hook}", address.default, address.rules, render)

    devices: DeviceSection | None = policy.devices
    if devices is None:
        left_alone.append("devices")
    else:
        lines += _section("devices", devices.default, devices.rules, _device_rule)
        if any(rule.type is None for rule in devices.rules):
            lines.append(
                "    (paths are resolved on the node that applies the policy; one that names "
                "no device there matches nothing)"
            )

    sysctl: SysctlSection | None = policy.sysctl
    if sysctl is None:
        left_alone.append("sysctl")
    else:
        lines += _section("sysctl", sysctl.default, sysctl.rules, _sysctl_rule)

    if left_alone:
        lines.append("  left alone: " + ", ".join(left_alone))
    return "\n".join(lines)


def _header(policy: Policy) -> str:
    if policy.mode == "audit":
        return f"policy {policy.name} (audit: reports what it would deny, denies nothing)"
    return f"policy {policy.name} (enforce)"


def _target(target: Target) -> str:
    return f"glob {target.pattern}" if target.is_glob else target.pattern


def _section(
    title: str, default: str, rules: Sequence[Rule], render: Callable[[Rule], str]
) -> list[str]:
    """A section title, its rules (deny first), then its default."""
    ordered = [r for r in rules if r.action == "deny"] + [r for r in rules if r.action == "allow"]
    lines = [f"  {title}:"]
    lines += [f"    {render(rule)}" for rule in ordered]
    lines.append(f"    default {default}" if rules else f"    default {default} (no rules)")
    return lines


def _network_rule(rule: NetworkRule, where: str) -> str:
    parts = [rule.action, rule.protocol, where, _remote(rule)]
    if rule.ports:
        # Remote port on egress, local port on ingress.
        parts.append(_ports(rule.ports) if where == "to" else "local " + _ports(rule.ports))
    if rule.icmp_types:
        parts.append(_listing("type", "types", [str(t) for t in rule.icmp_types]))
    if rule.interfaces:
        parts.append(_listing("interface", "interfaces", list(rule.interfaces)))
    return " ".join(parts)


def _create_rule(rule: SocketCreateRule) -> str:
    parts: list[str] = [rule.action]
    parts.append("family " + _named(rule.family, _FAMILY_NAMES))
    parts.append("type " + _named(rule.type, _TYPE_NAMES))
    if rule.protocol is not None:
        parts.append("protocol " + _named(rule.protocol, _PROTOCOL_NAMES))
    return " ".join(parts)


def _address_rule(rule: SocketAddressRule, where: str) -> str:
    parts = [rule.action, rule.protocol, where, _remote(rule)]
    if rule.ports:
        parts.append(_ports(rule.ports))
    return " ".join(parts)


def _bind_rule(rule: SocketAddressRule) -> str:
    return _address_rule(rule, "on")


def _connect_rule(rule: SocketAddressRule) -> str:
    return _address_rule(rule, "to")


def _device_rule(rule: DeviceRule) -> str:
    """``allow c 1:3 rw``; a path rule as resolved, ``allow c 1:3 rw (/dev/null)``, or, before
    a node resolved it (or where it names no device), ``allow /dev/null rw``."""
    if rule.type is None:
        return f"{rule.action} {rule.path} {rule.access}"
    major = "*" if rule.major is None else str(rule.major)
    minor = "*" if rule.minor is None else str(rule.minor)
    text = f"{rule.action} {_DEVICE_TYPE_LETTER[rule.type]} {major}:{minor} {rule.access}"
    return f"{text} ({rule.path})" if rule.path else text


def _sysctl_rule(rule: SysctlRule) -> str:
    return f"{rule.action} {rule.access} {rule.name}"


_RULE_TEXT: dict[str, Callable[[Any], str]] = {
    "network.egress": partial(_network_rule, where="to"),
    "network.ingress": partial(_network_rule, where="from"),
    "sockets.create": _create_rule,
    "sockets.bind": _bind_rule,
    "sockets.connect": _connect_rule,
    "devices": _device_rule,
    "sysctl": _sysctl_rule,
}


def rule_text(section: str, rule: AnyRule) -> str:
    """One rule as the summary lists it (``deny tcp to 10.0.0.0/8 port 443``); what the
    compiler's counter labels and ``explain`` show too. ``section`` is where the rule is in a
    policy: network.egress, network.ingress, sockets.create, sockets.bind, sockets.connect,
    devices or sysctl."""
    return _RULE_TEXT[section](rule)


def _remote(rule: NetworkRule | SocketAddressRule) -> str:
    """The remote hosts of a rule: its names ("by DNS": the addresses their answers gave),
    else its CIDRs."""
    if rule.fqdns:
        names = list(rule.fqdns)
        shown = names if len(names) <= MAX_LISTED else names[: MAX_LISTED - 1]
        return _truncated(shown, "names", len(names)) + " (by DNS)"
    return _cidrs(rule.cidrs)


def _cidrs(cidrs: Sequence[IPNetwork]) -> str:
    if not cidrs:
        return "any address"
    # Render only what is shown: a rule may list 100,000 CIDRs.
    shown = cidrs if len(cidrs) <= MAX_LISTED else cidrs[: MAX_LISTED - 1]
    return _truncated([_cidr(c) for c in shown], "CIDRs", len(cidrs))


def _cidr(network: IPNetwork) -> str:
    """IPv4-mapped IPv6 networks in their readable form (::ffff:169.254.169.254/128)."""
    if isinstance(network, ipaddress.IPv6Network):
        mapped = network.network_address.ipv4_mapped
        if mapped is not None and network.prefixlen >= 96:
            return f"::ffff:{mapped}/{network.prefixlen}"
    return str(network)


def _ports(ports: Sequence[PortRange]) -> str:
    single = len(ports) == 1 and ports[0].low == ports[0].high
    return ("port " if single else "ports ") + _truncated([str(p) for p in ports], "items")


def _listing(singular: str, plural: str, items: list[str]) -> str:
    return (singular if len(items) == 1 else plural) + " " + _truncated(items, "items")


def _truncated(items: list[str], noun: str, total: int | None = None) -> str:
    """``items`` joined, or the first few and a count; ``total`` when ``items`` holds only
    the first few of that many."""
    count = len(items) if total is None else total
    if count <= MAX_LISTED:
        return ",".join(items)
    shown = ",".join(items[: MAX_LISTED - 1])
    return f"{shown} (+{count - MAX_LISTED + 1} more, {count} {noun})"


def _named(value: int | None, names: dict[int, str]) -> str:
    if value is None:
        return "any"
    return names.get(value, str(value))
