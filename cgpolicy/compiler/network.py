"""The maps of bpf/net.c: network sections (cgroup_skb ingress and egress) and socket
address sections (bind, connect, sendmsg: cgroup_sock_addr), which share its CIDR and port
lookups: LPM tries of OR-propagated rule masks, for long IPv4 lists a /16 index, and for
IPv6 an index of its own (:mod:`cgpolicy.compiler.cidr6`)."""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Callable, Sequence
from typing import Any

from cgpolicy.compiler.canonical import RuleKeys, ordered_rules
from cgpolicy.compiler.cidr6 import CIDR6_FLAT_MAX, cidr6_maps
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
    CIDR4_INDEX_ENTRY,
    CIDR4_LONG_KEY,
    CIDR4_PROBES,
    GENERATION_BITS,
    IFACE_KEY,
    LPM4_KEY,
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
CIDR4_INDEX_SLOTS = 1 << 16  # cidr4_idx: one entry per /16


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


def _cidr4_maps(v4: dict[tuple[int, int], int], index_min: int) -> dict[str, MapSpec]:
    """The IPv4 maps of bpf/net.c: cidr4, cidr4_idx and cidr4_long. Fewer than ``index_min``
    prefixes keep the LPM trie with 1-entry placeholders for the index; more get the /16
    index (:func:`cidr4_index`) and an empty trie."""
    if len(v4) < index_min:
        return {
            "cidr4": _lpm_map("cidr4", LPM4_KEY, v4),
            # one slot, past the end for copy 1: a lookup there finds nothing, as in copy 0
            "cidr4_idx": MapSpec(
                "cidr4_idx", "array", U32.size, CIDR4_INDEX_ENTRY.size, 1, 0, (), two_copies=True
            ),
            "cidr4_long": _two_copy_map("cidr4_long", "hash", CIDR4_LONG_KEY.size, ()),
        }
    masks, lengths, long = cidr4_index(v4)
    index = _index_entries(masks, lengths)
    hashed = tuple(
        (CIDR4_LONG_KEY.struct.pack(1 << (32 - length), value, 0), U64.pack(mask))
        for (length, value), mask in long.items()
    )
    return {
        "cidr4": _lpm_map("cidr4", LPM4_KEY, {}),
        "cidr4_idx": _two_copy_array("cidr4_idx", CIDR4_INDEX_ENTRY.size, CIDR4_INDEX_SLOTS, index),
        "cidr4_long": _two_copy_map("cidr4_long", "hash", CIDR4_LONG_KEY.size, hashed),
    }


def _index_entries(masks: list[int], lengths: dict[int, int]) -> tuple[tuple[bytes, bytes], ...]:
    """The cidr4_idx entries (struct cgp_idx4 per /16 with anything in it, in slot order).
    A short prefix such as /0 puts something in up to 65,536 slots, most of them alike, so
    the values are packed once per distinct mask, and the slots in use are found in C."""
    entry = CIDR4_INDEX_ENTRY.struct  # mask, lengths, pad
    packed = {mask: entry.pack(mask, 0, 0) for mask in set(masks)}
    slots = set(itertools.compress(range(CIDR4_INDEX_SLOTS), masks)).union(lengths)
    return tuple(
        (
            U32.pack(slot),
            packed[masks[slot]]
            if slot not in lengths
            else entry.pack(masks[slot], lengths[slot], 0),
        )
        for slot in sorted(slots)
    )


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
    index_min: int,
    dns: DnsConfig,
    cidr6_flat_max: int = CIDR6_FLAT_MAX,
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
        **_cidr4_maps(v4, index_min),
        **cidr6_maps(v6, cidr6_flat_max),
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
    index_min: int,
    dns: DnsConfig,
    cidr6_flat_max: int = CIDR6_FLAT_MAX,
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
        **_cidr4_maps(v4, index_min),
        **cidr6_maps(v6, cidr6_flat_max),
        "ports": _lpm_map("ports", LPM_PORT_KEY, _port_table(rules)),
        "counters": counters_map(),
    }
