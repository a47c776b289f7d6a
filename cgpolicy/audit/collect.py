"""Read the kernel and cgpolicy's pins into an audit report.

Per cgroup and hook, one non-effective PROG_QUERY gives the cgroup's own programs and the
hook's attach flags; what a cgroup inherits is computed from its ancestors' answers the way
the kernel does (model.effective_programs), so no extra query per cgroup. One pass over all
BPF links tells link attachments from legacy ones. Cgroups vanish while we walk (containers
exit): whatever disappears mid-way is skipped, never an error.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cgpolicy.audit.model import (
    AppliedView,
    Attachment,
    CgroupReport,
    HookState,
    OurProgram,
    attach_mode,
    classify_owner,
    compute_drift,
    effective_programs,
)
from cgpolicy.contract import COUNTER, DEFAULT_SLOT, MAX_RULES, RATELIMIT, U32
from cgpolicy.enforcer.observe import AppliedPolicy, observe
from cgpolicy.kernel import bpf
from cgpolicy.kernel.bpf import HOOKS, BpfError, Map, Program

log = logging.getLogger(__name__)


@dataclass
class _ProgInfo:
    name: str
    tag: str
    map_ids: tuple[int, ...]


@dataclass
class Snapshot:
    """Own attachments of the cgroups looked at: path -> id, and id -> hook -> state."""

    ids: dict[str, int] = field(default_factory=dict)
    hooks: dict[int, dict[str, HookState]] = field(default_factory=dict)


def _links_by_hook() -> dict[tuple[int, int], set[int]]:
    """(cgroup id, attach type) -> ids of programs attached there through a link."""
    found: dict[tuple[int, int], set[int]] = {}
    try:
        link_ids = list(bpf.link_ids())
    except BpfError as error:
        log.warning("cannot list BPF links (%s); every attachment is shown as legacy", error)
        return found
    for link_id in link_ids:
        try:
            fd = bpf.link_get_fd_by_id(link_id)
        except BpfError:
            continue  # gone meanwhile
        try:
            info = bpf.link_info(fd)
        except BpfError:
            continue
        finally:
            os.close(fd)
        if info.type == bpf.LinkType.CGROUP and info.cgroup_id:
            found.setdefault((info.cgroup_id, info.attach_type), set()).add(info.prog_id)
    return found


def _query_cgroup(path: Path) -> tuple[int, dict[str, HookState]] | None:
    """(id, hook -> own state) of one cgroup, or None if it vanished."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    states: dict[str, HookState] = {}
    try:
        cgroup_id = os.fstat(fd).st_ino
        for name, hook in HOOKS.items():
            try:
                result = bpf.prog_query(fd, hook.attach_type)
            except BpfError as error:
                if error.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOENT):
                    continue  # hook unknown to this kernel, or the cgroup went away
                raise
            if result.prog_ids:
                states[name] = HookState(result.attach_flags, result.prog_ids)
    finally:
        os.close(fd)
    return cgroup_id, states


def _walk(top: Path) -> Iterator[Path]:
    """``top`` and every cgroup below it, parents first; vanishing or unreadable directories
    are skipped."""
    stack = [top]
    while stack:
        current = stack.pop()
        try:
            with os.scandir(current) as entries:
                children = [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
        except OSError:
            continue
        yield current
        stack.extend(sorted(children, reverse=True))


def _relative(path: Path, root: Path) -> str:
    return os.path.relpath(path, root)


def snapshot(root: Path, top: Path) -> Snapshot:
    """Query ``top``'s ancestors (for inheritance) and the whole subtree under ``top``."""
    snap = Snapshot()
    ancestors = [p for p in reversed(top.parents) if p == root or root in p.parents]
    for path in [*ancestors, *_walk(top)]:
        queried = _query_cgroup(path)
        if queried is None:
            continue
        cgroup_id, states = queried
        snap.ids[_relative(path, root)] = cgroup_id
        if states:
            snap.hooks[cgroup_id] = states
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
                self._info[prog_id] = _ProgInfo(info.name, info.tag, info.map_ids)
            except BpfError:
                self._info[prog_id] = None  # unloaded meanwhile
        return self._info[prog_id]

    def _maps(self, prog_id: int) -> dict[str, Map]:
        info = self.info(prog_id)
        found: dict[str, Map] = {}
        for map_id in info.map_ids if info else ():
            try:
                candidate = Map.from_id(map_id)
            except BpfError:
                continue
            if candidate.name in ("counters", "ratelimit") and candidate.name not in found:
                found[candidate.name] = candidate
            else:
                candidate.close()
        return found

    def counters(self, prog_id: int, policy: str, hook: str) -> dict[str, Any] | None:
        if prog_id in self._counters:
            return self._counters[prog_id]
        maps = self._maps(prog_id)
        try:
            result = _read_counters(maps, self.applied.get(policy), hook)
        except BpfError as error:
            log.warning("counters of program %d: %s", prog_id, error)
            result = None
        finally:
            for m in maps.values():
                m.close()
        self._counters[prog_id] = result
        return result


def _sum(values: list[bytes] | None) -> tuple[int, int]:
    allowed = denied = 0
    for value in values or ():
        counter = COUNTER.unpack_from(value)
        allowed += counter["allowed"]
        denied += counter["denied"]
    return allowed, denied


def _read_counters(
    maps: dict[str, Map], applied: AppliedPolicy | None, hook: str
) -> dict[str, Any] | None:
    counters = maps.get("counters")
    if counters is None:
        return None
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
    dropped = None
    if "ratelimit" in maps:
        values = maps["ratelimit"].lookup_per_cpu(U32.pack(0)) or []
        dropped = sum(RATELIMIT.unpack_from(v)["dropped"] for v in values)
    return {
        "mode": meta.mode if meta else None,
        "rules": rules,
        "default": {"allowed": allowed, "denied": denied},
        "events_dropped": dropped,
    }


@dataclass
class AuditResult:
    cgroups: list[CgroupReport]

    @property
    def drifted(self) -> bool:
        return any(c.drift for c in self.cgroups)

    def to_json(self) -> dict[str, Any]:
        return {"cgroups": [c.to_json() for c in self.cgroups]}


def audit(
    cgroup_root: Path, bpf_dir: Path, top: Path | None = None, show_all: bool = False
) -> AuditResult:
    """The audit of the tree under ``top`` (default: the whole hierarchy). Lists cgroups
    with programs of their own or drift; ``show_all`` adds those that only inherit."""
    top = top or cgroup_root
    applied = observe(bpf_dir)
    ours = _our_programs(applied)
    links = _links_by_hook()
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
            counters = programs.counters(prog_id, policy, hook)
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
                    own.setdefault(cid, {}).setdefault(hook, []).append(found)
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
    return AuditResult(listed)


def _still_there(root: Path, recorded: str, cgroup_id: int) -> bool:
    try:
        return os.stat(root / recorded).st_ino == cgroup_id
    except OSError:
        return False


def counter_totals(bpf_dir: Path) -> dict[tuple[str, str], tuple[int, int]]:
    """(policy, hook) -> (allowed, denied) summed over rules, default and CPUs, for every
    program cgpolicy has pinned; what the reconciler exports to Prometheus."""
    applied = observe(bpf_dir)
    programs = _Programs(applied)
    totals = {}
    for name, policy in applied.items():
        for hook, state in policy.hooks.items():
            counters = programs.counters(state.prog_id, name, hook) if state.prog_id else None
            if counters is None:
                continue
            slots = [*counters["rules"], counters["default"]]
            totals[name, hook] = (
                sum(slot["allowed"] for slot in slots),
                sum(slot["denied"] for slot in slots),
            )
    return totals
