"""The maps of bpf/net.c: network sections (cgroup_skb ingress and egress) and socket
address sections (bind, connect, sendmsg: cgroup_sock_addr), which share its CIDR and port
lookups: an LPM trie of OR-propagated rule masks for ports, and for IPv4 and IPv6 prefixes
an index each (:mod:`cgpolicy.compiler.cidr6`)."""

from __future__ import annotations

import ipaddress
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
    GENERATION_BITS,
    IFACE_KEY,
    LPM_PORT_KEY,
    NET_CONFIG,
    PROTO_SLOTS,
    U32,
    U64,
    Layout,
)
from cgpolicy.policy.model import (
    NetworkRule,
    SocketAddressRule,
    SocketAddressSection,
)

InterfaceResolver = Callable[[tuple[str, ...]], set[int]]


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
    """A two-copy LPM trie keyed by ``key`` (struct cgp_lpm*: the prefix length, the
    generation, then the data), copy 0 filled."""
    _, _, data = key.fields.values()
    entries = tuple(
        (
            key.struct.pack(GENERATION_BITS + length, 0, value.to_bytes(data.size, "big")),
            U64.pack(mask),
        )
        for (length, value), mask in sorted(propagate_prefixes(prefixes, 8 * data.size).items())
    )
    return _two_copy_map(name, "lpm_trie", key.size, entries)


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
            # what prefixlen and int(network_address) return, without two Python calls each
            key = (net._prefixlen, net.network_address._ip)  # type: ignore[union-attr]
            table[key] = table.get(key, 0) | bit
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
        "ports": _lpm_map("ports", LPM_PORT_KEY, _port_table(rules)),
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
        "ports": _lpm_map("ports", LPM_PORT_KEY, _port_table(rules)),
        "counters": counters_map(),
    }
