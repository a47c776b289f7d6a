"""The actions `cgpolicy explain` takes, parsed into the reference evaluator's terms.

The grammar (docs/explain.md):

    egress|ingress PROTO ADDR[:PORT] [--icmp-type N] [--interface NAME]
    connect|sendmsg|bind PROTO ADDR:PORT
    socket FAMILY TYPE [PROTO]
    device c|b MAJOR:MINOR ACCESS  |  device /dev/PATH ACCESS
    sysctl read|write NAME

IPv6 addresses with a port are written ``[fd00::1]:443``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from cgpolicy import reference
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
        """The policy's verdict: the first view it denies, else the first view network.egress
        refuses at connect time (reference.egress_at_connect), else the first view's."""
        views = self.views or [self.action]
        verdicts = [reference.evaluate(policy, view) for view in views]
        denied = next((v for v in verdicts if not v.allowed), None)
        if denied is not None:
            return denied
        for view in views:
            if isinstance(view, SocketAddress):
                refused = reference.egress_at_connect(policy, view)
                if refused is not None:
                    return refused
        return verdicts[0]

    def with_names(self, names: frozenset[str]) -> ParsedAction:
        """This action with the DNS names whose answers gave its remote address
        (``reference.Packet.names``), in every view: what `fqdns` rules match."""

        def told(action: reference.Action) -> reference.Action:
            if isinstance(action, Packet | SocketAddress):
                return dataclasses.replace(action, names=names)
            return action

        return dataclasses.replace(
            self, action=told(self.action), views=[told(view) for view in self.views]
        )

    def with_learned(self, learned: frozenset[reference.Rule]) -> ParsedAction:
        """This action with the `fqdns` rules the kernel learned its remote address for
        (``reference.Packet.learned``), in every view."""

        def told(action: reference.Action) -> reference.Action:
            if isinstance(action, Packet | SocketAddress):
                return dataclasses.replace(action, learned=learned)
            return action

        return dataclasses.replace(
            self, action=told(self.action), views=[told(view) for view in self.views]
        )


# Longer than any number explain takes may be written (0x, 0o, 0b or decimal, with '_'):
# refused before int() reads it (4,300 decimal digits raise; hexadecimal has no limit).
_MAX_NUMBER_TEXT = 32


def plain(text: str) -> str:
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
        from cgpolicy.kernel.devices import device_at

        try:
            found = device_at(args[0])
        except (OSError, ValueError) as error:  # ValueError: a NUL in the path
            reason = error.strerror if isinstance(error, OSError) else "not a valid path"
            raise ExplainError(
                f"{plain(args[0])}: {reason} here; name the device by number instead: "
                "device c|b MAJOR:MINOR ACCESS"
            ) from None
        if found is None:
            raise ExplainError(f"{plain(args[0])} is not a character or block device")
        kind, major, minor = found
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
    # no name under /proc/sys has them; `test --kernel` opens /proc/sys/NAME for real
    if any(part in (".", "..") for part in slash.split("/")) or "\0" in slash:
        raise ExplainError(f"sysctl name {shown(name)}: no sysctl has a '.', '..' or NUL there")
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
