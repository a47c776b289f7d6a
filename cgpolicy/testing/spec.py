"""Test files (`kind: CgroupPolicyTest`, docs/testing.md): found, loaded and checked, with
every problem at FILE:LINE:COL as policy problems are.

A file's ``policies`` are loaded with the policy validator (their problems are reported as
`cgpolicy validate` reports them); each case's ``action`` is parsed as `cgpolicy explain`
parses its words, and its ``rule`` must name a rule of the section that decides it.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cgpolicy import reference
from cgpolicy.explain.actions import ExplainError, ParsedAction, parse_action
from cgpolicy.policy.loader import MAX_FILE_BYTES, Document, load_file
from cgpolicy.policy.model import Policy
from cgpolicy.policy.problems import Problem, field_name, shown
from cgpolicy.policy.validate import (
    POLICY_SUFFIXES,
    TEST_KIND,
    load_contents,
    load_paths,
    schema_problems,
    schema_validator,
)

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "policy-test.schema.json"
SECTIONS = (
    "network.egress",
    "network.ingress",
    "sockets.create",
    "sockets.bind",
    "sockets.connect",
    "devices",
    "sysctl",
)
_RULE = re.compile(
    r"(?:(?P<policy>[a-z0-9](?:[-a-z0-9]*[a-z0-9])?):)?(?:spec\.)?"
    r"(?:(?P<section>[a-z]+(?:\.[a-z]+)?)\.)?(?:rules\[(?P<index>\d+)\]|(?P<default>default))\Z"
)


@dataclass(frozen=True)
class RuleName:
    """A deciding rule as a test names it: rule N (from 0, in file order) of a section,
    or the section's default; optionally of one named policy."""

    section: str | None
    index: int | None  # None: the default
    policy: str | None = None

    def text(self, section: str | None = None) -> str:
        where = self.section or section or ""
        name = f"{where}.rules[{self.index}]" if self.index is not None else f"{where}.default"
        name = name.lstrip(".")
        return f"{self.policy}:{name}" if self.policy else name

    def matches(self, policy: str, section: str, index: int | None) -> bool:
        return (
            (self.policy is None or self.policy == policy)
            and (self.section is None or self.section == section)
            and self.index == index
        )


@dataclass
class Case:
    name: str
    action: ParsedAction
    expect: str  # allow | deny
    rule: RuleName | None
    line: int
    column: int
    names: frozenset[str] = frozenset()  # DNS names that taught the remote address


@dataclass
class TestFile:
    """One CgroupPolicyTest document: a JUnit test suite."""

    path: str
    name: str  # the file, with #N when it holds several documents
    policies: list[Policy]
    cases: list[Case]


@dataclass
class LoadedTests:
    files: list[TestFile] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # policy files found in folders

    @property
    def ok(self) -> bool:
        return not self.problems


def load_tests(paths: list[str | os.PathLike[str]]) -> LoadedTests:
    """Every test document in ``paths``: files, or folders (each *.yaml/*.yml directly
    in one whose documents are CgroupPolicyTest; policy files there are left out)."""
    result = LoadedTests()
    for raw in paths:
        path = os.fspath(raw)
        if os.path.isdir(path):
            found = _folder(path, result)
            if not found:
                result.problems.append(
                    Problem(path, 0, 0, "", f"folder holds no {TEST_KIND} file (*.yaml, *.yml)")
                )
            for file, documents in found:
                _load_documents(file, documents, result)
        elif os.path.lexists(path):
            loaded = load_file(path)
            result.problems += loaded.problems
            if loaded.problems:
                continue
            tests = [d for d in loaded.documents if _is_test(d.data)]
            if not tests:
                result.problems.append(
                    Problem(
                        path,
                        1,
                        1,
                        "kind",
                        f"not a {TEST_KIND} file",
                        "a test file says `kind: CgroupPolicyTest` (docs/testing.md)",
                    )
                )
            _load_documents(path, loaded.documents, result)
        else:
            result.problems.append(Problem(path, 0, 0, "", "no such file or folder"))
    return result


def _is_test(data: Any) -> bool:
    return isinstance(data, dict) and data.get("kind") == TEST_KIND


def _folder(path: str, result: LoadedTests) -> list[tuple[str, list[Document]]]:
    try:
        with os.scandir(path) as entries:
            files = sorted(
                e.path for e in entries if e.name.endswith(POLICY_SUFFIXES) and e.is_file()
            )
    except OSError as error:
        result.problems.append(Problem(path, 0, 0, "", f"cannot read the folder: {error.strerror}"))
        return []
    found = []
    for file in files:
        loaded = load_file(file)
        if any(_is_test(d.data) for d in loaded.documents):
            result.problems += loaded.problems
            found.append((file, loaded.documents))
        elif loaded.problems:  # unreadable: it may be a test file
            result.problems += loaded.problems
        else:
            result.skipped.append(file)
    return found


def _load_documents(file: str, documents: list[Document], result: LoadedTests) -> None:
    tests = [d for d in documents if _is_test(d.data) or not _is_policy(d.data)]
    for number, document in enumerate(tests, 1):
        name = file if len(tests) == 1 else f"{file}#{number}"
        problems = schema_problems(file, document, schema_validator(SCHEMA_PATH))
        if problems:
            result.problems += problems
            continue
        loaded = _check(file, name, document)
        if isinstance(loaded, TestFile):
            result.files.append(loaded)
        else:
            result.problems += loaded


def _is_policy(data: Any) -> bool:
    return isinstance(data, dict) and data.get("kind") == "CgroupPolicy"


def _writers(file: str) -> list[os.stat_result] | None:
    """The test file and its folder, when someone other than root can write either (their
    writers choose what ``policies`` names); None when only root can write both."""
    try:
        found = [os.stat(file), os.stat(os.path.dirname(os.path.abspath(file)))]
    except OSError:
        return None  # load_paths reports it
    if all(info.st_uid == 0 and not info.st_mode & 0o022 for info in found):
        return None
    return found


def _could_read(info: os.stat_result, writers: list[os.stat_result]) -> bool:
    """Whether those who can write the test file and its folder could read ``info``'s file
    themselves: readable by others, or owned by the writer (not root) who owns them."""
    for writer in writers:
        if writer.st_uid == 0 and not writer.st_mode & 0o022:
            continue
        if info.st_mode & stat.S_IROTH:
            continue
        if writer.st_uid != 0 and info.st_uid == writer.st_uid and info.st_mode & stat.S_IRUSR:
            continue
        return False
    return True


def _read_for(
    writers: list[os.stat_result], paths: list[str]
) -> tuple[list[tuple[str, bytes]], list[str]]:
    """The policy files ``paths`` name (a folder: its policy files), each read only if the
    test file's writers could read it themselves (checked on the opened file): a test file
    must not make root print, in its problems, what its writer cannot read (/etc/shadow)."""
    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            try:
                with os.scandir(path) as entries:
                    files += sorted(
                        e.path for e in entries if e.name.endswith(POLICY_SUFFIXES) and e.is_file()
                    )
            except OSError as error:
                return [], [f"{path}: cannot read the folder: {error.strerror}"]
        else:
            files.append(path)
    contents: list[tuple[str, bytes]] = []
    refused: list[str] = []
    seen: set[tuple[int, int]] = set()
    for path in files:
        # O_PATH first: it opens no device (a watchdog, a tty) and no FIFO; what it found is
        # checked, then that very file opened for reading through /proc/self/fd
        try:
            where = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError as error:
            refused.append(f"{path}: cannot open it: {error.strerror or error}")
            continue
        try:
            info = os.fstat(where)
            if not stat.S_ISREG(info.st_mode):
                refused.append(f"{path}: not a regular file: not read")
                continue
            if not _could_read(info, writers):
                refused.append(
                    f"{path}: owned by uid {info.st_uid} with mode "
                    f"{stat.S_IMODE(info.st_mode):04o}: those who can write this test file "
                    "could not read it themselves: not read"
                )
                continue
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            try:
                with open(f"/proc/self/fd/{where}", "rb") as opened:
                    contents.append((path, opened.read(MAX_FILE_BYTES + 1)))
            except OSError as error:
                refused.append(f"{path}: cannot read it: {error.strerror or error}")
        finally:
            os.close(where)
    return contents, refused


def _check(file: str, name: str, document: Document) -> TestFile | list[Problem]:
    """The semantic checks of one schema-valid document."""
    data: dict[str, Any] = document.data
    source_map = document.source_map

    def problem(path: tuple[str | int, ...], message: str, hint: str | None = None) -> Problem:
        line, column = source_map.locate(path)
        return Problem(file, line, column, field_name(path), message, hint)

    folder = Path(file).parent
    policy_paths = [str(folder / entry) for entry in data["policies"]]
    for index, entry in enumerate(data["policies"]):
        if not os.path.lexists(folder / entry):
            return [problem(("policies", index), f"{shown(entry)}: no such file or folder here")]
    writers = _writers(file)
    if writers is None:
        loaded = load_paths(policy_paths)
    else:
        contents, refused = _read_for(writers, policy_paths)
        if refused:
            return [problem(("policies",), message) for message in refused]
        loaded = load_contents(contents)
    if not loaded.ok:
        return [
            problem(("policies",), "the policies are not valid (problems below)"),
            *loaded.problems,
        ]
    if not loaded.policies:
        return [problem(("policies",), "names no policy")]
    policies = loaded.policies
    problems: list[Problem] = []
    cases: list[Case] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(data["cases"]):
        where = ("cases", index)
        if raw["name"] in seen:
            problems.append(
                problem(
                    (*where, "name"),
                    f"case name {shown(raw['name'])} is used already, on line {seen[raw['name']]}",
                )
            )
        else:
            seen[raw["name"]] = source_map.locate((*where, "name"))[0]
        try:
            parsed = parse_words(raw["action"])
        except ExplainError as error:
            problems.append(problem((*where, "action"), str(error)))
            continue
        names = frozenset(n.lower().rstrip(".") for n in raw.get("names", ()))
        if names:
            if reference.remote_address(parsed.action) is None:
                problems.append(
                    problem(
                        (*where, "names"),
                        "names apply to egress, ingress, connect and sendmsg only (the "
                        "actions fqdns rules decide)",
                    )
                )
                continue
            parsed = parsed.with_names(names)
        rule = None
        if "rule" in raw:
            rule, message = _rule(raw["rule"], parsed, policies)
            if message:
                problems.append(problem((*where, "rule"), message))
                continue
        line, column = source_map.locate(where)
        cases.append(Case(raw["name"], parsed, raw["expect"], rule, line, column, names))
    if problems:
        return problems
    return TestFile(file, name, policies, cases)


def parse_words(text: str) -> ParsedAction:
    """An action as `cgpolicy explain` takes its words, options included
    (``egress icmp 10.0.0.1 --icmp-type 8 --interface eth0``; ``--opt=value`` too)."""
    try:
        tokens = shlex.split(text)
    except ValueError as error:
        raise ExplainError(f"cannot split the action into words: {error}") from None
    words: list[str] = []
    options: dict[str, str] = {}
    while tokens:
        token = tokens.pop(0)
        if not token.startswith("--"):
            words.append(token)
            continue
        option, sep, value = token.partition("=")
        if option not in ("--icmp-type", "--interface"):
            raise ExplainError(f"unknown option {shown(option)} (--icmp-type N, --interface NAME)")
        if option in options:
            raise ExplainError(f"{option} is given twice")
        if not sep:
            if not tokens:
                raise ExplainError(f"{option} needs a value")
            value = tokens.pop(0)
        options[option] = value
    icmp_type = None
    if "--icmp-type" in options:
        text_value = options["--icmp-type"]
        if not text_value.isascii() or not text_value.isdigit() or len(text_value) > 3:
            raise ExplainError(f"--icmp-type {shown(text_value)} is not a number 0..255")
        icmp_type = int(text_value)
    return parse_action(words, icmp_type, options.get("--interface"))


def _rule(
    text: str, parsed: ParsedAction, policies: list[Policy]
) -> tuple[RuleName | None, str | None]:
    found = _RULE.match(text)
    if found is None:
        return None, f"{shown(text)}: write SECTION.rules[N], SECTION.default or default"
    deciding = deciding_sections(parsed.action)
    named = found["section"]
    if named is not None and named not in SECTIONS:
        return None, f"unknown section {shown(named)} (one of {', '.join(SECTIONS)})"
    if named is not None and named not in deciding:
        return (
            None,
            f"the action {parsed.text!r} is decided by {' or '.join(deciding)}, not {named}",
        )
    section = named or deciding[0]
    index = int(found["index"]) if found["index"] is not None else None
    candidates = [p for p in policies if found["policy"] in (None, p.name)]
    if not candidates:
        known = ", ".join(p.name for p in policies)
        return None, f"no policy {shown(found['policy'])} in this test's policies ({known})"
    sections = [s for s in (reference.section_of(p, section) for p in candidates) if s is not None]
    if not sections:
        return None, f"no policy of this test has a {section} section"
    if index is not None and not any(index < len(s.rules) for s in sections):
        most = max(len(s.rules) for s in sections)
        return None, f"{section} has {most} rules (rules[0] to rules[{most - 1}])"
    # an unnamed `default` is any deciding section's (a connect can be refused by egress's)
    return RuleName(named, index, found["policy"]), None


def deciding_sections(action: reference.Action) -> list[str]:
    """The sections that can decide an action: its own, and for a TCP/UDP connect or
    sendmsg also network.egress, which refuses at connect what it surely drops."""
    own = reference.section_name(action)
    if isinstance(action, reference.SocketAddress) and action.operation != "bind":
        return [own, "network.egress"]
    return [own]
