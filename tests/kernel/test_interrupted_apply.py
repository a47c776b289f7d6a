"""An apply killed half-way (issue 10, item 7): the next apply finishes it, `audit` reports
it, `remove` undoes it. A kill is simulated by raising a BaseException at the point under
test: nothing is rolled back, the process's descriptors close, the pins stay, exactly as
when the process dies there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from enforcement import ALLOWED, EPERM, apply, apply_ok, attachments, expect, remove, run_cli
from policy_builders import policy_file

from cgpolicy.enforcer import apply as apply_module
from cgpolicy.enforcer.engine import Enforcer
from cgpolicy.kernel import pins

HOOKS = ("egress", "connect4", "connect6", "sendmsg4", "sendmsg6")


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no handler of cgpolicy's catches it."""


def deny_connect_to(tmp_path: Path, cgroup: str, address: str) -> Path:
    return policy_file(
        tmp_path,
        "half",
        [cgroup],
        {
            "network": {"egress": {"default": "allow", "rules": []}},
            "sockets": {
                "connect": {"default": "allow", "rules": [{"action": "deny", "cidrs": [address]}]}
            },
        },
    )


def audit_drift(bpf_dir: Path, cgroup) -> list[dict[str, str]]:  # type: ignore[no-untyped-def]
    done = run_cli("--bpf-dir", bpf_dir, "audit", "--cgroup", cgroup.relative, "--json")
    assert done.returncode in (0, 3), done
    (report,) = [c for c in json.loads(done.stdout)["cgroups"] if c["path"] == cgroup.relative]
    return report["drift"]


def reapply_v1(enforcer, v1: Path, bpf_dir: Path, cgroup, port: int) -> None:  # type: ignore[no-untyped-def]
    """Apply v1 (deny 127.0.0.5) again after an interrupted apply: it reloads whole (not
    "unchanged"), enforces v1, and audit finds no drift."""
    (outcome,) = apply_ok(enforcer, v1)
    assert outcome.plan.reload
    expect(
        cgroup,
        [
            (("connect", "tcp", "127.0.0.5", port), EPERM),
            (("connect", "tcp", "127.0.0.6", port), ALLOWED),
        ],
    )
    assert audit_drift(bpf_dir, cgroup) == []


def test_an_update_killed_before_its_metadata_is_undone_by_the_next_apply(
    scratch_cgroup, bpf_dir: Path, cgroup_root: Path, tmp_path: Path, monkeypatch, loopback_ports
) -> None:
    """Before: v2's programs were pinned and linked, v1's metadata stayed; applying v1 again
    said `unchanged` and left v2's rules enforced."""
    port = loopback_ports.ports[0]
    v1 = deny_connect_to(tmp_path, scratch_cgroup.relative, "127.0.0.5")
    v2 = deny_connect_to(tmp_path, scratch_cgroup.relative, "127.0.0.6")
    enforcer = Enforcer(cgroup_root, bpf_dir)
    try:
        apply_ok(enforcer, v1)

        def killed(*_: object) -> None:
            raise Killed

        with monkeypatch.context() as patched:
            patched.setattr(pins, "write_meta", killed)
            with pytest.raises(Killed):
                apply(enforcer, v2)
        expect(scratch_cgroup, [(("connect", "tcp", "127.0.0.6", port), EPERM)])  # v2 is on
        drift = audit_drift(bpf_dir, scratch_cgroup)
        assert {d["problem"] for d in drift} == {"interrupted"}, drift
        assert {d["hook"] for d in drift} == set(HOOKS)

        reapply_v1(enforcer, v1, bpf_dir, scratch_cgroup, port)
    finally:
        remove(enforcer, "half")


def test_a_new_policy_killed_while_pinning_is_finished_or_removed(
    scratch_cgroup, bpf_dir: Path, cgroup_root: Path, tmp_path: Path, monkeypatch, loopback_ports
) -> None:
    """Before: a kill after 3 of the 5 link pins left 3 hooks enforced and no metadata, and
    audit reported two hooks `missing` as if someone had detached them."""
    port = loopback_ports.ports[0]
    policy = deny_connect_to(tmp_path, scratch_cgroup.relative, "127.0.0.6")
    enforcer = Enforcer(cgroup_root, bpf_dir)
    real_pin = pins.pin_replacing
    pinned_links = []

    def pin_some(obj, path: str | Path) -> None:  # type: ignore[no-untyped-def]
        if Path(path).name.startswith(pins.LINK_PREFIX):
            if len(pinned_links) == 3:
                raise Killed
            pinned_links.append(path)
        real_pin(obj, path)

    try:
        with monkeypatch.context() as patched:
            patched.setattr(apply_module.pins, "pin_replacing", pin_some)
            with pytest.raises(Killed):
                apply(enforcer, policy)
        assert len(attachments(scratch_cgroup.path, HOOKS)) == 3
        drift = audit_drift(bpf_dir, scratch_cgroup)
        assert {d["problem"] for d in drift} >= {"interrupted"}, drift

        apply_ok(enforcer, policy)
        assert len(attachments(scratch_cgroup.path, HOOKS)) == len(HOOKS)
        assert audit_drift(bpf_dir, scratch_cgroup) == []
        expect(scratch_cgroup, [(("connect", "tcp", "127.0.0.6", port), EPERM)])
    finally:
        remove(enforcer, "half")
    assert attachments(scratch_cgroup.path, HOOKS) == {}


def test_remove_undoes_a_policy_killed_before_any_metadata(
    scratch_cgroup, bpf_dir: Path, cgroup_root: Path, tmp_path: Path, monkeypatch
) -> None:
    policy = deny_connect_to(tmp_path, scratch_cgroup.relative, "127.0.0.6")
    enforcer = Enforcer(cgroup_root, bpf_dir)
    with monkeypatch.context() as patched:
        patched.setattr(pins, "write_meta", lambda *_: (_ for _ in ()).throw(Killed()))
        with pytest.raises(Killed):
            apply(enforcer, policy)
    assert len(attachments(scratch_cgroup.path, HOOKS)) == len(HOOKS)
    removed = run_cli("--bpf-dir", bpf_dir, "remove", "half", check=True)
    assert "half: remove" in removed.stdout
    assert attachments(scratch_cgroup.path, HOOKS) == {}
    assert not (bpf_dir / "half").exists()


def test_an_update_killed_between_link_swaps_is_interrupted_not_drift(
    scratch_cgroup, bpf_dir: Path, cgroup_root: Path, tmp_path: Path, monkeypatch, loopback_ports
) -> None:
    """Found by killing `apply` at every bpf() call: after 2 of 5 links had moved to the
    new programs, audit called it `stale` (as if changed from outside) and labelled the
    new programs' counters with the old rules. New programs are now pinned before any link
    moves, so such a state is `interrupted`, and counters are not given old rule texts."""
    port = loopback_ports.ports[0]
    v1 = deny_connect_to(tmp_path, scratch_cgroup.relative, "127.0.0.5")
    v2 = deny_connect_to(tmp_path, scratch_cgroup.relative, "127.0.0.6")
    enforcer = Enforcer(cgroup_root, bpf_dir)
    real_update = apply_module.CgroupLink.update
    swaps = []

    def update_some(link, *args):  # type: ignore[no-untyped-def]
        if len(swaps) == 2:
            raise Killed
        swaps.append(link)
        return real_update(link, *args)

    try:
        apply_ok(enforcer, v1)
        with monkeypatch.context() as patched:
            patched.setattr(apply_module.CgroupLink, "update", update_some)
            with pytest.raises(Killed):
                apply(enforcer, v2)
        done = run_cli("--bpf-dir", bpf_dir, "audit", "--cgroup", scratch_cgroup.relative, "--json")
        assert done.returncode == 3, done
        (report,) = [
            c for c in json.loads(done.stdout)["cgroups"] if c["path"] == scratch_cgroup.relative
        ]
        assert {d["problem"] for d in report["drift"]} >= {"interrupted"}, report["drift"]
        texts = [
            rule["text"]
            for attachment in report["attachments"]
            for rule in (attachment.get("counters") or {}).get("rules", [])
        ]
        assert not any(text and "127.0.0.5" in text for text in texts), texts

        reapply_v1(enforcer, v1, bpf_dir, scratch_cgroup, port)
    finally:
        remove(enforcer, "half")
