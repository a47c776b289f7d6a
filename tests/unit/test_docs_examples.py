"""Every policy we show or ship validates: the ```yaml blocks of the docs and the README,
and every file in policies/. Fragments in the docs use ```yaml-fragment (or a plain fence)
so that only complete policies are fenced as yaml."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from cgpolicy.policy.validate import load_paths

ROOT = Path(__file__).resolve().parents[2]
POLICY_DIR = ROOT / "policies"
DOC_FILES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]

# A fence opening with exactly "yaml" (not "yaml-fragment"), up to the closing fence.
YAML_BLOCK = re.compile(
    r"^(?P<fence>`{3,}|~{3,})yaml[ \t]*\n(?P<body>.*?)^(?P=fence)[ \t]*$", re.M | re.S
)


def yaml_blocks() -> list[tuple[str, str]]:
    blocks = []
    for doc in DOC_FILES:
        if not doc.is_file():
            continue
        text = doc.read_text(encoding="utf-8")
        for match in YAML_BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            blocks.append((f"{doc.relative_to(ROOT)}:{line}", match.group("body")))
    return blocks


def shipped_policies() -> list[Path]:
    """The policy files (the `cgpolicy test` files beside them: tests/unit/test_policy_tests.py)."""
    return sorted(p for p in POLICY_DIR.glob("*.y*ml") if not p.name.endswith(".test.yaml"))


def assert_valid(paths: list[Path]) -> None:
    result = load_paths(paths)
    messages = [problem.format() for problem in result.problems]
    assert not messages, "\n".join(messages)
    assert result.policies, f"no policy loaded from {paths}"


def test_docs_have_yaml_examples() -> None:
    assert len(yaml_blocks()) >= 3


@pytest.mark.parametrize("body", [pytest.param(body, id=where) for where, body in yaml_blocks()])
def test_doc_yaml_block_is_a_valid_policy(body: str, tmp_path: Path) -> None:
    path = tmp_path / "example.yaml"
    path.write_text(body, encoding="utf-8")
    assert_valid([path])


def test_policies_dir_is_not_empty() -> None:
    assert len(shipped_policies()) >= 4


@pytest.mark.parametrize("path", shipped_policies(), ids=lambda p: p.name)
def test_shipped_policy_is_valid(path: Path) -> None:
    assert_valid([path])


def test_shipped_policies_load_together() -> None:
    result = load_paths([POLICY_DIR])
    assert not result.problems, "\n".join(p.format() for p in result.problems)
    assert len(result.policies) == len(shipped_policies())


def test_shipped_policy_names_are_unique() -> None:
    names: dict[str, Path] = {}
    for path in shipped_policies():
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            name = document["metadata"]["name"]
            assert name not in names, f"{name} is in both {names[name].name} and {path.name}"
            names[name] = path


@pytest.mark.parametrize("path", shipped_policies(), ids=lambda p: p.name)
def test_shipped_policy_starts_with_a_header_comment(path: Path) -> None:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# "), f"{path.name} should open with a comment saying what it does"
