"""An explanation rendered for a person, or as JSON (docs/explain.md), with each deciding
rule shown as it is written in its file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cgpolicy import reference
from cgpolicy.explain.explanation import Explanation, at_connect
from cgpolicy.policy.describe import rule_text

_lines_cache: dict[str, list[str]] = {}
_AT_CONNECT = {
    "refused": "fails fast: a connect() or UDP sendmsg() to it is refused at once (EPERM)",
    "dropped": (
        "only dropped: a connect() to it is not refused (the interface or a rule that cannot "
        "be known at connect decides); a TCP connect times out"
    ),
}


def source_lines(file: str, line: int, column: int, limit: int = 8) -> list[str]:
    """The rule as written: its first line and the lines below it that belong to it
    (indented at least as far as the rule's first key)."""
    if file not in _lines_cache:
        try:
            _lines_cache[file] = Path(file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            _lines_cache[file] = []
    lines = _lines_cache[file]
    if not 1 <= line <= len(lines):
        return []
    found = [lines[line - 1]]
    indent = column - 1
    for text in lines[line : line - 1 + limit]:
        stripped = text.strip()
        if not stripped or stripped.startswith("#"):
            break
        if len(text) - len(text.lstrip(" ")) < indent or stripped.startswith(("---", "...")):
            break
        found.append(text)
    return found


def _rule_json(section: str, rule: reference.Rule) -> dict[str, Any]:
    where = rule.source
    return {
        "action": rule.action,
        "text": rule_text(section, rule),
        "file": where.file if where else None,
        "line": where.line if where else None,
        "column": where.column if where else None,
        "source": source_lines(where.file, where.line, where.column) if where else [],
    }


def to_json(explanation: Explanation) -> dict[str, Any]:
    parsed = explanation.action
    policies = []
    for item in explanation.policies:
        entry: dict[str, Any] = {"policy": item.name, "file": item.file}
        if explanation.cgroup is not None:
            entry["cgroups"] = item.cgroups
            entry["dns"] = item.names.to_json() if item.names else None
        verdict = item.verdict
        if verdict is None:
            entry.update(verdict="unknown", problem=item.problem)
        else:
            entry.update(
                mode="audit" if verdict.audit else "enforce",
                section=verdict.section,
                verdict=verdict.verdict,
                effective="allow" if verdict.effective else "deny",
                decided_by=verdict.decided_by,
                rule=_rule_json(verdict.section, verdict.rule) if verdict.rule else None,
                matching=[_rule_json(verdict.section, rule) for rule in verdict.matching],
                reason=verdict.reason or None,
                at_connect=at_connect(item.policy, parsed.action, verdict) if item.policy else None,
            )
        policies.append(entry)
    report: dict[str, Any] = {
        "action": parsed.text,
        "verdict": explanation.verdict,
        "policies": policies,
        "notes": explanation.all_notes(),
    }
    if explanation.cgroup is not None:
        report["cgroup"] = explanation.cgroup
        report["foreign_programs"] = explanation.foreign
    return report


def render(explanation: Explanation) -> str:
    """The explanation for a person."""
    out = [explanation.action.text]
    if explanation.cgroup is not None:
        out[0] += f"  (cgroup {explanation.cgroup or '/'} and its ancestors)"
    for item in explanation.policies:
        where = f" ({item.file})" if item.file else ""
        verdict = item.verdict
        if verdict is None:
            out.append(f"{item.name}{where}: cannot explain: {item.problem}")
            continue
        head = f"{item.name}{where}: {verdict.verdict}"
        if verdict.audit and not verdict.allowed:
            head += " (audit mode: reported, let through)"
        out.append(head)
        if item.cgroups:
            out.append(f"  attached to {', '.join(item.cgroups)}")
        if item.names:
            out.append(f"  {item.names.text()}")
        if verdict.decided_by == "rule" and verdict.rule is not None:
            rule = verdict.rule
            location = f"{rule.source.file}:{rule.source.line}" if rule.source else "rule"
            out.append(f"  {verdict.section}: {location}: {rule_text(verdict.section, rule)}")
            if rule.source:
                for text in source_lines(rule.source.file, rule.source.line, rule.source.column):
                    out.append(f"    | {text}")
            others = [r for r in verdict.matching if r is not rule and r.action == rule.action]
            overridden = [r for r in verdict.matching if r.action != rule.action]
            for label, rules in (("also matched", others), ("overridden", overridden)):
                for other in rules:
                    line = f"{other.source.file}:{other.source.line}: " if other.source else ""
                    out.append(f"    {label}: {line}{rule_text(verdict.section, other)}")
        elif verdict.decided_by == "default":
            out.append(f"  {verdict.section}: no rule matches: default {verdict.verdict}")
        else:
            out.append(f"  {verdict.reason}")
        fast = at_connect(item.policy, explanation.action.action, verdict) if item.policy else None
        if fast is not None:
            out.append(f"  {_AT_CONNECT[fast]}")
    if not explanation.policies:
        out.append("no cgpolicy policy applies")
    for program in explanation.foreign:
        out.append(
            f"note: program {program['id']} ({program['name'] or 'unnamed'}) at "
            f"{program['hook']} is not cgpolicy's: it must allow too, and explain cannot "
            "tell what it decides"
        )
    for note in explanation.all_notes():
        out.append(f"note: {note}")
    out.append(f"verdict: {explanation.verdict}")
    return "\n".join(out)
