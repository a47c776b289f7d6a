"""The maps a policy with `fqdns` rules shares between its programs, per load: made with
the new programs, pinned with them, kept up to date as targets come and go, and filled on a
reload from the version they replace (bpf/net.c, "DNS names")."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath

from cgpolicy.compiler.dns import pending_map, seen_slot
from cgpolicy.compiler.names import carried_rules, surely_matched
from cgpolicy.compiler.spec import CompiledPolicy
from cgpolicy.contract import (
    DNS_SCOPE,
    DNS_SLOTS,
    DNS_TARGET_LEVELS,
    LEARNED,
    LEARNED_KEY,
    U32,
    U64,
)
from cgpolicy.kernel import pins
from cgpolicy.kernel.applied import monotonic_ns
from cgpolicy.kernel.bpf import Map
from cgpolicy.kernel.cgroup import cgroup_id, open_cgroup
from cgpolicy.kernel.loader import create_map
from cgpolicy.kernel.syscall import BpfError

log = logging.getLogger(__name__)

ROOT_CGROUP_ID = 1  # the id of a cgroup2 hierarchy's root


class DnsError(Exception):
    """The DNS maps of a policy cannot be made or kept right."""


@dataclass
class DnsMaps:
    """One policy load's shared DNS maps (their names are the C's and the pins')."""

    learned: Map
    dns_pending: Map
    dns_jump: Map
    dns_stats: Map
    dns_scope: Map
    dns_targets: Map
    dns_seen: Map

    @classmethod
    def create(cls, compiled: CompiledPolicy) -> DnsMaps:
        made: list[Map] = []
        try:
            for spec in (
                compiled.dns_map("learned"),
                pending_map(True),
                compiled.dns_map("dns_jump"),
                compiled.dns_map("dns_stats"),
                compiled.dns_map("dns_scope"),
                compiled.dns_map("dns_targets"),
                compiled.dns_map("dns_seen"),
            ):
                made.append(create_map(spec))
        except BpfError as error:
            for done in made:
                done.close()
            raise DnsError(f"creating the maps of DNS names failed: {error}") from error
        return cls(*made)

    def shared(self) -> dict[str, Map]:
        """By the name the programs' C gives each map."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def pinned(self) -> list[tuple[Map, str]]:
        """The maps to pin, and their pin names (the pending queries and the seen slots need
        no reader)."""
        return [
            (self.learned, pins.LEARNED_PIN),
            (self.dns_jump, pins.DNS_JUMP_PIN),
            (self.dns_stats, pins.DNS_STATS_PIN),
            (self.dns_scope, pins.DNS_SCOPE_PIN),
            (self.dns_targets, pins.DNS_TARGETS_PIN),
        ]

    def close(self) -> None:
        for shared in self.shared().values():
            shared.close()


def check_hierarchy_root(cgroup_root: Path) -> None:
    """Target depths are counted from the hierarchy's root, which the programs see; a mount
    of a sub-tree (inside a cgroup namespace) would shift them and key learned addresses
    by the wrong cgroup, so it is refused."""
    fd = open_cgroup(cgroup_root)
    try:
        found = cgroup_id(fd)
    finally:
        os.close(fd)
    if found != ROOT_CGROUP_ID:
        raise DnsError(
            f"DNS names need the cgroup2 hierarchy's root mounted; {cgroup_root} is a "
            f"sub-tree (cgroup id {found}, in a cgroup namespace?)"
        )


def publish_targets(scope: Map, targets: Map, cgroups: dict[int, str]) -> None:
    """Make dns_targets hold exactly ``cgroups`` (id -> path relative to the hierarchy's
    root) and dns_scope their depths, deepest first. Called with the old and new targets
    together before links move, and with the new ones alone after the old links went, so
    a packet never finds its target missing."""
    depths = sorted({len(PurePosixPath(path).parts) for path in cgroups.values()}, reverse=True)
    if len(depths) > DNS_TARGET_LEVELS:
        raise DnsError(
            f"DNS names: target cgroups at {len(depths)} different depths, at most "
            f"{DNS_TARGET_LEVELS} are supported"
        )
    wanted = {U64.pack(found) for found in cgroups}
    stale = [key for key in targets.keys() if key not in wanted]
    targets.update_batch([(key, U32.pack(1)) for key in sorted(wanted)])
    levels = depths + [0] * (DNS_TARGET_LEVELS - len(depths))
    scope.update(U32.pack(0), DNS_SCOPE.pack(count=len(depths), level=tuple(levels), pad=0))
    for key in stale:
        targets.delete(key)


def carry_learned(folder: Path, compiled: CompiledPolicy, maps: DnsMaps) -> None:
    """Fill a reload's new learned map from the one it replaces, so that a policy edit does
    not refuse addresses its workloads resolved before it: each live entry keeps its expiry
    and matches the new version's rules that its name matches for sure
    (names.carried_rules). Best effort: nothing carried is no worse than a first load."""
    old_meta = pins.read_meta(folder)
    if old_meta is None or not old_meta.names:
        return
    now = monotonic_ns()
    new_ids = {name: number for number, name in enumerate(compiled.names, start=1)}
    carried: list[tuple[int, bytes, bytes]] = []
    try:
        with Map.from_pin(folder / pins.LEARNED_PIN) as old:
            for key, raw in old.items():
                value = LEARNED.unpack_from(raw)
                name_id = value["name_id"]
                if value["expires_ns"] <= now or not 0 < name_id <= len(old_meta.names):
                    continue
                pattern = old_meta.names[name_id - 1]
                rules = carried_rules(pattern, len(DNS_SLOTS), compiled.name_rules)
                if not any(rules):
                    continue
                value.update(rules=rules, name_id=_carried_name(pattern, new_ids))
                carried.append((value["expires_ns"], key, LEARNED.pack(**value)))
    except (BpfError, OSError) as error:
        log.warning("policy %s: learned addresses not carried over: %s", compiled.name, error)
        return
    carried.sort(reverse=True)  # the longest-lived first, should the new map be smaller
    entries = [(k, v) for _, k, v in carried[: maps.learned.info.max_entries]]
    seen: dict[int, int] = {}
    for key, _ in entries:
        slot = seen_slot(bytes(LEARNED_KEY.unpack_from(key)["addr"]))
        seen[slot >> 6] = seen.get(slot >> 6, 0) | 1 << (slot & 63)
    try:  # the programs are not attached yet: nothing else writes these maps
        maps.dns_seen.update_batch([(U32.pack(w), U64.pack(bits)) for w, bits in seen.items()])
        maps.learned.update_batch(entries)
    except BpfError as error:
        log.warning("policy %s: learned addresses not carried over: %s", compiled.name, error)


def _carried_name(pattern: str, new_ids: dict[str, int]) -> int:
    """The id in the new version of the most specific pattern surely matching ``pattern``."""
    matching = [name for name in new_ids if surely_matched(pattern, [name])]
    return new_ids[max(matching, key=len)] if matching else 0
