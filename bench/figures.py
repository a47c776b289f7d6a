"""Figures, their targets, the table and the JSON."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_COMPARE: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
}


@dataclass
class Figure:
    key: str
    value: float | None  # None: not measured (the note says why)
    unit: str
    what: str
    target: tuple[str, float] | None = None  # ("<", 100.0): value must be below 100
    note: str = ""

    @property
    def passed(self) -> bool | None:
        if self.target is None:
            return None
        if self.value is None:
            return False
        op, bound = self.target
        return _COMPARE[op](self.value, bound)

    def target_text(self) -> str:
        if self.target is None:
            return ""
        op, bound = self.target
        return f"{op} {bound:g} {self.unit}"

    def value_text(self) -> str:
        if self.value is None:
            return "n/a"
        if abs(self.value) >= 100:
            return f"{self.value:,.0f}"
        if abs(self.value) >= 10:
            return f"{self.value:.1f}"
        return f"{self.value:.3g}"

    def to_json(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "unit": self.unit,
            "what": self.what,
            "target": self.target_text() or None,
            "pass": self.passed,
            "note": self.note or None,
        }


@dataclass
class Report:
    figures: dict[str, Figure] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def add(self, figure: Figure) -> Figure:
        self.figures[figure.key] = figure
        return figure

    def table(self) -> str:
        rows = [("figure", "value", "unit", "target", "result")]
        for f in self.figures.values():
            result = {True: "PASS", False: "FAIL", None: ""}[f.passed]
            rows.append((f.key, f.value_text(), f.unit, f.target_text(), result))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = []
        for n, row in enumerate(rows):
            cells = [
                cell.rjust(widths[i]) if i == 1 else cell.ljust(widths[i])
                for i, cell in enumerate(row)
            ]
            lines.append("  ".join(cells).rstrip())
            if n == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def summary(self) -> tuple[int, int]:
        judged = [f.passed for f in self.figures.values() if f.passed is not None]
        return sum(1 for p in judged if p), len(judged)

    def to_json(self) -> dict[str, Any]:
        passed, judged = self.summary()
        return {
            "params": self.params,
            "figures": {key: f.to_json() for key, f in self.figures.items()},
            "targets_passed": passed,
            "targets_total": judged,
            "notes": self.notes,
            "details": self.details,
        }
