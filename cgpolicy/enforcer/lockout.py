"""The lockout guard of `plan` and `apply`: a policy that could deny something is refused
(unless ``--force``) when one of the cgroups it is about to be enforced on is the cgroup,
or an ancestor of the cgroup, of a process it must not cut off: this cgpolicy and the
processes that started it, the leader of its terminal session, a `cgpolicy reconcile`
service, an sshd (kernel/processes.py finds them).

Programs attached to a cgroup run for every cgroup below it, so a target covers a process
when the process's cgroup is the target or lies below it; compared by path and by cgroup id
(either match counts: a false refusal costs a ``--force``, a missed one can cost the host).

A policy that cannot deny anything is exempt: ``mode: audit``, or no section whose default
is ``deny`` and no ``deny`` rule. Removals, and plans that leave the kernel as it is, are
never refused. `run` (whose transient cgroup holds its command by design) and the reconcile
service do not use the guard.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path

from cgpolicy.enforcer.plan import Action, PolicyPlan
from cgpolicy.kernel.cgroup import NotACgroup, cgroup_at
from cgpolicy.kernel.processes import Protected, protected_processes
from cgpolicy.mounts import find_cgroup2_root, read_mounts
from cgpolicy.policy.model import Policy

log = logging.getLogger(__name__)

MAX_NAMED = 3  # processes named in one refusal; the rest are counted


def can_deny(policy: Policy) -> bool:
    """Whether ``policy`` could deny anything: enforce mode, and a section whose default is
    deny or that has a deny rule."""
    if policy.mode != "enforce":
        return False
    return any(_denies(getattr(policy, f.name)) for f in fields(policy))


def _denies(value: object) -> bool:
    if value is None or not is_dataclass(value) or isinstance(value, type):
        return False
    if hasattr(value, "default") and hasattr(value, "rules"):
        return value.default == "deny" or any(r.action == "deny" for r in value.rules)
    return any(_denies(getattr(value, f.name)) for f in fields(value))


@dataclass(frozen=True)
class Lockout:
    """A target cgroup that covers a protected process."""

    target: str  # relative path of the cgroup the policy would be enforced on
    process: Protected

    def describe(self) -> str:
        p = self.process
        where = f"the cgroup {p.cgroup}" if p.cgroup else "the root cgroup"
        return f"{where} of {p.why} (pid {p.pid}, {p.command})"


def covers(target: str, cgroup: str) -> bool:
    """Whether programs on the cgroup ``target`` run for processes in ``cgroup`` (both
    relative to the hierarchy's root, "" or "." for the root)."""
    target, cgroup = target.strip("/"), cgroup.strip("/")
    target = "" if target == "." else target
    cgroup = "" if cgroup == "." else cgroup
    return not target or cgroup == target or cgroup.startswith(target + "/")


def ancestor_ids(root: Path, cgroup: str) -> set[int]:
    """The ids of ``cgroup`` and its ancestors below ``root``, as far as they exist."""
    found = set()
    parts = [part for part in cgroup.strip("/").split("/") if part]
    for depth in range(len(parts) + 1):
        try:
            cgroup_id = cgroup_at(root.joinpath(*parts[:depth]))
        except NotACgroup:
            cgroup_id = None
        if cgroup_id is not None:
            found.add(cgroup_id)
    return found


def hierarchy_of(root: Path) -> tuple[Path, str]:
    """The cgroup2 mount that holds ``root`` (the --cgroup-root, which may be a cgroup
    below the mount) and ``root``'s path below it: a process's cgroup is read relative to
    the hierarchy's root, a target relative to ``root``."""
    try:
        mounts = [m.mount_point for m in read_mounts() if m.fs_type == "cgroup2"]
    except OSError:
        mounts = []
    preferred = find_cgroup2_root()  # the conventional one first, then any that holds root
    for mount in ([preferred] if preferred is not None else []) + mounts:
        below = os.path.relpath(os.path.abspath(root), os.path.abspath(mount))
        if below == ".":
            return mount, ""
        if below != ".." and not below.startswith("../"):
            return mount, below
    return root, ""


def lockouts(
    targets: dict[int, str], processes: Iterable[Protected], root: Path | None = None
) -> list[Lockout]:
    """Every (target, process) where the target covers the process; ``targets`` is
    cgroup id -> path relative to ``root`` (the --cgroup-root), which lets ids match too."""
    hierarchy, below = hierarchy_of(root) if root is not None else (None, "")
    found = []
    for process in processes:
        ids = ancestor_ids(hierarchy, process.cgroup) if hierarchy is not None else set()
        for cgroup_id, path in sorted(targets.items(), key=lambda item: item[1]):
            full = f"{below}/{path.strip('/')}".strip("/") if below else path
            if covers(full, process.cgroup) or cgroup_id in ids:
                found.append(Lockout(path, process))
                break  # one target per process is enough to say
    return found


def refusal(found: list[Lockout]) -> str:
    by_target: dict[str, list[Lockout]] = {}
    for lockout in found:
        by_target.setdefault(lockout.target, []).append(lockout)
    parts = []
    for target, items in by_target.items():
        named = "; ".join(item.describe() for item in items[:MAX_NAMED])
        more = f"; and {len(items) - MAX_NAMED} more" if len(items) > MAX_NAMED else ""
        parts.append(f"target {target} covers {named}{more}")
    return (
        "lockout guard: " + "; ".join(parts) + ": a deny there could cut off your own "
        "session, SSH logins or the reconcile service; check the policy, then --force "
        "applies it anyway"
    )


def targets_of(plan: PolicyPlan) -> dict[int, str]:
    """The cgroups ``plan`` leaves the policy enforced on: cgroup id -> relative path."""
    return {s.cgroup_id: s.cgroup for s in plan.steps if s.action is not Action.DETACH}


def guard(
    plans: Iterable[PolicyPlan],
    policies: Iterable[Policy],
    cgroup_root: Path,
    force: bool,
    processes: list[Protected] | None = None,
) -> None:
    """Block (a problem on the plan) every plan that would change what the kernel
    enforces on a cgroup covering a protected process; with ``force``, log it and let it
    through."""
    by_name = {policy.name: policy for policy in policies}
    for plan in plans:
        policy = by_name.get(plan.name)
        if policy is None or plan.new_revision is None or not plan.changes_kernel:
            continue
        if not can_deny(policy):
            continue
        if processes is None:
            processes = protected_processes()
        found = lockouts(targets_of(plan), processes, cgroup_root)
        if not found:
            continue
        if force:
            log.warning("%s: --force overrides the %s", plan.name, refusal(found))
        else:
            plan.problems.append(refusal(found))
