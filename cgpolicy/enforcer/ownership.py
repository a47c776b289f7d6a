"""Who applied a policy, and who may change or remove it.

Every apply records its owner in the policy's pinned metadata:

    service   the reconcile service (`cgpolicy reconcile`), for the policies of its folder
    cli       an operator's `cgpolicy apply`
    run       `cgpolicy run`, for its transient policy: the pid and start time of the
              `run` process (and its pid namespace), so that a reused pid is not taken for it

The rules (docs/ownership.md says the same for operators):

- An owner changes and removes its own policies freely.
- The CLI does not change or remove the service's policies, nor a running `run`'s, unless
  given ``--force``; forced, it becomes the owner. Applying what is already enforced is no
  change, and is not refused (the owner stays).
- The service never forces: a policy of its folder's name that was applied by hand is
  left as the operator made it, and reported (log, ``cgpolicy_policy_failing``, /readyz)
  on every pass until it is handed back, which happens when the operator applies the
  folder's own file by hand (the recorded source is that file, and what is enforced agrees
  with it) or removes it. A policy applied from anywhere else is never taken over, whatever
  its content: whoever writes the folder must not be able to adopt (and then delete) what
  root applied by hand, nor learn from the service whether a guess matches it.
- A `run` whose process has ended owns nothing any more: what it left is anybody's.
- Metadata from before owners were recorded has no owner: anybody may change it, and whoever
  does is recorded (the service records itself on its folder's policies at its first pass;
  only on those whose recorded source is its folder's file).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cgpolicy.enforcer.plan import PolicyPlan
from cgpolicy.kernel.applied import AppliedPolicy

SERVICE = "service"
CLI = "cli"
RUN = "run"


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


@dataclass(frozen=True)
class Owner:
    kind: str  # SERVICE, CLI or RUN (a newer cgpolicy may record others)
    pid: int | None = None  # RUN: the `cgpolicy run` process
    start: int | None = None  # RUN: its start time, so that a reused pid is not taken for it
    pid_ns: int | None = None  # RUN: the pid namespace its pid means something in

    @classmethod
    def service(cls) -> Owner:
        return cls(SERVICE)

    @classmethod
    def cli(cls) -> Owner:
        return cls(CLI)

    @classmethod
    def run(cls, pid: int | None = None) -> Owner:
        """The `cgpolicy run` process ``pid`` (this process by default)."""
        pid = os.getpid() if pid is None else pid
        return cls(RUN, pid, _start_time(pid), _pid_namespace())

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = {"kind": self.kind}
        for key in ("pid", "start", "pid_ns"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        return data

    @classmethod
    def from_json(cls, data: object) -> Owner | None:
        """The owner recorded in metadata; None when none was (metadata from before owners)."""
        if not isinstance(data, dict) or not isinstance(data.get("kind"), str):
            return None

        def number(key: str) -> int | None:
            value = data.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) else None

        return cls(data["kind"], number("pid"), number("start"), number("pid_ns"))

    def ended(self) -> bool:
        """A `run` whose process is gone (its pid is free or names a later process). A run
        in another pid namespace cannot be judged from here, and counts as running."""
        if self.kind != RUN or self.pid is None:
            return False
        if self.pid_ns is not None and self.pid_ns != _pid_namespace():
            return False
        start = _start_time(self.pid)
        return start is None or (self.start is not None and start != self.start)

    def describe(self) -> str:
        if self.kind == SERVICE:
            return "the reconcile service"
        if self.kind == CLI:
            return "`cgpolicy apply`"
        if self.kind == RUN:
            state = ", which has ended" if self.ended() else ", still running"
            return f"`cgpolicy run` (pid {self.pid}{state})"
        return f"an owner this cgpolicy does not know ({self.kind!r})"


def recorded_owner(applied: AppliedPolicy) -> Owner | None:
    return Owner.from_json(applied.meta.owner) if applied.meta else None


def _free(applied: AppliedPolicy | None, requester: Owner) -> tuple[bool, Owner | None]:
    """Whether ``requester`` may change ``applied`` without asking, and who holds it."""
    if applied is None or applied.meta is None:
        return True, None  # nothing applied, or a folder an interrupted apply left unnamed
    holder = recorded_owner(applied)
    if holder is None or holder == requester or holder.ended():
        return True, holder
    return False, holder


def same_source(recorded: str | None, source: str | None) -> bool:
    """Whether the source recorded in a policy's metadata is the file ``source``: the same
    absolute path, or the same name in the same folder (its path resolved). The file itself
    is not resolved: whoever writes the folder could point it anywhere. A relative path
    (recorded by an older cgpolicy, relative to a directory nobody knows) is no match."""
    if not recorded or not source or not os.path.isabs(recorded) or not os.path.isabs(source):
        return False
    recorded, source = os.path.normpath(recorded), os.path.normpath(source)
    if recorded == source:
        return True
    if os.path.basename(recorded) != os.path.basename(source):
        return False
    return os.path.realpath(os.path.dirname(recorded)) == os.path.realpath(os.path.dirname(source))


def _refusal(
    holder: Owner | None,
    requester: Owner,
    applied: AppliedPolicy,
    removal: bool,
    source: str | None = None,
) -> str:
    recorded = applied.meta.source if applied.meta else None
    where = f" (from {recorded})" if recorded else ""
    if requester.kind == SERVICE:
        # The same words whatever is applied and whatever the folder's file says (no
        # revision): what the service reports must not tell whoever writes the folder
        # whether their file matches what an operator applied.
        own_file = f"`cgpolicy apply {source}`" if source else "its file in this folder"
        by = "by hand (`cgpolicy apply`)" if holder is not None else "without an owner recorded"
        if holder is None or holder.kind == CLI:
            return (
                f"applied {by}; the service does not revert it and does not take it over. "
                f"To hand it back, apply this folder's own file by hand ({own_file}: the "
                "service takes over what was applied from that file once it agrees with "
                "it), or `cgpolicy remove` it"
            )
        return f"owned by {holder.describe()}; the service leaves it alone"
    assert holder is not None
    if holder.kind == SERVICE:
        if removal:
            return (
                f"owned by the reconcile service{where}; delete its file there to remove it "
                "(--force removes it now, and the service applies it again while its file "
                "is there)"
            )
        return (
            f"owned by the reconcile service{where}; change its file there, or take it over "
            "with --force (the service then leaves it alone, and reports it, until it is "
            "handed back)"
        )
    if holder.kind == RUN:
        return (
            f"the transient policy of {holder.describe()}; it is removed when its command "
            "ends (--force takes it over now)"
        )
    return f"owned by {holder.describe()}; --force takes it over"


def check_change(
    plan: PolicyPlan,
    applied: AppliedPolicy | None,
    requester: Owner,
    force: bool,
    source: str | None = None,
) -> None:
    """Make ``plan`` record ``requester`` as the owner; block it (a problem) when another
    owner holds the policy and may not be overridden. ``source`` is the file the plan's
    policy comes from (absolute): the service takes over only what was applied from it."""
    agrees = not plan.changed and plan.old_revision == plan.new_revision
    plan.owner = requester.to_json()
    free, holder = _free(applied, requester)
    if applied is None or applied.meta is None or holder == requester:
        return
    own_file = same_source(applied.meta.source, source)
    if requester.kind == SERVICE and not force:
        # The service adopts only what was applied from its folder's very file, and only
        # as it is (it never reverts): a copy of a hand-applied policy put in the folder
        # must not let whoever writes the folder take it over, change it or remove it.
        if holder is None and own_file:
            plan.owner_change = f"owner recorded: {requester.kind}"
        elif holder is not None and holder.kind == CLI and own_file and agrees:
            plan.owner_change = "taken over from `cgpolicy apply`, which applied this folder's file"
        elif holder is None or holder.kind == CLI or not free:
            plan.problems.append(_refusal(holder, requester, applied, False, source))
        else:
            plan.owner_change = f"taken over from {holder.describe()}"
        return
    if holder is None:
        plan.owner_change = f"owner recorded: {requester.kind}"
        return
    if free or force:
        plan.owner_change = f"taken over from {holder.describe()}"
        return
    if agrees:  # nothing would change: no change to refuse
        return
    plan.problems.append(_refusal(holder, requester, applied, removal=False))


def check_removal(plan: PolicyPlan, applied: AppliedPolicy, requester: Owner, force: bool) -> None:
    """Block a removal of a policy another owner holds, unless ``force``."""
    free, holder = _free(applied, requester)
    if holder is None or holder == requester:
        return
    if free or force:
        plan.owner_change = f"was owned by {holder.describe()}"
        return
    plan.problems.append(_refusal(holder, requester, applied, removal=True))
