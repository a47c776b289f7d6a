"""`cgpolicy learn` in the kernel: the observation programs of ``bpf/learn.c`` attached to
one cgroup, and what they counted, read back as plain values.

One ``Observer`` is one learning session: one set of maps shared by all its programs, one
program per hook, one BPF link per hook. Nothing is pinned: the links, programs and maps
live as long as this process holds their file descriptors, so the observation ends with
``close()``, with the process, and also when it is killed. The links compose with every
other program on the hooks (the kernel ANDs verdicts) and the programs allow everything,
so enforcement is unchanged while learning.

The map layouts are bpf/learn.c's (the ``_*`` structs below mirror it; a kernel test reads
real entries back through them).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import stat
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cgpolicy.compiler.spec import MapSpec, ProgramSpec
from cgpolicy.contract import Layout
from cgpolicy.kernel.bpf import CgroupLink, Map, close_all
from cgpolicy.kernel.cgroup import open_cgroup
from cgpolicy.kernel.hooks import hook
from cgpolicy.kernel.loader import (
    SOURCE_DIR,
    LoadedProgram,
    compile_function,
    create_map,
    load_program,
)
from cgpolicy.kernel.ringbuf import RingBuffer
from cgpolicy.kernel.syscall import BPF_F_NO_PREALLOC

log = logging.getLogger(__name__)

SOURCE = "learn.c"

# hook -> (C function, kernel program name)
PROGRAMS: dict[str, tuple[str, str]] = {
    "egress": ("cgl_egress", "cgp_lrn_egress"),
    "ingress": ("cgl_ingress", "cgp_lrn_ingress"),
    "sock_create": ("cgl_sock_create", "cgp_lrn_create"),
    "bind4": ("cgl_bind4", "cgp_lrn_bind4"),
    "bind6": ("cgl_bind6", "cgp_lrn_bind6"),
    "connect4": ("cgl_connect4", "cgp_lrn_conn4"),
    "connect6": ("cgl_connect6", "cgp_lrn_conn6"),
    "sendmsg4": ("cgl_sendmsg4", "cgp_lrn_send4"),
    "sendmsg6": ("cgl_sendmsg6", "cgp_lrn_send6"),
    "device": ("cgl_device", "cgp_lrn_device"),
    "sysctl": ("cgl_sysctl", "cgp_lrn_sysctl"),
}
# CGP_HOOK_* (bpf/common.h): the slot of each hook in learn_stats
HOOK_SLOTS: dict[str, int] = {
    "ingress": 1,
    "egress": 2,
    "sock_create": 3,
    "bind4": 4,
    "bind6": 5,
    "connect4": 6,
    "connect6": 7,
    "sendmsg4": 8,
    "sendmsg6": 9,
    "device": 10,
    "sysctl": 11,
}

COMMS = 4  # CGL_COMMS
SYSCTL_NAME = 256  # CGL_SYSCTL_NAME
STAT_SLOTS = 16  # CGL_STAT_SLOTS

# The layouts of bpf/learn.c, checked against the C by tests/kernel/test_learn.py; the
# plain structs below read them on the hot path (a unit test checks that they agree).
COMM = Layout("cgl_comm", ("w", "__u64", 2))
VALUE = Layout(
    "cgl_value",
    ("count", "__u64"),
    ("first_ns", "__u64"),
    ("last_ns", "__u64"),
    ("comm", COMM, COMMS),
    ("more_comms", "__u32"),
    ("pad", "__u32"),
)
NET_KEY = Layout(
    "cgl_net_key",
    ("addr", "__u8", 16),
    ("port", "__u16"),
    ("family", "__u8"),
    ("proto", "__u8"),
    ("kind", "__u8"),
    ("icmp_type", "__u8"),
    ("pad", "__u8", 2),
)
CREATE_KEY = Layout("cgl_create_key", ("family", "__u32"), ("type", "__u32"), ("protocol", "__u32"))
ADDR_KEY = Layout(
    "cgl_addr_key",
    ("addr", "__u8", 16),
    ("port", "__u16"),
    ("family", "__u8"),
    ("proto", "__u8"),
    ("op", "__u8"),
    ("pad", "__u8", 3),
)
DEVICE_KEY = Layout(
    "cgl_device_key", ("type", "__u32"), ("major", "__u32"), ("minor", "__u32"), ("access", "__u32")
)
SYSCTL_KEY = Layout(
    "cgl_sysctl_key", ("name", "char", SYSCTL_NAME), ("write", "__u32"), ("truncated", "__u32")
)
SERVER_KEY = Layout("cgl_server_key", ("proto", "__u8"), ("pad", "__u8"), ("port", "__u16"))
STAT = Layout("cgl_stat", ("seen", "__u64"), ("lost", "__u64"))
DNS_COPY = 1024  # CGL_DNS_COPY
DNS_ANSWER = Layout(
    "cgl_dns_answer",
    ("time_ns", "__u64"),
    ("len", "__u32"),
    ("full_len", "__u32"),
    ("server", "__u8", 16),
    ("family", "__u8"),
    ("pad", "__u8", 7),
    ("data", "__u8", DNS_COPY),
)
LAYOUTS: tuple[Layout, ...] = (COMM, VALUE, NET_KEY, CREATE_KEY, ADDR_KEY, DEVICE_KEY)
LAYOUTS += (SYSCTL_KEY, SERVER_KEY, STAT, DNS_ANSWER)
C_CONSTANTS = {
    "CGL_COMMS": COMMS,
    "CGL_SYSCTL_NAME": SYSCTL_NAME,
    "CGL_STAT_SLOTS": STAT_SLOTS,
    "CGL_STAT_DNS": 12,
    "CGL_DNS_COPY": DNS_COPY,
    "CGL_NET_PORT": 0,
    "CGL_NET_REPLY": 1,
    "CGL_NET_ICMP": 2,
    "CGL_NET_BARE": 3,
    "CGL_NET_UNKNOWN": 4,
    "CGL_OP_BIND": 0,
    "CGL_OP_CONNECT": 1,
    "CGL_OP_SENDMSG": 2,
    "CGL_OP_RESPONSE": 3,
}

_VALUE = struct.Struct("<QQQ" + "16s" * COMMS + "II")  # struct cgl_value
_NET_KEY = struct.Struct("<16sHBBBB2x")  # struct cgl_net_key
_CREATE_KEY = struct.Struct("<III")  # struct cgl_create_key
_ADDR_KEY = struct.Struct("<16sHBBB3x")  # struct cgl_addr_key
_DEVICE_KEY = struct.Struct("<IIII")  # struct cgl_device_key
_SYSCTL_KEY = struct.Struct(f"<{SYSCTL_NAME}sII")  # struct cgl_sysctl_key
_SERVER_KEY = struct.Struct("<BxH")  # struct cgl_server_key
_STAT = struct.Struct("<QQ")  # struct cgl_stat
_DNS_HEAD = struct.Struct("<QII16sB7x")  # struct cgl_dns_answer, before data
DNS_SLOT = C_CONSTANTS["CGL_STAT_DNS"]
_COMM = 16


@dataclass(frozen=True)
class Sizes:
    """How many distinct entries each map keeps at most. The hash maps are allocated as
    entries arrive (BPF_F_NO_PREALLOC), so a large bound costs nothing until it is used."""

    network: int = 262_144  # per direction
    create: int = 4_096
    addresses: int = 262_144  # bind, connect and sendmsg together
    devices: int = 16_384
    sysctls: int = 65_536
    servers: int = 131_072  # every TCP and UDP port
    sockcomm: int = 65_536  # the LRU of socket cookie -> executable
    dns_ring: int = 1 << 20  # bytes of DNS answers waiting to be read (a power of 2 pages)


DEFAULT_SIZES = Sizes()


def map_specs(sizes: Sizes) -> dict[str, MapSpec]:
    """The maps of one session, as bpf/learn.c declares them."""
    value = _VALUE.size
    no_prealloc = BPF_F_NO_PREALLOC

    def hash_(name: str, key: int, val: int, entries: int) -> MapSpec:
        return MapSpec(name, "hash", key, val, entries, no_prealloc, ())

    return {
        spec.name: spec
        for spec in (
            hash_("learn_egress", _NET_KEY.size, value, sizes.network),
            hash_("learn_ingress", _NET_KEY.size, value, sizes.network),
            hash_("learn_create", _CREATE_KEY.size, value, sizes.create),
            hash_("learn_addr", _ADDR_KEY.size, value, sizes.addresses),
            hash_("learn_device", _DEVICE_KEY.size, value, sizes.devices),
            hash_("learn_sysctl", _SYSCTL_KEY.size, value, sizes.sysctls),
            hash_("learn_servers", _SERVER_KEY.size, _COMM, sizes.servers),
            MapSpec("learn_sockcomm", "lru_hash", 8, _COMM, sizes.sockcomm, 0, ()),
            MapSpec("learn_stats", "percpu_array", 4, _STAT.size, STAT_SLOTS, 0, ()),
            MapSpec("learn_scratch", "percpu_array", 4, _SYSCTL_KEY.size, 1, 0, ()),
            MapSpec("learn_dns", "ringbuf", 0, 0, sizes.dns_ring, 0, ()),
        )
    }


# --- what was seen -------------------------------------------------------------------------

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
NetKind = Literal["port", "reply", "icmp", "bare", "unknown"]
_NET_KINDS: tuple[NetKind, ...] = ("port", "reply", "icmp", "bare", "unknown")
_OPS = ("bind", "connect", "sendmsg", "response")


@dataclass(frozen=True)
class Seen:
    """How often one distinct thing was seen, when (wall clock, ns since the epoch), and
    by which executables (comm; ``more`` when there were more than the kernel keeps)."""

    count: int
    first_ns: int
    last_ns: int
    comms: tuple[str, ...] = ()
    more: bool = False

    def merged(self, other: Seen) -> Seen:
        comms = tuple(dict.fromkeys(self.comms + other.comms))
        return Seen(
            self.count + other.count,
            min(self.first_ns, other.first_ns),
            max(self.last_ns, other.last_ns),
            comms,
            self.more or other.more,
        )


@dataclass(frozen=True, order=True)
class NetKey:
    """A packet, as a network rule can name it (``port``: remote port on egress, local
    port on ingress; ``reply``: return traffic, no port)."""

    direction: Literal["egress", "ingress"]
    address: IPAddress
    protocol: int
    kind: NetKind
    port: int = 0
    icmp_type: int = 0


@dataclass(frozen=True, order=True)
class CreateKey:
    family: int
    type: int
    protocol: int


@dataclass(frozen=True, order=True)
class AddrKey:
    """A bind (local address) or a connect/sendmsg (remote address), with the socket's
    protocol and the port asked for, as the sock_addr hooks see them."""

    op: Literal["bind", "connect", "sendmsg", "response"]  # response: from a server port
    address: IPAddress
    protocol: int
    port: int


@dataclass(frozen=True, order=True)
class DeviceKey:
    type: Literal["char", "block"]
    major: int
    minor: int
    access: str  # a non-empty subset of "rwm", in that order


@dataclass(frozen=True, order=True)
class SysctlKey:
    name: str  # slash form, bytes as latin-1 (one character per byte)
    write: bool
    truncated: bool = False  # longer than the kernel buffer: the name is cut


@dataclass
class Observations:
    """Everything one session counted, and per hook how many actions it saw and how many
    it could not record (a full map)."""

    network: dict[NetKey, Seen] = field(default_factory=dict)
    create: dict[CreateKey, Seen] = field(default_factory=dict)
    addresses: dict[AddrKey, Seen] = field(default_factory=dict)
    devices: dict[DeviceKey, Seen] = field(default_factory=dict)
    sysctls: dict[SysctlKey, Seen] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)  # hook -> actions
    lost: dict[str, int] = field(default_factory=dict)  # hook -> actions not recorded
    started_ns: int = 0  # wall clock
    ended_ns: int = 0

    @property
    def total_lost(self) -> int:
        return sum(self.lost.values())


def _address(family: int, raw: bytes) -> IPAddress:
    if family == 4:
        return ipaddress.IPv4Address(raw[:4])
    return ipaddress.IPv6Address(raw)


def _comm(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("latin-1")


def _seen(raw: bytes, wall_offset: int) -> Seen:
    count, first, last, *rest = _VALUE.unpack(raw)
    comms = tuple(c for c in (_comm(r) for r in rest[:COMMS]) if c)
    return Seen(count, first + wall_offset, last + wall_offset, comms, bool(rest[COMMS]))


_ACCESS = ((2, "r"), (4, "w"), (1, "m"))  # BPF_DEVCG_ACC_READ, _WRITE, _MKNOD


def _access(bits: int) -> str:
    return "".join(letter for bit, letter in _ACCESS if bits & bit)


@dataclass(frozen=True)
class DnsAnswer:
    """A DNS answer (UDP from port 53, return traffic) as it reached the workload: its
    wall-clock time, the server it came from, its first bytes (``cut``: not all of it)."""

    time_ns: int
    server: IPAddress
    wire: bytes
    cut: bool


class Observer:
    """One learning session: maps, programs and (after ``attach``) links on one cgroup."""

    def __init__(self, sizes: Sizes = DEFAULT_SIZES) -> None:
        self.sizes = sizes
        self.maps: dict[str, Map] = {}
        self.programs: dict[str, LoadedProgram] = {}
        self.links: list[CgroupLink] = []
        self.started_ns = 0
        self._ring: RingBuffer | None = None
        # bpf_ktime_get_ns() is CLOCK_MONOTONIC: one offset to the wall clock for every
        # time read, so that times of answers and of actions compare exactly.
        self._wall_offset = time.time_ns() - time.monotonic_ns()
        specs = map_specs(sizes)
        try:
            for name, spec in specs.items():
                self.maps[name] = create_map(spec)
            for hook_name, (function, prog_name) in PROGRAMS.items():
                used = compile_function(SOURCE_DIR / SOURCE, function).templates
                program = ProgramSpec(
                    hook_name, SOURCE, function, prog_name, tuple(specs[n] for n in sorted(used))
                )
                self.programs[hook_name] = load_program(program, shared_maps=self.maps)
        except BaseException:
            self.close()
            raise

    def attach(self, cgroup: Path) -> None:
        """Link every program to ``cgroup`` (and so to every cgroup below it)."""
        fd = open_cgroup(cgroup)
        try:
            for hook_name, program in self.programs.items():
                self.links.append(CgroupLink.create(program.fd, fd, hook(hook_name).attach_type))
        finally:
            os.close(fd)
        self.started_ns = time.time_ns()

    def detach(self) -> None:
        """End the observation (the maps stay readable)."""
        close_all(self.links)
        self.links.clear()

    def close(self) -> None:
        self.detach()
        if self._ring is not None:
            self._ring.close()  # and its map
            self._ring = None
            self.maps.pop("learn_dns", None)
        close_all([p.program for p in self.programs.values()])
        close_all(self.maps.values())
        self.programs.clear()
        self.maps.clear()

    def __enter__(self) -> Observer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self) -> Observations:
        """What the programs counted so far."""
        wall_offset = self._wall_offset
        out = Observations(started_ns=self.started_ns, ended_ns=time.time_ns())
        for direction in ("egress", "ingress"):
            for key, value in self.maps[f"learn_{direction}"].items():
                raw, port, family, proto, kind, icmp = _NET_KEY.unpack(key)
                net = NetKey(
                    direction,  # type: ignore[arg-type]
                    _address(family, raw),
                    proto,
                    _NET_KINDS[kind] if kind < len(_NET_KINDS) else "unknown",
                    port,
                    icmp,
                )
                out.network[net] = _seen(value, wall_offset)
        for key, value in self.maps["learn_create"].items():
            out.create[CreateKey(*_CREATE_KEY.unpack(key))] = _seen(value, wall_offset)
        for key, value in self.maps["learn_addr"].items():
            raw, port, family, proto, op = _ADDR_KEY.unpack(key)
            addr = AddrKey(_OPS[op], _address(family, raw), proto, port)  # type: ignore[arg-type]
            out.addresses[addr] = _seen(value, wall_offset)
        for key, value in self.maps["learn_device"].items():
            kind, major, minor, access = _DEVICE_KEY.unpack(key)
            device = DeviceKey("block" if kind == 1 else "char", major, minor, _access(access))
            out.devices[device] = _seen(value, wall_offset)
        for key, value in self.maps["learn_sysctl"].items():
            name, write, truncated = _SYSCTL_KEY.unpack(key)
            sysctl = SysctlKey(_comm(name), bool(write), bool(truncated))
            out.sysctls[sysctl] = _seen(value, wall_offset)
        stats = self.maps["learn_stats"]
        for hook_name, slot in [*HOOK_SLOTS.items(), ("dns", DNS_SLOT)]:
            per_cpu = stats.lookup_per_cpu(struct.pack("<I", slot)) or []
            pairs = [_STAT.unpack(v) for v in per_cpu]
            out.seen[hook_name] = sum(seen for seen, _ in pairs)
            out.lost[hook_name] = sum(lost for _, lost in pairs)
        return out

    def answers(self) -> list[DnsAnswer]:
        """The DNS answers copied since the last call (reading consumes them)."""
        if self._ring is None:
            self._ring = RingBuffer(self.maps["learn_dns"])
        wall_offset = self._wall_offset
        out = []
        for record in self._ring.drain():
            when, length, full, server, family = _DNS_HEAD.unpack_from(record)
            data = record[_DNS_HEAD.size : _DNS_HEAD.size + min(length, len(record))]
            out.append(DnsAnswer(when + wall_offset, _address(family, server), data, full > length))
        return out

    def memory(self) -> dict[str, int]:
        """Bytes the kernel charges each map for now (fdinfo ``memlock``)."""
        return {name: _memlock(m.fd) for name, m in self.maps.items()}


def _memlock(fd: int) -> int:
    try:
        text = Path(f"/proc/self/fdinfo/{fd}").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("memlock:"):
            return int(line.split()[1])
    return 0


# --- device nodes ------------------------------------------------------------------------

_MAX_DEV_ENTRIES = 100_000  # a /dev with more is cut short, not walked for ever


def device_nodes(dev_root: Path = Path("/dev")) -> dict[tuple[str, int, int], str]:
    """(type, major, minor) -> the best path of a node for it under ``dev_root``, written
    as under /dev: directly in /dev first, then the shortest, then by name. Symlinks are
    not followed; /dev/pts is skipped (its numbers change from run to run)."""
    found: dict[tuple[str, int, int], str] = {}
    seen = 0
    for path, info in _walk(dev_root):
        seen += 1
        if seen > _MAX_DEV_ENTRIES:
            break
        kind = (
            "char"
            if stat.S_ISCHR(info.st_mode)
            else "block"
            if stat.S_ISBLK(info.st_mode)
            else None
        )
        if kind is None:
            continue
        name = "/dev/" + path.relative_to(dev_root).as_posix()
        key = (kind, os.major(info.st_rdev), os.minor(info.st_rdev))
        best = found.get(key)
        if best is None or (best.count("/"), len(best), best) > (name.count("/"), len(name), name):
            found[key] = name
    return found


def _walk(top: Path) -> Iterator[tuple[Path, os.stat_result]]:
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as entries:
                items = list(entries)
        except OSError as error:
            if error.errno not in (errno.ENOENT, errno.EACCES, errno.ENOTDIR):
                log.debug("cannot list %s: %s", folder, error)
            continue
        for entry in items:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            path = Path(entry.path)
            if stat.S_ISDIR(info.st_mode):
                if path != top / "pts":
                    stack.append(path)
            else:
                yield path, info


# --- servers that were there before ----------------------------------------------------------

_TCP_LISTEN = "0A"


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _cgroup_pids(cgroup: Path) -> Iterator[int]:
    for folder, _, _ in os.walk(cgroup):
        try:
            text = (Path(folder) / "cgroup.procs").read_text()
        except OSError:
            continue
        yield from (int(line) for line in text.split())


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        with os.scandir(f"/proc/{pid}/fd") as entries:
            for entry in entries:
                try:
                    target = os.readlink(entry.path)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


def listening_ports(cgroup: Path) -> dict[tuple[int, int], str]:
    """(protocol, port) -> comm of the servers already running in ``cgroup`` (or below):
    listening TCP sockets, and unconnected UDP sockets bound to a port outside the
    ephemeral range. What a process bound before learning began was not seen by the bind
    programs, so without this its traffic would look like return traffic."""
    low, high = _ephemeral_range()
    found: dict[tuple[int, int], str] = {}
    for pid in _cgroup_pids(cgroup):
        inodes = _socket_inodes(pid)
        if not inodes:
            continue
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        for table, proto in (("tcp", 6), ("tcp6", 6), ("udp", 17), ("udp6", 17)):
            try:
                lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                if len(fields) < 10 or fields[9] not in inodes:
                    continue
                port = int(fields[1].rsplit(":", 1)[1], 16)
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if proto == 6 and fields[3] != _TCP_LISTEN:
                    continue
                if proto == 17 and (remote_port or low <= port <= high):
                    continue
                if port:
                    found.setdefault((proto, port), comm)
    return found


def seed_servers(observer: Observer, cgroup: Path) -> int:
    """Tell the programs about the servers already in ``cgroup``; how many there were."""
    ports = listening_ports(cgroup)
    servers = observer.maps["learn_servers"]
    for (proto, port), comm in ports.items():
        servers.update(_SERVER_KEY.pack(proto, port), comm.encode()[:_COMM].ljust(_COMM, b"\0"))
    return len(ports)
