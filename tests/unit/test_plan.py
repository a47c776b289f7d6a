"""The plan is a pure diff of desired against observed state."""

from pathlib import Path

from cgpolicy.compiler.spec import CompiledPolicy, ProgramSpec
from cgpolicy.enforcer.plan import Action, plan_policy, plan_removal
from cgpolicy.enforcer.targets import CgroupRef, Resolution
from cgpolicy.kernel import pins
from cgpolicy.kernel.applied import AppliedHook, AppliedLink, AppliedPolicy
from cgpolicy.kernel.pins import PolicyMeta, link_pin_names
from cgpolicy.policy.model import Target


def compiled(revision: str, hooks: tuple[str, ...] = ("egress",)) -> CompiledPolicy:
    programs = tuple(ProgramSpec(h, "skb.c", f"cgp_{h}", f"cgp_{h}", ()) for h in hooks)
    return CompiledPolicy("web", revision, "enforce", (Target("a", False),), programs)


def applied(revision: str, links: dict[str, dict[int, bool]], prog_id: int = 7) -> AppliedPolicy:
    folder = Path("/sys/fs/bpf/cgpolicy/web")
    programs = {hook: prog_id for hook in links}
    meta = PolicyMeta("web", revision, "enforce", None, {1: "a", 2: "b"}, programs=programs)
    policy = AppliedPolicy("web", folder, meta)
    for hook, cgroups in links.items():
        policy.hooks[hook] = AppliedHook(hook, prog_id)
        for cgroup_id, attached in cgroups.items():
            link = AppliedLink(cgroup_id, 9, prog_id, attached)
            policy.hooks[hook].links[cgroup_id] = link
    return policy


A = Resolution((CgroupRef("a", 1),), ())
A_AND_B = Resolution((CgroupRef("a", 1), CgroupRef("b", 2)), ())


def actions(plan):
    return sorted((s.action, s.hook, s.cgroup) for s in plan.steps)


def test_new_policy_loads_and_attaches_every_hook_on_every_cgroup():
    plan = plan_policy(compiled("r1", ("egress", "connect4")), A_AND_B, None)
    assert plan.reload and plan.changed
    assert actions(plan) == sorted(
        (Action.ATTACH, hook, cg) for hook in ("egress", "connect4") for cg in ("a", "b")
    )


def test_same_revision_on_same_cgroups_changes_nothing():
    plan = plan_policy(compiled("r1"), A, applied("r1", {"egress": {1: True}}))
    assert not plan.reload
    assert not plan.changed
    assert actions(plan) == [(Action.KEEP, "egress", "a")]


def test_changed_revision_updates_links_in_place():
    plan = plan_policy(compiled("r2"), A, applied("r1", {"egress": {1: True}}))
    assert plan.reload
    assert actions(plan) == [(Action.UPDATE, "egress", "a")]


def test_link_detached_from_outside_is_reattached_without_reload():
    plan = plan_policy(compiled("r1"), A, applied("r1", {"egress": {1: False}}))
    assert not plan.reload
    assert actions(plan) == [(Action.REATTACH, "egress", "a")]


def test_cgroup_no_longer_targeted_and_hook_no_longer_used_are_detached():
    observed = applied("r1", {"egress": {1: True, 2: True}, "ingress": {1: True}})
    plan = plan_policy(compiled("r1"), A, observed)
    assert actions(plan) == [
        (Action.DETACH, "egress", "b"),
        (Action.DETACH, "ingress", "a"),
        (Action.KEEP, "egress", "a"),
    ]


def test_missing_literal_target_blocks_the_policy():
    plan = plan_policy(compiled("r1"), Resolution((), ("system.slice/x.service",)), None)
    assert plan.blocked
    assert "system.slice/x.service" in plan.summary()


def test_removal_detaches_every_link():
    plan = plan_removal(applied("r1", {"egress": {1: True}, "device": {2: False}}))
    assert plan.new_revision is None
    assert actions(plan) == [(Action.DETACH, "device", "b"), (Action.DETACH, "egress", "a")]


def test_metadata_written_for_other_programs_reloads_an_interrupted_apply():
    """A kill between moving links to new programs and recording their metadata leaves
    metadata of the old revision: the same revision again must reload, not keep."""
    interrupted = applied("r1", {"egress": {1: True}})
    assert interrupted.meta is not None
    interrupted.meta.programs["egress"] = 6  # what the metadata was written for
    plan = plan_policy(compiled("r1"), A, interrupted)
    assert plan.reload and actions(plan) == [(Action.UPDATE, "egress", "a")]
    no_meta = applied("r1", {"egress": {1: True}})
    no_meta.meta = None
    assert plan_policy(compiled("r1"), A, no_meta).reload


def test_removal_of_a_policy_without_links_still_changes_the_kernel():
    """A glob that matched nothing leaves a policy with programs but no link: removing it
    must still drop its pins, so the service must hand the plan to the enforcer."""
    plan = plan_removal(applied("r1", {"egress": {}}))
    assert plan.steps == [] and plan.changed and plan.changes_kernel


def test_only_the_link_pins_cgpolicy_names_are_links(tmp_path: Path) -> None:
    """A hook folder's link pins are the names pins.link_pin gives: what else is there
    (a leading zero, other digits, a symlink) is no link of a cgroup."""
    for name in ("link-7", "link-123", "link-0123", "link-\u0661\u0662", "link-", "prog"):
        (tmp_path / name).touch()
    (tmp_path / "link-9").symlink_to(tmp_path / "link-7")
    assert link_pin_names(tmp_path) == {7: "link-7", 123: "link-123"}
    assert pins.link_pin(tmp_path, "web", "egress", 7).endswith("/web/egress/link-7")
