"""The audit report and the decisions behind it, as pure functions (no syscalls), so that
they can be tested without a kernel."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cgpolicy.contract import DNS_SLOTS, SECTION_HOOKS

if TYPE_CHECKING:
    from cgpolicy.kernel.applied import LearnedEntry, LearnedState

BPF_F_ALLOW_OVERRIDE = 1 << 0
BPF_F_ALLOW_MULTI = 1 << 1

OWNER_CGPOLICY = "cgpolicy"
OWNER_SYSTEMD = "systemd"
OWNER_UNKNOWN = "unknown"

MISSING, STALE, UNEXPECTED, ORPHANED = "missing", "stale", "unexpected", "orphaned"
INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class OurProgram:
    """A program found under our bpf dir: pinned as a policy's program, or held by one of
    its pinned links (then ``current`` is False unless it is also the pinned program)."""

    policy: str
    hook: str
    revision: str | None
    current: bool = True


def classify_owner(
    prog_id: int, name: str, ours: Mapping[int, OurProgram]
) -> tuple[str, str | None, str | None]:
    """(owner, policy, revision) of a program. Ours when its id is one we pinned; systemd's
    programs are named sd_* (sd_fw_egress, sd_fw_ingress, sd_devices, sd_bind4, ...); a
    program named cgp_* that is not in our pins is cgpolicy's but from elsewhere (another
    --bpf-dir), so it has no policy; anything else is unknown."""
    found = ours.get(prog_id)
    if found is not None:
        return OWNER_CGPOLICY, found.policy, found.revision if found.current else None
    if name.startswith("sd_"):
        return OWNER_SYSTEMD, None, None
    if name.startswith("cgp_"):
        return OWNER_CGPOLICY, None, None
    return OWNER_UNKNOWN, None, None


def attach_mode(via_link: bool, flags: int) -> str:
    """ "link", or "legacy multi" / "legacy override" / "legacy exclusive" (PROG_ATTACH
    flags). A link attachment is always multi."""
    if via_link:
        return "link"
    if flags & BPF_F_ALLOW_MULTI:
        return "legacy multi"
    if flags & BPF_F_ALLOW_OVERRIDE:
        return "legacy override"
    return "legacy exclusive"


@dataclass(frozen=True)
class HookState:
    """One cgroup's own attachments at one hook: PROG_QUERY's hook flags and program ids."""

    flags: int
    prog_ids: tuple[int, ...]


def effective_programs(chain: Sequence[HookState | None]) -> list[tuple[int, int]]:
    """(level, prog id) of the programs that run at a hook of a cgroup, given its own state
    (level 0) and its ancestors' (level 1 = parent, ...; None = nothing attached). As the
    kernel computes it (compute_effective_progs): walking up, a cgroup's programs count if
    none were collected yet or its hook is in multi mode, so an override below hides the
    non-multi programs above it."""
    found: list[tuple[int, int]] = []
    for level, state in enumerate(chain):
        if state is None or not state.prog_ids:
            continue
        if not found or state.flags & BPF_F_ALLOW_MULTI:
            found.extend((level, prog_id) for prog_id in state.prog_ids)
    return found


@dataclass
class Attachment:
    hook: str
    prog_id: int
    prog_name: str
    tag: str
    mode: str
    owner: str
    policy: str | None = None
    revision: str | None = None
    inherited_from: str | None = None  # ancestor's path when inherited
    counters: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "hook": self.hook,
            "prog_id": self.prog_id,
            "prog_name": self.prog_name,
            "tag": self.tag,
            "mode": self.mode,
            "owner": self.owner,
            "policy": self.policy,
            "revision": self.revision,
            "inherited_from": self.inherited_from,
            "counters": self.counters,
        }


@dataclass(frozen=True)
class Drift:
    policy: str
    hook: str
    problem: str  # missing | stale | unexpected | orphaned | interrupted
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "hook": self.hook,
            "problem": self.problem,
            "detail": self.detail,
        }


@dataclass
class CgroupReport:
    path: str  # relative to the cgroup2 root; "." for the root
    id: int
    attachments: list[Attachment] = field(default_factory=list)
    drift: list[Drift] = field(default_factory=list)
    exists: bool = True  # False for a cgroup only known from pins (orphaned)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "id": self.id,
            "attachments": [a.to_json() for a in self.attachments],
            "drift": [d.to_json() for d in self.drift],
        }


@dataclass
class AppliedView:
    """What one policy's pins say it applied (from cgpolicy.kernel.applied)."""

    name: str
    revision: str | None
    hooks: dict[str, int | None]  # hook -> pinned program id (None: the pin is missing)
    cgroups: dict[int, str]  # cgroup id -> recorded path (meta)
    # (hook, cgroup id) -> program id of the pinned link (0: defunct)
    links: dict[tuple[str, int], int]
    interrupted: bool = False  # an apply stopped half-way (see AppliedPolicy.interrupted)


def compute_drift(
    applied: Iterable[AppliedView],
    own: Mapping[int, Mapping[str, Sequence[Attachment]]],
    existing: Mapping[int, str],
    in_scope: Mapping[int, str] | None = None,
) -> dict[int, list[Drift]]:
    """cgroup id -> drift found there.

    ``own``: cgroup id -> hook -> the cgroup's own (not inherited) attachments, for every
    cgroup looked at. ``existing``: ids of cgroups that exist -> path. ``in_scope``: the
    cgroups the audit covers (default: all of ``own``); drift elsewhere is not reported.

    - missing: a policy wants its program at (cgroup, hook) and nothing of it is there;
    - stale: something else of ours is there instead (an older program of the policy, the
      pinned link holding a different program, or a cgpolicy program from elsewhere);
    - unexpected: a program of a policy attached at a cgroup or hook the policy does not want;
    - orphaned: a policy's pins name a cgroup that no longer exists;
    - interrupted: an apply of the policy stopped half-way; its pins do not belong together.
    """
    scope = own if in_scope is None else in_scope
    found: dict[int, list[Drift]] = {}

    def add(cgroup_id: int, drift: Drift) -> None:
        items = found.setdefault(cgroup_id, [])
        if drift not in items:
            items.append(drift)

    wanted: set[tuple[str, str, int]] = set()
    for policy in applied:
        cgroups = set(policy.cgroups) | {cg for (_, cg) in policy.links}
        for hook, expected in sorted(policy.hooks.items()):
            for cgroup_id in sorted(cgroups):
                wanted.add((policy.name, hook, cgroup_id))
                if cgroup_id not in existing:
                    add(cgroup_id, Drift(policy.name, hook, ORPHANED, "the cgroup is gone"))
                    continue
                if cgroup_id not in scope:
                    continue
                if policy.interrupted:
                    add(
                        cgroup_id,
                        Drift(
                            policy.name,
                            hook,
                            INTERRUPTED,
                            "an apply stopped half-way; apply the policy again or remove it",
                        ),
                    )
                here = own.get(cgroup_id, {}).get(hook, ())
                ids = {a.prog_id for a in here}
                if expected is not None and expected in ids:
                    continue
                link_prog = policy.links.get((hook, cgroup_id), 0)
                other = [
                    a for a in here if a.owner == OWNER_CGPOLICY and a.policy in (policy.name, None)
                ]
                if link_prog and link_prog in ids or other:
                    names = ", ".join(f"{a.prog_name} (id {a.prog_id})" for a in other)
                    add(
                        cgroup_id,
                        Drift(policy.name, hook, STALE, f"attached instead: {names or link_prog}"),
                    )
                elif expected is None:
                    add(cgroup_id, Drift(policy.name, hook, MISSING, "the program pin is gone"))
                else:
                    add(
                        cgroup_id,
                        Drift(policy.name, hook, MISSING, f"program {expected} is not attached"),
                    )
    for cgroup_id, hooks in own.items():
        if cgroup_id not in scope:
            continue
        for hook, attachments in hooks.items():
            for a in attachments:
                if a.owner == OWNER_CGPOLICY and a.policy is not None:
                    if (a.policy, hook, cgroup_id) not in wanted:
                        add(
                            cgroup_id,
                            Drift(a.policy, hook, UNEXPECTED, f"{a.prog_name} (id {a.prog_id})"),
                        )
    return found


# --- addresses learned from DNS answers (fqdns rules) ---------------------------------------


@dataclass(frozen=True)
class LearnedRow:
    """A live learned entry as audit shows it."""

    cgroup: str | None  # path relative to the cgroup2 root; None once the cgroup is gone
    cgroup_id: int
    address: str
    name: str | None  # the most specific pattern of the last answer
    learned_ago_s: int
    expires_in_s: int
    rules: list[dict[str, Any]]  # {"section", "rule", "text", "line"} it matches

    def to_json(self) -> dict[str, Any]:
        return {
            "cgroup": self.cgroup,
            "cgroup_id": self.cgroup_id,
            "address": self.address,
            "name": self.name,
            "learned_ago_s": self.learned_ago_s,
            "expires_in_s": self.expires_in_s,
            "rules": self.rules,
        }


@dataclass
class DnsReport:
    """One policy's learned map: what it holds now and what learning did since the load."""

    policy: str
    capacity: int
    entries: int  # in the map, live and expired
    expired: int  # expired, waiting for the service to delete them
    learned: int  # addresses learned or refreshed
    refused_full: int  # addresses NOT learned because the map was full
    unasked: int  # answers that taught nothing: to no query noted (see applied.LearnedState)
    rows: list[LearnedRow] = field(default_factory=list)  # the live ones in scope

    @property
    def full(self) -> bool:
        return self.entries >= self.capacity

    def fails_closed(self) -> str | None:
        """What a full map did and does, in words; None while it never was full."""
        if not self.refused_full and not self.full:
            return None
        said = []
        if self.refused_full:
            count = self.refused_full
            said.append(
                f"{count} {'address' if count == 1 else 'addresses'} from DNS answers NOT "
                "learned because the map was full"
            )
        if self.full:
            said.append(
                f"the map is full ({self.entries}/{self.capacity}): new answers are NOT "
                "learned until expired entries are deleted"
            )
        return (
            "; ".join(said) + ": allow rules naming fqdns keep refusing those addresses "
            "(fails closed) and deny rules naming fqdns do not match them; raise "
            "spec.dns.maxLearned"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "capacity": self.capacity,
            "entries": self.entries,
            "live": self.entries - self.expired,
            "expired": self.expired,
            "full": self.full,
            "learned": self.learned,
            "refused_full": self.refused_full,
            "unasked": self.unasked,
            "fails_closed": self.fails_closed(),
            "addresses": [row.to_json() for row in self.rows],
        }


def _matched_rules(
    entry: LearnedEntry, labels: Mapping[str, Sequence[Mapping[str, Any]]]
) -> list[dict[str, Any]]:
    """The rules an entry makes match: bit i of its mask for a section is rule i of the
    section, labelled like counter slot i of any of the section's hooks."""
    found = []
    for section in DNS_SLOTS:
        mask = entry.rules.get(section, 0)
        hook_labels = next((labels[h] for h in SECTION_HOOKS[section] if labels.get(h)), [])
        for index in range(mask.bit_length()):
            if mask >> index & 1:
                label = hook_labels[index] if index < len(hook_labels) else {}
                found.append(
                    {
                        "section": section,
                        "rule": index,
                        "text": label.get("text"),
                        "line": label.get("line"),
                    }
                )
    return found


def dns_report(
    policy: str,
    state: LearnedState,
    labels: Mapping[str, Sequence[Mapping[str, Any]]],
    paths: Mapping[int, str],
    now_ns: int,
    shown: Callable[[int], bool] = lambda _cgroup_id: True,
) -> DnsReport:
    """The report of a policy's learned ``state`` at ``now_ns``: its live entries of the
    cgroups ``shown`` selects, labelled with the rule text of the metadata ``labels``
    (hook -> rules in slot order) and the cgroup paths of ``paths`` (id -> path)."""
    expired = sum(1 for entry in state.entries if not entry.live(now_ns))
    rows = [
        LearnedRow(
            paths.get(entry.cgroup_id),
            entry.cgroup_id,
            str(entry.address),
            entry.name,
            max(0, round((now_ns - entry.learned_ns) / 1e9)),
            math.ceil((entry.expires_ns - now_ns) / 1e9),
            _matched_rules(entry, labels),
        )
        for entry in state.entries
        if entry.live(now_ns) and shown(entry.cgroup_id)
    ]
    rows.sort(key=lambda row: (row.cgroup is None, row.cgroup or "", row.cgroup_id, row.address))
    return DnsReport(
        policy,
        state.capacity,
        len(state.entries),
        expired,
        state.learned,
        state.refused_full,
        state.unasked,
        rows,
    )
