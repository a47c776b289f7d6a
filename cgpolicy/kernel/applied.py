"""What cgpolicy has applied, read back from its pins and the kernel's own answers.

This is the one reader of applied state: plan, audit, explain, events and the service's
metrics all start from :func:`read_applied`, so a change of the pin layout (``pins``) or of
what a program's maps hold is made here and nowhere else. The kernel is the only state:
nothing is cached between calls.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cgpolicy.contract import (
    COUNTER,
    DEFAULT_SLOT,
    DNS_SLOTS,
    DNS_STATS,
    EGRESS_AT_CONNECT,
    LEARNED,
    LEARNED_KEY,
    MAX_RULES,
    RATELIMIT,
    U32,
    attach_hook,
)
from cgpolicy.kernel import pins
from cgpolicy.kernel.bpf import Map, Program, close_all
from cgpolicy.kernel.hooks import HOOKS
from cgpolicy.kernel.syscall import BPF_NOEXIST, BpfError, pinned_cgroup_links
from cgpolicy.kernel.trusted import check_real_folder

log = logging.getLogger(__name__)

_ZERO = U32.pack(0)


@dataclass(frozen=True, slots=True)
class AppliedLink:
    cgroup_id: int  # pinned as pins.link_pin names it
    link_id: int
    prog_id: int
    attached: bool  # False once the link was detached from outside or its cgroup is gone


@dataclass
class AppliedHook:
    hook: str
    prog_id: int | None  # None when the program pin is missing
    links: dict[int, AppliedLink] = field(default_factory=dict)


@dataclass
class AppliedPolicy:
    name: str
    folder: Path
    meta: pins.PolicyMeta | None  # None: a folder without readable metadata (a broken apply)
    hooks: dict[str, AppliedHook] = field(default_factory=dict)

    @property
    def revision(self) -> str | None:
        return self.meta.revision if self.meta else None

    @property
    def interrupted(self) -> bool:
        """An apply stopped half-way (a crash, SIGKILL): links or programs are pinned but
        the metadata is missing or was written for other programs. The next apply of the
        policy reloads it whole; `audit` reports it; `remove` undoes it."""
        pinned = {hook.hook: hook.prog_id for hook in self.hooks.values()}
        return self.meta is None or self.meta.programs != pinned

    def program_ids(self) -> set[int]:
        """Every program of this policy: the pinned ones and those its links hold."""
        found = {hook.prog_id for hook in self.hooks.values() if hook.prog_id}
        for hook in self.hooks.values():
            found.update(link.prog_id for link in hook.links.values() if link.prog_id)
        return found


def _read_links(hook_folder: Path) -> dict[int, AppliedLink]:
    """The links pinned in a hook folder, by cgroup id; one whose link is gone, detached
    or attached elsewhere reads as not attached."""
    pinned = sorted(pins.link_pin_names(hook_folder).items())
    names = [name for _, name in pinned]
    links = {}
    programs: dict[int, int] = {}  # one int per program, not per link (90,000 at 10,000)
    for (cgroup_id, _), info in zip(
        pinned, pinned_cgroup_links(str(hook_folder), names), strict=True
    ):
        if info is None:
            links[cgroup_id] = AppliedLink(cgroup_id, 0, 0, attached=False)
        else:
            link_id, prog_id, attached_to = info
            links[cgroup_id] = AppliedLink(
                cgroup_id,
                link_id,
                programs.setdefault(prog_id, prog_id),
                attached=attached_to == cgroup_id,
            )
    return links


def _read_prog_id(pin: Path) -> int | None:
    try:
        with Program.from_pin(pin) as program:
            return program.id
    except (BpfError, OSError):
        return None


def read_policy(folder: Path, links: bool = True) -> AppliedPolicy:
    """One policy folder; without ``links`` only the metadata and the programs."""
    applied = AppliedPolicy(folder.name, folder, pins.read_meta(folder))
    for hook_folder in pins.real_subfolders(folder):
        if attach_hook(hook_folder.name) not in HOOKS:
            continue
        hook = AppliedHook(hook_folder.name, _read_prog_id(hook_folder / pins.PROG_PIN))
        if links:
            hook.links = _read_links(hook_folder)
        applied.hooks[hook.hook] = hook
    return applied


def read_applied(bpf_dir: Path, links: bool = True) -> dict[str, AppliedPolicy]:
    """Every policy cgpolicy has pinned under ``bpf_dir``, by name. Raises UntrustedFolder
    when the folder could be changed by someone other than root. ``links=False`` skips
    reading each link (for readers that need only metadata and programs)."""
    return {folder.name: read_policy(folder, links) for folder in pins.policy_folders(bpf_dir)}


def read_named(bpf_dir: Path, name: str, links: bool = True) -> AppliedPolicy:
    """The applied policy ``name`` (its folder is checked like every other)."""
    folder = pins.policy_dir(bpf_dir, name)
    check_real_folder(folder)
    return read_policy(folder, links)


def event_rings(bpf_dir: Path) -> dict[str, Map | None]:
    """Every applied policy's ring buffer of deny events, opened (the caller closes them);
    None for a policy without one now (applied before deny events, or being replaced).
    Cheaper than :func:`read_applied` for a reader that polls for new rings."""
    rings: dict[str, Map | None] = {}
    for folder in pins.policy_folders(bpf_dir):
        try:
            rings[folder.name] = Map.from_pin(folder / pins.EVENTS_PIN)
        except (BpfError, OSError):
            rings[folder.name] = None
    return rings


# --- what a program's maps hold ---------------------------------------------------------


def program_maps(prog_id: int, names: set[str]) -> dict[str, Map]:
    """The maps called ``names`` that program ``prog_id`` uses (the first of each name),
    opened; the caller closes them. Empty when the program is gone."""
    try:
        with Program.from_id(prog_id) as program:
            map_ids = program.info().map_ids
    except BpfError:
        return {}
    found: dict[str, Map] = {}
    try:
        for map_id in map_ids:
            try:
                candidate = Map.from_id(map_id)
            except BpfError:
                continue
            if candidate.name in names and candidate.name not in found:
                found[candidate.name] = candidate
            else:
                candidate.close()
    except BaseException:
        close_all(found.values())
        raise
    return found


def events_dropped(ratelimit: Map) -> int:
    """Deny events a program dropped so far (rate limit or full ring buffer), all CPUs."""
    values = ratelimit.lookup_per_cpu(_ZERO) or []
    return sum(RATELIMIT.unpack_from(v)["dropped"] for v in values)


def _sum(values: list[bytes] | None) -> tuple[int, int]:
    allowed = denied = 0
    for value in values or ():
        counter = COUNTER.unpack_from(value)
        allowed += counter["allowed"]
        denied += counter["denied"]
    return allowed, denied


def read_counters(prog_id: int, applied: AppliedPolicy | None, hook: str) -> dict[str, Any] | None:
    """Per-rule and default allowed/denied counts of one of a policy's programs, labelled
    with the rule text its metadata recorded, and the deny events it dropped; None when the
    program has no counters (or is gone), or counts on another program's (a connect check
    counts on the egress program's). Raises BpfError when a map cannot be read."""
    if hook in EGRESS_AT_CONNECT:
        return None
    maps = program_maps(prog_id, {"counters", "ratelimit"})
    try:
        if "counters" not in maps:
            return None
        return _label_counters(maps["counters"], maps.get("ratelimit"), applied, hook)
    finally:
        for opened in maps.values():
            opened.close()


def _label_counters(
    counters: Map, ratelimit: Map | None, applied: AppliedPolicy | None, hook: str
) -> dict[str, Any]:
    meta = applied.meta if applied else None
    # An interrupted apply's metadata may describe other programs: no rule text then, only
    # the slots that counted something (the drift says why)
    trusted = meta if applied is not None and not applied.interrupted else None
    labels = (trusted.rules.get(hook) if trusted else None) or []
    rules = []
    for slot in range(MAX_RULES):
        if slot >= len(labels) and labels:
            break
        allowed, denied = _sum(counters.lookup_per_cpu(U32.pack(slot)))
        if slot >= len(labels) and not (allowed or denied):
            continue  # no labels recorded: show the slots that counted something
        label = labels[slot] if slot < len(labels) else {}
        rules.append(
            {
                "rule": slot,
                "text": label.get("text"),
                "line": label.get("line"),
                "note": label.get("note"),  # e.g. a device path that names nothing here
                "allowed": allowed,
                "denied": denied,
            }
        )
    allowed, denied = _sum(counters.lookup_per_cpu(U32.pack(DEFAULT_SLOT)))
    return {
        "mode": meta.mode if meta else None,
        "rules": rules,
        "default": {"allowed": allowed, "denied": denied},
        "events_dropped": events_dropped(ratelimit) if ratelimit is not None else None,
    }


def counter_totals(applied: dict[str, AppliedPolicy]) -> dict[tuple[str, str], tuple[int, int]]:
    """(policy, hook) -> (allowed, denied) summed over rules, default and CPUs, for every
    pinned program; what the service exports to Prometheus. Programs gone meanwhile, or
    whose maps cannot be read, are left out."""
    totals = {}
    for name, policy in applied.items():
        for hook, state in policy.hooks.items():
            if not state.prog_id:
                continue
            try:
                counters = read_counters(state.prog_id, policy, hook)
            except BpfError as error:
                log.warning("counters of program %d: %s", state.prog_id, error)
                continue
            if counters is None:
                continue
            slots = [*counters["rules"], counters["default"]]
            totals[name, hook] = (
                sum(slot["allowed"] for slot in slots),
                sum(slot["denied"] for slot in slots),
            )
    return totals


# --- addresses learned from DNS answers (fqdns rules) ---------------------------------------


def monotonic_ns() -> int:
    """Now, on the clock of learned entries (the programs' bpf_ktime_get_coarse_ns)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


@dataclass(frozen=True)
class LearnedEntry:
    """One address a cgroup learned from a DNS answer, as the `learned` map holds it."""

    cgroup_id: int
    address: ipaddress.IPv4Address | ipaddress.IPv6Address  # IPv4 for ::ffff:a.b.c.d
    expires_ns: int  # monotonic_ns() clock
    learned_ns: int  # when the last answer for it arrived
    rules: dict[str, int]  # section (contract.DNS_SLOTS) -> mask of its fqdns rules that match
    name: str | None  # the last answer's most specific matching pattern

    def live(self, now_ns: int) -> bool:
        return self.expires_ns > now_ns


@dataclass(frozen=True)
class LearnedState:
    """A policy's learned map: its entries (expired ones included until the service deletes
    them), its size, and what learning did since the policy was loaded."""

    entries: list[LearnedEntry]
    capacity: int
    learned: int  # addresses written or refreshed
    refused_full: int  # addresses not learned because the map was full (they stay refused)
    unasked: int  # answers to no query noted: from a server not in spec.dns.servers, late, forged


def _learned_entry(raw_key: bytes, raw_value: bytes, names: list[str]) -> LearnedEntry:
    key, value = LEARNED_KEY.unpack_from(raw_key), LEARNED.unpack_from(raw_value)
    address = ipaddress.IPv6Address(bytes(key["addr"]))
    name_id = value["name_id"]
    return LearnedEntry(
        key["cgroup_id"],
        address.ipv4_mapped or address,
        value["expires_ns"],
        value["learned_ns"],
        {section: value["rules"][slot] for section, slot in DNS_SLOTS.items()},
        names[name_id - 1] if 0 < name_id <= len(names) else None,
    )


def read_learned(applied: AppliedPolicy) -> LearnedState | None:
    """The learned map of a policy with fqdns rules; None for one without (or while an
    apply replaces it)."""
    names = applied.meta.names if applied.meta else []
    try:
        with Map.from_pin(applied.folder / pins.LEARNED_PIN) as learned:
            entries = [_learned_entry(k, v, names) for k, v in learned.items()]
            capacity = learned.info.max_entries
        with Map.from_pin(applied.folder / pins.DNS_STATS_PIN) as stats:
            per_cpu = [DNS_STATS.unpack_from(v) for v in stats.lookup_per_cpu(_ZERO) or []]
    except (BpfError, OSError):
        return None
    return LearnedState(
        entries,
        capacity,
        sum(s["learned"] for s in per_cpu),
        sum(s["full"] for s in per_cpu),
        sum(s["unasked"] for s in per_cpu),
    )


def delete_expired_learned(applied: AppliedPolicy, now_ns: int) -> int:
    """Delete the entries of a policy's learned map that expired before ``now_ns``: the
    programs no longer match them, but they take room a new answer may need. How many went.

    An answer may refresh an entry at any moment, so each is looked up again, then taken
    (looked up and deleted in one step), and put back at once if what was taken is live:
    only an answer landing between the two steps meets a missing entry, and its own write
    is kept, with the rules of the one put back."""
    try:
        with Map.from_pin(applied.folder / pins.LEARNED_PIN) as learned:
            expired = [key for key, value in learned.items() if not _live(value, now_ns)]
            deleted = 0
            for key in expired:
                again = learned.lookup(key)
                if again is None or _live(again, now_ns):
                    continue  # gone, or refreshed since the listing
                taken = learned.take(key)
                if taken is None:
                    continue
                if _live(taken, now_ns):
                    _put_back(learned, key, taken)
                else:
                    deleted += 1
            return deleted
    except (BpfError, OSError):
        return 0


def _live(raw: bytes, now_ns: int) -> bool:
    return LEARNED.unpack_from(raw)["expires_ns"] > now_ns


def _put_back(learned: Map, key: bytes, taken: bytes) -> None:
    """Restore an entry taken live; if the kernel wrote one meanwhile, add the taken one's
    rules to it and keep the later expiry."""
    try:
        learned.update(key, taken, BPF_NOEXIST)
        return
    except BpfError:
        pass
    newer = learned.lookup(key)
    if newer is None:
        return  # the map filled up meanwhile: fails closed
    old, new = LEARNED.unpack_from(taken), LEARNED.unpack_from(newer)
    if old["netns"] == new["netns"]:
        new["rules"] = tuple(a | b for a, b in zip(old["rules"], new["rules"], strict=True))
        new["expires_ns"] = max(old["expires_ns"], new["expires_ns"])
        with contextlib.suppress(BpfError):
            learned.update(key, LEARNED.pack(**new))
