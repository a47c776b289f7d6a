"""The audit report: what runs at every cgroup hook (``kernel.attachments``), matched
against what cgpolicy applied (``kernel.applied``).

Per cgroup and hook, one non-effective PROG_QUERY gives the cgroup's own programs and the
hook's attach flags; what a cgroup inherits is computed from its ancestors' answers the way
the kernel does (model.effective_programs), so no extra query per cgroup. One pass over all
BPF links tells link attachments from legacy ones.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cgpolicy.audit.model import (
    AppliedView,
    Attachment,
    CgroupReport,
    DnsReport,
    HookState,
    OurProgram,
    attach_mode,
    classify_owner,
    compute_drift,
    dns_report,
    effective_programs,
)
from cgpolicy.contract import attach_hook
from cgpolicy.enforcer.rollout import pending_json, read_pending
from cgpolicy.kernel.applied import (
    AppliedPolicy,
    monotonic_ns,
    read_applied,
    read_counters,
    read_learned,
)
from cgpolicy.kernel.attachments import links_by_hook, own_attachments
from cgpolicy.kernel.bpf import Program
from cgpolicy.kernel.cgroup import NotACgroup, cgroup_at, walk_cgroups
from cgpolicy.kernel.hooks import HOOKS
from cgpolicy.kernel.syscall import BpfError

log = logging.getLogger(__name__)


@dataclass
class _ProgInfo:
    name: str
    tag: str


@dataclass
class Snapshot:
    """Own attachments of the cgroups looked at: path -> id, and id -> hook -> state."""

    ids: dict[str, int] = field(default_factory=dict)
    hooks: dict[int, dict[str, HookState]] = field(default_factory=dict)


def _relative(path: Path, root: Path) -> str:
    return os.path.relpath(path, root)


def snapshot(root: Path, top: Path) -> Snapshot:
    """Query ``top``'s ancestors (for inheritance) and the whole subtree under ``top``."""
    snap = Snapshot()
    ancestors = [p for p in reversed(top.parents) if p == root or root in p.parents]
    for path in [*ancestors, *walk_cgroups(top)]:
        queried = own_attachments(path)
        if queried is None:
            continue
        cgroup_id, states = queried
        snap.ids[_relative(path, root)] = cgroup_id
        if states:
            snap.hooks[cgroup_id] = {
                hook: HookState(state.attach_flags, state.prog_ids)
                for hook, state in states.items()
            }
    return snap


def _our_programs(applied: dict[str, AppliedPolicy]) -> dict[int, OurProgram]:
    ours: dict[int, OurProgram] = {}
    for policy in applied.values():
        for hook in policy.hooks.values():
            for link in hook.links.values():
                if link.prog_id and link.prog_id != hook.prog_id:
                    ours.setdefault(
                        link.prog_id, OurProgram(policy.name, hook.hook, None, current=False)
                    )
            if hook.prog_id:
                ours[hook.prog_id] = OurProgram(policy.name, hook.hook, policy.revision)
    return ours


def _slot(prog_id: int, hook: str, ours: dict[int, OurProgram]) -> str:
    """The policy program slot a program at ``hook`` fills: the hook itself, or for one of
    our connect checks its own (egress@connect4), which drift is reckoned by."""
    found = ours.get(prog_id)
    return found.hook if found is not None and attach_hook(found.hook) == hook else hook


def _views(applied: dict[str, AppliedPolicy]) -> list[AppliedView]:
    views = []
    for policy in applied.values():
        links = {
            (hook.hook, cg): (link.prog_id if link.attached else 0)
            for hook in policy.hooks.values()
            for cg, link in hook.links.items()
        }
        views.append(
            AppliedView(
                policy.name,
                policy.revision,
                {hook.hook: hook.prog_id for hook in policy.hooks.values()},
                dict(policy.meta.cgroups) if policy.meta else {},
                links,
                policy.interrupted,
            )
        )
    return views


class _Programs:
    """Program info and counters by id, each read once."""

    def __init__(self, applied: dict[str, AppliedPolicy]) -> None:
        self.applied = applied
        self._info: dict[int, _ProgInfo | None] = {}
        self._counters: dict[int, dict[str, Any] | None] = {}

    def info(self, prog_id: int) -> _ProgInfo | None:
        if prog_id not in self._info:
            try:
                with Program.from_id(prog_id) as program:
                    info = program.info()
                self._info[prog_id] = _ProgInfo(info.name, info.tag)
            except BpfError:
                self._info[prog_id] = None  # unloaded meanwhile
        return self._info[prog_id]

    def counters(self, prog_id: int, policy: str, hook: str) -> dict[str, Any] | None:
        if prog_id not in self._counters:
            try:
                self._counters[prog_id] = read_counters(prog_id, self.applied.get(policy), hook)
            except BpfError as error:
                log.warning("counters of program %d: %s", prog_id, error)
                self._counters[prog_id] = None
        return self._counters[prog_id]


@dataclass
class AuditResult:
    cgroups: list[CgroupReport]
    dns: list[DnsReport] = field(default_factory=list)  # policies with fqdns rules
    # confirmations pending from `apply --confirm-within` (rollout.pending_json), not drift
    pending: list[dict[str, Any]] = field(default_factory=list)

    @property
    def drifted(self) -> bool:
        return any(c.drift for c in self.cgroups)

    def to_json(self) -> dict[str, Any]:
        return {
            "cgroups": [c.to_json() for c in self.cgroups],
            "dns": [d.to_json() for d in self.dns],
            "pending": self.pending,
        }


def _dns_reports(
    applied: dict[str, AppliedPolicy], paths: dict[int, str], whole: bool, scope: dict[int, str]
) -> list[DnsReport]:
    """The learned maps of the policies with fqdns rules: every live entry of the whole
    tree (``whole``), else of the cgroups in ``scope`` and only for policies applied in it
    or with entries there."""
    reports = []
    for name, policy in sorted(applied.items()):
        state = read_learned(policy)
        if state is None:
            continue
        meta = policy.meta
        targets = meta.cgroups if meta else {}
        if (
            not whole
            and not any(cid in scope for cid in targets)
            and not any(entry.cgroup_id in scope for entry in state.entries)
        ):
            continue
        reports.append(
            dns_report(
                name,
                state,
                meta.rules if meta else {},
                paths,
                monotonic_ns(),
                (lambda _cid: True) if whole else scope.__contains__,
            )
        )
    return reports


def audit(
    cgroup_root: Path, bpf_dir: Path, top: Path | None = None, show_all: bool = False
) -> AuditResult:
    """The audit of the tree under ``top`` (default: the whole hierarchy). Lists cgroups
    with programs of their own or drift; ``show_all`` adds those that only inherit."""
    top = top or cgroup_root
    applied = read_applied(bpf_dir)
    ours = _our_programs(applied)
    links = links_by_hook()
    snap = snapshot(cgroup_root, top)
    programs = _Programs(applied)
    paths = {cid: path for path, cid in snap.ids.items()}
    top_rel = _relative(top, cgroup_root)

    def in_subtree(path: str) -> bool:
        return top_rel == "." or path == top_rel or path.startswith(top_rel + "/")

    scope = {cid: p for cid, p in paths.items() if in_subtree(p)}

    def attachment(cid: int, hook: str, prog_id: int, state: HookState, origin: str | None):
        info = programs.info(prog_id)
        if info is None:
            return None
        owner, policy, revision = classify_owner(prog_id, info.name, ours)
        via_link = prog_id in links.get((cid, HOOKS[hook].attach_type), ())
        counters = None
        if policy is not None:
            counters = programs.counters(prog_id, policy, _slot(prog_id, hook, ours))
        return Attachment(
            hook,
            prog_id,
            info.name,
            info.tag,
            attach_mode(via_link, state.flags),
            owner,
            policy,
            revision,
            origin,
            counters,
        )

    reports: dict[int, CgroupReport] = {}
    own: dict[int, dict[str, list[Attachment]]] = {}
    for cid, path in scope.items():
        report = CgroupReport(path, cid)
        chain_paths = [path]
        current = path
        while current not in (".", ""):
            current = os.path.dirname(current) or "."
            chain_paths.append(current)
        chain_ids = [snap.ids.get(p) for p in chain_paths]
        for hook in HOOKS:
            chain = [snap.hooks.get(i, {}).get(hook) if i else None for i in chain_ids]
            for level, prog_id in effective_programs(chain):
                holder = chain_ids[level]
                state = chain[level]
                assert holder is not None and state is not None
                origin = None if level == 0 else chain_paths[level]
                found = attachment(holder, hook, prog_id, state, origin)
                if found is None:
                    continue
                report.attachments.append(found)
                if level == 0:
                    slot = _slot(prog_id, hook, ours)
                    own.setdefault(cid, {}).setdefault(slot, []).append(found)
        reports[cid] = report

    existing = dict(paths)
    for view in _views(applied):
        for cid, recorded in view.cgroups.items():
            if cid not in existing and _still_there(cgroup_root, recorded, cid):
                existing[cid] = recorded
    drift = compute_drift(_views(applied), own, existing, scope)
    for view in _views(applied):  # orphaned cgroups outside the subtree are not ours to show
        for cid, recorded in view.cgroups.items():
            if cid in drift and cid not in reports and in_subtree(recorded):
                reports[cid] = CgroupReport(recorded, cid, exists=False)
    for cid, items in drift.items():
        if cid in reports:
            reports[cid].drift.extend(items)

    listed = [
        r
        for r in reports.values()
        if r.drift
        or any(a.inherited_from is None for a in r.attachments)
        or (show_all and r.attachments)
    ]
    listed.sort(key=lambda r: r.path)
    waiting = [pending_json(r) for _, r in sorted(read_pending(bpf_dir).items())]
    return AuditResult(listed, _dns_reports(applied, paths, top_rel == ".", scope), waiting)


def _still_there(root: Path, recorded: str, cgroup_id: int) -> bool:
    try:
        return cgroup_at(root / recorded) == cgroup_id
    except NotACgroup:
        return False
