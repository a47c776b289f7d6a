"""Apply with a way back: `apply --confirm-within D`, `confirm`, and the rollback.

    with enforcer.locked():                      # rolls back what is overdue, first
        planned = enforcer.plan(policies)
        check_pending(planned, ...)              # a pending policy is not changed unforced
        rollout = apply_with_way_back(enforcer, planned, within=60.0)

For every policy whose kernel state changes, before anything changes, what it holds now (its
programs, maps and metadata) is pinned under ``<bpf_dir>/_pending/<policy>/`` with a record
naming the deadline (kernel/pending.py); a new policy is recorded as new. Then a rollback
process is started (kernel/processes.py: its own session and cgroup, SIGHUP ignored), and
only then is the policy applied. Unless `cgpolicy confirm` drops the record first, the
rollback (under the pin lock, whoever does it) switches every link back:

1. every cgroup the previous version was on gets its previous program: a link still there is
   switched with BPF_LINK_UPDATE (BPF_F_REPLACE: atomic, never no program), a link the apply
   detached is created again, before anything is detached;
2. then the links the apply created (cgroups and hooks the previous version did not have)
   are detached;
3. then the previous programs and maps are pinned back, and the previous metadata last,
   with a note of the rollback (``rolled_back``), so that `audit` shows the previous
   revision in sync. A policy that was new is removed instead.

The rollback does not depend on the process that applied: the rollback process does it at
the deadline, and if that process is gone too (killed, or the host's OOM killer), every
later cgpolicy command that takes the pin lock (and every pass of the reconcile service)
rolls back what is overdue before it does anything else. Exactly one of a confirm and a
rollback wins: both run under the pin lock, and whichever comes first drops the record.
"""

from __future__ import annotations

import getpass
import hashlib
import logging
import os
import secrets
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from cgpolicy import durations
from cgpolicy.contract import attach_hook
from cgpolicy.enforcer.apply import ApplyError, detach_pinned_link, remove_policy
from cgpolicy.enforcer.dns import DnsError, publish_targets
from cgpolicy.enforcer.lockout import guard, hierarchy_of
from cgpolicy.enforcer.plan import plan_removal
from cgpolicy.kernel import pending, pins
from cgpolicy.kernel.applied import read_named
from cgpolicy.kernel.bpf import CgroupLink, Program
from cgpolicy.kernel.cgroup import (
    CgroupError,
    cgroup_id,
    matching_children,
    open_cgroup,
    remove_cgroup_tree,
    remove_if_empty,
)
from cgpolicy.kernel.hooks import hook as hook_named
from cgpolicy.kernel.lock import LockError, PinFolderLock
from cgpolicy.kernel.pending import PendingRecord, boottime_ns
from cgpolicy.kernel.processes import cgroup_of, leave_cgroup, spawn_detached
from cgpolicy.kernel.syscall import BpfError
from cgpolicy.policy.model import Policy

if TYPE_CHECKING:  # engine.py imports this module (its lock rolls back what is overdue)
    from cgpolicy.enforcer.engine import Enforcer, Outcome, Planned

log = logging.getLogger(__name__)

ROLLBACK_PARENT = "cgpolicy.rollback"  # the cgroup of the rollback processes
MAX_WITHIN = 86400.0


def parse_duration(text: str) -> float:
    """Seconds in a --confirm-within value (cgpolicy.durations): at most a day."""
    return durations.parse_duration(text, MAX_WITHIN)


def when(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def seconds_left(record: PendingRecord) -> float:
    return max(0.0, (record.deadline_ns - boottime_ns()) / 1e9)


def going_back(record: PendingRecord) -> str:
    """What the rollback of ``record`` does, in words."""
    if record.previous is None:
        return "it is removed (it is new)"
    return f"it goes back to revision {record.previous}"


def describe_pending(record: PendingRecord) -> str:
    waiting = f"revision {record.revision}" if record.revision else "an unfinished apply"
    if record.overdue():  # `plan` reads without the lock, so it does not roll back itself
        return (
            f"{record.policy}: confirmation for {waiting} overdue since "
            f"{when(record.deadline_wall)}: the next apply, remove, confirm or service pass "
            f"rolls it back ({going_back(record)})"
        )
    return (
        f"{record.policy}: confirmation pending for {waiting} until "
        f"{when(record.deadline_wall)} ({seconds_left(record):.0f} s left); unless "
        f"`cgpolicy confirm {record.policy}` comes first, {going_back(record)}"
    )


def pending_json(record: PendingRecord) -> dict[str, object]:
    return {
        "policy": record.policy,
        "revision": record.revision,
        "previous": record.previous,
        "deadline": when(record.deadline_wall),
        "seconds_left": round(seconds_left(record), 1),
        "applied_by": record.applied_by,
    }


def read_pending(bpf_dir: Path) -> dict[str, PendingRecord]:
    """Every confirmation pending under ``bpf_dir`` (none when it does not exist)."""
    if not pins.bpf_dir_exists(bpf_dir):
        return {}
    return pending.read_records(bpf_dir)


# --- the rollback -----------------------------------------------------------------------


@dataclass(frozen=True)
class RolledBack:
    policy: str
    previous: str | None  # the revision restored; None: the policy was new and is removed
    revision: str | None  # the revision that was not confirmed
    error: str | None = None

    def describe(self) -> str:
        what = f"revision {self.revision}" if self.revision else "an apply that did not finish"
        if self.error:
            return f"{self.policy}: rolling back {what} failed: {self.error}"
        if self.previous is None:
            return f"{self.policy}: not confirmed in time: removed (it was new)"
        return (
            f"{self.policy}: not confirmed in time: rolled back from {what} "
            f"to revision {self.previous}"
        )

    def to_json(self) -> dict[str, object]:
        return {
            "policy": self.policy,
            "outcome": "failed" if self.error else "rolled_back",
            "previous": self.previous,
            "revision": self.revision,
            "error": self.error,
        }


def _same_cgroup(root: Path, relative: str, wanted: int) -> int | None:
    """An fd of the cgroup ``relative`` if it is still the cgroup ``wanted`` (not one
    re-created under the same path); None when it is gone."""
    try:
        fd = open_cgroup(root / relative)
    except CgroupError:
        return None
    if cgroup_id(fd) != wanted:
        os.close(fd)
        return None
    return fd


def _restore(bpf_dir: Path, root: Path, record: PendingRecord, kept: pending.Previous) -> None:
    """Make the policy hold ``kept`` again: make before break, metadata last."""
    name, meta = record.policy, kept.meta
    assert meta is not None and kept.raw_meta is not None
    current = read_named(bpf_dir, name) if pins.policy_exists(bpf_dir, name) else None
    hooks = current.hooks if current is not None else {}
    # 1. every cgroup the previous version was on gets its program back
    for hook, program in kept.programs.items():
        state = hooks.get(hook)
        for cid, path in meta.cgroups.items():
            link = state.links.get(cid) if state is not None else None
            pin = pins.link_pin(bpf_dir, name, hook, cid)
            if link is not None and link.attached:
                if link.prog_id != program.id:
                    with CgroupLink.from_pin(pin) as opened, Program.from_id(link.prog_id) as old:
                        opened.update(program.fd, old.fd)
                continue
            fd = _same_cgroup(root, path, cid)
            if fd is None:
                continue  # gone meanwhile: nothing to enforce there
            try:
                created = CgroupLink.create(
                    program.fd, fd, hook_named(attach_hook(hook)).attach_type
                )
            finally:
                os.close(fd)
            with created:
                pins.pin_replacing(created, pin)
    # 2. then the links the previous version did not have go
    for hook, state in hooks.items():
        for cid in state.links:
            if hook not in kept.programs or cid not in meta.cgroups:
                detach_pinned_link(pins.link_pin(bpf_dir, name, hook, cid))
        if hook not in kept.programs:
            pins.remove_folder(pins.hook_dir(bpf_dir, name, hook))
    # 3. the previous programs and maps pinned back, the metadata last
    for hook, program in kept.programs.items():
        pins.pin_replacing(program, pins.hook_dir(bpf_dir, name, hook) / pins.PROG_PIN)
    folder = pins.policy_dir(bpf_dir, name)
    for map_name in pins.MAP_PINS:
        if map_name == pins.META_PIN:
            continue
        if map_name in kept.maps:
            pins.pin_replacing(kept.maps[map_name], folder / map_name)
        else:
            pins.unpin(folder / map_name)
    scope, targets = kept.maps.get(pins.DNS_SCOPE_PIN), kept.maps.get(pins.DNS_TARGETS_PIN)
    if scope is not None and targets is not None:
        try:  # the previous targets, which the apply may have changed in these same maps
            publish_targets(scope, targets, dict(meta.cgroups))
        except (BpfError, DnsError) as error:
            log.warning("policy %s: DNS target cgroups not restored: %s", name, error)
    data = dict(kept.raw_meta)
    data["rolled_back"] = {
        "from": record.revision,
        "at": when(time.time()),
        "deadline": when(record.deadline_wall),
    }
    pending.write_raw_meta(bpf_dir, name, data)


def roll_back(bpf_dir: Path, root: Path, record: PendingRecord) -> RolledBack:
    """Switch ``record``'s policy back to what it was (remove it if it was new) and drop
    its pending state. Call it with the pin lock held."""
    name = record.policy
    try:
        kept = pending.open_previous(bpf_dir, name)
        try:
            if kept.meta is None and record.previous is not None:
                # Never taken for "it was new": removing it would lift what is enforced.
                pending.drop(bpf_dir, name)
                lost = "the kept previous version is missing; what is applied now stays"
                result = RolledBack(name, record.previous, record.revision, lost)
                log.error("%s", result.describe())
                return result
            if kept.meta is None:
                if pins.policy_exists(bpf_dir, name):
                    remove_policy(plan_removal(read_named(bpf_dir, name)), bpf_dir)
            else:
                _restore(bpf_dir, root, record, kept)
        finally:
            kept.close()
        pending.drop(bpf_dir, name)
    except (BpfError, OSError) as error:
        result = RolledBack(name, record.previous, record.revision, str(error))
        log.error("%s", result.describe())
        return result
    result = RolledBack(name, record.previous, record.revision)
    log.warning("%s", result.describe())
    return result


def roll_back_overdue(bpf_dir: Path, root: Path) -> list[RolledBack]:
    """Roll back every confirmation whose deadline has passed, drop the pending folders of
    applies that never armed theirs, and end rollback processes with nothing left to do.
    Call it with the pin lock held."""
    try:
        if not pins.bpf_dir_exists(bpf_dir):
            return []
        records = pending.read_records(bpf_dir)
        for name in pending.unarmed(bpf_dir):
            pending.drop(bpf_dir, name)
    except OSError as error:
        log.error("pending confirmations under %s cannot be read: %s", bpf_dir, error)
        return []
    now = boottime_ns()
    done = [
        roll_back(bpf_dir, root, record)
        for record in sorted(records.values(), key=lambda r: r.policy)
        if record.overdue(now)
    ]
    stop_idle_timers(bpf_dir, root)  # and the cgroups of rollback processes that were killed
    return done


# --- the rollback process ---------------------------------------------------------------


def _tree_tag(bpf_dir: Path) -> str:
    """Which pin folder a rollback process serves (tests run many side by side)."""
    return hashlib.sha256(os.fsencode(os.path.abspath(bpf_dir))).hexdigest()[:8]


def timer_cgroup(root: Path, bpf_dir: Path, token: str) -> Path:
    return root / ROLLBACK_PARENT / f"{_tree_tag(bpf_dir)}-{token}"


def start_timer(bpf_dir: Path, root: Path, token: str) -> int:
    """Start the rollback process of ``token`` (see kernel/processes.spawn_detached)."""
    command = [
        sys.executable,
        "-m",
        "cgpolicy",
        "--cgroup-root",
        str(root),
        "--bpf-dir",
        str(bpf_dir),
        "--log-level",
        "info",
        "rollback-timer",
        token,
    ]
    return spawn_detached(command, timer_cgroup(root, bpf_dir, token))


def stop_idle_timers(bpf_dir: Path, root: Path) -> None:
    """End the rollback processes of this pin folder that have nothing left to roll back
    (all confirmed), and remove their cgroups. Call it with the pin lock held."""
    parent = root / ROLLBACK_PARENT
    if not os.path.isdir(parent):
        return  # no rollback process has run (the usual case: nothing more to read)
    prefix = f"{_tree_tag(bpf_dir)}-"
    try:
        tokens = {record.token for record in read_pending(bpf_dir).values()}
    except OSError:
        return  # cannot tell which are idle: leave them, they end at their deadline
    # this process's cgroup is read relative to the hierarchy, which --cgroup-root may be
    # below: compared there, or a rollback process takes its own cgroup for an idle one's
    _, below = hierarchy_of(root)
    own = cgroup_of(os.getpid())
    for leaf in matching_children(parent, f"{prefix}*"):
        relative = os.path.normpath(os.path.join(below, os.path.relpath(leaf, root)))
        if leaf.name[len(prefix) :] in tokens or relative == own:
            continue
        try:
            remove_cgroup_tree(leaf)
        except OSError as error:
            log.warning("rollback process cgroup %s: %s", leaf, error)
    remove_if_empty(parent)


RETRY_S = 5.0  # after a failed rollback, or a lock not had


def run_timer(bpf_dir: Path, root: Path, token: str) -> None:
    """The rollback process: sleep until the earliest deadline of ``token``'s records, then
    roll back what is overdue under the pin lock; again until none of them is left."""
    try:
        while True:
            try:
                records = [r for r in read_pending(bpf_dir).values() if r.token == token]
            except OSError as error:
                log.error("pending confirmations cannot be read: %s", error)
                return
            if not records:
                return
            wait = (min(r.deadline_ns for r in records) - boottime_ns()) / 1e9
            if wait > 0:
                time.sleep(min(wait, RETRY_S))
                continue
            try:
                with PinFolderLock(bpf_dir, timeout=60):
                    done = roll_back_overdue(bpf_dir, root)
            except LockError as error:
                log.warning("rollback waits for the lock: %s", error)
                continue
            if any(result.error for result in done):
                time.sleep(RETRY_S)
    finally:
        leave_cgroup(root, timer_cgroup(root, bpf_dir, token))


# --- apply and confirm ------------------------------------------------------------------


def check_pending(
    planned: Iterable[Planned], records: dict[str, PendingRecord], force: bool
) -> None:
    """A policy waiting for confirmation is not changed again unless forced: confirm it
    first, or let it roll back (as `netplan try` holds a second change while one waits)."""
    for item in planned:
        record = records.get(item.plan.name)
        if record is None or item.compiled is None or not item.plan.changed or force:
            continue
        item.plan.problems.append(
            f"a confirmation is pending until {when(record.deadline_wall)} "
            f"(`cgpolicy confirm {record.policy}` keeps revision {record.revision}; otherwise "
            f"{going_back(record)}); confirm it or let it roll back first, or --force"
        )


def check_way_back(bpf_dir: Path, planned: Iterable[Planned]) -> None:
    """A policy whose current state is an interrupted apply has no version to go back to."""
    for item in planned:
        if item.compiled is None or item.plan.blocked or not item.plan.changed:
            continue
        if not pins.policy_exists(bpf_dir, item.plan.name):
            continue
        if read_named(bpf_dir, item.plan.name).interrupted:
            item.plan.problems.append(
                "what it holds now is an interrupted apply, not a version to go back to; "
                "apply it without --confirm-within (or remove it) first"
            )


@dataclass
class Rollout:
    outcomes: list[Outcome]
    within: float | None = None  # --confirm-within, in seconds
    pending: list[PendingRecord] = field(default_factory=list)  # armed by this apply
    ended: list[str] = field(default_factory=list)  # pending ones this (final) apply ended

    def to_json(self) -> dict[str, object]:
        return {
            "pending": [pending_json(record) for record in self.pending],
            "ended": self.ended,
        }


def _applied_by() -> dict[str, object]:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return {"pid": os.getpid(), "user": user, "command": " ".join(sys.argv)[:200]}


def apply_with_way_back(
    enforcer: Enforcer,
    planned: list[Planned],
    within: float | None,
    records: dict[str, PendingRecord] | None = None,
) -> Rollout:
    """Apply ``planned`` (call it with the lock held). With ``within`` seconds, keep the
    way back of every policy that changes and start the rollback process first; without,
    a (forced) apply of a policy waiting for confirmation is final and ends its wait."""
    bpf_dir, root = enforcer.bpf_dir, enforcer.cgroup_root
    records = read_pending(bpf_dir) if records is None else records
    armed: dict[str, PendingRecord] = {}
    if within is not None:
        check_way_back(bpf_dir, planned)
        token = secrets.token_hex(6)
        deadline_ns = boottime_ns() + int(within * 1e9)
        deadline_wall = time.time() + within
        for item in planned:
            if item.compiled is None or item.plan.blocked or not item.plan.changed:
                continue
            name = item.plan.name
            if name in records:  # forced over a pending one: the way back stays the same
                previous = records[name].previous
            else:
                previous = item.plan.old_revision
                if previous is not None:
                    pending.keep_previous(bpf_dir, name)
            record = PendingRecord(
                name, token, deadline_ns, deadline_wall, previous, None, _applied_by()
            )
            pending.write_record(bpf_dir, record)
            armed[name] = record
        if armed:
            try:
                start_timer(bpf_dir, root, token)
            except OSError as error:  # no way back: nothing is applied
                for name in armed:
                    if name in records:
                        pending.write_record(bpf_dir, records[name])
                    else:
                        pending.drop(bpf_dir, name)
                raise ApplyError(
                    f"cannot start the rollback process ({error}); nothing was applied"
                ) from error
    outcomes = enforcer.apply(planned)
    rollout = Rollout(outcomes, within)
    for outcome in outcomes:
        name = outcome.plan.name
        if name in armed:
            if outcome.ok:  # the window counts from now, when the new version is in force
                record = replace(
                    armed[name],
                    revision=outcome.plan.new_revision,
                    deadline_ns=boottime_ns() + int((within or 0) * 1e9),
                    deadline_wall=time.time() + (within or 0),
                )
                pending.write_record(bpf_dir, record)
                rollout.pending.append(record)
            elif name in records:
                pending.write_record(bpf_dir, records[name])  # the earlier wait goes on
            else:
                pending.drop(bpf_dir, name)  # nothing changed: nothing to go back from
        elif name in records and outcome.ok and outcome.plan.changed:
            pending.drop(bpf_dir, name)
            rollout.ended.append(name)
    stop_idle_timers(bpf_dir, root)
    return rollout


def end_removed(enforcer: Enforcer, outcomes: list[Outcome]) -> None:
    """A policy removed while waiting for confirmation waits no more (call it with the
    lock held): its removal is final."""
    records = read_pending(enforcer.bpf_dir)
    for outcome in outcomes:
        if outcome.ok and outcome.plan.name in records:
            pending.drop(enforcer.bpf_dir, outcome.plan.name)
    stop_idle_timers(enforcer.bpf_dir, enforcer.cgroup_root)


@dataclass(frozen=True)
class Confirmed:
    policy: str
    outcome: str  # "confirmed", "rolled back" (too late), "not pending", "failed"
    message: str

    @property
    def ok(self) -> bool:
        return self.outcome == "confirmed"

    def to_json(self) -> dict[str, object]:
        return {"policy": self.policy, "outcome": self.outcome, "message": self.message}


def _previous_words(record: PendingRecord) -> str:
    return f"revision {record.previous}" if record.previous else "nothing: it was new"


def _not_pending(bpf_dir: Path, name: str) -> Confirmed:
    # by the applied policies' folders, never by a path made of the name (``..``, ``a/b``)
    if name not in {folder.name for folder in pins.policy_folders(bpf_dir)}:
        why = "no policy of this name is applied (a new policy not confirmed in time is removed)"
    else:
        note = (pending.read_raw_meta(bpf_dir, name) or {}).get("rolled_back")
        if isinstance(note, dict):
            why = (
                f"its confirmation window ended at {note.get('deadline')}: it was rolled back "
                f"from revision {note.get('from')} at {note.get('at')}"
            )
        else:
            why = "it was confirmed already, or applied without --confirm-within"
    return Confirmed(name, "not pending", f"{name}: nothing to confirm: {why}")


def confirm(
    bpf_dir: Path, root: Path, names: list[str] | None, lock_timeout: float
) -> list[Confirmed]:
    """Keep what the named policies (all that wait, when ``names`` is None) hold now. One
    whose deadline has passed is rolled back here instead, and says so: a confirm and a
    rollback never both happen."""
    results = []
    with PinFolderLock(bpf_dir, lock_timeout):
        records = read_pending(bpf_dir)
        for name in sorted(records) if names is None else names:
            record = records.get(name)
            if record is None:
                results.append(_not_pending(bpf_dir, name))
            elif record.overdue():
                done = roll_back(bpf_dir, root, record)
                outcome = "failed" if done.error else "rolled back"
                results.append(Confirmed(name, outcome, f"too late: {done.describe()}"))
            elif record.revision is None:
                results.append(
                    Confirmed(
                        name,
                        "failed",
                        f"{name}: cannot confirm: the apply that armed its rollback did not "
                        f"finish; {going_back(record)} at {when(record.deadline_wall)}",
                    )
                )
            else:
                pending.drop(bpf_dir, name)
                results.append(
                    Confirmed(
                        name,
                        "confirmed",
                        f"{name}: confirmed revision {record.revision}; it stays (no rollback "
                        f"to {_previous_words(record)})",
                    )
                )
        roll_back_overdue(bpf_dir, root)
        stop_idle_timers(bpf_dir, root)
    return results


def plan_checked(
    enforcer: Enforcer, policies: list[Policy], force: bool
) -> tuple[list[Planned], dict[str, PendingRecord]]:
    """What `plan` and `apply` show and do: the plans, with the lockout guard's and the
    pending confirmations' refusals on them, and the confirmations pending now."""
    planned = enforcer.plan(policies, force=force)
    guard([item.plan for item in planned], policies, enforcer.cgroup_root, force)
    records = read_pending(enforcer.bpf_dir)
    check_pending(planned, records, force)
    return planned, records
