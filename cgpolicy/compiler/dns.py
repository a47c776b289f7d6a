"""The maps and programs that learn addresses from DNS answers (bpf/net.c, "DNS names"):
what every net.c program needs of them, and the two tail-called programs the ingress
program hands a DNS answer to when some rule of the policy names fqdns."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cgpolicy.compiler.maps import BPF_F_NO_PREALLOC, array_map, generation_map
from cgpolicy.compiler.names import name_table
from cgpolicy.compiler.spec import MapSpec, ProgramSpec
from cgpolicy.contract import (
    CLOCK,
    DNS_JUMPS,
    DNS_KEY,
    DNS_SCOPE,
    DNS_SCRATCH,
    DNS_SEEN_WORDS,
    DNS_SLOTS,
    DNS_STATS,
    LEARNED,
    LEARNED_KEY,
    NAME_ENTRY,
    PENDING,
    PENDING_KEY,
    SERVER_LPM_KEY,
    U32,
    U64,
)
from cgpolicy.policy.model import IPNetwork, NetworkRule, SocketAddressRule

QUESTION, ANSWERS, LEARN = "cgp_dns_question", "cgp_dns_answers", "cgp_dns_learn"


def learned_map(capacity: int = 1) -> MapSpec:
    """The (cgroup, address) -> rules map: one per policy load, shared by its programs (the
    enforcer makes it from the answers program's spec); 1 entry, a placeholder, in a
    policy that names no fqdns. Entries are allocated as answers teach them, not up front;
    a full map learns nothing more until the service deletes expired entries."""
    return MapSpec(
        "learned", "hash", LEARNED_KEY.size, LEARNED.size, capacity, BPF_F_NO_PREALLOC, ()
    )


TARGETS_MAX = 65536  # target cgroups of one policy at most that learn (allocated as used)


def seen_slot(address: bytes) -> int:
    """An address's bit in dns_seen (bpf/net.c cgp_seen_slot): the top 16 bits of an
    IPv4-mapped address, else the xor of the IPv6 address's 16-bit words."""
    if address[:12] == b"\0" * 10 + b"\xff\xff":
        return int.from_bytes(address[12:14], "big")
    folded = 0
    for at in range(0, 16, 2):
        folded ^= int.from_bytes(address[at : at + 2], "big")
    return folded


def lookup_maps(used: bool) -> dict[str, MapSpec]:
    """What a program needs to look learned addresses up: dns_scope (the depths of the
    target cgroups), dns_targets (their ids) and dns_seen (which address slots ever had an
    address learned), one of each per policy load, shared by its programs (1-entry
    placeholders in a policy that names no fqdns); and the program's own dns_clock."""
    seen_words = DNS_SEEN_WORDS if used else 1
    return {
        "dns_seen": MapSpec("dns_seen", "array", U32.size, U64.size, seen_words, 0, ()),
        "dns_clock": MapSpec("dns_clock", "percpu_array", U32.size, CLOCK.size, 1, 0, ()),
        "dns_scope": MapSpec("dns_scope", "array", U32.size, DNS_SCOPE.size, 1, 0, ()),
        "dns_targets": MapSpec(
            "dns_targets",
            "hash",
            U64.size,
            U32.size,
            TARGETS_MAX if used else 1,
            BPF_F_NO_PREALLOC,
            (),
        ),
    }


def stats_map() -> MapSpec:
    """dns_stats: addresses learned, and not learned for a full map (per CPU)."""
    return MapSpec("dns_stats", "percpu_array", U32.size, DNS_STATS.size, 1, 0, ())


PENDING_MAX = 4096  # DNS queries waiting for their answer per policy (LRU)


def pending_map(used: bool) -> MapSpec:
    """The queries seen at egress, waiting for their answer at ingress: one per policy load,
    shared by its two packet programs; a 1-entry placeholder without fqdns rules."""
    return MapSpec(
        "dns_pending", "lru_hash", PENDING_KEY.size, PENDING.size, PENDING_MAX if used else 1, 0, ()
    )


def jump_map() -> MapSpec:
    """dns_jump: the question, answers and learn programs, in that order (bpf_tail_call)."""
    return MapSpec("dns_jump", "prog_array", U32.size, U32.size, DNS_JUMPS, 0, ())


def scratch_map() -> MapSpec:
    return MapSpec("dns_scratch", "percpu_array", U32.size, DNS_SCRATCH.size, 1, 0, ())


def name_rules(
    sections: dict[str, Sequence[NetworkRule | SocketAddressRule]],
) -> list[tuple[int, int, tuple[str, ...]]]:
    """(slot, rule index, fqdns) of every rule naming fqdns, by section (canonical order)."""
    return [
        (DNS_SLOTS[where], index, rule.fqdns)
        for where, rules in sections.items()
        for index, rule in enumerate(rules)
        if rule.fqdns
    ]


def dns_programs(
    key: bytes, rules: list[tuple[int, int, tuple[str, ...]]], config: MapSpec, max_learned: int
) -> tuple[ProgramSpec, ...]:
    """The question, answers and learn programs (the dns_jump slots, in order), with the
    name table under ``key`` (16 random bytes, drawn per load), the ingress program's
    ``config`` (its TTL bounds) and the learned map's capacity."""
    table = name_table(key, len(DNS_SLOTS), rules)
    names = MapSpec(
        "dns_names",
        "hash",
        U64.size,
        NAME_ENTRY.size,
        max(1, len(table)),
        0,
        tuple(
            (
                U64.pack(hashed),
                NAME_ENTRY.pack(
                    exact=entry.exact,
                    wildcard=entry.wildcard,
                    exact_name=entry.exact_name,
                    wildcard_name=entry.wildcard_name,
                ),
            )
            for hashed, entry in table.items()
        ),
    )
    key_value = DNS_KEY.pack(
        k0=int.from_bytes(key[:8], "little"), k1=int.from_bytes(key[8:16], "little")
    )
    question = {
        "dns_scratch": scratch_map(),
        "dns_key": array_map("dns_key", DNS_KEY.size, 1, {0: key_value}),
        "dns_names": names,
        "dns_jump": jump_map(),
    }
    answers = {"dns_scratch": scratch_map(), "dns_jump": jump_map()}
    learn = {
        "dns_scratch": scratch_map(),
        "config": config,
        "generation": generation_map(),
        "learned": learned_map(max_learned),
        "dns_stats": stats_map(),
        **{n: m for n, m in lookup_maps(True).items() if n != "dns_clock"},  # reads ktime
    }
    return (
        _tail_program(QUESTION, "cgp_dns_q", question),
        _tail_program(ANSWERS, "cgp_dns_a", answers),
        _tail_program(LEARN, "cgp_dns_l", learn),
    )


def _tail_program(function: str, short: str, maps: dict[str, MapSpec]) -> ProgramSpec:
    """A cgroup_skb program of net.c reached only by tail call from the ingress program."""
    return ProgramSpec("ingress", "net.c", function, short, tuple(maps[n] for n in sorted(maps)))


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """What a net.c program's config says of DNS names (cgp_net_config.dns_*)."""

    used: bool  # some rule of the policy names fqdns
    min_ttl: int
    max_ttl: int
    max_learned: int
    servers: tuple[IPNetwork, ...]  # whose answers teach; empty: any server's

    def fields(
        self, section: str, rules: Sequence[NetworkRule | SocketAddressRule]
    ) -> dict[str, Any]:
        """The config members for one section's program."""
        return {
            "fqdn_rules": sum(1 << i for i, rule in enumerate(rules) if rule.fqdns),
            "dns_slot": DNS_SLOTS.get(section, 0),
            # ingress learns from answers to the queries egress saw leave
            "dns_learn": int(self.used and section in ("network.ingress", "network.egress")),
            "min_ttl": self.min_ttl,
            "max_ttl": self.max_ttl,
            "dns_any_server": int(not self.servers),
            "pad": 0,
        }

    def servers_map(self) -> MapSpec:
        """dns_servers: the servers as IPv6 prefixes (IPv4 as ::ffff:a.b.c.d/96+n)."""
        entries = []
        for server in self.servers:
            if server.version == 4:
                mapped = ipaddress.IPv6Address(f"::ffff:{server.network_address}")
                prefix, length = mapped.packed, 96 + server.prefixlen
            else:
                prefix, length = server.network_address.packed, server.prefixlen
            entries.append((SERVER_LPM_KEY.pack(prefixlen=length, addr=prefix), U64.pack(1)))
        return MapSpec(
            "dns_servers",
            "lpm_trie",
            SERVER_LPM_KEY.size,
            U64.size,
            max(1, len(entries)),
            BPF_F_NO_PREALLOC,
            tuple(sorted(entries)),
        )
