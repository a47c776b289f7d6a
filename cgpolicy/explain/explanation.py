"""Explanations: each policy's verdict on one parsed action and the rule that decides,
for policies read from files (`cgpolicy explain POLICY ACTION`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cgpolicy import reference
from cgpolicy.explain.actions import ParsedAction
from cgpolicy.policy.model import NetworkRule, Policy, SocketAddressRule
from cgpolicy.reference import (
    TCP,
    UDP,
    DeviceAccess,
    IPAddress,
    Packet,
    SocketAddress,
    Verdict,
    egress_at_connect,
    policy_section,
    remote_address,
)

if TYPE_CHECKING:
    from cgpolicy.compiler.spec import DeviceNode
    from cgpolicy.kernel.devices import DeviceBinding


def name_rules(policy: Policy, action: ParsedAction) -> list[NetworkRule | SocketAddressRule]:
    """The rules naming `fqdns` of the section that decides ``action``."""
    if remote_address(action.action) is None:
        return []
    section = policy_section(policy, action.action)
    return [rule for rule in section.rules if rule.fqdns] if section is not None else []


@dataclass(frozen=True)
class NameMatch:
    """explain --cgroup: what the cgroup learned from DNS answers for the action's remote
    address, as the kernel holds it, for a policy whose deciding section names hosts."""

    address: IPAddress
    patterns: tuple[str, ...]  # every name the section's fqdns rules name
    matched: tuple[NetworkRule | SocketAddressRule, ...]  # the fqdns rules it matches now
    name: str | None = None  # the last answer's most specific pattern, when one was learned
    learned_ago_s: int | None = None
    expires_in_s: int | None = None  # negative: expired that long ago, not yet deleted

    @property
    def live(self) -> bool:
        return self.expires_in_s is not None and self.expires_in_s > 0 and bool(self.matched)

    def text(self) -> str:
        if self.live:
            return (
                f"{self.address} via {self.name or 'a DNS answer'}, learned "
                f"{self.learned_ago_s} s ago, expires in {self.expires_in_s} s"
            )
        shown = ", ".join(self.patterns[:5]) + (", ..." if len(self.patterns) > 5 else "")
        text = f"no live DNS answer for {shown} taught this cgroup {self.address}"
        if self.expires_in_s is not None and self.expires_in_s <= 0:
            text += f" (the last one, via {self.name or '?'}, expired {-self.expires_in_s} s ago)"
        elif self.expires_in_s is not None:
            text += f" (it was learned via {self.name or '?'} for other sections' rules)"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "address": str(self.address),
            "live": self.live,
            "name": self.name,
            "learned_ago_s": self.learned_ago_s,
            "expires_in_s": self.expires_in_s,
            "text": self.text(),
        }


@dataclass
class PolicyExplanation:
    """One policy's part: its verdict, or why it could not be explained."""

    name: str
    file: str | None
    policy: Policy | None = None
    verdict: Verdict | None = None
    cgroups: list[str] = field(default_factory=list)  # --cgroup: where it is attached
    problem: str | None = None  # why it cannot be explained
    names: NameMatch | None = None  # --cgroup: what DNS taught the cgroup (fqdns rules)


def at_connect(policy: Policy, action: reference.Action, verdict: Verdict) -> str | None:
    """For a TCP/UDP packet network.egress denies: "refused" when a connect() or UDP
    sendmsg() to it already fails with EPERM (reference.egress_at_connect), "dropped" when
    only its packets are dropped (a TCP connect then times out). For a connect or sendmsg
    that egress refuses: "refused". None otherwise."""
    if isinstance(action, SocketAddress):
        return "refused" if verdict.section == "network.egress" else None
    if (
        not isinstance(action, Packet)
        or action.direction != "egress"
        or verdict.allowed
        or verdict.audit
        or action.protocol not in (TCP, UDP)
        or action.remote is None
        or action.port is None
    ):
        return None
    call = SocketAddress(
        "connect", action.remote, action.port, action.protocol, action.names, action.learned
    )
    return "refused" if egress_at_connect(policy, call) is not None else "dropped"


@dataclass
class Explanation:
    action: ParsedAction
    policies: list[PolicyExplanation]
    notes: list[str] = field(default_factory=list)
    foreign: list[dict[str, Any]] = field(default_factory=list)  # --cgroup: other owners' programs
    cgroup: str | None = None

    def all_notes(self) -> list[str]:
        notes = self.action.notes + self.notes
        packet = self.action.action
        if isinstance(packet, Packet) and packet.interface is None:
            sections = [
                getattr(p.policy.network, packet.direction)
                for p in self.policies
                if p.policy is not None and p.policy.network is not None
            ]
            if any(rule.interfaces for s in sections if s for rule in s.rules):
                notes.append(
                    "no --interface given: rules naming interfaces were evaluated as for a "
                    "packet with no device (deny rules match, allow rules do not)"
                )
        if self.cgroup is None and any(
            name_rules(p.policy, self.action) for p in self.policies if p.policy is not None
        ):
            notes.append(
                "rules naming fqdns match only the addresses DNS answers taught a cgroup at "
                "run time: here they match nothing; explain --cgroup PATH uses what that "
                "cgroup learned"
            )
        return notes

    @property
    def verdict(self) -> str:
        """deny if any policy lets the action not through; unknown if some could not be
        explained and none denies; else allow."""
        verdicts = [p.verdict for p in self.policies if p.verdict is not None]
        if any(not v.effective for v in verdicts):
            return "deny"
        if any(p.verdict is None for p in self.policies):
            return "unknown"
        return "allow"


def explain_policies(
    policies: Sequence[tuple[Policy, str | None]], action: ParsedAction
) -> list[PolicyExplanation]:
    return [
        PolicyExplanation(policy.name, file, policy, action.evaluate(policy))
        for policy, file in policies
    ]


def bind_devices_here(
    policy: Policy, dev_root: Path, remembered: dict[str, DeviceNode] | None = None
) -> tuple[Policy, DeviceBinding, list[str]]:
    """``policy`` with its device paths resolved as a node applying it here would resolve
    them (under ``dev_root``), the binding, and a note for each path that names no device
    (such a rule matches nothing, as in the kernel)."""
    from cgpolicy.compiler.compile import bind_device_paths
    from cgpolicy.kernel.devices import bind_devices

    binding = bind_devices(policy, dev_root, remembered)
    bound, paths = bind_device_paths(policy, binding)
    notes = [f"{policy.name}: {warning}" for d in paths if (warning := d.warning())]
    return bound, binding, notes


def explain_files(
    policies: Sequence[tuple[Policy, str | None]], action: ParsedAction, dev_root: Path
) -> Explanation:
    """Explain policies read from files. Their ``path:`` device rules are resolved on this
    machine, as `apply` here would; one whose path names no device here is explained as
    matching nothing, and said so."""
    bound: list[tuple[Policy, str | None]] = []
    notes: list[str] = []
    for policy, file in policies:
        if isinstance(action.action, DeviceAccess):
            policy, _, found = bind_devices_here(policy, dev_root)
            notes += found
        bound.append((policy, file))
    return Explanation(action, explain_policies(bound, action), notes)
