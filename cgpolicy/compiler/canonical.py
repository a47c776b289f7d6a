"""Which rule is bit i, and what a policy's revision is.

Every section is a set of at most 64 rules, kept in the programs as 64-bit masks (bit i =
rule i). Rule i is the i-th rule in canonical order (sorted by its canonical serialisation,
duplicates merged), so the same policy always gives the same bits and counter slots,
whatever order its file lists the rules in; :func:`ordered_rules` gives that order. The
revision hashes the same canonical content, so a reordered file is the same revision.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import ipaddress
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from cgpolicy.compiler.spec import CompileError, DevicePath
from cgpolicy.contract import (
    MAX_RULES,
)
from cgpolicy.policy.model import (
    CidrEdit,
    DeviceRule,
    DnsSettings,
    NetworkRule,
    Policy,
    SocketAddressRule,
    SocketCreateRule,
    SysctlRule,
)
from cgpolicy.policy.prefixes import Prefixes, prefix_key, prefix_text

# Bound, not constrained: reference.py orders a section whose rule type it does not know.
Rule = TypeVar(
    "Rule", bound=NetworkRule | SocketAddressRule | SocketCreateRule | DeviceRule | SysctlRule
)


def network_text(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    """``str(network)``, made faster (policy/prefixes.py prefix_text)."""
    return prefix_text(prefix_key(network))


def _item_text(item: Any) -> str:
    if isinstance(item, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return network_text(item)
    return str(item)


def _canonical_value(value: Any) -> Any:
    if isinstance(value, Prefixes):
        return sorted(value.texts())
    if isinstance(value, tuple):
        return sorted(map(_item_text, value))
    return value


def canonical_rule(rule: Any, cidrs: list[str] | None = None) -> dict[str, Any]:
    """A rule's semantic content as JSON-ready data (no source position; lists sorted).
    Fields added to the language later are left out while empty, so that a policy that
    does not use them keeps its revision (and is not reloaded by an upgrade). ``cidrs``:
    the rule's CIDR texts, sorted, when the caller has them."""
    content = {}
    for f in dataclasses.fields(rule):
        value = getattr(rule, f.name)
        if f.name == "source" or (f.name in _LATER_FIELDS and not value):
            continue
        if f.name == "cidrs" and cidrs is not None:
            content[f.name] = cidrs
            continue
        content[f.name] = _canonical_value(value)
    return content


_LATER_FIELDS = frozenset({"fqdns"})


def _rule_key(rule: Any) -> str:
    return _key_text(canonical_rule(rule))


def _key_text(content: dict[str, Any]) -> str:
    return json.dumps(content, sort_keys=True, separators=(",", ":"))


class RuleKeys:
    """Canonical texts of rules, remembered by identity: the rule order, the revision and
    the labels all need them, and a rule of 100,000 CIDRs takes tens of milliseconds to
    serialise. A compilation keeps its own (CompiledPolicy.keys), with each rule's sorted
    CIDR texts, so that a change of a few CIDRs (:meth:`derive`) costs what they cost.
    Holds the rules, so ids are not reused."""

    def __init__(self, known: dict[int, tuple[Any, str, list[str] | None]] | None = None) -> None:
        self._known = known or {}

    def __call__(self, rule: Any) -> str:
        return self._entry(rule)[1]

    def _entry(self, rule: Any) -> tuple[Any, str, list[str] | None]:
        found = self._known.get(id(rule))
        if found is None:
            content = canonical_rule(rule)
            found = self._known[id(rule)] = (rule, _key_text(content), content.get("cidrs"))
        return found

    def cidr_texts(self, rule: Any) -> list[str]:
        """The rule's CIDRs as sorted canonical texts (repeats kept)."""
        return self._entry(rule)[2] or []

    def derive(self, edits: Iterable[CidrEdit]) -> RuleKeys:
        """These keys and those of each edit's new rule, made from its old rule's sorted
        texts by taking out the removed CIDRs and putting in the added ones; the old
        rule's are left out."""
        derived = RuleKeys(dict(self._known))
        for edit in edits:
            texts = list(self.cidr_texts(edit.old))
            for network in edit.removed:
                text = network_text(network)
                at = bisect.bisect_left(texts, text)
                if at == len(texts) or texts[at] != text:
                    raise CompileError(f"{text} is not a CIDR of the rule it was removed from")
                del texts[at]
            for network in edit.added:
                bisect.insort(texts, network_text(network))
            content = canonical_rule(edit.new, texts)
            derived._known[id(edit.new)] = (edit.new, _key_text(content), texts)
            # the new rule replaced it: kept, it would be kept by every later derivation
            derived._known.pop(id(edit.old), None)
        return derived


def ordered_rules(
    rules: Iterable[Rule], keys: Callable[[Any], str] | None = None
) -> tuple[Rule, ...]:
    """A section's rules in canonical order, duplicates merged: rule i is bit i of the
    programs' masks and counter slot i. ``keys`` (a :class:`RuleKeys`) saves re-serialising
    rules already seen."""
    key_of = keys or _rule_key
    unique = {key_of(rule): rule for rule in rules}
    ordered = tuple(unique[key] for key in sorted(unique))
    if len(ordered) > MAX_RULES:
        raise CompileError(f"a section has {len(ordered)} rules; at most {MAX_RULES} are supported")
    return ordered


def _canonical_section(section: Any, keys: Callable[[Any], str]) -> dict[str, Any] | None:
    if section is None:
        return None
    return {"default": section.default, "rules": sorted({keys(r) for r in section.rules})}


def revision(
    policy: Policy,
    resolved_interfaces: dict[str, list[list[int]]] | None = None,
    keys: RuleKeys | None = None,
    device_paths: Sequence[DevicePath] = (),
) -> str:
    """First 16 hex chars of the sha256 of the policy's canonical content: name, mode and
    sections with their rules as sets. Source positions, rule order and targets do not
    count (targets say where programs go, not what they are). Interfaces resolved to
    ifindexes do count, per network hook in rule order, so that a new matching interface
    gives a new revision and reconciliation reloads. So do device paths: their numbers
    are in the (bound) rules, and what each path resolved to is added, so that a device
    node that appears, vanishes or changes gives a new revision."""
    network, sockets = policy.network, policy.sockets
    key_of = keys or _rule_key
    content: dict[str, Any] = {
        "name": policy.name,
        "mode": policy.mode,
        "network": None
        if network is None
        else {
            "ingress": _canonical_section(network.ingress, key_of),
            "egress": _canonical_section(network.egress, key_of),
        },
        "sockets": None
        if sockets is None
        else {
            "create": _canonical_section(sockets.create, key_of),
            "bind": _canonical_section(sockets.bind, key_of),
            "connect": _canonical_section(sockets.connect, key_of),
        },
        "devices": _canonical_section(policy.devices, key_of),
        "sysctl": _canonical_section(policy.sysctl, key_of),
        "interfaces": {
            hook: found for hook, found in sorted((resolved_interfaces or {}).items()) if any(found)
        },
    }
    if network is not None and network.egress is not None and not network.egress.fail_fast:
        content["egress_fail_fast"] = False  # absent by default: older revisions stay as they were
    if policy.dns != DnsSettings():  # likewise: only settings that differ from the defaults
        dns = policy.dns
        content["dns"] = [dns.min_ttl, dns.max_ttl, dns.max_learned, sorted(map(str, dns.servers))]
    if device_paths:  # absent otherwise, so that revisions without path rules stay as they were
        content["device_paths"] = sorted(
            [d.path, d.action, d.node.state, d.node.numbers()] for d in device_paths
        )
    text = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
