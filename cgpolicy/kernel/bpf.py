"""The bpf(2) system call through ctypes, and the objects that own what it returns.

libbcc exports neither libbpf's link API nor the query and info commands in a usable form,
so cgpolicy speaks the syscall itself. The layering follows cilium/ebpf: one private
``ctypes.Structure`` per command (the members of ``union bpf_attr`` that command reads, at
the offsets of ``include/uapi/linux/bpf.h``), one function per command that names the
operation and the object in its error, and on top the live objects ``Map``, ``Program`` and
``CgroupLink`` that own a file descriptor, close it, pin it and reopen it from a pin or an id.

Each command passes its own structure and its size: the kernel copies that many bytes and
treats the rest of ``bpf_attr`` as zero, so older and newer kernels both accept it.
"""

from __future__ import annotations

import ctypes
import enum
import errno as errnos
import functools
import os
import platform
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Self

_u8, _u32, _u64 = ctypes.c_uint8, ctypes.c_uint32, ctypes.c_uint64

# __NR_bpf differs per architecture; the generic table (arm64, riscv) uses 280.
_BPF_SYSCALL = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "s390x": 351, "ppc64le": 361}

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint]

ENOTSUPP = 524  # the kernel-internal "operation not supported" that leaks out of bpf()


class Cmd(enum.IntEnum):
    """``enum bpf_cmd``."""

    MAP_CREATE = 0
    MAP_LOOKUP_ELEM = 1
    MAP_UPDATE_ELEM = 2
    MAP_DELETE_ELEM = 3
    MAP_GET_NEXT_KEY = 4
    PROG_LOAD = 5
    OBJ_PIN = 6
    OBJ_GET = 7
    PROG_ATTACH = 8
    PROG_DETACH = 9
    PROG_TEST_RUN = 10
    PROG_GET_NEXT_ID = 11
    MAP_GET_NEXT_ID = 12
    PROG_GET_FD_BY_ID = 13
    MAP_GET_FD_BY_ID = 14
    OBJ_GET_INFO_BY_FD = 15
    PROG_QUERY = 16
    MAP_UPDATE_BATCH = 26
    LINK_CREATE = 28
    LINK_UPDATE = 29
    LINK_GET_FD_BY_ID = 30
    LINK_GET_NEXT_ID = 31
    ENABLE_STATS = 32
    LINK_DETACH = 34


class MapType(enum.IntEnum):
    """``enum bpf_map_type`` (the kinds cgpolicy uses)."""

    HASH = 1
    ARRAY = 2
    PERCPU_HASH = 5
    PERCPU_ARRAY = 6
    LRU_HASH = 9
    LPM_TRIE = 11
    RINGBUF = 27


class ProgType(enum.IntEnum):
    """``enum bpf_prog_type`` (the cgroup kinds)."""

    CGROUP_SKB = 8
    CGROUP_SOCK = 9
    SOCK_OPS = 13
    CGROUP_DEVICE = 15
    CGROUP_SOCK_ADDR = 18
    CGROUP_SYSCTL = 23
    CGROUP_SOCKOPT = 25


class AttachType(enum.IntEnum):
    """``enum bpf_attach_type`` (the cgroup hooks)."""

    CGROUP_INET_INGRESS = 0
    CGROUP_INET_EGRESS = 1
    CGROUP_INET_SOCK_CREATE = 2
    CGROUP_SOCK_OPS = 3
    CGROUP_DEVICE = 6
    CGROUP_INET4_BIND = 8
    CGROUP_INET6_BIND = 9
    CGROUP_INET4_CONNECT = 10
    CGROUP_INET6_CONNECT = 11
    CGROUP_INET4_POST_BIND = 12
    CGROUP_INET6_POST_BIND = 13
    CGROUP_UDP4_SENDMSG = 14
    CGROUP_UDP6_SENDMSG = 15
    CGROUP_SYSCTL = 18
    CGROUP_UDP4_RECVMSG = 19
    CGROUP_UDP6_RECVMSG = 20
    CGROUP_GETSOCKOPT = 21
    CGROUP_SETSOCKOPT = 22
    CGROUP_INET4_GETPEERNAME = 29
    CGROUP_INET6_GETPEERNAME = 30
    CGROUP_INET4_GETSOCKNAME = 31
    CGROUP_INET6_GETSOCKNAME = 32
    CGROUP_INET_SOCK_RELEASE = 34
    CGROUP_UNIX_CONNECT = 49  # 6.7+
    CGROUP_UNIX_SENDMSG = 50
    CGROUP_UNIX_RECVMSG = 51
    CGROUP_UNIX_GETPEERNAME = 52
    CGROUP_UNIX_GETSOCKNAME = 53


class LinkType(enum.IntEnum):
    """``enum bpf_link_type`` (the one cgpolicy creates)."""

    CGROUP = 3


# map_flags
BPF_F_NO_PREALLOC = 1 << 0
# MAP_UPDATE_ELEM flags
BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
# PROG_ATTACH flags
BPF_F_ALLOW_OVERRIDE = 1 << 0
BPF_F_ALLOW_MULTI = 1 << 1
BPF_F_REPLACE = 1 << 2  # also LINK_UPDATE
# PROG_QUERY flags
BPF_F_QUERY_EFFECTIVE = 1 << 0

MAP_TYPES: dict[str, MapType] = {
    "hash": MapType.HASH,
    "array": MapType.ARRAY,
    "percpu_hash": MapType.PERCPU_HASH,
    "percpu_array": MapType.PERCPU_ARRAY,
    "lru_hash": MapType.LRU_HASH,
    "lpm_trie": MapType.LPM_TRIE,
    "ringbuf": MapType.RINGBUF,
}
_PERCPU_MAPS = frozenset({MapType.PERCPU_HASH, MapType.PERCPU_ARRAY})


@dataclass(frozen=True, slots=True)
class Hook:
    """A cgroup hook by bpftool's attach-type name, with what loading and attaching need."""

    name: str
    attach_type: AttachType
    prog_type: ProgType


def _hooks(prog_type: ProgType, **attach_types: AttachType) -> dict[str, Hook]:
    return {name: Hook(name, at, prog_type) for name, at in attach_types.items()}


A = AttachType
HOOKS: dict[str, Hook] = {
    **_hooks(ProgType.CGROUP_SKB, ingress=A.CGROUP_INET_INGRESS, egress=A.CGROUP_INET_EGRESS),
    **_hooks(
        ProgType.CGROUP_SOCK,
        sock_create=A.CGROUP_INET_SOCK_CREATE,
        sock_release=A.CGROUP_INET_SOCK_RELEASE,
        post_bind4=A.CGROUP_INET4_POST_BIND,
        post_bind6=A.CGROUP_INET6_POST_BIND,
    ),
    **_hooks(
        ProgType.CGROUP_SOCK_ADDR,
        bind4=A.CGROUP_INET4_BIND,
        bind6=A.CGROUP_INET6_BIND,
        connect4=A.CGROUP_INET4_CONNECT,
        connect6=A.CGROUP_INET6_CONNECT,
        connect_unix=A.CGROUP_UNIX_CONNECT,
        sendmsg4=A.CGROUP_UDP4_SENDMSG,
        sendmsg6=A.CGROUP_UDP6_SENDMSG,
        sendmsg_unix=A.CGROUP_UNIX_SENDMSG,
        recvmsg4=A.CGROUP_UDP4_RECVMSG,
        recvmsg6=A.CGROUP_UDP6_RECVMSG,
        recvmsg_unix=A.CGROUP_UNIX_RECVMSG,
        getpeername4=A.CGROUP_INET4_GETPEERNAME,
        getpeername6=A.CGROUP_INET6_GETPEERNAME,
        getpeername_unix=A.CGROUP_UNIX_GETPEERNAME,
        getsockname4=A.CGROUP_INET4_GETSOCKNAME,
        getsockname6=A.CGROUP_INET6_GETSOCKNAME,
        getsockname_unix=A.CGROUP_UNIX_GETSOCKNAME,
    ),
    **_hooks(ProgType.SOCK_OPS, sock_ops=A.CGROUP_SOCK_OPS),
    **_hooks(ProgType.CGROUP_DEVICE, device=A.CGROUP_DEVICE),
    **_hooks(ProgType.CGROUP_SYSCTL, sysctl=A.CGROUP_SYSCTL),
    **_hooks(
        ProgType.CGROUP_SOCKOPT, getsockopt=A.CGROUP_GETSOCKOPT, setsockopt=A.CGROUP_SETSOCKOPT
    ),
}
del A
HOOK_BY_ATTACH_TYPE: dict[AttachType, Hook] = {h.attach_type: h for h in HOOKS.values()}


def hook(name: str) -> Hook:
    """The hook called ``name`` (bpftool's spelling: egress, connect4, device, ...)."""
    try:
        return HOOKS[name]
    except KeyError:
        raise ValueError(f"unknown cgroup hook {name!r}; known: {', '.join(HOOKS)}") from None


# --- errors ---------------------------------------------------------------------------


class BpfError(Exception):
    """A bpf() command failed. ``op`` is the command, ``message`` what it was done to."""

    def __init__(self, op: str, errno: int, message: str) -> None:
        self.op = op
        self.errno = errno
        self.message = message
        name = errnos.errorcode.get(errno, "ENOTSUPP" if errno == ENOTSUPP else str(errno))
        reason = "operation not supported" if errno == ENOTSUPP else os.strerror(errno)
        super().__init__(f"{op} {message}: {name} ({reason})")


class VerifierError(BpfError):
    """The verifier rejected a program; ``log`` is what it said, for the operator."""

    def __init__(self, op: str, errno: int, message: str, log: str) -> None:
        super().__init__(op, errno, message)
        self.log = log

    def __str__(self) -> str:
        tail = "\n".join(self.log.rstrip().splitlines()[-20:])
        return f"{super().__str__()}\nverifier log (last lines):\n{tail}"


# --- bpf_attr, one structure per command ------------------------------------------------


class _MapCreateAttr(ctypes.Structure):
    _fields_ = [
        ("map_type", _u32),
        ("key_size", _u32),
        ("value_size", _u32),
        ("max_entries", _u32),
        ("map_flags", _u32),
        ("inner_map_fd", _u32),
        ("numa_node", _u32),
        ("map_name", ctypes.c_char * 16),
    ]


class _MapElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", _u32), ("key", _u64), ("value", _u64), ("flags", _u64)]


class _MapBatchAttr(ctypes.Structure):
    _fields_ = [
        ("in_batch", _u64),
        ("out_batch", _u64),
        ("keys", _u64),
        ("values", _u64),
        ("count", _u32),
        ("map_fd", _u32),
        ("elem_flags", _u64),
        ("flags", _u64),
    ]


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [
        ("prog_type", _u32),
        ("insn_cnt", _u32),
        ("insns", _u64),
        ("license", _u64),
        ("log_level", _u32),
        ("log_size", _u32),
        ("log_buf", _u64),
        ("kern_version", _u32),
        ("prog_flags", _u32),
        ("prog_name", ctypes.c_char * 16),
        ("prog_ifindex", _u32),
        ("expected_attach_type", _u32),
    ]


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", _u64), ("bpf_fd", _u32), ("file_flags", _u32)]


class _ProgAttachAttr(ctypes.Structure):
    _fields_ = [
        ("target_fd", _u32),
        ("attach_bpf_fd", _u32),
        ("attach_type", _u32),
        ("attach_flags", _u32),
        ("replace_bpf_fd", _u32),
    ]


class _TestRunAttr(ctypes.Structure):
    _fields_ = [
        ("prog_fd", _u32),
        ("retval", _u32),
        ("data_size_in", _u32),
        ("data_size_out", _u32),
        ("data_in", _u64),
        ("data_out", _u64),
        ("repeat", _u32),
        ("duration", _u32),
    ]


class _GetIdAttr(ctypes.Structure):
    _fields_ = [("id", _u32), ("next_id", _u32), ("open_flags", _u32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", _u32), ("info_len", _u32), ("info", _u64)]


class _QueryAttr(ctypes.Structure):
    _fields_ = [
        ("target_fd", _u32),
        ("attach_type", _u32),
        ("query_flags", _u32),
        ("attach_flags", _u32),
        ("prog_ids", _u64),
        ("prog_cnt", _u32),
        ("_pad", _u32),
        ("prog_attach_flags", _u64),
        ("link_ids", _u64),  # 6.6+ (mprog); older kernels ignore the tail
        ("link_attach_flags", _u64),
        ("revision", _u64),
    ]


class _LinkCreateAttr(ctypes.Structure):
    _fields_ = [("prog_fd", _u32), ("target_fd", _u32), ("attach_type", _u32), ("flags", _u32)]


class _LinkUpdateAttr(ctypes.Structure):
    _fields_ = [("link_fd", _u32), ("new_prog_fd", _u32), ("flags", _u32), ("old_prog_fd", _u32)]


class _LinkDetachAttr(ctypes.Structure):
    _fields_ = [("link_fd", _u32)]


class _EnableStatsAttr(ctypes.Structure):
    _fields_ = [("type", _u32)]


class _ProgInfo(ctypes.Structure):
    """``struct bpf_prog_info`` up to ``run_cnt``."""

    _fields_ = [
        ("type", _u32),
        ("id", _u32),
        ("tag", _u8 * 8),
        ("jited_prog_len", _u32),
        ("xlated_prog_len", _u32),
        ("jited_prog_insns", _u64),
        ("xlated_prog_insns", _u64),
        ("load_time", _u64),
        ("created_by_uid", _u32),
        ("nr_map_ids", _u32),
        ("map_ids", _u64),
        ("name", ctypes.c_char * 16),
        ("ifindex", _u32),
        ("gpl_compatible", _u32),
        ("netns_dev", _u64),
        ("netns_ino", _u64),
        ("nr_jited_ksyms", _u32),
        ("nr_jited_func_lens", _u32),
        ("jited_ksyms", _u64),
        ("jited_func_lens", _u64),
        ("btf_id", _u32),
        ("func_info_rec_size", _u32),
        ("func_info", _u64),
        ("nr_func_info", _u32),
        ("nr_line_info", _u32),
        ("line_info", _u64),
        ("jited_line_info", _u64),
        ("nr_jited_line_info", _u32),
        ("line_info_rec_size", _u32),
        ("jited_line_info_rec_size", _u32),
        ("nr_prog_tags", _u32),
        ("prog_tags", _u64),
        ("run_time_ns", _u64),
        ("run_cnt", _u64),
    ]


class _MapInfo(ctypes.Structure):
    """``struct bpf_map_info`` up to ``map_flags`` and ``name``."""

    _fields_ = [
        ("type", _u32),
        ("id", _u32),
        ("key_size", _u32),
        ("value_size", _u32),
        ("max_entries", _u32),
        ("map_flags", _u32),
        ("name", ctypes.c_char * 16),
    ]


class _LinkInfo(ctypes.Structure):
    """``struct bpf_link_info`` with the ``cgroup`` member of its union."""

    _fields_ = [
        ("type", _u32),
        ("id", _u32),
        ("prog_id", _u32),
        ("cgroup_id", _u64),
        ("attach_type", _u32),
    ]


class _Probed:
    """What this kernel refused once, so that it is not asked again in this process."""

    query_tail = True  # PROG_QUERY takes the 6.6+ fields after prog_attach_flags
    no_batch: ClassVar[set[MapType]] = set()  # map types without MAP_UPDATE_BATCH


_probed = _Probed()


def _nr_bpf() -> int:
    machine = platform.machine()
    try:
        return _BPF_SYSCALL[machine]
    except KeyError:
        raise OSError(f"cgpolicy does not know the bpf() syscall number on {machine}") from None


_NR_BPF = _nr_bpf()


def _bpf(cmd: Cmd, attr: ctypes.Structure, what: str | Callable[[], str]) -> int:
    """Run one command; on failure raise BpfError naming it and ``what`` it was done to
    (a callable when describing the object costs work that only an error needs)."""
    while True:
        ret = _syscall(_NR_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
        if ret >= 0:
            return ret
        err = ctypes.get_errno()
        if err != errnos.EINTR:
            raise BpfError(f"BPF_{cmd.name}", err, what if isinstance(what, str) else what())


def _cgroup_name(fd: int) -> str:
    """The path behind a cgroup fd, for error messages."""
    try:
        return "cgroup " + os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"cgroup fd {fd}"


def _addr(buf: ctypes.Array | None) -> int:  # type: ignore[type-arg]
    return ctypes.addressof(buf) if buf is not None else 0


def _path_buf(path: str | os.PathLike[str]) -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(os.fsencode(path))


def _check_name(kind: str, name: str) -> bytes:
    """Kernel object names: at most 15 characters of [A-Za-z0-9_.] (else EINVAL)."""
    if len(name) > 15 or not all(c.isascii() and (c.isalnum() or c in "_.") for c in name):
        raise ValueError(f"{kind} name {name!r}: at most 15 characters of A-Z a-z 0-9 _ .")
    return name.encode()


# --- plain commands -------------------------------------------------------------------


def obj_pin(fd: int, path: str | os.PathLike[str]) -> None:
    """Pin the object behind ``fd`` at ``path`` on bpffs; it then lives without the fd."""
    buf = _path_buf(path)
    _bpf(Cmd.OBJ_PIN, _ObjAttr(pathname=_addr(buf), bpf_fd=fd), f"of fd {fd} at {path}")


def obj_get(path: str | os.PathLike[str]) -> int:
    """A new fd for the object pinned at ``path``."""
    buf = _path_buf(path)
    return _bpf(Cmd.OBJ_GET, _ObjAttr(pathname=_addr(buf)), f"of {path}")


def _fd_by_id(cmd: Cmd, kind: str, obj_id: int) -> int:
    return _bpf(cmd, _GetIdAttr(id=obj_id), f"for {kind} id {obj_id}")


def prog_get_fd_by_id(prog_id: int) -> int:
    return _fd_by_id(Cmd.PROG_GET_FD_BY_ID, "program", prog_id)


def map_get_fd_by_id(map_id: int) -> int:
    return _fd_by_id(Cmd.MAP_GET_FD_BY_ID, "map", map_id)


def link_get_fd_by_id(link_id: int) -> int:
    return _fd_by_id(Cmd.LINK_GET_FD_BY_ID, "link", link_id)


def _get_info(fd: int, info: ctypes.Structure, kind: str) -> None:
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    _bpf(Cmd.OBJ_GET_INFO_BY_FD, attr, f"of {kind} fd {fd}")


@dataclass(frozen=True, slots=True)
class ProgramInfo:
    id: int
    tag: str  # hex, as bpftool shows it: the hash of the instructions, stable across loads
    name: str
    type: int
    map_ids: tuple[int, ...]
    run_time_ns: int  # counted only while kernel.bpf_stats_enabled=1
    run_cnt: int


@dataclass(frozen=True, slots=True)
class MapInfo:
    id: int
    type: int
    name: str
    key_size: int
    value_size: int
    max_entries: int
    flags: int


@dataclass(frozen=True, slots=True)
class LinkInfo:
    id: int
    prog_id: int
    type: int
    cgroup_id: int
    attach_type: int


def prog_info(fd: int) -> ProgramInfo:
    info = _ProgInfo()
    _get_info(fd, info, "program")
    map_ids = (_u32 * info.nr_map_ids)()
    if info.nr_map_ids:
        # Second call for the map ids now that their number is known.
        count = info.nr_map_ids
        info = _ProgInfo(nr_map_ids=count, map_ids=ctypes.addressof(map_ids))
        _get_info(fd, info, "program")
        map_ids = map_ids[: min(count, info.nr_map_ids)]  # type: ignore[assignment]
    return ProgramInfo(
        id=info.id,
        tag=bytes(info.tag).hex(),
        name=info.name.decode(errors="replace"),
        type=info.type,
        map_ids=tuple(map_ids),
        run_time_ns=info.run_time_ns,
        run_cnt=info.run_cnt,
    )


def map_info(fd: int) -> MapInfo:
    info = _MapInfo()
    _get_info(fd, info, "map")
    return MapInfo(
        id=info.id,
        type=info.type,
        name=info.name.decode(errors="replace"),
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
        flags=info.map_flags,
    )


def link_info(fd: int) -> LinkInfo:
    info = _LinkInfo()
    _get_info(fd, info, "link")
    is_cgroup = info.type == LinkType.CGROUP
    return LinkInfo(
        id=info.id,
        prog_id=info.prog_id,
        type=info.type,
        cgroup_id=info.cgroup_id if is_cgroup else 0,
        attach_type=info.attach_type if is_cgroup else -1,
    )


def link_ids() -> Iterator[int]:
    """Ids of every BPF link on the host (needs CAP_SYS_ADMIN)."""
    attr = _GetIdAttr()
    while True:
        try:
            _bpf(Cmd.LINK_GET_NEXT_ID, attr, f"after link id {attr.id}")
        except BpfError as error:
            if error.errno == errnos.ENOENT:
                return
            raise
        attr.id = attr.next_id
        yield attr.id


def enable_run_time_stats() -> int:
    """An fd that keeps run_time_ns/run_cnt counting while open, like
    kernel.bpf_stats_enabled=1 but ended by closing it (or by the process exiting)."""
    return _bpf(Cmd.ENABLE_STATS, _EnableStatsAttr(type=0), "BPF_STATS_RUN_TIME")


def prog_attach(
    cgroup_fd: int,
    prog_fd: int,
    attach_type: AttachType,
    flags: int = BPF_F_ALLOW_MULTI,
    replace_prog_fd: int | None = None,
) -> None:
    """Legacy attach: lives until detached, not tied to any fd. ``replace_prog_fd`` swaps
    that program for this one atomically (BPF_F_REPLACE, needs BPF_F_ALLOW_MULTI)."""
    attr = _ProgAttachAttr(
        target_fd=cgroup_fd, attach_bpf_fd=prog_fd, attach_type=attach_type, attach_flags=flags
    )
    if replace_prog_fd is not None:
        attr.attach_flags |= BPF_F_REPLACE
        attr.replace_bpf_fd = replace_prog_fd
    _bpf(Cmd.PROG_ATTACH, attr, lambda: _on_hook(prog_fd, "on", cgroup_fd, attach_type))


def prog_detach(cgroup_fd: int, attach_type: AttachType, prog_fd: int | None = None) -> None:
    """Legacy detach of ``prog_fd`` (required for multi attachments) from a cgroup hook."""
    attr = _ProgAttachAttr(target_fd=cgroup_fd, attach_bpf_fd=prog_fd or 0, attach_type=attach_type)
    _bpf(Cmd.PROG_DETACH, attr, lambda: _on_hook(prog_fd, "from", cgroup_fd, attach_type))


@dataclass(frozen=True, slots=True)
class QueryResult:
    """What PROG_QUERY says about one cgroup hook.

    ``attach_flags`` is the hook's mode (0 none/exclusive, ALLOW_OVERRIDE, ALLOW_MULTI) and is
    0 for an effective query. ``prog_attach_flags`` holds one entry per program where the
    kernel reports them; ``link_ids`` and ``revision`` stay empty/0 on kernels whose cgroup
    query does not fill them.
    """

    attach_flags: int
    prog_ids: tuple[int, ...]
    prog_attach_flags: tuple[int, ...]
    link_ids: tuple[int, ...]
    revision: int


def prog_query(cgroup_fd: int, attach_type: AttachType, effective: bool = False) -> QueryResult:
    """Programs on one hook of a cgroup: its own, or (``effective``) all that run there."""

    def what() -> str:
        return f"on {_cgroup_name(cgroup_fd)} at {_hook_name(attach_type)}"

    capacity = 0
    while True:
        ids, prog_flags, links = (_u32 * capacity)(), (_u32 * capacity)(), (_u32 * capacity)()
        attr = _QueryAttr(
            target_fd=cgroup_fd,
            attach_type=attach_type,
            query_flags=BPF_F_QUERY_EFFECTIVE if effective else 0,
            prog_cnt=capacity,
        )
        if capacity:
            attr.prog_ids = _addr(ids)
            if _probed.query_tail:
                attr.link_ids = _addr(links)
                if not effective:  # the kernel refuses per-program flags for effective
                    attr.prog_attach_flags = _addr(prog_flags)
        try:
            _bpf(Cmd.PROG_QUERY, attr, what)
        except BpfError as error:
            if error.errno == errnos.EINVAL and capacity and _probed.query_tail:
                _probed.query_tail = False  # a kernel before 6.6: no link_ids in the query
                continue
            if error.errno != errnos.ENOSPC:
                raise
        n = attr.prog_cnt
        if n == 0 or (capacity and n <= capacity):
            return QueryResult(
                attach_flags=attr.attach_flags,
                prog_ids=tuple(ids[:n]),
                prog_attach_flags=tuple(prog_flags[:n]) if attr.prog_attach_flags else (),
                link_ids=tuple(i for i in links[:n] if i),
                revision=attr.revision,
            )
        capacity = n + 4  # the count, or a grown count after ENOSPC: ask again


@dataclass(frozen=True, slots=True)
class TestRunResult:
    __test__: ClassVar[bool] = False  # not a pytest test class

    retval: int
    duration_ns: int  # average per run
    data_out: bytes


def prog_test_run(
    prog_fd: int, data: bytes, repeat: int = 1, data_size_out: int = 0
) -> TestRunResult:
    """Run a program on ``data`` (a packet with its Ethernet header for cgroup_skb)."""
    data_in = ctypes.create_string_buffer(data, len(data))
    out = ctypes.create_string_buffer(data_size_out) if data_size_out else None
    attr = _TestRunAttr(
        prog_fd=prog_fd,
        data_size_in=len(data),
        data_size_out=data_size_out,
        data_in=_addr(data_in),
        data_out=_addr(out),
        repeat=repeat,
    )
    _bpf(Cmd.PROG_TEST_RUN, attr, f"of program fd {prog_fd} on {len(data)} bytes")
    data_out = out.raw[: attr.data_size_out] if out is not None else b""
    return TestRunResult(attr.retval, attr.duration, data_out)


def _on_hook(prog_fd: int | None, preposition: str, cgroup_fd: int, attach_type: int) -> str:
    """ "of program cgp_web_egress (id 42) on cgroup /sys/fs/cgroup/x at egress"."""
    program = "(any program)"
    if prog_fd:
        try:
            info = prog_info(prog_fd)
            program = f"program {info.name} (id {info.id})"
        except BpfError:
            program = f"program fd {prog_fd}"
    return f"of {program} {preposition} {_cgroup_name(cgroup_fd)} at {_hook_name(attach_type)}"


def _hook_name(attach_type: int) -> str:
    known = HOOK_BY_ATTACH_TYPE.get(attach_type)  # type: ignore[call-overload]
    return known.name if known else f"attach type {attach_type}"


# --- live objects ---------------------------------------------------------------------


class _FdObject:
    """Owns one kernel object fd: closes it once, pins it, reopens from a pin or an id."""

    _kind: ClassVar[str]

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise ValueError(f"{self._kind} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()

    def pin(self, path: str | os.PathLike[str]) -> None:
        obj_pin(self.fd, path)

    @classmethod
    def from_pin(cls, path: str | os.PathLike[str]) -> Self:
        return cls(obj_get(path))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} fd={self._fd}>"


@functools.cache
def _possible_cpus() -> int:
    """Per-CPU map values hold one slot per *possible* CPU, not per online one."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    return max(int(part.split("-")[-1]) for part in text.split(",")) + 1


class Map(_FdObject):
    """A BPF map. Keys and values are bytes laid out exactly as the C structs.

    For per-CPU maps a lookup returns one 8-byte-aligned slot per possible CPU, concatenated
    (see ``lookup_per_cpu``), and an update given a single value writes it to every CPU.
    """

    _kind = "map"

    def __init__(self, fd: int, info: MapInfo | None = None) -> None:
        super().__init__(fd)
        self.info = info or map_info(fd)
        self._per_cpu = self.info.type in _PERCPU_MAPS
        self._slot = (self.info.value_size + 7) & ~7
        self._value_len = self._slot * _possible_cpus() if self._per_cpu else self.info.value_size

    @classmethod
    def create(
        cls,
        map_type: MapType,
        key_size: int,
        value_size: int,
        max_entries: int,
        flags: int = 0,
        name: str = "",
    ) -> Map:
        attr = _MapCreateAttr(
            map_type=map_type,
            key_size=key_size,
            value_size=value_size,
            max_entries=max_entries,
            map_flags=flags,
            map_name=_check_name("map", name),
        )
        what = (
            f"{name or '(unnamed)'} ({map_type.name.lower()}, key {key_size} B, "
            f"value {value_size} B, max {max_entries}, flags {flags:#x})"
        )
        fd = _bpf(Cmd.MAP_CREATE, attr, what)
        return cls(fd, MapInfo(0, map_type, name, key_size, value_size, max_entries, flags))

    @classmethod
    def from_id(cls, map_id: int) -> Map:
        return cls(map_get_fd_by_id(map_id))

    @property
    def id(self) -> int:
        if not self.info.id:
            self.info = map_info(self.fd)
        return self.info.id

    @property
    def name(self) -> str:
        return self.info.name

    def _what(self, key: bytes | None = None) -> str:
        where = f"map {self.info.name or self.fd}"
        return f"on {where} key {key.hex()}" if key is not None else f"on {where}"

    def _value(self, value: bytes) -> bytes:
        if self._per_cpu and len(value) == self.info.value_size:
            value = value.ljust(self._slot, b"\0") * (self._value_len // self._slot)
        if len(value) != self._value_len:
            raise ValueError(
                f"map {self.info.name}: value is {len(value)} B, needs {self._value_len}"
            )
        return value

    def _key(self, key: bytes) -> bytes:
        if len(key) != self.info.key_size:
            raise ValueError(
                f"map {self.info.name}: key is {len(key)} B, needs {self.info.key_size}"
            )
        return key

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        k, v = self._key(key), self._value(value)
        attr = _MapElemAttr(map_fd=self.fd, key=_bytes_addr(k), value=_bytes_addr(v), flags=flags)
        _bpf(Cmd.MAP_UPDATE_ELEM, attr, self._what(key))

    def lookup(self, key: bytes) -> bytes | None:
        k = self._key(key)
        out = ctypes.create_string_buffer(self._value_len)
        attr = _MapElemAttr(map_fd=self.fd, key=_bytes_addr(k), value=_addr(out))
        try:
            _bpf(Cmd.MAP_LOOKUP_ELEM, attr, self._what(key))
        except BpfError as error:
            if error.errno == errnos.ENOENT:
                return None
            raise
        return out.raw

    def lookup_per_cpu(self, key: bytes) -> list[bytes] | None:
        """A per-CPU map's value, one entry per possible CPU."""
        raw = self.lookup(key)
        if raw is None:
            return None
        size = self.info.value_size
        return [raw[i : i + size] for i in range(0, len(raw), self._slot)]

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; False if it was not there."""
        k = self._key(key)
        try:
            _bpf(
                Cmd.MAP_DELETE_ELEM,
                _MapElemAttr(map_fd=self.fd, key=_bytes_addr(k)),
                self._what(key),
            )
        except BpfError as error:
            if error.errno == errnos.ENOENT:
                return False
            raise
        return True

    def next_key(self, key: bytes | None) -> bytes | None:
        """The key after ``key`` (the first with None); None at the end."""
        k = self._key(key) if key is not None else None
        out = ctypes.create_string_buffer(self.info.key_size)
        attr = _MapElemAttr(map_fd=self.fd, key=_bytes_addr(k) if k else 0, value=_addr(out))
        try:
            _bpf(Cmd.MAP_GET_NEXT_KEY, attr, self._what(key))
        except BpfError as error:
            if error.errno == errnos.ENOENT:
                return None
            raise
        return out.raw

    def keys(self) -> Iterator[bytes]:
        key = self.next_key(None)
        while key is not None:
            yield key
            key = self.next_key(key)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:  # deleted meanwhile
                yield key, value

    def update_batch(self, entries: Sequence[tuple[bytes, bytes]], flags: int = BPF_ANY) -> None:
        """Write many entries with MAP_UPDATE_BATCH, one element at a time where the map type
        has no batch support (EINVAL/ENOTSUPP, e.g. LPM tries); the result is the same."""
        if not entries:
            return
        if self.info.type not in _probed.no_batch:
            try:
                self._update_batch(entries, flags)
                return
            except BpfError as error:
                if error.errno not in (errnos.EINVAL, errnos.EOPNOTSUPP, ENOTSUPP):
                    raise
                _probed.no_batch.add(MapType(self.info.type))
        for key, value in entries:
            self.update(key, value, flags)

    def _update_batch(self, entries: Sequence[tuple[bytes, bytes]], flags: int) -> None:
        keys = b"".join(self._key(k) for k, _ in entries)
        values = b"".join(self._value(v) for _, v in entries)
        kbuf = ctypes.create_string_buffer(keys, len(keys))
        vbuf = ctypes.create_string_buffer(values, len(values))
        done = 0
        while done < len(entries):
            attr = _MapBatchAttr(
                keys=_addr(kbuf) + done * self.info.key_size,
                values=_addr(vbuf) + done * self._value_len,
                count=len(entries) - done,
                map_fd=self.fd,
                elem_flags=flags,
            )
            try:
                _bpf(Cmd.MAP_UPDATE_BATCH, attr, f"{self._what()} ({len(entries)} entries)")
            except BpfError:
                if attr.count == 0:
                    raise
            done += attr.count  # the kernel reports how many it wrote, also on failure


def _bytes_addr(data: bytes) -> int:
    """Address of an immutable bytes object's buffer, valid while ``data`` is referenced.

    The kernel only reads it (keys and update values), so no copy is needed.
    """
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0


class Program(_FdObject):
    """A loaded BPF program."""

    _kind = "program"

    @classmethod
    def load(
        cls,
        prog_type: ProgType,
        insns: bytes,
        name: str,
        expected_attach_type: AttachType | int = 0,
        # bpf/*.c are GPL-2.0 (their SPDX headers), unlike the Apache-2.0 Python (README,
        # "License"): the kernel allows its GPL-only helpers only to a GPL-compatible string.
        license: str = "GPL",
    ) -> Program:
        """PROG_LOAD. Tried first without a verifier log (the log slows the verifier); on a
        rejection it loads again with a log, growing the buffer until the log fits, and raises
        VerifierError with it."""
        if len(insns) % 8:
            raise ValueError(f"program {name}: {len(insns)} bytes is not whole instructions")
        insn_buf = ctypes.create_string_buffer(insns, len(insns))
        lic = ctypes.create_string_buffer(license.encode())
        attr = _ProgLoadAttr(
            prog_type=prog_type,
            insn_cnt=len(insns) // 8,
            insns=_addr(insn_buf),
            license=_addr(lic),
            prog_name=_check_name("program", name),
            expected_attach_type=expected_attach_type,
        )
        what = f"of {name} ({ProgType(prog_type).name.lower()}, {len(insns) // 8} insns)"
        try:
            return cls(_load(attr, what))
        except BpfError as first:
            if first.errno in (errnos.EPERM, errnos.E2BIG, errnos.ENOMEM):
                raise  # not the verifier talking: a log would not explain it
            error = first
        for log_size in (1 << 20, 1 << 22, 1 << 24):
            log = ctypes.create_string_buffer(log_size)
            attr.log_level, attr.log_size, attr.log_buf = 1, log_size, _addr(log)
            try:
                return cls(_load(attr, what))
            except BpfError as retry:
                error = retry
                if retry.errno != errnos.ENOSPC:  # ENOSPC: the log did not fit
                    break
        text = log.value.decode(errors="replace")
        raise VerifierError(error.op, error.errno, error.message, text) from None

    @classmethod
    def from_id(cls, prog_id: int) -> Program:
        return cls(prog_get_fd_by_id(prog_id))

    def info(self) -> ProgramInfo:
        return prog_info(self.fd)

    @property
    def id(self) -> int:
        return self.info().id

    def test_run(self, data: bytes, repeat: int = 1, data_size_out: int = 0) -> TestRunResult:
        return prog_test_run(self.fd, data, repeat, data_size_out)


def _load(attr: _ProgLoadAttr, what: str) -> int:
    """PROG_LOAD, retried on EAGAIN as libbpf does (the verifier was interrupted)."""
    for _ in range(4):
        try:
            return _bpf(Cmd.PROG_LOAD, attr, what)
        except BpfError as error:
            if error.errno != errnos.EAGAIN:
                raise
    return _bpf(Cmd.PROG_LOAD, attr, what)


class CgroupLink(_FdObject):
    """A BPF link holding one program on one cgroup hook.

    Link attachments compose with every other program on the hook as with BPF_F_ALLOW_MULTI,
    never replace another owner's program, and end when the last fd or pin is gone. Dropping
    the last reference to this object closes its fd: pin the link first to keep it.
    """

    _kind = "link"

    @classmethod
    def create(cls, prog_fd: int, cgroup_fd: int, attach_type: AttachType) -> CgroupLink:
        attr = _LinkCreateAttr(prog_fd=prog_fd, target_fd=cgroup_fd, attach_type=attach_type)
        return cls(
            _bpf(Cmd.LINK_CREATE, attr, lambda: _on_hook(prog_fd, "on", cgroup_fd, attach_type))
        )

    @classmethod
    def from_id(cls, link_id: int) -> CgroupLink:
        return cls(link_get_fd_by_id(link_id))

    def info(self) -> LinkInfo:
        return link_info(self.fd)

    def update(self, new_prog_fd: int, old_prog_fd: int | None = None) -> None:
        """Swap the linked program atomically. With ``old_prog_fd`` the swap happens only if
        that program is still the linked one (BPF_F_REPLACE), so a racing writer is caught."""
        attr = _LinkUpdateAttr(link_fd=self.fd, new_prog_fd=new_prog_fd)
        if old_prog_fd is not None:
            attr.flags, attr.old_prog_fd = BPF_F_REPLACE, old_prog_fd
        _bpf(Cmd.LINK_UPDATE, attr, lambda: f"of {self._describe()} to program fd {new_prog_fd}")

    def detach(self) -> None:
        """End the attachment now, even while pins or other fds still hold the link."""
        _bpf(Cmd.LINK_DETACH, _LinkDetachAttr(link_fd=self.fd), self._describe)

    def _describe(self) -> str:
        try:
            info = self.info()
        except BpfError:
            return f"link fd {self._fd}"
        return f"link {info.id} (program id {info.prog_id}, {_hook_name(info.attach_type)})"


def close_all(objects: Iterable[_FdObject]) -> None:
    """Close every object, even when closing one of them fails."""
    errors = []
    for obj in objects:
        try:
            obj.close()
        except OSError as error:
            errors.append(error)
    if errors:
        raise errors[0]
