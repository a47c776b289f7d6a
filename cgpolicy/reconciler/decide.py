"""What one reconcile pass does, decided without the kernel or the file system.

reconcile.py gathers the facts (the folder's reading, what the kernel has, the enforcer's
plans), asks this module what to do with them, and carries it out; versions.py decides
which version of each file the reading holds. The rules (docs/reconcile.md,
docs/ownership.md):

- a pass removes only the service's own policies from this folder whose file is gone (or
  no longer defines them); never one applied by `cgpolicy apply` or a `run`, never one from
  elsewhere, never one whose file is there but bad;
- a policy folder that is missing (or cannot be listed: the reading raises) changes nothing;
- a policy that cannot be applied is reported, and every other policy is applied;
- a policy is compiled again only when it, what its device paths name, or (for one that
  names interfaces) the interfaces changed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cgpolicy.compiler.compile import names_interfaces, recompile
from cgpolicy.enforcer.ownership import SERVICE, recorded_owner
from cgpolicy.enforcer.plan import Action
from cgpolicy.reconciler.health import PassOutcome

if TYPE_CHECKING:  # only named in annotations: the pure decisions import no engine or kernel
    from cgpolicy.compiler.spec import CompiledPolicy
    from cgpolicy.enforcer.engine import Outcome, Planned
    from cgpolicy.enforcer.plan import PolicyPlan
    from cgpolicy.kernel.applied import AppliedPolicy
    from cgpolicy.kernel.devices import DeviceBinding
    from cgpolicy.policy.model import Policy
    from cgpolicy.policy.validate import Problem
    from cgpolicy.reconciler.source import Snapshot
from cgpolicy.reconciler.versions import UNREADABLE


@dataclass
class PassReport:
    """What one pass did, by policy name; ``failed`` also holds a missing folder."""

    applied: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    repaired: int = 0
    folder_missing: bool = False


def folder_missing(folder: Path) -> tuple[PassReport, PassOutcome]:
    """A pass that found no policy folder (an unmounted volume, a moved directory): it is
    not an empty folder, so the pass changes nothing. It fails (``--once`` exits 1) and
    /readyz says why."""
    report = PassReport(failed={str(folder): "policy folder missing"}, folder_missing=True)
    return report, PassOutcome(folder_missing=str(folder))


def removals(applied: Mapping[str, AppliedPolicy], folder: Path, snapshot: Snapshot) -> list[str]:
    """The applied policies this pass removes: those the service holds (or that record no
    owner) from a file of ``folder`` (absolute), that the folder no longer asks for, unless
    the file they came from is still there but bad (what it enforced stays)."""
    wanted = {policy.name for policy in snapshot.policies}
    return [
        name
        for name, source in _service_policies(applied, folder).items()
        if name not in wanted and source not in snapshot.invalid_files
    ]


def _service_policies(applied: Mapping[str, AppliedPolicy], folder: Path) -> dict[str, str]:
    """Applied policies that came from this folder and are the service's (or recorded no
    owner): name -> source file. One an operator took over stays theirs; a `run`'s is
    the run's."""
    prefix = str(folder) + os.sep
    found = {}
    for name, policy in applied.items():
        source = policy.meta.source if policy.meta else None
        owner = recorded_owner(policy)
        if source and source.startswith(prefix) and (owner is None or owner.kind == SERVICE):
            found[name] = source
    return found


def to_apply(planned: Iterable[Planned]) -> list[Planned]:
    """The plans a pass hands to the enforcer: those that change something, and those that
    are blocked, so that a policy that cannot be applied is reported at every pass (the
    enforcer applies nothing of a blocked plan). The rest are already as planned."""
    return [item for item in planned if item.plan.changed or item.plan.blocked]


def drift_of(plan: PolicyPlan, applied: AppliedPolicy | None) -> list[str]:
    """The drift a plan repairs, one entry per repair, named as `audit` names it: only on
    a policy whose revision is unchanged, and only what someone undid from outside. A link
    detached from outside, or whose pin was deleted, and a program pin deleted are
    `missing`; a link whose program was swapped is `stale`. A cgroup that started to match
    since the last apply (a new cgroup under a glob) is not drift: it is not in the
    cgroups the metadata records, and attaching to it is the policy doing its job."""
    if (
        applied is None
        or applied.meta is None
        or plan.new_revision is None
        or plan.old_revision != plan.new_revision
    ):
        return []
    known = applied.meta.cgroups
    found = []
    if plan.reload:  # same revision loaded again: a program of the policy is gone
        hooks = {step.hook for step in plan.steps if step.action is not Action.DETACH}
        found += [
            "missing"
            for hook in sorted(hooks)
            if hook not in applied.hooks or applied.hooks[hook].prog_id is None
        ]
    for step in plan.steps:
        if step.action is Action.REATTACH:
            found.append("missing")
        elif step.action is Action.ATTACH and step.cgroup_id in known:
            found.append("missing")
        elif step.action is Action.UPDATE and not plan.reload:
            found.append("stale")
    return found


def tally(outcomes: Iterable[Outcome], drift: Mapping[str, list[str]]) -> PassReport:
    """What the pass did, policy by policy: one that failed is reported failing and does
    not hide the others; drift counts as repaired only on a policy applied."""
    report = PassReport()
    for outcome in outcomes:
        plan = outcome.plan
        if not outcome.ok:
            report.failed[plan.name] = outcome.error or "failed"
        elif plan.new_revision is None:
            report.removed.append(plan.name)
        else:
            report.applied.append(plan.name)
            report.repaired += len(drift.get(plan.name, []))
    return report


def readiness_summary(problems: list[Problem]) -> str:
    """What /readyz says of a bad file: whether it could be read and how many problems it
    has, never their text. Any local user can read /readyz, and a problem's text can quote
    the file's content (``unknown field '...'``); the log, root's, has them in full."""
    if len(problems) == 1 and problems[0].message.startswith(UNREADABLE):
        return f"{UNREADABLE} (see the service log)"
    count = len(problems)
    return f"{count} problem{'s' if count != 1 else ''} (see the service log)"


def readiness(snapshot: Snapshot, report: PassReport) -> PassOutcome:
    """What a completed pass tells /readyz: the policies the folder asks for, those that
    failed, each bad file (by name, without its problems' text), the store's trouble."""
    invalid = {
        Path(file).name: readiness_summary(problems)
        for file, problems in snapshot.invalid_files.items()
        if problems
    }
    wanted = frozenset(policy.name for policy in snapshot.policies)
    return PassOutcome(wanted, dict(report.failed), invalid, None, snapshot.store_error)


class Compilations:
    """The compiled policies a pass can reuse. A policy is compiled again when it is a new
    one (a file read again gives new Policy objects), when what its device paths name
    changed, and, for one whose rules name interfaces, after interfaces changed."""

    def __init__(self, compile: Callable[[Policy, DeviceBinding], CompiledPolicy]) -> None:
        self._compile = compile
        # id(policy) -> (policy, device binding, compiled); the policy is kept so that its
        # id cannot be reused while cached.
        self._cached: dict[int, tuple[Policy, DeviceBinding, CompiledPolicy]] = {}

    def __call__(self, policy: Policy, devices: DeviceBinding) -> CompiledPolicy:
        cached = self._cached.get(id(policy))
        if cached and cached[0] is policy and cached[1] == devices:
            return cached[2]
        compiled = self._changed(policy, devices) or self._compile(policy, devices)
        self._cached[id(policy)] = (policy, devices, compiled)
        return compiled

    def _changed(self, policy: Policy, devices: DeviceBinding) -> CompiledPolicy | None:
        """``policy`` compiled from the compilation of the policy it was derived from (a
        file whose change rewrote CIDR items only), when that is cached."""
        derived = policy.derived
        base = derived.base() if derived is not None else None
        cached = self._cached.get(id(base)) if base is not None else None
        if derived is None or cached is None or cached[0] is not base or cached[1] != devices:
            return None
        return recompile(cached[2], cached[0], policy, derived.edits)

    def keep_only(self, policies: Iterable[Policy]) -> None:
        """Forget every compilation but those of ``policies`` (the folder's reading now)."""
        live = {id(policy) for policy in policies}
        self._cached = {key: entry for key, entry in self._cached.items() if key in live}

    def links_changed(self) -> None:
        """Interfaces appeared, went or were renamed: what names them is compiled again."""
        self._cached = {
            key: entry for key, entry in self._cached.items() if not names_interfaces(entry[0])
        }
