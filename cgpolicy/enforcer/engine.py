"""The facade the CLI and the reconciler use: observe, plan, apply, remove.

enforcer = Enforcer(cgroup_root, bpf_dir)
with enforcer.locked():              # one change at a time per pin folder (kernel/lock.py)
    plans = enforcer.plan(policies)  # pure diff against what the kernel has
    report = enforcer.apply(plans)   # per policy: applied, or failed with old state kept

The Enforcer applies as one owner (ownership.py): a plan for a policy another owner holds is
blocked with a problem that says so, unless forced.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cgpolicy.compiler.compile import compile_policy
from cgpolicy.compiler.spec import CompiledPolicy, CompileError
from cgpolicy.enforcer.apply import ApplyError, apply_policy, record_applied, remove_policy
from cgpolicy.enforcer.inplace import InPlace
from cgpolicy.enforcer.ownership import Owner, check_change, check_removal
from cgpolicy.enforcer.plan import PolicyPlan, plan_policy, plan_removal
from cgpolicy.enforcer.rollout import RolledBack, roll_back_overdue
from cgpolicy.enforcer.targets import resolve_targets
from cgpolicy.kernel import pins
from cgpolicy.kernel.applied import AppliedPolicy, read_applied
from cgpolicy.kernel.cgroup import ensure_bpffs
from cgpolicy.kernel.devices import DEV_ROOT, DeviceBinding, bind_devices, remembered_denies
from cgpolicy.kernel.interfaces import resolve_interfaces
from cgpolicy.kernel.loader import LoaderError
from cgpolicy.kernel.lock import DEFAULT_TIMEOUT, PinFolderLock
from cgpolicy.kernel.syscall import BpfError
from cgpolicy.mounts import read_mounts
from cgpolicy.policy.model import Policy

log = logging.getLogger(__name__)


@dataclass
class Planned:
    plan: PolicyPlan
    compiled: CompiledPolicy | None  # None for a removal
    source: str | None = None
    applied: AppliedPolicy | None = None  # what the plan was made against


@dataclass
class Outcome:
    plan: PolicyPlan
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


# Compiles one policy with its device paths as resolved on this node.
Compile = Callable[[Policy, DeviceBinding], CompiledPolicy]


def compile_here(policy: Policy, devices: DeviceBinding) -> CompiledPolicy:
    """Compile ``policy`` as this node enforces it: its interfaces and device paths
    resolved here."""
    return compile_policy(policy, resolve_interfaces, resolve_device=devices)


class Enforcer:
    def __init__(
        self,
        cgroup_root: Path,
        bpf_dir: Path,
        dev_root: Path = DEV_ROOT,
        owner: Owner | None = None,
        lock_timeout: float = DEFAULT_TIMEOUT,
        in_place: bool = False,
    ) -> None:
        """``in_place``: a long-lived caller (the service) changes the rules of the loads it
        made in place where it can (inplace.py) instead of reloading them."""
        self.cgroup_root = cgroup_root
        self.bpf_dir = bpf_dir
        self.dev_root = dev_root  # where this node's /dev is seen (device path rules)
        self.owner = owner or Owner.cli()  # recorded in what it applies
        self.lock_timeout = lock_timeout  # seconds to wait for another change to end
        self.in_place = InPlace() if in_place else None
        self._lock_depth = 0  # locked() sections entered and not left (one thread uses it)

    @contextmanager
    def locked(self) -> Iterator[list[RolledBack]]:
        """Hold the pin folder's lock (reentrant) around observe, plan and apply. Taking it
        first rolls back every `apply --confirm-within` whose deadline has passed
        (rollout.py): whatever runs next, the rollback does not wait for its process.
        Yields what it rolled back. Leaving the outermost section starts the background
        work of the loads made in it (InPlace.start_filling)."""
        self._lock_depth += 1
        try:
            with PinFolderLock(self.bpf_dir, self.lock_timeout):
                yield roll_back_overdue(self.bpf_dir, self.cgroup_root)
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0 and self.in_place is not None:
                self.in_place.start_filling()  # the work of the loads it made, now over

    def observe(self) -> dict[str, AppliedPolicy]:
        return read_applied(self.bpf_dir)

    def devices(self, policy: Policy, applied: pins.PolicyMeta | None) -> DeviceBinding:
        """What the policy's device paths name on this node; a deny rule's path that names
        nothing now keeps the device it named when it was applied (``applied``)."""
        entries = applied.devices if applied is not None else []
        return bind_devices(policy, self.dev_root, remembered_denies(entries))

    def plan(
        self,
        policies: list[Policy],
        compile: Compile | None = None,
        applied: dict[str, AppliedPolicy] | None = None,
        missing_target_blocks: bool = True,
        force: bool = False,
    ) -> list[Planned]:
        """Plans for ``policies`` against ``applied`` (observed now if not given); ``compile``
        lets a long-running caller reuse compilations; ``force`` takes over policies another
        owner holds."""
        applied = self.observe() if applied is None else applied
        planned = []
        for policy in policies:
            try:
                before = applied.get(policy.name)
                devices = self.devices(policy, before.meta if before is not None else None)
                compiled = (compile or compile_here)(policy, devices)
            except CompileError as error:  # this policy cannot be applied; the others can
                failed = PolicyPlan(policy.name, None, None, reload=False)
                failed.problems.append(f"cannot compile: {error}")
                planned.append(Planned(failed, None))
                continue
            resolution = resolve_targets(self.cgroup_root, policy.targets)
            plan = plan_policy(
                compiled, resolution, applied.get(policy.name), missing_target_blocks
            )
            # Recorded absolute, so that the service can tell its folder's file (ownership.py).
            source = os.path.abspath(policy.source.file) if policy.source else None
            check_change(plan, applied.get(policy.name), self.owner, force, source)
            planned.append(Planned(plan, compiled, source, applied.get(policy.name)))
        return planned

    def plan_removal(
        self,
        names: list[str] | None,
        applied: dict[str, AppliedPolicy] | None = None,
        force: bool = False,
    ) -> list[Planned]:
        """Removal plans for the named policies (all of cgpolicy's when ``names`` is None);
        a name cgpolicy has not applied is reported, not guessed at."""
        applied = self.observe() if applied is None else applied
        selected = sorted(applied) if names is None else names
        planned = []
        for name in selected:
            if name in applied:
                removal = plan_removal(applied[name])
                check_removal(removal, applied[name], self.owner, force)
                planned.append(Planned(removal, None))
            else:
                missing = PolicyPlan(name, None, None, reload=False)
                missing.problems.append("no policy of this name is applied")
                planned.append(Planned(missing, None))
        return planned

    def apply(self, planned: list[Planned]) -> list[Outcome]:
        """Execute plans one policy at a time; a failure leaves that policy's old state."""
        ensure_bpffs(self.bpf_dir.parent)
        bpf_mounts = [m.mount_point for m in read_mounts() if m.fs_type == "bpf"]
        if not any(mp == self.bpf_dir or mp in self.bpf_dir.parents for mp in bpf_mounts):
            raise ApplyError(f"{self.bpf_dir} is not on a bpf filesystem; pins cannot live there")
        pins.ensure_trusted(self.bpf_dir)
        outcomes = []
        for item in planned:
            try:
                if item.compiled is None:
                    if item.plan.blocked:
                        raise ApplyError("; ".join(item.plan.problems))
                    if self.in_place is not None:
                        self.in_place.forget(item.plan.name)
                    remove_policy(item.plan, self.bpf_dir)
                elif item.plan.changed or item.plan.blocked:
                    self._apply_one(item, item.compiled)
            except (ApplyError, BpfError, LoaderError, OSError) as error:
                log.info("%s: %s", item.plan.name, error)
                outcomes.append(Outcome(item.plan, str(error)))
                continue
            outcomes.append(Outcome(item.plan))
        if self._lock_depth == 0 and self.in_place is not None:
            self.in_place.start_filling()  # else when the locked() section is left
        return outcomes

    def _apply_one(self, item: Planned, compiled: CompiledPolicy) -> None:
        plan = item.plan
        if self.in_place is None:
            apply_policy(plan, compiled, self.cgroup_root, self.bpf_dir, item.source)
            return
        if not plan.blocked and plan.reload:
            kept = self.in_place.apply(plan, compiled, item.applied)
            if kept is not None:
                record_applied(plan, compiled, self.bpf_dir, item.source, kept)
                return
        programs = apply_policy(plan, compiled, self.cgroup_root, self.bpf_dir, item.source)
        if plan.reload:
            # Only a load this process made has copies it knows (fresh maps: copy 1 empty,
            # copy 0 in force). Without a reload the programs stay: a load this process
            # knows stays known as it is (the copy in force may be 1); one it does not know
            # stays unknown, since its copy 1 may hold anything (a change another process
            # stopped in the middle of) and no write here would ever drop that.
            self.in_place.remember(compiled, programs)
