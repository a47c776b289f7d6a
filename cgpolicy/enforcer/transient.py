"""`cgpolicy run` (and `test --kernel`): policies in a fresh cgroup, everything removed after.

`run` touches nothing it did not create:

- Its cgroup, ``cgpolicy.run/<policy>-<pid>``, is made with ``mkdir``; one that exists
  already is refused, never reused or removed.
- Its transient policy gets a name that no applied policy has, chosen while it holds the
  pin folder's lock: ``<policy[:50]>-run<pid>``, or ``...-run<pid>-2``, ``-3``... when
  that is taken. It is recorded as owned by this `run` process (ownership.py), so `apply`
  and `remove` refuse it to others (without --force) while the command runs.
- Under the same hold of the lock it records every object it pinned (the id of each link,
  program and map). At the end it removes those objects only, and only while the policy is
  still its own: a policy that was forced away and replaced under the same name, or a pin
  that now holds another object, stays as it is. Never by name alone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cgpolicy.enforcer.apply import ApplyError
from cgpolicy.enforcer.engine import Enforcer
from cgpolicy.enforcer.ownership import Owner
from cgpolicy.kernel import pins
from cgpolicy.kernel.applied import read_named
from cgpolicy.kernel.cgroup import (
    CgroupExists,
    make_cgroup,
    remove_cgroup_tree,
    remove_if_empty,
)
from cgpolicy.kernel.lock import LockError
from cgpolicy.kernel.processes import run_in_cgroup
from cgpolicy.kernel.syscall import BpfError
from cgpolicy.policy.model import Policy, Target

log = logging.getLogger(__name__)

RUN_PARENT = "cgpolicy.run"
NAME_ATTEMPTS = 100


@dataclass(frozen=True)
class Created:
    """What one run applied: its transient policy's name, owner and pinned objects."""

    name: str
    owner: Owner
    pinned: tuple[pins.PinnedObject, ...]


def transient_name(bpf_dir: Path, base: str, pid: int) -> str:
    """A policy name for a run of ``base`` that nothing under ``bpf_dir`` has (call it with
    the pin folder's lock held, so that nobody takes the name before it is applied)."""
    for attempt in range(1, NAME_ATTEMPTS + 1):
        suffix = "" if attempt == 1 else f"-{attempt}"
        candidate = f"{base[: 50 - len(suffix)]}-run{pid}{suffix}"  # 63 characters at most
        if not pins.policy_exists(bpf_dir, candidate):
            return candidate
    raise ApplyError(
        f"no free name for the transient policy of {base}: {base[:50]}-run{pid} and "
        f"{NAME_ATTEMPTS - 1} variants are all taken under {bpf_dir}"
    )


def record_created(bpf_dir: Path, name: str, owner: Owner) -> Created:
    """Everything pinned under the policy folder ``name``, which this run made (call it
    with the lock still held since the name was found free)."""
    return Created(name, owner, tuple(pins.pinned_objects(pins.policy_dir(bpf_dir, name))))


def remove_created(bpf_dir: Path, created: Created) -> None:
    """Unpin (and detach) exactly the objects ``created`` recorded, while the policy is
    still the run's; leave anything else, and say so. Call it with the lock held."""
    folder = pins.policy_dir(bpf_dir, created.name)
    try:
        meta = read_named(bpf_dir, created.name, links=False).meta
    except OSError:  # gone already (or no longer a folder cgpolicy trusts: ids decide below)
        meta = None
    holder = Owner.from_json(meta.owner) if meta else None
    if meta is not None and holder != created.owner:
        who = holder.describe() if holder else "an owner that recorded none"
        log.warning("%s now belongs to %s: left as it is", created.name, who)
        return
    failed = []
    # Links first: enforcement ends with the attachments, then the programs and maps go.
    for item in sorted(created.pinned, key=lambda p: p.kind != "link"):
        try:
            pins.unpin_if_same(item)
        except (BpfError, OSError) as error:
            failed.append(f"{item.path}: {error}")
    for hook_folder in {item.path.parent for item in created.pinned} - {folder}:
        pins.remove_empty(hook_folder)
    pins.remove_empty(folder)
    if failed:
        raise ApplyError(
            f"could not remove all of the transient policy {created.name} "
            f"({'; '.join(failed)}); `cgpolicy remove {created.name}` removes the rest"
        )
    left = pins.pin_paths(folder)
    if left:
        log.warning(
            "%s: left %d pins this run did not make: %s",
            created.name,
            len(left),
            ", ".join(str(p.relative_to(folder)) for p in left),
        )


def _make_cgroup(cgroup: Path, relative: str) -> None:
    """Make the run's own cgroup (and the shared parent, which another run that ends may
    remove meanwhile); one that exists already is not this run's."""
    try:
        make_cgroup(cgroup)
    except CgroupExists:
        raise ApplyError(
            f"cgroup {relative} exists already; `run` makes a cgroup of its own and does "
            "not use (or remove) one it did not make"
        ) from None


def run_under_policy(enforcer: Enforcer, policy: Policy, command: list[str]) -> int:
    """Run ``command`` in a new cgroup with ``policy`` applied to it (and only to it); return
    its exit status. The policy is applied under a name of its own, as this run's, so any
    applied policy (of the same name or of the transient name) is untouched."""
    with applied_in_throwaway(enforcer, [policy], policy.name) as (cgroup, _names):
        return run_in_cgroup(command, cgroup)


@contextmanager
def applied_in_throwaway(
    enforcer: Enforcer, policies: list[Policy], label: str
) -> Iterator[tuple[Path, dict[str, str]]]:
    """A fresh cgroup ``cgpolicy.run/<label>-<pid>`` with every policy of ``policies``
    applied to it (and only to it) under a transient name of its own (`run`, with the
    policy's name as ``label``; `test --kernel`): yields the cgroup and each policy's
    transient name by its own name. Everything is removed on the way out, also after a
    failure or KeyboardInterrupt, and the policies also when a cgroup stays busy."""
    pid = os.getpid()
    owner = Owner.run(pid)
    runner = Enforcer(
        enforcer.cgroup_root,
        enforcer.bpf_dir,
        enforcer.dev_root,
        owner=owner,
        lock_timeout=enforcer.lock_timeout,
    )
    relative = f"{RUN_PARENT}/{label}-{pid}"
    cgroup = enforcer.cgroup_root / relative
    _make_cgroup(cgroup, relative)
    created: list[Created] = []
    try:
        with runner.locked():
            transients = []
            for policy in policies:
                name = transient_name(runner.bpf_dir, policy.name, pid)
                transients.append(
                    dataclasses.replace(
                        policy, name=name, targets=(Target(relative, is_glob=False),)
                    )
                )
            try:
                outcomes = runner.apply(runner.plan(transients))
            finally:  # also what a failed apply left behind
                created = [record_created(runner.bpf_dir, t.name, owner) for t in transients]
        failed = [f"{o.plan.name}: {o.error or 'apply failed'}" for o in outcomes if not o.ok]
        if failed:
            raise ApplyError("; ".join(failed))
        yield cgroup, {p.name: t.name for p, t in zip(policies, transients, strict=True)}
    finally:
        try:
            remove_cgroup_tree(cgroup)
            remove_if_empty(cgroup.parent)
        finally:  # the transient policies go even when a cgroup stays busy
            if created:
                try:
                    with runner.locked():
                        for item in created:
                            remove_created(runner.bpf_dir, item)
                except LockError as error:
                    names = " ".join(item.name for item in created)
                    raise ApplyError(
                        f"could not remove the transient policies {names}: {error}; "
                        f"`cgpolicy remove {names}` removes them"
                    ) from error
