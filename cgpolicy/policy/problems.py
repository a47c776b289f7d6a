"""The one shape every validation finding takes, from YAML syntax to semantic checks.

It lives apart from :mod:`cgpolicy.policy.validate` so that the loader and the semantic
checks can produce problems without importing the module that drives them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Path = tuple[str | int, ...]


def field_name(path: Path) -> str:
    """``("spec", "targets", 0, "path")`` -> ``"spec.targets[0].path"``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


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
