"""`cgpolicy audit` on the real kernel: ours and foreign programs with their owners, what a
cgroup inherits, drift (missing, stale, unexpected, orphaned) with exit status 3, and the
per-rule counters. Audit walks the whole tree; these tests look only at their own cgroups."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from policy_builders import policy_file

from cgpolicy.kernel.bpf import CgroupLink, Program
from cgpolicy.kernel.syscall import BPF_F_ALLOW_MULTI, AttachType, ProgType, prog_attach

# mov r0, 1; exit: allow everything.
ALLOW_ALL = bytes.fromhex("b700000001000000") + bytes.fromhex("9500000000000000")


def cgpolicy(bpf_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cgpolicy", "--bpf-dir", str(bpf_dir), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


CONNECT_DENY = {
    "sockets": {
        "connect": {
            "default": "allow",
            "rules": [{"action": "deny", "cidrs": ["169.254.169.254/32"]}],
        }
    }
}


def apply(bpf_dir: Path, policy: Path) -> None:
    done = cgpolicy(bpf_dir, "apply", str(policy))
    assert done.returncode == 0, done.stderr + done.stdout


def audit(bpf_dir: Path, cgroup: str, *extra: str) -> tuple[int, dict[str, Any]]:
    done = cgpolicy(bpf_dir, "audit", "--json", "--cgroup", cgroup, *extra)
    assert done.returncode in (0, 3), done.stderr
    return done.returncode, json.loads(done.stdout)


def by_path(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["path"]: entry for entry in report["cgroups"]}


def load_foreign(name: str) -> Program:
    return Program.load(ProgType.CGROUP_SKB, ALLOW_ALL, name, AttachType.CGROUP_INET_EGRESS)


def test_owners_modes_and_inheritance(scratch_cgroup, bpf_dir, tmp_path) -> None:
    parent = scratch_cgroup
    child = parent.child("app")
    apply(bpf_dir, policy_file(tmp_path, "meta-block", [parent.relative], CONNECT_DENY))
    systemd_like = load_foreign("sd_fw_egress")
    unknown = load_foreign("other_egress")
    try:
        child_fd, parent_fd = child.fd(), parent.fd()
        try:
            prog_attach(child_fd, systemd_like.fd, AttachType.CGROUP_INET_EGRESS, BPF_F_ALLOW_MULTI)
            prog_attach(parent_fd, unknown.fd, AttachType.CGROUP_INET_EGRESS, BPF_F_ALLOW_MULTI)
        finally:
            os.close(child_fd)
            os.close(parent_fd)

        status, report = audit(bpf_dir, parent.relative)
        assert status == 0, report
        entries = by_path(report)
        top = entries[parent.relative]
        assert top["id"] == os.stat(parent.path).st_ino and top["drift"] == []
        ours = {a["hook"]: a for a in top["attachments"] if a["owner"] == "cgpolicy"}
        assert set(ours) == {"connect4", "connect6", "sendmsg4", "sendmsg6"}
        connect4 = ours["connect4"]
        assert connect4["mode"] == "link" and connect4["policy"] == "meta-block"
        assert connect4["prog_name"] == "cgp_connect4" and len(connect4["tag"]) == 16
        assert connect4["revision"] and connect4["inherited_from"] is None
        assert connect4["counters"]["rules"][0]["text"] == "deny any to 169.254.169.254/32"
        (foreign,) = [a for a in top["attachments"] if a["hook"] == "egress"]
        assert (foreign["owner"], foreign["mode"], foreign["prog_id"]) == (
            "unknown",
            "legacy multi",
            unknown.id,
        )
        assert foreign["policy"] is None and foreign["counters"] is None

        below = entries[child.relative]
        own = [a for a in below["attachments"] if a["inherited_from"] is None]
        assert [(a["prog_name"], a["owner"], a["mode"]) for a in own] == [
            ("sd_fw_egress", "systemd", "legacy multi")
        ]
        inherited = {
            (a["hook"], a["prog_id"]): a for a in below["attachments"] if a["inherited_from"]
        }
        assert inherited[("connect4", connect4["prog_id"])]["inherited_from"] == parent.relative
        assert inherited[("egress", unknown.id)]["owner"] == "unknown"
    finally:
        systemd_like.close()
        unknown.close()


def test_only_inheriting_cgroups_listed_with_all(scratch_cgroup, bpf_dir, tmp_path) -> None:
    child = scratch_cgroup.child("quiet")
    apply(bpf_dir, policy_file(tmp_path, "inh", [scratch_cgroup.relative], CONNECT_DENY))
    _, report = audit(bpf_dir, scratch_cgroup.relative)
    assert child.relative not in by_path(report)
    _, report = audit(bpf_dir, scratch_cgroup.relative, "--all")
    listed = by_path(report)[child.relative]
    assert {a["inherited_from"] for a in listed["attachments"]} == {scratch_cgroup.relative}


def test_detached_link_is_missing_until_reapplied(scratch_cgroup, bpf_dir, tmp_path) -> None:
    policy = policy_file(tmp_path, "drifty", [scratch_cgroup.relative], CONNECT_DENY)
    apply(bpf_dir, policy)
    cgroup_id = os.stat(scratch_cgroup.path).st_ino
    with CgroupLink.from_pin(bpf_dir / "drifty" / "connect4" / f"link-{cgroup_id}") as link:
        link.detach()

    status, report = audit(bpf_dir, scratch_cgroup.relative)
    assert status == 3
    assert by_path(report)[scratch_cgroup.relative]["drift"] == [
        {
            "policy": "drifty",
            "hook": "connect4",
            "problem": "missing",
            "detail": by_path(report)[scratch_cgroup.relative]["drift"][0]["detail"],
        }
    ]
    human = cgpolicy(bpf_dir, "audit", "--cgroup", scratch_cgroup.relative)
    assert human.returncode == 3 and "DRIFT missing drifty connect4" in human.stdout

    apply(bpf_dir, policy)
    status, report = audit(bpf_dir, scratch_cgroup.relative)
    assert status == 0 and by_path(report)[scratch_cgroup.relative]["drift"] == []


def test_unexpected_and_orphaned(scratch_cgroup, bpf_dir, tmp_path) -> None:
    target = scratch_cgroup.child("target")
    elsewhere = scratch_cgroup.child("elsewhere")
    apply(bpf_dir, policy_file(tmp_path, "wander", [target.relative], CONNECT_DENY))
    # Someone attaches our program where the policy does not want it.
    with Program.from_pin(bpf_dir / "wander" / "connect4" / "prog") as ours:
        fd = elsewhere.fd()
        try:
            prog_attach(fd, ours.fd, AttachType.CGROUP_INET4_CONNECT, BPF_F_ALLOW_MULTI)
        finally:
            os.close(fd)
    status, report = audit(bpf_dir, scratch_cgroup.relative)
    assert status == 3
    assert [
        (d["policy"], d["hook"], d["problem"]) for d in by_path(report)[elsewhere.relative]["drift"]
    ] == [("wander", "connect4", "unexpected")]
    assert by_path(report)[target.relative]["drift"] == []

    # The target cgroup goes away: the policy's pins for it are orphaned.
    target_id = os.stat(target.path).st_ino
    target.path.rmdir()
    status, report = audit(bpf_dir, scratch_cgroup.relative)
    assert status == 3
    gone = by_path(report)[target.relative]
    assert gone["id"] == target_id and gone["attachments"] == []
    assert {d["problem"] for d in gone["drift"]} == {"orphaned"}


def test_counters_count_exactly(scratch_cgroup, bpf_dir, tmp_path, tcp_server) -> None:
    apply(bpf_dir, policy_file(tmp_path, "counted", [scratch_cgroup.relative], CONNECT_DENY))
    for _ in range(3):
        assert not scratch_cgroup.probe("connect", "tcp", "169.254.169.254", 80).ok
    for _ in range(2):
        assert scratch_cgroup.probe("connect", "tcp", "127.0.0.1", tcp_server.port).ok
    _, report = audit(bpf_dir, scratch_cgroup.relative)
    (connect4,) = [
        a
        for a in by_path(report)[scratch_cgroup.relative]["attachments"]
        if a["hook"] == "connect4"
    ]
    counters = connect4["counters"]
    assert counters["mode"] == "enforce"
    assert [(r["rule"], r["allowed"], r["denied"]) for r in counters["rules"]] == [(0, 0, 3)]
    assert counters["default"] == {"allowed": 2, "denied": 0}
    assert counters["events_dropped"] == 0
