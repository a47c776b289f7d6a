"""Each case through the reference evaluator: the verdict, the deciding rule by name, and
whether that is what the case expects. What the kernel said (``kernel``) is added by
:mod:`cgpolicy.testing.kernel`; :class:`CaseResult` says what both mean together."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cgpolicy import reference
from cgpolicy.compiler.canonical import ordered_rules
from cgpolicy.contract import DEFAULT_SLOT
from cgpolicy.explain.explanation import bind_devices_here
from cgpolicy.policy.describe import rule_text
from cgpolicy.policy.model import Policy
from cgpolicy.reference import DeviceAccess, Verdict
from cgpolicy.testing.spec import SECTIONS, Case, RuleName, TestFile


@dataclass(frozen=True)
class Decision:
    """One policy's decision on one case: the reference's, or what the kernel's
    counters showed (``slots``: the counter slots that moved)."""

    policy: str
    section: str
    verdict: str | None  # allow | deny; None: the policy does not decide (no section)
    index: int | None = None  # the deciding rule, in file order; None: default or none
    decided_by: str = "rule"  # rule | default | no-section | not-checked
    slot: int | None = None  # the counter slot the kernel counts it in

    @property
    def rule_name(self) -> str:
        if self.decided_by == "rule":
            return f"{self.section}.rules[{self.index}]"
        if self.decided_by == "default":
            return f"{self.section}.default"
        return f"{self.section} ({self.decided_by})"


@dataclass(frozen=True)
class KernelDecision:
    """What one policy's programs counted for one case: the verdict (None: nothing was
    counted) and the rules whose counters moved, by name."""

    policy: str
    verdict: str | None
    rules: tuple[str, ...]


@dataclass
class KernelRun:
    """What the kernel did with one case: ``ran`` False with ``reason`` when it could not
    be run there (reference only)."""

    ran: bool
    reason: str = ""
    decisions: list[KernelDecision] = field(default_factory=list)
    disagreements: list[str] = field(default_factory=list)
    detail: str = ""  # how it was run (test_run retval, the probe's errno)


@dataclass
class CaseResult:
    file: TestFile
    case: Case
    decisions: list[Decision]  # the reference's, one per policy
    verdicts: list[Verdict]
    failures: list[str]
    kernel: KernelRun | None = None

    @property
    def verdict(self) -> str:
        return "deny" if any(d.verdict == "deny" for d in self.decisions) else "allow"

    @property
    def deciding(self) -> list[Decision]:
        """The decisions that make the verdict: the denying ones, else every one."""
        denying = [d for d in self.decisions if d.verdict == "deny"]
        return denying or [d for d in self.decisions if d.verdict is not None]

    @property
    def status(self) -> str:
        """pass, fail (the reference disagrees with the case), disagreement (the kernel
        disagrees with the reference; a failure of its own, whatever the case expected)."""
        if self.kernel is not None and self.kernel.disagreements:
            return "disagreement"
        return "fail" if self.failures else "pass"

    @property
    def reference_only(self) -> bool:
        return self.kernel is not None and not self.kernel.ran


def canonical_slot(policy_section: object, rule: reference.Rule) -> int:
    rules = ordered_rules(policy_section.rules)  # type: ignore[attr-defined]
    return next(i for i, r in enumerate(rules) if r is rule)


def file_index(policy_section: object, rule: reference.Rule) -> int:
    return next(i for i, r in enumerate(policy_section.rules) if r is rule)  # type: ignore[attr-defined]


def decide(policy: Policy, verdict: Verdict) -> Decision:
    """The decision as named in test files. The verdict's own section, which for a connect
    or sendmsg can be network.egress refusing it at connect time, not the action's."""
    section = reference.section_of(policy, verdict.section)
    if verdict.decided_by == "rule" and verdict.rule is not None:
        return Decision(
            policy.name,
            verdict.section,
            verdict.verdict,
            file_index(section, verdict.rule),
            "rule",
            canonical_slot(section, verdict.rule),
        )
    if verdict.decided_by == "default":
        return Decision(
            policy.name, verdict.section, verdict.verdict, None, "default", DEFAULT_SLOT
        )
    return Decision(policy.name, verdict.section, None, None, verdict.decided_by)


def rule_matches(name: RuleName, decision: Decision) -> bool:
    if decision.decided_by not in ("rule", "default"):
        return False
    return name.matches(decision.policy, decision.section, decision.index)


class Evaluator:
    """The reference's side, with device paths resolved once per policy (as on this
    machine, under ``dev_root``, as `apply` here resolves them)."""

    def __init__(self, dev_root: Path = Path("/dev")) -> None:
        self.dev_root = dev_root
        self._bound: dict[int, Policy] = {}

    def policy_for(self, policy: Policy, action: reference.Action) -> Policy:
        if not isinstance(action, DeviceAccess) or policy.devices is None:
            return policy
        if id(policy) not in self._bound:
            self._bound[id(policy)] = bind_devices_here(policy, self.dev_root)[0]
        return self._bound[id(policy)]

    def run(self, test: TestFile, case: Case) -> CaseResult:
        action = case.action.action
        policies = [self.policy_for(p, action) for p in test.policies]
        verdicts = [case.action.evaluate(p) for p in policies]
        decisions = [decide(p, v) for p, v in zip(policies, verdicts, strict=True)]
        result = CaseResult(test, case, decisions, verdicts, [])
        if result.verdict != case.expect:
            result.failures.append(f"expected {case.expect}, the policies {result.verdict}")
        if case.rule is not None and not any(rule_matches(case.rule, d) for d in result.deciding):
            got = ", ".join(_qualified(d, len(policies)) for d in result.deciding) or "none"
            result.failures.append(
                f"expected the deciding rule {case.rule.text(verdicts[0].section)}, got {got}"
            )
        return result


def _qualified(decision: Decision, policies: int) -> str:
    return f"{decision.policy}:{decision.rule_name}" if policies > 1 else decision.rule_name


@dataclass(frozen=True)
class Unexercised:
    file: str
    policy: str
    section: str
    index: int
    line: int | None
    text: str


def unexercised(test: TestFile, results: list[CaseResult]) -> list[Unexercised]:
    """The rules of the test's policies that decided no case (by the reference)."""
    decided = {
        (d.policy, d.section, d.index)
        for r in results
        for d in r.decisions
        if d.decided_by == "rule"
    }
    found = []
    for policy in test.policies:
        for section_name in SECTIONS:
            section = reference.section_of(policy, section_name)
            if section is None:
                continue
            for index, rule in enumerate(section.rules):
                if (policy.name, section_name, index) not in decided:
                    source = rule.source
                    found.append(
                        Unexercised(
                            source.file if source else test.path,
                            policy.name,
                            section_name,
                            index,
                            source.line if source else None,
                            rule_text(section_name, rule),
                        )
                    )
    return found
