"""The life of an applied policy on the real kernel: idempotent apply, clean removal, a failed
apply that keeps the previous state, updates without a wrong verdict, audit mode, other
owners' programs on the same hook, and the CLI commands (plan, apply, remove, run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from enforcement import (
    ALLOWED,
    EPERM,
    apply,
    apply_ok,
    attachments,
    cgroup_links,
    denied_count,
    enforced,
    expect,
    kill_and_remove_cgroup,
    load,
    pins,
    program_names,
    remove,
    run_cli,
)
from netns import PROBE_EXTRA
from policy_builders import policy_file

from cgpolicy.enforcer.engine import Enforcer
from cgpolicy.enforcer.plan import Action
from cgpolicy.kernel import bpf, syscall
from cgpolicy.kernel.cgroup import cgroup_id

EVERY_HOOK = {
    "egress",
    "ingress",
    "sock_create",
    "bind4",
    "bind6",
    "connect4",
    "connect6",
    "sendmsg4",
    "sendmsg6",
    "device",
    "sysctl",
}


def every_section(default: str, **extra_rules: list[dict]) -> dict:
    """A spec with every section, each with ``default`` and the given rules."""

    def section(name: str) -> dict:
        return {"default": default, "rules": extra_rules.get(name, [])}

    return {
        "network": {"egress": section("egress"), "ingress": section("ingress")},
        "sockets": {
            "create": section("create"),
            "bind": section("bind"),
            "connect": section("connect"),
        },
        "devices": section("devices"),
        "sysctl": section("sysctl"),
    }


def kernel_state(cgroup, bpf_dir) -> tuple[set[str], dict[str, tuple[int, ...]], list]:
    links = sorted((link.id, link.prog_id) for link in cgroup_links(cgroup_id(cgroup.path)))
    return pins(bpf_dir), attachments(cgroup.path), links


def test_second_apply_changes_nothing_and_remove_leaves_nothing(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path, loopback_ports
):
    port = loopback_ports.ports[0]
    spec = every_section(
        "allow",
        connect=[{"action": "deny", "cidrs": ["127.0.0.6"]}],
        devices=[{"action": "deny", "type": "char", "major": 1, "minor": 7}],
    )
    path = policy_file(tmp_path, "lifecycle", [scratch_cgroup.relative], spec)
    enforcer = Enforcer(cgroup_root, bpf_dir)
    try:
        apply_ok(enforcer, path)
        first = kernel_state(scratch_cgroup, bpf_dir)
        hooks = first[1]
        assert set(hooks) == EVERY_HOOK, hooks
        assert all(len(ids) == 1 for ids in hooks.values()), hooks
        names = program_names([ids[0] for ids in hooks.values()])
        assert all(name.startswith("cgp_") for name in names), names
        assert len(first[2]) == len(EVERY_HOOK)  # one BPF link per hook

        [again] = enforcer.plan(load(path))
        assert not again.plan.changed, again.plan.steps
        assert {step.action for step in again.plan.steps} == {Action.KEEP}
        [outcome] = apply_ok(enforcer, path)
        assert "unchanged" in outcome.plan.summary()
        assert kernel_state(scratch_cgroup, bpf_dir) == first  # same pins, programs, links

        expect(
            scratch_cgroup,
            [
                (("connect", "tcp", "127.0.0.6", port), EPERM),
                (("connect", "tcp", "127.0.0.1", port), ALLOWED),
                (("open", "/dev/full", "r"), EPERM),
            ],
        )
        remove(enforcer, "lifecycle")
        assert kernel_state(scratch_cgroup, bpf_dir) == (set(), {}, [])
        assert enforcer.observe() == {}
        expect(
            scratch_cgroup,
            [
                (("connect", "tcp", "127.0.0.6", port), ALLOWED),
                (("open", "/dev/full", "r"), ALLOWED),
            ],
        )
    finally:
        remove(enforcer, "lifecycle")


def _versioned(tmp_path, targets, denied: str):
    spec = {
        "network": {
            "egress": {
                "default": "allow",
                "rules": [{"action": "deny", "protocol": "udp", "cidrs": [denied]}],
            }
        },
        "sockets": {
            "connect": {"default": "allow", "rules": [{"action": "deny", "cidrs": [denied]}]}
        },
    }
    return policy_file(tmp_path, "keep-old", targets, spec)


def test_failed_apply_keeps_the_previous_state_enforced(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path, loopback_ports
):
    """Revision 2 also targets a cgroup that vanishes between plan and apply (a container
    exiting): its links on the first cgroup are already swapped when attaching to the gone
    one fails, so apply must swap them back."""
    port = loopback_ports.ports[0]
    late = scratch_cgroup.child("late")
    v1 = _versioned(tmp_path, [scratch_cgroup.relative], "127.0.0.6")
    v2 = _versioned(tmp_path, [scratch_cgroup.relative, late.relative], "127.0.0.7")
    old_verdicts = [
        (("connect", "tcp", "127.0.0.6", port), EPERM),
        (("sendto", "127.0.0.6", port), EPERM),
        (("connect", "tcp", "127.0.0.7", port), ALLOWED),
        (("sendto", "127.0.0.7", port), ALLOWED),
    ]
    with enforced(cgroup_root, bpf_dir, v1) as enforcer:
        revision = enforcer.observe()["keep-old"].revision
        before = kernel_state(scratch_cgroup, bpf_dir)
        [planned] = enforcer.plan(load(v2))
        actions = {(step.action, step.cgroup) for step in planned.plan.steps}
        assert (Action.UPDATE, scratch_cgroup.relative) in actions, actions
        assert (Action.ATTACH, late.relative) in actions, actions
        late.path.rmdir()
        [outcome] = enforcer.apply([planned])
        assert not outcome.ok
        assert "previous state restored" in (outcome.error or ""), outcome.error
        assert kernel_state(scratch_cgroup, bpf_dir) == before
        assert enforcer.observe()["keep-old"].revision == revision
        expect(scratch_cgroup, old_verdicts)

        # A literal target that does not exist blocks the apply before anything changes.
        missing = _versioned(tmp_path, [scratch_cgroup.relative, late.relative], "127.0.0.7")
        done = run_cli("--bpf-dir", bpf_dir, "apply", missing)
        assert done.returncode == 1, done
        assert f"target cgroup {late.relative} does not exist" in done.stdout, done.stdout
        assert kernel_state(scratch_cgroup, bpf_dir) == before
        expect(scratch_cgroup, old_verdicts)


DENY_127_0_0_6 = {"default": "allow", "rules": [{"action": "deny", "cidrs": ["127.0.0.6"]}]}

FOREIGN = """
int foreign_connect4(struct bpf_sock_addr *ctx)
{
    return ctx->user_port == bpf_htons(PORT) ? 0 : 1;
}
"""


def test_foreign_program_on_the_same_hook_keeps_working(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path, loopback_ports
):
    from bcc import BPF, BPFAttachType

    theirs, ours, free = loopback_ports.ports[:3]
    connect4 = syscall.AttachType.CGROUP_INET4_CONNECT
    module = BPF(text=FOREIGN.replace("PORT", str(theirs)).encode())
    foreign = module.load_func(
        b"foreign_connect4", BPF.CGROUP_SOCK_ADDR, attach_type=BPFAttachType.CGROUP_INET4_CONNECT
    )
    foreign_id = syscall.prog_info(foreign.fd).id
    cgroup_fd = scratch_cgroup.fd()
    path = policy_file(
        tmp_path,
        "beside",
        [scratch_cgroup.relative],
        {
            "sockets": {
                "connect": {
                    "default": "allow",
                    "rules": [{"action": "deny", "protocol": "tcp", "ports": [ours]}],
                }
            }
        },
    )
    try:
        syscall.prog_attach(cgroup_fd, foreign.fd, connect4, syscall.BPF_F_ALLOW_MULTI)
        with enforced(cgroup_root, bpf_dir, path):
            ids = attachments(scratch_cgroup.path)["connect4"]
            assert foreign_id in ids and len(ids) == 2, ids
            expect(
                scratch_cgroup,
                [
                    (("connect", "tcp", "127.0.0.1", theirs), EPERM),  # they deny
                    (("connect", "tcp", "127.0.0.1", ours), EPERM),  # we deny
                    (("connect", "tcp", "127.0.0.1", free), ALLOWED),  # both allow
                    (("connect", "tcp", "::1", ours), EPERM),  # ours covers IPv6 too
                    (("connect", "tcp", "::1", theirs), ALLOWED),  # theirs is connect4 only
                ],
            )
        # cgpolicy removed only its own program.
        assert attachments(scratch_cgroup.path)["connect4"] == (foreign_id,)
        assert pins(bpf_dir) == set()
        expect(
            scratch_cgroup,
            [
                (("connect", "tcp", "127.0.0.1", theirs), EPERM),
                (("connect", "tcp", "127.0.0.1", ours), ALLOWED),
            ],
        )
    finally:
        try:
            syscall.prog_detach(cgroup_fd, connect4, foreign.fd)
        finally:
            os.close(cgroup_fd)
            module.cleanup()


def test_no_wrong_verdict_while_the_policy_is_updated(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path, loopback_ports
):
    """A loop in the cgroup connects (sock_addr connect) and sends (sock_addr sendmsg, skb
    egress) to an address both revisions allow and one both deny, while the test swaps
    revisions back and forth; every single verdict must be right."""
    port = loopback_ports.ports[4]

    def revision(extra: list[dict]) -> object:
        deny = {"action": "deny", "cidrs": ["127.0.0.3"]}
        spec = {
            "network": {
                "egress": {"default": "allow", "rules": [{**deny, "protocol": "udp"}, *extra]}
            },
            "sockets": {"connect": {"default": "allow", "rules": [deny, *extra]}},
        }
        return policy_file(tmp_path, "rolling", [scratch_cgroup.relative], spec)

    rev1 = revision([])
    rev2 = revision([{"action": "deny", "cidrs": ["10.123.0.0/16"]}])
    stop = tmp_path / "stop"
    with enforced(cgroup_root, bpf_dir, rev1) as enforcer:
        loop = subprocess.Popen(
            [sys.executable, str(PROBE_EXTRA), "loop", str(stop), str(port)]
            + ["127.0.0.2", "127.0.0.3"],
            preexec_fn=lambda: (scratch_cgroup.path / "cgroup.procs").write_text("0"),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert loop.stdout is not None
            assert json.loads(loop.stdout.readline()) == {"started": True}
            program_ids = set()
            for _ in range(6):
                for version in (rev2, rev1):
                    [outcome] = apply(enforcer, version)
                    assert outcome.ok and outcome.plan.reload, outcome
                    program_ids.update(attachments(scratch_cgroup.path)["connect4"])
                    time.sleep(0.05)
            # every apply loaded and swapped in new programs: sockets.connect's and the
            # egress connect check at connect4
            assert len(program_ids) == 24
        finally:
            stop.touch()
            out, _ = loop.communicate(timeout=30)
    report = json.loads(out.strip().splitlines()[-1])
    assert report["nwrong"] == 0, report
    assert report["iterations"] > 50, report


def test_audit_mode_denies_nothing_and_counts(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path, loopback_ports
):
    port = loopback_ports.ports[1]
    audit = policy_file(
        tmp_path, "audit-all", [scratch_cgroup.relative], every_section("deny"), mode="audit"
    )
    # An enforcing policy next to it still denies.
    enforce = policy_file(
        tmp_path,
        "enforce-one",
        [scratch_cgroup.relative],
        {
            "sockets": {
                "connect": {
                    "default": "allow",
                    "rules": [{"action": "deny", "cidrs": ["127.0.0.6"]}],
                }
            }
        },
    )
    with enforced(cgroup_root, bpf_dir, audit, enforce):
        expect(
            scratch_cgroup,
            [
                (("connect", "tcp", "127.0.0.1", port), ALLOWED),
                (("connect", "tcp", "::1", port), ALLOWED),
                (("udp-echo", "127.0.0.1", port), ALLOWED),
                (("sendto", "::1", port), ALLOWED),
                (("socket", "inet6", "raw", "icmpv6"), ALLOWED),
                (("bind", "udp", "127.0.0.1", 0), ALLOWED),
                (("open", "/dev/full", "r"), ALLOWED),
                (("sysctl-read", "kernel/ostype"), ALLOWED),
                (("connect", "tcp", "127.0.0.6", port), EPERM),
            ],
        )
        hooks = attachments(scratch_cgroup.path)
        audit_folder = bpf_dir / "audit-all"
        would_deny = {}
        for hook in ("egress", "ingress", "connect4", "connect6", "sock_create", "device"):
            with bpf.Program.from_pin(audit_folder / hook / "prog") as program:
                assert program.id in hooks[hook]
                would_deny[hook] = denied_count(program.id)
        assert all(would_deny.values()), would_deny


def _bpftool_progs(cgroup) -> list[tuple[str, int]]:
    done = subprocess.run(
        ["bpftool", "-j", "cgroup", "show", str(cgroup.path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return sorted(
        (entry["attach_type"], entry["id"]) for entry in json.loads(done.stdout.strip() or "[]")
    )


def test_cli_plan_apply_unchanged_remove(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path, loopback_ports
):
    port = loopback_ports.ports[0]
    rel = scratch_cgroup.relative
    path = policy_file(
        tmp_path,
        "cli",
        [rel],
        {
            "network": {
                "egress": {
                    "default": "allow",
                    "rules": [{"action": "deny", "protocol": "udp", "cidrs": ["127.0.0.6"]}],
                }
            },
            "sockets": {
                "connect": {
                    "default": "allow",
                    "rules": [{"action": "deny", "cidrs": ["127.0.0.6"]}],
                }
            },
        },
    )
    checks = ("egress@connect4", "egress@connect6", "egress@sendmsg4", "egress@sendmsg6")
    hooks = ("egress", "connect4", "connect6", "sendmsg4", "sendmsg6", *checks)
    try:
        planned = run_cli("--bpf-dir", bpf_dir, "plan", path, check=True)
        assert "cli: new, revision" in planned.stdout, planned.stdout
        for hook in hooks:
            assert f"attach {hook} on {rel}" in planned.stdout, planned.stdout
        assert pins(bpf_dir) == set() and _bpftool_progs(scratch_cgroup) == []  # changed nothing
        expect(scratch_cgroup, [(("connect", "tcp", "127.0.0.6", port), ALLOWED)])

        applied = run_cli("--bpf-dir", bpf_dir, "apply", path, check=True)
        assert applied.stdout == planned.stdout  # it did what plan said
        first = _bpftool_progs(scratch_cgroup)
        assert len(first) == len(hooks), first
        first_pins = pins(bpf_dir)
        expect(
            scratch_cgroup,
            [
                (("connect", "tcp", "127.0.0.6", port), EPERM),
                (("sendto", "127.0.0.6", port), EPERM),
                (("connect", "tcp", "127.0.0.1", port), ALLOWED),
            ],
        )

        again = run_cli("--bpf-dir", bpf_dir, "apply", path, check=True)
        revision = planned.stdout.split("revision ")[1].split()[0]
        assert again.stdout.strip() == f"cli: unchanged (revision {revision})", again.stdout
        assert _bpftool_progs(scratch_cgroup) == first  # the same program ids
        assert pins(bpf_dir) == first_pins
        replanned = run_cli("--bpf-dir", bpf_dir, "plan", path, check=True)
        assert replanned.stdout == again.stdout

        removed = run_cli("--bpf-dir", bpf_dir, "remove", "cli", check=True)
        assert f"cli: remove (revision {revision})" in removed.stdout
        for hook in hooks:
            assert f"detach {hook} on {rel}" in removed.stdout, removed.stdout
        assert pins(bpf_dir) == set()
        assert _bpftool_progs(scratch_cgroup) == []
        assert attachments(scratch_cgroup.path) == {}
        expect(scratch_cgroup, [(("connect", "tcp", "127.0.0.6", port), ALLOWED)])

        unknown = run_cli("--bpf-dir", bpf_dir, "remove", "cli")
        assert unknown.returncode == 1 and "no policy of this name" in unknown.stdout
    finally:
        remove(Enforcer(cgroup_root, bpf_dir), "cli")


def test_cli_run_returns_the_exit_status_and_leaves_nothing(
    bpf_dir, cgroup_root, tmp_path, loopback_ports
):
    port = loopback_ports.ports[0]
    name = f"run-{os.getpid()}"
    path = policy_file(
        tmp_path,
        name,
        ["unused/replaced-by-run"],
        {
            "sockets": {
                "connect": {
                    "default": "allow",
                    "rules": [{"action": "deny", "cidrs": ["127.0.0.6"]}],
                }
            }
        },
    )
    run_parent = cgroup_root / "cgpolicy.run"

    def leftovers() -> list[str]:
        mine = sorted(p.name for p in run_parent.glob(f"{name}-*")) if run_parent.exists() else []
        return mine + sorted(pins(bpf_dir))

    probe = [sys.executable, str(PROBE_EXTRA), "connect", "tcp"]
    try:
        status = run_cli("--bpf-dir", bpf_dir, "run", path, "--", "sh", "-c", "exit 7")
        assert status.returncode == 7, status
        assert leftovers() == []

        denied = run_cli("--bpf-dir", bpf_dir, "run", path, "--", *probe, "127.0.0.6", port)
        assert denied.returncode == 1, denied
        assert json.loads(denied.stdout.strip().splitlines()[-1])["errno"] == EPERM
        allowed = run_cli("--bpf-dir", bpf_dir, "run", path, "--", *probe, "127.0.0.1", port)
        assert allowed.returncode == 0, allowed
        # The command ran in a cgroup of its own, under the transient copy of the policy.
        where = run_cli("--bpf-dir", bpf_dir, "run", path, "--", "cat", "/proc/self/cgroup")
        assert f"/cgpolicy.run/{name}-" in where.stdout, where.stdout
        assert leftovers() == []
    finally:
        if run_parent.exists():
            for stale in run_parent.glob(f"{name}-*"):
                kill_and_remove_cgroup(stale)
        remove(Enforcer(cgroup_root, bpf_dir), *Enforcer(cgroup_root, bpf_dir).observe())


@pytest.mark.parametrize("command", ["plan", "apply"])
def test_cli_refuses_an_invalid_policy_and_changes_nothing(
    command, scratch_cgroup, bpf_dir, tmp_path
):
    path = policy_file(
        tmp_path,
        "invalid",
        [scratch_cgroup.relative],
        {"network": {"egres": {"default": "deny"}}},
    )
    done = run_cli("--bpf-dir", bpf_dir, command, path)
    assert done.returncode == 2, done
    assert "spec.network.egres: unknown field 'egres'" in done.stderr, done.stderr
    assert pins(bpf_dir) == set() and attachments(scratch_cgroup.path) == {}
