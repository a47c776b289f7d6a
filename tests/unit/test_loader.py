"""Hostile and malformed YAML: every kind gets a clear, located problem, with bounded memory,
and never a traceback; the same one whichever YAML parser PyYAML uses. How long refusing
takes is measured by `make bench` (bench/validate.py), not asserted here."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cgpolicy.policy import loader
from cgpolicy.policy.loader import MAX_DEPTH, MAX_FILE_BYTES, load_file
from cgpolicy.policy.validate import load_paths

WriteFile = Callable[..., Path]

ROOT = Path(__file__).resolve().parents[2]

BILLION_LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(8)
)


def messages(path: Path) -> list[str]:
    return [problem.format() for problem in load_paths([path]).problems]


def only_problem(path: Path) -> str:
    found = messages(path)
    assert len(found) == 1, found
    return found[0]


def test_alias_bomb_is_refused_at_the_first_anchor_without_expanding(write: WriteFile) -> None:
    path = write(BILLION_LAUGHS)
    loaded = load_file(str(path))
    problems = loaded.documents[0].problems
    assert problems[0].line == 1 and "anchors ('&a') are not allowed" in problems[0].message
    assert any("aliases ('*a') are not allowed" in p.message for p in problems)
    assert len(str(loaded.documents[0].data)) < 10_000  # nothing was expanded


def test_merge_key_is_refused(write: WriteFile) -> None:
    path = write("a: 1\n<<: {b: 2}\n")
    problems = load_file(str(path)).documents[0].problems
    assert [(p.line, p.column) for p in problems] == [(2, 1)]
    assert "merge keys ('<<') are not allowed" in problems[0].message


DEEP = {
    # name: (text, where level 65 starts)
    "flow-list": ("[" * 100_000 + "]" * 100_000, "1:65"),
    "flow-mapping": ("{a: " * 100_000 + "}" * 100_000, "1:257"),
    "block-list": ("- " * 100_000 + "x", "1:129"),
    "block-mapping": ("".join(" " * i + "a:\n" for i in range(2000)), "65:65"),
    "flow-in-block": ("a:\n  b: " + "[" * 5000 + "]" * 5000, "2:68"),
}


@pytest.mark.parametrize("name", DEEP)
def test_deep_nesting_is_refused_where_level_65_starts(write: WriteFile, name: str) -> None:
    text, where = DEEP[name]
    path = write(text)
    assert only_problem(path) == f"{path}:{where}: nesting is deeper than {MAX_DEPTH} levels"


class Libyaml026Loader(yaml.SafeLoader):
    """PyYAML's pure-Python parser with the depth limit of libyaml 0.2.6, the libyaml that
    PyYAML's wheels bundle (Debian's 0.2.5 has none): its scanner refuses a flow collection
    opened more than 1000 levels deep, with the same error and mark, and like libyaml it can
    get there while looking ahead for a ':' before the parser has handed out level 65."""

    def fetch_flow_collection_start(self, TokenClass: type) -> None:  # noqa: N803 (PyYAML's name)
        if len(self.indents) + self.flow_level >= 1000:
            mark = self.get_mark()
            raise yaml.scanner.ScannerError(
                "while increasing flow level", mark, "exceeded maximum nesting depth", mark
            )
        super().fetch_flow_collection_start(TokenClass)  # type: ignore[misc]


PARSERS = {
    "pure-python": yaml.SafeLoader,
    "libyaml-0.2.6-limit": Libyaml026Loader,
    # the libyaml this machine has, if PyYAML was built with it
    **({"installed-libyaml": yaml.CSafeLoader} if yaml.__with_libyaml__ else {}),
}
DEEP_ANSWERS = {
    **{
        name: f"{where}: nesting is deeper than {MAX_DEPTH} levels"
        for name, (_, where) in DEEP.items()
    },
    "second-document": f"3:256: nesting is deeper than {MAX_DEPTH} levels",
    "after-a-long-line": f"2:67: nesting is deeper than {MAX_DEPTH} levels",
    # A block mapping's key that is a flow list over 1000 deep: there is no ':' within 1024
    # characters of where it starts. With libyaml's limit, only the whole file read without
    # it says where the key ran out.
    "deep-required-key": "2:1026: invalid YAML: could not find expected ':' "
    "(while scanning a simple key at line 2, column 1)",
}
ALSO_DEEP = {
    **{name: text for name, (text, _) in DEEP.items()},
    "second-document": "a: 1\n---\nb: " + "{c: " * 5000 + "}" * 5000,
    "after-a-long-line": "x: " + "y" * 3000 + "\nz: " + "[" * 1500 + "]" * 1500,
    "deep-required-key": "x: 1\n" + "[" * 1500 + "]" * 1500 + ": y\n",
}


def problems_with(monkeypatch: pytest.MonkeyPatch, parser: type, path: Path) -> list[str]:
    with monkeypatch.context() as patched:
        patched.setattr(loader, "_Loader", parser)
        loaded = load_file(str(path))
    problems = loaded.problems + [p for d in loaded.documents for p in d.problems]
    return [problem.format() for problem in problems]


@pytest.mark.parametrize("name", ALSO_DEEP)
def test_deep_nesting_gets_the_same_answer_from_every_yaml_parser(
    write: WriteFile, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    path = write(ALSO_DEEP[name])
    answers = {label: problems_with(monkeypatch, parser, path) for label, parser in PARSERS.items()}
    assert answers == dict.fromkeys(PARSERS, [f"{path}:{DEEP_ANSWERS[name]}"])


def test_nesting_at_the_depth_limit_is_read(write: WriteFile) -> None:
    path = write("[" * MAX_DEPTH + "]" * MAX_DEPTH)
    assert load_file(str(path)).problems == []


def test_file_over_the_size_cap_is_refused_naming_its_size_and_the_cap(write: WriteFile) -> None:
    path = write(b"")
    with open(path, "wb") as handle:
        handle.truncate(20 * 2**20)
    message = only_problem(path)
    assert message.startswith(f"{path}:0:0: file is 20.0 MiB (20971520 bytes)")
    assert "over the 16 MiB limit" in message


def test_file_exactly_at_the_size_cap_is_read(write: WriteFile) -> None:
    path = write(b"# " + b"x" * (MAX_FILE_BYTES - 3) + b"\n")
    assert "file is empty" in only_problem(path)  # read and parsed, only a comment


def test_binary_file_is_refused_naming_the_line_of_the_nul_byte(write: WriteFile) -> None:
    path = write(b"apiVersion: x\nkind: \x00\x01\x02")
    assert only_problem(path) == (
        f"{path}:2:7: file contains a NUL byte at byte offset 20: it is binary, not YAML"
    )


def test_non_utf8_file_is_refused_naming_the_byte_and_line(write: WriteFile) -> None:
    path = write("metadata:\n  name: caf\xe9\n".encode("latin-1"))
    message = only_problem(path)
    assert message.startswith(f"{path}:2:12: file is not valid UTF-8: byte 0xe9 at byte offset 21")


def test_utf16_file_is_refused_with_a_hint_to_save_as_utf8(write: WriteFile) -> None:
    path = write("a: 1\n".encode("utf-16"))
    assert "UTF-16" in only_problem(path)


def test_control_character_is_a_located_yaml_error(write: WriteFile) -> None:
    path = write("a: 1\nb: x\x07y\n")
    assert only_problem(path).startswith(f"{path}:2:5: invalid YAML: control characters")


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n"])
def test_empty_file_is_refused(write: WriteFile, text: str) -> None:
    assert only_problem(write(text)).endswith("file is empty: it holds no YAML document")


@pytest.mark.parametrize("text", ["~\n", "null\n", "---\n"])
def test_null_document_is_refused(write: WriteFile, text: str) -> None:
    assert only_problem(write(text)).endswith("document is empty")


@pytest.mark.parametrize(
    ("text", "shown"), [("- a\n- b\n", "a list"), ("just a string\n", "'just a string'")]
)
def test_top_level_that_is_not_a_mapping_is_refused(
    write: WriteFile, text: str, shown: str
) -> None:
    message = only_problem(write(text))
    assert f"the top level of a policy must be a mapping, not {shown}" in message


def test_duplicate_key_is_refused_naming_both_lines(
    write: WriteFile, make_policy: Callable[..., str]
) -> None:
    path = write(make_policy(spec="network:\n  egress:\n    default: deny\n    default: allow\n"))
    message = only_problem(path)
    assert message == (
        f"{path}:11:7: spec.network.egress.default: duplicate key 'default': first set on "
        "line 10, again on line 11 (hint: YAML would silently keep only the last one; "
        "remove one of them)"
    )


def test_duplicate_key_keeps_neither_value_in_a_policy(
    write: WriteFile, make_policy: Callable[..., str]
) -> None:
    path = write(make_policy(spec="mode: audit\nmode: enforce\n"))
    assert load_paths([path]).policies == []


def test_yaml_syntax_error_is_located(write: WriteFile) -> None:
    path = write("a: [1, 2\nb: 3\n")
    assert only_problem(path).startswith(f"{path}:2:2: invalid YAML:")


def test_unsafe_tag_is_refused_and_never_constructed(write: WriteFile) -> None:
    path = write("a: !!python/object/apply:os.system ['true']\n")
    problems = load_file(str(path)).documents[0].problems
    assert "YAML tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed" in (
        problems[0].message
    )


def test_keys_stay_strings_and_values_are_json_like(write: WriteFile) -> None:
    path = write("yes: on\n80: 010\nwhen: 2024-01-01\nn: ~\nf: 1.5\nq: '443'\n")
    data = load_file(str(path)).documents[0].data
    assert data == {"yes": True, "80": 8, "when": "2024-01-01", "n": None, "f": 1.5, "q": "443"}


def test_several_documents_in_one_file_are_each_read(
    write: WriteFile, make_policy: Callable[..., str]
) -> None:
    path = write(make_policy("one") + "---\n" + make_policy("two"))
    result = load_paths([path])
    assert result.ok and [policy.name for policy in result.policies] == ["one", "two"]


def test_problems_of_every_document_are_reported(
    write: WriteFile, make_policy: Callable[..., str]
) -> None:
    path = write(make_policy("one", "mode: on\n") + "---\n- x\n---\n" + make_policy("Two"))
    lines = [problem.line for problem in load_paths([path]).problems]
    assert lines == [8, 10, 15]


def test_positions_name_line_and_column_of_nested_values(write: WriteFile) -> None:
    path = write("a:\n  b: [x, {c: 5}]\n")
    source_map = load_file(str(path)).documents[0].source_map
    assert source_map.locate(("a", "b", 1, "c")) == (2, 14)
    assert source_map.locate(("a", "b", 1, "c"), key=True) == (2, 11)
    assert source_map.locate(("a", "b", 7)) == (2, 6)  # deepest existing node


# -- bounded memory, in a child process with an address-space limit ----------------------
# (how long each takes: validate_hostile_max_s in bench/validate.py, which reads these too)

CHILD = textwrap.dedent(
    """
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (400 * 2**20, 400 * 2**20))
    from cgpolicy.policy.validate import load_paths
    result = load_paths(sys.argv[1:])
    for problem in result.problems:
        print(problem.format()[:300])
    sys.exit(0 if result.ok else 2)
    """
)

HOSTILE = {
    # name: (text, a problem that must be among those reported, after "FILE:")
    "billion-laughs": (BILLION_LAUGHS, "1:4: a: YAML anchors ('&a') are not allowed"),
    "deep-flow-16mib": ("[" * (MAX_FILE_BYTES - 1), "1:65: nesting is deeper than 64 levels"),
    "many-nodes": (
        "x:\n" + "- s\n" * (MAX_FILE_BYTES // 4 - 1),
        "499999:3: file has more than 500,000 YAML nodes",
    ),
    "many-lists": (
        "x: [" + "[]," * (MAX_FILE_BYTES // 3 - 2) + "]",
        "1:299999: file has more than 100,000 mappings and lists",
    ),
    "many-keys": (
        "".join(f"k{i}: 1\n" for i in range(700_000)),
        "250000:10: file has more than 500,000 YAML nodes",
    ),
    # read in full (16 MiB in one value), then refused as no policy
    "long-string": ('x: "' + "y" * (MAX_FILE_BYTES - 10) + '"\n', "1:1: x: unknown field 'x'"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_input_is_refused_within_an_address_space_limit(
    write: WriteFile, name: str
) -> None:
    text, expected = HOSTILE[name]
    path = write(text, f"{name}.yaml")
    assert path.stat().st_size <= MAX_FILE_BYTES
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, env=env
    )
    assert child.returncode == 2, child.stderr
    assert "Traceback" not in child.stderr and "Error" not in child.stderr
    reported = child.stdout.splitlines()
    assert reported and all(line.startswith(f"{path}:") for line in reported)
    assert any(line.startswith(f"{path}:{expected}") for line in reported), reported[:5]


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(content=st.binary(max_size=300) | st.text(alphabet="[]{}:-,&*!<>|'\"\n #ab1", max_size=300))
def test_arbitrary_input_never_raises(write: WriteFile, content: bytes | str) -> None:
    path = write(content.encode() if isinstance(content, str) else content)
    result = load_paths([path])
    assert all(problem.file == str(path) for problem in result.problems)


def test_folder_without_policy_files_is_a_problem(tmp_path: Path) -> None:
    assert only_problem(tmp_path).endswith("folder holds no *.yaml or *.yml file")


def test_named_pipe_without_writer_does_not_hang(tmp_path):
    fifo = tmp_path / "policy.yaml"
    os.mkfifo(fifo)
    loaded = load_file(str(fifo))  # would block forever in a plain open()
    assert [p.message for p in loaded.problems] == ["file is empty: it holds no YAML document"]
