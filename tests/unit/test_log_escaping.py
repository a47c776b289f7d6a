"""Names others choose (policy file names, cgroup paths) cannot forge log lines in the
service's text log (cgpolicy/reconciler/logsafe.py); tests/kernel/test_last_good.py shows it
on the running service."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from cgpolicy.reconciler.logsafe import ESCAPE_CONTROLS, escape

FORGED = "a\nINFO cgpolicy.reconcile: x: removed\n.yaml"


def test_escape_leaves_printable_text_and_escapes_controls_and_separators() -> None:
    assert escape("svc.yaml: ünïcode ok") == "svc.yaml: ünïcode ok"
    assert escape(FORGED) == "a\\nINFO cgpolicy.reconcile: x: removed\\n.yaml"
    assert escape("\r\t\x1b[31m\x7f\x85\u2028\u2029") == "\\r\\t\\x1b[31m\\x7f\\x85\\u2028\\u2029"


@pytest.fixture
def text_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(ESCAPE_CONTROLS)
    logger = logging.getLogger("cgpolicy")
    logger.addHandler(handler)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


def test_a_file_name_with_line_breaks_is_one_escaped_line(
    tmp_path: Path, text_log: io.StringIO
) -> None:
    folder = tmp_path / "policies.d"
    folder.mkdir()
    (folder / FORGED).write_text("not: [a policy")
    logging.getLogger("cgpolicy.reconcile").error("invalid: %s (%d)", str(folder / FORGED), 3)
    lines = text_log.getvalue().splitlines()
    assert lines and all(line.startswith("ERROR cgpolicy.reconcile: invalid: ") for line in lines)
    assert "a\\nINFO cgpolicy.reconcile: x: removed\\n.yaml (3)" in lines[0]
