"""Shared pytest set-up: tests under tests/kernel are marked `kernel` automatically."""

from __future__ import annotations

from pathlib import Path

import pytest

KERNEL_TESTS = Path(__file__).parent / "kernel"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if KERNEL_TESTS in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.kernel)
