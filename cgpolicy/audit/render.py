"""The audit report as text for people."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cgpolicy.audit.model import Attachment, CgroupReport, DnsReport

_COLUMNS = ("HOOK", "PROG", "NAME", "TAG", "MODE", "OWNER", "POLICY@REVISION", "INHERITED FROM")


def _row(a: Attachment) -> tuple[str, ...]:
    policy = "-"
    if a.policy:
        policy = f"{a.policy}@{(a.revision or '?')[:8]}"
    return (
        a.hook,
        str(a.prog_id),
        a.prog_name or "(unnamed)",
        a.tag,
        a.mode,
        a.owner,
        policy,
        a.inherited_from or "-",
    )


def _counter_lines(a: Attachment) -> list[str]:
    c: dict[str, Any] | None = a.counters
    if not c:
        return []
    verb = "would deny" if c.get("mode") == "audit" else "denied"
    lines = []
    for rule in c["rules"]:
        text = rule["text"] or "?"
        where = f" (line {rule['line']})" if rule.get("line") else ""
        note = f" [{rule['note']}]" if rule.get("note") else ""
        lines.append(
            f"rule {rule['rule']} {text}{where}: {rule['allowed']} allowed, "
            f"{rule['denied']} {verb}{note}"
        )
    d = c["default"]
    lines.append(f"default: {d['allowed']} allowed, {d['denied']} {verb}")
    if c.get("events_dropped"):
        lines.append(f"deny events dropped by the rate limit: {c['events_dropped']}")
    return [f"    {a.policy} {a.hook} {line}" for line in lines]


def render_cgroup(report: CgroupReport) -> list[str]:
    title = f"{report.path} (id {report.id})"
    if not report.exists:
        title += " [gone]"
    lines = [title]
    rows = [_COLUMNS, *(_row(a) for a in report.attachments)]
    if report.attachments:
        widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
        for index, row in enumerate(rows):
            lines.append(
                "  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
            )
            if index and row[-1] == "-":  # counters once, where the program is attached
                lines += _counter_lines(report.attachments[index - 1])
    for drift in report.drift:
        detail = f": {drift.detail}" if drift.detail else ""
        lines.append(f"  DRIFT {drift.problem} {drift.policy} {drift.hook}{detail}")
    return lines


def render_dns(report: DnsReport) -> list[str]:
    """A policy's learned DNS names: the map's fullness and counters, then the live
    entries by cgroup, each with the rules it makes match."""
    live = report.entries - report.expired
    waiting = f", {report.expired} expired waiting for deletion" if report.expired else ""
    lines = [
        f"{report.policy}: DNS names learned: {report.entries}/{report.capacity} entries "
        f"({live} live{waiting}); {report.learned} learned, {report.refused_full} refused "
        f"because the map was full, {report.unasked} answers to no query noted (taught "
        "nothing)"
    ]
    cgroup: tuple[str | None, int] | None = None
    for row in report.rows:
        if (row.cgroup, row.cgroup_id) != cgroup:
            cgroup = row.cgroup, row.cgroup_id
            lines.append(f"  {row.cgroup or '(gone)'} (id {row.cgroup_id})")
        lines.append(
            f"    {row.address} via {row.name or '?'}: expires in {row.expires_in_s} s, "
            f"learned {row.learned_ago_s} s ago"
        )
        for rule in row.rules:
            where = f" (line {rule['line']})" if rule.get("line") else ""
            lines.append(
                f"      {rule['section']} rule {rule['rule']} {rule['text'] or '?'}{where}"
            )
    warning = report.fails_closed()
    if warning:
        lines.append(f"  NOT LEARNED: {warning}")
    return lines


def render_pending(pending: dict[str, Any]) -> str:
    """A confirmation pending from `apply --confirm-within` (rollout.pending_json)."""
    waiting = f"revision {pending['revision']}" if pending["revision"] else "an unfinished apply"
    back = (
        f"back to revision {pending['previous']}" if pending["previous"] else "removed (it is new)"
    )
    left = (
        f"{pending['seconds_left']:.0f} s left"
        if pending["seconds_left"] > 0
        else "overdue: the next apply, remove, confirm or service pass rolls it back"
    )
    return (
        f"PENDING {pending['policy']}: {waiting} waits for `cgpolicy confirm` until "
        f"{pending['deadline']} ({left}), else {back}"
    )


def render(
    cgroups: list[CgroupReport],
    dns: Sequence[DnsReport] = (),
    pending: Sequence[dict[str, Any]] = (),
) -> str:
    blocks = ["\n".join(render_cgroup(report)) for report in cgroups]
    blocks += ["\n".join(render_dns(report)) for report in dns]
    if pending:
        blocks.append("\n".join(render_pending(item) for item in pending))
    if not cgroups:
        return "\n\n".join([*blocks, "no programs attached"])
    drifted = sum(1 for r in cgroups if r.drift)
    summary = f"{drifted} cgroups drifted" if drifted else "in sync"
    return "\n\n".join(blocks) + f"\n\n{summary}"
