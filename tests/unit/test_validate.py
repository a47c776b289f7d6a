"""Schema and semantic validation: every problem is reported, placed at FILE:LINE:COL with
its field path, in an operator's words; valid policies become the typed model."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from policy_builders import section_text

from cgpolicy.policy.model import DeviceRule, PortRange, SocketCreateRule, SysctlRule
from cgpolicy.policy.validate import LoadResult, PolicyError, Problem, load_paths, load_policy_file

WriteFile = Callable[..., Path]
MakePolicy = Callable[..., str]
ROOT = Path(__file__).resolve().parents[2]
HEAD = "apiVersion: cgpolicy.dev/v1\nkind: CgroupPolicy\nmetadata: {name: a}\n"
EGRESS_LIST_HEAD = (
    "network:\n  egress:\n    default: deny\n    rules:\n      - action: allow\n        cidrs:\n"
)


def problems_of(result: LoadResult) -> list[tuple[int, int, str, str, str | None]]:
    return [(p.line, p.column, p.field, p.message, p.hint) for p in result.problems]


def one_problem(path: Path) -> Problem:
    result = load_paths([path])
    assert len(result.problems) == 1, [p.format() for p in result.problems]
    assert result.policies == []
    return result.problems[0]


# -- valid policies -----------------------------------------------------------------------


def test_valid_policy_becomes_the_typed_model(write: WriteFile, valid_policy: str) -> None:
    policy = load_policy_file(write(valid_policy))
    assert (policy.name, policy.mode) == ("web", "audit")
    assert [t.is_glob for t in policy.targets] == [False, True]
    egress = policy.network.egress
    rule = egress.rules[0]
    assert tuple(rule.cidrs) == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00::/8"),
        ipaddress.ip_network("192.0.2.1/32"),
    )
    assert rule.ports == (PortRange(443, 443), PortRange(8000, 8100))
    assert rule.source is not None and (rule.source.line, rule.source.column) == (15, 11)
    assert egress.rules[1].icmp_types == (0, 8)
    assert policy.sockets.create.rules == (SocketCreateRule("deny", family=10, type=3),)
    assert policy.sockets.bind.rules[0].ports == (PortRange(1, 1023),)
    # A path rule is resolved by the node that applies the policy, not by validation.
    assert policy.devices.rules[1] == DeviceRule("allow", None, None, None, "rw", path="/dev/null")
    assert policy.devices.rules[0].access == "rwm"
    assert policy.sysctl.rules == (
        SysctlRule("deny", "net/ipv4/*", "write"),
        SysctlRule("deny", "net/ipv4/conf/eth0.100/forwarding", "rw"),
    )
    assert policy.source is not None and policy.source.line == 1


def test_defaults_apply_when_optional_fields_are_omitted(
    write: WriteFile, make_policy: MakePolicy
) -> None:
    spec = (
        "devices: {default: deny, rules: [{action: allow, type: block}]}\nsysctl: {default: deny}\n"
    )
    policy = load_policy_file(write(make_policy(spec=spec)))
    assert policy.mode == "enforce"
    assert policy.devices.rules[0] == DeviceRule("allow", "block", None, None, "rwm")
    assert policy.sysctl.rules == () and policy.network is None


def test_policy_with_100000_cidrs_validates(write: WriteFile, make_policy: MakePolicy) -> None:
    """Accepted with every CIDR (how long it takes: validate_cidrs_s in `make bench`)."""
    cidrs = "".join(f'      - "10.{i // 256 % 256}.{i % 256}.0/24"\n' for i in range(65_536))
    cidrs += "".join(f'      - "fd00:{i:x}::/32"\n' for i in range(100_000 - 65_536))
    spec = EGRESS_LIST_HEAD
    path = write(make_policy(spec=spec) + cidrs.replace("      - ", "          - "))
    assert path.stat().st_size > 2_000_000
    result = load_paths([path])
    assert result.ok, [p.format() for p in result.problems[:5]]
    parsed = result.policies[0].network.egress.rules[0].cidrs
    assert len(parsed) == len(set(parsed)) == 100_000
    assert str(parsed[0]) == "10.0.0.0/24" and str(parsed[65_535]) == "10.255.255.0/24"
    assert str(parsed[65_536]) == "fd00::/32" and str(parsed[-1]) == "fd00:869f::/32"


def test_folder_means_every_yaml_and_yml_file_in_it_in_name_order(
    tmp_path: Path, make_policy: MakePolicy
) -> None:
    (tmp_path / "b.yml").write_text(make_policy("b"))
    (tmp_path / "a.yaml").write_text(make_policy("a"))
    (tmp_path / "notes.txt").write_text("not a policy")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yaml").write_text(make_policy("c"))
    result = load_paths([tmp_path])
    assert result.ok and [p.name for p in result.policies] == ["a", "b"]
    assert result.files == [str(tmp_path / "a.yaml"), str(tmp_path / "b.yml")]


def test_shipped_policies_validate() -> None:
    result = load_paths([ROOT / "policies"])
    assert result.ok, [p.format() for p in result.problems]


# -- reporting ----------------------------------------------------------------------------


def test_problem_formats_as_file_line_column_field_message_hint() -> None:
    problem = Problem("p.yaml", 3, 7, "spec.mode", "bad", "try this")
    assert problem.format() == "p.yaml:3:7: spec.mode: bad (hint: try this)"
    assert Problem("p.yaml", 0, 0, "", "gone").format() == "p.yaml:0:0: gone"
    assert problem.to_json() == {
        "file": "p.yaml",
        "line": 3,
        "column": 7,
        "field": "spec.mode",
        "message": "bad",
        "hint": "try this",
    }


def test_every_problem_in_every_file_is_reported(write: WriteFile, make_policy: MakePolicy) -> None:
    first = write(
        make_policy("a", "mode: fast\nsysctl: {default: allow, rules: [{action: deny}]}\n"),
        "a.yaml",
    )
    second = write(make_policy("B", "devices: {default: maybe}\n"), "b.yaml")
    result = load_paths([first, second, first.parent / "missing.yaml"])
    assert [(p.file, p.line, p.field) for p in result.problems] == [
        (str(first), 8, "spec.mode"),
        (str(first), 9, "spec.sysctl.rules[0]"),
        (str(second), 4, "metadata.name"),
        (str(second), 8, "spec.devices.default"),
        (str(first.parent / "missing.yaml"), 0, ""),
    ]
    assert not result.ok and result.policies == []


def test_missing_path_is_a_problem(tmp_path: Path) -> None:
    problem = one_problem(tmp_path / "nope.yaml")
    assert problem.format() == f"{tmp_path / 'nope.yaml'}:0:0: no such file or folder"


def test_load_policy_file_raises_with_every_problem(
    write: WriteFile, make_policy: MakePolicy
) -> None:
    with pytest.raises(PolicyError) as raised:
        load_policy_file(write(make_policy("X", "mode: fast\n")))
    assert [p.field for p in raised.value.problems] == ["metadata.name", "spec.mode"]


def test_load_policy_file_wants_exactly_one_policy(
    write: WriteFile, make_policy: MakePolicy
) -> None:
    with pytest.raises(PolicyError, match="expected exactly one policy in the file, found 2"):
        load_policy_file(write(make_policy("a") + "---\n" + make_policy("b")))


# -- schema problems ----------------------------------------------------------------------


def test_unknown_field_is_placed_at_its_key_and_hints_the_closest_known_one(
    write: WriteFile, make_policy: MakePolicy
) -> None:
    spec = section_text("network.egress", "{action: allow, cidr: [10.0.0.0/8]}", default="deny")
    problem = one_problem(write(make_policy(spec=spec)))
    assert (problem.line, problem.column) == (12, 27)
    assert problem.field == "spec.network.egress.rules[0].cidr"
    assert problem.message == "unknown field 'cidr'" and problem.hint == "did you mean 'cidrs'?"


def test_unknown_field_without_a_close_match_lists_the_known_ones(
    write: WriteFile, make_policy: MakePolicy
) -> None:
    problem = one_problem(write(make_policy(spec="zzz: 1\n")))
    assert problem.hint == "known fields: devices, dns, mode, network, sockets, sysctl, targets"


@pytest.mark.parametrize(
    ("spec", "field", "message", "hint"),
    [
        (
            "mode: enforcing\n",
            "spec.mode",
            "the string 'enforcing' is not one of: enforce, audit",
            "did you mean 'enforce'?",
        ),
        (
            "network: {egress: {default: no}}\n",
            "spec.network.egress.default",
            "the boolean false is not one of: allow, deny",
            "YAML reads yes/no/on/off/true/false as booleans; quote the value",
        ),
        ("network: {}\n", "spec.network", "needs at least one of: ingress, egress", None),
        (
            "sysctl: {default: deny, rules: [{action: deny, name: 5}]}\n",
            "spec.sysctl.rules[0].name",
            "expected a string, not the number 5",
            None,
        ),
        (
            "devices: {default: deny, rules: [{action: allow, type: char, minor: 2000000}]}\n",
            "spec.devices.rules[0].minor",
            "2000000 is out of range 0-1048575",
            None,
        ),
        (
            "devices: {default: deny, rules: [{action: allow, type: char, major: x}]}\n",
            "spec.devices.rules[0].major",
            "'x' is not valid: expected a major number 0-4095 or \"*\"",
            None,
        ),
        (
            "network: {egress: {default: deny, rules: [{action: allow, cidrs: []}]}}\n",
            "spec.network.egress.rules[0].cidrs",
            "must not be empty",
            None,
        ),
        (
            section_text(
                "network.egress",
                "{action: allow, interfaces: [averyveryverylongname]}",
                default="deny",
            ),
            "spec.network.egress.rules[0].interfaces[0]",
            "'averyveryverylongname' is not valid: expected an interface name or glob of "
            "1 to 15 characters of A-Z a-z 0-9 _ . : @ * ? -",
            None,
        ),
        (
            "sockets: {create: {default: allow, rules: [{action: deny, protocol: 300}]}}\n",
            "spec.sockets.create.rules[0].protocol",
            "300 is out of range 0-255",
            None,
        ),
        (
            "network:\n  egress:\n",
            "spec.network.egress",
            "expected a mapping, not nothing (null)",
            "a key with nothing after the colon is null; give it a value or remove it",
        ),
    ],
)
def test_schema_problems_are_explained(
    write: WriteFile, make_policy: MakePolicy, spec: str, field: str, message: str, hint: str | None
) -> None:
    problem = one_problem(write(make_policy(spec=spec)))
    assert (problem.field, problem.message, problem.hint) == (field, message, hint)


def test_target_needs_exactly_one_of_path_or_glob(write: WriteFile) -> None:
    text = HEAD + "spec:\n  targets: [{path: a, glob: b}]\n"
    problem = one_problem(write(text))
    assert (problem.line, problem.column, problem.field) == (5, 13, "spec.targets[0]")
    assert problem.message == "needs exactly one of: path, glob"


def test_missing_required_fields_are_each_reported_once(write: WriteFile) -> None:
    result = load_paths([write("kind: CgroupPolicy\n")])
    assert [p.message for p in result.problems] == [
        "missing required field 'apiVersion'",
        "missing required field 'metadata'",
        "missing required field 'spec'",
    ]


def test_rule_count_limit_is_in_the_schema(write: WriteFile, make_policy: MakePolicy) -> None:
    rules = "".join(f"    - {{action: deny, name: a.b{i}}}\n" for i in range(65))
    problem = one_problem(write(make_policy(spec="sysctl:\n  default: allow\n  rules:\n" + rules)))
    assert (problem.field, problem.message) == (
        "spec.sysctl.rules",
        "has 65 items; at most 64 are allowed",
    )


def test_schema_file_is_draft_2020_12_and_closed() -> None:
    import json

    from jsonschema import Draft202012Validator

    schema = json.loads((ROOT / "schemas" / "policy.schema.json").read_text())
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False


# -- semantic problems --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "field", "message", "hint"),
    [
        (
            "{action: allow, cidrs: [10.1.2.3/8]}",
            "cidrs[0]",
            "10.1.2.3/8 has host bits set",
            "did you mean 10.0.0.0/8?",
        ),
        (
            "{action: allow, cidrs: ['fd00::1/8']}",
            "cidrs[0]",
            "fd00::1/8 has host bits set",
            "did you mean fd00::/8?",
        ),
        (
            "{action: allow, cidrs: [10.0.0.300/32]}",
            "cidrs[0]",
            "'10.0.0.300/32' is not an IPv4 or IPv6 address or CIDR prefix",
            "write e.g. 10.0.0.0/8, 192.0.2.1 or fd00::/8",
        ),
        (
            "{action: allow, cidrs: [10.0.0.0/33]}",
            "cidrs[0]",
            "'10.0.0.0/33' is not an IPv4 or IPv6 address or CIDR prefix",
            "write e.g. 10.0.0.0/8, 192.0.2.1 or fd00::/8",
        ),
        (
            "{action: allow, protocol: icmp, cidrs: ['fd00::/8']}",
            "cidrs[0]",
            "fd00::/8 is IPv6 and cannot match protocol icmp",
            "use protocol icmpv6 for IPv6 in a separate rule",
        ),
        (
            "{action: allow, protocol: icmpv6, cidrs: [10.0.0.0/8]}",
            "cidrs[0]",
            "10.0.0.0/8 is IPv4 and cannot match protocol icmpv6",
            "use protocol icmp for IPv4 in a separate rule",
        ),
        (
            "{action: allow, protocol: tcp, ports: ['9000-8000']}",
            "ports[0]",
            "port range '9000-8000' is reversed",
            'write "8000-9000"',
        ),
        (
            "{action: allow, protocol: tcp, ports: ['0']}",
            "ports[0]",
            "port 0 is out of range 1-65535",
            None,
        ),
        (
            "{action: allow, protocol: tcp, ports: ['1-70000']}",
            "ports[0]",
            "port 70000 is out of range 1-65535",
            None,
        ),
        (
            "{action: allow, protocol: tcp, ports: [0]}",
            "ports[0]",
            "0 is out of range 1-65535",
            None,
        ),
        (
            "{action: allow, ports: [443]}",
            "ports",
            "ports need protocol tcp or udp, not 'any'",
            "add 'protocol: tcp' or 'protocol: udp' (one rule each for both)",
        ),
        (
            "{action: allow, protocol: icmp, ports: [443]}",
            "ports",
            "ports need protocol tcp or udp, not 'icmp'",
            "add 'protocol: tcp' or 'protocol: udp' (one rule each for both)",
        ),
        (
            "{action: allow, protocol: tcp, icmpTypes: [8]}",
            "icmpTypes",
            "icmpTypes need protocol icmp or icmpv6, not 'tcp'",
            "add 'protocol: icmp' or 'protocol: icmpv6'",
        ),
    ],
)
def test_network_rule_checks(
    write: WriteFile, make_policy: MakePolicy, rule: str, field: str, message: str, hint: str | None
) -> None:
    spec = section_text("network.egress", rule, default="deny")
    problem = one_problem(write(make_policy(spec=spec)))
    assert (problem.field, problem.message, problem.hint) == (
        f"spec.network.egress.rules[0].{field}",
        message,
        hint,
    )
    assert problem.line == 12


def test_socket_address_rules_allow_ports_with_any_protocol(
    write: WriteFile, make_policy: MakePolicy
) -> None:
    spec = "sockets: {bind: {default: allow, rules: [{action: deny, ports: ['1-1023']}]}}\n"
    assert load_paths([write(make_policy(spec=spec))]).ok


def test_socket_address_rules_check_cidrs_and_ports(
    write: WriteFile, make_policy: MakePolicy
) -> None:
    rule = "{action: deny, cidrs: [10.0.0.1/8], ports: ['5-1']}"
    spec = f"sockets: {{connect: {{default: allow, rules: [{rule}]}}}}\n"
    result = load_paths([write(make_policy(spec=spec))])
    assert [p.field for p in result.problems] == [
        "spec.sockets.connect.rules[0].cidrs[0]",
        "spec.sockets.connect.rules[0].ports[0]",
    ]


def test_total_cidrs_per_policy_is_limited(write: WriteFile, make_policy: MakePolicy) -> None:
    items = "".join(f"      - 10.{i // 256 % 256}.{i % 256}.0/24\n" for i in range(66_667))
    rule = "  - action: allow\n    cidrs:\n" + items
    spec = "network:\n  egress:\n    default: deny\n    rules:\n" + textwrap_indent(
        rule * 3, "    "
    )
    problem = one_problem(write(make_policy(spec=spec)))
    assert (problem.field, problem.line) == ("spec", 6)
    assert problem.message.startswith("the policy lists 200,001 CIDRs; at most 200,000 are allowed")


def textwrap_indent(text: str, prefix: str) -> str:
    return "".join(prefix + line for line in text.splitlines(keepends=True))


@pytest.mark.parametrize(
    ("target", "message", "hint"),
    [
        (
            "path: /sys/fs/cgroup/system.slice/a.service",
            "'/sys/fs/cgroup/system.slice/a.service' is absolute; "
            "targets are relative to the cgroup2 mount",
            "write 'system.slice/a.service'",
        ),
        (
            "path: system.slice/../../etc",
            "'system.slice/../../etc' has a '..' component; targets must stay inside "
            "the cgroup hierarchy and be written without '.' or '..'",
            None,
        ),
        ("glob: 'a//b*'", "'a//b*' has an empty path component", "write 'a/b*'"),
        ("path: a/", "'a/' has an empty path component", "write 'a'"),
        ("path: .", "the root cgroup cannot be a target", None),
    ],
)
def test_target_paths_must_be_relative_and_stay_inside_the_hierarchy(
    write: WriteFile, target: str, message: str, hint: str | None
) -> None:
    text = HEAD + f"spec:\n  targets:\n    - {target}\n"
    problem = one_problem(write(text))
    assert (problem.line, problem.column) == (6, 13)
    assert (problem.message, problem.hint) == (message, hint)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("net..ipv4", "sysctl name 'net..ipv4' has an empty component"),
        ("net.ipv4.", "sysctl name 'net.ipv4.' has an empty component"),
        ("net/ipv4/../x", "sysctl name 'net/ipv4/../x' has an invalid component '..'"),
        (
            "/proc/sys/net/ipv4/ip_forward",
            "sysctl name '/proc/sys/net/ipv4/ip_forward' is a file path",
        ),
    ],
)
def test_sysctl_name_syntax(
    write: WriteFile, make_policy: MakePolicy, name: str, message: str
) -> None:
    spec = f"sysctl: {{default: allow, rules: [{{action: deny, name: '{name}'}}]}}\n"
    problem = one_problem(write(make_policy(spec=spec)))
    assert (problem.field, problem.message) == ("spec.sysctl.rules[0].name", message)


@pytest.mark.parametrize(
    ("rule", "field", "message"),
    [
        # Paths are checked for syntax only (tests/unit/test_device_paths.py has the rest).
        (
            "{action: allow, path: /nonexistent/dev}",
            "path",
            "device path '/nonexistent/dev' is not under /dev",
        ),
        (
            "{action: allow, path: /dev}",
            "path",
            "device path '/dev' names the /dev folder, not a device node",
        ),
        ("{action: allow, path: dev/null}", "path", "device path 'dev/null' is not absolute"),
        (
            "{action: allow, path: /dev/null, type: char}",
            "path",
            "a device rule takes either path or type, not both",
        ),
        ("{action: allow}", "", "a device rule needs either type (char, block or any) or path"),
    ],
)
def test_device_rule_checks(
    write: WriteFile, make_policy: MakePolicy, rule: str, field: str, message: str
) -> None:
    regular = write("not a device", "regular.txt")
    spec = section_text("devices", rule.replace("REGULAR", str(regular)), default="deny")
    problem = one_problem(write(make_policy(spec=spec)))
    assert problem.field == "spec.devices.rules[0]" + (f".{field}" if field else "")
    assert problem.message == message.replace("REGULAR", str(regular))
    assert problem.line == 11


def test_duplicate_policy_names_across_files_name_both_places(
    write: WriteFile, make_policy: MakePolicy
) -> None:
    first = write(make_policy("web"), "a.yaml")
    second = write(make_policy("web"), "b.yaml")
    result = load_paths([first, second])
    assert [p.name for p in result.policies] == ["web"]
    assert [p.format() for p in result.problems] == [
        f"{second}:4:9: metadata.name: policy name 'web' is already used at {first}:4:9 "
        "(hint: policy names must be unique among all loaded policies)"
    ]


def test_the_same_file_named_twice_is_read_once(write: WriteFile, make_policy: MakePolicy) -> None:
    path = write(make_policy())
    result = load_paths([path, path.parent])
    assert result.ok and len(result.policies) == 1


def test_semantic_problem_is_not_repeated_when_the_schema_reported_the_field(
    write: WriteFile, make_policy: MakePolicy
) -> None:
    spec = section_text("network.egress", "{action: allow, cidrs: [not-a-cidr]}", default="deny")
    problem = one_problem(write(make_policy(spec=spec)))
    assert problem.message.startswith("'not-a-cidr' is not valid: expected an IPv4 or IPv6")


def test_problems_per_document_are_capped(write: WriteFile, make_policy: MakePolicy) -> None:
    items = "".join(f"      - 10.0.{i // 256}.{i % 256}/8\n" for i in range(5000))
    spec = EGRESS_LIST_HEAD
    result = load_paths([write(make_policy(spec=spec) + textwrap_indent(items, "    "))])
    assert len(result.problems) == 1001
    assert "more problems in this document are not shown" in result.problems[-1].message


def test_importing_validate_loads_no_kernel_libraries() -> None:
    code = (
        "import sys, cgpolicy.policy.validate; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('bcc', 'pyroute2')))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert output.stdout.strip() == "[]"


def test_sysctl_globs_too_complex_for_the_program_are_refused_at_validation(
    write: WriteFile,
) -> None:
    rules = "\n".join(
        f'      - {{action: deny, name: "*a*b*b*b*{i}*c*d*e*f*g"}}' for i in range(64)
    )
    path = write(
        "apiVersion: cgpolicy.dev/v1\nkind: CgroupPolicy\nmetadata: {name: dfa}\n"
        "spec:\n  targets: [{path: x}]\n  sysctl:\n    default: allow\n    rules:\n" + rules + "\n",
    )
    problem = one_problem(path)
    assert problem.field == "spec.sysctl.rules"
    assert "matcher states" in problem.message
