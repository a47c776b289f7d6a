"""The maps of bpf/sock.c for a sockets.create section (cgroup_sock): per socket()
argument, the rules each value satisfies."""

from __future__ import annotations

from collections.abc import Sequence

from cgpolicy.compiler.canonical import RuleKeys, ordered_rules
from cgpolicy.compiler.maps import config_map, counters_map, rule_mask, verdict
from cgpolicy.compiler.spec import CompileError, MapSpec
from cgpolicy.contract import (
    CREATE_CONFIG,
    SOCKET_FAMILY_SLOTS,
    SOCKET_PROTOCOL_SLOTS,
    SOCKET_TYPE_SLOTS,
)
from cgpolicy.policy.model import (
    SocketCreateRule,
    SocketCreateSection,
)


def _value_table(
    rules: Sequence[SocketCreateRule], field: str, slots: int
) -> tuple[int, list[int]]:
    """(rules with "any", per value: rules accepting it) for one socket() argument."""
    any_mask = rule_mask(i for i, rule in enumerate(rules) if getattr(rule, field) is None)
    table = [any_mask] * slots
    for index, rule in enumerate(rules):
        value = getattr(rule, field)
        if value is not None:
            if not 0 <= value < slots:
                raise CompileError(f"socket {field} {value} is outside 0..{slots - 1}")
            table[value] |= 1 << index
    return any_mask, table


def create_maps(section: SocketCreateSection, audit: bool, keys: RuleKeys) -> dict[str, MapSpec]:
    rules = ordered_rules(section.rules, keys)
    any_family, families = _value_table(rules, "family", SOCKET_FAMILY_SLOTS)
    any_type, types = _value_table(rules, "type", SOCKET_TYPE_SLOTS)
    any_protocol, protocols = _value_table(rules, "protocol", SOCKET_PROTOCOL_SLOTS)
    value = CREATE_CONFIG.pack(
        v=verdict(section.default, rules, audit),
        any_family=any_family,
        any_type=any_type,
        any_protocol=any_protocol,
        family=families,
        type=types,
        protocol=protocols,
    )
    return {"config": config_map(value), "counters": counters_map()}
