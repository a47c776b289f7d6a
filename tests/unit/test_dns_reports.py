"""What DNS names show without a kernel (issue 12, observability): the reference evaluator
told what the kernel learned, explain from files, and the audit model of a learned map
(its rows, fullness and the fails-closed warning) with its text and JSON."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path

from policy_builders import policy_text, section_text

from cgpolicy.audit.model import dns_report
from cgpolicy.audit.render import render
from cgpolicy.explain.actions import parse_action
from cgpolicy.explain.explanation import explain_files
from cgpolicy.explain.render import render as render_explanation
from cgpolicy.kernel.applied import LearnedEntry, LearnedState
from cgpolicy.policy.validate import load_paths
from cgpolicy.reference import SocketAddress, evaluate

WriteFile = Callable[..., Path]
TCP = 6
SECOND = 1_000_000_000
RULES = ("{action: allow, fqdns: [api.example.com]}", "{action: allow, fqdns: ['*.example.net']}")


def names_policy(write: WriteFile):  # type: ignore[no-untyped-def]
    spec = section_text("sockets.connect", *RULES, default="deny")
    (policy,) = load_paths([write(policy_text("names", spec))]).policies
    return policy


def test_what_the_kernel_learned_decides_name_rules_instead_of_names(write: WriteFile) -> None:
    """explain --cgroup hands the reference the rules the kernel's entry matches: they
    match, the others do not, whatever names would say."""
    policy = names_policy(write)
    first, second = policy.sockets.connect.rules
    address = ipaddress.ip_address("192.0.2.7")

    def allowed(learned, names=frozenset()) -> bool:  # type: ignore[no-untyped-def]
        return evaluate(policy, SocketAddress("connect", address, 443, TCP, names, learned)).allowed

    assert allowed(frozenset({first})) and allowed(frozenset({second}))
    assert not allowed(frozenset(), frozenset({"api.example.com"}))
    verdict = evaluate(
        policy, SocketAddress("connect", address, 443, TCP, learned=frozenset({second}))
    )
    assert verdict.rule is second and verdict.matching == (second,)


def test_explain_from_files_says_name_rules_match_only_learned_addresses(
    write: WriteFile,
) -> None:
    action = parse_action(["connect", "tcp", "192.0.2.7:443"])
    text = render_explanation(explain_files([(names_policy(write), "p.yaml")], action, Path("/")))
    assert "no rule matches: default deny" in text
    assert "rules naming fqdns match only the addresses DNS answers taught a cgroup" in text
    other = parse_action(["bind", "tcp", "0.0.0.0:80"])  # a section without name rules
    assert "fqdns" not in render_explanation(
        explain_files([(names_policy(write), "p.yaml")], other, Path("/"))
    )


def entry(cgroup: int, address: str, expires_s: float, name: str | None = "api.example.com"):  # type: ignore[no-untyped-def]
    now = 1000 * SECOND
    return LearnedEntry(
        cgroup,
        ipaddress.ip_address(address),
        now + int(expires_s * SECOND),
        now - 12 * SECOND,
        {"network.egress": 0, "network.ingress": 0, "sockets.connect": 0b10},
        name,
    )


LABELS = {"connect4": [{"text": "allow udp to 10.0.0.53/32 port 53", "line": 9}]}
LABELS["connect4"].append({"text": "allow any to api.example.com (by DNS)", "line": 12})


def test_audit_shows_live_entries_by_cgroup_and_counts_the_expired() -> None:
    state = LearnedState(
        [entry(7, "192.0.2.7", 48), entry(7, "192.0.2.9", -1), entry(99, "192.0.2.8", 5, None)],
        65536,
        learned=5,
        refused_full=0,
        unasked=4,
    )
    report = dns_report("web", state, LABELS, {7: "system.slice/web.service"}, 1000 * SECOND)
    data = report.to_json()
    assert (data["entries"], data["live"], data["expired"], data["full"]) == (3, 2, 1, False)
    assert data["fails_closed"] is None and data["refused_full"] == 0
    assert data["unasked"] == 4  # answers to no noted query: counted, taught nothing
    first, gone = data["addresses"]
    assert first == {
        "cgroup": "system.slice/web.service",
        "cgroup_id": 7,
        "address": "192.0.2.7",
        "name": "api.example.com",
        "learned_ago_s": 12,
        "expires_in_s": 48,
        "rules": [
            {
                "section": "sockets.connect",
                "rule": 1,
                "text": "allow any to api.example.com (by DNS)",
                "line": 12,
            }
        ],
    }
    assert gone["cgroup"] is None and gone["name"] is None  # the cgroup went away
    text = render([], [report])
    assert "web: DNS names learned: 3/65536 entries (2 live, 1 expired waiting for deletion)" in (
        text
    )
    assert "  system.slice/web.service (id 7)\n    192.0.2.7 via api.example.com: " in text
    assert "expires in 48 s, learned 12 s ago" in text
    assert "      sockets.connect rule 1 allow any to api.example.com (by DNS) (line 12)" in text
    assert "  (gone) (id 99)\n    192.0.2.8 via ?: " in text
    assert "NOT LEARNED" not in text


def test_audit_scope_hides_other_cgroups_entries_not_the_counts() -> None:
    state = LearnedState([entry(7, "192.0.2.7", 48), entry(8, "192.0.2.8", 48)], 4, 2, 0, 0)
    report = dns_report("web", state, LABELS, {}, 1000 * SECOND, lambda cgroup: cgroup == 8)
    assert [row.cgroup_id for row in report.rows] == [8]
    assert report.entries == 2


def test_a_map_that_refused_answers_says_it_fails_closed() -> None:
    state = LearnedState([entry(7, "192.0.2.7", 48)], 2, learned=1, refused_full=3, unasked=0)
    refused = dns_report("web", state, LABELS, {}, 1000 * SECOND)
    warning = refused.fails_closed()
    assert warning is not None and not refused.full
    assert warning.startswith("3 addresses from DNS answers NOT learned because the map was full")
    assert "keep refusing those addresses (fails closed)" in warning
    assert warning.endswith("raise spec.dns.maxLearned")
    assert refused.to_json()["fails_closed"] == warning
    assert f"  NOT LEARNED: {warning}" in render([], [refused])

    full = LearnedState([entry(7, "192.0.2.7", 48), entry(7, "192.0.2.8", 48)], 2, 2, 0, 0)
    report = dns_report("web", full, LABELS, {}, 1000 * SECOND)
    assert report.full and report.to_json()["full"] is True
    assert (report.fails_closed() or "").startswith("the map is full (2/2): new answers are NOT")
