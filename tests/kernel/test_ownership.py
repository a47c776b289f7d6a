"""One change at a time per pin folder, and an owner for every applied policy (issue 10,
item 6): concurrent `apply` processes are serialized, a policy the reconcile service manages
is not changed by hand without --force, and the service does not revert a forced change."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from enforcement import EPERM, probe, run_cli
from gate import finish, gated, open_gates
from policy_builders import policy_file
from service import POLICY, Daemon, http_get, wait_until

from cgpolicy.enforcer.engine import Enforcer
from cgpolicy.kernel import pins
from cgpolicy.kernel.bpf import CgroupLink, Program
from cgpolicy.kernel.cgroup import open_cgroup
from cgpolicy.kernel.hooks import hook as hook_named
from cgpolicy.kernel.syscall import prog_query

CONNECT_HOOKS = ("connect4", "connect6", "sendmsg4", "sendmsg6")


def deny_connect(folder: Path, name: str, targets: list[str], address: str) -> Path:
    spec = {
        "sockets": {
            "connect": {
                "default": "allow",
                "rules": [{"action": "deny", "cidrs": [f"{address}/32"]}],
            }
        }
    }
    return policy_file(folder, name, targets, spec)


def meta(bpf_dir: Path, name: str) -> pins.PolicyMeta:
    found = pins.read_meta(bpf_dir / name)
    assert found is not None, f"no metadata for {name} under {bpf_dir}"
    return found


def owner_kind(bpf_dir: Path, name: str) -> str | None:
    owner = meta(bpf_dir, name).owner
    return owner.get("kind") if owner else None  # type: ignore[return-value]


def attached_ids(cgroup: Path, hook: str) -> tuple[int, ...]:
    fd = open_cgroup(cgroup)
    try:
        return prog_query(fd, hook_named(hook).attach_type).prog_ids
    finally:
        os.close(fd)


def consistent(bpf_dir: Path, name: str, cgroups: list[Path]) -> None:
    """Exactly one attachment per hook and cgroup, each of it the program pinned for the
    hook, and the metadata written for those programs: one version, not a mix."""
    folder = bpf_dir / name
    recorded = meta(bpf_dir, name)
    for hook in CONNECT_HOOKS:
        with Program.from_pin(folder / hook / pins.PROG_PIN) as program:
            prog_id = program.id
        links = sorted(p.name for p in (folder / hook).glob("link-*"))
        assert len(links) == len(cgroups), (hook, links)
        for link_pin in (folder / hook).glob("link-*"):
            with CgroupLink.from_pin(link_pin) as link:
                assert link.info().prog_id == prog_id, (hook, link_pin)
        for cgroup in cgroups:
            assert attached_ids(cgroup, hook) == (prog_id,), (hook, cgroup)
    assert set(recorded.cgroups) == {os.stat(c).st_ino for c in cgroups}


def summary(done: subprocess.CompletedProcess[str], name: str) -> str:
    lines = [line for line in done.stdout.splitlines() if line.startswith(f"{name}: ")]
    assert len(lines) == 1, (done.stdout, done.stderr)
    return lines[0]


@pytest.fixture
def cleanup(bpf_dir: Path, cgroup_root: Path) -> Iterator[None]:
    yield
    enforcer = Enforcer(cgroup_root, bpf_dir)
    names = list(enforcer.observe())
    if names:
        enforcer.apply(enforcer.plan_removal(names, force=True))


def test_concurrent_applies_of_two_versions_are_serialized(
    bpf_dir, scratch_cgroup, tmp_path, cleanup
):
    """Two processes apply two versions of one policy at the same instant: one waits for the
    other, each reports what it did (the second a change from the first's revision), and
    the kernel holds the one applied last, whole. Several rounds, each from the last."""
    cgroups = [scratch_cgroup.child(f"c-{i}").path for i in range(16)]
    targets = [str(c.relative_to(scratch_cgroup.root)) for c in cgroups]
    previous: str | None = None
    for round_ in range(6):
        files = [
            deny_connect(tmp_path, "race", targets, f"127.0.0.{10 + 2 * round_ + i}")
            for i in range(2)
        ]
        processes = [gated("--bpf-dir", bpf_dir, "apply", f) for f in files]
        open_gates(*processes)
        done = [finish(p) for p in processes]
        assert [d.returncode for d in done] == [0, 0], [(d.stdout, d.stderr) for d in done]
        reports = [summary(d, "race") for d in done]
        revisions = []
        for report in reports:
            new = re.fullmatch(r"race: new, revision (\w+)", report)
            changed = re.fullmatch(r"race: revision (\w+) -> (\w+)", report)
            assert new or changed, report
            revisions.append((None, new.group(1)) if new else (changed.group(1), changed.group(2)))  # type: ignore[union-attr]
        # One of them applied on top of what was there, the other on top of that one.
        first, second = sorted(revisions, key=lambda r: r[0] != previous)
        assert first[0] == previous, (reports, previous)
        assert second[0] == first[1], reports
        final = meta(bpf_dir, "race").revision
        assert final == second[1], (reports, final)
        consistent(bpf_dir, "race", cgroups)
        previous = final


HOLD_LOCK = """\
import sys
from pathlib import Path
from cgpolicy.kernel.lock import PinFolderLock
with PinFolderLock(Path(sys.argv[1]), timeout=30):
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_a_waiting_apply_names_the_holder_and_a_bounded_wait_ends(
    bpf_dir, scratch_cgroup, tmp_path, cleanup
):
    path = deny_connect(tmp_path, "waits", [scratch_cgroup.relative], "127.0.0.2")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(bpf_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        timed_out = run_cli("--bpf-dir", bpf_dir, "--lock-timeout", "0.5", "apply", path)
        assert timed_out.returncode == 1, timed_out
        assert f"held by pid {holder.pid}" in timed_out.stderr, timed_out.stderr
        assert not (bpf_dir / "waits").exists()

        waiting = gated("--bpf-dir", bpf_dir, "--log-level", "info", "apply", path)
        open_gates(waiting)
        assert waiting.stderr is not None
        line = waiting.stderr.readline()  # it says that it waits, and for whom
        assert "waiting" in line and f"pid {holder.pid}" in line, line
        assert waiting.poll() is None and not (bpf_dir / "waits").exists()
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.flush()
        done = finish(waiting)
        assert done.returncode == 0, (done.stdout, done.stderr)
        assert re.match(r"waits: new, revision \w+", done.stdout), done.stdout
        assert not probe(scratch_cgroup, "connect", "tcp", "127.0.0.2", 9).ok
    finally:
        holder.kill()
        holder.wait()


@pytest.fixture
def daemon(tmp_path: Path, bpf_dir: Path) -> Iterator[Daemon]:
    policy_dir = tmp_path / "policies.d"
    policy_dir.mkdir()
    service = Daemon(policy_dir, bpf_dir, tmp_path / "daemon.log")
    try:
        yield service
    finally:
        service.stop()
        run_cli("--bpf-dir", bpf_dir, "remove", "--all", "--force")


def passes(daemon: Daemon) -> float:
    return daemon.metric("cgpolicy_reconcile_passes_total") or 0


def wait_passes(daemon: Daemon, count: int) -> None:
    """Let the service run ``count`` more full passes (a resync every second)."""
    target = passes(daemon) + count
    assert wait_until(lambda: passes(daemon) >= target, timeout=60), daemon.log()


def connect_errno(cgroup, address: str) -> int:
    result = probe(cgroup, "connect", "tcp", address, 9)
    return 0 if result.ok else result.errno


def test_a_service_policy_changes_by_hand_only_with_force_and_is_not_reverted(
    daemon, scratch_cgroup, tmp_path
):
    glob = f"{scratch_cgroup.relative}/work-*"
    folder_file = daemon.policy_dir / "svc.yaml"
    folder_file.write_text(POLICY.format(name="svc", glob=glob, denied="127.0.0.2"))
    work = scratch_cgroup.child("work-1")
    daemon.start()
    assert wait_until(lambda: connect_errno(work, "127.0.0.2") == EPERM), daemon.log()
    served = meta(daemon.bpf_dir, "svc").revision

    by_hand = tmp_path / "svc-by-hand.yaml"
    by_hand.write_text(POLICY.format(name="svc", glob=glob, denied="127.0.0.3"))
    refused = run_cli("--bpf-dir", daemon.bpf_dir, "apply", by_hand)
    assert refused.returncode == 1, refused
    assert "reconcile service" in refused.stdout and "--force" in refused.stdout, refused.stdout
    # Applying what is enforced already changes nothing, so nothing is refused.
    same = run_cli("--bpf-dir", daemon.bpf_dir, "apply", folder_file)
    assert same.returncode == 0 and same.stdout.strip() == f"svc: unchanged (revision {served})"
    removal = run_cli("--bpf-dir", daemon.bpf_dir, "remove", "svc")
    assert removal.returncode == 1 and "--force" in removal.stdout, removal
    wait_passes(daemon, 2)
    assert meta(daemon.bpf_dir, "svc").revision == served
    assert connect_errno(work, "127.0.0.2") == EPERM
    assert owner_kind(daemon.bpf_dir, "svc") == "service"

    forced = run_cli("--bpf-dir", daemon.bpf_dir, "apply", "--force", by_hand)
    assert forced.returncode == 0, forced
    assert "taken over from the reconcile service" in forced.stdout, forced.stdout
    manual = meta(daemon.bpf_dir, "svc").revision
    assert manual != served and owner_kind(daemon.bpf_dir, "svc") == "cli"
    wait_passes(daemon, 3)
    # Not reverted: the forced version is what the kernel enforces, and the service says so.
    assert meta(daemon.bpf_dir, "svc").revision == manual
    assert connect_errno(work, "127.0.0.3") == EPERM
    assert connect_errno(work, "127.0.0.2") != EPERM
    assert daemon.metric('cgpolicy_policy_failing{policy="svc"}') == 1, daemon.metrics()
    assert "svc: not applied: applied by hand" in daemon.log(), daemon.log()

    # Handing it back: apply the folder's own file; the service adopts what now agrees.
    handed = run_cli("--bpf-dir", daemon.bpf_dir, "apply", folder_file)
    assert handed.returncode == 0, handed
    assert wait_until(lambda: owner_kind(daemon.bpf_dir, "svc") == "service", 30), daemon.log()
    assert meta(daemon.bpf_dir, "svc").revision == served
    assert wait_until(lambda: daemon.metric('cgpolicy_policy_failing{policy="svc"}') == 0, 30)
    # And from then on the service manages it again: a change of its file is applied.
    folder_file.write_text(POLICY.format(name="svc", glob=glob, denied="127.0.0.4"))
    assert wait_until(lambda: connect_errno(work, "127.0.0.4") == EPERM, 30), daemon.log()


def test_metadata_without_an_owner_is_taken_by_the_next_writer(
    bpf_dir, scratch_cgroup, tmp_path, cgroup_root, cleanup
):
    """Pins written before owners were recorded: any owner may change them, and the one that
    does is recorded (the service does this for its folder's policies at its first pass)."""
    path = deny_connect(tmp_path, "legacy", [scratch_cgroup.relative], "127.0.0.2")
    assert run_cli("--bpf-dir", bpf_dir, "apply", path).returncode == 0
    old = meta(bpf_dir, "legacy")
    pins.write_meta(bpf_dir, pins.PolicyMeta(**{**old.__dict__, "owner": None}))
    assert owner_kind(bpf_dir, "legacy") is None
    done = run_cli("--bpf-dir", bpf_dir, "apply", path)
    assert done.returncode == 0, done
    assert done.stdout.strip() == f"legacy: owner recorded: cli (revision {old.revision})"
    assert owner_kind(bpf_dir, "legacy") == "cli"
    assert meta(bpf_dir, "legacy").revision == old.revision
    plan = json.loads(run_cli("--bpf-dir", bpf_dir, "plan", "--json", path).stdout)
    assert plan["policies"][0]["changed"] is False


def test_the_folders_writer_cannot_adopt_and_remove_a_policy_applied_by_hand(
    daemon, scratch_cgroup, tmp_path
):
    """Security review, finding 3: root applies a policy by hand from outside the service's
    folder; whoever writes the folder puts a copy of it there (a comment added: the same
    revision). The service must not take it over (deleting the copy would then remove it),
    and /readyz must not say whether the copy matches what was applied (no revision)."""
    glob = f"{scratch_cgroup.relative}/work-*"
    text = POLICY.format(name="manual", glob=glob, denied="127.0.0.2")
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "manual.yaml").write_text(text)
    work = scratch_cgroup.child("work-1")
    done = run_cli("--bpf-dir", daemon.bpf_dir, "apply", manual / "manual.yaml")
    assert done.returncode == 0, done
    revision = meta(daemon.bpf_dir, "manual").revision
    assert connect_errno(work, "127.0.0.2") == EPERM
    copy = daemon.policy_dir / "manual.yaml"
    copy.write_text("# a copy\n" + text)
    daemon.start()
    wait_passes(daemon, 3)
    assert owner_kind(daemon.bpf_dir, "manual") == "cli", daemon.log()
    assert "taken over" not in daemon.log(), daemon.log()
    assert "manual: not applied: applied by hand" in daemon.log(), daemon.log()
    status, body = http_get(daemon.port, "/readyz")
    assert status == 503 and "policy manual: not applied" in body, body
    assert revision not in body and revision not in daemon.log(), body
    copy.unlink()
    wait_passes(daemon, 3)
    assert "manual: removed" not in daemon.log(), daemon.log()
    assert (daemon.bpf_dir / "manual").exists() and owner_kind(daemon.bpf_dir, "manual") == "cli"
    assert connect_errno(work, "127.0.0.2") == EPERM
