"""One reconcile pass: read the policy folder, observe the kernel, plan, apply the
difference, report. Level-triggered and idempotent: every pass starts from what the kernel
has, so a restart (even after SIGKILL mid-apply) simply converges. What to do with what
was read and observed is decided in decide.py; this module gathers the facts, carries the
decisions out, and logs and counts them. When passes run is loop.py's business."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from pathlib import Path

from cgpolicy.compiler.spec import CompiledPolicy, CompileError
from cgpolicy.enforcer.apply import ApplyError
from cgpolicy.enforcer.engine import Enforcer, Planned, compile_here
from cgpolicy.enforcer.incremental import (
    MetaCache,
    NotIncremental,
    attach_new_cgroups,
    change_in_place,
)
from cgpolicy.enforcer.ownership import Owner
from cgpolicy.enforcer.plan import Action
from cgpolicy.enforcer.rollout import RolledBack
from cgpolicy.enforcer.targets import CgroupRef, resolve_targets, target_covers
from cgpolicy.kernel import pins
from cgpolicy.kernel.applied import (
    AppliedPolicy,
    delete_expired_learned,
    monotonic_ns,
    read_applied,
)
from cgpolicy.kernel.cgroup import NotACgroup, cgroup_at
from cgpolicy.kernel.devices import device_paths
from cgpolicy.kernel.devices import watch_folders as device_folders
from cgpolicy.policy.model import Policy
from cgpolicy.reconciler.decide import (
    Compilations,
    PassReport,
    drift_of,
    folder_missing,
    readiness,
    removals,
    tally,
    to_apply,
)
from cgpolicy.reconciler.health import PassOutcome
from cgpolicy.reconciler.lastgood import LastGoodStore
from cgpolicy.reconciler.logsafe import escape_service_logs
from cgpolicy.reconciler.metrics import Metrics
from cgpolicy.reconciler.source import PolicySource, Snapshot
from cgpolicy.reconciler.watch import watch_folders

log = logging.getLogger("cgpolicy.reconcile")

# A pass's log line names this many of its steps and counts them all: a glob over 10,000
# cgroups is 90,000 links, a line of megabytes.
MAX_LOGGED_STEPS = 20


class Reconciler:
    """Runs passes over one policy folder. What the loop around it may ask: a pass
    (:meth:`reconcile`), to read every file again (:meth:`reread`), to compile again what
    names interfaces (:meth:`links_changed`), and which folders to watch."""

    def __init__(
        self,
        enforcer: Enforcer,
        policy_dir: Path,
        metrics: Metrics,
        store: LastGoodStore | None = None,
    ) -> None:
        """``enforcer`` applies as the service (``Owner.service()``), so that what it
        applies is recorded as the service's (ownership.py). ``store`` keeps the last good
        text of each file across restarts; without it, a file that is bad when the process
        starts has no last good version."""
        if enforcer.owner != Owner.service():
            raise ValueError("the reconciler's enforcer must apply as the service")
        escape_service_logs()  # names others chose must not print lines of their own
        self._enforcer = enforcer
        self.policy_dir = policy_dir.absolute()  # sources recorded in pins are absolute
        self._source = PolicySource(self.policy_dir, store)
        self._policies: list[Policy] = []  # the last pass's
        # the policies the last pass left applied as they are, compiled, with their source
        # files (attach_new); not their plans: 10,000 cgroups make 90,000 steps to keep
        self._settled: dict[str, tuple[CompiledPolicy, str | None]] = {}
        self._metas = MetaCache()
        self._metrics = metrics
        self._compiled = Compilations(compile_here)
        self._warned: set[str] = set()
        self._waiting: set[tuple[str, str]] = set()
        self._not_ready: frozenset[tuple[str, str]] | None = None  # last readiness logged

    def reread(self) -> None:
        """Read every file (and the last-good store) again at the next pass, as after a
        restart, keeping the last good versions known (SIGHUP)."""
        self._source.reread()

    def links_changed(self) -> None:
        """Network interfaces changed: the next pass compiles again (and so swaps in) the
        policies whose rules name interfaces."""
        self._compiled.links_changed()

    def cgroup_folders(self) -> set[Path]:
        """The cgroup folders where a target of the last pass's policies can appear next."""
        targets = [target for policy in self._policies for target in policy.targets]
        return watch_folders(self._enforcer.cgroup_root, targets)

    def device_folders(self) -> set[Path]:
        """The folders where a device node that the last pass's policies name by path can
        appear, vanish or be replaced."""
        paths = sorted({path for policy in self._policies for _, path in device_paths(policy)})
        return device_folders(paths, self._enforcer.dev_root)

    def sweep_learned(self) -> int:
        """Delete the expired entries of every applied policy's learned map (fqdns rules):
        they match nothing any more, but hold room a new answer may need (a full map
        learns nothing). Not under the pin lock: it changes no decision. How many went."""
        deleted = 0
        for name, policy in read_applied(self._enforcer.bpf_dir, links=False).items():
            count = delete_expired_learned(policy, monotonic_ns())
            if count:
                self._metrics.dns_expired_deleted.labels(name).inc(count)
                deleted += count
        return deleted

    def reconcile(self) -> PassReport:
        """One pass, holding the pin folder's lock from observing to applying, so that no
        `cgpolicy apply` or `run` changes the pins in between (kernel/lock.py)."""
        with self._enforcer.locked() as rolled_back:
            self._count_rollbacks(rolled_back)
            return self._reconcile()

    def _count_rollbacks(self, rolled_back: list[RolledBack]) -> None:
        for rolled in rolled_back:
            result = "failed" if rolled.error else "done"
            self._metrics.rollbacks.labels(rolled.policy, result).inc()

    def attach_new(self, created: list[Path]) -> bool:
        """The fast path for cgroups that just appeared, when nothing else happened: attach
        the policies the last pass left applied to those of ``created`` their targets
        match, reading only those policies' metadata and programs (enforcer/incremental.py),
        not every link. False when a full pass must run instead: a cgroup in which targets
        can appear deeper, one a policy covers that the last pass did not leave applied or
        that changed since, an attach that failed (the full pass retries and reports it)."""
        root = self._enforcer.cgroup_root
        work: dict[str, list[CgroupRef]] = {}
        for path in created:
            try:
                relative = str(path.relative_to(root))
                cgroup = cgroup_at(path)
            except (ValueError, NotACgroup):
                return False
            for policy in self._policies:
                covers = [target_covers(target, relative) for target in policy.targets]
                if None in covers or (any(covers) and policy.name not in self._settled):
                    return False
                if any(covers) and cgroup is not None:  # None: gone again already
                    work.setdefault(policy.name, []).append(CgroupRef(relative, cgroup))
        if not work:
            return True
        with self._enforcer.locked() as rolled_back:
            self._count_rollbacks(rolled_back)
            if rolled_back:
                return False
            for name, refs in sorted(work.items()):
                compiled, source = self._settled[name]
                try:
                    attached = attach_new_cgroups(
                        compiled,
                        refs,
                        root,
                        self._enforcer.bpf_dir,
                        self._enforcer.owner,
                        source,
                        self._metas,
                    )
                except (NotIncremental, ApplyError) as why:
                    log.debug("%s: a full pass for new cgroups: %s", name, why)
                    return False
                if attached:
                    log.info("%s: attached to %s", name, ", ".join(r.relative for r in attached))
        return True

    def change_files(self) -> bool:
        """The fast path for changed policy files, when nothing else happened: read the
        folder, and put each policy whose rules changed in force in place (inplace.py),
        reading only its metadata and program pins (enforcer/incremental.py), not every
        link. False when a full pass must run instead (nothing was changed then): a policy
        added, removed or not left applied by the last pass, new targets, a file that is
        invalid now, a last-good store that failed at this reading, a service not ready, a
        change that is more than new rules, targets that resolve to other cgroups. The
        periodic resync stays a full pass, which repairs drift."""
        if self._not_ready != frozenset() or self._enforcer.in_place is None:
            return False
        try:
            snapshot = self._source.read()
        except OSError:
            return False  # the folder cannot be listed: the full pass says so
        before = {policy.name: policy.targets for policy in self._policies}
        now = {policy.name: policy.targets for policy in snapshot.policies}
        if (
            snapshot.invalid_files
            or snapshot.store_error is not None  # readiness changes: a full pass records it
            or len(now) != len(snapshot.policies)
            or now != before  # the folders to watch would change too
            or not now.keys() <= self._settled.keys()
        ):
            return False
        with self._enforcer.locked() as rolled_back:
            self._count_rollbacks(rolled_back)
            if rolled_back:
                return False
            for policy in snapshot.policies:
                if not self._change_in_place(policy):
                    return False
        self._policies = snapshot.policies
        self._compiled.keep_only(snapshot.policies)
        return True

    def _change_in_place(self, policy: Policy) -> bool:
        """One policy of :meth:`change_files`: True when it is in force as read now."""
        enforcer = self._enforcer
        settled, source = self._settled[policy.name]
        if source != (os.path.abspath(policy.source.file) if policy.source else None):
            return False
        meta = self._metas.read(pins.policy_dir(enforcer.bpf_dir, policy.name))
        if meta is None:
            return False
        try:
            compiled = self._compiled(policy, enforcer.devices(policy, meta))
        except CompileError:
            return False
        if _device_rules(compiled) != _device_rules(settled):
            return False  # a full pass watches their folders, reports and counts them
        if compiled.revision == settled.revision:
            return meta.revision == settled.revision
        resolution = resolve_targets(enforcer.cgroup_root, policy.targets)
        if resolution.not_cgroups or enforcer.in_place is None:
            return False
        try:
            change_in_place(
                enforcer.in_place,
                compiled,
                resolution.cgroups,
                enforcer.bpf_dir,
                enforcer.owner,
                source,
                self._metas,
            )
        except NotIncremental as why:
            log.debug("%s: a full pass for the change: %s", policy.name, why)
            return False
        self._settled[policy.name] = (compiled, source)
        log.info("%s: rules changed in place (revision %s)", policy.name, compiled.revision)
        return True

    def _reconcile(self) -> PassReport:
        """One pass. Never raises for a bad policy or a failed apply: those are reported.
        A policy folder that cannot be listed raises before anything is observed."""
        started = time.monotonic()
        if not self.policy_dir.is_dir():
            if "folder" not in self._warned:
                self._warned.add("folder")
                log.error("policy folder %s is missing; enforcement left as it is", self.policy_dir)
            report, outcome = folder_missing(self.policy_dir)
            self._settled = {}  # nothing is applied to new cgroups while it is missing
            self._record(outcome)
            self._metrics.passes.inc()  # a pass that ran, and found nothing to read
            return report
        self._warned.discard("folder")
        snapshot = self._source.read()
        self._policies = snapshot.policies
        self._report_invalid(snapshot)

        applied = self._enforcer.observe()
        planned = self._enforcer.plan(
            snapshot.policies, self._compiled, applied, missing_target_blocks=False
        )
        # after planning: a policy of this reading may be compiled from one of the last
        self._compiled.keep_only(snapshot.policies)
        self._metrics.record_device_paths(
            (item.plan.name, device) for item in planned for device in item.plan.devices
        )
        doomed = removals(applied, self.policy_dir, snapshot)
        planned += self._enforcer.plan_removal(doomed, applied) if doomed else []
        report = self._execute(planned, applied)
        self._settled = {
            item.plan.name: (item.compiled, item.source)
            for item in planned
            if item.compiled is not None
            and not item.plan.blocked
            and item.plan.name not in report.failed
        }
        elapsed = time.monotonic() - started
        self._metrics.passes.inc()
        self._metrics.duration.observe(elapsed)
        self._metrics.policies.labels("valid").set(len(snapshot.policies))
        self._metrics.invalid_files.set(len(snapshot.invalid_files))
        self._metrics.last_good_store_failing.set(snapshot.store_error is not None)
        if not report.failed:
            self._metrics.last_success.set_to_current_time()
        self._record(readiness(snapshot, report))
        return report

    def _record(self, outcome: PassOutcome) -> None:
        """Hand a completed pass to metrics and /readyz; log when readiness changes (each
        failure is also logged where it happens)."""
        self._metrics.record_pass(outcome)
        keys = outcome.keys()
        if keys == self._not_ready:
            return
        if keys:
            log.warning("not ready: %s", "; ".join(outcome.reasons()))
        else:
            log.info("ready: every policy in %s is applied", self.policy_dir)
        self._not_ready = keys

    def _execute(self, planned: list[Planned], applied: dict[str, AppliedPolicy]) -> PassReport:
        waiting = {(item.plan.name, w) for item in planned for w in item.plan.warnings}
        for name, warning in sorted(waiting - self._waiting):  # once, until it clears
            log.warning("%s: %s; applied where it can, retried when it appears", name, warning)
        self._waiting = waiting
        work = to_apply(planned)
        drift = {item.plan.name: drift_of(item.plan, applied.get(item.plan.name)) for item in work}
        for problems in drift.values():
            for problem in problems:
                self._metrics.drift_found.labels(problem).inc()
        outcomes = self._enforcer.apply(work) if work else []
        for outcome in outcomes:
            plan = outcome.plan
            if not outcome.ok:
                self._metrics.apply_errors.labels(plan.name).inc()
                log.error("%s: not applied: %s", plan.name, outcome.error)
            elif plan.new_revision is None:
                log.info("%s: removed", plan.name)
            else:
                for problem in drift.get(plan.name, []):
                    self._metrics.drift_repaired.labels(problem).inc()
                changed = [s for s in plan.steps if s.action is not Action.KEEP]
                log.info(
                    "%s",
                    plan.summary(),
                    extra={
                        "steps": [s.describe() for s in changed[:MAX_LOGGED_STEPS]],
                        "step_counts": dict(Counter(s.action.value for s in changed)),
                    },
                )
        return tally(outcomes, drift)

    def _report_invalid(self, snapshot: Snapshot) -> None:
        """Each bad file's problems, once per distinct set, saying what stays enforced."""
        for file, problems in snapshot.invalid_files.items():
            known = file not in snapshot.without_last_good
            key = f"{file}:{known}:{len(problems)}:{problems[0].format() if problems else ''}"
            if key in self._warned:
                continue
            self._warned.add(key)
            for problem in problems:
                if known:
                    log.error(
                        "invalid policy file, last good version stays enforced: %s",
                        problem.format(),
                    )
                else:
                    log.error("invalid policy file: %s", problem.format())
            if not known:
                log.error(
                    "%s: no last good version of it is known (not seen valid by this process, "
                    "none in the last-good store): what the kernel enforces from it stays as "
                    "it is, but cgroups that appear later are not covered by it",
                    file,
                )


def _device_rules(compiled: CompiledPolicy) -> set[tuple[str, str, str]]:
    """The `path:` device rules of ``compiled`` as the service watches and reports them."""
    return {(d.path, d.action, d.node.state) for d in compiled.device_paths}
