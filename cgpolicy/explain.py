"""`cgpolicy explain`: what policies decide about one action, and which rule decides.

The grammar of an action (docs/explain.md):

    egress|ingress PROTO ADDR[:PORT] [--icmp-type N] [--interface NAME]
    connect|sendmsg|bind PROTO ADDR:PORT
    socket FAMILY TYPE [PROTO]
    device c|b MAJOR:MINOR ACCESS  |  device /dev/PATH ACCESS
    sysctl read|write NAME

IPv6 addresses with a port are written ``[fd00::1]:443``. The decision itself comes from the
reference evaluator (:mod:`cgpolicy.reference`); this module parses, finds the policies
(from files, or from what cgpolicy applied to a cgroup and its ancestors) and renders.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cgpolicy import reference
from cgpolicy.policy.describe import rule_text
from cgpolicy.policy.model import IP_PROTOCOLS, SOCKET_FAMILIES, SOCKET_TYPES, Policy
from cgpolicy.policy.problems import shown
from cgpolicy.reference import (
    DeviceAccess,
    Packet,
    SocketAddress,
    SocketCreate,
    SysctlAccess,
    Verdict,
)

if TYPE_CHECKING:
    from cgpolicy.compiler.spec import DeviceNode
    from cgpolicy.kernel.devices import DeviceBinding

ACTION_WORDS = ("egress", "ingress", "connect", "sendmsg", "bind", "socket", "device", "sysctl")

_PROTOCOL_NAMES = {number: name for name, number in IP_PROTOCOLS.items()}
_FAMILY_NAMES = {number: name for name, number in SOCKET_FAMILIES.items()}
_TYPE_NAMES = {number: name for name, number in SOCKET_TYPES.items()}
# socket(AF_INET/AF_INET6, type, 0): the protocol the kernel picks, which the hook sees.
_DEFAULT_PROTOCOL = {SOCKET_TYPES["stream"]: 6, SOCKET_TYPES["dgram"]: 17}


class ExplainError(Exception):
    """The action or the options are not valid input (exit status 2)."""


@dataclass
class ParsedAction:
    action: reference.Action
    text: str  # canonical rendering, e.g. "egress tcp 10.1.2.3:443"
    notes: list[str] = field(default_factory=list)
    # What each hook the action runs sees (reference.socket_address_views); all must allow.
    views: list[reference.Action] = field(default_factory=list)

    def evaluate(self, policy: Policy) -> Verdict:
        """The policy's verdict: the first view it denies, else the first view's."""
        verdicts = [reference.evaluate(policy, view) for view in self.views or [self.action]]
        return next((v for v in verdicts if not v.allowed), verdicts[0])


# --- parsing ----------------------------------------------------------------------------------


# Longer than any number explain takes may be written (0x, 0o, 0b or decimal, with '_'):
# refused before int() reads it (4,300 decimal digits raise; hexadecimal has no limit).
_MAX_NUMBER_TEXT = 32


def _plain(text: str) -> str:
    """``text`` as is in a message when it is short and printable, else quoted and cut."""
    return text if len(text) <= 200 and text.isprintable() else shown(text)


def _number(text: str, what: str, high: int) -> int:
    if len(text.strip()) > _MAX_NUMBER_TEXT:
        raise ExplainError(f"{what} {shown(text)} is outside 0..{high}")
    try:
        value = int(text, 0)
    except ValueError:
        raise ExplainError(f"{what} {shown(text)} is not a number") from None
    if not 0 <= value <= high:
        raise ExplainError(f"{what} {shown(value)} is outside 0..{high}")
    return value


def _named_number(text: str, names: dict[str, int], what: str, high: int) -> int:
    if text.lower() in names:
        return names[text.lower()]
    if not text.lstrip("-").isdigit():
        known = ", ".join(names)
        raise ExplainError(f"unknown {what} {shown(text)} (one of {known}, or a number)")
    return _number(text, what, high)


def parse_protocol(text: str) -> int:
    return _named_number(text, IP_PROTOCOLS, "protocol", 255)


def parse_endpoint(text: str, port_required: bool) -> tuple[reference.IPAddress, int | None]:
    """``10.1.2.3``, ``10.1.2.3:443``, ``fd00::1``, ``[fd00::1]`` or ``[fd00::1]:443``."""
    host, port_text = text, None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ExplainError(f"{shown(text)}: write an IPv6 address with a port as [ADDR]:PORT")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ExplainError(f"{shown(host)} is not an IPv4 or IPv6 address") from None
    if port_text is None:
        if port_required:
            raise ExplainError(f"{shown(text)} needs a port: ADDR:PORT, or [ADDR]:PORT for IPv6")
        return address, None
    return address, _number(port_text, "port", 65535)


def _endpoint_text(address: reference.IPAddress, port: int | None) -> str:
    text = str(address)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        text = f"::ffff:{address.ipv4_mapped}"
    if port is None:
        return text
    return f"[{text}]:{port}" if address.version == 6 else f"{text}:{port}"


def _interface(text: str) -> str:
    if text.isascii() and text.isdigit():
        digits = text.lstrip("0") or "0"
        if len(digits) > 10 or int(digits) > 2**31 - 1:  # an ifindex is a positive C int
            raise ExplainError(f"interface index {shown(text)} is outside 1..{2**31 - 1}")
        try:
            return socket.if_indextoname(int(digits))
        except OSError:
            raise ExplainError(f"no network interface has index {digits}") from None
    if not 1 <= len(text) <= 15:
        raise ExplainError(f"interface name {shown(text)} must have 1 to 15 characters")
    return text


def _protocol_text(protocol: int) -> str:
    return _PROTOCOL_NAMES.get(protocol, str(protocol))


def parse_action(
    words: Sequence[str], icmp_type: int | None = None, interface: str | None = None
) -> ParsedAction:
    """An action from its words (see the module docstring); ExplainError if invalid."""
    if not words:
        raise ExplainError("no action given")
    verb, args = words[0].lower(), list(words[1:])
    if verb not in ACTION_WORDS:
        raise ExplainError(f"unknown action {shown(words[0])} (one of {', '.join(ACTION_WORDS)})")
    if (icmp_type is not None or interface is not None) and verb not in ("egress", "ingress"):
        raise ExplainError("--icmp-type and --interface apply to egress and ingress only")
    if verb in ("egress", "ingress"):
        return _packet(verb, args, icmp_type, interface)
    if verb in ("connect", "sendmsg", "bind"):
        return _socket_address(verb, args)
    if verb == "socket":
        return _socket_create(args)
    if verb == "device":
        return _device(args)
    return _sysctl(args)


def _expect(args: list[str], low: int, high: int, shape: str) -> None:
    if not low <= len(args) <= high:
        raise ExplainError(f"expected {shape}")


def _packet(
    direction: str, args: list[str], icmp_type: int | None, interface: str | None
) -> ParsedAction:
    _expect(args, 2, 2, f"{direction} PROTO ADDR[:PORT]")
    protocol = parse_protocol(args[0])
    address, port = parse_endpoint(args[1], port_required=False)
    notes = []
    if port is not None and protocol not in (reference.TCP, reference.UDP):
        raise ExplainError(f"a port needs protocol tcp or udp, not {args[0]}")
    if icmp_type is not None:
        if protocol not in (reference.ICMP, reference.ICMPV6):
            raise ExplainError(f"--icmp-type needs protocol icmp or icmpv6, not {args[0]}")
        _number(str(icmp_type), "ICMP type", 255)
    if protocol in (reference.TCP, reference.UDP) and port is None:
        notes.append(
            "no port given: evaluated as a packet whose port cannot be read (a non-first "
            "fragment): deny rules with ports match it, allow rules with ports do not"
        )
    if protocol in (reference.ICMP, reference.ICMPV6) and icmp_type is None:
        notes.append(
            "no --icmp-type given: evaluated as an ICMP packet whose type cannot be read: "
            "deny rules with icmpTypes match it, allow rules with icmpTypes do not"
        )
    name = _interface(interface) if interface is not None else None
    packet = Packet(direction, address, protocol, port, icmp_type, name)  # type: ignore[arg-type]
    text = f"{direction} {_protocol_text(protocol)} {_endpoint_text(address, port)}"
    if icmp_type is not None:
        text += f" --icmp-type {icmp_type}"
    if name is not None:
        text += f" --interface {name}"
    return ParsedAction(packet, text, notes)


def _socket_address(operation: str, args: list[str]) -> ParsedAction:
    _expect(args, 2, 2, f"{operation} PROTO ADDR:PORT")
    protocol = parse_protocol(args[0])
    address, port = parse_endpoint(args[1], port_required=True)
    assert port is not None
    notes = []
    if operation == "sendmsg" and protocol != reference.UDP:
        notes.append("the sendmsg hook runs for unconnected UDP sockets only")
    if protocol not in (reference.TCP, reference.UDP):
        notes.append(
            f"protocol {args[0]} is neither TCP nor UDP: rules' protocol and ports are "
            "unknown for it (deny rules match, allow rules need neither)"
        )
    action = SocketAddress(operation, address, port, protocol)  # type: ignore[arg-type]
    views: list[reference.Action] = list(
        reference.socket_address_views(operation, address, port, protocol)  # type: ignore[arg-type]
    )
    if views != [action]:
        ipv4 = views[-1].address  # type: ignore[union-attr]
        notes.append(
            f"UDP to an IPv4-mapped address from an AF_INET6 socket: the kernel checks "
            f"{'each send' if operation == 'connect' else 'it'} as sendmsg to {ipv4} (IPv4), "
            "so rules in the ::ffff: form do not meet it"
        )
    text = f"{operation} {_protocol_text(protocol)} {_endpoint_text(address, port)}"
    return ParsedAction(action, text, notes, views)


def _socket_create(args: list[str]) -> ParsedAction:
    _expect(args, 2, 3, "socket FAMILY TYPE [PROTO]")
    family = _named_number(args[0], SOCKET_FAMILIES, "family", 0xFFFF)
    kind = _named_number(args[1], SOCKET_TYPES, "socket type", 0xFFFF)
    protocol = parse_protocol(args[2]) if len(args) == 3 else 0
    notes = []
    if protocol == 0 and family in reference.INET_FAMILIES:
        if kind in _DEFAULT_PROTOCOL:
            protocol = _DEFAULT_PROTOCOL[kind]
            notes.append(
                f"protocol 0: the kernel picks {_protocol_text(protocol)}, which is what "
                "the hook sees"
            )
        elif kind == SOCKET_TYPES["raw"]:
            notes.append("socket() of a raw socket with protocol 0 fails (EPROTONOSUPPORT)")
    action = SocketCreate(family, kind, protocol)
    text = (
        f"socket {_FAMILY_NAMES.get(family, str(family))} {_TYPE_NAMES.get(kind, str(kind))} "
        f"{_protocol_text(protocol)}"
    )
    return ParsedAction(action, text, notes)


def _access(text: str) -> str:
    if not text or set(text) - set("rwm") or len(set(text)) != len(text):
        raise ExplainError(f"access {shown(text)}: write one or more of r, w, m without repeats")
    return "".join(letter for letter in "rwm" if letter in text)


def _device(args: list[str]) -> ParsedAction:
    if args and args[0].startswith("/"):
        _expect(args, 2, 2, "device /dev/PATH ACCESS")
        try:
            info = os.stat(args[0])
        except (OSError, ValueError) as error:  # ValueError: a NUL in the path
            reason = error.strerror if isinstance(error, OSError) else "not a valid path"
            raise ExplainError(
                f"{_plain(args[0])}: {reason} here; name the device by number instead: "
                "device c|b MAJOR:MINOR ACCESS"
            ) from None
        if stat.S_ISCHR(info.st_mode):
            kind = "char"
        elif stat.S_ISBLK(info.st_mode):
            kind = "block"
        else:
            raise ExplainError(f"{_plain(args[0])} is not a character or block device")
        major, minor = os.major(info.st_rdev), os.minor(info.st_rdev)
        access = _access(args[1])
        where = f" ({args[0]})"
    else:
        _expect(args, 3, 3, "device c|b MAJOR:MINOR ACCESS, or device /dev/PATH ACCESS")
        kinds = {"c": "char", "char": "char", "b": "block", "block": "block"}
        if args[0].lower() not in kinds:
            raise ExplainError(f"device type {shown(args[0])}: write c (char) or b (block)")
        kind = kinds[args[0].lower()]
        major_text, sep, minor_text = args[1].partition(":")
        if not sep:
            raise ExplainError(f"{shown(args[1])}: write MAJOR:MINOR, e.g. 1:3")
        major = _number(major_text, "major", 4095)
        minor = _number(minor_text, "minor", 1048575)
        access = _access(args[2])
        where = ""
    action = DeviceAccess(kind, major, minor, access)  # type: ignore[arg-type]
    return ParsedAction(action, f"device {kind[0]} {major}:{minor} {access}{where}")


def sysctl_slash_name(name: str) -> str:
    """Slash form: as is when it has a '/', else every '.' separates (as in policies)."""
    name = name.removeprefix("/proc/sys/")
    slash = name if "/" in name else name.replace(".", "/")
    if not slash or any(not part for part in slash.split("/")):
        raise ExplainError(f"sysctl name {shown(name)} has an empty component")
    return slash


def _sysctl(args: list[str]) -> ParsedAction:
    _expect(args, 2, 2, "sysctl read|write NAME")
    if args[0].lower() not in ("read", "write"):
        raise ExplainError(f"sysctl access {shown(args[0])}: write read or write")
    write = args[0].lower() == "write"
    name = sysctl_slash_name(args[1])
    notes = []
    if len(name.encode()) > reference.SYSCTL_NAME_MAX:
        notes.append(
            f"the name is longer than {reference.SYSCTL_NAME_MAX} bytes: the program cannot "
            "read it, so deny rules for the access match it and allow rules do not"
        )
    action = SysctlAccess(name, write)
    return ParsedAction(action, f"sysctl {'write' if write else 'read'} {name}", notes)


# --- explaining -------------------------------------------------------------------------------


@dataclass
class PolicyExplanation:
    """One policy's part: its verdict, or why it could not be explained."""

    name: str
    file: str | None
    policy: Policy | None = None
    verdict: Verdict | None = None
    cgroups: list[str] = field(default_factory=list)  # --cgroup: where it is attached
    problem: str | None = None  # why it cannot be explained


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


_lines_cache: dict[str, list[str]] = {}


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


# --- --cgroup: what cgpolicy applied ----------------------------------------------------------


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
    from cgpolicy.kernel.cgroup import CgroupError
    from cgpolicy.kernel.cgroup import cgroup_chain as chain_of

    try:
        relative, chain = chain_of(cgroup_root, given)
    except CgroupError as error:
        raise ExplainError(f"cgroup {_plain(given)}: {error}") from None
    return ("" if str(relative) == "." else str(relative)), chain


def explain_cgroup(
    cgroup_root: Path, bpf_dir: Path, given: str, action: ParsedAction, dev_root: Path | None = None
) -> Explanation:
    """Explain against every policy cgpolicy applied to the cgroup or one of its ancestors,
    each read again from the source file recorded in its pinned metadata (device paths
    resolved under ``dev_root`` as the next apply would, deny rules keeping the device they
    named when applied)."""
    from cgpolicy.kernel.applied import read_applied
    from cgpolicy.kernel.cgroup import cgroup_id_at
    from cgpolicy.kernel.devices import DEV_ROOT, remembered_denies
    from cgpolicy.policy.validate import load_paths

    relative, chain = cgroup_chain(cgroup_root, given)
    ids = {cid for path in chain if (cid := cgroup_id_at(path)) is not None}
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
