"""The pieces every program's maps are built from: the program spec with its deny-event
ring buffer and rate limit, the verdict head of every config value, rule masks, counters,
one-entry configs and arrays."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from cgpolicy.compiler.spec import MapSpec, ProgramSpec
from cgpolicy.contract import (
    COUNTER,
    COUNTER_SLOTS,
    HOOK_PROGRAMS,
    RATELIMIT,
    U32,
    family_variant,
    names_variant,
)

BPF_F_NO_PREALLOC = 1  # required for LPM tries
# Deny events (bpf/common.h): one ring buffer per policy, shared by its programs (the
# enforcer creates it once per load; a program loaded alone gets its own from the spec).
EVENTS_RING_BYTES = 256 * 1024  # about 1000 events of 240 B
EVENTS_PER_SECOND = 100  # per program and CPU; more are counted as dropped


def program_spec(hook: str, maps: dict[str, MapSpec], names: bool = False) -> ProgramSpec:
    """The hook's program; ``names``: its variant for rules naming fqdns (net.c only,
    contract.names_variant), else the one walking only the prefix indexes that hold a
    prefix (:func:`index_variant`)."""
    program = HOOK_PROGRAMS[hook]
    if names:
        function = names_variant(program.function)
    elif program.source == "net.c":
        function, maps = index_variant(program.function, maps)
    else:
        function = program.function
    maps = {**maps, "events": events_map(), "ratelimit": ratelimit_map(EVENTS_PER_SECOND)}
    return ProgramSpec(
        hook,
        program.source,
        function,
        program.function,
        tuple(maps[name] for name in sorted(maps)),
    )


def index_variant(function: str, maps: dict[str, MapSpec]) -> tuple[str, dict[str, MapSpec]]:
    """The variant of the plain net.c program ``function`` (contract.family_variant) for the
    prefix indexes among ``maps`` (cidr4_*, cidr6_*: cidr6.py) that hold a prefix, and the
    maps it reads: ``maps`` without the empty indexes."""
    empty = {family for family in ("cidr4", "cidr6") if not _lists_prefixes(maps, family)}
    kept = {name: spec for name, spec in maps.items() if name.split("_")[0] not in empty}
    return family_variant(function, "cidr4" not in empty, "cidr6" not in empty), kept


def _lists_prefixes(maps: dict[str, MapSpec], family: str) -> bool:
    """Whether the prefix index of ``family`` (cidr4, cidr6) among ``maps`` holds one."""
    slots = maps.get(f"{family}_slots")
    return slots is not None and slots.index is not None and bool(slots.index.own)


def events_map() -> MapSpec:
    """The ring buffer deny events go to (bpf/common.h struct cgp_event)."""
    return MapSpec("events", "ringbuf", 0, 0, EVENTS_RING_BYTES, 0, ())


def ratelimit_map(per_second: int) -> MapSpec:
    value = RATELIMIT.pack(window_start=0, dropped=0, sent=0, limit=per_second)
    return MapSpec(
        "ratelimit", "percpu_array", U32.size, RATELIMIT.size, 1, 0, ((U32.pack(0), value),)
    )


def verdict(default: str, rules: Sequence[Any], audit: bool) -> dict[str, int]:
    """struct cgp_verdict, the head of every config value."""
    return {
        "allow_mask": rule_mask(i for i, rule in enumerate(rules) if rule.action == "allow"),
        "deny_mask": rule_mask(i for i, rule in enumerate(rules) if rule.action == "deny"),
        "default_allow": int(default == "allow"),
        "audit": int(audit),
    }


def rule_mask(indexes: Iterable[int]) -> int:
    mask = 0
    for index in indexes:
        mask |= 1 << index
    return mask


def counters_map() -> MapSpec:
    return MapSpec("counters", "percpu_array", U32.size, COUNTER.size, COUNTER_SLOTS, 0, ())


def config_map(value: bytes) -> MapSpec:
    return MapSpec("config", "array", U32.size, len(value), 1, 0, ((U32.pack(0), value),))


def two_copy_config_map(value: bytes) -> MapSpec:
    """net.c's config: one value per copy of the rules (contract.copy_key)."""
    return MapSpec(
        "config", "array", U32.size, len(value), 2, 0, ((U32.pack(0), value),), two_copies=True
    )


def generation_map() -> MapSpec:
    """net.c's `generation`: which copy of the rule maps is in force (copy 0 at load). The
    enforcer makes one per policy load and shares it among the load's programs."""
    return MapSpec("generation", "array", U32.size, U32.size, 1, 0, ())


def two_copy_capacity(entries: int) -> int:
    """max_entries of a two-copy hash or LPM trie whose copies hold ``entries`` each: room
    for both, and for a copy to grow by a quarter (16 entries at least) in place. These maps
    are not preallocated: room costs nothing until used."""
    return 2 * (entries + max(16, entries // 4))


def array_map(name: str, value_size: int, max_entries: int, values: dict[int, bytes]) -> MapSpec:
    entries = tuple((U32.pack(key), values[key]) for key in sorted(values))
    return MapSpec(name, "array", U32.size, value_size, max(1, max_entries), 0, entries)
