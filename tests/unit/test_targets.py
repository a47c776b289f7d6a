"""Target resolution against a folder tree shaped like a cgroup hierarchy."""

import errno
import os
from pathlib import Path

import pytest

from cgpolicy.enforcer.targets import resolve_targets, target_covers
from cgpolicy.policy.model import Target


def make_tree(root: Path, *paths: str) -> None:
    for path in paths:
        (root / path).mkdir(parents=True)


def test_glob_star_stays_within_one_path_component(tmp_path):
    make_tree(
        tmp_path,
        "kubepods.slice/pod1/cri-containerd-a.scope",
        "kubepods.slice/pod2/cri-containerd-b.scope",
        "kubepods.slice/pod2/deeper/cri-containerd-c.scope",
        "kubepods.slice/pod3/other.scope",
    )
    target = Target("kubepods.slice/*/cri-containerd-*.scope", is_glob=True)
    resolution = resolve_targets(tmp_path, (target,))
    assert [ref.relative for ref in resolution.cgroups] == [
        "kubepods.slice/pod1/cri-containerd-a.scope",
        "kubepods.slice/pod2/cri-containerd-b.scope",
    ]
    assert resolution.missing == ()


def test_cgroup_ids_are_folder_inodes(tmp_path):
    make_tree(tmp_path, "system.slice/nginx.service")
    resolution = resolve_targets(tmp_path, (Target("system.slice/nginx.service", False),))
    (ref,) = resolution.cgroups
    assert ref.cgroup_id == (tmp_path / "system.slice/nginx.service").stat().st_ino


def test_missing_literal_path_is_reported_but_an_empty_glob_is_not(tmp_path):
    make_tree(tmp_path, "system.slice")
    targets = (Target("system.slice/absent.service", False), Target("user.slice/*", True))
    resolution = resolve_targets(tmp_path, targets)
    assert resolution.cgroups == ()
    assert resolution.missing == ("system.slice/absent.service",)


def test_a_cgroup_named_by_two_targets_appears_once(tmp_path):
    make_tree(tmp_path, "a/b")
    targets = (Target("a/b", False), Target("a/*", True))
    assert len(resolve_targets(tmp_path, targets).cgroups) == 1


def test_a_glob_folder_that_cannot_be_listed_fails_instead_of_matching_nothing(
    tmp_path, monkeypatch
):
    """Matching nothing would detach the policy from every cgroup the glob covers: a
    listing that fails for any reason but the folder being gone must raise."""
    (tmp_path / "system.slice" / "a.service").mkdir(parents=True)
    listed = os.scandir

    def out_of_descriptors(path):
        if Path(path) == tmp_path / "system.slice":
            raise OSError(errno.EMFILE, "Too many open files")
        return listed(path)

    monkeypatch.setattr(os, "scandir", out_of_descriptors)
    with pytest.raises(OSError, match="Too many open files"):
        resolve_targets(tmp_path, (Target("system.slice/*.service", is_glob=True),))
    # A folder that is gone matches nothing, as before.
    assert resolve_targets(tmp_path, (Target("gone.slice/*", is_glob=True),)).cgroups == ()


def test_target_covers_agrees_with_resolve_targets(tmp_path):
    """The service's fast path for a new cgroup decides with target_covers what a full
    pass would decide with resolve_targets: covered, a folder where matches can appear
    deeper (None: it runs a full pass), or neither."""
    paths = (
        "kubepods.slice/pod1/cri-containerd-a.scope",
        "kubepods.slice/pod2/deeper/cri-containerd-c.scope",
        "kubepods.slice/pod3/other.scope",
        "system.slice/nginx.service",
        "system.slice/nginx.service/child",
    )
    make_tree(tmp_path, *paths)
    targets = (
        Target("kubepods.slice/*/cri-containerd-*.scope", is_glob=True),
        Target("system.slice/nginx.service", is_glob=False),
    )
    for target in targets:
        resolved = {ref.relative for ref in resolve_targets(tmp_path, (target,)).cgroups}
        for path in paths:
            parts = path.split("/")
            for depth in range(1, len(parts) + 1):
                relative = "/".join(parts[:depth])
                assert (target_covers(target, relative) is True) == (relative in resolved)
    glob = targets[0]
    assert target_covers(glob, "kubepods.slice") is None
    assert target_covers(glob, "kubepods.slice/pod9") is None
    assert target_covers(glob, "kubepods.slice/pod2/deeper") is False
    assert target_covers(targets[1], "system.slice") is None
    assert target_covers(targets[1], "system.slice/nginx.service/child") is False
    assert target_covers(targets[1], "system.slice/other.service") is False
