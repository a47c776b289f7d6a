"""Validated plain data -> the typed model.

Only documents that passed the schema and the semantic checks reach this module, so it
applies defaults and converts without re-checking; a parser error here would mean a gap
in validation, and is allowed to raise.
"""

from __future__ import annotations

from typing import Any

from cgpolicy.policy.model import (
    DEFAULT_MAX_LEARNED,
    DEFAULT_MAX_TTL,
    DEFAULT_MIN_TTL,
    IP_PROTOCOLS,
    SOCKET_FAMILIES,
    SOCKET_TYPES,
    DeviceRule,
    DeviceSection,
    DnsSettings,
    Network,
    NetworkRule,
    NetworkSection,
    Policy,
    PortRange,
    SocketAddressRule,
    SocketAddressSection,
    SocketCreateRule,
    SocketCreateSection,
    Sockets,
    SourceLocation,
    SysctlRule,
    SysctlSection,
    Target,
)
from cgpolicy.policy.prefixes import Prefixes
from cgpolicy.policy.problems import Path
from cgpolicy.policy.semantic import (
    cidr_key,
    normalise_fqdn,
    normalise_sysctl_name,
    parse_cidr,
    parse_port_range,
)
from cgpolicy.policy.sourcemap import SourceMap


class _Builder:
    def __init__(self, file: str, source_map: SourceMap) -> None:
        self.file = file
        self.source_map = source_map

    def at(self, path: Path) -> SourceLocation:
        return SourceLocation(self.file, *self.source_map.locate(path))

    def policy(self, data: dict[str, Any]) -> Policy:
        spec = data["spec"]
        return Policy(
            name=data["metadata"]["name"],
            mode=spec.get("mode", "enforce"),
            targets=tuple(_target(target) for target in spec["targets"]),
            network=self.network(spec["network"]) if "network" in spec else None,
            sockets=self.sockets(spec["sockets"]) if "sockets" in spec else None,
            devices=self.devices(spec["devices"]) if "devices" in spec else None,
            sysctl=self.sysctl(spec["sysctl"]) if "sysctl" in spec else None,
            dns=_dns(spec.get("dns", {})),
            source=self.at(()),
        )

    def network(self, network: dict[str, Any]) -> Network:
        sections = {
            direction: NetworkSection(
                network[direction]["default"],
                tuple(
                    self.network_rule(rule, ("spec", "network", direction, "rules", index))
                    for index, rule in enumerate(network[direction].get("rules", []))
                ),
                network[direction].get("failFast", True),
            )
            for direction in ("ingress", "egress")
            if direction in network
        }
        return Network(**sections)

    def network_rule(self, rule: dict[str, Any], path: Path) -> NetworkRule:
        return NetworkRule(
            action=rule["action"],
            cidrs=_cidrs(rule),
            protocol=rule.get("protocol", "any"),
            ports=_ports(rule),
            icmp_types=tuple(int(icmp_type) for icmp_type in rule.get("icmpTypes", ())),
            interfaces=tuple(rule.get("interfaces", ())),
            fqdns=_fqdns(rule),
            source=self.at(path),
        )

    def sockets(self, sockets: dict[str, Any]) -> Sockets:
        create = None
        if "create" in sockets:
            rules = self._rules(sockets["create"], ("spec", "sockets", "create"), self.create_rule)
            create = SocketCreateSection(sockets["create"]["default"], rules)
        address = {
            hook: SocketAddressSection(
                sockets[hook]["default"],
                self._rules(sockets[hook], ("spec", "sockets", hook), self.address_rule),
            )
            for hook in ("bind", "connect")
            if hook in sockets
        }
        return Sockets(create=create, **address)

    def create_rule(self, rule: dict[str, Any], path: Path) -> SocketCreateRule:
        protocol = rule.get("protocol", "any")
        return SocketCreateRule(
            action=rule["action"],
            family=SOCKET_FAMILIES.get(rule.get("family", "any")),
            type=SOCKET_TYPES.get(rule.get("type", "any")),
            protocol=IP_PROTOCOLS.get(protocol) if isinstance(protocol, str) else int(protocol),
            source=self.at(path),
        )

    def address_rule(self, rule: dict[str, Any], path: Path) -> SocketAddressRule:
        return SocketAddressRule(
            action=rule["action"],
            cidrs=_cidrs(rule),
            protocol=rule.get("protocol", "any"),
            ports=_ports(rule),
            fqdns=_fqdns(rule),
            source=self.at(path),
        )

    def devices(self, section: dict[str, Any]) -> DeviceSection:
        return DeviceSection(
            section["default"], self._rules(section, ("spec", "devices"), self.device_rule)
        )

    def device_rule(self, rule: dict[str, Any], path: Path) -> DeviceRule:
        access = "".join(flag for flag in "rwm" if flag in rule.get("access", "rwm"))
        if "path" in rule:
            # Resolved by the node that applies the policy, not here (DeviceRule).
            return DeviceRule(rule["action"], None, None, None, access, rule["path"], self.at(path))
        return DeviceRule(
            rule["action"],
            rule["type"],
            _number(rule.get("major", "*")),
            _number(rule.get("minor", "*")),
            access,
            source=self.at(path),
        )

    def sysctl(self, section: dict[str, Any]) -> SysctlSection:
        return SysctlSection(
            section["default"], self._rules(section, ("spec", "sysctl"), self.sysctl_rule)
        )

    def sysctl_rule(self, rule: dict[str, Any], path: Path) -> SysctlRule:
        name = normalise_sysctl_name(rule["name"])
        return SysctlRule(rule["action"], name, rule.get("access", "rw"), self.at(path))

    @staticmethod
    def _rules(section: dict[str, Any], path: Path, make: Any) -> tuple[Any, ...]:
        rules = section.get("rules", [])
        return tuple(make(rule, path + ("rules", index)) for index, rule in enumerate(rules))


def build_policy(data: dict[str, Any], source_map: SourceMap, file: str) -> Policy:
    """The model of one document that passed validation, with source locations."""
    return _Builder(file, source_map).policy(data)


def _target(target: dict[str, str]) -> Target:
    if "glob" in target:
        return Target(target["glob"], is_glob=True)
    return Target(target["path"], is_glob=False)


def _fqdns(rule: dict[str, Any]) -> tuple[str, ...]:
    """Lowercase, trailing dot dropped, duplicates merged, in the order written."""
    return tuple(dict.fromkeys(normalise_fqdn(text) for text in rule.get("fqdns", ())))


def _dns(settings: dict[str, Any]) -> DnsSettings:
    max_ttl = settings.get("maxTTL", DEFAULT_MAX_TTL)
    return DnsSettings(
        settings.get("minTTL", min(DEFAULT_MIN_TTL, max_ttl)),  # the default yields to maxTTL
        max_ttl,
        settings.get("maxLearned", DEFAULT_MAX_LEARNED),
        tuple(parse_cidr(text) for text in settings.get("servers", ())),
    )


def _cidrs(rule: dict[str, Any]) -> Prefixes:
    return Prefixes(map(cidr_key, rule.get("cidrs", ())))


def _ports(rule: dict[str, Any]) -> tuple[PortRange, ...]:
    return tuple(parse_port_range(port) for port in rule.get("ports", ()))


def _number(value: int | str) -> int | None:
    """Schema-valid major/minor: an integer (possibly written 1.0) or '*' for any."""
    return None if value == "*" else int(value)
