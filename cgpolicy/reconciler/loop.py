"""`cgpolicy reconcile`: observe the kernel, plan against the policy folder, apply the
difference, repeat. Level-triggered and idempotent: every pass starts from what the kernel
has, so a restart (even after SIGKILL mid-apply) simply converges."""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from cgpolicy.compiler.compile import CompileError, compile_policy
from cgpolicy.compiler.spec import CompiledPolicy
from cgpolicy.enforcer.apply import ApplyError
from cgpolicy.enforcer.engine import Enforcer, Planned
from cgpolicy.enforcer.ownership import SERVICE, Owner, recorded_owner
from cgpolicy.enforcer.plan import Action, PolicyPlan
from cgpolicy.kernel.applied import AppliedPolicy
from cgpolicy.kernel.devices import DeviceBinding, device_paths
from cgpolicy.kernel.devices import watch_folders as device_folders
from cgpolicy.kernel.interfaces import resolve_interfaces
from cgpolicy.kernel.loader import LoaderError
from cgpolicy.kernel.syscall import BpfError
from cgpolicy.kernel.trusted import UntrustedFolder
from cgpolicy.policy.model import Policy, Target
from cgpolicy.policy.validate import Problem
from cgpolicy.reconciler.health import PassOutcome
from cgpolicy.reconciler.lastgood import LastGoodStore
from cgpolicy.reconciler.logsafe import escape_service_logs
from cgpolicy.reconciler.metrics import Metrics
from cgpolicy.reconciler.source import UNREADABLE, PolicySource, Snapshot
from cgpolicy.reconciler.watch import Watcher, watch_folders

log = logging.getLogger("cgpolicy.reconcile")

# What the kernel or the file system reports: a pass that raises one of these is logged in one
# line (and /readyz says it); anything else is a bug and gets its traceback.
RUNTIME_ERRORS = (OSError, BpfError, LoaderError, ApplyError, CompileError, UntrustedFolder)


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


def readiness_summary(problems: list[Problem]) -> str:
    """What /readyz says of a bad file: whether it could be read and how many problems it
    has, never their text. Any local user can read /readyz, and a problem's text can quote
    the file's content (``unknown field '...'``); the log, root's, has them in full."""
    if len(problems) == 1 and problems[0].message.startswith(UNREADABLE):
        return f"{UNREADABLE} (see the service log)"
    count = len(problems)
    return f"{count} problem{'s' if count != 1 else ''} (see the service log)"


@dataclass
class PassReport:
    applied: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    repaired: int = 0
    folder_missing: bool = False


def _uses_interfaces(policy: Policy) -> bool:
    network = policy.network
    sections = (network.ingress, network.egress) if network else ()
    return any(rule.interfaces for section in sections if section for rule in section.rules)


class Reconciler:
    def __init__(
        self,
        enforcer: Enforcer,
        policy_dir: Path,
        metrics: Metrics,
        store: LastGoodStore | None = None,
    ) -> None:
        """``store`` keeps the last good text of each file across restarts; without it, a
        file that is bad when the process starts has no last good version."""
        escape_service_logs()  # names others chose must not print lines of their own
        self.enforcer = enforcer
        enforcer.owner = Owner.service()  # what it applies is the service's (ownership.py)
        self.policy_dir = policy_dir.absolute()  # sources recorded in pins are absolute
        self.source = PolicySource(self.policy_dir, store)
        self.policies: list[Policy] = []
        self.metrics = metrics
        self.links_generation = 0
        # id(policy) -> (policy, (links generation or -1, device paths), compiled); the
        # policy is kept so that its id cannot be reused while cached.
        self._compiled: dict[int, tuple[Policy, tuple[int, DeviceBinding], CompiledPolicy]] = {}
        self._warned: set[str] = set()
        self._waiting: set[tuple[str, str]] = set()
        self._not_ready: frozenset[tuple[str, str]] | None = None  # last readiness logged

    def _compile(self, policy: Policy, devices: DeviceBinding) -> CompiledPolicy:
        """Recompile when the policy, its interfaces or what its device paths name changed."""
        generation = (self.links_generation if _uses_interfaces(policy) else -1, devices)
        cached = self._compiled.get(id(policy))
        if cached and cached[0] is policy and cached[1] == generation:
            return cached[2]
        compiled = compile_policy(policy, resolve_interfaces, resolve_device=devices)
        self._compiled[id(policy)] = (policy, generation, compiled)
        return compiled

    def _managed(self, applied: dict[str, AppliedPolicy]) -> dict[str, str]:
        """Applied policies that came from this folder and are the service's (or recorded
        no owner): name -> source file. One an operator took over stays theirs."""
        folder = str(self.policy_dir) + os.sep
        managed = {}
        for name, policy in applied.items():
            source = policy.meta.source if policy.meta else None
            owner = recorded_owner(policy)
            if source and source.startswith(folder) and (owner is None or owner.kind == SERVICE):
                managed[name] = source
        return managed

    def reconcile(self) -> PassReport:
        """One pass, holding the pin folder's lock from observing to applying, so that no
        `cgpolicy apply` or `run` changes the pins in between (kernel/lock.py)."""
        with self.enforcer.locked():
            return self._reconcile()

    def _reconcile(self) -> PassReport:
        """One pass. Never raises for a bad policy or a failed apply: those are reported.

        A policy folder that is gone (unmounted, moved) is not an empty folder: the pass
        changes nothing, so a vanished mount never removes what is enforced."""
        started = time.monotonic()
        if not self.policy_dir.is_dir():
            if "folder" not in self._warned:
                self._warned.add("folder")
                log.error("policy folder %s is missing; enforcement left as it is", self.policy_dir)
            self._record(PassOutcome(folder_missing=str(self.policy_dir)))
            self.metrics.passes.inc()  # a pass that ran, and found nothing to read
            # In `failed` too, so that `--once` exits 1.
            return PassReport(
                failed={str(self.policy_dir): "policy folder missing"}, folder_missing=True
            )
        self._warned.discard("folder")
        snapshot = self.source.read()
        self.policies = snapshot.policies
        self._report_invalid(snapshot)
        live = {id(p) for p in snapshot.policies}
        self._compiled = {k: v for k, v in self._compiled.items() if k in live}

        applied = self.enforcer.observe()
        planned = self.enforcer.plan(
            snapshot.policies, self._compile, applied, missing_target_blocks=False
        )
        self.metrics.record_device_paths(
            (item.plan.name, device) for item in planned for device in item.plan.devices
        )
        wanted = {p.name for p in snapshot.policies}
        # A file that exists but is invalid keeps what came from it enforced.
        doomed = [
            name
            for name, source in self._managed(applied).items()
            if name not in wanted and source not in snapshot.invalid_files
        ]
        planned += self.enforcer.plan_removal(doomed, applied) if doomed else []
        report = self._execute(planned, applied)
        elapsed = time.monotonic() - started
        self.metrics.passes.inc()
        self.metrics.duration.observe(elapsed)
        self.metrics.policies.labels("valid").set(len(snapshot.policies))
        self.metrics.invalid_files.set(len(snapshot.invalid_files))
        self.metrics.last_good_store_failing.set(snapshot.store_error is not None)
        if not report.failed:
            self.metrics.last_success.set_to_current_time()
        invalid = {
            Path(file).name: readiness_summary(problems)
            for file, problems in snapshot.invalid_files.items()
            if problems
        }
        self._record(
            PassOutcome(frozenset(wanted), dict(report.failed), invalid, None, snapshot.store_error)
        )
        return report

    def _record(self, outcome: PassOutcome) -> None:
        """Hand a completed pass to metrics and /readyz; log when readiness changes (each
        failure is also logged where it happens)."""
        self.metrics.record_pass(outcome)
        keys = outcome.keys()
        if keys == self._not_ready:
            return
        if keys:
            log.warning("not ready: %s", "; ".join(outcome.reasons()))
        else:
            log.info("ready: every policy in %s is applied", self.policy_dir)
        self._not_ready = keys

    def _execute(self, planned: list[Planned], applied: dict[str, AppliedPolicy]) -> PassReport:
        report = PassReport()
        waiting = {(item.plan.name, w) for item in planned for w in item.plan.warnings}
        for name, warning in sorted(waiting - self._waiting):  # once, until it clears
            log.warning("%s: %s; applied where it can, retried when it appears", name, warning)
        self._waiting = waiting
        work = [item for item in planned if item.plan.changed or item.plan.blocked]
        drift = {item.plan.name: drift_of(item.plan, applied.get(item.plan.name)) for item in work}
        for problems in drift.values():
            for problem in problems:
                self.metrics.drift_found.labels(problem).inc()
        for outcome in self.enforcer.apply(work) if work else []:
            plan = outcome.plan
            if not outcome.ok:
                report.failed[plan.name] = outcome.error or "failed"
                self.metrics.apply_errors.labels(plan.name).inc()
                log.error("%s: not applied: %s", plan.name, outcome.error)
                continue
            if plan.new_revision is None:
                report.removed.append(plan.name)
                log.info("%s: removed", plan.name)
                continue
            report.applied.append(plan.name)
            for problem in drift.get(plan.name, []):
                report.repaired += 1
                self.metrics.drift_repaired.labels(problem).inc()
            log.info(
                "%s",
                plan.summary(),
                extra={"steps": [s.describe() for s in plan.steps if s.action is not Action.KEEP]},
            )
        return report

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

    def device_paths(self) -> list[str]:
        """Every device path a device rule of the last pass's policies names."""
        return sorted({path for policy in self.policies for _, path in device_paths(policy)})

    def targets(self) -> list[Target]:
        """Every target of the policies of the last pass."""
        return [target for policy in self.policies for target in policy.targets]


def _release_free_heap() -> None:
    """Return free heap pages to the kernel (glibc ``malloc_trim``). bcc's first compile
    grows the heap by ~40 MiB that the daemon never uses again; elsewhere, a no-op."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


class Service:
    """The loop around Reconciler: events wake it, a resync interval bounds it, SIGTERM
    ends it cleanly (enforcement stays, it lives in the kernel), SIGHUP re-reads."""

    def __init__(self, reconciler: Reconciler, interval: float) -> None:
        self.reconciler = reconciler
        self.interval = interval
        self._stop = False
        self._reread = False

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            self._reread = True
        else:
            self._stop = True

    def run(self) -> None:
        reconciler = self.reconciler
        health = reconciler.metrics.health  # beaten at every pass and every wake-up
        watcher = Watcher(reconciler.policy_dir)
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_write, False)
        signal.set_wakeup_fd(wake_write)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        try:
            next_resync = 0.0
            while not self._stop:
                if self._reread:
                    self._reread = False
                    reconciler.source.reread()  # every file again; last good versions kept
                    log.info("SIGHUP: re-reading %s", reconciler.policy_dir)
                reconciler.links_generation = watcher.links_generation
                started = time.monotonic()
                health.beat()
                try:
                    report = reconciler.reconcile()
                except RUNTIME_ERRORS as error:  # e.g. bpffs cannot be mounted
                    log.error("reconcile pass failed: %s; retrying at the next wake-up", error)
                    health.pass_raised(str(error))
                    report = PassReport()
                except Exception as error:  # a bug must not end the service either
                    log.exception("reconcile pass failed; retrying at the next wake-up")
                    health.pass_raised(f"{type(error).__name__}: {error}")
                    report = PassReport()
                if report.applied or report.removed:
                    _release_free_heap()  # the first load leaves clang's heap behind
                root = reconciler.enforcer.cgroup_root
                watcher.watch_policy_dir()
                watcher.watch_cgroups(watch_folders(root, reconciler.targets()))
                dev_root = reconciler.enforcer.dev_root
                watcher.watch_devices(device_folders(reconciler.device_paths(), dev_root))
                # Resyncs start every interval, not every interval after the previous one
                # ended, so drift with no event is repaired within interval + one pass (a
                # pass longer than that still leaves half an interval idle).
                if started >= next_resync:
                    next_resync = max(started + self.interval, time.monotonic() + self.interval / 2)
                timeout = max(0.0, next_resync - time.monotonic())
                try:
                    ready, _, _ = select.select([*watcher.fds(), wake_read], [], [], timeout)
                except InterruptedError:
                    ready = []
                health.beat()
                if wake_read in ready:
                    os.read(wake_read, 512)
                watcher.drain(ready)
        finally:
            health.stopped()
            signal.set_wakeup_fd(-1)
            watcher.close()
            os.close(wake_read)
            os.close(wake_write)
        log.info("stopping; what is applied stays enforced")
