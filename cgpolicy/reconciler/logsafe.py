"""Log lines that cannot be forged: the service logs names that others choose (policy file
names in a folder they write, cgroup paths, symlink targets), and a name with a line break
in it would otherwise print lines of its own (``a\\nINFO cgpolicy.reconcile: x: removed``)
in the text log format. Control characters and line separators in what is logged are
escaped, as Python's ``repr`` would (``\\n``, ``\\x1b``, ``\\u2028``); the JSON format escapes
them again, harmlessly.
"""

from __future__ import annotations

import logging
import unicodedata

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(char: str) -> str:
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` with every control character and line or paragraph separator escaped."""
    if text.isprintable():  # the common case: nothing to escape (spaces are printable)
        return text
    return "".join(
        _escape_char(char) if unicodedata.category(char) in ("Cc", "Zl", "Zp") else char
        for char in text
    )


def _escaped(value: object) -> object:
    if isinstance(value, (bool, int, float)) or value is None:
        return value  # kept as they are, for %d and %.1f
    return escape(str(value))


class EscapeControls(logging.Filter):
    """Escapes a record's message and its arguments, in place, before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = escape(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_escaped(arg) for arg in record.args)
        elif isinstance(record.args, dict):
            record.args = {key: _escaped(value) for key, value in record.args.items()}
        return True


ESCAPE_CONTROLS = EscapeControls()


def escape_service_logs() -> None:
    """Escape what every handler of the root logger prints from now on (the service's
    process: every module's lines, not only the reconciler's)."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(ESCAPE_CONTROLS)  # added once: a Filterer keeps no duplicates
