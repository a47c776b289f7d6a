"""Hostile numbers and odd input (issue 10, item 2): every place that turns text into a number
refuses what is too large or out of range with FILE:LINE:COL (files) or one line and exit 2
(arguments), never a traceback; and one file that cannot be checked never stops the others."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from policy_builders import policy_text, section_text

from cgpolicy.explain.actions import ExplainError, parse_action
from cgpolicy.policy import validate as validate_module
from cgpolicy.policy.validate import load_paths
from cgpolicy.reconciler.source import PolicySource

NINES = "9" * 5000
LONGEST_MESSAGE = 400  # a problem echoes a hostile value shortened, never 5,000 digits of it

RULE_LINE = 12  # the line of the rule in every document below


def connect(rule: str) -> str:
    return policy_text("hostile", section_text("sockets.connect", rule))


def egress(rule: str) -> str:
    return policy_text("hostile", section_text("network.egress", rule))


def create(rule: str) -> str:
    return policy_text("hostile", section_text("sockets.create", rule))


def devices(rule: str) -> str:
    # One level less deep than the others: the rule goes on a line of its own to be on line 12.
    return policy_text("hostile", f"devices:\n  default: allow\n  rules:\n    -\n      {rule}\n")


HOSTILE_FILES = {
    "port range, huge high end": (connect(f'{{action: deny, ports: ["1-{NINES}"]}}'), "ports[0]"),
    "port range, huge low end": (connect(f'{{action: deny, ports: ["{NINES}-1"]}}'), "ports[0]"),
    "port string, huge": (connect(f'{{action: deny, ports: ["{NINES}"]}}'), "ports[0]"),
    "port integer, huge": (connect(f"{{action: deny, ports: [{NINES}]}}"), "ports[0]"),
    "port integer, 4,000 digits": (connect(f"{{action: deny, ports: [{'9' * 4000}]}}"), "ports[0]"),
    "port hexadecimal, huge": (connect(f"{{action: deny, ports: [0x{'f' * 5000}]}}"), "ports[0]"),
    "port binary, huge": (connect(f"{{action: deny, ports: [0b{'1' * 20000}]}}"), "ports[0]"),
    "port octal, huge": (connect(f"{{action: deny, ports: [0{'7' * 20000}]}}"), "ports[0]"),
    "port sexagesimal, huge": (connect(f"{{action: deny, ports: [{'9' * 4299}:59]}}"), "ports[0]"),
    "port float, infinite": (connect("{action: deny, ports: [1.0e400]}"), "ports[0]"),
    "IPv4 prefix length, huge": (
        connect(f'{{action: deny, cidrs: ["10.0.0.0/{NINES}"]}}'),
        "cidrs[0]",
    ),
    "IPv6 prefix length, huge": (
        connect(f'{{action: deny, cidrs: ["fd00::/{NINES}"]}}'),
        "cidrs[0]",
    ),
    "CIDR with a NUL": (connect('{action: deny, cidrs: ["10.0.0.1\\0"]}'), "cidrs[0]"),
    "IPv6 CIDR with a NUL": (connect('{action: deny, cidrs: ["::1\\0/128"]}'), "cidrs[0]"),
    "IPv4 prefix length, 5,000 leading zeros": (
        connect(f'{{action: deny, cidrs: ["10.0.0.0/{"0" * 5000}8"]}}'),
        "cidrs[0]",
    ),
    "ICMP type, huge": (
        egress(f"{{action: deny, protocol: icmp, icmpTypes: [{NINES}]}}"),
        "icmpTypes[0]",
    ),
    "ICMP type, huge hexadecimal": (
        egress(f"{{action: deny, protocol: icmp, icmpTypes: [0x{'f' * 5000}]}}"),
        "icmpTypes[0]",
    ),
    "socket protocol, huge": (create(f"{{action: deny, protocol: {NINES}}}"), "protocol"),
    "device major, huge": (devices(f"{{action: deny, type: char, major: {NINES}}}"), "major"),
    "device minor, huge hexadecimal": (
        devices(f"{{action: deny, type: char, major: 1, minor: 0x{'f' * 5000}}}"),
        "minor",
    ),
}


@pytest.mark.parametrize("text, field", HOSTILE_FILES.values(), ids=list(HOSTILE_FILES))
def test_a_hostile_number_in_a_file_is_a_located_problem(
    tmp_path: Path, text: str, field: str
) -> None:
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    result = load_paths([path])
    assert not result.ok and not result.policies
    assert any(p.field.endswith(field) for p in result.problems), result.problems
    for problem in result.problems:
        assert problem.file == str(path)
        assert problem.line == RULE_LINE and problem.column > 0, problem
        assert len(problem.format()) < LONGEST_MESSAGE, problem.format()[:500]


def test_a_hostile_file_leaves_the_other_files_valid(tmp_path: Path) -> None:
    (tmp_path / "a-hostile.yaml").write_text(HOSTILE_FILES["port range, huge high end"][0])
    (tmp_path / "b-good.yaml").write_text(
        connect("{action: deny, ports: [443]}").replace("name: hostile", "name: good")
    )
    result = load_paths([tmp_path])
    assert [p.name for p in result.policies] == ["good"]
    assert {p.file for p in result.problems} == {str(tmp_path / "a-hostile.yaml")}


def cgpolicy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cgpolicy", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("command", ["validate", "describe", "plan", "apply"])
def test_commands_report_a_hostile_file_and_exit_two(tmp_path: Path, command: str) -> None:
    path = tmp_path / "hostile.yaml"
    path.write_text(HOSTILE_FILES["port range, huge high end"][0])
    scratch = ["--bpf-dir", str(tmp_path / "bpf"), "--cgroup-root", str(tmp_path / "cg")]
    done = cgpolicy(*scratch, command, str(path))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert f"{path}:{RULE_LINE}:" in done.stderr
    assert max(len(line) for line in done.stderr.splitlines()) < LONGEST_MESSAGE


def test_explain_with_a_hostile_policy_exits_two(tmp_path: Path) -> None:
    path = tmp_path / "hostile.yaml"
    path.write_text(HOSTILE_FILES["IPv4 prefix length, huge"][0])
    done = cgpolicy("explain", str(path), "connect", "tcp", "10.0.0.1:443")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{path}:{RULE_LINE}:" in done.stderr


# -- explain's arguments --------------------------------------------------------------------

HOSTILE_ACTIONS = {
    "huge port": (["egress", "tcp", f"10.0.0.1:{NINES}"], {}),
    "huge hexadecimal port": (["connect", "tcp", f"10.0.0.1:0x{'f' * 5000}"], {}),
    "huge protocol": (["egress", NINES, "10.0.0.1"], {}),
    "huge hexadecimal protocol": (["egress", "0x" + "f" * 5000, "10.0.0.1"], {}),
    "huge family": (["socket", NINES, "stream"], {}),
    "superscript family": (["socket", "\u00b2", "stream"], {}),
    "huge major": (["device", "c", f"{NINES}:1", "r"], {}),
    "huge hexadecimal minor": (["device", "c", f"1:0x{'f' * 5000}", "r"], {}),
    "device path with a NUL": (["device", "/dev/nu\0ll", "r"], {}),
    "huge interface index": (["egress", "tcp", "10.0.0.1"], {"interface": "99999999999999999999"}),
    "interface index of 5,000 digits": (["egress", "tcp", "10.0.0.1"], {"interface": NINES}),
    "huge ICMP type": (["egress", "icmp", "10.0.0.1"], {"icmp_type": int("9" * 4000)}),
    "negative ICMP type": (["egress", "icmp", "10.0.0.1"], {"icmp_type": -1}),
}


@pytest.mark.parametrize("words, options", HOSTILE_ACTIONS.values(), ids=list(HOSTILE_ACTIONS))
def test_explain_refuses_hostile_actions_in_one_short_line(
    words: list[str], options: dict[str, object]
) -> None:
    with pytest.raises(ExplainError) as raised:
        parse_action(words, **options)  # type: ignore[arg-type]
    message = str(raised.value)
    assert "\n" not in message and len(message) < LONGEST_MESSAGE, message[:500]


def test_an_interface_of_other_digits_is_a_name_not_an_index() -> None:
    parsed = parse_action(["egress", "tcp", "10.0.0.1"], interface="\u00b2")  # was ValueError
    assert parsed.text.endswith("--interface \u00b2")


@pytest.mark.parametrize(
    "option",
    [
        ["--interface", "99999999999999999999"],
        ["--interface", NINES],
        ["--icmp-type", "9" * 4000],
    ],
    ids=["interface index", "interface of 5,000 digits", "ICMP type of 4,000 digits"],
)
def test_explain_with_hostile_options_exits_two_in_one_line(
    tmp_path: Path, option: list[str]
) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(egress("{action: deny, protocol: icmp, icmpTypes: [8]}"))
    done = cgpolicy("explain", str(path), "egress", "icmp", "10.0.0.1", *option)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 1 or "Usage" in done.stderr


# -- reconcile's arguments ------------------------------------------------------------------


@pytest.mark.parametrize(
    "option",
    [
        ["--metrics-addr", f"127.0.0.1:{NINES}"],
        ["--metrics-addr", "127.0.0.1:99999999"],
        ["--metrics-addr", "127.0.0.1:-1"],
        ["--metrics-addr", "bad\0host:80"],
        ["--metrics-addr", f"{'a' * 300}:80"],
        ["--interval", "inf"],
        ["--interval", "1e400"],
    ],
    ids=[
        "port of 5,000 digits",
        "port over 65535",
        "negative port",
        "host with NUL",
        "host label too long",
        "infinite interval",
        "interval overflowing to infinity",
    ],
)
def test_reconcile_refuses_hostile_options_before_touching_anything(
    tmp_path: Path, option: list[str]
) -> None:
    policies = tmp_path / "policies.d"
    policies.mkdir()
    scratch = ["--bpf-dir", str(tmp_path / "bpf"), "--cgroup-root", str(tmp_path / "cg")]
    args = [*scratch, "reconcile", "--policy-dir", str(policies), "--once", *option]
    if "\0" in option[1]:  # argv cannot carry a NUL: run it in this process
        from typer.testing import CliRunner

        from cgpolicy.cli import app

        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and not isinstance(result.exception, Exception), (
            result.output,
            result.exception,
        )
        return
    done = cgpolicy(*args)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "bpf").exists()


# -- one file that raises while being checked ------------------------------------------------


def _raise_for(monkeypatch: pytest.MonkeyPatch, poisoned: str) -> None:
    """Make checking any document named `poisoned` raise, as a bug in a check would."""
    real = validate_module.check_policy

    def check_policy(data):  # type: ignore[no-untyped-def]
        if data.get("metadata", {}).get("name") == poisoned:
            raise RuntimeError("a bug in a check")
        return real(data)

    monkeypatch.setattr(validate_module, "check_policy", check_policy)


def test_a_file_that_raises_while_being_checked_is_a_problem_of_that_file_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = connect("{action: deny, ports: [443]}")
    (tmp_path / "a.yaml").write_text(good.replace("name: hostile", "name: poisoned"))
    (tmp_path / "b.yaml").write_text(good.replace("name: hostile", "name: good"))
    _raise_for(monkeypatch, "poisoned")
    result = load_paths([tmp_path])
    assert [p.name for p in result.policies] == ["good"]
    (problem,) = result.problems
    assert problem.file == str(tmp_path / "a.yaml")
    assert "RuntimeError" in problem.message


def test_the_service_keeps_the_last_good_version_of_a_file_that_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = connect("{action: deny, ports: [443]}")
    poisoned, other = tmp_path / "a.yaml", tmp_path / "b.yaml"
    poisoned.write_text(good.replace("name: hostile", "name: poisoned"))
    other.write_text(good.replace("name: hostile", "name: other"))
    source = PolicySource(tmp_path)
    assert sorted(p.name for p in source.read().policies) == ["other", "poisoned"]
    poisoned.write_text(good.replace("name: hostile", "name: poisoned").replace("443", "444"))
    other.write_text(good.replace("name: hostile", "name: other").replace("443", "8443"))
    _raise_for(monkeypatch, "poisoned")
    snapshot = source.read()
    kept = {p.name: p for p in snapshot.policies}
    assert sorted(kept) == ["other", "poisoned"]
    assert kept["poisoned"].sockets.connect.rules[0].ports[0].low == 443  # last good version
    assert kept["other"].sockets.connect.rules[0].ports[0].low == 8443  # the others go on
    assert list(snapshot.invalid_files) == [str(poisoned)]
