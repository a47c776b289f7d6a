"""What DNS names (`fqdns` rules, issue 12) show on the real kernel: `audit` lists the
learned name -> address entries per cgroup, `explain --cgroup` says which answer made an
address match (or that none did), deny events name the rule with its names, the service
deletes expired entries and exports the learned maps, and a full map fails closed and says
so in audit and metrics. A DNS responder of its own, on a loopback address no other test
file uses, answers from port 53 as a resolver does."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dns_responder import Responder, loopback_addresses, run_client
from enforcement import enforced, run_cli
from policy_builders import policy_file
from service import Daemon, links_at, running, wait_until

from cgpolicy.kernel.applied import read_learned, read_named

SERVER = loopback_addresses()[0]  # the address of the session's dns_server
API = "198.51.100.7"  # what the server answers for api.test
RACE = ["198.18.0.1", "198.18.0.2", "198.18.0.3"]  # r0.race.test, r1..., r2...


@pytest.fixture
def responder(dns_server: Responder) -> Responder:
    assert dns_server.address == SERVER
    return dns_server


def client(cgroup, rounds: int, template: str = "-", *addresses: str) -> list[list[str]]:
    """Resolve ``rounds`` names of ``template`` then connect to each answer at once, then to
    ``addresses``, from inside ``cgroup``: per step, the name, the address and "ok" or the
    errno name."""
    rows = []
    if rounds:
        rounds_flag = [] if rounds == 1 and "{}" not in template else ["--rounds", str(rounds)]
        rows += run_client(cgroup, "resolve", SERVER, template, *rounds_flag)
    if addresses:
        rows += run_client(cgroup, "connect", *addresses)
    return rows


def cgpolicy(bpf_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("--bpf-dir", bpf_dir, *args)


def connect_rules(*rules: dict[str, Any], default: str = "deny") -> dict[str, Any]:
    """sockets.connect with DNS to this file's responder allowed, and ``rules``."""
    dns = {"action": "allow", "protocol": "udp", "cidrs": [f"{SERVER}/32"], "ports": [53]}
    return {"sockets": {"connect": {"default": default, "rules": [dns, *rules]}}}


BY_NAME = {"action": "allow", "fqdns": ["api.test", "*.race.test"]}


def audit_dns(bpf_dir: Path, cgroup) -> list[dict[str, Any]]:
    done = cgpolicy(bpf_dir, "audit", "--cgroup", cgroup.relative, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)["dns"]


def test_audit_lists_what_each_cgroup_learned(
    cgroup_root, bpf_dir, scratch_cgroup, tmp_path, responder
) -> None:
    first, second = scratch_cgroup.child("first"), scratch_cgroup.child("second")
    targets = [first.relative, second.relative]  # each learns for itself
    policy = policy_file(tmp_path, "names", targets, connect_rules(BY_NAME))
    with enforced(cgroup_root, bpf_dir, policy):
        assert client(first, 1, "api.test") == [["api.test", API, "ok"]]
        assert client(second, 2, "r{}.race.test") == [
            ["r0.race.test", RACE[0], "ok"],
            ["r1.race.test", RACE[1], "ok"],
        ]
        (report,) = audit_dns(bpf_dir, scratch_cgroup)
        text = cgpolicy(bpf_dir, "audit", "--cgroup", scratch_cgroup.relative).stdout

    assert report["policy"] == "names"
    assert (report["entries"], report["live"], report["expired"]) == (3, 3, 0)
    assert report["capacity"] == 65536 and not report["full"]
    assert report["learned"] == 3 and report["refused_full"] == 0
    assert report["fails_closed"] is None
    seen = {(a["cgroup"], a["address"], a["name"]) for a in report["addresses"]}
    assert seen == {
        (first.relative, API, "api.test"),
        (second.relative, RACE[0], "*.race.test"),
        (second.relative, RACE[1], "*.race.test"),
    }
    for address in report["addresses"]:
        assert 0 < address["expires_in_s"] <= 300 and address["learned_ago_s"] >= 0
        (rule,) = address["rules"]
        assert rule["section"] == "sockets.connect"
        assert rule["text"] == "allow any to api.test,*.race.test (by DNS)"
        assert isinstance(rule["line"], int)  # where the rule is in the file
    assert f"  {first.relative} (id " in text
    assert f"    {API} via api.test: expires in " in text
    assert "sockets.connect rule 1 allow any to api.test,*.race.test (by DNS) (line " in text
    assert (
        "3/65536 entries (3 live); 3 learned, 0 refused because the map was full, 0 answers "
        "to no query noted (taught nothing)"
    ) in text
    assert "NOT LEARNED" not in text


def test_explain_says_which_answer_made_an_address_match(
    cgroup_root, bpf_dir, scratch_cgroup, tmp_path, responder
) -> None:
    """explain --cgroup agrees with the kernel: allowed where the target cgroup learned the
    address (and says from which answer), also for a cgroup below it; denied where it did
    not (and says so)."""
    first, second = scratch_cgroup.child("first"), scratch_cgroup.child("second")
    targets = [first.relative, second.relative]  # each learns for itself
    policy = policy_file(tmp_path, "names", targets, connect_rules(BY_NAME))
    action = ["connect", "tcp", f"{API}:443"]
    with enforced(cgroup_root, bpf_dir, policy):
        assert client(first, 1, "api.test") == [["api.test", API, "ok"]]
        assert client(second, 0, "-", API) == [["-", API, "EPERM"]]
        learned = cgpolicy(bpf_dir, "explain", "--cgroup", first.relative, *action)
        unknown = cgpolicy(bpf_dir, "explain", "--cgroup", second.relative, *action, "--json")
        mapped = cgpolicy(
            bpf_dir, "explain", "--cgroup", first.relative, "connect", "tcp", f"[::ffff:{API}]:443"
        )
        below = first.child("below")  # what its target learned counts for it
        assert client(below, 0, "-", API) == [["-", API, "ok"]]
        from_below = cgpolicy(bpf_dir, "explain", "--cgroup", below.relative, *action)
    files = cgpolicy(bpf_dir, "explain", str(policy), *action)

    assert from_below.returncode == 0, from_below.stderr
    assert f"  {API} via api.test, learned " in from_below.stdout
    assert from_below.stdout.rstrip().endswith("verdict: allow")

    assert learned.returncode == 0, learned.stderr
    assert "names (" in learned.stdout and ": allow" in learned.stdout
    assert f"  {API} via api.test, learned " in learned.stdout
    assert " s ago, expires in " in learned.stdout
    assert "allow any to api.test,*.race.test (by DNS)" in learned.stdout
    assert learned.stdout.rstrip().endswith("verdict: allow")

    report = json.loads(unknown.stdout)
    assert report["verdict"] == "deny"
    (item,) = report["policies"]
    assert item["decided_by"] == "default"
    assert item["dns"]["live"] is False and item["dns"]["name"] is None
    assert item["dns"]["text"] == (
        f"no live DNS answer for api.test, *.race.test taught this cgroup {API}"
    )

    # an IPv6 socket's IPv4-mapped address is the learned IPv4 one
    assert f"  {API} via api.test" in mapped.stdout and "verdict: allow" in mapped.stdout

    # from the file alone nothing is learned: said so
    assert "verdict: deny" in files.stdout
    assert "match only the addresses DNS answers taught a cgroup at run time" in files.stdout


def test_explain_a_connect_egress_allows_by_name_agrees_with_failfast(
    cgroup_root, bpf_dir, scratch_cgroup, tmp_path, responder
) -> None:
    """network.egress only, default deny, api.test by name: once the cgroup learned API
    the connect goes through (the connect check reads the learned entry), and explain
    --cgroup says allow; before, or for a cgroup that did not learn it, refused at once."""
    first, second = scratch_cgroup.child("first"), scratch_cgroup.child("second")
    dns = {"action": "allow", "protocol": "udp", "cidrs": [f"{SERVER}/32"], "ports": [53]}
    egress = {"default": "deny", "rules": [dns, BY_NAME]}
    policy = policy_file(
        tmp_path, "names", [first.relative, second.relative], {"network": {"egress": egress}}
    )
    action = ["connect", "tcp", f"{API}:443"]
    with enforced(cgroup_root, bpf_dir, policy):
        assert client(first, 1, "api.test") == [["api.test", API, "ok"]]
        assert client(second, 0, "-", API) == [["-", API, "EPERM"]]
        learned = cgpolicy(bpf_dir, "explain", "--cgroup", first.relative, *action)
        unknown = cgpolicy(bpf_dir, "explain", "--cgroup", second.relative, *action)
    assert learned.returncode == 0, learned.stderr
    assert f"  {API} via api.test, learned " in learned.stdout
    assert learned.stdout.rstrip().endswith("verdict: allow"), learned.stdout
    assert unknown.stdout.rstrip().endswith("verdict: deny"), unknown.stdout
    assert "refused at once (EPERM)" in unknown.stdout


def test_a_denial_by_a_name_rule_is_an_event_naming_the_rule(
    cgroup_root, bpf_dir, scratch_cgroup, tmp_path, responder
) -> None:
    deny = {"action": "deny", "fqdns": ["api.test"]}
    policy = policy_file(
        tmp_path, "names", [scratch_cgroup.relative], connect_rules(deny, default="allow")
    )
    with enforced(cgroup_root, bpf_dir, policy):
        assert client(scratch_cgroup, 1, "api.test") == [["api.test", API, "EPERM"]]
        done = cgpolicy(bpf_dir, "events", "--json")
    assert done.returncode == 0, done.stderr
    found = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    denials = [e for e in found if e.get("type") == "event" and e.get("address") == API]
    assert denials, found
    event = denials[0]
    assert event["policy"] == "names" and event["hook"] == "connect4"
    assert event["action"] == "deny" and event["rule"] == 1
    assert event["rule_text"].startswith("deny any to api.test (by DNS), line ")


SERVICE_POLICY = """\
apiVersion: cgpolicy.dev/v1
kind: CgroupPolicy
metadata: {{name: {name}}}
spec:
  targets: [{{glob: "{glob}"}}]
  dns: {dns}
  sockets:
    connect:
      default: deny
      rules:
        - {{action: allow, protocol: udp, cidrs: ["{server}/32"], ports: [53]}}
        - {{action: allow, fqdns: [api.test, "*.race.test"]}}
"""


@pytest.fixture
def daemon(tmp_path: Path, bpf_dir: Path) -> Iterator[Daemon]:
    with running(Daemon(tmp_path / "policies.d", bpf_dir, tmp_path / "daemon.log")) as service:
        yield service


def serve_policy(daemon: Daemon, scratch_cgroup, dns: str):  # type: ignore[no-untyped-def]
    """The service enforcing SERVICE_POLICY (policy "svc") on a new cgroup work-a."""
    work = scratch_cgroup.child("work-a")
    (daemon.policy_dir / "svc.yaml").write_text(
        SERVICE_POLICY.format(
            name="svc", glob=f"{scratch_cgroup.relative}/work-*", dns=dns, server=SERVER
        )
    )
    daemon.start()
    assert wait_until(lambda: links_at(work.path, "connect4") == 1, timeout=60), daemon.log()
    return work


def series(daemon: Daemon, name: str) -> float | None:
    return daemon.metric(f'{name}{{policy="svc"}}')


def test_the_service_deletes_expired_entries_and_exports_the_learned_map(
    daemon, scratch_cgroup, responder
) -> None:
    """The answer's TTL (300 s) cut to 1 s: learned, counted, then deleted by the service's
    sweep, which counts the deletion (polled, generous timeouts, no assertion on time)."""
    work = serve_policy(daemon, scratch_cgroup, "{minTTL: 1, maxTTL: 1}")
    assert client(work, 1, "api.test") == [["api.test", API, "ok"]]

    assert wait_until(lambda: series(daemon, "cgpolicy_dns_learned_total") == 1), daemon.log()
    assert series(daemon, "cgpolicy_dns_learned_capacity") == 65536
    assert series(daemon, "cgpolicy_dns_refused_full_total") == 0
    assert wait_until(
        lambda: series(daemon, "cgpolicy_dns_expired_deleted_total") == 1, timeout=60
    ), daemon.metrics()
    assert series(daemon, "cgpolicy_dns_learned_entries") == 0
    assert series(daemon, "cgpolicy_dns_learned_expired_entries") == 0
    state = read_learned(read_named(daemon.bpf_dir, "svc"))
    assert state is not None and state.entries == [] and state.learned == 1


def test_a_full_map_refuses_and_says_so_in_audit_and_metrics(
    daemon, scratch_cgroup, responder
) -> None:
    """maxLearned 2: the third address is not learned, so its connect is refused (fails
    closed), and audit and the metrics say why."""
    work = serve_policy(daemon, scratch_cgroup, "{maxLearned: 2}")
    assert client(work, 3, "r{}.race.test") == [
        ["r0.race.test", RACE[0], "ok"],
        ["r1.race.test", RACE[1], "ok"],
        ["r2.race.test", RACE[2], "EPERM"],
    ]
    assert wait_until(lambda: (series(daemon, "cgpolicy_dns_refused_full_total") or 0) >= 1)
    assert series(daemon, "cgpolicy_dns_learned_entries") == 2
    assert series(daemon, "cgpolicy_dns_learned_capacity") == 2
    assert series(daemon, "cgpolicy_dns_learned_total") == 2

    (report,) = audit_dns(daemon.bpf_dir, scratch_cgroup)
    assert report["full"] and report["refused_full"] >= 1 and report["capacity"] == 2
    assert "NOT learned" in report["fails_closed"] and "fails closed" in report["fails_closed"]
    assert {a["address"] for a in report["addresses"]} == set(RACE[:2])
    text = cgpolicy(daemon.bpf_dir, "audit", "--cgroup", scratch_cgroup.relative).stdout
    assert "2/2 entries (2 live)" in text
    assert "  NOT LEARNED: " in text and "raise spec.dns.maxLearned" in text
