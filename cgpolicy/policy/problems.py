"""The one shape every validation finding takes, from YAML syntax to semantic checks.

It lives apart from :mod:`cgpolicy.policy.validate` so that the loader and the semantic
checks can produce problems without importing the module that drives them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Path = tuple[str | int, ...]


def field_name(path: Path) -> str:
    """``("spec", "targets", 0, "path")`` -> ``"spec.targets[0].path"``; a key longer than
    a field name can be (an unknown, hostile one) is shortened as :func:`shown` does."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
            continue
        name = part if len(part) <= FIELD_CHARACTERS else shown(part, FIELD_CHARACTERS)
        text += f".{name}" if text else name
    return text


FIELD_CHARACTERS = 40  # longer than any field of the language


SHOWN_CHARACTERS = 60  # of a value quoted in a message; a hostile one may have millions


def shown(value: object, limit: int = SHOWN_CHARACTERS) -> str:
    """``value`` as a message quotes it: repr() of a string or number, shortened to about
    ``limit`` characters with its full length said, so that a 16 MiB value cannot make a
    16 MiB message. Never raises, even for an int too large for str()."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        if value.bit_length() <= 3 * limit:  # about limit digits: str() is safe and short
            text = str(value)
            if len(text) <= limit:
                return text
        digits = int(value.bit_length() * 0.30103) + 1
        return f"a number of about {digits:,} digits"
    if isinstance(value, list | dict):
        kind, unit = ("a list", "item") if isinstance(value, list) else ("a mapping", "key")
        return f"{kind} of {len(value):,} {unit}{'' if len(value) == 1 else 's'}"
    text = value if isinstance(value, str) else repr(value)
    if len(text) > limit:
        head, tail = text[: limit - 12], text[-6:]
        return f"{head!r}...{tail!r} ({len(text):,} characters)"
    return repr(text) if isinstance(value, str) else text


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one input, placed at FILE:LINE:COL (1-based; 0 = no position)."""

    file: str
    line: int
    column: int
    field: str
    message: str
    hint: str | None = None

    def format(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}"
        field = f" {self.field}:" if self.field else ""
        hint = f" (hint: {self.hint})" if self.hint else ""
        return f"{where}:{field} {self.message}{hint}"

    def to_json(self) -> dict[str, str | int | None]:
        return {
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "field": self.field,
            "message": self.message,
            "hint": self.hint,
        }


class PolicyError(Exception):
    """Raised by the convenience loaders; carries every problem found, not just the first."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(problem.format() for problem in self.problems))
