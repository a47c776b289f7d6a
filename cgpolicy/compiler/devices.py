"""The maps of bpf/device.c for a devices section (cgroup_device): the rules as a
table the program scans."""

from __future__ import annotations

from cgpolicy.compiler.canonical import RuleKeys, ordered_rules
from cgpolicy.compiler.maps import config_map, counters_map, verdict
from cgpolicy.compiler.spec import MapSpec
from cgpolicy.contract import (
    DEVICE_ACCESS,
    DEVICE_ANY,
    DEVICE_CONFIG,
    DEVICE_RULE,
    DEVICE_TYPE_NEVER,
    DEVICE_TYPES,
    MAX_RULES,
)
from cgpolicy.policy.model import (
    DeviceSection,
)


def device_maps(section: DeviceSection, audit: bool, keys: RuleKeys) -> dict[str, MapSpec]:
    rules = ordered_rules(section.rules, keys)
    entries = [
        {
            "bit": 1 << index,
            "type": DEVICE_TYPE_NEVER if rule.type is None else DEVICE_TYPES[rule.type],
            "major": DEVICE_ANY if rule.major is None else rule.major,
            "minor": DEVICE_ANY if rule.minor is None else rule.minor,
            "access": 0 if rule.type is None else sum(DEVICE_ACCESS[r] for r in rule.access),
        }
        for index, rule in enumerate(rules)
    ]
    unused = dict.fromkeys(DEVICE_RULE.fields, 0)
    value = DEVICE_CONFIG.pack(
        v=verdict(section.default, rules, audit),
        nrules=len(rules),
        pad=0,
        rules=entries + [unused] * (MAX_RULES - len(rules)),
    )
    return {"config": config_map(value), "counters": counters_map()}
