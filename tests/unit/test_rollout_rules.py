"""The pure parts of apply with a way back and of the lockout guard (issue 13, part 3):
durations, which targets cover which processes, which policies can deny, the refusals."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from policy_builders import policy_model

from cgpolicy.audit.render import render_pending
from cgpolicy.durations import DurationError
from cgpolicy.enforcer.engine import Planned
from cgpolicy.enforcer.lockout import can_deny, covers, guard, lockouts
from cgpolicy.enforcer.plan import Action, PolicyPlan, Step
from cgpolicy.enforcer.rollout import check_pending, describe_pending, parse_duration
from cgpolicy.kernel.pending import PendingRecord, boottime_ns
from cgpolicy.kernel.processes import Protected
from cgpolicy.policy.model import (
    DeviceRule,
    DeviceSection,
    Network,
    NetworkRule,
    NetworkSection,
    SocketAddressRule,
    SocketAddressSection,
    Sockets,
    SysctlRule,
    SysctlSection,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("60s", 60), ("2m", 120), ("90", 90), ("1h", 3600), ("1.5", 1.5), (" 3s ", 3), ("1D", 86400)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0s", "-1", "1x", "s", "2 days", "86401", "1e3", "٣"])
def test_not_durations(text: str) -> None:
    with pytest.raises(DurationError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("target", "cgroup", "covered"),
    [
        ("user.slice", "user.slice/user-0.slice/session-1.scope", True),
        (
            "user.slice/user-0.slice/session-1.scope",
            "user.slice/user-0.slice/session-1.scope",
            True,
        ),
        ("user.slice/user-0.slice/session-1.scope", "user.slice", False),  # a child: no
        ("user.slice/user-0", "user.slice/user-0.slice", False),  # a prefix is no ancestor
        ("system.slice", "user.slice", False),
        ("", "system.slice/ssh.service", True),  # the root covers everything
        (".", "", True),
        ("a", "", False),  # a process in the root cgroup: only the root covers it
    ],
)
def test_a_target_covers_its_cgroup_and_everything_below(
    target: str, cgroup: str, covered: bool
) -> None:
    assert covers(target, cgroup) is covered


SSHD = Protected(812, "/usr/sbin/sshd -D", "an sshd", "system.slice/ssh.service")
SESSION = Protected(4000, "-bash", "the leader of this terminal session", "user.slice/u/s.scope")


def test_lockouts_name_the_process_and_the_target() -> None:
    found = lockouts({11: "system.slice", 12: "other.slice"}, [SSHD, SESSION])
    assert [(f.target, f.process.pid) for f in found] == [("system.slice", 812)]
    text = found[0].describe()
    assert text == "the cgroup system.slice/ssh.service of an sshd (pid 812, /usr/sbin/sshd -D)"


def test_a_glob_as_it_matches_now_is_checked_match_by_match() -> None:
    """`*` at the top matches every top-level cgroup: the session's and sshd's included."""
    matched = {1: "init.scope", 2: "system.slice", 3: "user.slice"}
    assert {f.process.pid for f in lockouts(matched, [SSHD, SESSION])} == {812, 4000}


def test_ids_match_even_when_paths_do_not(tmp_path: Path) -> None:
    """A cgroup reached by another path (a bind mount, a renamed folder) still counts."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    inside = Protected(1, "x", "this cgpolicy", "a/b")
    parent_id = os.stat(tmp_path / "a").st_ino
    assert lockouts({parent_id: "elsewhere"}, [inside], tmp_path)
    assert not lockouts({parent_id: "elsewhere"}, [inside])


DENY_ANY = NetworkRule("deny", protocol="tcp")


@pytest.mark.parametrize(
    ("sections", "mode", "denies"),
    [
        ({"network": Network(egress=NetworkSection("deny"))}, "enforce", True),
        ({"network": Network(ingress=NetworkSection("allow", (DENY_ANY,)))}, "enforce", True),
        ({"network": Network(egress=NetworkSection("allow"))}, "enforce", False),
        ({"network": Network(egress=NetworkSection("deny"))}, "audit", False),
        (
            {
                "sockets": Sockets(
                    connect=SocketAddressSection("allow", (SocketAddressRule("deny"),))
                )
            },
            "enforce",
            True,
        ),
        (
            {"devices": DeviceSection("allow", (DeviceRule("allow", "char", 1, 3, "rwm"),))},
            "enforce",
            False,
        ),
        ({"sysctl": SysctlSection("allow", (SysctlRule("deny", "net/*"),))}, "enforce", True),
        ({}, "enforce", False),
    ],
)
def test_only_a_policy_that_can_deny_is_guarded(sections, mode, denies) -> None:
    assert can_deny(policy_model(mode, **sections)) is denies


def _plan(name: str, *steps: Step, new: str | None = "r2", old: str | None = "r1") -> PolicyPlan:
    plan = PolicyPlan(name, old, new, reload=True)
    plan.steps.extend(steps)
    return plan


def test_the_guard_blocks_unless_forced() -> None:
    policy = policy_model(name="web", network=Network(egress=NetworkSection("deny")))
    step = Step(Action.ATTACH, "egress", 7, "system.slice")
    blocked = _plan("web", step)
    guard([blocked], [policy], Path("/nonexistent"), force=False, processes=[SSHD])
    assert len(blocked.problems) == 1
    problem = blocked.problems[0]
    assert problem.startswith("lockout guard: target system.slice covers the cgroup system.slice/")
    assert "--force" in problem
    forced = _plan("web", step)
    guard([forced], [policy], Path("/nonexistent"), force=True, processes=[SSHD])
    assert not forced.problems


def test_the_guard_leaves_removals_unchanged_plans_and_detaches_alone() -> None:
    policy = policy_model(name="web", network=Network(egress=NetworkSection("deny")))
    removal = _plan("web", Step(Action.DETACH, "egress", 7, "system.slice"), new=None)
    unchanged = _plan("web", Step(Action.KEEP, "egress", 7, "system.slice"), old="r2")
    unchanged.reload = False
    leaving = _plan("web", Step(Action.DETACH, "egress", 7, "system.slice"))
    guard([removal, unchanged, leaving], [policy], Path("/x"), force=False, processes=[SSHD])
    assert not removal.problems and not unchanged.problems and not leaving.problems


def _record(**changes: object) -> PendingRecord:
    fields: dict[str, object] = {
        "policy": "web",
        "token": "t",
        "deadline_ns": 5,
        "deadline_wall": 1_800_000_000.0,
        "previous": "r1",
        "revision": "r2",
    }
    fields.update(changes)
    return PendingRecord(**fields)  # type: ignore[arg-type]


def test_a_pending_record_survives_its_encoding() -> None:
    record = _record(applied_by={"pid": 1, "user": "root"})
    assert PendingRecord.decode(record.encode().ljust(4096, b"\0")) == record
    assert PendingRecord.decode(_record(previous=None).encode()).previous is None


def test_a_pending_policy_is_not_changed_again_unless_forced() -> None:
    from cgpolicy.compiler.spec import CompiledPolicy

    compiled = CompiledPolicy.__new__(CompiledPolicy)  # only its presence counts here
    changed = Planned(_plan("web", Step(Action.UPDATE, "egress", 7, "a")), compiled)
    same = Planned(_plan("web", Step(Action.KEEP, "egress", 7, "a"), old="r2"), compiled)
    same.plan.reload = False
    other = Planned(_plan("db", Step(Action.UPDATE, "egress", 7, "a")), compiled)
    check_pending([changed, same, other], {"web": _record()}, force=False)
    assert changed.plan.problems and "a confirmation is pending until" in changed.plan.problems[0]
    assert "`cgpolicy confirm web` keeps revision r2" in changed.plan.problems[0]
    assert not same.plan.problems and not other.plan.problems
    forced = Planned(_plan("web", Step(Action.UPDATE, "egress", 7, "a")), compiled)
    check_pending([forced], {"web": _record()}, force=True)
    assert not forced.plan.problems


def test_audit_says_what_waits_and_what_happens_without_a_confirm() -> None:
    line = render_pending(
        {
            "policy": "web",
            "revision": "r2",
            "previous": None,
            "deadline": "2027-01-15 08:00:00 UTC",
            "seconds_left": 0,
        }
    )
    assert line.startswith("PENDING web: revision r2 waits for `cgpolicy confirm`")
    assert "overdue" in line and "removed (it is new)" in line


def test_plan_says_a_wait_whose_deadline_passed_is_overdue() -> None:
    """`plan` reads without the pin lock, so it never rolls back itself: it says what will."""
    now = boottime_ns()
    late = PendingRecord("web", "t", now - 1, 0.0, "3f1a", "9c2e")
    assert "overdue since" in describe_pending(late)
    assert "goes back to revision 3f1a" in describe_pending(late)
    waiting = PendingRecord("web", "t", now + 60 * 10**9, 0.0, None, "9c2e")
    text = describe_pending(waiting)
    assert "confirmation pending for revision 9c2e" in text and "it is removed" in text
