"""Apply with a way back (issue 13, part 3) on the real kernel: `apply --confirm-within`
rolls back unless `cgpolicy confirm` comes in time, also when the terminal, the applying
process and its session are gone; the lockout guard of `plan` and `apply`.

Confirmation windows are short (1-3 s) where the test waits for the rollback, and long
where it must confirm in time; nothing asserts on how long anything took: every wait polls
with a generous deadline."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from enforcement import CGPOLICY, EPERM, attached, probe, run_cli
from policy_builders import dns_connect_policy, policy_file
from service import Daemon, wait_until

from cgpolicy.enforcer.rollout import ROLLBACK_PARENT, stop_idle_timers, timer_cgroup
from cgpolicy.kernel import pending, pins
from cgpolicy.kernel.bpf import CgroupLink, Program

HOOKS = ("connect4", "connect6", "sendmsg4", "sendmsg6")
FIRST, SECOND = "127.0.0.7", "127.0.0.8"  # v1 denies connects to FIRST, v2 to SECOND
ROLLBACK_WAIT = 60.0  # generous: the VM is shared


def deny_connect(folder: Path, name: str, targets: list[str], address: str, **kw) -> Path:
    rule = {"action": "deny", "cidrs": [f"{address}/32"]}
    spec = {"sockets": {"connect": {"default": "allow", "rules": [rule]}}}
    return policy_file(folder, name, targets, spec, **kw)


def denied(cgroup, address: str) -> bool:
    result = probe(cgroup, "connect", "tcp", address, 9)
    return not result.ok and result.errno == EPERM


def programs(bpf_dir: Path, name: str) -> dict[str, tuple[int, str]]:
    """hook -> (id, tag) of the program pinned for each hook of a policy."""
    found = {}
    for hook in HOOKS:
        with Program.from_pin(bpf_dir / name / hook / pins.PROG_PIN) as program:
            info = program.info()
            found[hook] = (info.id, info.tag)
    return found


def linked(bpf_dir: Path, name: str) -> dict[str, set[int]]:
    """hook -> the program ids the policy's pinned links hold."""
    found: dict[str, set[int]] = {}
    for hook in HOOKS:
        for pin in (bpf_dir / name / hook).glob("link-*"):
            with CgroupLink.from_pin(pin) as link:
                found.setdefault(hook, set()).add(link.info().prog_id)
    return found


def audit_json(bpf_dir: Path, cgroup) -> tuple[int, dict]:
    done = run_cli("--bpf-dir", bpf_dir, "audit", "--cgroup", cgroup.relative, "--json")
    return done.returncode, json.loads(done.stdout)


def revision_at(bpf_dir: Path, cgroup) -> set[str | None]:
    code, report = audit_json(bpf_dir, cgroup)
    assert code == 0, report  # in sync
    return {
        a["revision"]
        for c in report["cgroups"]
        for a in c["attachments"]
        if a["policy"] and a["inherited_from"] is None
    }


def timers(root: Path, bpf_dir: Path) -> list[Path]:
    """The cgroups of this pin folder's rollback processes."""
    prefix = timer_cgroup(root, bpf_dir, "x").name[:-1]
    parent = root / ROLLBACK_PARENT
    return sorted(parent.glob(f"{prefix}*")) if parent.is_dir() else []


def nothing_pending(bpf_dir: Path, root: Path) -> bool:
    return not (bpf_dir / pending.PENDING_FOLDER).exists() and not timers(root, bpf_dir)


@pytest.fixture
def cleanup(bpf_dir: Path, cgroup_root: Path) -> Iterator[None]:
    """Remove what the test applied and end the rollback processes it started, also when
    it fails (only those of its own pin folder)."""
    yield
    for name in pending.read_records(bpf_dir) if pins.bpf_dir_exists(bpf_dir) else {}:
        pending.drop(bpf_dir, name)
    stop_idle_timers(bpf_dir, cgroup_root)
    run_cli("--bpf-dir", bpf_dir, "remove", "--all", "--force")


def cli(bpf_dir: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_cli("--bpf-dir", bpf_dir, *args)


def test_not_confirmed_goes_back_to_the_previous_programs(
    bpf_dir, cgroup_root, scratch_cgroup, tmp_path, cleanup
):
    v1 = deny_connect(tmp_path, "web", [scratch_cgroup.relative], FIRST)
    v2 = deny_connect(tmp_path, "web", [scratch_cgroup.relative], SECOND)
    assert cli(bpf_dir, "apply", v1).returncode == 0
    before = programs(bpf_dir, "web")
    (v1_revision,) = revision_at(bpf_dir, scratch_cgroup)

    done = cli(bpf_dir, "apply", "--confirm-within", "2s", v2, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [p["policy"] for p in report["confirm"]["pending"]] == ["web"]
    assert report["confirm"]["pending"][0]["previous"] == v1_revision
    # (v2 may already be rolled back here on a slow machine: no assertion on it)

    def rolled_back() -> bool:
        return nothing_pending(bpf_dir, cgroup_root) and programs(bpf_dir, "web") == before

    assert wait_until(rolled_back, ROLLBACK_WAIT), (programs(bpf_dir, "web"), before)
    ids = {hook: {prog_id} for hook, (prog_id, _) in before.items()}
    assert linked(bpf_dir, "web") == ids
    for hook, (prog_id, _) in before.items():
        assert attached(scratch_cgroup.path, hook) == (prog_id,)
    assert denied(scratch_cgroup, FIRST) and not denied(scratch_cgroup, SECOND)
    assert revision_at(bpf_dir, scratch_cgroup) == {v1_revision}  # and audit is in sync
    again = cli(bpf_dir, "confirm", "web")
    assert again.returncode == 1 and "rolled back from revision" in again.stderr, again.stderr


def test_confirmed_in_time_stays_after_the_deadline(
    bpf_dir, cgroup_root, scratch_cgroup, tmp_path, cleanup
):
    v1 = deny_connect(tmp_path, "web", [scratch_cgroup.relative], FIRST)
    v2 = deny_connect(tmp_path, "web", [scratch_cgroup.relative], SECOND)
    assert cli(bpf_dir, "apply", v1).returncode == 0
    done = cli(bpf_dir, "apply", "--confirm-within", "10s", v2)
    assert done.returncode == 0, done.stderr
    after = programs(bpf_dir, "web")
    confirmed = cli(bpf_dir, "confirm")
    assert confirmed.returncode == 0, confirmed.stderr
    assert "web: confirmed revision" in confirmed.stdout
    assert wait_until(lambda: nothing_pending(bpf_dir, cgroup_root), ROLLBACK_WAIT)
    # Past the deadline, and after a command that takes the lock (and rolls back what is
    # overdue): still v2.
    now = pending.boottime_ns()
    assert wait_until(lambda: pending.boottime_ns() > now + 11e9, 30)
    assert cli(bpf_dir, "remove", "no-such-policy").returncode == 1
    assert programs(bpf_dir, "web") == after
    assert denied(scratch_cgroup, SECOND) and not denied(scratch_cgroup, FIRST)


def test_a_new_policy_not_confirmed_is_removed(
    bpf_dir, cgroup_root, scratch_cgroup, tmp_path, cleanup
):
    new = deny_connect(tmp_path, "fresh", [scratch_cgroup.relative], FIRST)
    done = cli(bpf_dir, "apply", "--confirm-within", "1", new)
    assert done.returncode == 0, done.stderr
    assert "fresh: it is removed (it is new)" in done.stdout
    assert wait_until(
        lambda: not (bpf_dir / "fresh").exists() and nothing_pending(bpf_dir, cgroup_root),
        ROLLBACK_WAIT,
    )
    for hook in HOOKS:
        assert attached(scratch_cgroup.path, hook) == ()
    assert not denied(scratch_cgroup, FIRST)


def test_rollback_survives_the_applying_process_and_its_session(
    bpf_dir, cgroup_root, scratch_cgroup, tmp_path, cleanup
):
    """`apply --confirm-within` from a shell in a session of its own, in a cgroup standing
    for the login's scope; then everything in that cgroup is SIGKILLed, as logind does at
    logout with KillUserProcesses: the rollback still happens."""
    target = scratch_cgroup.child("workload")
    session = scratch_cgroup.child("session")
    v1 = deny_connect(tmp_path, "web", [target.relative], FIRST)
    v2 = deny_connect(tmp_path, "web", [target.relative], SECOND)
    assert cli(bpf_dir, "apply", v1).returncode == 0
    before = programs(bpf_dir, "web")
    script = f"{CGPOLICY} --bpf-dir {bpf_dir} apply --confirm-within 3s {v2}; exec sleep 600"
    shell = subprocess.Popen(
        ["sh", "-c", script],
        start_new_session=True,
        preexec_fn=lambda: (session.path / "cgroup.procs").write_text("0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert shell.stdout is not None
        output = []
        for line in shell.stdout:  # until the apply has said what it did
            output.append(line)
            if line.startswith("run `cgpolicy confirm"):
                break
        assert any(line.startswith("run `cgpolicy confirm") for line in output), output
        (session.path / "cgroup.kill").write_text("1")  # the session is gone
        assert shell.wait(timeout=30) == -signal.SIGKILL
    finally:
        if shell.poll() is None:
            shell.kill()
            shell.wait()
    assert wait_until(lambda: not (session.path / "cgroup.procs").read_text().strip(), 30)
    assert wait_until(
        lambda: nothing_pending(bpf_dir, cgroup_root) and programs(bpf_dir, "web") == before,
        ROLLBACK_WAIT,
    )
    assert denied(target, FIRST) and not denied(target, SECOND)


def timer_pids(cgroup_root: Path, bpf_dir: Path) -> list[int]:
    return [
        int(pid)
        for leaf in timers(cgroup_root, bpf_dir)
        for pid in (leaf / "cgroup.procs").read_text().split()
    ]


def kill_timers(cgroup_root: Path, bpf_dir: Path) -> None:
    """SIGKILL the rollback processes this test's apply started (by pid)."""
    pids = timer_pids(cgroup_root, bpf_dir)
    assert pids, "no rollback process"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not timer_pids(cgroup_root, bpf_dir), 30)


def overdue(bpf_dir: Path) -> bool:
    return all(r.overdue() for r in pending.read_records(bpf_dir).values())


@pytest.mark.parametrize("next_command", ["apply", "confirm"])
def test_the_next_command_rolls_back_when_the_rollback_process_is_gone(
    bpf_dir, cgroup_root, scratch_cgroup, tmp_path, cleanup, next_command
):
    v1 = deny_connect(tmp_path, "web", [scratch_cgroup.relative], FIRST)
    v2 = deny_connect(tmp_path, "web", [scratch_cgroup.relative], SECOND)
    other = deny_connect(tmp_path, "other", [scratch_cgroup.relative], "127.0.0.9")
    assert cli(bpf_dir, "apply", v1).returncode == 0
    before = programs(bpf_dir, "web")
    assert cli(bpf_dir, "apply", "--confirm-within", "30s", v2).returncode == 0
    after = programs(bpf_dir, "web")
    kill_timers(cgroup_root, bpf_dir)
    # Make the wait overdue without waiting for it: the record is root's to rewrite.
    (record,) = pending.read_records(bpf_dir).values()
    pending.write_record(bpf_dir, dataclasses.replace(record, deadline_ns=0))
    audited = json.loads(cli(bpf_dir, "audit", "--json").stdout)
    assert [p["policy"] for p in audited["pending"]] == ["web"]
    assert programs(bpf_dir, "web") == after  # nobody rolled back yet: no process left
    if next_command == "apply":
        done = cli(bpf_dir, "apply", other)
        assert done.returncode == 0, done.stderr
        assert "web: not confirmed in time: rolled back" in done.stderr, done.stderr
    else:
        done = cli(bpf_dir, "confirm", "web")
        assert done.returncode == 1, (done.stdout, done.stderr)
        assert "too late" in done.stderr and "rolled back" in done.stderr, done.stderr
    assert programs(bpf_dir, "web") == before
    assert nothing_pending(bpf_dir, cgroup_root)
    assert denied(scratch_cgroup, FIRST) and not denied(scratch_cgroup, SECOND)


def test_a_second_apply_waits_for_the_confirmation_unless_forced(
    bpf_dir, cgroup_root, scratch_cgroup, tmp_path, cleanup
):
    v1 = deny_connect(tmp_path, "web", [scratch_cgroup.relative], FIRST)
    v2 = deny_connect(tmp_path, "web", [scratch_cgroup.relative], SECOND)
    assert cli(bpf_dir, "apply", v1).returncode == 0
    assert cli(bpf_dir, "apply", "--confirm-within", "60s", v2).returncode == 0
    refused = cli(bpf_dir, "apply", v1)
    assert refused.returncode == 1 and "a confirmation is pending" in refused.stdout
    plan = cli(bpf_dir, "plan", v1)
    assert plan.returncode == 1 and "confirmation pending" in plan.stdout, plan.stdout
    forced = cli(bpf_dir, "apply", "--force", v1)
    assert forced.returncode == 0, forced.stderr
    assert "its pending confirmation is ended" in forced.stdout
    assert wait_until(lambda: nothing_pending(bpf_dir, cgroup_root), ROLLBACK_WAIT)
    assert denied(scratch_cgroup, FIRST)


def test_removing_a_pending_policy_ends_its_wait(
    bpf_dir, cgroup_root, scratch_cgroup, tmp_path, cleanup
):
    v1 = deny_connect(tmp_path, "web", [scratch_cgroup.relative], FIRST)
    v2 = deny_connect(tmp_path, "web", [scratch_cgroup.relative], SECOND)
    assert cli(bpf_dir, "apply", v1).returncode == 0
    assert cli(bpf_dir, "apply", "--confirm-within", "60s", v2).returncode == 0
    assert cli(bpf_dir, "remove", "web").returncode == 0
    assert wait_until(lambda: nothing_pending(bpf_dir, cgroup_root), ROLLBACK_WAIT)
    assert not (bpf_dir / "web").exists()


def test_an_invalid_window_is_refused_and_changes_nothing(bpf_dir, scratch_cgroup, tmp_path):
    v1 = deny_connect(tmp_path, "web", [scratch_cgroup.relative], FIRST)
    for bad in ("0", "-5s", "1x", "2 days", "90000"):
        done = cli(bpf_dir, "apply", "--confirm-within", bad, v1)
        assert done.returncode == 2, (bad, done.stdout, done.stderr)
        assert done.stderr.startswith("cgpolicy: --confirm-within:"), done.stderr
        assert "Traceback" not in done.stderr
    assert not (bpf_dir / "web").exists()


def test_a_rollback_process_under_a_cgroup_root_below_the_mount_removes_its_cgroup(
    bpf_dir, scratch_cgroup, tmp_path, cleanup
):
    """With --cgroup-root below the mount, the rollback process took its own cgroup for an
    idle one's after rolling back, killed itself with it and left the cgroup behind."""
    target = scratch_cgroup.child("web")
    v1 = deny_connect(tmp_path, "web", ["web"], FIRST)
    root = ["--cgroup-root", str(scratch_cgroup.path)]
    done = cli(bpf_dir, *root, "apply", "--confirm-within", "1s", v1)
    assert done.returncode == 0, (done.stdout, done.stderr)
    parent = scratch_cgroup.path / ROLLBACK_PARENT
    assert wait_until(lambda: not (bpf_dir / "web").exists(), ROLLBACK_WAIT)
    assert not denied(target, FIRST)
    assert wait_until(lambda: not parent.exists(), ROLLBACK_WAIT), [
        (leaf.name, (leaf / "cgroup.procs").read_text())
        for leaf in parent.iterdir()
        if leaf.is_dir()
    ]


# --- the lockout guard ----------------------------------------------------------------------


def cli_inside(cgroup, bpf_dir: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """`cgpolicy ARGS` run by a process in ``cgroup``."""
    return cgroup.run([str(CGPOLICY), "--bpf-dir", str(bpf_dir), *map(str, args)])


def test_the_lockout_guard_refuses_a_policy_on_its_own_cgroup_unless_forced(
    bpf_dir, scratch_cgroup, tmp_path, cleanup
):
    inside = scratch_cgroup.child("operator")
    own = deny_connect(tmp_path, "own", [inside.relative], FIRST)
    parent = deny_connect(tmp_path, "parent", [scratch_cgroup.relative], FIRST)
    parts = inside.relative.split("/")
    glob = tmp_path / "glob.yaml"
    glob.write_text(
        own.read_text()
        .replace(f'"path": "{inside.relative}"', f'"glob": "{"/".join(parts[:-1])}/op*"')
        .replace('"own"', '"globbed"')
    )
    for policy, target in ((own, inside.relative), (parent, scratch_cgroup.relative)):
        for command in ("plan", "apply"):
            done = cli_inside(inside, bpf_dir, command, policy)
            assert done.returncode == 1, (command, done.stdout, done.stderr)
            assert "lockout guard" in done.stdout and f"target {target} covers" in done.stdout
            assert "this cgpolicy (pid" in done.stdout and "--force" in done.stdout
    done = cli_inside(inside, bpf_dir, "plan", glob)
    assert done.returncode == 1 and f"target {inside.relative} covers" in done.stdout, done
    assert not (bpf_dir / "own").exists() and not (bpf_dir / "parent").exists()
    # The same policy from outside the cgroup, and an audit-mode one (denies nothing): fine
    assert cli(bpf_dir, "plan", own).returncode == 0
    audit_mode = deny_connect(tmp_path, "watch", [inside.relative], FIRST, mode="audit")
    assert cli_inside(inside, bpf_dir, "plan", audit_mode).returncode == 0
    forced = cli_inside(inside, bpf_dir, "apply", "--force", own)
    assert forced.returncode == 0, (forced.stdout, forced.stderr)
    assert "--force overrides the lockout guard" in forced.stderr
    assert denied(inside, FIRST)


def test_the_lockout_guard_holds_with_a_cgroup_root_below_the_mount(
    bpf_dir, scratch_cgroup, tmp_path, cleanup
):
    """--cgroup-root may be a cgroup below the mount: targets are relative to it, a
    process's cgroup to the mount; the guard must still see that one covers the other."""
    inside = scratch_cgroup.child("operator")
    own = deny_connect(tmp_path, "own", ["operator"], FIRST)
    for command in ("plan", "apply"):
        done = cli_inside(inside, bpf_dir, "--cgroup-root", scratch_cgroup.path, command, own)
        assert done.returncode == 1, (command, done.stdout, done.stderr)
        assert "lockout guard" in done.stdout and "target operator covers" in done.stdout
    assert not (bpf_dir / "own").exists()
    assert not denied(inside, FIRST)


@pytest.mark.parametrize("name", ["..operator", "oper\x1cator ", "oper\u2028ator"])
def test_a_cgroup_name_cannot_hide_the_operator_from_the_lockout_guard(
    bpf_dir, scratch_cgroup, tmp_path, cleanup, name
):
    """A user names the cgroups of a subtree delegated to them (their systemd user
    instance's): "..x", spaces at the ends, or characters str.splitlines() splits at, must
    not make the guard lose track of the operator's process in it."""
    inside = scratch_cgroup.child(name)
    own = deny_connect(tmp_path, "own", [inside.relative], FIRST)
    document = json.loads(own.read_text())  # a glob: a path with a control character is
    document["spec"]["targets"] = [{"glob": f"{scratch_cgroup.relative}/*"}]  # not valid
    own.write_text(json.dumps(document))
    parent = deny_connect(tmp_path, "parent", [scratch_cgroup.relative], FIRST)
    for policy in (own, parent):
        done = cli_inside(inside, bpf_dir, "plan", policy)
        assert done.returncode == 1, (policy, done.stdout, done.stderr)
        assert "lockout guard" in done.stdout and "this cgpolicy (pid" in done.stdout
    assert not (bpf_dir / "own").exists() and not (bpf_dir / "parent").exists()


def test_a_forged_process_name_cannot_forge_lines_in_the_refusal(
    bpf_dir, scratch_cgroup, tmp_path, cleanup
):
    """A user's process named like an sshd adds a refusal (by design), but its name, which
    its owner chose, is shown escaped: no line break or escape sequence of its own."""
    service = scratch_cgroup.child("service")
    forged = "sshd\x1b[2K\rforged: applied\nforged: nothing refused\u2028"
    stand_in = subprocess.Popen(
        [forged, "-c", "import time; time.sleep(600)"],
        executable=sys.executable,
        preexec_fn=lambda: (service.path / "cgroup.procs").write_text("0"),
    )
    try:
        policy = deny_connect(tmp_path, "svc", [service.relative], FIRST)
        done = cli(bpf_dir, "plan", policy)
        assert done.returncode == 1, (done.stdout, done.stderr)
        refusal = next(line for line in done.stdout.split("\n") if "lockout guard" in line)
        assert f"an sshd (pid {stand_in.pid}, sshd\\x1b[2K\\x0dforged" in refusal, refusal
        assert "\\x0aforged: nothing refused\\u2028" in refusal, refusal
        assert not any(line.startswith("forged") for line in done.stdout.splitlines())
    finally:
        stand_in.kill()
        stand_in.wait()


def test_the_lockout_guard_sees_a_reconcile_service(bpf_dir, scratch_cgroup, tmp_path, cleanup):
    """A process that looks like `cgpolicy reconcile` counts (a false refusal is fine)."""
    service = scratch_cgroup.child("service")
    stand_in = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)", "cgpolicy", "reconcile"],
        preexec_fn=lambda: (service.path / "cgroup.procs").write_text("0"),
    )
    try:
        policy = deny_connect(tmp_path, "svc", [service.relative], FIRST)
        done = cli(bpf_dir, "plan", policy)
        assert done.returncode == 1, (done.stdout, done.stderr)
        assert f"the reconcile service (pid {stand_in.pid}" in done.stdout, done.stdout
    finally:
        stand_in.kill()
        stand_in.wait()


# --- what going back restores and what it leaves ------------------------------------------


def connect_and_sysctl(folder: Path, targets: list[str], address: str) -> Path:
    rule = {"action": "deny", "cidrs": [f"{address}/32"]}
    spec = {
        "sockets": {"connect": {"default": "allow", "rules": [rule]}},
        "sysctl": {"default": "allow", "rules": [{"action": "deny", "name": "kernel.*"}]},
    }
    return policy_file(folder, "web", targets, spec)


def connect_and_devices(folder: Path, targets: list[str], address: str) -> Path:
    rule = {"action": "deny", "cidrs": [f"{address}/32"]}
    device = {"action": "deny", "type": "char", "major": 1, "minor": 7, "access": "w"}
    spec = {
        "sockets": {"connect": {"default": "allow", "rules": [rule]}},
        "devices": {"default": "allow", "rules": [device]},
    }
    return policy_file(folder, "web", targets, spec)


def test_going_back_restores_targets_and_hooks_and_leaves_other_programs(
    bpf_dir, cgroup_root, scratch_cgroup, tmp_path, cleanup
):
    """v1 on A and B (connect + sysctl), v2 on B and C (connect + devices), not confirmed:
    A gets v1's programs again, C loses only what v2 attached (another policy's program
    there stays), B is switched back; the sysctl hook is back and the device hook gone."""
    a, b, c = (scratch_cgroup.child(name) for name in ("a", "b", "c"))
    other = deny_connect(tmp_path, "other", [c.relative], "127.0.0.9")
    assert cli(bpf_dir, "apply", other).returncode == 0
    (theirs,) = attached(c.path, "connect4")
    v1 = connect_and_sysctl(tmp_path, [a.relative, b.relative], FIRST)
    v2 = connect_and_devices(tmp_path, [b.relative, c.relative], SECOND)
    assert cli(bpf_dir, "apply", v1).returncode == 0
    ours = {hook: attached(a.path, hook) for hook in ("connect4", "sysctl")}
    done = cli(bpf_dir, "apply", "--confirm-within", "1s", v2)
    assert done.returncode == 0, done.stderr
    assert "detach sysctl on" in done.stdout and "attach device on" in done.stdout
    assert wait_until(lambda: nothing_pending(bpf_dir, cgroup_root), ROLLBACK_WAIT)
    for cgroup in (a, b):
        for hook, ids in ours.items():
            assert attached(cgroup.path, hook) == ids, (cgroup.relative, hook)
        assert attached(cgroup.path, "device") == ()
    assert attached(c.path, "connect4") == (theirs,)
    assert attached(c.path, "sysctl") == attached(c.path, "device") == ()
    assert denied(a, FIRST) and not denied(b, SECOND) and denied(c, "127.0.0.9")
    assert not (bpf_dir / "web" / "device").exists()
    code, report = audit_json(bpf_dir, scratch_cgroup)
    assert code == 0, report


def test_a_dns_policy_goes_back_in_sync(bpf_dir, cgroup_root, scratch_cgroup, tmp_path, cleanup):
    rule = {"action": "allow", "fqdns": ["example.test"]}
    v1 = dns_connect_policy(tmp_path, "names", [scratch_cgroup.relative], ["127.0.0.53"], [rule])
    other = {"action": "allow", "fqdns": ["*.example.test"]}
    v2 = dns_connect_policy(tmp_path, "names", [scratch_cgroup.relative], ["127.0.0.53"], [other])
    assert cli(bpf_dir, "apply", v1).returncode == 0
    before = {p.name: p for p in (bpf_dir / "names").iterdir()}
    assert cli(bpf_dir, "apply", "--confirm-within", "1", v2).returncode == 0
    assert wait_until(lambda: nothing_pending(bpf_dir, cgroup_root), ROLLBACK_WAIT)
    assert {p.name for p in (bpf_dir / "names").iterdir()} == set(before)
    code, report = audit_json(bpf_dir, scratch_cgroup)
    assert code == 0, report
    assert {d["policy"] for d in report["dns"]} == {"names"}


def test_the_reconcile_service_rolls_back_what_is_overdue(
    bpf_dir, cgroup_root, scratch_cgroup, tmp_path, cleanup
):
    """With the rollback process gone, a running service's next pass rolls back."""
    v1 = deny_connect(tmp_path, "web", [scratch_cgroup.relative], FIRST)
    v2 = deny_connect(tmp_path, "web", [scratch_cgroup.relative], SECOND)
    assert cli(bpf_dir, "apply", v1).returncode == 0
    before = programs(bpf_dir, "web")
    assert cli(bpf_dir, "apply", "--confirm-within", "1h", v2).returncode == 0
    kill_timers(cgroup_root, bpf_dir)
    policy_dir = tmp_path / "policies.d"
    policy_dir.mkdir()
    service = Daemon(policy_dir, bpf_dir, tmp_path / "daemon.log")
    service.start()
    try:
        assert programs(bpf_dir, "web") != before  # not overdue: the service waits too
        (record,) = pending.read_records(bpf_dir).values()
        pending.write_record(bpf_dir, dataclasses.replace(record, deadline_ns=0))
        assert wait_until(lambda: programs(bpf_dir, "web") == before, ROLLBACK_WAIT), service.log()
        assert wait_until(lambda: nothing_pending(bpf_dir, cgroup_root), ROLLBACK_WAIT)
        assert "web: not confirmed in time: rolled back" in service.log()
        counted = 'cgpolicy_confirm_rollbacks_total{policy="web",result="done"} 1.0'
        assert wait_until(lambda: counted in (service.metrics() or "")), service.metrics()
    finally:
        service.stop()


def test_without_a_rollback_process_nothing_is_applied(
    bpf_dir, cgroup_root, scratch_cgroup, tmp_path, cleanup, monkeypatch
):
    """No way back, no change: a rollback process that cannot start (a read-only cgroupfs,
    say) refuses the apply before anything is enforced, and leaves no pending state."""
    from enforcement import load

    from cgpolicy.enforcer import rollout
    from cgpolicy.enforcer.apply import ApplyError
    from cgpolicy.enforcer.engine import Enforcer

    v1 = deny_connect(tmp_path, "web", [scratch_cgroup.relative], FIRST)
    v2 = deny_connect(tmp_path, "web", [scratch_cgroup.relative], SECOND)
    assert cli(bpf_dir, "apply", v1).returncode == 0
    before = programs(bpf_dir, "web")

    def cannot_start(*_args: object) -> int:
        raise OSError("cgroupfs is read-only")

    monkeypatch.setattr(rollout, "start_timer", cannot_start)
    enforcer = Enforcer(cgroup_root, bpf_dir)
    with enforcer.locked():
        planned, records = rollout.plan_checked(enforcer, load(v2), force=False)
        with pytest.raises(ApplyError, match="cannot start the rollback process"):
            rollout.apply_with_way_back(enforcer, planned, 60.0, records)
    assert programs(bpf_dir, "web") == before
    assert nothing_pending(bpf_dir, cgroup_root)
    assert denied(scratch_cgroup, FIRST)


def deny_egress(folder: Path, name: str, targets: list[str], address: str) -> Path:
    """network.egress denying one address: its connect checks (egress@connect4...) refuse
    a connect to it at once (docs/policy.md "Denials that fail fast")."""
    rule = {"action": "deny", "cidrs": [f"{address}/32"]}
    return policy_file(
        folder, name, targets, {"network": {"egress": {"default": "allow", "rules": [rule]}}}
    )


def test_going_back_restores_the_egress_connect_checks(
    bpf_dir, cgroup_root, scratch_cgroup, tmp_path, cleanup
):
    """The connect checks are programs of their own (egress@connect4, ...): the way back
    keeps and restores them too, so v1 fails fast again and v2's checks are gone."""
    v1 = deny_egress(tmp_path, "eg", [scratch_cgroup.relative], FIRST)
    v2 = deny_egress(tmp_path, "eg", [scratch_cgroup.relative], SECOND)
    assert cli(bpf_dir, "apply", v1).returncode == 0
    checks = ("egress@connect4", "egress@sendmsg4", "egress")
    before = {}
    for slot in checks:
        with Program.from_pin(bpf_dir / "eg" / slot / pins.PROG_PIN) as program:
            before[slot] = program.info().id
    assert denied(scratch_cgroup, FIRST) and not denied(scratch_cgroup, SECOND)
    done = cli(bpf_dir, "apply", "--confirm-within", "1s", v2)
    assert done.returncode == 0, done.stderr
    assert wait_until(lambda: nothing_pending(bpf_dir, cgroup_root), ROLLBACK_WAIT)
    for slot in checks:
        with Program.from_pin(bpf_dir / "eg" / slot / pins.PROG_PIN) as program:
            assert program.info().id == before[slot], slot
    assert attached(scratch_cgroup.path, "connect4") == (before["egress@connect4"],)
    assert denied(scratch_cgroup, FIRST) and not denied(scratch_cgroup, SECOND)
    code, report = audit_json(bpf_dir, scratch_cgroup)
    assert code == 0, report


@pytest.mark.parametrize(
    "name", ["..", ".", "", "web/..", "_pending"], ids=["up", "here", "empty", "web-up", "pending"]
)
def test_confirm_reads_nothing_outside_the_applied_policies(
    bpf_dir, scratch_cgroup, tmp_path, cleanup, name
):
    """A name that is not an applied policy's is not made into a path under the pin folder
    (``..`` would read a metadata pin beside it)."""
    policy = deny_connect(tmp_path, "web", [scratch_cgroup.relative], FIRST)
    assert cli(bpf_dir, "apply", policy).returncode == 0
    done = cli(bpf_dir, "confirm", name)
    assert done.returncode == 1, done
    assert "no policy of this name is applied" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_going_back_links_the_connect_checks_again_after_failfast_was_turned_off(
    bpf_dir, cgroup_root, scratch_cgroup, tmp_path, cleanup
):
    """v2 sets failFast: false, so the apply detaches v1's connect checks; not confirmed,
    the rollback creates their links again (at connect4..., not at 'egress@connect4')."""
    v1 = deny_egress(tmp_path, "eg", [scratch_cgroup.relative], FIRST)
    v2 = deny_egress(tmp_path, "eg", [scratch_cgroup.relative], FIRST)
    document = json.loads(v2.read_text())
    document["spec"]["network"]["egress"]["failFast"] = False
    v2.write_text(json.dumps(document))
    assert cli(bpf_dir, "apply", v1).returncode == 0
    checks = {hook: attached(scratch_cgroup.path, hook) for hook in HOOKS}
    assert all(checks.values()), checks
    done = cli(bpf_dir, "apply", "--confirm-within", "1s", v2)
    assert done.returncode == 0, done.stderr
    assert "detach egress@connect4" in done.stdout, done.stdout
    assert wait_until(lambda: nothing_pending(bpf_dir, cgroup_root), ROLLBACK_WAIT)
    assert {hook: attached(scratch_cgroup.path, hook) for hook in HOOKS} == checks
    assert denied(scratch_cgroup, FIRST)
    code, report = audit_json(bpf_dir, scratch_cgroup)
    assert code == 0, report
