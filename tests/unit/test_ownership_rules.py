"""Who may change or remove an applied policy (cgpolicy/enforcer/ownership.py), rule by rule;
the kernel tests (tests/kernel/test_ownership.py, test_run_isolation.py) show them end to end."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cgpolicy.enforcer.ownership import Owner, check_change, check_removal, same_source
from cgpolicy.enforcer.plan import PolicyPlan
from cgpolicy.kernel.applied import AppliedPolicy
from cgpolicy.kernel.pins import PolicyMeta

SERVICE, CLI = Owner.service(), Owner.cli()


def applied(owner: Owner | None, revision: str = "r1") -> AppliedPolicy:
    recorded = owner.to_json() if owner else None
    meta = PolicyMeta(
        "web", revision, "enforce", "/etc/cgpolicy/policies.d/web.yaml", owner=recorded
    )
    return AppliedPolicy("web", Path("/sys/fs/bpf/cgpolicy/web"), meta)


def change(new_revision: str = "r2") -> PolicyPlan:
    return PolicyPlan("web", "r1", new_revision, reload=new_revision != "r1")


def test_metadata_round_trips_the_owner_and_reads_old_metadata_as_unowned():
    meta = PolicyMeta("web", "r1", "enforce", owner=Owner.run().to_json())
    assert Owner.from_json(PolicyMeta.decode(meta.encode()).owner) == Owner.run()
    old = b'{"policy": "web", "revision": "r1", "mode": "enforce", "cgroups": {}, "rules": {}}'
    assert PolicyMeta.decode(old).owner is None
    assert Owner.from_json({"kind": 3}) is None and Owner.from_json("cli") is None


@pytest.mark.parametrize("requester", [SERVICE, CLI])
def test_an_owner_changes_its_own_policy_and_nothing_is_recorded_anew(requester):
    plan = change()
    check_change(plan, applied(requester), requester, force=False)
    assert not plan.problems and plan.owner_change is None and plan.owner == requester.to_json()


def test_the_cli_is_refused_the_services_policy_unless_forced():
    plan = change()
    check_change(plan, applied(SERVICE), CLI, force=False)
    assert plan.blocked and "owned by the reconcile service" in plan.problems[0]
    assert "--force" in plan.problems[0]
    forced = change()
    check_change(forced, applied(SERVICE), CLI, force=True)
    assert not forced.problems
    assert forced.summary() == "web: revision r1 -> r2, taken over from the reconcile service"


def test_applying_what_is_enforced_is_no_change_and_not_refused():
    plan = change("r1")
    check_change(plan, applied(SERVICE), CLI, force=False)
    assert not plan.problems and not plan.changed
    assert plan.summary() == "web: unchanged (revision r1)"


FOLDER_FILE = "/etc/cgpolicy/policies.d/web.yaml"  # where applied() says it came from


def test_the_service_never_reverts_a_cli_change_and_takes_back_what_agrees():
    refused = change()
    check_change(refused, applied(CLI), SERVICE, force=False, source=FOLDER_FILE)
    assert refused.blocked and "the service does not revert it" in refused.problems[0]
    agrees = change("r1")
    check_change(agrees, applied(CLI), SERVICE, force=False, source=FOLDER_FILE)
    assert not agrees.problems and agrees.changed  # only the owner changes
    assert agrees.summary().startswith("web: taken over from `cgpolicy apply`")


@pytest.mark.parametrize("holder", [CLI, None])
def test_the_service_takes_over_only_what_was_applied_from_its_own_file(holder):
    """Root applied a policy by hand from outside the folder; whoever writes the folder puts
    a copy there (same revision). The service must not adopt it (it would then remove it
    when the copy is deleted), and what it reports must not say whether the copy matches:
    the same words, no revision, whether it agrees or not."""
    texts = []
    for new_revision in ("r1", "r2"):  # a copy that agrees, one that does not
        for source in ("/etc/cgpolicy/policies.d/other/web.yaml", "/srv/policies.d/web.yaml"):
            plan = change(new_revision)
            check_change(plan, applied(holder), SERVICE, force=False, source=source)
            assert plan.blocked and plan.owner_change is None, plan.summary()
            assert "r1" not in plan.problems[0] and "does not take it over" in plan.problems[0]
            texts.append(plan.problems[0].replace(source, "FILE"))
    assert len(set(texts)) == 1, texts
    recorded_relative = AppliedPolicy(
        "web", Path("/sys/fs/bpf/cgpolicy/web"), PolicyMeta("web", "r1", "enforce", "web.yaml")
    )
    plan = change("r1")
    check_change(plan, recorded_relative, SERVICE, force=False, source=FOLDER_FILE)
    assert plan.blocked  # recorded by an older cgpolicy relative to who knows where


def test_same_source_is_the_same_path_or_name_in_the_same_folder(tmp_path):
    folder = tmp_path / "policies.d"
    folder.mkdir()
    os.symlink(folder, tmp_path / "link")
    file = str(folder / "web.yaml")
    assert same_source(file, file)
    assert same_source(str(tmp_path / "link" / "web.yaml"), file)
    assert same_source(str(folder / "sub" / ".." / "web.yaml"), file)
    assert not same_source(str(tmp_path / "web.yaml"), file)
    assert not same_source("web.yaml", file) and not same_source(None, file)
    os.symlink(tmp_path / "web.yaml", folder / "out.yaml")  # the file itself is not resolved
    assert not same_source(str(tmp_path / "web.yaml"), str(folder / "out.yaml"))


def test_metadata_without_an_owner_is_anybodys_and_records_the_writer():
    plan = change("r1")
    check_change(plan, applied(None), SERVICE, force=False, source=FOLDER_FILE)
    assert not plan.problems and plan.changed and not plan.changes_kernel
    assert plan.summary() == "web: owner recorded: service (revision r1)"
    by_hand = change("r1")
    check_change(by_hand, applied(None), CLI, force=False, source="/root/web.yaml")
    assert by_hand.summary() == "web: owner recorded: cli (revision r1)"


def test_a_running_run_is_refused_to_others_and_an_ended_one_is_not():
    running = Owner.run()  # this process
    assert not running.ended()
    plan = change()
    check_change(plan, applied(running), CLI, force=False)
    assert plan.blocked and "cgpolicy run" in plan.problems[0]
    removal = PolicyPlan("web", "r1", None, reload=False)
    check_removal(removal, applied(running), CLI, force=False)
    assert removal.blocked
    reused = Owner("run", os.getpid(), (running.start or 0) + 1, running.pid_ns)
    assert reused.ended()  # the same pid, a later process
    gone = Owner("run", 2**22 + 1, 1, running.pid_ns)  # above pid_max: no such process
    for holder in (reused, gone):
        removal = PolicyPlan("web", "r1", None, reload=False)
        check_removal(removal, applied(holder), CLI, force=False)
        assert not removal.problems and "which has ended" in (removal.owner_change or "")
    elsewhere = Owner("run", 2**22 + 1, 1, (running.pid_ns or 0) + 1)
    assert not elsewhere.ended()  # another pid namespace: cannot tell, so running


def test_removal_of_the_services_policy_needs_force():
    removal = PolicyPlan("web", "r1", None, reload=False)
    check_removal(removal, applied(SERVICE), CLI, force=False)
    assert removal.blocked and "delete its file there" in removal.problems[0]
    forced = PolicyPlan("web", "r1", None, reload=False)
    check_removal(forced, applied(SERVICE), CLI, force=True)
    assert forced.summary() == "web: remove (revision r1), was owned by the reconcile service"
