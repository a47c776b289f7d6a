"""The results of `cgpolicy test`: for a person, as JSON, and as JUnit XML for CI."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

from cgpolicy.testing.evaluate import CaseResult, Unexercised
from cgpolicy.testing.spec import TestFile


@dataclass
class FileReport:
    test: TestFile
    results: list[CaseResult]
    unexercised: list[Unexercised]


@dataclass
class Report:
    files: list[FileReport] = field(default_factory=list)
    kernel: bool = False

    def results(self) -> list[CaseResult]:
        return [r for f in self.files for r in f.results]

    def counts(self) -> dict[str, int]:
        results = self.results()
        return {
            "cases": len(results),
            "passed": sum(r.status == "pass" for r in results),
            "failed": sum(r.status == "fail" for r in results),
            "disagreements": sum(r.status == "disagreement" for r in results),
            "reference_only": sum(r.reference_only for r in results),
            "unexercised_rules": sum(len(f.unexercised) for f in self.files),
        }

    @property
    def ok(self) -> bool:
        counts = self.counts()
        return not counts["failed"] and not counts["disagreements"]


def _verdict_text(result: CaseResult) -> str:
    rules = ", ".join(
        f"{d.policy}:{d.rule_name}" if len(result.decisions) > 1 else d.rule_name
        for d in result.deciding
    )
    return f"{result.verdict} by {rules or 'no policy section'}"


def _kernel_text(result: CaseResult) -> str:
    kernel = result.kernel
    if kernel is None:
        return ""
    if not kernel.ran:
        return f" [reference only: {kernel.reason}]"
    if kernel.disagreements:
        return ""
    return " [kernel agrees]"


def render(report: Report, verbose: bool = False) -> str:
    out: list[str] = []
    for item in report.files:
        out.append(item.test.name)
        for result in item.results:
            case = result.case
            head = f"{case.name}: {case.action.text}"
            if result.status == "pass":
                if verbose or result.reference_only:
                    out.append(f"  PASS  {head} -> {_verdict_text(result)}{_kernel_text(result)}")
                continue
            if result.status == "fail":
                out.append(f"  FAIL  {head} (line {case.line}){_kernel_text(result)}")
                out.extend(f"        {failure}" for failure in result.failures)
            else:
                assert result.kernel is not None
                out.append(f"  DISAGREEMENT  {head} (line {case.line})")
                out.append(
                    "        THE KERNEL AND THE REFERENCE EVALUATOR DISAGREE: this is a bug "
                    "in cgpolicy (or a kernel difference), whatever the case expects"
                )
                out.extend(f"        {d}" for d in result.kernel.disagreements)
                out.extend(f"        also: {failure}" for failure in result.failures)
            out.append(f"        reference: {_verdict_text(result)}")
        for rule in item.unexercised:
            where = f"{rule.file}:{rule.line}" if rule.line else rule.file
            out.append(
                f"  not exercised: {where}: {rule.policy} {rule.section}.rules[{rule.index}]: "
                f"{rule.text}"
            )
    counts = report.counts()
    summary = (
        f"{counts['cases']} cases: {counts['passed']} passed, {counts['failed']} failed, "
        f"{counts['disagreements']} disagreements between reference and kernel"
    )
    if report.kernel:
        summary += f"; {counts['reference_only']} reference only (not run in the kernel)"
    else:
        summary += "; reference evaluator only (--kernel also runs the real programs)"
    summary += f"; {counts['unexercised_rules']} rules decided no case"
    out.append(summary)
    return "\n".join(out)


def _case_json(result: CaseResult) -> dict[str, Any]:
    case = result.case
    entry: dict[str, Any] = {
        "name": case.name,
        "line": case.line,
        "action": case.action.text,
        "expect": case.expect,
        "rule": case.rule.text(result.verdicts[0].section) if case.rule else None,
        "status": result.status,
        "verdict": result.verdict,
        "decisions": [
            {"policy": d.policy, "verdict": d.verdict, "rule": d.rule_name}
            for d in result.decisions
        ],
        "failures": result.failures,
        "kernel": None,
    }
    if result.kernel is not None:
        entry["kernel"] = {
            "ran": result.kernel.ran,
            "reason": result.kernel.reason or None,
            "decisions": [
                {"policy": d.policy, "verdict": d.verdict, "rules": list(d.rules)}
                for d in result.kernel.decisions
            ],
            "disagreements": result.kernel.disagreements,
            "detail": result.kernel.detail or None,
        }
    return entry


def to_json(report: Report) -> dict[str, Any]:
    return {
        "ok": report.ok,
        "kernel": report.kernel,
        "summary": report.counts(),
        "files": [
            {
                "file": item.test.name,
                "policies": [p.name for p in item.test.policies],
                "cases": [_case_json(r) for r in item.results],
                "unexercised": [
                    {
                        "file": u.file,
                        "line": u.line,
                        "policy": u.policy,
                        "rule": f"{u.section}.rules[{u.index}]",
                        "text": u.text,
                    }
                    for u in item.unexercised
                ],
            }
            for item in report.files
        ],
    }


def junit(report: Report) -> bytes:
    """JUnit XML: one testsuite per test file, one testcase per case; a failed case has a
    <failure type="fail">, a disagreement a <failure type="disagreement">."""
    counts = report.counts()
    root = ET.Element(
        "testsuites",
        name="cgpolicy test",
        tests=str(counts["cases"]),
        failures=str(counts["failed"] + counts["disagreements"]),
        errors="0",
    )
    for item in report.files:
        failed = sum(r.status != "pass" for r in item.results)
        suite = ET.SubElement(
            root,
            "testsuite",
            name=item.test.name,
            tests=str(len(item.results)),
            failures=str(failed),
            errors="0",
            skipped="0",
        )
        for result in item.results:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=item.test.name,
                name=result.case.name,
                file=item.test.path,
                line=str(result.case.line),
            )
            if result.status == "fail":
                failure = ET.SubElement(
                    case, "failure", type="fail", message="; ".join(result.failures)
                )
                failure.text = f"{result.case.action.text}\nreference: {_verdict_text(result)}"
            elif result.status == "disagreement":
                assert result.kernel is not None
                message = "reference and kernel disagree: " + "; ".join(result.kernel.disagreements)
                failure = ET.SubElement(case, "failure", type="disagreement", message=message)
                failure.text = "\n".join(
                    [result.case.action.text, *result.kernel.disagreements, *result.failures]
                )
            notes = [f"reference: {_verdict_text(result)}"]
            if result.kernel is not None:
                notes.append(
                    f"kernel: {result.kernel.detail or 'test_run'}"
                    if result.kernel.ran
                    else f"reference only: {result.kernel.reason}"
                )
            ET.SubElement(case, "system-out").text = "\n".join(notes)
        if item.unexercised:
            ET.SubElement(suite, "system-out").text = "\n".join(
                f"not exercised: {u.file}:{u.line}: {u.policy} {u.section}.rules[{u.index}]: "
                f"{u.text}"
                for u in item.unexercised
            )
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)
