"""The reconcile service's decisions, one by one, without the kernel or a policy folder:
which version of each file is enforced (versions.py), what a pass removes, applies and
reports (decide.py), and when the loop runs a pass again (loop.py). The pass that carries
them out: test_reconcile_pass.py; the service on the kernel: tests/kernel/test_reconcile.py
and test_last_good.py."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest
from policy_builders import INTERFACES_POLICY, glob_policy_text

from cgpolicy.compiler.spec import CompiledPolicy, DeviceNode
from cgpolicy.enforcer.engine import Outcome, Planned
from cgpolicy.enforcer.ownership import RUN, Owner
from cgpolicy.enforcer.plan import Action, PolicyPlan, Step
from cgpolicy.kernel.applied import AppliedPolicy
from cgpolicy.kernel.devices import DeviceBinding
from cgpolicy.kernel.pins import PolicyMeta
from cgpolicy.policy.model import Policy
from cgpolicy.policy.validate import LoadResult, Problem, load_contents
from cgpolicy.reconciler.decide import (
    Compilations,
    PassReport,
    folder_missing,
    readiness,
    removals,
    tally,
    to_apply,
)
from cgpolicy.reconciler.loop import next_resync
from cgpolicy.reconciler.source import Snapshot
from cgpolicy.reconciler.versions import (
    UNREADABLE,
    Conflict,
    enforced_versions,
    folder_changed,
    judge,
    last_good_sources,
)

FOLDER = Path("/etc/cgpolicy/policies.d")
SERVICE = Owner.service()


def file_of(name: str) -> str:
    return str(FOLDER / f"{name}.yaml")


def policies(*names: str, file: str | None = None, port: int = 443) -> list[Policy]:
    """Valid policies, each from its own file of FOLDER (or all from ``file``)."""
    texts = [glob_policy_text(name, port) for name in names]
    if file is not None:
        result = load_contents([(file, "---\n".join(texts).encode())])
    else:
        result = load_contents(
            [(file_of(n), t.encode()) for n, t in zip(names, texts, strict=True)]
        )
    assert result.ok, result.problems
    return result.policies


def problem(file: str, message: str = "spec.nonsense: unknown field") -> Problem:
    return Problem(file, 6, 3, "spec", message)


def snapshot(
    enforced: list[Policy],
    invalid: dict[str, list[Problem]] | None = None,
    without_last_good: set[str] | None = None,
    store_error: str | None = None,
) -> Snapshot:
    invalid = invalid or {}
    files = {p.source.file for p in enforced if p.source} | set(invalid)
    return Snapshot(enforced, invalid, files, True, {}, without_last_good or set(), store_error)


def applied(
    name: str, source: str | None, owner: Owner | None = SERVICE, revision: str = "r1"
) -> AppliedPolicy:
    meta = PolicyMeta(name, revision, "enforce", source, owner=owner.to_json() if owner else None)
    return AppliedPolicy(name, Path("/sys/fs/bpf/cgpolicy") / name, meta)


# -- which version of each file is enforced (versions.py) -------------------------------------


def test_a_valid_file_is_enforced_as_it_is_and_becomes_its_last_good_version() -> None:
    web = policies("web")
    versions, conflicts = enforced_versions({file_of("web"): web}, {}, {})
    assert versions[file_of("web")].policies == web
    assert versions[file_of("web")].last_good == web
    assert versions[file_of("web")].problems == []
    assert conflicts == []


def test_a_bad_file_enforces_its_last_good_version_and_reports_its_problems() -> None:
    """Bad input never weakens enforcement: what was enforced from it stays, as it was."""
    last_good = policies("web")
    found = [problem(file_of("web"))]
    versions, _ = enforced_versions({}, {file_of("web"): found}, {file_of("web"): last_good})
    version = versions[file_of("web")]
    assert version.policies == last_good and version.last_good == last_good
    assert version.problems == found


def test_a_bad_file_without_a_last_good_version_enforces_nothing_from_it() -> None:
    """What the kernel has from it is not touched either: see the removal tests."""
    found = [problem(file_of("web"))]
    versions, _ = enforced_versions({}, {file_of("web"): found}, {})
    assert versions[file_of("web")].policies == []
    assert versions[file_of("web")].last_good is None
    assert versions[file_of("web")].problems == found


def test_the_last_good_version_comes_from_memory_before_the_store() -> None:
    remembered = {file_of("a"): policies("a")}
    from_memory, from_store = last_good_sources(
        [file_of("a"), file_of("b"), file_of("c")], remembered, {"a.yaml", "b.yaml"}
    )
    assert from_memory == remembered  # a: seen valid by this process
    assert from_store == [file_of("b")]  # b: only the store has it; c: nobody has it


def test_a_valid_file_keeps_its_policy_name_against_a_bad_files_last_good_version() -> None:
    """A name a valid file defines now is that file's, and is enforced once."""
    moved = policies("web", file=file_of("new"))
    stale = policies("web", "db", file=file_of("old"), port=80)
    versions, conflicts = enforced_versions(
        {file_of("new"): moved},
        {file_of("old"): [problem(file_of("old"))]},
        {file_of("old"): stale},
    )
    assert versions[file_of("new")].policies == moved
    assert [p.name for p in versions[file_of("old")].policies] == ["db"]
    assert conflicts == [Conflict("web", file_of("old"), file_of("new"))]


def test_between_two_bad_files_the_first_by_name_keeps_a_policy_name() -> None:
    first = policies("web", file=file_of("a"))
    second = policies("web", file=file_of("b"), port=80)
    bad = {file_of("a"): [problem(file_of("a"))], file_of("b"): [problem(file_of("b"))]}
    versions, conflicts = enforced_versions({}, bad, {file_of("a"): first, file_of("b"): second})
    assert versions[file_of("a")].policies == first
    assert versions[file_of("b")].policies == [] and versions[file_of("b")].last_good == []
    assert conflicts == [Conflict("web", file_of("b"), file_of("a"))]


def test_each_file_is_judged_on_its_own() -> None:
    """One file's problems leave the others valid; a file not read has one problem that
    says so."""
    good = glob_policy_text("web", 443).encode()
    bad = b"apiVersion: cgpolicy.dev/v1\nkind: CgroupPolicy\nmetadata: {name: x}\nspec: {}\n"
    result = load_contents([(file_of("bad"), bad), (file_of("web"), good)])
    valid, problems = judge(result, [file_of("web"), file_of("bad")], {file_of("pipe"): "a FIFO"})
    assert list(valid) == [file_of("web")] and [p.name for p in valid[file_of("web")]] == ["web"]
    assert set(problems) == {file_of("bad"), file_of("pipe")}
    assert problems[file_of("bad")]
    (unread,) = problems[file_of("pipe")]
    assert unread.message == f"{UNREADABLE}: a FIFO"


def test_a_file_with_no_policy_is_valid_and_enforces_nothing() -> None:
    valid, problems = judge(LoadResult(), [file_of("empty")], {})
    assert valid == {file_of("empty"): []} and problems == {}


@pytest.mark.parametrize(
    ("known", "present", "changed"),
    [
        ({"a": 1}, {"a": 1}, False),
        ({"a": 1}, {"a": 2}, True),  # its content, or where its symlink leads
        ({"a": 1}, {"a": 1, "b": 1}, True),  # a file appeared
        ({"a": 1, "b": 1}, {"a": 1}, True),  # a file went
        ({}, {}, False),
    ],
)
def test_the_folder_is_read_again_only_when_a_file_changed(
    known: dict[str, int], present: dict[str, int], changed: bool
) -> None:
    assert folder_changed(known, present) is changed


# -- what a pass removes (decide.py) ----------------------------------------------------------


def test_a_file_gone_removes_the_services_policy_from_it() -> None:
    kernel = {"web": applied("web", file_of("web"))}
    assert removals(kernel, FOLDER, snapshot([])) == ["web"]


def test_a_file_gone_never_removes_a_policy_applied_by_hand_or_by_a_run() -> None:
    run = Owner(RUN, pid=4242, start=1)
    kernel = {
        "mine": applied("mine", file_of("mine")),
        "operator": applied("operator", file_of("operator"), Owner.cli()),
        "transient": applied("transient", file_of("transient"), run),
        "unknown": applied("unknown", file_of("unknown"), Owner("newer-kind")),
    }
    assert removals(kernel, FOLDER, snapshot([])) == ["mine"]


def test_only_policies_from_this_folder_are_removed() -> None:
    kernel = {
        "here": applied("here", file_of("here")),
        "nested": applied("nested", str(FOLDER / "sub" / "nested.yaml")),
        "sibling": applied("sibling", f"{FOLDER}-old/sibling.yaml"),  # a prefix, not the folder
        "elsewhere": applied("elsewhere", "/root/elsewhere.yaml"),
        "sourceless": applied("sourceless", None),
    }
    assert sorted(removals(kernel, FOLDER, snapshot([]))) == ["here", "nested"]


def test_metadata_from_before_owners_is_the_services_when_it_came_from_its_folder() -> None:
    kernel = {
        "old": applied("old", file_of("old"), owner=None),
        "old-elsewhere": applied("old-elsewhere", "/root/old.yaml", owner=None),
    }
    assert removals(kernel, FOLDER, snapshot([])) == ["old"]


def test_an_interrupted_apply_without_metadata_is_not_removed() -> None:
    broken = AppliedPolicy("broken", Path("/sys/fs/bpf/cgpolicy/broken"), None)
    assert removals({"broken": broken}, FOLDER, snapshot([])) == []


def test_a_bad_file_removes_nothing_it_enforced() -> None:
    """With a last good version, or without one: its file is there, so nothing goes."""
    kernel = {
        "kept": applied("kept", file_of("kept")),
        "unknown": applied("unknown", file_of("unknown")),
    }
    reading = snapshot(
        policies("kept"),
        {file_of("kept"): [problem(file_of("kept"))], file_of("unknown"): [problem("u")]},
        without_last_good={file_of("unknown")},
    )
    assert removals(kernel, FOLDER, reading) == []


def test_a_policy_the_folder_still_asks_for_stays_wherever_it_moved() -> None:
    kernel = {"web": applied("web", file_of("old"))}
    assert removals(kernel, FOLDER, snapshot(policies("web", file=file_of("new")))) == []


def test_a_valid_file_that_no_longer_defines_a_policy_removes_it() -> None:
    kernel = {
        "web": applied("web", file_of("both")),
        "db": applied("db", file_of("both")),
    }
    assert removals(kernel, FOLDER, snapshot(policies("web", file=file_of("both")))) == ["db"]


def test_a_missing_folder_changes_nothing_and_fails_the_pass() -> None:
    report, outcome = folder_missing(FOLDER)
    assert report.folder_missing and report.failed == {str(FOLDER): "policy folder missing"}
    assert not report.applied and not report.removed
    assert outcome.reasons() == [f"policy folder {FOLDER} is missing"]


# -- what a pass applies and reports ----------------------------------------------------------


def plan(
    name: str,
    old: str | None = "r1",
    new: str | None = "r1",
    *steps: Step,
    reload: bool = False,
) -> PolicyPlan:
    result = PolicyPlan(name, old, new, reload)
    result.steps.extend(steps)
    return result


def test_only_plans_that_change_something_or_are_blocked_are_applied() -> None:
    """A blocked plan is handed over so that it is reported failing at every pass."""
    unchanged = plan("same", "r1", "r1", Step(Action.KEEP, "connect4", 1, "a/1"))
    changed = plan("new", None, "r2", reload=True)
    taken_over = plan("adopted")
    taken_over.owner_change = "owner recorded: service"
    blocked = plan("refused")
    blocked.problems.append("applied by hand (`cgpolicy apply`); ...")
    removal = plan("gone", "r1", None)
    removal.steps.append(Step(Action.DETACH, "connect4", 1, "a/1"))
    unlinked = plan("gone-unlinked", "r1", None)  # a glob that matched nothing: pins only
    plans = (unchanged, changed, taken_over, blocked, removal, unlinked)
    items = [Planned(p, None) for p in plans]
    assert [item.plan.name for item in to_apply(items)] == [
        "new",
        "adopted",
        "refused",
        "gone",
        "gone-unlinked",
    ]


def test_a_policy_that_fails_is_reported_and_the_others_are_not_held_back() -> None:
    outcomes = [
        Outcome(plan("first", None, "r1", reload=True)),
        Outcome(plan("broken", None, "r1", reload=True), "cannot attach: EPERM"),
        Outcome(plan("gone", "r1", None)),
        Outcome(plan("silent", None, "r1", reload=True), ""),
        Outcome(plan("last", "r1", "r1", reload=True)),
    ]
    report = tally(outcomes, {"last": ["missing", "stale"], "broken": ["missing"]})
    assert report.applied == ["first", "last"]
    assert report.removed == ["gone"]
    assert report.failed == {"broken": "cannot attach: EPERM", "silent": "failed"}
    assert report.repaired == 2  # drift counts as repaired only where the apply succeeded


def test_readiness_names_what_failed_and_each_bad_file_without_its_problems() -> None:
    unreadable = Problem(file_of("pipe"), 0, 0, "", f"{UNREADABLE}: it is a named pipe (FIFO)")
    reading = snapshot(
        policies("web", "db"),
        {
            file_of("bad"): [problem(file_of("bad")), problem(file_of("bad"))],
            file_of("pipe"): [unreadable],
        },
        store_error="refusing /var/lib/cgpolicy/last-good/x: writable by others",
    )
    outcome = readiness(reading, PassReport(applied=["web"], failed={"db": "EPERM"}))
    assert outcome.policies == {"web", "db"}
    assert outcome.failing == {"db": "EPERM"}
    assert outcome.invalid_files == {
        "bad.yaml": "2 problems (see the service log)",
        "pipe.yaml": f"{UNREADABLE} (see the service log)",
    }
    assert outcome.store_error is not None
    assert "unknown field" not in " ".join(outcome.reasons())


def test_a_pass_with_everything_applied_is_ready() -> None:
    outcome = readiness(snapshot(policies("web")), PassReport(applied=["web"]))
    assert outcome.reasons() == [] and outcome.policies == {"web"}


# -- what is compiled again -------------------------------------------------------------------


class CountingCompile:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, policy: Policy, devices: DeviceBinding) -> CompiledPolicy:
        self.calls.append(policy.name)
        return cast(CompiledPolicy, object())


def wired() -> Policy:
    (policy,) = load_contents([(file_of("wired"), INTERFACES_POLICY.encode())]).policies
    return policy


def test_a_policy_is_compiled_once_while_nothing_it_depends_on_changes() -> None:
    compile = CountingCompile()
    compiled = Compilations(compile)
    (web,) = policies("web")
    first = compiled(web, DeviceBinding())
    assert compiled(web, DeviceBinding()) is first
    assert compile.calls == ["web"]


def test_a_policy_read_again_or_whose_device_paths_name_another_node_is_compiled_again() -> None:
    compile = CountingCompile()
    compiled = Compilations(compile)
    (web,) = policies("web")
    compiled(web, DeviceBinding())
    (reread,) = policies("web")  # the same text, read again: a new Policy
    compiled(reread, DeviceBinding())
    node = DeviceNode("char", 195, 0)
    compiled(reread, DeviceBinding((("allow", "/dev/nvidia0", node),)))
    assert compile.calls == ["web", "web", "web"]


def test_a_change_of_interfaces_compiles_again_only_what_names_interfaces() -> None:
    compile = CountingCompile()
    compiled = Compilations(compile)
    (web,), interfaces = policies("web"), wired()
    for policy in (web, interfaces):
        compiled(policy, DeviceBinding())
    compiled.links_changed()
    for policy in (web, interfaces):
        compiled(policy, DeviceBinding())
    assert compile.calls == ["web", "wired", "wired"]


def test_only_the_policies_of_the_last_reading_stay_compiled() -> None:
    compile = CountingCompile()
    compiled = Compilations(compile)
    web, db = policies("web", "db")
    compiled(web, DeviceBinding())
    compiled(db, DeviceBinding())
    compiled.keep_only([web])
    compiled(web, DeviceBinding())
    compiled(db, DeviceBinding())
    assert compile.calls == ["web", "db", "db"]


# -- when the next pass runs (loop.py) --------------------------------------------------------


def test_resyncs_start_every_interval_from_the_start_of_a_pass() -> None:
    assert next_resync(started=100.0, due=100.0, interval=30.0, now=100.5) == 130.0


def test_a_pass_woken_by_an_event_keeps_the_resync_time() -> None:
    assert next_resync(started=110.0, due=130.0, interval=30.0, now=110.5) == 130.0


def test_a_pass_longer_than_the_interval_still_leaves_half_an_interval_idle() -> None:
    assert next_resync(started=100.0, due=100.0, interval=30.0, now=140.0) == 155.0


def test_the_first_pass_sets_the_first_resync() -> None:
    assert next_resync(started=5.0, due=0.0, interval=30.0, now=6.0) == 35.0
