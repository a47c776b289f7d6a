"""struct cgp_event (bpf/common.h) -> Event, and how events are shown. Pure: no syscalls."""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cgpolicy.contract import (
    DEFAULT_SLOT,
    DEVICE_ACCESS,
    DEVICE_TYPES,
    EVENT,
    EVENT_HOOKS,
    PACKET_HOOKS,
    SOCKET_ADDRESS_HOOKS,
    EventFlag,
)

_FAMILIES = {socket.AF_INET: "inet", socket.AF_INET6: "inet6"}
_TYPES = {1: "stream", 2: "dgram", 3: "raw", 5: "seqpacket"}
_PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp", 255: "raw"}
_DEVICE_TYPES = {code: name for name, code in DEVICE_TYPES.items() if name != "any"}
_read_event = EVENT.record_reader()
# The flags as plain ints: ``int & IntFlag`` builds a flag object, several per event
_AUDIT, _TASK, _WRITE, _TRUNCATED, _CONNECT, _SENDMSG = map(
    int,
    (
        EventFlag.AUDIT,
        EventFlag.TASK,
        EventFlag.WRITE,
        EventFlag.TRUNCATED,
        EventFlag.CONNECT,
        EventFlag.SENDMSG,
    ),
)


def _access(bits: int) -> str:
    return "".join(letter for letter, bit in DEVICE_ACCESS.items() if bits & bit)


def _address(family: int, raw: bytes) -> str | None:
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Address(raw[:4]))
    if family == socket.AF_INET6:
        return str(ipaddress.IPv6Address(raw))
    return None


def monotonic_to_wall_ns() -> int:
    """Offset that turns a bpf_ktime_get_ns() (CLOCK_MONOTONIC) stamp into wall-clock ns."""
    return time.time_ns() - time.monotonic_ns()


@dataclass
class Event:
    time_ns: int  # wall clock, ns since the epoch
    cgroup_id: int
    hook: str
    rule: int  # counter slot: rule index, DEFAULT_SLOT for the section default
    audit: bool
    what: dict[str, Any]
    pid: int | None = None
    tid: int | None = None
    comm: str | None = None
    policy: str | None = None
    cgroup: str | None = None  # path relative to the cgroup2 root, when found
    rule_text: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "event",
            "time": datetime.fromtimestamp(self.time_ns / 1e9, UTC).isoformat(),
            "time_ns": self.time_ns,
            "policy": self.policy,
            "cgroup": self.cgroup,
            "cgroup_id": self.cgroup_id,
            "hook": self.hook,
            "rule": "default" if self.rule == DEFAULT_SLOT else self.rule,
            "rule_text": self.rule_text,
            "action": "would-deny" if self.audit else "deny",
            "pid": self.pid,
            "tid": self.tid,
            "comm": self.comm,
            **self.what,
        }

    def describe(self) -> str:
        """The denied action in a few words: "connect tcp 169.254.169.254:80"."""
        w = self.what
        if self.hook in PACKET_HOOKS and w.get("refused_at"):
            host = w.get("dst") or "?"
            host = f"[{host}]" if ":" in host else host
            where = f"{host}:{w.get('dport') or 0}"
            protocol = w.get("protocol") or "?"
            return f"{self.hook} {protocol} -> {where} refused at {w['refused_at']}"
        if self.hook in PACKET_HOOKS:
            text = f"{self.hook} {w.get('protocol') or '?'} {w.get('src') or '?'}"
            if w.get("sport"):
                text += f":{w['sport']}"
            text += f" -> {w.get('dst') or '?'}"
            if w.get("dport"):
                text += f":{w['dport']}"
            return text
        if self.hook == "sock_create":
            return f"socket {w['family']} {w['socket_type']} protocol {w['protocol']}"
        if self.hook in SOCKET_ADDRESS_HOOKS:
            verb = self.hook.rstrip("46")
            host = w.get("address") or "?"
            host = f"[{host}]" if ":" in host else host
            return f"{verb} {w.get('protocol') or '?'} {host}:{w.get('port')}"
        if self.hook == "device":
            return f"device {w['device_type']} {w['major']}:{w['minor']} {w['access']}"
        if self.hook == "sysctl":
            return f"sysctl {w['access']} {w['name']}"
        return self.hook

    def line(self) -> str:
        """One readable line: time, action, policy, cgroup, rule, what, process."""
        stamp = datetime.fromtimestamp(self.time_ns / 1e9).astimezone()
        when = stamp.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + stamp.strftime("%z")
        action = "WOULD-DENY" if self.audit else "DENY"
        rule = "default" if self.rule == DEFAULT_SLOT else f"rule {self.rule}"
        if self.rule_text:
            rule += f" ({self.rule_text})"
        cgroup = self.cgroup if self.cgroup is not None else f"cgroup id {self.cgroup_id}"
        text = f"{when} {action} {self.policy or '?'} {cgroup} {self.describe()} [{rule}]"
        if self.pid is not None:
            text += f" pid {self.pid} ({self.comm})"
        return text


def decode(raw: bytes, wall_offset_ns: int = 0) -> Event:
    """One ring buffer record. ``wall_offset_ns`` from :func:`monotonic_to_wall_ns`."""
    if len(raw) < EVENT.size:
        raise ValueError(f"event record is {len(raw)} B, expected {EVENT.size}")
    record = _read_event(raw)
    family, kind, protocol = record.family, record.type, record.protocol
    flags = record.flags
    hook = EVENT_HOOKS.get(record.hook, f"hook{record.hook}")
    what: dict[str, Any] = {}
    if hook in PACKET_HOOKS:
        what = {
            "family": _FAMILIES.get(family, family),
            "protocol": _PROTOCOLS.get(protocol, protocol) if protocol else None,
            "src": _address(family, record.saddr),
            "dst": _address(family, record.daddr),
            "sport": record.sport or None,
            "dport": record.dport or None,
        }
        if hook == "egress":  # refused at the system call, before any packet (bpf/net.c)
            at = "connect" if flags & _CONNECT else "sendmsg" if flags & _SENDMSG else None
            what["refused_at"] = at
    elif hook == "sock_create":
        what = {
            "family": _FAMILIES.get(family, family),
            "socket_type": _TYPES.get(kind, kind),
            "protocol": _PROTOCOLS.get(protocol, protocol),
        }
    elif hook in SOCKET_ADDRESS_HOOKS:
        what = {
            "family": _FAMILIES.get(family, family),
            "socket_type": _TYPES.get(kind, kind),
            "protocol": _PROTOCOLS.get(protocol, protocol),
            "address": _address(family, record.daddr),
            "port": record.dport,
        }
    elif hook == "device":
        what = {
            "device_type": _DEVICE_TYPES.get(kind, kind),
            "major": record.major,
            "minor": record.minor,
            "access": _access(record.access),
        }
    elif hook == "sysctl":
        what = {
            "name": record.name.split(b"\0", 1)[0].decode(errors="replace"),
            "access": "write" if flags & _WRITE else "read",
            "truncated": bool(flags & _TRUNCATED),
        }
    task = bool(flags & _TASK)
    return Event(
        time_ns=record.time_ns + wall_offset_ns,
        cgroup_id=record.cgroup_id,
        hook=hook,
        rule=record.rule,
        audit=bool(flags & _AUDIT),
        what=what,
        pid=record.pid if task else None,
        tid=record.tid if task else None,
        comm=record.comm.split(b"\0", 1)[0].decode(errors="replace") if task else None,
    )
