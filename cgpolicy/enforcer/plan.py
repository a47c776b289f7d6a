"""The difference between policies as written and what the kernel has: a pure function.

`plan` prints it, `apply` executes it, `reconcile` repeats both. Nothing here makes a syscall.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from cgpolicy.compiler.spec import CompiledPolicy, DevicePath
from cgpolicy.enforcer.targets import CgroupRef, Resolution
from cgpolicy.kernel.applied import AppliedPolicy


class Action(StrEnum):
    ATTACH = "attach"  # new link of the (new or current) program on a cgroup
    UPDATE = "update"  # swap the program of an existing link atomically
    REATTACH = "reattach"  # the link was detached from outside or is broken: replace it
    DETACH = "detach"  # the cgroup or hook is no longer wanted, or the cgroup is gone
    KEEP = "keep"


GONE = "<gone>"  # the path of a cgroup that no longer exists


@dataclass(frozen=True, slots=True)
class Step:
    action: Action
    hook: str
    cgroup_id: int
    cgroup: str  # relative path, or GONE when unknown

    def describe(self) -> str:
        return f"{self.action.value} {self.hook} on {self.cgroup}"


@dataclass
class PolicyPlan:
    name: str
    old_revision: str | None
    new_revision: str | None  # None: the policy is to be removed
    reload: bool  # load new program instances (new policy or changed rules)
    steps: list[Step] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # the policy is not applied while any
    warnings: list[str] = field(default_factory=list)  # reported; the rest is applied
    devices: list[DevicePath] = field(default_factory=list)  # `path:` device rules, resolved
    owner: dict[str, object] | None = None  # who applies it, recorded in its metadata
    owner_change: str | None = None  # the recorded owner changes too: how (ownership.py)

    @property
    def changed(self) -> bool:
        return self.changes_kernel or self.owner_change is not None

    @property
    def changes_kernel(self) -> bool:
        """A removal always does (its pins go, even with no link left to detach)."""
        return (
            self.new_revision is None
            or self.reload
            or any(step.action is not Action.KEEP for step in self.steps)
        )

    @property
    def blocked(self) -> bool:
        return bool(self.problems)

    def device_warnings(self) -> list[str]:
        """One line per ``path:`` device rule whose path names no device node here (these
        are in ``warnings`` too; the summary leaves them to their own lines)."""
        return [w for d in self.devices if (w := d.warning()) is not None]

    def summary(self) -> str:
        if self.blocked:
            return f"{self.name}: not applied: {'; '.join(self.problems)}"
        owner = f", {self.owner_change}" if self.owner_change else ""
        if self.new_revision is None:
            return f"{self.name}: remove (revision {self.old_revision}){owner}"
        devices = set(self.device_warnings())
        others = [w for w in self.warnings if w not in devices]
        waiting = f" (waiting for: {'; '.join(others)})" if others else ""
        if not self.changed:
            return f"{self.name}: unchanged (revision {self.new_revision}){waiting}"
        if self.old_revision is None:
            return f"{self.name}: new, revision {self.new_revision}{waiting}"
        if self.old_revision != self.new_revision:
            return (
                f"{self.name}: revision {self.old_revision} -> {self.new_revision}{owner}{waiting}"
            )
        if not self.changes_kernel:
            return f"{self.name}: {self.owner_change} (revision {self.new_revision}){waiting}"
        return f"{self.name}: repair (revision {self.new_revision}){owner}{waiting}"

    def to_json(self) -> dict[str, object]:
        return {
            "policy": self.name,
            "old_revision": self.old_revision,
            "new_revision": self.new_revision,
            "reload": self.reload,
            "changed": self.changed,
            "problems": self.problems,
            "warnings": self.warnings,
            "devices": [device.to_json() for device in self.devices],
            "owner": self.owner,
            "owner_change": self.owner_change,
            "steps": [
                {
                    "action": s.action.value,
                    "hook": s.hook,
                    "cgroup": s.cgroup,
                    "cgroup_id": s.cgroup_id,
                }
                for s in self.steps
            ],
        }


def plan_policy(
    desired: CompiledPolicy,
    resolution: Resolution,
    applied: AppliedPolicy | None,
    missing_target_blocks: bool = True,
) -> PolicyPlan:
    """Steps that make the kernel enforce ``desired`` on the cgroups it resolves to.

    A literal target that does not exist blocks the whole policy by default (an operator's
    `apply` should fail loudly); the reconciler instead applies the rest and retries."""
    old_revision = applied.revision if applied else None
    hooks = [program.hook for program in desired.programs]
    program_missing = applied is not None and any(
        hook not in applied.hooks or applied.hooks[hook].prog_id is None for hook in hooks
    )
    reload = (
        applied is None
        or old_revision != desired.revision
        or program_missing
        or applied.interrupted
    )
    plan = PolicyPlan(desired.name, old_revision, desired.revision, reload)
    missing = [f"target cgroup {path} does not exist" for path in resolution.missing]
    (plan.problems if missing_target_blocks else plan.warnings).extend(missing)
    plan.problems.extend(
        f"target {path} is not a cgroup (a file or symlink in the cgroup tree)"
        for path in resolution.not_cgroups
    )
    # A device path that names no device here never blocks: the rest of the policy applies,
    # the rule matches nothing (or, for a deny, keeps the device it named before).
    plan.devices = list(desired.device_paths)
    plan.warnings.extend(w for d in desired.device_paths if (w := d.warning()) is not None)

    wanted: dict[int, CgroupRef] = {ref.cgroup_id: ref for ref in resolution.cgroups}
    for hook in hooks:
        current = applied.hooks.get(hook) if applied else None
        for cgroup_id, ref in wanted.items():
            link = current.links.get(cgroup_id) if current else None
            if current is None or link is None:
                action = Action.ATTACH
            elif not link.attached:
                action = Action.REATTACH
            elif reload or link.prog_id != current.prog_id:
                action = Action.UPDATE
            else:
                action = Action.KEEP
            plan.steps.append(Step(action, hook, cgroup_id, ref.relative))
    plan.steps.extend(_unwanted_links(applied, set(hooks), wanted))
    return plan


def plan_removal(applied: AppliedPolicy) -> PolicyPlan:
    plan = PolicyPlan(applied.name, applied.revision, None, reload=False)
    plan.steps.extend(_unwanted_links(applied, set(), {}))
    return plan


def _unwanted_links(
    applied: AppliedPolicy | None, hooks: set[str], wanted: dict[int, CgroupRef]
) -> list[Step]:
    if applied is None:
        return []
    known = applied.meta.cgroups if applied.meta else {}
    steps = []
    for hook, current in applied.hooks.items():
        for cgroup_id in current.links:
            if hook not in hooks or cgroup_id not in wanted:
                steps.append(Step(Action.DETACH, hook, cgroup_id, known.get(cgroup_id, GONE)))
    return steps
