"""Shared helpers for the policy loading and validation tests."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from policy_builders import EVERY_SECTION_POLICY, policy_text

WriteFile = Callable[..., Path]


@pytest.fixture
def write(tmp_path: Path) -> WriteFile:
    """Write text (dedented) or bytes to a file in tmp_path and return its path."""

    def write_file(content: str | bytes, name: str = "policy.yaml") -> Path:
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(textwrap.dedent(content), encoding="utf-8")
        return path

    return write_file


@pytest.fixture
def valid_policy() -> str:
    return EVERY_SECTION_POLICY


@pytest.fixture
def make_policy() -> Callable[..., str]:
    return policy_text
