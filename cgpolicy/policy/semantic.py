"""Checks the JSON Schema cannot express, and the parsers that :mod:`build` shares with them.

The checks run on documents that may also have failed the schema, so they look only at values
of the expected type and leave the rest to the schema's messages.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from cgpolicy.contract import DNS_LABELS
from cgpolicy.policy.model import (
    DEFAULT_MAX_TTL,
    IPNetwork,
    NetworkRule,
    Policy,
    PortRange,
    SocketAddressRule,
    SourceLocation,
)
from cgpolicy.policy.prefixes import key_parts, make_key, network_of, prefix_key
from cgpolicy.policy.problems import SHOWN_CHARACTERS, Path, Problem, shown
from cgpolicy.policy.sysctl_patterns import TooManyStates, sysctl_dfa

MAX_CIDRS_PER_POLICY = 200_000
MAX_DEVICE_PATH_BYTES = 4095  # PATH_MAX less the terminating NUL
MAX_NAME_BYTES = 255  # NAME_MAX: one path component

_PORT = re.compile(r"([0-9]+)(?:-([0-9]+))?\Z")
_DOTTED_COMPONENT = re.compile(r"[A-Za-z0-9_*-]+\Z")
_SLASH_COMPONENT = re.compile(r"[A-Za-z0-9_*.-]+\Z")
_CGROUP_MOUNTS = ("/sys/fs/cgroup/unified/", "/sys/fs/cgroup/")


@dataclass(frozen=True)
class Finding:
    """A problem at a path of one document; the caller knows the file and positions."""

    path: Path
    message: str
    hint: str | None = None


class InvalidValue(ValueError):
    """A value the parsers below refuse, with an operator-facing message and hint."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


# -- parsers shared with build ------------------------------------------------------------


# The semantic checks and the model builder both parse every CIDR, and the reconcile service
# reads a changed file again whole: a load keeps what it parsed (as prefix keys, see
# policy/prefixes.py), and the next load starts from it, so the second pass and a file read
# again with one prefix changed parse only what is new. Only the last load's CIDRs are kept.
MAX_KEPT_CIDRS = 1 << 18
_this_load: dict[str, int] = {}
_last_load: dict[str, int] = {}


def cidr_key(text: str) -> int:
    """A strict network as its prefix key: a bare address is /32 or /128; host bits set
    are an error."""
    key = _this_load.get(text)
    if key is None:
        key = _last_load.get(text)
        if key is None:
            key = _parse_key(text)
        if len(_this_load) < MAX_KEPT_CIDRS:
            _this_load[text] = key
    return key


def parse_cidr(text: str) -> IPNetwork:
    """:func:`cidr_key`'s prefix as an ipaddress network."""
    return network_of(cidr_key(text))


def end_of_load(keep: bool = True) -> None:
    """The CIDRs parsed since the last call are the ones kept for the next load (none
    without ``keep``); those of the load before are dropped."""
    global _this_load, _last_load
    _last_load, _this_load = (_this_load if keep else {}), {}


def _parse_key(text: str) -> int:
    key = _plain_key(text)
    if key is not None:
        return key
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError:
        pass
    else:
        if getattr(network.network_address, "scope_id", None):
            raise InvalidValue(
                f"{shown(text)} names a zone, which cannot be matched",
                "the programs see addresses, not zones: leave out the %zone",
            )
        return prefix_key(network)
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise InvalidValue(
            f"{shown(text)} is not an IPv4 or IPv6 address or CIDR prefix",
            "write e.g. 10.0.0.0/8, 192.0.2.1 or fd00::/8",
        ) from None
    raise InvalidValue(f"{_as_is(text)} has host bits set", f"did you mean {_as_is(str(network))}?")


def _as_is(text: str) -> str:
    """A text as written when it is printable ASCII, else as ``shown`` quotes it: a zone
    may hold any character, and a message is one line."""
    return text if text.isascii() and text.isprintable() else shown(text)


def _prefix_lengths(longest: int) -> dict[str, int]:
    """Every text of 1-3 ASCII digits whose value is at most ``longest`` (so "08" and "008"
    too, as ip_network reads them), mapped to that value: one dict lookup per CIDR."""
    texts = (f"{n:0{width}d}" for width in (1, 2, 3) for n in range(min(longest + 1, 10**width)))
    return {text: int(text) for text in texts}


_LENGTHS4 = _prefix_lengths(32)
_LENGTHS6 = _prefix_lengths(128)
_HOST_BITS4 = [(1 << (32 - length)) - 1 for length in range(33)]
_HOST_BITS6 = [(1 << (128 - length)) - 1 for length in range(129)]


def _plain_key(text: str) -> int | None:
    """The common cases, several times as fast as ip_network (policies may list 200,000
    CIDRs): what inet_pton reads, with a length of 1-3 digits. Accepts a subset of what
    ip_network accepts (no '%' scope, say); anything else, and host bits set, take the
    slow path, which explains."""
    address, slash, length = text.partition("/")
    v6 = ":" in address
    try:
        packed = socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, address)
    except (OSError, ValueError):  # ValueError: a NUL (YAML's "\0") or a lone surrogate
        return None
    if v6:
        prefix = _LENGTHS6.get(length) if slash else 128
        host_bits = _HOST_BITS6
    else:
        prefix = _LENGTHS4.get(length) if slash else 32
        host_bits = _HOST_BITS4
    if prefix is None:
        return None
    value = int.from_bytes(packed, "big")
    if value & host_bits[prefix]:
        return None
    return make_key(value, prefix, v6)


def parse_port_range(value: int | float | str) -> PortRange:
    """443 or "443" or "8000-8100" (1 <= low <= high <= 65535); YAML's 443.0 is 443."""
    if not isinstance(value, str):
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not whole:
            raise InvalidValue(f"{shown(value)} is not a port number")
        low = high = _port(int(value))
    else:
        match = _PORT.match(value)
        if match is None:
            raise InvalidValue(f'{shown(value)} is not a port or a range such as "8000-8100"')
        low = _port(match.group(1))
        high = _port(match.group(2) or match.group(1))
    if low > high:
        raise InvalidValue(f"port range {shown(value)} is reversed", f'write "{high}-{low}"')
    return PortRange(low, high)


def _port(number: int | str) -> int:
    """A port from an int or a string of ASCII digits, any number of them: those that
    cannot be a port are refused before int() reads them (it refuses 4,300 digits)."""
    if isinstance(number, str):
        digits = number.lstrip("0") or "0"
        if len(digits) > 5:
            text = digits if len(digits) <= SHOWN_CHARACTERS else shown(digits)
            raise InvalidValue(f"port {text} is out of range 1-65535")
        number = int(digits)
    if not 1 <= number <= 65535:
        raise InvalidValue(f"port {shown(number)} is out of range 1-65535")
    return number


def normalise_sysctl_name(name: str) -> str:
    """The slash form the kernel reports. In dotted form '.' always separates; in slash form
    a component may contain '.' (net/ipv4/conf/eth0.100/forwarding)."""
    if name.startswith("/proc/sys/"):
        raise InvalidValue(
            f"sysctl name {name!r} is a file path",
            f"write {name.removeprefix('/proc/sys/')!r} (names are relative to /proc/sys)",
        )
    slash = "/" in name
    parts = name.split("/" if slash else ".")
    component = _SLASH_COMPONENT if slash else _DOTTED_COMPONENT
    for part in parts:
        if not part:
            raise InvalidValue(
                f"sysctl name {name!r} has an empty component",
                "remove the leading, trailing or doubled separator",
            )
        if not component.match(part) or part in (".", ".."):
            raise InvalidValue(
                f"sysctl name {name!r} has an invalid component {part!r}",
                "components are made of A-Z a-z 0-9 _ - and '*' globs",
            )
    return "/".join(parts)


def device_path_problem(path: str) -> InvalidValue | None:
    """Why ``path`` is not a well-formed device path, if it is not. Syntax only: what the
    path names is looked up by the node that applies the policy (``cgpolicy.kernel.devices``),
    so validation gives the same answer on every machine, with or without the device."""
    if not path.startswith("/"):
        return InvalidValue(f"device path {path!r} is not absolute", f"write '/dev/{path}'?")
    if any(ord(char) < 32 or char == "\x7f" for char in path):
        return InvalidValue(f"device path {path!r} contains a control character")
    if len(path.encode()) > MAX_DEVICE_PATH_BYTES:
        return InvalidValue(
            f"device path is {len(path.encode())} bytes long; at most "
            f"{MAX_DEVICE_PATH_BYTES} are allowed"
        )
    parts = path.split("/")[1:]
    if parts[0] != "dev":
        return InvalidValue(
            f"device path {path!r} is not under /dev",
            "device rules name nodes in /dev; for others, use type, major and minor",
        )
    if parts[1:] in ([], [""]):
        return InvalidValue(
            f"device path {path!r} names the /dev folder, not a device node",
            "name a node such as /dev/null, or use type: any",
        )
    for part in parts[1:]:
        if part == "":
            normal = "/" + "/".join(p for p in parts if p)
            return InvalidValue(f"device path {path!r} has an empty component", f"write {normal!r}")
        if part in (".", ".."):
            return InvalidValue(
                f"device path {path!r} has a {part!r} component; device paths are "
                "written without '.' or '..'"
            )
        if len(part.encode()) > MAX_NAME_BYTES:
            return InvalidValue(
                f"device path {path!r} has a component longer than {MAX_NAME_BYTES} bytes"
            )
    return None


def target_problem(text: str) -> InvalidValue | None:
    """Why a target path or glob would not stay inside the cgroup hierarchy, if it would not."""
    if text.startswith("/"):
        relative = text
        for mount in _CGROUP_MOUNTS:
            relative = relative.removeprefix(mount)
        return InvalidValue(
            f"{text!r} is absolute; targets are relative to the cgroup2 mount",
            f"write {relative.lstrip('/')!r}",
        )
    if text in ("", "."):
        return InvalidValue("the root cgroup cannot be a target")
    if any(ord(char) < 32 or char == "\x7f" for char in text):
        return InvalidValue(f"{text!r} contains a control character")
    for part in text.split("/"):
        if part == "":
            hint = "/".join(p for p in text.split("/") if p)
            return InvalidValue(f"{text!r} has an empty path component", f"write {hint!r}")
        if part in (".", ".."):
            return InvalidValue(
                f"{text!r} has a {part!r} component; targets must stay inside "
                "the cgroup hierarchy and be written without '.' or '..'"
            )
    return None


MAX_FQDN_LENGTH = 253  # a DNS name's text, without the trailing dot
MAX_FQDN_LABELS = DNS_LABELS  # the labels of a question name the kernel reads
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


def normalise_fqdn(text: str) -> str:
    """``text`` as rules and answers are compared: lowercase, without a trailing dot."""
    return text.lower().removesuffix(".")


def fqdn_problem(text: str) -> InvalidValue | None:
    """Why ``text`` is not a DNS name an `fqdns` rule can hold, or None: labels of 1-63
    letters, digits, '-' (not first or last) and '_'; at most 253 characters; a wildcard
    is a whole first label '*' with at least one more label after it."""
    name = normalise_fqdn(text)
    if not name:
        return InvalidValue(
            f"{shown(text)} is not a DNS name", "write a name such as api.example.com"
        )
    if len(name) > MAX_FQDN_LENGTH:
        return InvalidValue(
            f"{shown(text)} is {len(name)} characters long; a DNS name has at most "
            f"{MAX_FQDN_LENGTH}"
        )
    labels = name.split(".")
    if len(labels) > MAX_FQDN_LABELS:  # in a "*." pattern, '*' stands for a label at least
        return InvalidValue(
            f"{shown(text)} has {len(labels)} labels; the kernel reads question names of at "
            f"most {MAX_FQDN_LABELS}, so no answer could match it",
            "name a domain nearer the root",
        )
    if labels[0] == "*":
        if len(labels) < 2:
            return InvalidValue(
                f"{shown(text)} is a wildcard of nothing",
                "write '*.' in front of a domain, e.g. *.s3.amazonaws.com",
            )
        labels = labels[1:]
    for label in labels:
        if "*" in label:
            return InvalidValue(
                f"{shown(text)} has '*' inside a name; only a whole first label may be '*'",
                "write *.example.com for every name below example.com",
            )
        if not _LABEL.fullmatch(label):
            reason = "an empty label" if not label else f"the label {shown(label)}"
            return InvalidValue(
                f"{shown(text)} has {reason}",
                "labels are 1-63 letters, digits, '-' (not first or last) and '_'",
            )
    return None


# -- checks ------------------------------------------------------------------------------


def check_policy(data: Any) -> Iterator[Finding]:
    """Every semantic finding of one policy document, lazily (a hostile document may have a
    million bad values; the caller stops when it has enough)."""
    spec = _mapping(data, "spec")
    total = _count_cidrs(spec)
    if total > MAX_CIDRS_PER_POLICY:
        yield Finding(
            ("spec",),
            f"the policy lists {total:,} CIDRs; at most {MAX_CIDRS_PER_POLICY:,} are allowed "
            "(so they were not checked one by one)",
            "merge adjacent prefixes or split the targets over several policies",
        )
    yield from _check_targets(spec)
    yield from _check_network(spec, check_cidrs=total <= MAX_CIDRS_PER_POLICY)
    yield from _check_sockets(spec, check_cidrs=total <= MAX_CIDRS_PER_POLICY)
    yield from _check_devices(spec)
    yield from _check_sysctl(spec)
    yield from _check_dns(spec)


def _rule_warning(
    policy: Policy, rule: NetworkRule | SocketAddressRule, field: str, message: str, hint: str
) -> Problem:
    at = rule.source or policy.source
    return Problem(
        at.file if at else "", at.line if at else 0, at.column if at else 0, field, message, hint
    )


def policy_warnings(policy: Policy) -> list[Problem]:
    """What a valid policy may not do as its writer expects: an `allow` by DNS name is as
    good as the DNS servers whose answers teach (any, unless spec.dns.servers names them);
    a `deny` by DNS name holds only for addresses the cgroup learned from an answer for
    that name (a process can use an address it learned elsewhere, or resolve over HTTPS)."""
    sections: list[tuple[str, Sequence[NetworkRule | SocketAddressRule]]] = []
    if policy.network is not None:
        for direction in ("ingress", "egress"):
            section = getattr(policy.network, direction)
            if section is not None:
                sections.append((f"spec.network.{direction}", section.rules))
    if policy.sockets is not None and policy.sockets.connect is not None:
        sections.append(("spec.sockets.connect", policy.sockets.connect.rules))
    warnings = []
    allows = [
        (where, index, rule)
        for where, rules in sections
        for index, rule in enumerate(rules)
        if rule.action == "allow" and rule.fqdns
    ]
    if allows and not policy.dns.servers:
        where, index, rule = allows[0]
        warnings.append(
            _rule_warning(
                policy,
                rule,
                f"{where}.rules[{index}]",
                "an answer from any DNS server the workload may query teaches names: a "
                "workload that can query a server it controls can make this rule's names "
                "match any address",
                "name the resolvers in spec.dns.servers, and allow port 53 to them only",
            )
        )
    for where, rules in sections:
        for index, rule in enumerate(rules):
            if rule.action == "deny" and rule.fqdns:
                warnings.append(
                    _rule_warning(
                        policy,
                        rule,
                        f"{where}.rules[{index}]",
                        "a deny by DNS name is best-effort: it covers the addresses the "
                        "target cgroup learns from DNS answers for the name, not one "
                        "learned another way (a hard-coded address, DNS over HTTPS or TLS)",
                        "deny port 853 (DNS over TLS) too, or allow by name over a "
                        "default-deny egress",
                    )
                )
    return warnings


def duplicate_name(name: str, where: SourceLocation, first: SourceLocation) -> Problem:
    """The problem for a policy whose name another loaded policy already uses."""
    return Problem(
        where.file,
        where.line,
        where.column,
        "metadata.name",
        f"policy name {name!r} is already used at {first.file}:{first.line}:{first.column}",
        "policy names must be unique among all loaded policies",
    )


def _mapping(data: Any, key: str) -> dict[str, Any]:
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, dict) else {}


def _list(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key)
    return value if isinstance(value, list) else []


def _rules(section: dict[str, Any], path: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    for index, rule in enumerate(_list(section, "rules")):
        if isinstance(rule, dict):
            yield path + ("rules", index), rule


def _check_targets(spec: dict[str, Any]) -> Iterator[Finding]:
    for index, target in enumerate(_list(spec, "targets")):
        if not isinstance(target, dict):
            continue
        for key in ("path", "glob"):
            value = target.get(key)
            problem = target_problem(value) if isinstance(value, str) else None
            if problem is not None:
                yield Finding(("spec", "targets", index, key), problem.message, problem.hint)


def _check_network(spec: dict[str, Any], check_cidrs: bool) -> Iterator[Finding]:
    network = _mapping(spec, "network")
    for direction in ("ingress", "egress"):
        section = _mapping(network, direction)
        for path, rule in _rules(section, ("spec", "network", direction)):
            protocol = rule.get("protocol", "any")
            if check_cidrs:
                yield from _check_cidrs(rule, path, protocol)
            yield from _check_fqdns(rule, path)
            yield from _check_ports(rule, path)
            if "ports" in rule and protocol not in ("tcp", "udp"):
                yield Finding(
                    path + ("ports",),
                    f"ports need protocol tcp or udp, not {shown(protocol)}",
                    "add 'protocol: tcp' or 'protocol: udp' (one rule each for both)",
                )
            if "icmpTypes" in rule and protocol not in ("icmp", "icmpv6"):
                yield Finding(
                    path + ("icmpTypes",),
                    f"icmpTypes need protocol icmp or icmpv6, not {shown(protocol)}",
                    "add 'protocol: icmp' or 'protocol: icmpv6'",
                )


def _check_sockets(spec: dict[str, Any], check_cidrs: bool) -> Iterator[Finding]:
    sockets = _mapping(spec, "sockets")
    for hook in ("bind", "connect"):
        section = _mapping(sockets, hook)
        for path, rule in _rules(section, ("spec", "sockets", hook)):
            if check_cidrs:
                yield from _check_cidrs(rule, path, "any")
            if hook == "bind" and "fqdns" in rule:
                yield Finding(
                    path + ("fqdns",),
                    "fqdns name remote hosts; a bind rule matches the local address",
                    "name the local addresses with cidrs, or move the rule to sockets.connect",
                )
            else:
                yield from _check_fqdns(rule, path)
            yield from _check_ports(rule, path)


def _check_fqdns(rule: dict[str, Any], path: Path) -> Iterator[Finding]:
    if "fqdns" in rule and "cidrs" in rule:
        yield Finding(
            path + ("fqdns",),
            "a rule names its remote hosts by cidrs or by fqdns, not both",
            "write two rules, one with cidrs and one with fqdns",
        )
    for index, text in enumerate(_list(rule, "fqdns")):
        if isinstance(text, str) and (problem := fqdn_problem(text)) is not None:
            yield Finding(path + ("fqdns", index), problem.message, problem.hint)


def _check_dns(spec: dict[str, Any]) -> Iterator[Finding]:
    dns = _mapping(spec, "dns")
    low, high = dns.get("minTTL"), dns.get("maxTTL", DEFAULT_MAX_TTL)
    if isinstance(low, int) and isinstance(high, int) and low > high:
        yield Finding(
            ("spec", "dns", "minTTL"),
            f"minTTL {low} is above maxTTL {high}",
            "minTTL raises short TTLs, maxTTL cuts long ones: minTTL <= maxTTL",
        )
    for index, text in enumerate(_list(dns, "servers")):
        if not isinstance(text, str):
            continue
        try:
            parse_cidr(text)
        except InvalidValue as error:
            yield Finding(("spec", "dns", "servers", index), error.message, error.hint)


def _check_cidrs(rule: dict[str, Any], path: Path, protocol: Any) -> Iterator[Finding]:
    """Syntax and host bits of each CIDR, and its family against an ICMP protocol."""
    for index, text in enumerate(_list(rule, "cidrs")):
        if not isinstance(text, str):
            continue
        problem = cidr_item_problem(text, protocol)
        if problem is not None:
            yield Finding(path + ("cidrs", index), *problem)


def cidr_item_problem(text: str, protocol: Any) -> tuple[str, str | None] | None:
    """What is wrong with one `cidrs` item of a rule of ``protocol`` (message, hint), if
    anything: the checks of a CIDR item look at that item alone (policy/splice.py relies
    on it)."""
    try:
        key = cidr_key(text)
    except InvalidValue as error:
        return error.message, error.hint
    version = {"icmp": 4, "icmpv6": 6}.get(protocol) if isinstance(protocol, str) else None
    listed = key_parts(key)[0]
    if version is not None and listed != version:
        other = "icmpv6" if protocol == "icmp" else "icmp"
        return (
            f"{text} is IPv{listed} and cannot match protocol {protocol}",
            f"use protocol {other} for IPv{listed} in a separate rule",
        )
    return None


def _check_ports(rule: dict[str, Any], path: Path) -> Iterator[Finding]:
    for index, port in enumerate(_list(rule, "ports")):
        if isinstance(port, str):
            try:
                parse_port_range(port)
            except InvalidValue as error:
                yield Finding(path + ("ports", index), error.message, error.hint)


def _check_devices(spec: dict[str, Any]) -> Iterator[Finding]:
    section = _mapping(spec, "devices")
    for path, rule in _rules(section, ("spec", "devices")):
        numbered = [key for key in ("type", "major", "minor") if key in rule]
        device = rule.get("path")
        if device is not None and numbered:
            yield Finding(
                path + ("path",),
                f"a device rule takes either path or {'/'.join(numbered)}, not both",
                "path is resolved to type, major and minor on the node that applies the policy",
            )
        elif device is None and "type" not in rule:
            yield Finding(
                path,
                "a device rule needs either type (char, block or any) or path",
                "e.g. {action: allow, path: /dev/null, access: rw}",
            )
        problem = device_path_problem(device) if isinstance(device, str) else None
        if problem is not None:
            yield Finding(path + ("path",), problem.message, problem.hint)


def _check_sysctl(spec: dict[str, Any]) -> Iterator[Finding]:
    section = _mapping(spec, "sysctl")
    names = []
    for path, rule in _rules(section, ("spec", "sysctl")):
        name = rule.get("name")
        if isinstance(name, str):
            try:
                names.append(normalise_sysctl_name(name))
            except InvalidValue as error:
                yield Finding(path + ("name",), error.message, error.hint)
    if names:
        yield from _check_sysctl_matcher(names)


def _check_sysctl_matcher(names: list[str]) -> Iterator[Finding]:
    """The program matches all sysctl patterns with one automaton of bounded size; a set
    of globs that needs a bigger one is refused here, not when the policy is applied."""
    try:
        sysctl_dfa(names)
    except TooManyStates as error:
        yield Finding(("spec", "sysctl", "rules"), str(error), "split the rules over policies")


def _count_cidrs(spec: dict[str, Any]) -> int:
    sections = [_mapping(_mapping(spec, "network"), d) for d in ("ingress", "egress")]
    sections += [_mapping(_mapping(spec, "sockets"), h) for h in ("bind", "connect")]
    return sum(len(_list(rule, "cidrs")) for s in sections for _, rule in _rules(s, ()))
