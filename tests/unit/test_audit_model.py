"""Audit decisions without a kernel: owner, attach mode, inheritance, drift; and the decoding
of deny event records."""

from __future__ import annotations

import socket
import struct

import pytest

from cgpolicy.audit.model import (
    BPF_F_ALLOW_MULTI,
    BPF_F_ALLOW_OVERRIDE,
    AppliedView,
    Attachment,
    HookState,
    OurProgram,
    attach_mode,
    classify_owner,
    compute_drift,
    effective_programs,
)
from cgpolicy.contract import EVENT
from cgpolicy.events.decode import decode

OURS = {10: OurProgram("web", "egress", "rev1"), 11: OurProgram("web", "egress", None, False)}


@pytest.mark.parametrize(
    ("prog_id", "name", "expected"),
    [
        (10, "cgp_egress", ("cgpolicy", "web", "rev1")),
        (11, "cgp_egress", ("cgpolicy", "web", None)),  # held by our link, not the current pin
        (12, "cgp_egress", ("cgpolicy", None, None)),  # cgpolicy's, from another bpf dir
        (13, "sd_fw_egress", ("systemd", None, None)),
        (14, "sd_devices", ("systemd", None, None)),
        (15, "", ("unknown", None, None)),
        (16, "cilium_sock", ("unknown", None, None)),
    ],
)
def test_owner(prog_id: int, name: str, expected: tuple) -> None:
    assert classify_owner(prog_id, name, OURS) == expected


def test_attach_mode() -> None:
    assert attach_mode(True, BPF_F_ALLOW_MULTI) == "link"
    assert attach_mode(False, BPF_F_ALLOW_MULTI) == "legacy multi"
    assert attach_mode(False, BPF_F_ALLOW_OVERRIDE) == "legacy override"
    assert attach_mode(False, 0) == "legacy exclusive"


def test_effective_multi_collects_every_level() -> None:
    chain = [
        HookState(BPF_F_ALLOW_MULTI, (1,)),
        None,
        HookState(BPF_F_ALLOW_MULTI, (2, 3)),
    ]
    assert effective_programs(chain) == [(0, 1), (2, 2), (2, 3)]


def test_effective_override_hides_non_multi_ancestors() -> None:
    # The child overrides; the parent allowed override (not multi): only the child's runs.
    chain = [HookState(0, (5,)), HookState(BPF_F_ALLOW_OVERRIDE, (6,))]
    assert effective_programs(chain) == [(0, 5)]
    # Nothing on the child: the parent's program is inherited.
    assert effective_programs([None, HookState(BPF_F_ALLOW_OVERRIDE, (6,))]) == [(1, 6)]
    # Multi above an override still runs.
    chain = [HookState(0, (5,)), HookState(BPF_F_ALLOW_MULTI, (7,))]
    assert effective_programs(chain) == [(0, 5), (1, 7)]


def _att(prog_id: int, policy: str | None, name: str = "cgp_egress", owner="cgpolicy"):
    return Attachment("egress", prog_id, name, "t", "link", owner, policy)


def _view(**kw) -> AppliedView:
    base = dict(
        name="web",
        revision="rev1",
        hooks={"egress": 10},
        cgroups={100: "a", 200: "b"},
        links={("egress", 100): 10, ("egress", 200): 10},
    )
    base.update(kw)
    return AppliedView(**base)


EXISTING = {100: "a", 200: "b", 300: "c"}


def test_in_sync() -> None:
    own = {100: {"egress": [_att(10, "web")]}, 200: {"egress": [_att(10, "web")]}}
    assert compute_drift([_view()], own, EXISTING) == {}


def test_missing_and_stale() -> None:
    own = {
        100: {"egress": [_att(99, "unknown-name", "foreign", "unknown")]},  # ours detached
        200: {"egress": [_att(11, "web")]},  # our link holds an older program
    }
    drift = compute_drift([_view(links={("egress", 100): 0, ("egress", 200): 11})], own, EXISTING)
    assert [d.problem for d in drift[100]] == ["missing"]
    assert [d.problem for d in drift[200]] == ["stale"]
    assert drift[100][0].policy == "web" and drift[100][0].hook == "egress"


def test_unexpected_and_orphaned() -> None:
    own = {
        100: {"egress": [_att(10, "web")]},
        300: {"egress": [_att(10, "web")]},  # our program where the policy does not want it
    }
    existing = {100: "a", 300: "c"}  # cgroup 200 is gone
    drift = compute_drift([_view()], own, existing)
    assert [d.problem for d in drift[300]] == ["unexpected"]
    assert [d.problem for d in drift[200]] == ["orphaned"]
    assert 100 not in drift


def test_out_of_scope_is_not_reported() -> None:
    own = {100: {"egress": []}}
    drift = compute_drift([_view()], own, EXISTING, in_scope={100: "a"})
    assert set(drift) == {100}


def test_foreign_cgp_program_elsewhere_is_not_drift() -> None:
    own = {300: {"egress": [_att(77, None)]}}
    assert compute_drift([], own, EXISTING) == {}


def _record(**fields) -> bytes:
    values = dict(
        time_ns=1_000,
        cgroup_id=42,
        pid=7,
        tid=8,
        hook=6,
        rule=0,
        flags=2,
        family=socket.AF_INET,
        type=1,
        protocol=6,
        major=0,
        minor=0,
        access=0,
        sport=0,
        dport=80,
        saddr=b"",
        daddr=bytes([169, 254, 169, 254]),
        comm=b"curl",
        name=b"",
    )
    values.update(fields)
    return EVENT.pack(**values)


def test_decode_connect() -> None:
    assert EVENT.size == 240  # sizeof(struct cgp_event)
    event = decode(_record(), wall_offset_ns=5)
    assert event.time_ns == 1_005
    assert (event.hook, event.rule, event.audit, event.pid, event.comm) == (
        "connect4",
        0,
        False,
        7,
        "curl",
    )
    assert event.what == {
        "family": "inet",
        "socket_type": "stream",
        "protocol": "tcp",
        "address": "169.254.169.254",
        "port": 80,
    }
    assert event.describe() == "connect tcp 169.254.169.254:80"
    data = event.to_json()
    assert data["action"] == "deny" and data["cgroup_id"] == 42


def test_decode_device_sysctl_skb_audit() -> None:
    device = decode(_record(hook=10, type=2, major=1, minor=7, access=6, rule=64, flags=3))
    assert device.what == {"device_type": "char", "major": 1, "minor": 7, "access": "rw"}
    assert device.audit and device.to_json()["rule"] == "default"
    assert device.to_json()["action"] == "would-deny"
    sysctl = decode(_record(hook=11, flags=2 | 4, name=b"net/ipv4/ip_forward"))
    assert sysctl.what == {"name": "net/ipv4/ip_forward", "access": "write", "truncated": False}
    six = socket.inet_pton(socket.AF_INET6, "fd00::1")
    skb = decode(
        _record(hook=2, flags=0, family=socket.AF_INET6, protocol=17, sport=5, saddr=six, daddr=six)
    )
    assert skb.pid is None and skb.comm is None
    assert skb.what["src"] == "fd00::1" and skb.what["protocol"] == "udp"
    assert skb.describe() == "egress udp fd00::1:5 -> fd00::1:80"


def test_decode_refuses_short_records() -> None:
    with pytest.raises(ValueError):
        decode(struct.pack("<Q", 1))
