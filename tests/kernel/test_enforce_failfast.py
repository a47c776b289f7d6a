"""Denials that fail fast (issue 13, part 4): a TCP or UDP connect(), or an unconnected UDP
sendmsg(), that network.egress is certain to deny fails at once with EPERM (the connect
checks, bpf/net.c cgp_egress_at_connect) instead of its packets being dropped; everything
else is left to the packet program. Real processes in a scratch cgroup on loopback; the
probe's ``connect-now`` is a non-blocking connect(), so a refusal is told from a dropped
SYN by the errno of the call itself, never by a time.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from enforcement import (
    ALLOWED,
    EPERM,
    ETIMEDOUT,
    enforced,
    expect,
    kill_and_remove_cgroup,
    remove,
    run_cli,
)
from netns import PROBE_EXTRA
from policy_builders import policy_file
from test_audit import cgpolicy  # tests/kernel is on sys.path (rootdir conftest)

from cgpolicy.contract import EGRESS_AT_CONNECT
from cgpolicy.enforcer.engine import Enforcer
from cgpolicy.kernel.applied import read_counters, read_named
from cgpolicy.kernel.bpf import CgroupLink

NOW = "connect-now"


def egress(rules: list[dict[str, Any]], default: str = "deny", **more: Any) -> dict[str, Any]:
    return {"network": {"egress": {"default": default, "rules": rules, **more}}}


def loopback_rules(p1: int, p2: int) -> list[dict[str, Any]]:
    """Rule 0..5 in canonical order is not what matters here: counters are read by text."""
    return [
        {"action": "allow", "protocol": "tcp", "cidrs": ["127.0.0.0/8", "::1"], "ports": [p1]},
        {"action": "allow", "protocol": "udp", "cidrs": ["127.0.0.0/8", "::1"], "ports": [p1]},
        {"action": "deny", "cidrs": ["127.0.0.3/32"]},
        # deny rules naming interfaces cannot be known at connect: they only drop
        {"action": "deny", "cidrs": ["127.0.0.4/32"], "interfaces": ["lo"]},
        # an allow rule naming an interface may match: not refused at connect
        {"action": "allow", "protocol": "tcp", "cidrs": ["127.0.0.5/32"], "interfaces": ["lo"]},
        # written in the mapped form: an IPv4 packet never meets it
        {"action": "allow", "protocol": "tcp", "cidrs": ["::ffff:127.0.0.0/104"], "ports": [p2]},
    ]


def egress_counters(bpf_dir: Path, name: str) -> dict[str, Any]:
    """The egress program's counters, by rule text, and the default's."""
    applied = read_named(bpf_dir, name)
    prog_id = applied.hooks["egress"].prog_id
    assert prog_id
    counters = read_counters(prog_id, applied, "egress")
    assert counters is not None
    by_text = {rule["text"]: (rule["allowed"], rule["denied"]) for rule in counters["rules"]}
    return {**by_text, "default": (counters["default"]["allowed"], counters["default"]["denied"])}


def events(bpf_dir: Path) -> list[dict[str, Any]]:
    done = cgpolicy(bpf_dir, "events", "--json")
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def test_connects_egress_surely_denies_fail_at_once(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path, loopback_ports
):
    p0, p1, p2, *_ = loopback_ports.ports
    path = policy_file(tmp_path, "fast", [scratch_cgroup.relative], egress(loopback_rules(p1, p2)))
    with enforced(cgroup_root, bpf_dir, path):
        expect(
            scratch_cgroup,
            [
                # allowed: unaffected
                (("connect", "tcp", "127.0.0.1", p1), ALLOWED),
                (("connect", "tcp", "::1", p1), ALLOWED),
                (("connect", "tcp", "::ffff:127.0.0.1", p1), ALLOWED),
                (("connect", "udp", "127.0.0.1", p1), ALLOWED),
                (("connect", "udp", "::1", p1), ALLOWED),
                (("sendto", "127.0.0.2", p1), ALLOWED),
                # a deny rule: refused by the call itself, TCP and UDP, both families
                ((NOW, "tcp", "127.0.0.3", p1), EPERM),
                ((NOW, "udp", "127.0.0.3", p1), EPERM),
                ((NOW, "tcp", "::ffff:127.0.0.3", p1), EPERM),  # the IPv4 packet it becomes
                ((NOW, "udp", "::ffff:127.0.0.3", p1), EPERM),
                (("connect", "tcp", "127.0.0.3", p1), EPERM),  # at once, no timeout
                # the default
                ((NOW, "tcp", "127.0.0.1", p0), EPERM),
                ((NOW, "udp", "127.0.0.1", p0), EPERM),
                ((NOW, "tcp", "::1", p0), EPERM),
                ((NOW, "udp", "::1", p2), EPERM),
                (("sendto", "127.0.0.1", p0), EPERM),
                # mapped-form CIDRs do not allow the IPv4 packet, so not the connect either
                ((NOW, "tcp", "::ffff:127.0.0.1", p2), EPERM),
                # a deny rule with interfaces: not refused at connect, the SYN is dropped
                ((NOW, "tcp", "127.0.0.4", p1), ALLOWED),
                (("connect", "tcp", "127.0.0.4", p1), ETIMEDOUT),
                # an allow rule with interfaces that matches: not refused, and connects
                ((NOW, "tcp", "127.0.0.5", p2), ALLOWED),
                (("connect", "tcp", "127.0.0.5", p2), ALLOWED),
                # the any address: the kernel picks a local one, so it is not judged here
                ((NOW, "tcp", "0.0.0.0", p0), ALLOWED),
            ],
        )


def test_refusals_count_and_report_as_the_egress_rule_once(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path, loopback_ports
):
    p0, p1, p2, *_ = loopback_ports.ports
    path = policy_file(
        tmp_path, "fastcount", [scratch_cgroup.relative], egress(loopback_rules(p1, p2))
    )
    deny = "deny any to 127.0.0.3/32"
    with enforced(cgroup_root, bpf_dir, path):
        before = egress_counters(bpf_dir, "fastcount")
        assert before[deny] == (0, 0) and before["default"] == (0, 0)
        expect(
            scratch_cgroup,
            [
                ((NOW, "tcp", "127.0.0.3", p1), EPERM),
                ((NOW, "udp", "::ffff:127.0.0.3", p1), EPERM),
                (("sendto", "127.0.0.3", p1), EPERM),
                ((NOW, "tcp", "::1", p0), EPERM),
            ],
        )
        after = egress_counters(bpf_dir, "fastcount")
        # each refusal once, on the rule or default that decided; nothing was sent
        assert after[deny] == (0, 3), after
        assert after["default"] == (0, 1), after
        found = [e for e in events(bpf_dir) if e["policy"] == "fastcount"]
    assert sorted((e["dst"], e["refused_at"]) for e in found) == [
        ("127.0.0.3", "connect"),
        ("127.0.0.3", "connect"),
        ("127.0.0.3", "sendmsg"),
        ("::1", "connect"),
    ], found
    for e in found:
        assert e["hook"] == "egress" and e["action"] == "deny"
        assert e["cgroup"] == scratch_cgroup.relative and e["pid"] > 0
        assert e["comm"].startswith("python")
    by_dst = {(e["dst"], e["protocol"]): e for e in found}
    assert by_dst["127.0.0.3", "tcp"]["rule_text"].startswith(deny)
    assert (
        by_dst["127.0.0.3", "tcp"]["dport"] == p1 and by_dst["127.0.0.3", "tcp"]["family"] == "inet"
    )
    assert by_dst["::1", "tcp"]["rule"] == "default"
    assert by_dst["::1", "tcp"]["rule_text"] == "section default"


def test_audit_mode_refuses_nothing_at_connect_and_counts_once(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path, loopback_ports
):
    p0, p1, p2, *_ = loopback_ports.ports
    path = policy_file(
        tmp_path, "fastaudit", [scratch_cgroup.relative], egress(loopback_rules(p1, p2)), "audit"
    )
    deny = "deny any to 127.0.0.3/32"
    with enforced(cgroup_root, bpf_dir, path):
        assert not {*read_named(bpf_dir, "fastaudit").hooks} & {*EGRESS_AT_CONNECT}
        expect(scratch_cgroup, [(("sendto", "127.0.0.3", p1), ALLOWED)])
        # the one datagram sent, once, as a would-be denial of the packet; none at sendmsg
        assert egress_counters(bpf_dir, "fastaudit")[deny] == (0, 1)
        expect(
            scratch_cgroup,
            [
                ((NOW, "tcp", "127.0.0.3", p1), ALLOWED),
                ((NOW, "udp", "127.0.0.1", p0), ALLOWED),
                (("connect", "tcp", "127.0.0.1", p0), ALLOWED),
            ],
        )


def test_with_sockets_connect_both_hold_and_audit_shows_them_in_sync(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path, loopback_ports
):
    p0, p1, p2, *_ = loopback_ports.ports
    body = egress(loopback_rules(p1, p2))
    body["sockets"] = {
        "connect": {"default": "allow", "rules": [{"action": "deny", "cidrs": ["127.0.0.9/32"]}]}
    }
    path = policy_file(tmp_path, "fastboth", [scratch_cgroup.relative], body)
    with enforced(cgroup_root, bpf_dir, path):
        expect(
            scratch_cgroup,
            [
                (("connect", "tcp", "127.0.0.1", p1), ALLOWED),
                ((NOW, "tcp", "127.0.0.9", p1), EPERM),  # sockets.connect
                ((NOW, "tcp", "127.0.0.3", p1), EPERM),  # network.egress
                ((NOW, "tcp", "127.0.0.1", p0), EPERM),  # network.egress default
            ],
        )
        done = cgpolicy(bpf_dir, "audit", "--cgroup", scratch_cgroup.relative, "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads(done.stdout)
        mine = next(c for c in report["cgroups"] if c["path"] == scratch_cgroup.relative)
        assert mine["drift"] == []
        ours = {
            (a["hook"], a["prog_name"]) for a in mine["attachments"] if a["policy"] == "fastboth"
        }
        assert {
            ("connect4", "cgp_connect4"),
            ("connect4", "cgp_eg_connect4"),
            ("connect6", "cgp_eg_connect6"),
            ("sendmsg4", "cgp_eg_sendmsg4"),
            ("sendmsg6", "cgp_eg_sendmsg6"),
            ("egress", "cgp_egress"),
        } <= ours, ours
        checks = [a for a in mine["attachments"] if a["prog_name"].startswith("cgp_eg_")]
        assert all(a["counters"] is None for a in checks)  # counted as egress
        plan = cgpolicy(bpf_dir, "plan", str(path))
        assert plan.returncode == 0 and "fastboth: unchanged" in plan.stdout, plan.stdout

        # a connect check detached behind cgpolicy's back is drift, by its own slot
        cgroup_id = os.stat(scratch_cgroup.path).st_ino
        pin = bpf_dir / "fastboth" / "egress@connect4" / f"link-{cgroup_id}"
        with CgroupLink.from_pin(pin) as link:
            link.detach()
        done = cgpolicy(bpf_dir, "audit", "--cgroup", scratch_cgroup.relative, "--json")
        assert done.returncode == 3, done.stdout + done.stderr
        drift = json.loads(done.stdout)["cgroups"][0]["drift"]
        assert [(d["hook"], d["problem"]) for d in drift] == [("egress@connect4", "missing")]
        expect(scratch_cgroup, [((NOW, "tcp", "127.0.0.3", p1), ALLOWED)])  # only dropped now


def test_fail_fast_off_only_drops_and_switching_it_moves_the_checks(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path, loopback_ports
):
    p0, p1, p2, *_ = loopback_ports.ports
    on = policy_file(tmp_path, "slow", [scratch_cgroup.relative], egress(loopback_rules(p1, p2)))
    body = egress(loopback_rules(p1, p2), failFast=False)
    off = policy_file(tmp_path, "slow", [scratch_cgroup.relative], body)
    audit = policy_file(
        tmp_path, "slow", [scratch_cgroup.relative], egress(loopback_rules(p1, p2)), "audit"
    )

    def in_sync() -> None:
        done = cgpolicy(bpf_dir, "audit", "--cgroup", scratch_cgroup.relative, "--json")
        assert done.returncode == 0, done.stdout + done.stderr

    with enforced(cgroup_root, bpf_dir, on):
        assert {*EGRESS_AT_CONNECT} <= {*read_named(bpf_dir, "slow").hooks}
        expect(scratch_cgroup, [((NOW, "tcp", "127.0.0.3", p1), EPERM)])
        for turned in (off, audit):
            done = run_cli("--bpf-dir", bpf_dir, "apply", turned)
            assert done.returncode == 0, done.stdout + done.stderr
            assert "detach egress@connect4" in done.stdout, done.stdout
            assert not {*read_named(bpf_dir, "slow").hooks} & {*EGRESS_AT_CONNECT}
            assert not any((bpf_dir / "slow" / slot).exists() for slot in EGRESS_AT_CONNECT)
            in_sync()
            expect(scratch_cgroup, [((NOW, "tcp", "127.0.0.3", p1), ALLOWED)])
            done = run_cli("--bpf-dir", bpf_dir, "apply", on)
            assert "attach egress@connect4" in done.stdout, done.stdout
            in_sync()
            expect(scratch_cgroup, [((NOW, "tcp", "127.0.0.3", p1), EPERM)])
        run_cli("--bpf-dir", bpf_dir, "apply", off, check=True)
        expect(scratch_cgroup, [(("connect", "tcp", "127.0.0.3", p1), ETIMEDOUT)])
        assert egress_counters(bpf_dir, "slow")["deny any to 127.0.0.3/32"][1] >= 1


def test_cgpolicy_run_of_a_client_to_a_denied_destination_exits_with_eperm(
    cgroup_root, bpf_dir, tmp_path, loopback_ports
):
    """The issue's scenario: `cgpolicy run POLICY -- CLIENT` where network.egress denies the
    destination: the client's connect fails with EPERM, and run returns its exit status."""
    port = loopback_ports.ports[1]
    name = f"runfast{os.getpid()}"
    path = policy_file(
        tmp_path,
        name,
        ["unused/replaced-by-run"],
        egress([{"action": "deny", "protocol": "tcp", "cidrs": ["127.0.0.6/32"]}], "allow"),
    )
    client = [sys.executable, str(PROBE_EXTRA), "connect", "tcp"]
    run_parent = cgroup_root / "cgpolicy.run"
    try:
        denied = run_cli("--bpf-dir", bpf_dir, "run", path, "--", *client, "127.0.0.6", port)
        assert denied.returncode == 1, denied  # the client's own failure status
        assert json.loads(denied.stdout.strip().splitlines()[-1])["errno"] == EPERM, denied
        allowed = run_cli("--bpf-dir", bpf_dir, "run", path, "--", *client, "127.0.0.1", port)
        assert allowed.returncode == 0, allowed
    finally:
        if run_parent.exists():
            for stale in run_parent.glob(f"{name}-*"):
                kill_and_remove_cgroup(stale)
        enforcer = Enforcer(cgroup_root, bpf_dir)
        remove(enforcer, *enforcer.observe())


# A UDP socket made here (in the cgroup the process starts in), then the process moves to
# the cgroup named by argv[1] and connects it to argv[2]:argv[3] (UDP: nothing is sent).
MOVE_THEN_CONNECT = """
import errno, json, socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
with open(sys.argv[1] + "/cgroup.procs", "w") as procs:
    procs.write("0")
code = sock.connect_ex((sys.argv[2], int(sys.argv[3])))
print(json.dumps({"errno": code}))
"""


def test_fqdns_allow_fails_fast_until_the_address_is_learned(
    scratch_cgroup, bpf_dir, cgroup_root, tmp_path, dns_server
):
    """egress default deny, DNS to the server allowed, UDP by name to api.test: a connect
    is refused at once until an answer taught the target the address, then goes through.
    A socket of the target connected by a process outside every target is not refused at
    connect: what its own target learned decides its packets."""
    from dns_responder import run_client

    target, outside = scratch_cgroup.child("target"), scratch_cgroup.child("outside")
    rules = [
        {"action": "allow", "protocol": "udp", "cidrs": [dns_server.address], "ports": [53]},
        {"action": "allow", "protocol": "udp", "fqdns": ["api.test"], "ports": [443]},
    ]
    path = policy_file(tmp_path, "fastnames", [target.relative], egress(rules))
    learned, unlearned = "198.51.100.7", "198.51.100.9"  # api.test's A, and a neighbour
    with enforced(cgroup_root, bpf_dir, path):
        expect(target, [((NOW, "udp", learned, 443), EPERM)])
        run_client(target, "resolve", dns_server.address, "api.test")
        expect(
            target,
            [
                ((NOW, "udp", learned, 443), ALLOWED),
                ((NOW, "udp", learned, 444), EPERM),  # not the rule's port
                ((NOW, "udp", unlearned, 443), EPERM),
            ],
        )
        moved = target.run(
            [sys.executable, "-c", MOVE_THEN_CONNECT, str(outside.path), unlearned, "443"]
        )
        assert moved.returncode == 0, moved.stderr
        assert json.loads(moved.stdout)["errno"] != EPERM, moved.stdout  # 0, or no route
