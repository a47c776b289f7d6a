"""The maps a policy with `fqdns` rules shares between its programs, per load: made with
the new programs, pinned with them, kept up to date as targets come and go, and filled on a
reload from the version they replace (bpf/net.c, "DNS names")."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath

from cgpolicy.compiler.dns import seen_slot
from cgpolicy.compiler.names import carried_rules, surely_matched
from cgpolicy.compiler.spec import CompiledPolicy, MapSpec
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
from cgpolicy.kernel.applied import monotonic_ns, read_policy
from cgpolicy.kernel.bpf import Map
from cgpolicy.kernel.cgroup import cgroup_id, open_cgroup
from cgpolicy.kernel.loader import create_map
from cgpolicy.kernel.syscall import BPF_NOEXIST, MAP_TYPES, BpfError

log = logging.getLogger(__name__)

ROOT_CGROUP_ID = 1  # the id of a cgroup2 hierarchy's root


class DnsError(Exception):
    """The DNS maps of a policy cannot be made or kept right."""


@dataclass
class DnsMaps:
    """One policy load's shared DNS maps (their names are the C's and the pins'). The
    pending queries and the seen slots outlive a load: a reload takes over the old load's
    (an answer to a query the old programs noted still teaches; a bit the old programs set
    is set for the new ones), the rest are new."""

    learned: Map
    dns_pending: Map
    dns_jump: Map
    dns_stats: Map
    dns_scope: Map
    dns_targets: Map
    dns_seen: Map
    seen_is_new: bool  # dns_seen was made here, not taken over: carried entries need bits

    @classmethod
    def create(cls, compiled: CompiledPolicy, folder: Path) -> DnsMaps:
        kept = {"dns_pending": pins.DNS_PENDING_PIN, "dns_seen": pins.DNS_SEEN_PIN}
        specs = [compiled.dns_map(f.name) for f in fields(cls) if f.name not in _NOT_MAPS]
        made: dict[str, Map] = {}
        seen_is_new = True
        try:
            for spec in specs:
                pinned = _pinned_like(folder / kept[spec.name], spec) if spec.name in kept else None
                seen_is_new &= not (spec.name == "dns_seen" and pinned is not None)
                made[spec.name] = pinned or create_map(spec)
        except BpfError as error:
            for done in made.values():
                done.close()
            raise DnsError(f"creating the maps of DNS names failed: {error}") from error
        return cls(**made, seen_is_new=seen_is_new)

    def shared(self) -> dict[str, Map]:
        """By the name the programs' C gives each map."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_MAPS}

    def pinned(self) -> list[tuple[Map, str]]:
        """The maps to pin, and their pin names."""
        return [
            (self.learned, pins.LEARNED_PIN),
            (self.dns_pending, pins.DNS_PENDING_PIN),
            (self.dns_jump, pins.DNS_JUMP_PIN),
            (self.dns_stats, pins.DNS_STATS_PIN),
            (self.dns_scope, pins.DNS_SCOPE_PIN),
            (self.dns_targets, pins.DNS_TARGETS_PIN),
            (self.dns_seen, pins.DNS_SEEN_PIN),
        ]

    def close(self) -> None:
        for shared in self.shared().values():
            shared.close()


_NOT_MAPS = {"seen_is_new"}


def _pinned_like(path: Path, spec: MapSpec) -> Map | None:
    """The map pinned at ``path`` if it is one ``spec`` describes, else None."""
    try:
        found = Map.from_pin(path)
    except (BpfError, OSError):
        return None
    info = found.info
    if (info.type, info.key_size, info.value_size, info.max_entries) != (
        MAP_TYPES[spec.map_type],
        spec.key_size,
        spec.value_size,
        spec.max_entries,
    ):
        found.close()
        return None
    return found


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


class LearnedCarry:
    """What a reload's new learned map takes over from the one it replaces, so that a policy
    edit does not refuse addresses its workloads resolved before it: each live entry keeps
    its expiry (cut to the new maxTTL) and matches the new version's rules that its name
    matches for sure (names.carried_rules). Twice: before the links move, then after, for
    what the old programs learned in between (new entries win). Best effort: nothing
    carried is no worse than a first load. Nothing is carried from an interrupted apply,
    whose metadata may not describe the pinned maps."""

    def __init__(self, folder: Path, compiled: CompiledPolicy, maps: DnsMaps) -> None:
        self.compiled, self.maps = compiled, maps
        self.old: Map | None = None
        self.names: list[str] = []
        self.since = 0
        applied = read_policy(folder, links=False) if folder.is_dir() else None
        if applied is None or applied.interrupted or applied.meta is None:
            return
        self.names = applied.meta.names
        if self.names:
            try:
                self.old = Map.from_pin(folder / pins.LEARNED_PIN)
            except (BpfError, OSError):
                self.old = None

    def before_links_move(self) -> None:
        """Everything live, into the new map, which no program uses yet."""
        if self.old is None:
            return
        self.since = monotonic_ns()
        entries = self._carried(self.since, learned_after=0)
        entries = entries[: self.maps.learned.info.max_entries]
        seen: dict[int, int] = {}
        if self.maps.seen_is_new:  # else the old programs set them, in this very map
            for key, _ in entries:
                slot = seen_slot(bytes(LEARNED_KEY.unpack_from(key)["addr"]))
                seen[slot >> 6] = seen.get(slot >> 6, 0) | 1 << (slot & 63)
        try:
            self.maps.dns_seen.update_batch([(U32.pack(w), U64.pack(b)) for w, b in seen.items()])
            self.maps.learned.update_batch(entries)
        except BpfError as error:
            log.warning("policy %s: learned addresses not carried: %s", self.compiled.name, error)

    def after_links_moved(self) -> None:
        """What the old programs learned since, where the new ones have nothing yet."""
        if self.old is None:
            return
        for key, value in self._carried(monotonic_ns(), learned_after=self.since):
            try:
                self.maps.learned.update(key, value, BPF_NOEXIST)
            except BpfError:
                continue  # learned anew meanwhile, or the map is full

    def close(self) -> None:
        if self.old is not None:
            self.old.close()

    def _carried(self, now: int, learned_after: int) -> list[tuple[bytes, bytes]]:
        assert self.old is not None
        new_ids = {name: number for number, name in enumerate(self.compiled.names, start=1)}
        longest = now + self.compiled.dns_max_ttl * 1_000_000_000
        carried: list[tuple[int, bytes, bytes]] = []
        try:
            for key, raw in self.old.items():
                value = LEARNED.unpack_from(raw)
                name_id = value["name_id"]
                if value["expires_ns"] <= now or value["learned_ns"] <= learned_after:
                    continue
                if not 0 < name_id <= len(self.names):
                    continue
                pattern = self.names[name_id - 1]
                rules = carried_rules(pattern, len(DNS_SLOTS), self.compiled.name_rules)
                if not any(rules):
                    continue
                value.update(
                    rules=rules,
                    name_id=_carried_name(pattern, new_ids),
                    expires_ns=min(value["expires_ns"], longest),
                )
                carried.append((value["expires_ns"], key, LEARNED.pack(**value)))
        except BpfError as error:
            log.warning("policy %s: learned addresses not carried: %s", self.compiled.name, error)
        carried.sort(reverse=True)  # the longest-lived first, should the new map be smaller
        return [(key, value) for _, key, value in carried]


def _carried_name(pattern: str, new_ids: dict[str, int]) -> int:
    """The id in the new version of the most specific pattern surely matching ``pattern``."""
    matching = [name for name in new_ids if surely_matched(pattern, [name])]
    return new_ids[max(matching, key=len)] if matching else 0
