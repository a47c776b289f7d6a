"""One reconcile pass (reconcile.py) against a policy folder in a temporary directory and a
kernel kept in memory: what the docs promise of a pass, without root. The decisions it
carries out are tested one by one in test_reconcile_decisions.py; the service on the real
kernel in tests/kernel/test_reconcile.py, test_last_good.py and test_ownership.py."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from policy_builders import INTERFACES_POLICY, glob_policy_text

from cgpolicy.compiler.compile import compile_policy
from cgpolicy.compiler.spec import CompiledPolicy
from cgpolicy.enforcer import engine as engine_module
from cgpolicy.enforcer.engine import Compile, Enforcer, Outcome, Planned
from cgpolicy.enforcer.ownership import Owner
from cgpolicy.enforcer.plan import Action, PolicyPlan, Step
from cgpolicy.kernel.applied import AppliedPolicy
from cgpolicy.kernel.devices import DeviceBinding
from cgpolicy.kernel.pins import PolicyMeta
from cgpolicy.policy.model import Policy
from cgpolicy.reconciler.decide import PassReport
from cgpolicy.reconciler.metrics import Metrics
from cgpolicy.reconciler.reconcile import Reconciler


class MemoryEnforcer:
    """The enforcer's side of a pass, in memory: what is applied (name -> AppliedPolicy,
    its revision the compiled one), and what each pass asked it to do. ``refuse`` names
    policies whose apply fails, as the kernel can refuse one."""

    def __init__(self, cgroup_root: Path, refuse: set[str] | None = None) -> None:
        self.owner = Owner.service()
        self.cgroup_root = cgroup_root
        self.dev_root = cgroup_root / "dev"
        self.kernel: dict[str, AppliedPolicy] = {}
        self.refuse = refuse or set()
        self.observed = 0
        self.handed: list[str] = []  # every plan handed to apply(), by policy name
        self.removed: list[str] = []

    def locked(self) -> contextlib.AbstractContextManager[list]:
        return contextlib.nullcontext([])  # nothing rolled back on taking the lock

    def observe(self) -> dict[str, AppliedPolicy]:
        self.observed += 1
        return dict(self.kernel)

    def plan(
        self,
        policies: list[Policy],
        compile: Compile,
        applied: dict[str, AppliedPolicy],
        missing_target_blocks: bool,
    ) -> list[Planned]:
        planned = []
        for policy in policies:
            compiled = compile(policy, DeviceBinding())
            old = applied[policy.name].revision if policy.name in applied else None
            plan = PolicyPlan(policy.name, old, compiled.revision, reload=old != compiled.revision)
            source = os.path.abspath(policy.source.file) if policy.source else None
            planned.append(Planned(plan, compiled, source))
        return planned

    def plan_removal(self, names: list[str], applied: dict[str, AppliedPolicy]) -> list[Planned]:
        planned = []
        for name in names:
            removal = PolicyPlan(name, applied[name].revision, None, reload=False)
            removal.steps.append(Step(Action.DETACH, "connect4", 1, "a/1"))  # its one link
            planned.append(Planned(removal, None))
        return planned

    def apply(self, planned: list[Planned]) -> list[Outcome]:
        outcomes = []
        for item in planned:
            name = item.plan.name
            self.handed.append(name)
            if name in self.refuse:
                outcomes.append(Outcome(item.plan, "the kernel said no"))
            elif item.compiled is None:
                del self.kernel[name]
                self.removed.append(name)
                outcomes.append(Outcome(item.plan))
            else:
                self.kernel[name] = applied(name, item.source, item.compiled.revision)
                outcomes.append(Outcome(item.plan))
        return outcomes

    def revisions(self) -> dict[str, str | None]:
        return {name: policy.revision for name, policy in self.kernel.items()}


def applied(
    name: str, source: str | None, revision: str = "r0", owner: Owner | None = None
) -> AppliedPolicy:
    owner = owner or Owner.service()
    meta = PolicyMeta(name, revision, "enforce", source, owner=owner.to_json())
    return AppliedPolicy(name, Path("/sys/fs/bpf/cgpolicy") / name, meta)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "policies.d"
    path.mkdir()
    return path


@pytest.fixture
def kernel(tmp_path: Path) -> MemoryEnforcer:
    return MemoryEnforcer(tmp_path / "cgroup")


def service(kernel: MemoryEnforcer, folder: Path, metrics: Metrics | None = None) -> Reconciler:
    return Reconciler(cast(Enforcer, kernel), folder, metrics or Metrics())


def write(folder: Path, name: str, port: int = 443, target: str = "a/*") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(glob_policy_text(name, port, target))
    return path


def web_enforced(kernel: MemoryEnforcer, folder: Path) -> tuple[Path, Metrics, Reconciler]:
    """web.yaml written and applied by one pass: its file, the metrics and the reconciler."""
    path = write(folder, "web")
    metrics = Metrics()
    reconciler = service(kernel, folder, metrics)
    reconciler.reconcile()
    return path, metrics, reconciler


def readiness(metrics: Metrics) -> list[str]:
    """The lines of /readyz."""
    return list(metrics.health.readiness().lines)


def test_a_pass_applies_the_folder_and_a_second_pass_has_nothing_to_do(
    kernel: MemoryEnforcer, folder: Path
) -> None:
    write(folder, "web")
    write(folder, "db", port=5432)
    metrics = Metrics()
    reconciler = service(kernel, folder, metrics)
    first = reconciler.reconcile()
    assert sorted(first.applied) == ["db", "web"] and not first.failed
    kernel.handed.clear()
    again = reconciler.reconcile()
    assert again == PassReport()  # nothing applied, removed, failed or repaired
    assert kernel.handed == []
    assert readiness(metrics) == ["ready: 2 policies applied"]


def test_a_file_turned_invalid_keeps_what_it_enforced_as_it_was(
    kernel: MemoryEnforcer, folder: Path
) -> None:
    path, metrics, reconciler = web_enforced(kernel, folder)
    before = kernel.revisions()
    path.write_text(glob_policy_text("web", 443, "a/*") + "  nonsense: 1\n")
    report = reconciler.reconcile()
    assert report.applied == [] and report.removed == [] and not report.failed
    assert kernel.revisions() == before
    assert "file web.yaml: invalid: 1 problem (see the service log)" in readiness(metrics)


def test_a_file_turned_unreadable_keeps_what_it_enforced(
    kernel: MemoryEnforcer, folder: Path
) -> None:
    path, metrics, reconciler = web_enforced(kernel, folder)
    before = kernel.revisions()
    path.unlink()
    os.symlink("nowhere", path)
    report = reconciler.reconcile()
    assert report.removed == [] and kernel.revisions() == before
    assert "file web.yaml: invalid: cannot read the file (see the service log)" in readiness(
        metrics
    )


def test_a_bad_file_with_no_last_good_version_removes_nothing_at_a_restart(
    kernel: MemoryEnforcer, folder: Path
) -> None:
    """A new process with no store has nothing to enforce from it: the kernel keeps it."""
    path = write(folder, "web")
    service(kernel, folder).reconcile()
    before = kernel.revisions()
    path.write_text("not: [a policy")
    report = service(kernel, folder).reconcile()
    assert report.removed == [] and kernel.removed == [] and kernel.revisions() == before


def test_a_file_deleted_removes_only_the_services_own_policy(
    kernel: MemoryEnforcer, folder: Path
) -> None:
    ours = write(folder, "ours")
    reconciler = service(kernel, folder)
    reconciler.reconcile()
    kernel.kernel["operator"] = applied(
        "operator", str(folder / "operator.yaml"), owner=Owner.cli()
    )
    kernel.kernel["transient"] = applied(
        "transient", str(folder / "transient.yaml"), owner=Owner("run", pid=4242, start=1)
    )
    kernel.kernel["by-hand"] = applied("by-hand", "/root/by-hand.yaml", owner=Owner.cli())
    ours.unlink()
    report = reconciler.reconcile()
    assert report.removed == ["ours"] and kernel.removed == ["ours"]
    assert sorted(kernel.kernel) == ["by-hand", "operator", "transient"]


def test_an_unreadable_folder_removes_nothing(
    kernel: MemoryEnforcer, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder that cannot be listed is not an empty one: the pass fails before it looks
    at the kernel (the loop logs it and /readyz says it)."""
    write(folder, "web")
    reconciler = service(kernel, folder)
    reconciler.reconcile()
    observed, before = kernel.observed, kernel.revisions()
    listing = os.scandir

    def scandir(path: str | os.PathLike[str] = ".") -> Iterator[os.DirEntry[str]]:
        if Path(path) == folder:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return listing(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(PermissionError):
        reconciler.reconcile()
    assert kernel.observed == observed and kernel.revisions() == before


def test_a_missing_folder_removes_nothing_and_fails_the_pass(
    kernel: MemoryEnforcer, folder: Path
) -> None:
    path, metrics, reconciler = web_enforced(kernel, folder)
    observed, before = kernel.observed, kernel.revisions()
    path.unlink()
    folder.rmdir()
    report = reconciler.reconcile()
    assert report.folder_missing and report.failed and not report.removed
    assert kernel.observed == observed and kernel.revisions() == before
    assert f"policy folder {folder} is missing" in readiness(metrics)


def test_a_policy_that_fails_does_not_hold_back_the_others_and_is_tried_again(
    folder: Path, tmp_path: Path
) -> None:
    kernel = MemoryEnforcer(tmp_path / "cgroup", refuse={"db"})
    for name in ("api", "db", "web"):
        write(folder, name)
    metrics = Metrics()
    reconciler = service(kernel, folder, metrics)
    report = reconciler.reconcile()
    assert report.applied == ["api", "web"] and list(report.failed) == ["db"]
    assert "policy db: not applied: the kernel said no" in readiness(metrics)
    kernel.handed.clear()
    kernel.refuse.clear()
    again = reconciler.reconcile()
    assert again.applied == ["db"] and kernel.handed == ["db"]


def test_the_reconciler_applies_only_as_the_service(kernel: MemoryEnforcer, folder: Path) -> None:
    kernel.owner = Owner.cli()
    with pytest.raises(ValueError, match="as the service"):
        service(kernel, folder)


@pytest.fixture
def compiled(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the policies compiled, in order (interfaces resolved to nothing)."""
    calls: list[str] = []

    def compile(policy: Policy, _resolve: object, resolve_device: DeviceBinding) -> CompiledPolicy:
        calls.append(policy.name)
        return compile_policy(policy, lambda patterns: set(), resolve_device=resolve_device)

    monkeypatch.setattr(engine_module, "compile_policy", compile)
    return calls


def test_links_changed_compiles_again_what_names_interfaces(
    kernel: MemoryEnforcer, folder: Path, compiled: list[str]
) -> None:
    write(folder, "web")
    (folder / "wired.yaml").write_text(INTERFACES_POLICY)
    reconciler = service(kernel, folder)
    reconciler.reconcile()
    reconciler.reconcile()
    assert compiled == ["web", "wired"]
    reconciler.links_changed()
    reconciler.reconcile()
    assert compiled == ["web", "wired", "wired"]


def test_reread_reads_every_file_again(
    kernel: MemoryEnforcer, folder: Path, compiled: list[str]
) -> None:
    write(folder, "web")
    reconciler = service(kernel, folder)
    reconciler.reconcile()
    reconciler.reconcile()
    reconciler.reread()
    reconciler.reconcile()
    assert compiled == ["web", "web"]  # read again: a new policy, compiled again


def test_the_folders_to_watch_follow_the_last_pass(kernel: MemoryEnforcer, folder: Path) -> None:
    (kernel.cgroup_root / "kubepods" / "pod1").mkdir(parents=True)
    write(folder, "pods", target="kubepods/*/app")
    reconciler = service(kernel, folder)
    assert reconciler.cgroup_folders() == set()
    reconciler.reconcile()
    root = kernel.cgroup_root
    assert reconciler.cgroup_folders() == {root, root / "kubepods", root / "kubepods" / "pod1"}
    assert reconciler.device_folders() == set()
