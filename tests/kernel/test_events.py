"""Deny events on the real kernel: one event per denied connect, device open and sysctl
write with the right fields; would-deny events in audit mode while the actions succeed; the
per-CPU rate limit under a flood, with the dropped count reported; and, by
BPF_PROG_TEST_RUN, one event per denial until the limit and none past it. What the deny path
costs per packet is measured by `make bench` (verdict_ns.ipv4.deny_*), not here."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from policy_builders import egress_policy, net, policy_file
from test_audit import cgpolicy  # tests/kernel is on sys.path (rootdir conftest)
from test_programs_testrun import ipv4, tcp

from cgpolicy.compiler.compile import compile_policy
from cgpolicy.compiler.maps import EVENTS_PER_SECOND
from cgpolicy.contract import RATELIMIT
from cgpolicy.events.decode import decode
from cgpolicy.kernel.loader import load_program
from cgpolicy.kernel.ringbuf import RingBuffer
from cgpolicy.policy.model import NetworkRule

SYSCTL = "net/ipv4/ip_forward"


def events(bpf_dir: Path) -> list[dict[str, Any]]:
    done = cgpolicy(bpf_dir, "events", "--json")
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def body(port: int) -> dict[str, Any]:
    return {
        "sockets": {
            "connect": {
                "default": "allow",
                "rules": [
                    {
                        "action": "deny",
                        "protocol": "tcp",
                        "cidrs": ["127.0.0.1/32"],
                        "ports": [port],
                    }
                ],
            }
        },
        "devices": {
            "default": "allow",
            "rules": [{"action": "deny", "type": "char", "major": 1, "minor": 7, "access": "w"}],
        },
        "sysctl": {
            "default": "allow",
            "rules": [{"action": "deny", "name": "net.ipv4.ip_forward", "access": "write"}],
        },
    }


def sysctl_write(cgroup) -> tuple[bool, int]:
    """One write() of the sysctl's current value (so audit mode changes nothing)."""
    value = Path(f"/proc/sys/{SYSCTL}").read_text().strip()
    script = (
        "import os, sys\n"
        f"fd = os.open('/proc/sys/{SYSCTL}', os.O_WRONLY)\n"
        "try:\n"
        f"    os.write(fd, b'{value}')\n"
        "except PermissionError:\n"
        "    sys.exit(1)\n"
    )
    done = cgroup.run([sys.executable, "-c", script])
    return done.returncode == 0, os.getpid()


def _run(mode: str, scratch_cgroup, bpf_dir, tmp_path, tcp_server) -> list[dict[str, Any]]:
    policy = policy_file(
        tmp_path, f"ev-{mode}", [scratch_cgroup.relative], body(tcp_server.port), mode
    )
    done = cgpolicy(bpf_dir, "apply", str(policy))
    assert done.returncode == 0, done.stderr
    expect_ok = mode == "audit"
    assert scratch_cgroup.probe("connect", "tcp", "127.0.0.1", tcp_server.port).ok == expect_ok
    assert scratch_cgroup.probe("open", "/dev/full", "w").ok == expect_ok
    assert sysctl_write(scratch_cgroup)[0] == expect_ok
    # Allowed actions make no events.
    assert scratch_cgroup.probe("open", "/dev/null", "rw").ok
    return events(bpf_dir)


def _check(found: list[dict[str, Any]], scratch_cgroup, action: str, policy: str) -> None:
    assert [e["hook"] for e in found] == ["connect4", "device", "sysctl"], found
    cgroup_id = os.stat(scratch_cgroup.path).st_ino
    for e in found:
        assert e["type"] == "event" and e["action"] == action and e["policy"] == policy
        assert e["cgroup_id"] == cgroup_id and e["cgroup"] == scratch_cgroup.relative
        assert e["rule"] == 0 and e["rule_text"]
        assert e["pid"] > 0 and e["comm"].startswith("python")
        assert abs(e["time_ns"] / 1e9 - time.time()) < 60
    connect, device, sysctl = found
    assert (connect["family"], connect["protocol"], connect["address"]) == (
        "inet",
        "tcp",
        "127.0.0.1",
    )
    assert connect["socket_type"] == "stream" and connect["port"] > 0
    assert (device["device_type"], device["major"], device["minor"], device["access"]) == (
        "char",
        1,
        7,
        "w",
    )
    assert (sysctl["name"], sysctl["access"], sysctl["truncated"]) == (SYSCTL, "write", False)


def test_denials_make_one_event_each(scratch_cgroup, bpf_dir, tmp_path, tcp_server) -> None:
    found = _run("enforce", scratch_cgroup, bpf_dir, tmp_path, tcp_server)
    _check(found, scratch_cgroup, "deny", "ev-enforce")
    assert events(bpf_dir) == []  # reading consumed them
    line = cgpolicy(bpf_dir, "events")
    assert line.returncode == 0 and line.stdout == ""


def test_audit_mode_makes_would_deny_events(scratch_cgroup, bpf_dir, tmp_path, tcp_server) -> None:
    found = _run("audit", scratch_cgroup, bpf_dir, tmp_path, tcp_server)
    _check(found, scratch_cgroup, "would-deny", "ev-audit")


def test_readable_line(scratch_cgroup, bpf_dir, tmp_path, tcp_server) -> None:
    policy = policy_file(tmp_path, "lines", [scratch_cgroup.relative], body(tcp_server.port))
    assert cgpolicy(bpf_dir, "apply", str(policy)).returncode == 0
    assert not scratch_cgroup.probe("connect", "tcp", "127.0.0.1", tcp_server.port).ok
    done = cgpolicy(bpf_dir, "events")
    (line,) = done.stdout.splitlines()
    assert f" DENY lines {scratch_cgroup.relative} connect tcp 127.0.0.1:{tcp_server.port} " in line
    assert "[rule 0 (deny tcp to 127.0.0.1/32 port" in line and "pid " in line


FLOOD = 3000
FLOOD_SCRIPT = f"""
import os, socket
os.sched_setaffinity(0, {{0}})  # one CPU: one rate-limit window
for _ in range({FLOOD}):
    try:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()
    except PermissionError:
        pass
"""


def test_flood_is_rate_limited_and_drops_counted(scratch_cgroup, bpf_dir, tmp_path) -> None:
    rule = {"action": "deny", "family": "inet", "type": "dgram"}
    denied = {"sockets": {"create": {"default": "allow", "rules": [rule]}}}
    policy = policy_file(tmp_path, "flood", [scratch_cgroup.relative], denied)
    assert cgpolicy(bpf_dir, "apply", str(policy)).returncode == 0
    done = scratch_cgroup.run([sys.executable, "-c", FLOOD_SCRIPT])
    assert done.returncode == 0, done.stderr
    lines = events(bpf_dir)
    emitted = [e for e in lines if e["type"] == "event"]
    dropped = [e for e in lines if e["type"] == "dropped"]
    assert dropped == [
        {"type": "dropped", "policy": "flood", "hook": "sock_create", "count": FLOOD - len(emitted)}
    ]
    # One CPU, so one series of rate-limit windows, each at least a second long: events
    # stamped over S seconds fell in at most int(S) + 2 of them. (The windows go by the
    # coarse clock, which lags the events' stamps by less than a tick: 10 ms at HZ=100.)
    stamps = sorted(e["time_ns"] for e in emitted)
    windows = int((stamps[-1] - stamps[0]) / 1e9 + 0.01) + 2
    assert EVENTS_PER_SECOND <= len(emitted) <= EVENTS_PER_SECOND * windows
    assert {(e["hook"], e["family"], e["socket_type"]) for e in emitted} == {
        ("sock_create", "inet", "dgram")
    }
    audit = json.loads(
        cgpolicy(bpf_dir, "audit", "--json", "--cgroup", scratch_cgroup.relative).stdout
    )
    (create,) = [
        a for c in audit["cgroups"] for a in c["attachments"] if a["hook"] == "sock_create"
    ]
    assert create["counters"]["rules"][0]["denied"] == FLOOD
    assert create["counters"]["events_dropped"] == FLOOD - len(emitted)


# --- the deny path by BPF_PROG_TEST_RUN -----------------------------------------------------

BATCH = 1000  # runs per test_run while every run emits an event: well within the ring


def window(limit: int) -> bytes:
    """A fresh struct cgp_ratelimit: ``limit`` events a second per CPU may go out."""
    return RATELIMIT.pack(window_start=0, dropped=0, sent=0, limit=limit)


def test_deny_path_emits_an_event_per_denial_until_the_rate_limit(kernel_ready) -> None:
    """The egress program run by the kernel: allowing emits nothing; past the rate limit each
    denial is counted as dropped and emits nothing; below it each denial emits one event that
    decodes to what was denied."""
    policy = egress_policy("allow", NetworkRule("deny", net("10.0.0.0/8")))
    spec = next(s for s in compile_policy(policy).programs if s.hook == "egress")
    allow_pkt = ipv4("192.0.2.1", "192.0.2.2", 6, tcp(443))
    deny_pkt = ipv4("192.0.2.1", "10.1.2.3", 6, tcp(443))
    with load_program(spec) as loaded:
        ring = RingBuffer(loaded.maps.pop("events"))
        ratelimit = loaded.maps["ratelimit"]  # per CPU: an update sets every CPU's slot
        try:
            assert loaded.program.test_run(allow_pkt, repeat=BATCH).retval == 1
            assert list(ring.drain()) == []
            ratelimit.update(bytes(4), window(limit=0))  # no event may go out
            assert loaded.program.test_run(deny_pkt, repeat=BATCH).retval == 0
            assert list(ring.drain()) == []
            slots = ratelimit.lookup_per_cpu(bytes(4)) or []
            assert sum(RATELIMIT.unpack_from(slot)["dropped"] for slot in slots) == BATCH
            ratelimit.update(bytes(4), window(limit=1 << 31))  # every one may
            decoded = []
            for _ in range(5):
                assert loaded.program.test_run(deny_pkt, repeat=BATCH).retval == 0
                decoded += [decode(raw) for raw in ring.drain()]
        finally:
            ring.close()
    assert len(decoded) == 5 * BATCH
    assert {(e.hook, e.rule, e.audit, e.what["dst"], e.what["dport"]) for e in decoded} == {
        ("egress", 0, False, "10.1.2.3", 443)
    }
