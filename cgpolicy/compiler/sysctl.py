"""The maps of bpf/sysctl.c for a sysctl section (cgroup_sysctl): the name patterns as
one automaton (``policy.sysctl_patterns``) and the read/write masks."""

from __future__ import annotations

from cgpolicy.compiler.canonical import RuleKeys, ordered_rules
from cgpolicy.compiler.maps import array_map, config_map, counters_map, rule_mask, verdict
from cgpolicy.compiler.spec import CompileError, MapSpec
from cgpolicy.contract import (
    SYSCTL_CONFIG,
    U32,
    U64,
)
from cgpolicy.policy.model import (
    SysctlSection,
)
from cgpolicy.policy.sysctl_patterns import TooManyStates, sysctl_dfa

_SYSCTL_ACCESS = {"read": (True, False), "write": (False, True), "rw": (True, True)}


def sysctl_maps(section: SysctlSection, audit: bool, keys: RuleKeys) -> dict[str, MapSpec]:
    rules = ordered_rules(section.rules, keys)
    try:
        dfa = sysctl_dfa([rule.name for rule in rules])
    except TooManyStates as error:
        raise CompileError(str(error)) from None
    read = rule_mask(i for i, rule in enumerate(rules) if _SYSCTL_ACCESS[rule.access][0])
    write = rule_mask(i for i, rule in enumerate(rules) if _SYSCTL_ACCESS[rule.access][1])
    value = SYSCTL_CONFIG.pack(
        v=verdict(section.default, rules, audit),
        read_mask=read,
        write_mask=write,
        nclasses=dfa.nclasses,
        byte_class=dfa.byte_class,
    )
    nstates = len(dfa.accept)
    return {
        "config": config_map(value),
        "sysctl_next": array_map(
            "sysctl_next",
            U32.size,
            len(dfa.next),
            {i: U32.pack(s) for i, s in enumerate(dfa.next) if s},
        ),
        "sysctl_accept": array_map(
            "sysctl_accept",
            U64.size,
            nstates,
            {i: U64.pack(m) for i, m in enumerate(dfa.accept) if m},
        ),
        "counters": counters_map(),
    }
