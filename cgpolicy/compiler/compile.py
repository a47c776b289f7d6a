"""Policy -> CompiledPolicy: the map contents of every program, packed as the C structs in
bpf/ lay them out (their layouts: cgpolicy/contract.py). Pure: no syscalls, no bcc.

Every section is a set of at most 64 rules, kept in the programs as 64-bit masks (bit i =
rule i). Rule i is the i-th rule in canonical order (sorted by its canonical serialisation,
duplicates merged), so the same policy always gives the same bits and counter slots,
whatever order its file lists the rules in; :func:`ordered_rules` gives that order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import itertools
import json
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from cgpolicy.compiler.spec import (
    CompiledPolicy,
    DeviceNode,
    DevicePath,
    MapSpec,
    ProgramSpec,
    RuleLabel,
)
from cgpolicy.contract import (
    CIDR4_INDEX_ENTRY,
    CIDR4_LONG_KEY,
    CIDR4_PROBES,
    COUNTER,
    COUNTER_SLOTS,
    CREATE_CONFIG,
    DEVICE_ACCESS,
    DEVICE_ANY,
    DEVICE_CONFIG,
    DEVICE_RULE,
    DEVICE_TYPE_NEVER,
    DEVICE_TYPES,
    HOOK_PROGRAMS,
    LPM4_KEY,
    LPM6_KEY,
    LPM_PORT_KEY,
    MAX_RULES,
    NET_CONFIG,
    PROTO_SLOTS,
    RATELIMIT,
    SECTION_HOOKS,
    SOCKET_FAMILY_SLOTS,
    SOCKET_PROTOCOL_SLOTS,
    SOCKET_TYPE_SLOTS,
    SYSCTL_CONFIG,
    U32,
    U64,
    Layout,
)
from cgpolicy.policy.describe import rule_text
from cgpolicy.policy.model import (
    DeviceRule,
    DeviceSection,
    NetworkRule,
    Policy,
    SocketAddressRule,
    SocketAddressSection,
    SocketCreateRule,
    SocketCreateSection,
    SysctlRule,
    SysctlSection,
)
from cgpolicy.policy.sysctl_patterns import TooManyStates, sysctl_dfa

InterfaceResolver = Callable[[tuple[str, ...]], set[int]]
# What a `path:` device rule's path names on this node (cgpolicy.kernel.devices does the I/O).
DeviceResolver = Callable[[DeviceRule], DeviceNode]
# Bound, not constrained: reference.py orders a section whose rule type it does not know.
Rule = TypeVar(
    "Rule", bound=NetworkRule | SocketAddressRule | SocketCreateRule | DeviceRule | SysctlRule
)

BPF_F_NO_PREALLOC = 1  # required for LPM tries
# IPv4 CIDR layout (bpf/net.c cgp_cidr4_mask): a section with at least this many distinct
# IPv4 prefixes gets the /16 index (cidr4_idx, 1 MiB, + cidr4_long hash) instead of the
# cidr4 LPM trie, whose lookup cost grows with its size. compile_policy takes an override
# (tests run both layouts).
CIDR4_INDEX_MIN = 257
CIDR4_INDEX_SLOTS = 1 << 16  # cidr4_idx: one entry per /16
# Deny events (bpf/common.h): one ring buffer per policy, shared by its programs (the
# enforcer creates it once per load; a program loaded alone gets its own from the spec).
EVENTS_RING_BYTES = 256 * 1024  # about 1000 events of 240 B
EVENTS_PER_SECOND = 100  # per program and CPU; more are counted as dropped
# bpf/sysctl.c
_SYSCTL_ACCESS = {"read": (True, False), "write": (False, True), "rw": (True, True)}


class CompileError(Exception):
    """The policy cannot be turned into map contents (e.g. interfaces without a resolver)."""


def compile_policy(
    policy: Policy,
    resolve_interfaces: InterfaceResolver | None = None,
    cidr4_index_min: int | None = None,
    resolve_device: DeviceResolver | None = None,
) -> CompiledPolicy:
    """Compile ``policy``. ``resolve_interfaces`` turns a rule's interface names and globs
    into ifindexes; it is needed only when a network rule names interfaces.
    ``cidr4_index_min`` overrides :data:`CIDR4_INDEX_MIN` (0: always the /16 index).
    ``resolve_device`` says what a ``path:`` device rule's path names on this node; it is
    needed only when a device rule names a path."""
    index_min = CIDR4_INDEX_MIN if cidr4_index_min is None else cidr4_index_min
    policy, device_paths = bind_device_paths(policy, resolve_device)
    audit = policy.mode == "audit"
    programs: list[ProgramSpec] = []
    resolved: dict[str, list[list[int]]] = {}
    keys = RuleKeys()  # each rule is put in canonical text once, not once per use

    if policy.network is not None:
        for hook, net_section in (
            ("ingress", policy.network.ingress),
            ("egress", policy.network.egress),
        ):
            if net_section is None:
                continue
            rules = ordered_rules(net_section.rules, keys)
            ifindexes = _resolve(rules, resolve_interfaces)
            resolved[hook] = [sorted(found) for found in ifindexes]
            maps = _network_maps(net_section.default, rules, audit, ifindexes, index_min)
            programs.append(_program(hook, maps))

    sockets = policy.sockets
    if sockets is not None:
        if sockets.create is not None:
            maps = _create_maps(sockets.create, audit, keys)
            programs.append(_program("sock_create", maps))
        for section, hooks in (
            (sockets.bind, SECTION_HOOKS["sockets.bind"]),
            (sockets.connect, SECTION_HOOKS["sockets.connect"]),
        ):
            if section is None:
                continue
            maps = _socket_address_maps(section, audit, keys, index_min)
            for hook in hooks:
                # IPv4 programs do not use cidr6; IPv6 ones use both (IPv4-mapped addresses).
                used = (
                    maps if hook.endswith("6") else {k: v for k, v in maps.items() if k != "cidr6"}
                )
                programs.append(_program(hook, used))

    if policy.devices is not None:
        programs.append(_program("device", _device_maps(policy.devices, audit, keys)))

    if policy.sysctl is not None:
        programs.append(_program("sysctl", _sysctl_maps(policy.sysctl, audit, keys)))

    return CompiledPolicy(
        name=policy.name,
        revision=revision(policy, resolved, keys, device_paths),
        mode=policy.mode,
        targets=policy.targets,
        programs=tuple(programs),
        rules=rule_labels(policy, [spec.hook for spec in programs], keys, device_paths),
        device_paths=device_paths,
    )


def bind_device_paths(
    policy: Policy, resolve: DeviceResolver | None
) -> tuple[Policy, tuple[DevicePath, ...]]:
    """``policy`` with each unresolved ``path:`` device rule given the type and numbers that
    ``resolve`` finds for its path, and what every such path resolved to. A rule whose path
    names no device on this node stays unresolved (type None) and matches nothing: for an
    allow rule that only narrows access; for a deny rule the caller reports it (and may keep
    the numbers it had, see :mod:`cgpolicy.kernel.devices`). Pure: ``resolve`` looks."""
    section = policy.devices
    if section is None or all(rule.type is not None for rule in section.rules):
        return policy, ()
    if resolve is None:
        raise CompileError("device rules that name a path need a device resolver")
    rules: list[DeviceRule] = []
    found: list[DevicePath] = []
    for rule in section.rules:
        if rule.type is None and rule.path is not None:
            node = resolve(rule)
            line = rule.source.line if rule.source else None
            found.append(DevicePath(rule.path, rule.action, line, node))
            if node.type is not None:
                rule = dataclasses.replace(rule, type=node.type, major=node.major, minor=node.minor)
        rules.append(rule)
    bound = dataclasses.replace(section, rules=tuple(rules))
    return dataclasses.replace(policy, devices=bound), tuple(found)


def rule_labels(
    policy: Policy,
    hooks: Sequence[str],
    keys: RuleKeys | None = None,
    device_paths: Sequence[DevicePath] = (),
) -> tuple[tuple[str, tuple[RuleLabel, ...]], ...]:
    """Per hook, a label for each rule in canonical order (what counter slot i counts);
    a device path rule that names no device here carries a note saying so."""
    notes = {(d.path, d.action): d.note() for d in device_paths}
    sections: dict[str, tuple[Any, str]] = {}  # hook -> (section, where it is in the policy)
    if policy.network is not None:
        for direction in ("ingress", "egress"):
            section = getattr(policy.network, direction)
            if section is not None:
                sections[direction] = (section, f"network.{direction}")
    if policy.sockets is not None:
        if policy.sockets.create is not None:
            sections["sock_create"] = (policy.sockets.create, "sockets.create")
        for name in ("bind", "connect"):
            section = getattr(policy.sockets, name)
            if section is not None:
                for hook in SECTION_HOOKS[f"sockets.{name}"]:
                    sections[hook] = (section, f"sockets.{name}")
    if policy.devices is not None:
        sections["device"] = (policy.devices, "devices")
    if policy.sysctl is not None:
        sections["sysctl"] = (policy.sysctl, "sysctl")
    labels = []
    for hook in hooks:
        section, where = sections[hook]
        labels.append(
            (
                hook,
                tuple(
                    RuleLabel(
                        rule_text(where, rule),
                        rule.source.line if rule.source else None,
                        notes.get((rule.path, rule.action)) if hook == "device" else None,
                    )
                    for rule in ordered_rules(section.rules, keys)
                ),
            )
        )
    return tuple(labels)


# --- canonical form -------------------------------------------------------------------------


def _network_text(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    """``str(network)``, made with the C inet_ntop: the same text several times faster (a
    rule may list 100,000 CIDRs). Addresses whose first 80 bits are zero are left to
    ``str``, because glibc writes ::ffff:a.b.c.d and ::a.b.c.d dotted and Python does not."""
    value = int(network.network_address)
    if network.version == 4:
        return f"{socket.inet_ntoa(value.to_bytes(4, 'big'))}/{network.prefixlen}"
    if value >> 48 == 0:
        return str(network)
    text = socket.inet_ntop(socket.AF_INET6, value.to_bytes(16, "big"))
    return f"{text}/{network.prefixlen}"


def _item_text(item: Any) -> str:
    if isinstance(item, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return _network_text(item)
    return str(item)


def _canonical_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return sorted(map(_item_text, value))
    return value


def canonical_rule(rule: Any) -> dict[str, Any]:
    """A rule's semantic content as JSON-ready data (no source position; lists sorted)."""
    return {
        f.name: _canonical_value(getattr(rule, f.name))
        for f in dataclasses.fields(rule)
        if f.name != "source"
    }


def _rule_key(rule: Any) -> str:
    return json.dumps(canonical_rule(rule), sort_keys=True, separators=(",", ":"))


class RuleKeys:
    """Canonical texts of rules, remembered by identity for the length of one compile: the
    rule order, the revision and the labels all need them, and a rule of 100,000 CIDRs
    takes tens of milliseconds to serialise. Holds the rules, so ids are not reused."""

    def __init__(self) -> None:
        self._known: dict[int, tuple[Any, str]] = {}

    def __call__(self, rule: Any) -> str:
        found = self._known.get(id(rule))
        if found is None:
            found = self._known[id(rule)] = (rule, _rule_key(rule))
        return found[1]


def ordered_rules(
    rules: Iterable[Rule], keys: Callable[[Any], str] | None = None
) -> tuple[Rule, ...]:
    """A section's rules in canonical order, duplicates merged: rule i is bit i of the
    programs' masks and counter slot i. ``keys`` (a :class:`RuleKeys`) saves re-serialising
    rules already seen."""
    key_of = keys or _rule_key
    unique = {key_of(rule): rule for rule in rules}
    ordered = tuple(unique[key] for key in sorted(unique))
    if len(ordered) > MAX_RULES:
        raise CompileError(f"a section has {len(ordered)} rules; at most {MAX_RULES} are supported")
    return ordered


def _canonical_section(section: Any, keys: Callable[[Any], str]) -> dict[str, Any] | None:
    if section is None:
        return None
    return {"default": section.default, "rules": sorted({keys(r) for r in section.rules})}


def revision(
    policy: Policy,
    resolved_interfaces: dict[str, list[list[int]]] | None = None,
    keys: RuleKeys | None = None,
    device_paths: Sequence[DevicePath] = (),
) -> str:
    """First 16 hex chars of the sha256 of the policy's canonical content: name, mode and
    sections with their rules as sets. Source positions, rule order and targets do not
    count (targets say where programs go, not what they are). Interfaces resolved to
    ifindexes do count, per network hook in rule order, so that a new matching interface
    gives a new revision and reconciliation reloads. So do device paths: their numbers
    are in the (bound) rules, and what each path resolved to is added, so that a device
    node that appears, vanishes or changes gives a new revision."""
    network, sockets = policy.network, policy.sockets
    key_of = keys or _rule_key
    content: dict[str, Any] = {
        "name": policy.name,
        "mode": policy.mode,
        "network": None
        if network is None
        else {
            "ingress": _canonical_section(network.ingress, key_of),
            "egress": _canonical_section(network.egress, key_of),
        },
        "sockets": None
        if sockets is None
        else {
            "create": _canonical_section(sockets.create, key_of),
            "bind": _canonical_section(sockets.bind, key_of),
            "connect": _canonical_section(sockets.connect, key_of),
        },
        "devices": _canonical_section(policy.devices, key_of),
        "sysctl": _canonical_section(policy.sysctl, key_of),
        "interfaces": {
            hook: found for hook, found in sorted((resolved_interfaces or {}).items()) if any(found)
        },
    }
    if device_paths:  # absent otherwise, so that revisions without path rules stay as they were
        content["device_paths"] = sorted(
            [d.path, d.action, d.node.state, d.node.numbers()] for d in device_paths
        )
    text = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- shared pieces ----------------------------------------------------------------------------


def _program(hook: str, maps: dict[str, MapSpec]) -> ProgramSpec:
    program = HOOK_PROGRAMS[hook]
    maps = {**maps, "events": events_map(), "ratelimit": _ratelimit(EVENTS_PER_SECOND)}
    return ProgramSpec(
        hook,
        program.source,
        program.function,
        program.function,
        tuple(maps[name] for name in sorted(maps)),
    )


def events_map() -> MapSpec:
    """The ring buffer deny events go to (bpf/common.h struct cgp_event)."""
    return MapSpec("events", "ringbuf", 0, 0, EVENTS_RING_BYTES, 0, ())


def _ratelimit(per_second: int) -> MapSpec:
    value = RATELIMIT.pack(window_start=0, dropped=0, sent=0, limit=per_second)
    return MapSpec(
        "ratelimit", "percpu_array", U32.size, RATELIMIT.size, 1, 0, ((U32.pack(0), value),)
    )


def _verdict(default: str, rules: Sequence[Any], audit: bool) -> dict[str, int]:
    """struct cgp_verdict, the head of every config value."""
    return {
        "allow_mask": _mask(i for i, rule in enumerate(rules) if rule.action == "allow"),
        "deny_mask": _mask(i for i, rule in enumerate(rules) if rule.action == "deny"),
        "default_allow": int(default == "allow"),
        "audit": int(audit),
    }


def _mask(indexes: Iterable[int]) -> int:
    mask = 0
    for index in indexes:
        mask |= 1 << index
    return mask


def _counters() -> MapSpec:
    return MapSpec("counters", "percpu_array", U32.size, COUNTER.size, COUNTER_SLOTS, 0, ())


def _config(value: bytes) -> MapSpec:
    return MapSpec("config", "array", U32.size, len(value), 1, 0, ((U32.pack(0), value),))


def _array(name: str, value_size: int, max_entries: int, values: dict[int, bytes]) -> MapSpec:
    entries = tuple((U32.pack(key), values[key]) for key in sorted(values))
    return MapSpec(name, "array", U32.size, value_size, max(1, max_entries), 0, entries)


# --- prefixes (CIDRs and ports) ---------------------------------------------------------------


def propagate_prefixes(
    prefixes: dict[tuple[int, int], int], width: int
) -> dict[tuple[int, int], int]:
    """LPM trie contents: every stored (prefixlen, value) maps to the OR of the masks of all
    stored prefixes containing it (itself included), so that the longest-prefix match of an
    address yields every rule whose list contains the address. Only prefix lengths that
    occur are checked: O(entries x distinct lengths)."""
    lengths = sorted({length for length, _ in prefixes})
    full = (1 << width) - 1
    out: dict[tuple[int, int], int] = {}
    for (length, value), mask in prefixes.items():
        for shorter in lengths:
            if shorter >= length:
                break
            ancestor = value & (full ^ (full >> shorter))
            mask |= prefixes.get((shorter, ancestor), 0)
        out[(length, value)] = mask
    return out


def port_prefixes(low: int, high: int) -> list[tuple[int, int]]:
    """The inclusive port range as (prefixlen, first port) prefixes of a 16-bit space: at
    most 30, the fewest that cover it exactly."""
    prefixes = []
    while low <= high:
        size = low & -low if low else 1 << 16
        while size > high - low + 1:
            size >>= 1
        prefixes.append((16 - size.bit_length() + 1, low))
        low += size
    return prefixes


def _lpm_map(name: str, key: Layout, prefixes: dict[tuple[int, int], int]) -> MapSpec:
    """An LPM trie keyed by ``key`` (struct cgp_lpm*: the prefix length, then the data)."""
    _, data = key.fields.values()
    entries = tuple(
        (key.struct.pack(length, value.to_bytes(data.size, "big")), U64.pack(mask))
        for (length, value), mask in sorted(propagate_prefixes(prefixes, 8 * data.size).items())
    )
    return MapSpec(
        name, "lpm_trie", key.size, U64.size, max(1, len(entries)), BPF_F_NO_PREALLOC, entries
    )


def _cidr4_maps(v4: dict[tuple[int, int], int], index_min: int) -> dict[str, MapSpec]:
    """The IPv4 maps of bpf/net.c: cidr4, cidr4_idx and cidr4_long. Fewer than ``index_min``
    prefixes keep the LPM trie with 1-entry placeholders for the index; more get the /16
    index (:func:`cidr4_index`) and an empty trie."""
    if len(v4) < index_min:
        return {
            "cidr4": _lpm_map("cidr4", LPM4_KEY, v4),
            "cidr4_idx": MapSpec("cidr4_idx", "array", U32.size, CIDR4_INDEX_ENTRY.size, 1, 0, ()),
            "cidr4_long": MapSpec("cidr4_long", "hash", CIDR4_LONG_KEY.size, U64.size, 1, 0, ()),
        }
    masks, lengths, long = cidr4_index(v4)
    index = _index_entries(masks, lengths)
    hashed = tuple(
        (CIDR4_LONG_KEY.struct.pack(1 << (32 - length), value), U64.pack(mask))
        for (length, value), mask in long.items()
    )
    return {
        "cidr4": _lpm_map("cidr4", LPM4_KEY, {}),
        "cidr4_idx": MapSpec(
            "cidr4_idx", "array", U32.size, CIDR4_INDEX_ENTRY.size, CIDR4_INDEX_SLOTS, 0, index
        ),
        "cidr4_long": MapSpec(
            "cidr4_long", "hash", CIDR4_LONG_KEY.size, U64.size, max(1, len(hashed)), 0, hashed
        ),
    }


def _index_entries(masks: list[int], lengths: dict[int, int]) -> tuple[tuple[bytes, bytes], ...]:
    """The cidr4_idx entries (struct cgp_idx4 per /16 with anything in it, in slot order).
    A short prefix such as /0 puts something in up to 65,536 slots, most of them alike, so
    the values are packed once per distinct mask and the iteration stays in C."""
    entry = CIDR4_INDEX_ENTRY.struct  # mask, lengths, pad
    packed = {mask: entry.pack(mask, 0, 0) for mask in set(masks)}
    values = list(map(packed.__getitem__, masks))
    used = list(map(bool, masks))
    for top, bits in lengths.items():
        values[top] = entry.pack(masks[top], bits, 0)
        used[top] = True
    keys = map(U32.pack, range(CIDR4_INDEX_SLOTS))
    return tuple(itertools.compress(zip(keys, values, strict=True), used))


def cidr4_index(
    v4: dict[tuple[int, int], int],
) -> tuple[list[int], dict[int, int], dict[tuple[int, int], int]]:
    """The /16 index layout of IPv4 prefixes (bpf/net.c cgp_cidr4_mask): per /16 (slot =
    the address's top 16 bits), the mask of the prefixes <= 16 containing it (a list of
    CIDR4_INDEX_SLOTS masks, 0 where none does); per /16 with prefixes longer than 16 inside
    it, the bitmap of their lengths (bit 32 - len); and those longer prefixes, each mapped to
    the OR-propagated mask over all stored prefixes containing it. A /16 with more than
    CIDR4_PROBES distinct lengths has its odd lengths rounded up (a /25 becomes two /26 with
    its mask, unless a stored /26 is already there: that one holds the mask and more), so
    that the program probes at most CIDR4_PROBES lengths."""
    masks = [0] * CIDR4_INDEX_SLOTS
    lengths: dict[int, int] = {}
    long: dict[tuple[int, int], int] = {}
    short: list[tuple[int, int, int]] = []
    for key, mask in propagate_prefixes(v4, 32).items():
        length, value = key
        if length <= 16:
            short.append((length, value >> 16, mask))
        else:
            long[key] = mask
            top = value >> 16
            lengths[top] = lengths.get(top, 0) | 1 << (32 - length)
    # A slot's mask is the OR over the short prefixes containing it. Those are nested, and
    # each one's propagated mask already holds the masks of all stored prefixes containing
    # it, so the longest one's mask is that OR: filling the slots shortest first, each
    # range overwriting the slots it covers, gives exactly it.
    short.sort()
    for length, top, mask in short:
        size = 1 << (16 - length)
        start = top & -size
        masks[start : start + size] = [mask] * size
    crowded = {top for top, bits in lengths.items() if bits.bit_count() > CIDR4_PROBES}
    if crowded:
        odd = [(key, mask) for key, mask in long.items() if key[0] % 2 and key[1] >> 16 in crowded]
        for (length, value), _ in odd:
            del long[(length, value)]
        for (length, value), mask in odd:
            for child in (value, value | 1 << (31 - length)):
                long.setdefault((length + 1, child), mask)
        for top in crowded:
            bits = lengths[top]
            lengths[top] = (bits & 0x5555) | (
                bits & 0xAAAA
            ) >> 1  # odd len: bit 32 - len -> 31 - len
    return masks, lengths, long


def _add(table: dict[tuple[int, int], int], key: tuple[int, int], bit: int) -> None:
    table[key] = table.get(key, 0) | bit


def _cidr_tables(
    rules: Sequence[NetworkRule | SocketAddressRule],
) -> tuple[dict[tuple[int, int], int], dict[tuple[int, int], int]]:
    v4: dict[tuple[int, int], int] = {}
    v6: dict[tuple[int, int], int] = {}
    for index, rule in enumerate(rules):
        bit = 1 << index
        for net in rule.cidrs:
            table = v4 if isinstance(net, ipaddress.IPv4Network) else v6
            _add(table, (net.prefixlen, int(net.network_address)), bit)
    return v4, v6


def _port_table(rules: Sequence[NetworkRule | SocketAddressRule]) -> dict[tuple[int, int], int]:
    table: dict[tuple[int, int], int] = {}
    for index, rule in enumerate(rules):
        for ports in rule.ports:
            for prefix in port_prefixes(ports.low, ports.high):
                _add(table, prefix, 1 << index)
    return table


def _net_config(
    default: str,
    rules: Sequence[NetworkRule | SocketAddressRule],
    audit: bool,
    any_icmp: int,
    any_iface: int,
) -> bytes:
    """struct cgp_net_config."""
    protocol_any = _mask(i for i, rule in enumerate(rules) if rule.protocol == "any")
    return NET_CONFIG.pack(
        v=_verdict(default, rules, audit),
        any_cidr=_mask(i for i, rule in enumerate(rules) if not rule.cidrs),
        any_port=_mask(i for i, rule in enumerate(rules) if not rule.ports),
        any_icmp=any_icmp,
        any_iface=any_iface,
        proto=[
            protocol_any
            if name == "other"  # exactly the rules with protocol any
            else protocol_any | _mask(i for i, rule in enumerate(rules) if rule.protocol == name)
            for name in PROTO_SLOTS
        ],
    )


# --- network (cgroup_skb) ---------------------------------------------------------------------


def _resolve(rules: Sequence[NetworkRule], resolver: InterfaceResolver | None) -> list[set[int]]:
    found: list[set[int]] = []
    for rule in rules:
        if not rule.interfaces:
            found.append(set())
            continue
        if resolver is None:
            raise CompileError(
                f"rule naming interfaces {list(rule.interfaces)} needs an interface resolver"
            )
        # A rule whose interfaces match nothing now never matches until recompiled.
        found.append(set(resolver(rule.interfaces)))
    return found


def _network_maps(
    default: str,
    rules: Sequence[NetworkRule],
    audit: bool,
    ifindexes: Sequence[set[int]],
    index_min: int,
) -> dict[str, MapSpec]:
    any_icmp = _mask(i for i, rule in enumerate(rules) if not rule.icmp_types)
    any_iface = _mask(i for i, rule in enumerate(rules) if not rule.interfaces)
    icmp: dict[int, int] = {}
    ifaces: dict[int, int] = {}
    for index, rule in enumerate(rules):
        for icmp_type in rule.icmp_types:
            icmp[icmp_type] = icmp.get(icmp_type, 0) | 1 << index
        for ifindex in ifindexes[index]:
            ifaces[ifindex] = ifaces.get(ifindex, 0) | 1 << index
    v4, v6 = _cidr_tables(rules)
    return {
        "config": _config(_net_config(default, rules, audit, any_icmp, any_iface)),
        **_cidr4_maps(v4, index_min),
        "cidr6": _lpm_map("cidr6", LPM6_KEY, v6),
        "ports": _lpm_map("ports", LPM_PORT_KEY, _port_table(rules)),
        "icmp_types": _array(
            "icmp_types", U64.size, 256, {t: U64.pack(m) for t, m in icmp.items()}
        ),
        "ifaces": MapSpec(
            "ifaces",
            "hash",
            U32.size,
            U64.size,
            max(1, len(ifaces)),
            0,
            tuple((U32.pack(k), U64.pack(ifaces[k])) for k in sorted(ifaces)),
        ),
        "counters": _counters(),
    }


# --- sockets (cgroup_sock_addr, cgroup_sock) --------------------------------------------------


def _socket_address_maps(
    section: SocketAddressSection, audit: bool, keys: RuleKeys, index_min: int
) -> dict[str, MapSpec]:
    rules = ordered_rules(section.rules, keys)
    all_rules = _mask(range(len(rules)))
    v4, v6 = _cidr_tables(rules)
    return {
        # No icmpTypes or interfaces in socket rules: every rule passes those conditions.
        "config": _config(_net_config(section.default, rules, audit, all_rules, all_rules)),
        **_cidr4_maps(v4, index_min),
        "cidr6": _lpm_map("cidr6", LPM6_KEY, v6),
        "ports": _lpm_map("ports", LPM_PORT_KEY, _port_table(rules)),
        "counters": _counters(),
    }


def _value_table(
    rules: Sequence[SocketCreateRule], field: str, slots: int
) -> tuple[int, list[int]]:
    """(rules with "any", per value: rules accepting it) for one socket() argument."""
    any_mask = _mask(i for i, rule in enumerate(rules) if getattr(rule, field) is None)
    table = [any_mask] * slots
    for index, rule in enumerate(rules):
        value = getattr(rule, field)
        if value is not None:
            if not 0 <= value < slots:
                raise CompileError(f"socket {field} {value} is outside 0..{slots - 1}")
            table[value] |= 1 << index
    return any_mask, table


def _create_maps(section: SocketCreateSection, audit: bool, keys: RuleKeys) -> dict[str, MapSpec]:
    rules = ordered_rules(section.rules, keys)
    any_family, families = _value_table(rules, "family", SOCKET_FAMILY_SLOTS)
    any_type, types = _value_table(rules, "type", SOCKET_TYPE_SLOTS)
    any_protocol, protocols = _value_table(rules, "protocol", SOCKET_PROTOCOL_SLOTS)
    value = CREATE_CONFIG.pack(
        v=_verdict(section.default, rules, audit),
        any_family=any_family,
        any_type=any_type,
        any_protocol=any_protocol,
        family=families,
        type=types,
        protocol=protocols,
    )
    return {"config": _config(value), "counters": _counters()}


# --- devices (cgroup_device) ------------------------------------------------------------------


def _device_maps(section: DeviceSection, audit: bool, keys: RuleKeys) -> dict[str, MapSpec]:
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
        v=_verdict(section.default, rules, audit),
        nrules=len(rules),
        pad=0,
        rules=entries + [unused] * (MAX_RULES - len(rules)),
    )
    return {"config": _config(value), "counters": _counters()}


# --- sysctl (cgroup_sysctl) -------------------------------------------------------------------


def _sysctl_maps(section: SysctlSection, audit: bool, keys: RuleKeys) -> dict[str, MapSpec]:
    rules = ordered_rules(section.rules, keys)
    try:
        dfa = sysctl_dfa([rule.name for rule in rules])
    except TooManyStates as error:
        raise CompileError(str(error)) from None
    read = _mask(i for i, rule in enumerate(rules) if _SYSCTL_ACCESS[rule.access][0])
    write = _mask(i for i, rule in enumerate(rules) if _SYSCTL_ACCESS[rule.access][1])
    value = SYSCTL_CONFIG.pack(
        v=_verdict(section.default, rules, audit),
        read_mask=read,
        write_mask=write,
        nclasses=dfa.nclasses,
        byte_class=dfa.byte_class,
    )
    nstates = len(dfa.accept)
    return {
        "config": _config(value),
        "sysctl_next": _array(
            "sysctl_next",
            U32.size,
            len(dfa.next),
            {i: U32.pack(s) for i, s in enumerate(dfa.next) if s},
        ),
        "sysctl_accept": _array(
            "sysctl_accept",
            U64.size,
            nstates,
            {i: U64.pack(m) for i, m in enumerate(dfa.accept) if m},
        ),
        "counters": _counters(),
    }
