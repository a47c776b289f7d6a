"""`cgpolicy explain --cgroup`: explain against what cgpolicy applied to a cgroup and its
ancestors (``kernel.applied``), each policy read again from the file its metadata names,
and list the other owners' programs that also decide."""

from __future__ import annotations

import contextlib
import ipaddress
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cgpolicy import reference
from cgpolicy.contract import SECTION_HOOKS
from cgpolicy.explain.actions import ExplainError, ParsedAction, plain
from cgpolicy.explain.explanation import (
    Explanation,
    NameMatch,
    PolicyExplanation,
    bind_devices_here,
    name_rules,
)
from cgpolicy.policy.describe import rule_text
from cgpolicy.policy.model import Policy
from cgpolicy.policy.problems import shown
from cgpolicy.reference import DeviceAccess, Packet, SocketAddress, SocketCreate

if TYPE_CHECKING:
    from cgpolicy.kernel.applied import AppliedPolicy
    from cgpolicy.kernel.devices import DeviceBinding


def hooks_for(action: reference.Action) -> list[str]:
    """The kernel hooks whose programs decide ``action``."""
    if isinstance(action, Packet):
        return [action.direction]
    if isinstance(action, SocketCreate):
        return ["sock_create"]
    if isinstance(action, SocketAddress):
        return [f"{action.operation}{action.address.version}"]
    if isinstance(action, DeviceAccess):
        return ["device"]
    return ["sysctl"]


def cgroup_chain(cgroup_root: Path, given: str) -> tuple[str, list[Path]]:
    """The cgroup relative to the mount, and its path with every ancestor (itself first)."""
    from cgpolicy.kernel.cgroup import (
        CgroupError,
        LeavesHierarchy,
        cgroup_and_ancestors,
        is_cgroup,
    )

    try:
        relative, chain = cgroup_and_ancestors(cgroup_root, given)
    except LeavesHierarchy:
        raise ExplainError(f"{plain(given)} leaves the cgroup2 hierarchy") from None
    except CgroupError as error:
        raise ExplainError(f"cgroup {shown(given)}: {error}") from None
    if not is_cgroup(chain[0]):
        raise ExplainError(f"no cgroup {plain(str(relative))} under {cgroup_root}")
    return ("" if str(relative) == "." else str(relative)), chain


def explain_cgroup(
    cgroup_root: Path, bpf_dir: Path, given: str, action: ParsedAction, dev_root: Path | None = None
) -> Explanation:
    """Explain against every policy cgpolicy applied to the cgroup or one of its ancestors,
    each read again from the source file recorded in its pinned metadata (device paths
    resolved under ``dev_root`` as the next apply would, deny rules keeping the device they
    named when applied)."""
    from cgpolicy.kernel.applied import read_applied
    from cgpolicy.kernel.cgroup import cgroup_id
    from cgpolicy.kernel.devices import DEV_ROOT, remembered_denies
    from cgpolicy.policy.validate import load_paths

    relative, chain = cgroup_chain(cgroup_root, given)
    chain_ids: list[int] = []  # the cgroup's, then its ancestors'
    for path in chain:
        with contextlib.suppress(OSError):
            chain_ids.append(cgroup_id(path))
    ids = set(chain_ids)
    relatives = {"" if p == cgroup_root else str(p.relative_to(cgroup_root)) for p in chain}
    explanation = Explanation(action, [], cgroup=relative)
    applied = read_applied(bpf_dir)
    for applied_policy in applied.values():
        meta = applied_policy.meta
        if meta is None:
            explanation.notes.append(
                f"{applied_policy.folder} holds no readable metadata (a broken apply?): "
                "not explained"
            )
            continue
        where = sorted(
            path for cid, path in meta.cgroups.items() if cid in ids or path in relatives
        )
        if not where:
            continue
        item = PolicyExplanation(meta.name, meta.source, cgroups=where)
        explanation.policies.append(item)
        if not meta.source:
            item.problem = "its metadata records no source file"
            continue
        loaded = load_paths([meta.source])
        found = [p for p in loaded.policies if p.name == meta.name]
        if not found:
            problems = "; ".join(p.format() for p in loaded.problems[:3])
            item.problem = f"{meta.source} no longer holds a valid policy {meta.name!r}" + (
                f" ({problems})" if problems else ""
            )
            continue
        remembered = remembered_denies(meta.devices)
        bound, binding, notes = bind_devices_here(found[0], dev_root or DEV_ROOT, remembered)
        if isinstance(action.action, DeviceAccess):
            explanation.notes += notes
        item.policy = bound
        # learned addresses are the target's: the nearest cgroup up the chain it applies to
        target = next((cid for cid in chain_ids if cid in meta.cgroups), None)
        sections = [reference.section_name(action.action)] if name_rules(bound, action) else []
        if _egress_names_at_connect(bound, action):  # failFast: egress's fqdns rules decide too
            sections.append("network.egress")
        if sections and target is not None:
            learned: frozenset[reference.Rule] = frozenset()
            for section_name in sections:
                more, names, note = _learned_here(
                    applied_policy, bound, action, target, section_name
                )
                learned |= more
                item.names = item.names or names
                if note and note not in explanation.notes:
                    explanation.notes.append(note)
            item.verdict = action.with_learned(learned).evaluate(bound)
        else:
            item.verdict = action.evaluate(bound)
        changed = _changed_since_applied(found[0], meta.revision, binding)
        if changed:
            explanation.notes.append(
                f"{meta.name}: {meta.source} changed since it was applied (revision "
                f"{meta.revision} applied, the file is {changed}): explained from the file"
            )
    ours = set().union(*(policy.program_ids() for policy in applied.values()))
    explanation.foreign = _foreign_programs(chain[0], ours, hooks_for(action.action))
    return explanation


def _egress_names_at_connect(policy: Policy, action: ParsedAction) -> bool:
    """Whether network.egress, which refuses connects at once (failFast), has rules naming
    `fqdns` that may decide ``action`` (a TCP/UDP connect or sendmsg)."""
    call = action.action
    egress = policy.network.egress if policy.network else None
    return (
        isinstance(call, reference.SocketAddress)
        and call.operation != "bind"
        and egress is not None
        and any(rule.fqdns for rule in egress.rules)
    )


def _learned_here(
    applied: AppliedPolicy,
    policy: Policy,
    action: ParsedAction,
    cgroup: int,
    section_name: str,
) -> tuple[frozenset[reference.Rule], NameMatch, str | None]:
    """The `fqdns` rules of ``section_name`` (the deciding section's, or network.egress's
    for a connect it may refuse) that the kernel's learned entry for (the target
    ``cgroup``, the remote address) matches, as the programs see it: rule i of the section's
    canonical order is bit i of the entry's mask for the section. What to say of it, and a
    note when the map cannot be read or the file's rules are not the applied ones."""
    from cgpolicy.compiler.canonical import ordered_rules
    from cgpolicy.kernel.applied import monotonic_ns, read_learned

    address = reference.remote_address(action.action)
    assert address is not None  # name_rules() found rules: a section with remote hosts
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped  # learned entries hold IPv4 answers as IPv4
    section = reference.section_of(policy, section_name)
    patterns = tuple(dict.fromkeys(p for rule in section.rules if rule.fqdns for p in rule.fqdns))
    state = read_learned(applied)
    if state is None:
        note = (
            f"{applied.name}: its learned map cannot be read (applied before DNS names, or "
            "being replaced): rules naming fqdns were explained as matching nothing"
        )
        return frozenset(), NameMatch(address, patterns, ()), note
    entry = next((e for e in state.entries if e.cgroup_id == cgroup and e.address == address), None)
    if entry is None:
        return frozenset(), NameMatch(address, patterns, ()), None
    now = monotonic_ns()
    mask = entry.rules.get(section_name, 0) if entry.live(now) else 0
    ordered = ordered_rules(section.rules)
    meta = applied.meta
    rules = meta.rules if meta else {}  # every hook of a section has the same labels
    labels = next((rules[h] for h in SECTION_HOOKS[section_name] if rules.get(h)), [])
    matched, unsure = [], False
    for index, rule in enumerate(ordered):
        if not mask >> index & 1:
            continue
        label = labels[index].get("text") if index < len(labels) else None
        if rule.fqdns and label == rule_text(section_name, rule):
            matched.append(rule)
        else:
            unsure = True
    unmatched = None
    if unsure or mask >> len(ordered):
        unmatched = (
            f"{applied.name}: the file's {section_name} rules are not those applied: some "
            f"rules the kernel learned {address} for could not be found in it"
        )
    found = NameMatch(
        address,
        patterns,
        tuple(matched),
        entry.name,
        round((now - entry.learned_ns) / 1e9),
        math.ceil((entry.expires_ns - now) / 1e9),
    )
    return frozenset(matched), found, unmatched


def _changed_since_applied(
    policy: Policy, applied: str, devices: DeviceBinding | None = None
) -> str | None:
    from cgpolicy.compiler.compile import compile_policy

    try:
        resolver = None
        if policy.network is not None:
            from cgpolicy.kernel.interfaces import resolve_interfaces

            resolver = resolve_interfaces
        current = compile_policy(policy, resolver, resolve_device=devices).revision
    except Exception:  # noqa: BLE001 - best effort: the explanation stands without it
        return None
    return None if current == applied else current


def _foreign_programs(cgroup: Path, ours: set[int], hooks: list[str]) -> list[dict[str, Any]]:
    """Programs that run at these hooks for the cgroup (its own and inherited) and that
    cgpolicy did not load."""
    from cgpolicy.kernel.attachments import effective_programs, program_name

    return [
        {"hook": hook, "id": prog_id, "name": program_name(prog_id)}
        for hook, prog_id in effective_programs(cgroup, hooks)
        if prog_id not in ours
    ]
