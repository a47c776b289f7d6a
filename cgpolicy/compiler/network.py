"""The maps of bpf/net.c: network sections (cgroup_skb ingress and egress) and socket
address sections (bind, connect, sendmsg: cgroup_sock_addr), which share its CIDR and port
lookups: a table of rule masks by port (:func:`_port_maps`), and for IPv4 and IPv6 prefixes
an index each (:mod:`cgpolicy.compiler.cidr6`)."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Any

from cgpolicy.compiler.canonical import RuleKeys, ordered_rules
from cgpolicy.compiler.cidr6 import CIDR6_FLAT_MAX, cidr4_maps, cidr6_maps
from cgpolicy.compiler.dns import (
    DnsConfig,
    jump_map,
    learned_map,
    lookup_maps,
    pending_map,
    scratch_map,
    stats_map,
)
from cgpolicy.compiler.maps import (
    BPF_F_NO_PREALLOC,
    counters_map,
    generation_map,
    rule_mask,
    two_copy_capacity,
    two_copy_config_map,
    verdict,
)
from cgpolicy.compiler.spec import CompileError, MapSpec
from cgpolicy.contract import (
    IFACE_KEY,
    NET_CONFIG,
    PORT_HI,
    PROTO_SLOTS,
    U32,
    U64,
)
from cgpolicy.policy.model import (
    NetworkRule,
    SocketAddressRule,
    SocketAddressSection,
)

InterfaceResolver = Callable[[tuple[str, ...]], set[int]]


def _port_masks(rules: Sequence[NetworkRule | SocketAddressRule]) -> list[tuple[int, int]]:
    """(first port, mask of the rules whose ports contain it) where the mask changes, from
    port 0, in port order: a sweep over the ends of every rule's port ranges."""
    ends: dict[int, list[tuple[int, int]]] = {}  # port -> (rule index, +1 or -1)
    for index, rule in enumerate(rules):
        for ports in rule.ports:
            ends.setdefault(ports.low, []).append((index, 1))
            ends.setdefault(ports.high + 1, []).append((index, -1))
    inside = [0] * len(rules)  # how many of each rule's ranges hold the current port
    steps = [] if 0 in ends else [(0, 0)]
    for port in sorted(ends):
        if port > _PORTS:
            break  # (the ends of ranges up to the last port)
        for index, step in ends[port]:
            inside[index] += step
        mask = rule_mask(i for i, count in enumerate(inside) if count)
        if not steps or mask != steps[-1][1]:
            steps.append((port, mask))
    return steps


_PORTS = 0xFFFF
_BLOCK = 256  # ports per entry of the map "ports" (by high byte)


def _port_maps(rules: Sequence[NetworkRule | SocketAddressRule]) -> dict[str, MapSpec]:
    """The maps "ports" and "port_blocks" (bpf/net.c cgp_port_mask), two copies each: per
    256 ports, the rules of them all, or a block of the rules port by port where a rule's
    ports begin or end inside. Sized to the blocks: a change that splits more or fewer
    blocks is a reload (enforcer/inplace.py keeps an array's size)."""
    steps = _port_masks(rules)
    starts = [port for port, _ in steps]
    ranges: list[tuple[int, int, int]] = []  # (high byte, mask, block), block 0: uniform
    blocks: list[int] = []  # port by port, the blocks' masks in order
    for high in range(_PORTS // _BLOCK + 1):
        first = high * _BLOCK
        at = bisect.bisect_right(starts, first) - 1
        end = bisect.bisect_right(starts, first + _BLOCK - 1)
        if end - at == 1:  # one mask for the whole block
            if steps[at][1]:
                ranges.append((high, steps[at][1], 0))
            continue
        block = len(blocks) // _BLOCK + 1
        for i in range(at, end):
            low = max(steps[i][0], first)
            top = steps[i + 1][0] if i + 1 < len(steps) else _PORTS + 1
            blocks.extend([steps[i][1]] * (min(top, first + _BLOCK) - low))
        ranges.append((high, 0, block))
    copy_size = _BLOCK * max(1, len(blocks) // _BLOCK)  # an array has one entry at least
    return {
        "ports": _two_copy_array(
            "ports",
            PORT_HI.size,
            _BLOCK,
            tuple(
                (U32.pack(high), PORT_HI.pack(mask=mask, block=block, copy_size=copy_size))
                for high, mask, block in ranges
            ),
        ),
        "port_blocks": _two_copy_array(
            "port_blocks",
            U64.size,
            copy_size,
            tuple((U32.pack(i), U64.pack(mask)) for i, mask in enumerate(blocks) if mask),
        ),
    }


def _two_copy_map(
    name: str, map_type: str, key_size: int, entries: tuple[tuple[bytes, bytes], ...]
) -> MapSpec:
    """A two-copy hash or LPM trie of rule masks (bpf/net.c, above the maps)."""
    capacity = two_copy_capacity(len(entries))
    return MapSpec(
        name, map_type, key_size, U64.size, capacity, BPF_F_NO_PREALLOC, entries, two_copies=True
    )


def _two_copy_array(
    name: str, value_size: int, slots: int, entries: tuple[tuple[bytes, bytes], ...]
) -> MapSpec:
    """A two-copy array of ``slots`` entries per copy (copy 1 at index slots + i)."""
    return MapSpec(name, "array", U32.size, value_size, 2 * slots, 0, entries, two_copies=True)


def _cidr_tables(
    rules: Sequence[NetworkRule | SocketAddressRule],
) -> tuple[dict[tuple[int, int], int], dict[tuple[int, int], int]]:
    v4: dict[tuple[int, int], int] = {}
    v6: dict[tuple[int, int], int] = {}
    for index, rule in enumerate(rules):
        bit = 1 << index
        for table, prefixes in zip((v4, v6), rule.cidrs.tables(), strict=True):
            for key in prefixes:
                table[key] = table.get(key, 0) | bit
    return v4, v6


def _net_config(
    default: str,
    rules: Sequence[NetworkRule | SocketAddressRule],
    audit: bool,
    any_icmp: int,
    any_iface: int,
    dns: dict[str, Any],
) -> bytes:
    """struct cgp_net_config. A rule naming fqdns is not a rule of any address: its address
    matches through the learned map only (``dns``: the DnsConfig fields)."""
    protocol_any = rule_mask(i for i, rule in enumerate(rules) if rule.protocol == "any")
    return NET_CONFIG.pack(
        v=verdict(default, rules, audit),
        any_cidr=rule_mask(i for i, rule in enumerate(rules) if not rule.cidrs and not rule.fqdns),
        any_port=rule_mask(i for i, rule in enumerate(rules) if not rule.ports),
        any_icmp=any_icmp,
        any_iface=any_iface,
        proto=[
            protocol_any
            if name == "other"  # exactly the rules with protocol any
            else protocol_any
            | rule_mask(i for i, rule in enumerate(rules) if rule.protocol == name)
            for name in PROTO_SLOTS
        ],
        **dns,
    )


def interface_sets(
    rules: Sequence[NetworkRule], resolver: InterfaceResolver | None
) -> list[set[int]]:
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


def network_maps(
    direction: str,
    default: str,
    rules: Sequence[NetworkRule],
    audit: bool,
    ifindexes: Sequence[set[int]],
    dns: DnsConfig,
    cidr_flat_max: int = CIDR6_FLAT_MAX,
) -> dict[str, MapSpec]:
    any_icmp = rule_mask(i for i, rule in enumerate(rules) if not rule.icmp_types)
    any_iface = rule_mask(i for i, rule in enumerate(rules) if not rule.interfaces)
    icmp: dict[int, int] = {}
    ifaces: dict[int, int] = {}
    for index, rule in enumerate(rules):
        for icmp_type in rule.icmp_types:
            icmp[icmp_type] = icmp.get(icmp_type, 0) | 1 << index
        for ifindex in ifindexes[index]:
            ifaces[ifindex] = ifaces.get(ifindex, 0) | 1 << index
    v4, v6 = _cidr_tables(rules)
    section = f"network.{direction}"
    config = _net_config(default, rules, audit, any_icmp, any_iface, dns.fields(section, rules))
    names: dict[str, MapSpec] = {}
    if dns.used:  # the program's names variant (bpf/net.c cgp_skb): its DNS maps
        names = {
            "learned": learned_map(dns.max_learned),
            **lookup_maps(True),
            "dns_pending": pending_map(True),
            # ingress learns from answers, egress notes the queries to servers
            **(
                {"dns_scratch": scratch_map(), "dns_jump": jump_map(), "dns_stats": stats_map()}
                if direction == "ingress"
                else {"dns_servers": dns.servers_map()}
            ),
        }
    return {
        "generation": generation_map(),
        "config": two_copy_config_map(config),
        **names,
        **cidr4_maps(v4, cidr_flat_max),
        **cidr6_maps(v6, cidr_flat_max),
        **_port_maps(rules),
        "icmp_types": _two_copy_array(
            "icmp_types",
            U64.size,
            256,
            tuple((U32.pack(t), U64.pack(icmp[t])) for t in sorted(icmp)),
        ),
        "ifaces": _two_copy_map(
            "ifaces",
            "hash",
            IFACE_KEY.size,
            tuple((IFACE_KEY.struct.pack(k, 0), U64.pack(ifaces[k])) for k in sorted(ifaces)),
        ),
        "counters": counters_map(),
    }


def socket_address_maps(
    where: str,
    section: SocketAddressSection,
    audit: bool,
    keys: RuleKeys,
    dns: DnsConfig,
    cidr_flat_max: int = CIDR6_FLAT_MAX,
) -> dict[str, MapSpec]:
    rules = ordered_rules(section.rules, keys)
    all_rules = rule_mask(range(len(rules)))
    v4, v6 = _cidr_tables(rules)
    # No icmpTypes or interfaces in socket rules: every rule passes those conditions.
    fields = dns.fields(where, rules)
    names = {"learned": learned_map(dns.max_learned), **lookup_maps(True)} if dns.used else {}
    return {
        "generation": generation_map(),
        "config": two_copy_config_map(
            _net_config(section.default, rules, audit, all_rules, all_rules, fields)
        ),
        **names,  # the names variant's (contract.names_variant)
        **cidr4_maps(v4, cidr_flat_max),
        **cidr6_maps(v6, cidr_flat_max),
        **_port_maps(rules),
        "counters": counters_map(),
    }
