"""DNS names in rules (issue 12): `fqdns` in network rules and in sockets.connect,
validated and normalised; the reference semantics of a name match; what the compiler
makes of them."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path

import pytest
from policy_builders import policy_text, section_text

from cgpolicy.compiler.canonical import ordered_rules, revision
from cgpolicy.compiler.compile import compile_policy
from cgpolicy.policy.describe import rule_text
from cgpolicy.policy.model import DnsSettings
from cgpolicy.policy.validate import load_paths
from cgpolicy.reference import Packet, SocketAddress, evaluate

WriteFile = Callable[..., Path]
TCP = 6


def load(write: WriteFile, spec: str):
    return load_paths([write(policy_text("names", spec))])


def problems(write: WriteFile, spec: str) -> list[tuple[str, str]]:
    return [(p.field, p.message) for p in load(write, spec).problems]


def test_names_are_lowercased_stripped_of_the_root_dot_and_merged(write: WriteFile) -> None:
    rule = '{action: allow, fqdns: ["API.GitHub.com.", "api.github.com", "*.S3.amazonaws.com"]}'
    result = load(write, section_text("network.egress", rule, default="deny"))
    assert result.problems == []
    (policy,) = result.policies
    assert policy.network.egress.rules[0].fqdns == ("api.github.com", "*.s3.amazonaws.com")
    assert policy.dns == DnsSettings(30, 3600)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("*", "is a wildcard of nothing"),
        ("*.", "is a wildcard of nothing"),
        ("a.*.com", "has '*' inside a name"),
        ("*foo.com", "has '*' inside a name"),
        ("-bad.com", "has the label '-bad'"),
        ("bad-.com", "has the label 'bad-'"),
        ("x..y", "has an empty label"),
        (".", "is not a DNS name"),
        ("a" * 64 + ".com", "has the label"),
        (".".join(["a" * 63] * 4), "is 255 characters long; a DNS name has at most 253"),
    ],
)
def test_malformed_names_are_refused_at_their_place(
    write: WriteFile, name: str, message: str
) -> None:
    rule = f'{{action: allow, fqdns: ["ok.example", "{name}"]}}'
    found = problems(write, section_text("network.egress", rule))
    assert len(found) == 1, found
    field, text = found[0]
    assert field == "spec.network.egress.rules[0].fqdns[1]"
    assert message in text


def test_names_and_cidrs_do_not_mix_and_bind_rules_have_no_names(write: WriteFile) -> None:
    spec = (
        section_text(
            "sockets.connect", '{action: allow, cidrs: ["10.0.0.0/8"], fqdns: ["a.example"]}'
        )
        + "  "
        + section_text("bind", "{action: deny, fqdns: [a.example]}").replace("\n", "\n  ")
    )
    found = dict(problems(write, spec))
    assert "not both" in found["spec.sockets.connect.rules[0].fqdns"]
    assert "bind rule matches the local address" in found["spec.sockets.bind.rules[0].fqdns"]


def test_ttl_bounds_are_settable_and_ordered(write: WriteFile) -> None:
    result = load(write, "dns: {minTTL: 5, maxTTL: 600}\n")
    assert result.policies[0].dns == DnsSettings(5, 600)
    assert problems(write, "dns: {minTTL: 700, maxTTL: 600}\n") == [
        ("spec.dns.minTTL", "minTTL 700 is above maxTTL 600")
    ]


def test_a_deny_by_name_is_valid_with_a_warning_saying_what_it_does_not_cover(
    write: WriteFile,
) -> None:
    result = load(
        write,
        section_text(
            "network.egress",
            "{action: allow, fqdns: [a.example]}",
            "{action: deny, fqdns: [b.example]}",
        )
        + "dns: {servers: [10.0.0.53]}\n",
    )
    assert result.problems == [] and len(result.policies) == 1
    (warning,) = result.warnings
    assert warning.field == "spec.network.egress.rules[1]"
    assert "best-effort" in warning.message and "853" in (warning.hint or "")


def test_an_allow_by_name_without_servers_warns_that_any_server_teaches(
    write: WriteFile,
) -> None:
    rules = ("{action: deny, cidrs: [192.0.2.0/24]}", "{action: allow, fqdns: [a.example]}")
    result = load(write, section_text("sockets.connect", *rules))
    (warning,) = result.warnings
    assert warning.field == "spec.sockets.connect.rules[1]"
    assert "any DNS server" in warning.message and "spec.dns.servers" in (warning.hint or "")
    with_servers = section_text("sockets.connect", *rules) + "dns: {servers: [10.0.0.53/32]}\n"
    assert load(write, with_servers).warnings == []


@pytest.mark.parametrize(
    ("servers", "problem"),
    [
        ("[10.0.0.353]", "10.0.0.353"),
        ("[10.0.0.1/24]", "host bits"),
        ("[]", ""),
        ('["fe80::53%eth0"]', "names a zone"),
        # a zone may hold any character: the message shows them escaped, on one line
        ('["fe80::1%\\e[31m\\nspec.fake: ok/64"]', "fe80::1%\\x1b[31m\\nspec.fake: ok/64"),
    ],
)
def test_dns_servers_are_addresses_or_cidrs(write: WriteFile, servers: str, problem: str) -> None:
    spec = section_text("sockets.connect", "{action: allow, fqdns: [a.example]}")
    result = load(write, spec + f"dns: {{servers: {servers}}}\n")
    (found,) = result.problems
    assert found.field.startswith("spec.dns.servers") and problem in found.message
    assert "\n" not in found.format() and "\x1b" not in found.format()


def test_a_name_of_more_labels_than_the_kernel_reads_is_refused(write: WriteFile) -> None:
    longest = ".".join(["a"] * 31 + ["example"])  # 32 labels: readable
    assert load(
        write, section_text("sockets.connect", f"{{action: allow, fqdns: [{longest}]}}")
    ).policies
    for name in ("x." + longest, "*." + longest):
        result = load(
            write, section_text("sockets.connect", f"{{action: allow, fqdns: ['{name}']}}")
        )
        (found,) = result.problems
        assert "33 labels" in found.message and "at most 32" in found.message


def test_min_ttl_defaults_to_max_ttl_when_that_is_lower(write: WriteFile) -> None:
    spec = section_text("sockets.connect", "{action: allow, fqdns: [a.example]}")
    (policy,) = load(write, spec + "dns: {maxTTL: 10}\n").policies
    assert (policy.dns.min_ttl, policy.dns.max_ttl) == (10, 10)


def test_describe_names_the_hosts_by_dns(write: WriteFile) -> None:
    rule = "{action: allow, protocol: tcp, ports: [443], fqdns: [api.github.com, '*.x.io']}"
    (policy,) = load(write, section_text("network.egress", rule)).policies
    text = rule_text("network.egress", policy.network.egress.rules[0])
    assert text == "allow tcp to api.github.com,*.x.io (by DNS) port 443"


def test_a_name_rule_matches_only_the_names_dns_gave_for_the_address(write: WriteFile) -> None:
    """Reference semantics: an exact name, or for *.domain one or more labels in front of
    the domain; with no name known for the address, the rule matches nothing (it is not a
    rule of "any address", as a rule without cidrs is)."""
    spec = section_text(
        "network.egress",
        "{action: allow, fqdns: [api.example.com, '*.s3.example.com']}",
        default="deny",
    )
    (policy,) = load(write, spec).policies
    address = ipaddress.ip_address("192.0.2.7")

    def allowed(*names: str) -> bool:
        packet = Packet("egress", address, TCP, 443, names=frozenset(names))
        return evaluate(policy, packet).allowed

    assert not allowed()
    assert allowed("api.example.com")
    assert not allowed("example.com", "www.api.example.com")
    assert allowed("bucket.s3.example.com") and allowed("a.b.s3.example.com")
    assert not allowed("s3.example.com")  # the bare domain is not below itself


def test_a_connect_rule_by_name_matches_as_a_network_rule_does(write: WriteFile) -> None:
    spec = section_text("sockets.connect", "{action: allow, fqdns: [db.example]}", default="deny")
    (policy,) = load(write, spec).policies
    address = ipaddress.ip_address("198.51.100.4")
    learned = SocketAddress("connect", address, 5432, TCP, frozenset({"db.example"}))
    unknown = SocketAddress("connect", address, 5432, TCP)
    assert evaluate(policy, learned).allowed and not evaluate(policy, unknown).allowed


def test_policies_without_names_keep_their_revision(write: WriteFile) -> None:
    """The `fqdns` field is left out of a rule's canonical form while empty: upgrading
    does not reload every applied policy."""
    (policy,) = load(
        write, section_text("network.egress", '{action: deny, cidrs: ["10.0.0.0/8"]}')
    ).policies
    assert revision(policy) == "3b8136e5a011a4a0"  # as computed before fqdns existed


def test_a_policy_naming_hosts_compiles_to_learning_and_matching(write: WriteFile) -> None:
    """The connect programs match name rules through `learned` (their rules are not rules
    of any address); an ingress program that lets everything in is added to learn, and it
    tail-calls the question and answers programs, whose name table holds the names."""
    from cgpolicy.compiler.names import suffix_hashes
    from cgpolicy.contract import NAME_ENTRY, NET_CONFIG

    spec = (
        section_text(
            "sockets.connect",
            "{action: allow, fqdns: [db.example]}",
            '{action: allow, cidrs: ["10.0.0.0/8"]}',
            default="deny",
        )
        + "dns: {minTTL: 5, maxTTL: 50, maxLearned: 500}\n"
    )
    (policy,) = load(write, spec).policies
    key = bytes(range(16))
    compiled = compile_policy(policy, dns_key=key)
    hooks = {p.hook: p for p in compiled.programs}
    assert "ingress" in hooks and {p.function for p in compiled.dns_programs} == {
        "cgp_dns_question",
        "cgp_dns_answers",
        "cgp_dns_learn",
    }

    def config(hook: str) -> dict:
        (found,) = [m for m in hooks[hook].maps if m.name == "config"]
        return NET_CONFIG.unpack_from(found.entries[0][1])

    connect, ingress = config("connect4"), config("ingress")
    rule = 1 << [r.fqdns for r in ordered_rules(policy.sockets.connect.rules)].index(
        ("db.example",)
    )
    assert connect["fqdn_rules"] == rule and not connect["any_cidr"] & rule
    assert connect["dns_slot"] == 2 and not connect["dns_learn"]
    assert ingress["dns_learn"] == 1 and (ingress["min_ttl"], ingress["max_ttl"]) == (5, 50)
    assert compiled.dns_map("learned").max_entries == 500  # made once per load, shared
    assert compiled.names == ("db.example",)
    question = next(p for p in compiled.dns_programs if p.function == "cgp_dns_question")
    (names,) = [m for m in question.maps if m.name == "dns_names"]
    entries = {k: NAME_ENTRY.unpack_from(v) for k, v in names.entries}
    hashed = suffix_hashes(key, "db.example")[0].to_bytes(8, "little")
    assert entries[hashed]["exact"] == (0, 0, rule)
    assert (entries[hashed]["exact_name"], entries[hashed]["wildcard_name"]) == (1, 0)


def test_dns_settings_are_part_of_the_revision(write: WriteFile) -> None:
    """A changed TTL bound or capacity must reload the programs that hold it."""
    rule = section_text("sockets.connect", "{action: allow, fqdns: [db.example]}")
    revisions = {
        revision(load(write, rule + extra).policies[0])
        for extra in ("", "dns: {minTTL: 5}\n", "dns: {maxTTL: 50}\n", "dns: {maxLearned: 9}\n")
    }
    assert len(revisions) == 4
    assert revision(load(write, rule + "dns: {minTTL: 30}\n").policies[0]) == revision(
        load(write, rule).policies[0]
    )  # the default, written out


def test_the_name_table_splits_exact_names_from_wildcard_domains() -> None:
    from cgpolicy.compiler.names import name_table, suffix_hashes

    key = bytes(range(16))
    rules = [(0, 0, ["example.org"]), (0, 2, ["*.example.org", "*.x.test"]), (2, 1, ["x.test"])]
    table = name_table(key, 3, rules)
    whole = suffix_hashes(key, "example.org")[0]
    assert table[whole].exact == (0b1, 0, 0) and table[whole].wildcard == (0b100, 0, 0)
    x_test = table[suffix_hashes(key, "x.test")[0]]
    assert x_test.wildcard == (0b100, 0, 0) and x_test.exact == (0, 0, 0b10)  # per section
    # a.example.org's proper suffix example.org is the wildcard's domain
    assert suffix_hashes(key, "a.example.org")[1] == whole
    # another key, other hashes: what an attacker cannot compute without the key
    assert suffix_hashes(bytes(16), "example.org")[0] != whole


@pytest.mark.parametrize(
    ("pattern", "fqdns", "certain"),
    [
        ("api.example.com", ["api.example.com"], True),
        ("api.example.com", ["*.example.com"], True),
        ("api.example.com", ["*.com"], True),
        ("api.example.com", ["*.api.example.com", "example.com", "db.example.com"], False),
        ("*.example.com", ["*.example.com"], True),
        ("*.example.com", ["*.com"], True),
        # the question lay somewhere under example.com: not certainly this name or deeper
        ("*.example.com", ["api.example.com", "*.api.example.com", "example.com"], False),
        ("*.example.com", ["*.ample.com"], False),
    ],
)
def test_a_learned_pattern_carries_only_the_rules_it_surely_matches(
    pattern: str, fqdns: list[str], certain: bool
) -> None:
    """On reload, an address learned under the old version keeps the new rules its answer
    matched for sure; anything less certain is left out (it fails closed)."""
    from cgpolicy.compiler.names import carried_rules, surely_matched

    assert surely_matched(pattern, fqdns) is certain
    rules = [(2, 0, ("unrelated.test",)), (2, 3, tuple(fqdns)), (0, 1, tuple(fqdns))]
    assert carried_rules(pattern, 3, rules) == ((0b10, 0, 0b1000) if certain else (0, 0, 0))


def test_only_ascii_letters_fold_in_the_name_hashes() -> None:
    """The kernel lowercases A-Z and no other byte (bpf/net.c cgp_ascii_lower); the table
    hashes names the same way, so other bytes never fold onto a policy's name."""
    from cgpolicy.compiler.names import label_hash

    key = bytes(range(16))
    assert label_hash(key, b"API-Edge_1") == label_hash(key, b"api-edge_1")
    for odd, name in ((b"a\x0db", b"a-b"), (b"s\x13", b"s3"), (b"\x7fsrv", b"_srv")):
        assert label_hash(key, odd) != label_hash(key, name)


def test_a_name_that_is_not_ascii_is_refused(write: WriteFile) -> None:
    kelvin = "\u212a.example"  # lowercases to "k.example"
    result = load(write, section_text("sockets.connect", f"{{action: allow, fqdns: ['{kelvin}']}}"))
    (found,) = result.problems  # by the schema's pattern: no letter but A-Z folds
    assert found.field == "spec.sockets.connect.rules[0].fqdns[0]" and kelvin in found.message
