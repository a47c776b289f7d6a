"""Shared pytest set-up: tests under tests/kernel are marked `kernel` automatically, and
under CI the property-based tests draw the same examples on every run.

Locally hypothesis explores new examples each run (and keeps failures in its database);
in CI a green run must mean the same thing on every machine, so examples are derived from
each test's name (`derandomize`) and nothing is read from or written to a database.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

KERNEL_TESTS = Path(__file__).parent / "kernel"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if KERNEL_TESTS in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.kernel)
