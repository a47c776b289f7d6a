"""An unprivileged local user against cgpolicy's pin folders (issue 10, item 1).

bpffs is mounted 1777 by default: any user can make folders and symlinks at its top. Each
attack here was run against an earlier cgpolicy and worked; each test runs it as `nobody`
(setpriv) and checks that enforcement stays and nothing outside the tree is touched. The
world-writable sticky top of bpffs is reproduced by a 1777 folder inside this test's own
pin folder, so the test touches nothing of anyone else's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from enforcement import ALLOWED, EPERM, attachments, expect, remove, run_cli
from policy_builders import policy_file

from cgpolicy.enforcer.engine import Enforcer

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
HOOKS = ("sock_create", "connect4", "connect6", "sendmsg4", "sendmsg6")


def as_nobody(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, *map(str, argv)], capture_output=True, text=True, timeout=30)


@pytest.fixture
def sticky_top(bpf_dir: Path) -> Iterator[Path]:
    """A root-owned 1777 folder on bpffs, as the top of bpffs is by default."""
    bpf_dir.chmod(0o755)  # nobody must be able to reach the sticky folder inside
    top = bpf_dir / "top"
    top.mkdir()
    top.chmod(0o1777)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def adversary_policy(tmp_path: Path, cgroup: str) -> Path:
    return policy_file(
        tmp_path,
        "adv-a",
        [cgroup],
        {
            "sockets": {
                "create": {
                    "default": "allow",
                    "rules": [{"action": "deny", "family": "inet", "type": "raw"}],
                },
                "connect": {
                    "default": "allow",
                    "rules": [{"action": "deny", "cidrs": ["127.0.0.2"]}],
                },
            }
        },
    )


def test_folders_planted_by_a_user_are_refused_not_used(
    sticky_top: Path, scratch_cgroup, tmp_path: Path, cgroup_root: Path
) -> None:
    """Before: nobody made the policy's folders, root applied into them (exit 0), then
    nobody unlinked every link pin and enforcement was gone."""
    tree = sticky_top / "cgp-adv"
    planted = [tree / "adv-a" / hook for hook in ("egress", *HOOKS)]
    assert as_nobody("mkdir", "-p", *planted).returncode == 0
    policy = adversary_policy(tmp_path, scratch_cgroup.relative)

    done = run_cli("--bpf-dir", tree, "apply", policy)
    assert done.returncode == 1, done
    assert "owned by uid 65534" in done.stderr and "fix:" in done.stderr
    assert "Traceback" not in done.stderr
    assert attachments(scratch_cgroup.path) == {}
    assert not any(any(folder.iterdir()) for folder in planted)  # nothing pinned in theirs
    Enforcer(cgroup_root, tree)  # (constructing it touches nothing either)
    for command in (["audit"], ["remove", "--all"], ["plan", str(policy)]):
        refused = run_cli("--bpf-dir", tree, *command)
        assert refused.returncode == 1 and "owned by uid 65534" in refused.stderr, command


def test_a_user_cannot_unpin_rename_or_plant_in_roots_tree(
    sticky_top: Path, scratch_cgroup, tmp_path: Path, cgroup_root: Path, loopback_ports
) -> None:
    tree = sticky_top / "cgp-adv"
    policy = adversary_policy(tmp_path, scratch_cgroup.relative)
    port = loopback_ports.ports[0]
    denied = [
        (("connect", "tcp", "127.0.0.2", port), EPERM),
        (("socket", "inet", "raw", "icmp"), EPERM),
    ]
    try:
        run_cli("--bpf-dir", tree, "apply", policy, check=True)
        assert (os.stat(tree).st_mode & 0o777) == 0o700
        links = sorted(tree.glob("adv-a/*/link-*"))
        assert len(links) == len(HOOKS)
        expect(scratch_cgroup, denied)

        attempts = [
            as_nobody("sh", "-c", f"rm -f {tree}/adv-a/*/link-*"),
            as_nobody("rm", "-f", *links),
            as_nobody("mv", tree / "adv-a", tree / "elsewhere"),
            as_nobody("mv", tree, sticky_top / "moved"),  # sticky: not theirs to rename
            as_nobody("ln", "-s", "/etc", tree / "evil"),
            as_nobody("mkdir", tree / "adv-b"),
        ]
        assert all(attempt.returncode != 0 for attempt in attempts), attempts
        assert sorted(tree.glob("adv-a/*/link-*")) == links
        assert len(attachments(scratch_cgroup.path)) == len(HOOKS)
        expect(scratch_cgroup, denied)
        again = run_cli("--bpf-dir", tree, "apply", policy, check=True)
        assert "unchanged" in again.stdout  # found where root left it: no second copy
    finally:
        remove(Enforcer(cgroup_root, tree), "adv-a")
    expect(scratch_cgroup, [(("connect", "tcp", "127.0.0.2", port), ALLOWED)])


def test_removal_never_follows_a_link_out_of_the_tree(
    sticky_top: Path, bpf_dir: Path, tmp_path: Path, scratch_cgroup, cgroup_root: Path
) -> None:
    """Before: a symlink in the pin folder made `remove --all` delete the files of the
    folder it pointed at. Planted by nobody the whole tree is refused; even a link that
    root itself left there is removed as a link, never followed."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me\n")

    theirs = sticky_top / "cgp-theirs"
    assert as_nobody("mkdir", theirs).returncode == 0
    assert as_nobody("ln", "-s", victim, theirs / "evil").returncode == 0
    refused = run_cli("--bpf-dir", theirs, "remove", "--all")
    assert refused.returncode == 1 and "owned by uid 65534" in refused.stderr
    assert (victim / "precious").read_text() == "keep me\n"

    ours = bpf_dir / "cgp-ours"
    policy = adversary_policy(tmp_path, scratch_cgroup.relative)
    try:
        run_cli("--bpf-dir", ours, "apply", policy, check=True)
        (ours / "evil").symlink_to(victim)
        (ours / "adv-a" / "evil").symlink_to(victim)
        (ours / "adv-a" / "connect4" / "link-1").symlink_to(victim / "precious")
        removed = run_cli("--bpf-dir", ours, "remove", "--all")
        assert removed.returncode == 0, removed
        assert "adv-a: remove" in removed.stdout and "evil" not in removed.stdout
    finally:
        remove(Enforcer(cgroup_root, ours), "adv-a")
    assert (victim / "precious").read_text() == "keep me\n"
    assert attachments(scratch_cgroup.path) == {}
    assert (ours / "evil").is_symlink()  # not ours to judge: left, and not followed


@pytest.mark.parametrize("spoil", ["chmod-777", "chown-nobody", "symlink"])
def test_a_pin_folder_others_could_change_is_refused(
    bpf_dir: Path, tmp_path: Path, scratch_cgroup, spoil: str
) -> None:
    tree = bpf_dir / "cgp"
    policy = adversary_policy(tmp_path, scratch_cgroup.relative)
    if spoil == "symlink":
        real = bpf_dir / "real"
        real.mkdir(mode=0o700)
        tree.symlink_to(real)
        expected = "symlink"
    else:
        tree.mkdir(mode=0o700)
        if spoil == "chmod-777":
            tree.chmod(0o777)
            expected = "writable by group or others"
        else:
            os.chown(tree, 65534, 65534)
            expected = "owned by uid 65534"
    done = run_cli("--bpf-dir", tree, "apply", policy)
    assert done.returncode == 1 and expected in done.stderr, done
    assert attachments(scratch_cgroup.path) == {}


def test_a_user_holding_the_pin_folder_open_cannot_block_changes(
    bpf_dir: Path, tmp_path: Path, scratch_cgroup, cgroup_root: Path
) -> None:
    """Before: the lock was a flock on the pin folder itself; a user who opened it while it
    was 0755 (as `mkdir` or an older cgpolicy made it) held the lock forever."""
    tree = bpf_dir / "cgp-open"
    tree.mkdir(mode=0o755)
    holder = subprocess.Popen(
        [
            *NOBODY,
            "/usr/bin/python3",
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(tree)!r}, os.O_RDONLY)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('holding', flush=True)\n"
            "time.sleep(120)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        policy = adversary_policy(tmp_path, scratch_cgroup.relative)
        done = run_cli("--bpf-dir", tree, "--lock-timeout", "5", "apply", policy)
        assert done.returncode == 0, done
        assert len(attachments(scratch_cgroup.path)) == len(HOOKS)
        lock = tree / "_lock"
        assert (os.stat(lock).st_mode & 0o777) == 0o700
        assert as_nobody("ls", lock).returncode != 0
    finally:
        holder.kill()
        holder.wait()
        remove(Enforcer(cgroup_root, tree), "adv-a")


def test_a_lock_folder_others_could_have_opened_is_refused(
    bpf_dir: Path, tmp_path: Path, scratch_cgroup
) -> None:
    tree = bpf_dir / "cgp-lock"
    (tree / "_lock").mkdir(parents=True, mode=0o755)
    (tree / "_lock").chmod(0o755)
    done = run_cli("--bpf-dir", tree, "apply", adversary_policy(tmp_path, scratch_cgroup.relative))
    assert done.returncode == 1 and "rmdir" in done.stderr and "_lock" in done.stderr, done
    assert attachments(scratch_cgroup.path) == {}


def test_a_symlink_a_user_planted_on_the_way_is_refused(
    sticky_top: Path, bpf_dir: Path, tmp_path: Path, scratch_cgroup
) -> None:
    """Before: a user's symlink in a sticky folder on the way to --bpf-dir was followed,
    and could be repointed later so that `remove` missed the policy and `apply` made a
    second copy."""
    link = sticky_top / "L"
    assert as_nobody("ln", "-s", bpf_dir, link).returncode == 0
    done = run_cli(
        "--bpf-dir", link / "pins", "apply", adversary_policy(tmp_path, scratch_cgroup.relative)
    )
    assert done.returncode == 1 and "symlink owned by uid 65534" in done.stderr, done
    assert attachments(scratch_cgroup.path) == {}
    assert not (bpf_dir / "pins").exists()
