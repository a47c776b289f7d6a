"""`fqdns` rules on the real kernel (issue 12): an address is allowed by a name rule only
after a DNS answer for the name reached the cgroup, at once (no race), and never for another
cgroup; A and AAAA, over IPv4 and IPv6, for sockets.connect and for the packet hooks, in
the host's network namespace and in one of the target's own. A DNS server of the tests'
own (dns_responder.py, dnspython) answers from port 53 as a resolver does; the client
(dns_names_client.py) resolves and connects from inside the target cgroup."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest
from dns_responder import CLIENT, Datagram, Responder, response, run_client, verdicts
from enforcement import ALLOWED, EPERM, ETIMEDOUT, apply_ok, enforced, expect, run_cli
from netns import loopback_netns
from policy_builders import dns_connect_policy, host_cidr, policy_file
from service import wait_until

from cgpolicy.kernel import pins
from cgpolicy.kernel.applied import read_learned, read_named


def connect_policy(
    tmp_path: Path,
    targets: list[str],
    servers: list[str],
    rules: list[dict[str, Any]],
    dns_protocol: str = "udp",
    dns_ttl: dict[str, Any] | None = None,
) -> Path:
    """sockets.connect, default deny: DNS to ``servers`` (port 53, ``dns_protocol``) by
    address, and ``rules`` after it."""
    return dns_connect_policy(tmp_path, "names", targets, servers, rules, dns_ttl, dns_protocol)


def names_policy(
    tmp_path: Path,
    cgroup,
    server: Responder,
    targets: list[dict[str, str]] | None = None,
    **dns_ttl: int,
) -> Path:
    """Connects by name to api.test, *.race.test, v6.test and dual.test, on ``cgroup``
    unless ``targets`` (as the policy writes them) are given."""
    rules = [{"action": "allow", "fqdns": ["api.test", "*.race.test", "v6.test", "dual.test"]}]
    path = connect_policy(tmp_path, [cgroup.relative], [server.address], rules, dns_ttl=dns_ttl)
    if targets:
        document = json.loads(path.read_text())
        document["spec"]["targets"] = targets
        path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def resolve(cgroup, server: Responder, *names: str, **options: Any) -> list[list[str]]:
    """Resolve ``names`` from ``cgroup`` and connect to every address at once: rows of
    [name, address, verdict]. Options: rounds=N, type="AAAA", tcp=True, netns=NAME."""
    netns = options.pop("netns", None)
    flags = []
    for option, value in options.items():
        flags += [f"--{option}"] if value is True else [f"--{option}", str(value)]
    return run_client(cgroup, "resolve", server.address, *names, *flags, netns=netns)


def test_an_address_is_allowed_only_after_an_answer_for_its_name(
    cgroup_root, bpf_dir, scratch_cgroup, tmp_path, dns_server
) -> None:
    with enforced(cgroup_root, bpf_dir, names_policy(tmp_path, scratch_cgroup, dns_server)):
        # before any answer, and for an address no name of the rule gave
        assert verdicts(scratch_cgroup, "198.51.100.7") == {"198.51.100.7": "EPERM"}
        assert resolve(scratch_cgroup, dns_server, "api.test") == [
            ["api.test", "198.51.100.7", "ok"]
        ]
        assert verdicts(scratch_cgroup, "198.51.100.9") == {"198.51.100.9": "EPERM"}
        # a name no rule names teaches nothing
        assert resolve(scratch_cgroup, dns_server, "db.other.test") == [
            ["db.other.test", "198.51.100.8", "EPERM"]
        ]


def test_learned_addresses_belong_to_the_target_cgroup_that_resolved(
    cgroup_root, bpf_dir, scratch_cgroup, tmp_path, dns_server
) -> None:
    """Two targets of one policy (a glob): an answer that reached a cgroup below the first
    counts for all of the first target (a sibling below it connects), never for the second."""
    first, second = scratch_cgroup.child("first"), scratch_cgroup.child("second")
    resolver, worker = first.child("resolver"), first.child("worker")
    policy = names_policy(
        tmp_path, scratch_cgroup, dns_server, targets=[{"glob": f"{scratch_cgroup.relative}/*"}]
    )
    with enforced(cgroup_root, bpf_dir, policy):
        assert resolve(resolver, dns_server, "api.test") == [["api.test", "198.51.100.7", "ok"]]
        assert verdicts(worker, "198.51.100.7") == {"198.51.100.7": "ok"}
        assert verdicts(first, "198.51.100.7") == {"198.51.100.7": "ok"}
        assert verdicts(second, "198.51.100.7") == {"198.51.100.7": "EPERM"}


def test_targets_at_several_depths_each_keep_their_own(
    cgroup_root, bpf_dir, scratch_cgroup, tmp_path, dns_server
) -> None:
    """Targets at two depths (one below a cgroup that is no target, one not): each learns
    for itself, and a cgroup below the shallow one counts as it."""
    shallow, deep = scratch_cgroup.child("shallow"), scratch_cgroup.child("outer").child("deep")
    targets = [{"path": shallow.relative}, {"path": deep.relative}]
    with enforced(
        cgroup_root, bpf_dir, names_policy(tmp_path, scratch_cgroup, dns_server, targets)
    ):
        assert resolve(deep, dns_server, "api.test") == [["api.test", "198.51.100.7", "ok"]]
        assert verdicts(shallow, "198.51.100.7") == {"198.51.100.7": "EPERM"}
        assert resolve(shallow, dns_server, "api.test") == [["api.test", "198.51.100.7", "ok"]]
        # as deep as `deep`, but below `shallow`, which is its target
        assert verdicts(shallow.child("inner"), "198.51.100.7") == {"198.51.100.7": "ok"}


def test_a_policy_edit_keeps_what_its_workloads_resolved(
    cgroup_root, bpf_dir, scratch_cgroup, tmp_path, dns_server
) -> None:
    """A new version of the policy (a new revision: new programs and maps) still allows an
    address resolved under the old one while its name is still allowed; a version that no
    longer names it refuses it. Nothing is resolved again in between."""
    first = names_policy(tmp_path, scratch_cgroup, dns_server)
    with enforced(cgroup_root, bpf_dir, first) as enforcer:
        assert resolve(scratch_cgroup, dns_server, "api.test") == [
            ["api.test", "198.51.100.7", "ok"]
        ]
        edited = names_policy(tmp_path, scratch_cgroup, dns_server, maxTTL=600)  # new revision
        apply_ok(enforcer, edited)
        assert verdicts(scratch_cgroup, "198.51.100.7") == {"198.51.100.7": "ok"}
        text = re.sub(r'"api\.test",\s*', "", edited.read_text())
        assert text != edited.read_text()
        edited.write_text(text)
        apply_ok(enforcer, edited)
        assert verdicts(scratch_cgroup, "198.51.100.7") == {"198.51.100.7": "EPERM"}
        # and a version that names no host at all keeps none of the maps of names
        without = connect_policy(tmp_path, [scratch_cgroup.relative], [dns_server.address], [])
        apply_ok(enforcer, without)
        left = {p.name for p in (bpf_dir / "names").iterdir()} & set(pins.DNS_PINS)
        assert left == set()


def test_a_thousand_lookups_then_connects_are_never_refused(
    cgroup_root, bpf_dir, scratch_cgroup, tmp_path, dns_server
) -> None:
    """Each round a name and an address never seen before, connected to as soon as the
    answer is read: the kernel learned it before the answer reached the socket."""
    with enforced(cgroup_root, bpf_dir, names_policy(tmp_path, scratch_cgroup, dns_server)):
        results = resolve(scratch_cgroup, dns_server, "r{}.race.test", rounds=1000)
    assert len(results) == 1000
    refused = [row for row in results if row[2] != "ok"]
    assert refused == []


def test_an_answer_nobody_asked_for_teaches_nothing(
    cgroup_root, bpf_dir, scratch_cgroup, tmp_path, dns_server
) -> None:
    """A forged answer, from the resolver's address and port 53, for a name the rule names,
    to a socket of the cgroup that sent no query: its address stays refused."""
    with enforced(cgroup_root, bpf_dir, names_policy(tmp_path, scratch_cgroup, dns_server)):
        waiting = subprocess.Popen(
            [sys.executable, str(CLIENT), "unasked", "198.51.100.7"],
            preexec_fn=lambda: (scratch_cgroup.path / "cgroup.procs").write_text("0"),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert waiting.stdout is not None
            port = json.loads(waiting.stdout.readline())["port"]
            query = dns.message.make_query("api.test", "A")
            forged = response(query, [("A", "198.51.100.7")]).to_wire()
            dns_server.udp[0].sendto(forged, ("127.0.0.1", port))
            result = json.loads(waiting.stdout.readline())
        finally:
            waiting.kill()
            waiting.wait()
    assert result == [["-", "198.51.100.7", "EPERM"]]


def test_a_learned_address_stops_matching_when_its_ttl_runs_out(
    cgroup_root, bpf_dir, scratch_cgroup, tmp_path, dns_server
) -> None:
    """The answer's TTL (300 s) cut to maxTTL 1 s: allowed at once, refused once it ran out
    (polled: no assertion on elapsed time, only that it happens)."""
    policy = names_policy(tmp_path, scratch_cgroup, dns_server, minTTL=1, maxTTL=1)
    with enforced(cgroup_root, bpf_dir, policy):
        assert resolve(scratch_cgroup, dns_server, "api.test") == [
            ["api.test", "198.51.100.7", "ok"]
        ]
        expired = wait_until(
            lambda: verdicts(scratch_cgroup, "198.51.100.7")["198.51.100.7"] == "EPERM",
            timeout=30,
        )
    assert expired


# --- IPv6 ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loopback_dns(kernel_ready: None) -> Iterator[tuple[str, Responder]]:
    """A network namespace of this module's own with only its loopback, and the DNS server
    on 127.0.0.1 and ::1 there (a private ::1 port 53: no clash with the host or with
    another test session)."""
    with loopback_netns(f"cgpt-dns-{os.getpid()}") as ns:
        server = Responder("127.0.0.1", "::1", netns=ns)
        try:
            yield ns, server
        finally:
            server.close()
        assert not server.errors, server.errors


@pytest.mark.parametrize("transport", ["127.0.0.1", "::1"])
def test_a_and_aaaa_answers_allow_the_ipv4_mapped_and_ipv6_addresses(
    cgroup_root, bpf_dir, scratch_cgroup, tmp_path, loopback_dns, transport
) -> None:
    """dual.test has A 198.51.100.9 and AAAA 2001:db8::9, asked over IPv4 or over IPv6. The A
    answer opens the IPv4 address and its IPv4-mapped form (an IPv6 dual-stack socket),
    not the IPv6 one; the AAAA answer opens the IPv6 address (connect6)."""
    ns, server = loopback_dns
    v4, mapped, v6 = "198.51.100.9", "::ffff:198.51.100.9", "2001:db8::9"
    rules = [{"action": "allow", "fqdns": ["dual.test"]}]
    policy = connect_policy(tmp_path, [scratch_cgroup.relative], ["127.0.0.1", "::1"], rules)
    with enforced(cgroup_root, bpf_dir, policy):
        assert verdicts(scratch_cgroup, v4, mapped, v6, netns=ns) == {
            v4: "EPERM",
            mapped: "EPERM",
            v6: "EPERM",
        }
        found = run_client(scratch_cgroup, "resolve", transport, "dual.test", netns=ns)
        assert found == [["dual.test", v4, "ok"]]
        assert verdicts(scratch_cgroup, v4, mapped, v6, netns=ns) == {
            v4: "ok",
            mapped: "ok",
            v6: "EPERM",
        }
        found = run_client(
            scratch_cgroup, "resolve", transport, "dual.test", "--type", "AAAA", netns=ns
        )
        assert found == [["dual.test", v6, "ok"]]
        assert verdicts(scratch_cgroup, v6, netns=ns) == {v6: "ok"}
    assert server.queries[-2:] == [("dual.test", "udp"), ("dual.test", "udp")]


# --- the packet hooks, and a target in a network namespace of its own ----------------------


@pytest.mark.parametrize("direction", ["egress", "ingress"])
def test_network_rules_by_name_drop_packets_until_the_answer(
    cgroup_root, bpf_dir, scratch_cgroup, tmp_path, dns_server, veth_net, direction
) -> None:
    """network.<direction>, default deny, DNS to the server allowed by address, TCP to
    edge.test by name; edge.test is the echo servers' namespace over a veth from the host's
    namespace. Before the answer a TCP connect is refused at once (egress: failFast) or its
    SYN-ACK is dropped (ingress) and it times out, over IPv4 and IPv6; after the A and AAAA
    answers they connect."""
    net = veth_net
    dns_server.zone["edge.test"] = [("A", net.broot4), ("AAAA", net.broot6)]
    server: list[dict[str, Any]] = [
        {"action": "allow", "protocol": "udp", "cidrs": [host_cidr(dns_server.address)]}
    ]
    if direction == "egress":
        server[0]["ports"] = [53]  # egress: the remote port; ingress: the local one (any)
    by_name: dict[str, Any] = {"action": "allow", "protocol": "tcp", "fqdns": ["edge.test"]}
    if direction == "egress":
        by_name["ports"] = [net.ports[0]]
    policy = policy_file(
        tmp_path,
        "names-net",
        [scratch_cgroup.relative],
        {"network": {direction: {"default": "deny", "rules": [*server, by_name]}}},
    )
    connects = [("connect", "tcp", host, net.ports[0]) for host in (net.broot4, net.broot6)]
    try:
        with enforced(cgroup_root, bpf_dir, policy):
            refused = EPERM if direction == "egress" else ETIMEDOUT
            expect(scratch_cgroup, [(c, refused) for c in connects])
            resolve(scratch_cgroup, dns_server, "edge.test")
            resolve(scratch_cgroup, dns_server, "edge.test", type="AAAA")
            expect(scratch_cgroup, [(c, ALLOWED) for c in connects])
    finally:
        del dns_server.zone["edge.test"]


def test_a_target_in_a_network_namespace_of_its_own(
    cgroup_root, bpf_dir, scratch_cgroup, tmp_path, veth_net
) -> None:
    """A container's shape: the workload in the target cgroup and in network namespace a,
    its DNS server in namespace b across a veth (svc.test: A and AAAA of the echo servers
    there). network.egress, default deny, DNS by address, TCP to svc.test by name: refused
    at connect (failFast: the learned addresses of the namespace are checked there too)
    until resolved, then connects, over IPv4 and IPv6; the AAAA is asked over IPv6."""
    net = veth_net
    server = Responder(net.b4, net.b6, netns=net.ns_b)
    server.zone["svc.test"] = [("A", net.b4), ("AAAA", net.b6)]
    rules = [
        {
            "action": "allow",
            "protocol": "udp",
            "cidrs": [host_cidr(net.b4), host_cidr(net.b6)],
            "ports": [53],
        },
        {"action": "allow", "protocol": "tcp", "fqdns": ["svc.test"], "ports": [net.ports[1]]},
    ]
    policy = policy_file(
        tmp_path,
        "names-netns",
        [scratch_cgroup.relative],
        {"network": {"egress": {"default": "deny", "rules": rules}}},
    )
    connects = [("connect", "tcp", host, net.ports[1]) for host in (net.b4, net.b6)]
    try:
        with enforced(cgroup_root, bpf_dir, policy):
            expect(scratch_cgroup, [(c, EPERM) for c in connects], netns=net.ns_a)
            run_client(scratch_cgroup, "resolve", net.b4, "svc.test", netns=net.ns_a)
            expect(
                scratch_cgroup,
                [(connects[0], ALLOWED), (connects[1], EPERM)],
                netns=net.ns_a,
            )
            run_client(
                scratch_cgroup, "resolve", net.b6, "svc.test", "--type", "AAAA", netns=net.ns_a
            )
            expect(scratch_cgroup, [(c, ALLOWED) for c in connects], netns=net.ns_a)
    finally:
        server.close()
    assert server.queries == [("svc.test", "udp"), ("svc.test", "udp")], server.errors


# --- DNS over TCP, deny by name -------------------------------------------------------------


def test_an_answer_over_tcp_teaches_nothing(
    cgroup_root, bpf_dir, scratch_cgroup, tmp_path, dns_server
) -> None:
    """DNS over TCP fails closed: the answer reaches the workload, and the address it gives
    stays refused; the same question over UDP then opens it (so the rule could match)."""
    rules = [{"action": "allow", "fqdns": ["api.test"]}]
    policy = connect_policy(
        tmp_path, [scratch_cgroup.relative], [dns_server.address], rules, dns_protocol="any"
    )
    with enforced(cgroup_root, bpf_dir, policy):
        assert resolve(scratch_cgroup, dns_server, "api.test", tcp=True) == [
            ["api.test", "198.51.100.7", "EPERM"]
        ]
        assert dns_server.queries[-1] == ("api.test", "tcp")
        assert resolve(scratch_cgroup, dns_server, "api.test") == [
            ["api.test", "198.51.100.7", "ok"]
        ]


def test_a_deny_by_name_blocks_the_learned_address_and_validate_warns(
    cgroup_root, bpf_dir, scratch_cgroup, tmp_path, dns_server
) -> None:
    """A deny of api.test in front of an allow of every address: the address is allowed
    until an answer for api.test reaches the cgroup, then refused, in its IPv4 and
    IPv4-mapped forms, while other addresses and another target cgroup of the same policy
    are not affected. `validate` warns that a deny by name is best-effort."""
    resolver, other = scratch_cgroup.child("resolver"), scratch_cgroup.child("other")
    rules = [
        {"action": "deny", "fqdns": ["api.test"]},
        {"action": "allow", "cidrs": ["0.0.0.0/0", "::/0"]},
    ]
    targets = [resolver.relative, other.relative]
    policy = connect_policy(tmp_path, targets, [dns_server.address], rules)
    api, mapped, elsewhere = "198.51.100.7", "::ffff:198.51.100.7", "198.51.100.8"
    with enforced(cgroup_root, bpf_dir, policy):
        assert verdicts(resolver, api, mapped) == {api: "ok", mapped: "ok"}
        assert resolve(resolver, dns_server, "api.test", "db.other.test") == [
            ["api.test", api, "EPERM"],
            ["db.other.test", elsewhere, "ok"],
        ]
        assert verdicts(resolver, api, mapped) == {api: "EPERM", mapped: "EPERM"}
        assert verdicts(other, api, mapped) == {api: "ok", mapped: "ok"}

    done = run_cli("validate", policy)
    assert done.returncode == 0, (done.stdout, done.stderr)
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, done.stderr
    assert f"{policy}:" in warnings[0]
    assert "spec.sockets.connect.rules[1]" in warnings[0]  # [0] is the DNS server's rule
    assert "a deny by DNS name is best-effort" in warnings[0]
    assert "deny port 853" in warnings[0]


def test_only_the_servers_the_policy_names_teach(
    cgroup_root, bpf_dir, scratch_cgroup, tmp_path, dns_server
) -> None:
    """With spec.dns.servers, an answer from another server (here the same program on the
    server's second address, which the policy lets the workload query) teaches nothing,
    and one from a named server does."""
    named, other = dns_server.addresses
    rules = [{"action": "allow", "fqdns": ["api.test"]}]
    settings = {"servers": [host_cidr(named)]}
    policy = connect_policy(
        tmp_path, [scratch_cgroup.relative], [named, other], rules, dns_ttl=settings
    )
    with enforced(cgroup_root, bpf_dir, policy):
        asked_other = run_client(scratch_cgroup, "resolve", other, "api.test")
        assert asked_other == [["api.test", "198.51.100.7", "EPERM"]]
        state = read_learned(read_named(bpf_dir, "names"))
        assert state is not None and state.unasked == 1  # counted, for audit and metrics
        assert resolve(scratch_cgroup, dns_server, "api.test") == [
            ["api.test", "198.51.100.7", "ok"]
        ]


def test_an_address_behind_a_cname_lasts_no_longer_than_the_cname(
    cgroup_root, bpf_dir, scratch_cgroup, tmp_path, dns_server
) -> None:
    """api.test CNAME edge.cdn.test (TTL 1), edge.cdn.test A 198.51.100.70 (TTL 300): the
    question name decides, and the address matches for the CNAME's second only (polled)."""
    address = "198.51.100.70"

    def through_a_cname(query: dns.message.Message, _: dns.message.Message) -> list[Datagram]:
        answer = dns.message.make_response(query)
        alias = dns.name.from_text("edge.cdn.test")
        cname = answer.find_rrset(
            answer.answer,
            query.question[0].name,
            dns.rdataclass.IN,
            dns.rdatatype.CNAME,
            create=True,
        )
        cname.add(dns.rdata.from_text("IN", "CNAME", str(alias)), ttl=1)
        a = answer.find_rrset(answer.answer, alias, dns.rdataclass.IN, dns.rdatatype.A, create=True)
        a.add(dns.rdata.from_text("IN", "A", address), ttl=300)
        return [Datagram(answer.to_wire())]

    policy = names_policy(tmp_path, scratch_cgroup, dns_server, minTTL=1)
    with enforced(cgroup_root, bpf_dir, policy), dns_server.tampered("api.test", through_a_cname):
        assert resolve(scratch_cgroup, dns_server, "api.test") == [["api.test", address, "ok"]]
        assert wait_until(
            lambda: verdicts(scratch_cgroup, address) == {address: "EPERM"}, timeout=30
        )
