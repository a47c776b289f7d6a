"""The contract with bpf/*.c: every struct layout and constant the Python shares with the
BPF programs, stated once for the Python side.

The programs read the maps the compiler fills (:mod:`cgpolicy.compiler`) and write
the counters, rate-limit windows and deny events that ``audit`` and ``events`` read, so
both sides must agree byte for byte. bpf/common.h states the contract for the C; nothing
in cgpolicy outside this module spells the struct format of a map key or value or of an
event record, or repeats one of these constants: it takes them from here.

A struct is a :class:`Layout`: its C name and its members in order, each with its C type,
from which follow every member's offset (C's natural alignment, none in a packed struct),
the size and a little-endian :class:`struct.Struct` with the padding in it.

How it is checked: tests/kernel/test_contract.py writes a ``_Static_assert`` for the
offset, size and type of every member, the size and alignment of every struct and the
value of every constant in :data:`C_CONSTANTS`, and compiles them over bpf/common.h with
bcc, the compiler that builds the programs: a member moved or retyped on one side only
fails the test, naming the struct and member. tests/unit/test_contract_layouts.py checks that
each layout agrees with its own ``struct.Struct``.

Pure: the standard library only, no I/O.
"""

from __future__ import annotations

import collections
import enum
import functools
import itertools
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

U32 = struct.Struct("<I")  # a plain __u32: array map keys, sysctl_next values
U64 = struct.Struct("<Q")  # a plain __u64: rule masks (LPM, hash and array values)

# struct format of each scalar C type; an array of __u8 or char is one bytes value ("Ns")
_SCALARS = {"__u8": "B", "__u16": "H", "__u32": "I", "__u64": "Q", "char": "c"}
_BYTES = ("__u8", "char")


@dataclass(frozen=True, slots=True)
class Field:
    """One member of a C struct and where the C compiler puts it."""

    name: str
    c_type: str  # of one element: "__u64", "char", "struct cgp_verdict"
    count: int  # array length; 0: not an array
    offset: int
    size: int  # sizeof the member (the whole array)
    align: int
    format: str  # its part of the struct's format, without padding
    layout: Layout | None  # the struct of a struct member (or of the array's elements)

    @property
    def c_declared_type(self) -> str:
        """The member's C type as a type name: ``__u64[5]``, ``struct cgp_verdict``."""
        return f"{self.c_type}[{self.count}]" if self.count else self.c_type

    @property
    def is_bytes(self) -> bool:
        """An array of __u8 or char: one ``bytes`` value."""
        return bool(self.count) and self.c_type in _BYTES


Member = tuple[str, "str | Layout"] | tuple[str, "str | Layout", int]


class Layout:
    """``struct <c_name>`` of bpf/common.h: members given as (name, C type) or (name, C type,
    array length), where the C type is a scalar (``__u32``) or another Layout.

    :meth:`pack` and :meth:`unpack_from` take and give the values by member name (a struct
    member as a mapping, an array as a sequence, a byte array as ``bytes``); ``struct`` is
    the plain :class:`struct.Struct` for hot paths, its values in member order."""

    def __init__(self, c_name: str, *members: Member, packed: bool = False) -> None:
        self.c_name = c_name
        self.packed = packed
        self.fields: dict[str, Field] = {}
        formats: list[str] = []
        offset = 0
        align = 1
        for member in members:
            name, element = member[0], member[1]
            count = member[2] if len(member) == 3 else 0
            field = _field(name, element, count, offset, packed)
            if field.offset > offset:
                formats.append(f"{field.offset - offset}x")
            formats.append(field.format)
            self.fields[name] = field
            offset = field.offset + field.size
            align = max(align, field.align)
        self.align = align
        self.size = offset + -offset % align
        if self.size > offset:
            formats.append(f"{self.size - offset}x")
        self.format_body = "".join(formats)  # as a member of another struct: no byte order
        self.struct = struct.Struct("<" + self.format_body)
        # One value per member (no nested struct, no array but bytes): a named tuple type
        # for hot paths (deny events), nearly as fast as a bare struct.unpack
        flat = all(f.layout is None and (not f.count or f.is_bytes) for f in self.fields.values())
        self._record = collections.namedtuple(c_name, tuple(self.fields)) if flat else None

    def __repr__(self) -> str:
        return f"Layout(struct {self.c_name}, {self.size} B)"

    def pack(self, **values: Any) -> bytes:
        """The struct's bytes from every member's value, by name (padding zeroed)."""
        return self.struct.pack(*self._flatten(values))

    def unpack_from(self, buffer: bytes, offset: int = 0) -> dict[str, Any]:
        """Every member's value by name, from ``buffer`` at ``offset``."""
        return self._group(iter(self.struct.unpack_from(buffer, offset)))

    def record_reader(self) -> Callable[[bytes], Any]:
        """For hot paths (deny events): a function from a buffer to a named tuple of every
        member's value, for layouts with one value per member."""
        if self._record is None:
            raise TypeError(f"struct {self.c_name} has nested or array members")
        make = functools.partial(tuple.__new__, self._record)  # no length check: the struct
        unpack = self.struct.unpack_from
        return lambda buffer: make(unpack(buffer))

    def _flatten(self, values: Mapping[str, Any]) -> list[Any]:
        if values.keys() != self.fields.keys():
            missing = sorted(self.fields.keys() - values.keys())
            unknown = sorted(values.keys() - self.fields.keys())
            raise ValueError(f"struct {self.c_name}: missing {missing}, unknown {unknown}")
        flat: list[Any] = []
        for field in self.fields.values():
            value = values[field.name]
            if field.count and not field.is_bytes and len(value) != field.count:
                raise ValueError(
                    f"struct {self.c_name}.{field.name}: {len(value)} values for "
                    f"{field.c_declared_type}"
                )
            if field.layout is not None:
                for item in value if field.count else (value,):
                    flat.extend(field.layout._flatten(item))
            elif field.count and not field.is_bytes:
                flat.extend(value)
            else:
                flat.append(value)
        return flat

    def _group(self, flat: Iterator[Any]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for field in self.fields.values():
            nested = field.layout
            if nested is not None:
                items = [nested._group(flat) for _ in range(field.count or 1)]
                values[field.name] = tuple(items) if field.count else items[0]
            elif field.count and not field.is_bytes:
                values[field.name] = tuple(itertools.islice(flat, field.count))
            else:
                values[field.name] = next(flat)
        return values


def _field(name: str, element: str | Layout, count: int, end: int, packed: bool) -> Field:
    """The member ``name`` placed after ``end`` bytes of members."""
    if isinstance(element, Layout):
        c_type, size, align = f"struct {element.c_name}", element.size, element.align
        one = element.format_body
        form = one * max(count, 1)
    else:
        c_type, one = element, _SCALARS[element]
        size = align = struct.calcsize("<" + one)
        if count and element in _BYTES:
            form = f"{count}s"
        else:
            form = f"{count}{one}" if count else one
    align = 1 if packed else align
    offset = end + -end % align
    nested = element if isinstance(element, Layout) else None
    return Field(name, c_type, count, offset, size * max(count, 1), align, form, nested)


# --- rules, counters, verdicts ------------------------------------------------------------

MAX_RULES = 64  # CGP_MAX_RULES: rules per section, the bits of a rule mask
DEFAULT_SLOT = MAX_RULES  # CGP_DEFAULT_SLOT: the counter slot (and event rule) of the default
COUNTER_SLOTS = MAX_RULES + 1  # CGP_COUNTER_SLOTS: entries of the per-CPU array "counters"

# Head of every program's config value (array map "config", one entry, key 0).
VERDICT = Layout(
    "cgp_verdict",
    ("allow_mask", "__u64"),
    ("deny_mask", "__u64"),
    ("default_allow", "__u32"),  # the section default: 1 allow, 0 deny
    ("audit", "__u32"),  # mode audit: count would-be denials, deny nothing
)
# Value of the per-CPU array "counters", slot = rule index or DEFAULT_SLOT.
COUNTER = Layout("cgp_counter", ("allowed", "__u64"), ("denied", "__u64"))

# --- deny events ----------------------------------------------------------------------------

# Value of the per-CPU array "ratelimit" (one entry, key 0).
RATELIMIT = Layout(
    "cgp_ratelimit",
    ("window_start", "__u64"),
    ("dropped", "__u64"),  # events not emitted: over the limit, or the ring buffer full
    ("sent", "__u32"),
    ("limit", "__u32"),  # events per second per CPU
)

EVENT_NAME_MAX = 128  # CGP_EVENT_NAME_MAX: cgp_event.name, the sysctl name


class EventFlag(enum.IntFlag):
    """cgp_event.flags: CGP_EV_<NAME>."""

    AUDIT = 1  # audit mode: would have been denied, was allowed
    TASK = 2  # pid, tid and comm are set
    WRITE = 4  # sysctl: a write (else a read)
    TRUNCATED = 8  # sysctl: the name did not fit
    CONNECT = 16  # network.egress: refused at connect(), before any packet was sent
    SENDMSG = 32  # network.egress: refused at an unconnected UDP sendmsg()


# A record of the ring buffer "events" (one per policy, shared by its programs).
EVENT = Layout(
    "cgp_event",
    ("time_ns", "__u64"),
    ("cgroup_id", "__u64"),
    ("pid", "__u32"),
    ("tid", "__u32"),
    ("hook", "__u32"),  # HookProgram.event_code
    ("rule", "__u32"),  # counter slot
    ("flags", "__u32"),  # EventFlag
    ("family", "__u32"),
    ("type", "__u32"),  # socket type, or device type
    ("protocol", "__u32"),
    ("major", "__u32"),
    ("minor", "__u32"),
    ("access", "__u32"),  # DEVICE_ACCESS bits
    ("sport", "__u16"),
    ("dport", "__u16"),
    ("saddr", "__u8", 16),
    ("daddr", "__u8", 16),
    ("comm", "char", 16),
    ("name", "char", EVENT_NAME_MAX),
)

# --- the programs: hooks, sections, sources -------------------------------------------------


@dataclass(frozen=True, slots=True)
class HookProgram:
    """The program cgpolicy compiles a policy section onto one cgroup hook."""

    hook: str  # bpftool's attach-type name; also the pin folder's
    section: str  # the policy section it enforces
    source: str  # its C file in bpf/
    function: str  # its C function, also the kernel's program name
    event_code: int  # cgp_event.hook: CGP_HOOK_<HOOK>


HOOK_PROGRAMS: dict[str, HookProgram] = {
    program.hook: program
    for program in (
        HookProgram("ingress", "network.ingress", "net.c", "cgp_ingress", 1),
        HookProgram("egress", "network.egress", "net.c", "cgp_egress", 2),
        HookProgram("sock_create", "sockets.create", "sock.c", "cgp_sock_create", 3),
        HookProgram("bind4", "sockets.bind", "net.c", "cgp_bind4", 4),
        HookProgram("bind6", "sockets.bind", "net.c", "cgp_bind6", 5),
        HookProgram("connect4", "sockets.connect", "net.c", "cgp_connect4", 6),
        HookProgram("connect6", "sockets.connect", "net.c", "cgp_connect6", 7),
        # unconnected UDP: the sendmsg hooks enforce sockets.connect too
        HookProgram("sendmsg4", "sockets.connect", "net.c", "cgp_sendmsg4", 8),
        HookProgram("sendmsg6", "sockets.connect", "net.c", "cgp_sendmsg6", 9),
        HookProgram("device", "devices", "device.c", "cgp_device", 10),
        HookProgram("sysctl", "sysctl", "sysctl.c", "cgp_sysctl", 11),
    )
}


def names_variant(function: str) -> str:
    """The variant of a net.c program for policies whose rules name fqdns: it reads the
    addresses learned from DNS answers (and, at ingress, learns them). The plain one has
    none of that code, which makes it several times cheaper to verify; the kernel name
    (prog_name) stays the plain one's."""
    return f"{function}_names"


def family_variant(function: str, ipv4: bool, ipv6: bool) -> str:
    """The variant of a plain net.c program that walks only the prefix indexes of the
    families its section lists prefixes of (``ipv4``, ``ipv6``): F with both, F_4 or F_6
    with one, F_0 with none (bpf/net.c `fam`). An empty index finds no rule, so leaving
    its walk out changes no verdict, and the verifier walks that much less at each load.
    The kernel name (prog_name) stays the plain one's."""
    if ipv4 and ipv6:
        return function
    return f"{function}_{4 if ipv4 else 6 if ipv6 else 0}"


# policy section -> the hooks its programs run at, in the order above
SECTION_HOOKS: dict[str, tuple[str, ...]] = {
    section: tuple(p.hook for p in HOOK_PROGRAMS.values() if p.section == section)
    for section in dict.fromkeys(p.section for p in HOOK_PROGRAMS.values())
}


@dataclass(frozen=True, slots=True)
class ConnectCheck:
    """network.egress checked at connect time (bpf/net.c cgp_eg_*): a program of its own
    per cgroup_sock_addr hook, running on the egress program's maps, that fails a TCP/UDP
    connect() or UDP sendmsg() with EPERM when egress surely drops its packets. It has its
    own pin folder (``slot``), since the hook may also run the policy's sockets.connect
    program; the kernel runs both (AND). Its refusals count on, and are reported as, the
    egress program's (events: hook egress, flag CONNECT or SENDMSG)."""

    slot: str  # the policy's program slot: its pin folder, plan steps, drift
    hook: str  # the kernel hook it attaches to
    function: str  # its C function, also the kernel's program name


EGRESS_AT_CONNECT: dict[str, ConnectCheck] = {
    check.slot: check
    for check in (
        ConnectCheck("egress@connect4", "connect4", "cgp_eg_connect4"),
        ConnectCheck("egress@connect6", "connect6", "cgp_eg_connect6"),
        ConnectCheck("egress@sendmsg4", "sendmsg4", "cgp_eg_sendmsg4"),
        ConnectCheck("egress@sendmsg6", "sendmsg6", "cgp_eg_sendmsg6"),
    )
}
# every program slot a policy may have: the hooks of HOOK_PROGRAMS and the connect checks
PROGRAM_SLOTS: tuple[str, ...] = (*HOOK_PROGRAMS, *EGRESS_AT_CONNECT)


def attach_hook(slot: str) -> str:
    """The kernel hook a policy's program slot attaches to (the slot itself for every
    program but the connect checks)."""
    check = EGRESS_AT_CONNECT.get(slot)
    return check.hook if check else slot


# cgp_event.hook -> the hook
EVENT_HOOKS: dict[int, str] = {p.event_code: p.hook for p in HOOK_PROGRAMS.values()}
# cgroup_skb hooks (events name both ends), and cgroup_sock_addr hooks (the syscall's address)
PACKET_HOOKS = SECTION_HOOKS["network.ingress"] + SECTION_HOOKS["network.egress"]
SOCKET_ADDRESS_HOOKS = SECTION_HOOKS["sockets.bind"] + SECTION_HOOKS["sockets.connect"]

# --- net.c ----------------------------------------------------------------------------------

# cgp_net_config.proto[i] holds the rules accepting protocol PROTO_SLOTS[i] (CGP_PROTO_<NAME>);
# "other" is any other protocol, which exactly the rules with protocol any accept.
PROTO_SLOTS = ("tcp", "udp", "icmp", "icmpv6", "other")

NET_CONFIG = Layout(
    "cgp_net_config",
    ("v", VERDICT),
    ("any_cidr", "__u64"),  # rules without cidrs
    ("any_port", "__u64"),  # rules without ports
    ("any_icmp", "__u64"),  # rules without icmpTypes (every rule on sock_addr hooks)
    ("any_iface", "__u64"),  # rules without interfaces (every rule on sock_addr hooks)
    ("proto", "__u64", len(PROTO_SLOTS)),
    ("fqdn_rules", "__u64"),  # rules naming fqdns: they match an address through `learned`
    ("dns_slot", "__u32"),  # this section's slot of cgp_learned.rules (DNS_SLOTS)
    ("dns_learn", "__u32"),  # ingress: learn from DNS answers
    ("min_ttl", "__u32"),  # seconds
    ("max_ttl", "__u32"),
    ("dns_any_server", "__u32"),  # egress: any server's answers teach (no spec.dns.servers)
    ("pad", "__u32"),
)

# DNS names: what the ingress program learns from answers, per cgroup
DNS_LABELS = 32  # CGP_DNS_LABELS: labels of a question name at most
DNS_NAME_BYTES = 256  # CGP_DNS_NAME_BYTES
DNS_ANSWERS = 16  # CGP_DNS_ANSWERS: answer records read per answer at most
DNS_ANSWERS_PER_RUN = 2  # CGP_DNS_ANSWERS_PER_RUN
DNS_JUMP_QUESTION, DNS_JUMP_ANSWERS, DNS_JUMP_LEARN = 0, 1, 2  # CGP_DNS_JUMP_*: dns_jump slots
DNS_JUMPS = 3  # CGP_DNS_JUMPS
# The sections whose rules may name fqdns, each with its own rule numbering (CGP_DNS_SLOT_*)
DNS_SLOTS = {"network.egress": 0, "network.ingress": 1, "sockets.connect": 2}
PENDING_KEY = Layout("cgp_pending_key", ("cookie", "__u64"), ("id", "__u32"), ("pad", "__u32"))
PENDING = Layout("cgp_pending", ("expires_ns", "__u64"), ("server", "__u8", 16))
DNS_PENDING_NS = 30_000_000_000  # CGP_DNS_PENDING_NS: an answer later than this teaches nothing
LEARNED_KEY = Layout("cgp_learned_key", ("cgroup_id", "__u64"), ("addr", "__u8", 16))
LEARNED = Layout(
    "cgp_learned",
    ("expires_ns", "__u64"),  # CLOCK_MONOTONIC (bpf_ktime_get_coarse_ns)
    ("learned_ns", "__u64"),  # when the last answer for it arrived
    ("rules", "__u64", len(DNS_SLOTS)),
    ("netns", "__u64"),  # the network namespace cookie of the socket the answer reached
    ("name_id", "__u32"),  # the last answer's most specific pattern: 1-based, in the policy's names
    ("pad", "__u32"),
)
NAME_ENTRY = Layout(
    "cgp_name_entry",
    ("exact", "__u64", len(DNS_SLOTS)),
    ("wildcard", "__u64", len(DNS_SLOTS)),
    ("exact_name", "__u32"),  # cgp_learned.name_id of this name, 0 if no rule names it exactly
    ("wildcard_name", "__u32"),  # and of "*." + this name
)
DNS_STATS = Layout(  # per CPU
    "cgp_dns_stats", ("learned", "__u64"), ("full", "__u64"), ("unasked", "__u64")
)
DNS_SEEN_WORDS = 1024  # CGP_DNS_SEEN_WORDS: dns_seen, a bit per address slot (see seen_slot)
CLOCK = Layout("cgp_clock", ("jiffies", "__u64"), ("ns", "__u64"))  # dns_clock, per CPU
DNS_TARGET_LEVELS = 8  # CGP_DNS_TARGET_LEVELS: distinct depths of a policy's target cgroups
DNS_SCOPE = Layout(
    "cgp_dns_scope",
    ("count", "__u32"),
    ("level", "__u32", DNS_TARGET_LEVELS),  # deepest first; the root cgroup is depth 0
    ("pad", "__u32"),
)
DNS_KEY = Layout("cgp_dns_key", ("k0", "__u64"), ("k1", "__u64"))
DNS_SCRATCH = Layout(  # only the programs read it; here for its size
    "cgp_dns_scratch",
    ("name", "__u8", DNS_NAME_BYTES + 64),
    ("label_hash", "__u64", DNS_LABELS),
    ("rules", "__u64", len(DNS_SLOTS)),
    ("labels", "__u32"),
    ("len", "__u32"),
    ("off", "__u32"),
    ("answers_left", "__u32"),
    ("cname_ttl", "__u32"),
    ("name_id", "__u32"),
    ("base", "__u32"),
    ("alias", "__u32"),
    ("found", "__u32"),
    ("ttl", "__u32", DNS_ANSWERS),
    ("addr", "__u8", DNS_ANSWERS * 16),
)

# The rule maps of net.c hold two copies of their contents, generation 0 and 1, and the
# one-entry array "generation" names the copy the programs read (bpf/net.c, above the
# maps). The compiler writes copy 0; copy_key() places an entry in the other copy.


def copy_key(map_type: str, max_entries: int, key: bytes, gen: int) -> bytes:
    """``key`` of copy 0 of a two-copy map, moved to copy ``gen``: an array's index by
    ``gen * max_entries // 2``, a hash key's ``gen`` field (its last four bytes)."""
    if map_type == "array":
        return U32.pack(U32.unpack(key)[0] + gen * (max_entries // 2))
    if map_type == "hash":
        return key[:-4] + U32.pack(gen)
    raise ValueError(f"a {map_type} map holds no copies")


# A value of the rule map "ports" (bpf/net.c cgp_port_mask), per port high byte: block 0,
# the rules of all 256 ports (mask); else their masks port by port in "port_blocks", from
# entry (block - 1) * 256 of a copy, whose size (entries) is copy_size
PORT_HI = Layout("cgp_port_hi", ("mask", "__u64"), ("block", "__u32"), ("copy_size", "__u32"))
# spec.dns.servers (one copy: a change of names reloads the policy)
SERVER_LPM_KEY = Layout("cgp_server_lpm", ("prefixlen", "__u32"), ("addr", "__u8", 16))
IFACE_KEY = Layout("cgp_iface_key", ("ifindex", "__u32"), ("gen", "__u32"))

# The prefix indexes of IPv6 and IPv4 (bpf/net.c cgp_cidr_index, cgpolicy/compiler/cidr6.py):
# the maps cidr6_root + cidr6_slots and cidr4_root + cidr4_slots, of the same layouts; an
# IPv4 prefix is keyed as the index address's top 32 bits.
CIDR4_PROBES = 6  # CGP_CIDR4_PROBES: lengths probed at most per IPv4 address
CIDR6_PROBES = 8  # CGP_CIDR6_PROBES: lengths probed at most per IPv6 address
CIDR6_SPAN = 8  # CGP_CIDR6_SPAN: slots scanned at most per probe, from the key's home slot
CIDR6_LIST = 7  # CGP_CIDR6_LIST: bytes of a list (a slot's or the root's): <= 6 lengths, 0
CIDR6_HASH_MUL = 0x5851F42D4C957F2D  # CGP_CIDR6_HASH_MUL: the hash (cgp_cidr_hash)
CIDR6_HASH_LO = 0x14057B7EF767814F  # CGP_CIDR6_HASH_LO
# Value of the arrays "cidr6_root" and "cidr4_root" (one entry per copy).
CIDR6_ROOT = Layout(
    "cgp_root6",
    ("mask", "__u64"),  # rules listing ::/0 (0.0.0.0/0)
    ("shift", "__u8"),  # 64 - log2(table slots): a hash's top bits are its home slot
    ("next", "__u8", CIDR6_LIST),  # lengths to probe first, longest first, 0-terminated
)
# Value of the arrays "cidr6_slots" and "cidr4_slots": a stored prefix or a marker, keyed
# by (len, hi, lo).
CIDR6_SLOT = Layout(
    "cgp_slot6",
    ("addr", "__u8", 16),  # the address masked to len, as a little-endian 128-bit integer
    ("mask", "__u64"),  # OR-propagated over every stored prefix containing the key
    ("len", "__u8"),  # 1..128; 0: an empty slot
    ("next", "__u8", CIDR6_LIST),  # lengths to probe inside this entry, longest first
)
# Subprograms (net.c cgp_cidr_walk4: the IPv4 walk of an IPv4-mapped address): a program
# calls subprogram i as the helper number SUBPROGRAM_BASE + i (CGP_SUBPROG_*), and the loader
# appends the function and makes the call a BPF-to-BPF one, to a global function (verified
# once, on its own): it takes a pointer to SUBPROGRAM_ARGS and returns a __u64.
SUBPROGRAM_BASE = 0x7C000000  # CGP_SUBPROG_BASE: far above any helper number
SUBPROGRAMS = ("cgp_cidr_walk4",)
SUBPROGRAM_ARGS = Layout(
    "cgp_cidr_args", ("hi", "__u64"), ("lo", "__u64"), ("gen", "__u32"), ("pad", "__u32")
)

# --- sock.c ---------------------------------------------------------------------------------

SOCKET_FAMILY_SLOTS = 64  # CGP_FAMILY_SLOTS
SOCKET_TYPE_SLOTS = 16  # CGP_TYPE_SLOTS
SOCKET_PROTOCOL_SLOTS = 256  # CGP_PROTOCOL_SLOTS

CREATE_CONFIG = Layout(
    "cgp_create_config",
    ("v", VERDICT),
    ("any_family", "__u64"),
    ("any_type", "__u64"),
    ("any_protocol", "__u64"),
    ("family", "__u64", SOCKET_FAMILY_SLOTS),  # value -> rules accepting it
    ("type", "__u64", SOCKET_TYPE_SLOTS),
    ("protocol", "__u64", SOCKET_PROTOCOL_SLOTS),
)

# --- device.c -------------------------------------------------------------------------------

DEVICE_ANY = 0xFFFFFFFF  # CGP_DEV_ANY: any major or minor ('*')
# a rule's type: CGP_DEV_TYPE_ANY, BPF_DEVCG_DEV_BLOCK, BPF_DEVCG_DEV_CHAR (also an event's)
DEVICE_TYPES = {"any": 0, "block": 1, "char": 2}
# The type of a path rule whose path names no device here: no access has it, so the rule
# matches nothing, allow or deny, while keeping its bit and counter slot. Python only.
DEVICE_TYPE_NEVER = 3
# rights: BPF_DEVCG_ACC_READ, _WRITE, _MKNOD, in the order they are written ("rwm")
DEVICE_ACCESS = {"r": 2, "w": 4, "m": 1}

DEVICE_RULE = Layout(
    "cgp_dev_rule",
    ("bit", "__u64"),  # 1 << rule index
    ("type", "__u32"),  # DEVICE_TYPES, or DEVICE_TYPE_NEVER
    ("major", "__u32"),  # or DEVICE_ANY
    ("minor", "__u32"),  # or DEVICE_ANY
    ("access", "__u32"),  # DEVICE_ACCESS bits
)
DEVICE_CONFIG = Layout(
    "cgp_dev_config",
    ("v", VERDICT),
    ("nrules", "__u32"),
    ("pad", "__u32"),
    ("rules", DEVICE_RULE, MAX_RULES),
)

# --- sysctl.c -------------------------------------------------------------------------------

SYSCTL_DEAD_STATE = 0  # CGP_SYSCTL_DEAD: no pattern can match any more
SYSCTL_START_STATE = 1  # CGP_SYSCTL_START: nothing read yet

SYSCTL_CONFIG = Layout(
    "cgp_sysctl_config",
    ("v", VERDICT),
    ("read_mask", "__u64"),  # rules whose access includes read
    ("write_mask", "__u64"),  # rules whose access includes write
    ("nclasses", "__u32"),
    ("byte_class", "__u8", 256),  # byte -> character class of the DFA
)

# --- what the check compares ----------------------------------------------------------------

LAYOUTS: tuple[Layout, ...] = (
    VERDICT,
    COUNTER,
    RATELIMIT,
    EVENT,
    NET_CONFIG,
    PENDING_KEY,
    PENDING,
    LEARNED_KEY,
    LEARNED,
    NAME_ENTRY,
    DNS_STATS,
    DNS_SCOPE,
    CLOCK,
    DNS_KEY,
    DNS_SCRATCH,
    PORT_HI,
    SERVER_LPM_KEY,
    IFACE_KEY,
    CIDR6_ROOT,
    CIDR6_SLOT,
    SUBPROGRAM_ARGS,
    CREATE_CONFIG,
    DEVICE_RULE,
    DEVICE_CONFIG,
    SYSCTL_CONFIG,
)

# Every constant above under its name in bpf/common.h, or in the kernel's UAPI bpf.h.
C_CONSTANTS: dict[str, int] = {
    "CGP_MAX_RULES": MAX_RULES,
    "CGP_DEFAULT_SLOT": DEFAULT_SLOT,
    "CGP_COUNTER_SLOTS": COUNTER_SLOTS,
    "CGP_EVENT_NAME_MAX": EVENT_NAME_MAX,
    **{f"CGP_EV_{name}": flag.value for name, flag in EventFlag.__members__.items()},
    **{f"CGP_HOOK_{p.hook.upper()}": p.event_code for p in HOOK_PROGRAMS.values()},
    **{f"CGP_PROTO_{name.upper()}": slot for slot, name in enumerate(PROTO_SLOTS)},
    "CGP_PROTO_N": len(PROTO_SLOTS),
    "CGP_CIDR4_PROBES": CIDR4_PROBES,
    "CGP_CIDR6_PROBES": CIDR6_PROBES,
    "CGP_CIDR6_SPAN": CIDR6_SPAN,
    "CGP_CIDR6_LIST": CIDR6_LIST,
    "CGP_CIDR6_HASH_MUL": CIDR6_HASH_MUL,
    "CGP_CIDR6_HASH_LO": CIDR6_HASH_LO,
    "CGP_SUBPROG_BASE": SUBPROGRAM_BASE,
    **{
        f"CGP_SUBPROG_{name.removeprefix('cgp_').upper()}": SUBPROGRAM_BASE + index
        for index, name in enumerate(SUBPROGRAMS)
    },
    "CGP_DNS_LABELS": DNS_LABELS,
    "CGP_DNS_NAME_BYTES": DNS_NAME_BYTES,
    "CGP_DNS_ANSWERS": DNS_ANSWERS,
    "CGP_DNS_ANSWERS_PER_RUN": DNS_ANSWERS_PER_RUN,
    "CGP_DNS_JUMP_QUESTION": DNS_JUMP_QUESTION,
    "CGP_DNS_JUMP_ANSWERS": DNS_JUMP_ANSWERS,
    "CGP_DNS_JUMP_LEARN": DNS_JUMP_LEARN,
    "CGP_DNS_JUMPS": DNS_JUMPS,
    **{f"CGP_DNS_SLOT_{s.split('.')[1].upper()}": slot for s, slot in DNS_SLOTS.items()},
    "CGP_DNS_SLOTS": len(DNS_SLOTS),
    "CGP_DNS_PENDING_NS": DNS_PENDING_NS,
    "CGP_DNS_TARGET_LEVELS": DNS_TARGET_LEVELS,
    "CGP_DNS_SEEN_WORDS": DNS_SEEN_WORDS,
    "CGP_FAMILY_SLOTS": SOCKET_FAMILY_SLOTS,
    "CGP_TYPE_SLOTS": SOCKET_TYPE_SLOTS,
    "CGP_PROTOCOL_SLOTS": SOCKET_PROTOCOL_SLOTS,
    "CGP_DEV_ANY": DEVICE_ANY,
    "CGP_DEV_TYPE_ANY": DEVICE_TYPES["any"],
    "BPF_DEVCG_DEV_BLOCK": DEVICE_TYPES["block"],
    "BPF_DEVCG_DEV_CHAR": DEVICE_TYPES["char"],
    "BPF_DEVCG_ACC_MKNOD": DEVICE_ACCESS["m"],
    "BPF_DEVCG_ACC_READ": DEVICE_ACCESS["r"],
    "BPF_DEVCG_ACC_WRITE": DEVICE_ACCESS["w"],
    "CGP_SYSCTL_DEAD": SYSCTL_DEAD_STATE,
    "CGP_SYSCTL_START": SYSCTL_START_STATE,
}
