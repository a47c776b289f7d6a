"""The bpf(2) system call through ctypes: the ABI of ``include/uapi/linux/bpf.h`` and one
function per command.

libbcc exports neither libbpf's link API nor the query and info commands in a usable form,
so cgpolicy speaks the syscall itself. The layering follows cilium/ebpf: one
``ctypes.Structure`` per command (the members of ``union bpf_attr`` that command reads, at
the offsets of ``include/uapi/linux/bpf.h``), and one function per command that names the
operation and the object in its error. The objects that own what these commands return
(``Map``, ``Program``, ``CgroupLink``) are in :mod:`cgpolicy.kernel.bpf`.

Each command passes its own structure and its size: the kernel copies that many bytes and
treats the rest of ``bpf_attr`` as zero, so older and newer kernels both accept it.
"""

from __future__ import annotations

import ctypes
import enum
import errno as errnos
import os
import platform
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

_u8, _u32, _u64 = ctypes.c_uint8, ctypes.c_uint32, ctypes.c_uint64
_s32 = ctypes.c_int32

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
    BTF_LOAD = 18
    MAP_LOOKUP_AND_DELETE_ELEM = 21
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
    PROG_ARRAY = 3
    PERCPU_HASH = 5
    PERCPU_ARRAY = 6
    LRU_HASH = 9
    LPM_TRIE = 11
    ARRAY_OF_MAPS = 12
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
    "prog_array": MapType.PROG_ARRAY,
    "percpu_hash": MapType.PERCPU_HASH,
    "percpu_array": MapType.PERCPU_ARRAY,
    "lru_hash": MapType.LRU_HASH,
    "lpm_trie": MapType.LPM_TRIE,
    "ringbuf": MapType.RINGBUF,
}


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


class MapCreateAttr(ctypes.Structure):
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


class MapElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", _u32), ("key", _u64), ("value", _u64), ("flags", _u64)]


class MapBatchAttr(ctypes.Structure):
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


class ProgLoadAttr(ctypes.Structure):
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
        ("prog_btf_fd", _u32),
        ("func_info_rec_size", _u32),
        ("func_info", _u64),
        ("func_info_cnt", _u32),
    ]


class BtfLoadAttr(ctypes.Structure):
    _fields_ = [
        ("btf", _u64),
        ("btf_log_buf", _u64),
        ("btf_size", _u32),
        ("btf_log_size", _u32),
        ("btf_log_level", _u32),
    ]


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", _u64), ("bpf_fd", _u32), ("file_flags", _u32), ("path_fd", _s32)]


BPF_F_PATH_FD = 1 << 14  # OBJ_GET: pathname is relative to path_fd (kernel 6.5+)


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
        ("ctx_size_in", _u32),
        ("ctx_size_out", _u32),
        ("ctx_in", _u64),
        ("ctx_out", _u64),
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


class LinkCreateAttr(ctypes.Structure):
    _fields_ = [("prog_fd", _u32), ("target_fd", _u32), ("attach_type", _u32), ("flags", _u32)]


class LinkUpdateAttr(ctypes.Structure):
    _fields_ = [("link_fd", _u32), ("new_prog_fd", _u32), ("flags", _u32), ("old_prog_fd", _u32)]


class LinkDetachAttr(ctypes.Structure):
    _fields_ = [("link_fd", _u32)]


class _EnableStatsAttr(ctypes.Structure):
    _fields_ = [("type", _u32)]


class _ProgInfo(ctypes.Structure):
    """``struct bpf_prog_info`` up to ``verified_insns``."""

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
        ("recursion_misses", _u64),
        ("verified_insns", _u32),
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
    path_fd = True  # OBJ_GET takes BPF_F_PATH_FD (6.5+)


_probed = _Probed()


def _nr_bpf() -> int:
    machine = platform.machine()
    try:
        return _BPF_SYSCALL[machine]
    except KeyError:
        raise OSError(f"cgpolicy does not know the bpf() syscall number on {machine}") from None


_NR_BPF = _nr_bpf()


def bpf(cmd: Cmd, attr: ctypes.Structure, what: str | Callable[[], str]) -> int:
    """Run one command; on failure raise BpfError naming it and ``what`` it was done to
    (a callable when describing the object costs work that only an error needs)."""
    ret = _retried(cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        raise BpfError(f"BPF_{cmd.name}", -ret, what if isinstance(what, str) else what())
    return ret


def _retried(cmd: Cmd, attr: Any, size: int) -> int:
    """bpf(cmd) on an attr passed by reference, retried on EINTR: the result, or -errno."""
    while True:
        ret = _syscall(_NR_BPF, cmd, attr, size)
        if ret >= 0:
            return int(ret)
        err = ctypes.get_errno()
        if err != errnos.EINTR:
            return -err


def _cgroup_name(fd: int) -> str:
    """The path behind a cgroup fd, for error messages."""
    try:
        return "cgroup " + os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"cgroup fd {fd}"


def addr(buf: ctypes.Array | None) -> int:  # type: ignore[type-arg]
    return ctypes.addressof(buf) if buf is not None else 0


def _path_buf(path: str | os.PathLike[str]) -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(os.fsencode(path))


# --- plain commands -------------------------------------------------------------------


def obj_pin(fd: int, path: str | os.PathLike[str]) -> None:
    """Pin the object behind ``fd`` at ``path`` on bpffs; it then lives without the fd."""
    buf = _path_buf(path)
    bpf(Cmd.OBJ_PIN, _ObjAttr(pathname=addr(buf), bpf_fd=fd), f"of fd {fd} at {path}")


def obj_get(path: str | os.PathLike[str]) -> int:
    """A new fd for the object pinned at ``path``."""
    buf = _path_buf(path)
    return bpf(Cmd.OBJ_GET, _ObjAttr(pathname=addr(buf)), f"of {path}")


def _fd_by_id(cmd: Cmd, kind: str, obj_id: int) -> int:
    return bpf(cmd, _GetIdAttr(id=obj_id), f"for {kind} id {obj_id}")


def prog_get_fd_by_id(prog_id: int) -> int:
    return _fd_by_id(Cmd.PROG_GET_FD_BY_ID, "program", prog_id)


def map_get_fd_by_id(map_id: int) -> int:
    return _fd_by_id(Cmd.MAP_GET_FD_BY_ID, "map", map_id)


def link_get_fd_by_id(link_id: int) -> int:
    return _fd_by_id(Cmd.LINK_GET_FD_BY_ID, "link", link_id)


def _get_info(fd: int, info: ctypes.Structure, kind: str) -> None:
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    bpf(Cmd.OBJ_GET_INFO_BY_FD, attr, f"of {kind} fd {fd}")


@dataclass(frozen=True, slots=True)
class ProgramInfo:
    id: int
    tag: str  # hex, as bpftool shows it: the hash of the instructions, stable across loads
    name: str
    type: int
    map_ids: tuple[int, ...]
    run_time_ns: int  # counted only while kernel.bpf_stats_enabled=1
    run_cnt: int
    btf_id: int = 0  # the program's BTF (a program with subprograms: cgpolicy/kernel/btf.py)
    functions: int = 0  # its functions with BTF: the main one and each subprogram
    verified_insns: int = 0  # the verifier's steps at load (kernel 5.16+)


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
        btf_id=info.btf_id,
        functions=info.nr_func_info,
        verified_insns=info.verified_insns,
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


def pinned_cgroup_links(folder: str, names: Sequence[str]) -> list[tuple[int, int, int] | None]:
    """(link id, program id, cgroup id) of the link pinned as each of ``names`` in
    ``folder`` (cgroup id 0 for a detached link or one of another kind), or None where
    nothing readable is pinned. A reconcile pass reads every link of every policy (90,000
    at 10,000 cgroups), so this is its hot loop: an OBJ_GET relative to the folder, a
    GET_INFO and a close per name, with one buffer for all the names and one for the
    answers (zeroed each time: for some link types the kernel reads pointers from it)."""
    folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if _probed.path_fd:
            try:
                return _read_pinned_links(names, folder_fd)
            except _PathFdRefused:
                _probed.path_fd = False  # a kernel before 6.5
        return _read_pinned_links([os.path.join(folder, name) for name in names], None)
    finally:
        os.close(folder_fd)


class _PathFdRefused(Exception):
    """The kernel does not know BPF_F_PATH_FD."""


def _read_pinned_links(
    paths: Sequence[str], folder_fd: int | None
) -> list[tuple[int, int, int] | None]:
    encoded = [os.fsencode(path) for path in paths]
    buffer = ctypes.create_string_buffer(b"\0".join(encoded))
    get = _ObjAttr(pathname=ctypes.addressof(buffer))
    if folder_fd is not None:
        get.file_flags, get.path_fd = BPF_F_PATH_FD, folder_fd
    info = _LinkInfo()
    info_at, info_size = ctypes.addressof(info), ctypes.sizeof(info)
    ask = _InfoAttr(info_len=info_size, info=info_at)
    get_ref, get_size = ctypes.byref(get), ctypes.sizeof(get)
    ask_ref, ask_size = ctypes.byref(ask), ctypes.sizeof(ask)
    found: list[tuple[int, int, int] | None] = []
    for path in encoded:
        fd = _retried(Cmd.OBJ_GET, get_ref, get_size)
        if fd < 0:
            if -fd == errnos.EINVAL and folder_fd is not None and not found:
                raise _PathFdRefused
            found.append(None)
        else:
            try:
                ctypes.memset(info_at, 0, info_size)
                ask.bpf_fd = fd
                if _retried(Cmd.OBJ_GET_INFO_BY_FD, ask_ref, ask_size) < 0:
                    found.append(None)
                else:
                    cgroup_id = info.cgroup_id if info.type == LinkType.CGROUP else 0
                    found.append((info.id, info.prog_id, cgroup_id))
            finally:
                os.close(fd)
        get.pathname += len(path) + 1
    return found


def link_ids() -> Iterator[int]:
    """Ids of every BPF link on the host (needs CAP_SYS_ADMIN)."""
    attr = _GetIdAttr()
    while True:
        try:
            bpf(Cmd.LINK_GET_NEXT_ID, attr, f"after link id {attr.id}")
        except BpfError as error:
            if error.errno == errnos.ENOENT:
                return
            raise
        attr.id = attr.next_id
        yield attr.id


def enable_run_time_stats() -> int:
    """An fd that keeps run_time_ns/run_cnt counting while open, like
    kernel.bpf_stats_enabled=1 but ended by closing it (or by the process exiting)."""
    return bpf(Cmd.ENABLE_STATS, _EnableStatsAttr(type=0), "BPF_STATS_RUN_TIME")


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
    bpf(Cmd.PROG_ATTACH, attr, lambda: describe_attachment(prog_fd, "on", cgroup_fd, attach_type))


def prog_detach(cgroup_fd: int, attach_type: AttachType, prog_fd: int | None = None) -> None:
    """Legacy detach of ``prog_fd`` (required for multi attachments) from a cgroup hook."""
    attr = _ProgAttachAttr(target_fd=cgroup_fd, attach_bpf_fd=prog_fd or 0, attach_type=attach_type)
    bpf(Cmd.PROG_DETACH, attr, lambda: describe_attachment(prog_fd, "from", cgroup_fd, attach_type))


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
            attr.prog_ids = addr(ids)
            if _probed.query_tail:
                attr.link_ids = addr(links)
                if not effective:  # the kernel refuses per-program flags for effective
                    attr.prog_attach_flags = addr(prog_flags)
        try:
            bpf(Cmd.PROG_QUERY, attr, what)
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


# struct __sk_buff up to and including ifindex (offset 40): the context test_run takes
_SKB_CTX_IFINDEX = struct.Struct("=40xI")


def prog_test_run(
    prog_fd: int, data: bytes, repeat: int = 1, data_size_out: int = 0, ifindex: int = 0
) -> TestRunResult:
    """Run a program on ``data`` (a packet with its Ethernet header for cgroup_skb). With
    ``ifindex`` (cgroup_skb and other skb programs) the packet is on that device instead
    of the loopback device."""
    data_in = ctypes.create_string_buffer(data, len(data))
    out = ctypes.create_string_buffer(data_size_out) if data_size_out else None
    attr = _TestRunAttr(
        prog_fd=prog_fd,
        data_size_in=len(data),
        data_size_out=data_size_out,
        data_in=addr(data_in),
        data_out=addr(out),
        repeat=repeat,
    )
    if ifindex:
        ctx = ctypes.create_string_buffer(_SKB_CTX_IFINDEX.pack(ifindex), _SKB_CTX_IFINDEX.size)
        attr.ctx_size_in, attr.ctx_in = _SKB_CTX_IFINDEX.size, addr(ctx)
    bpf(Cmd.PROG_TEST_RUN, attr, f"of program fd {prog_fd} on {len(data)} bytes")
    data_out = out.raw[: attr.data_size_out] if out is not None else b""
    return TestRunResult(attr.retval, attr.duration, data_out)


def describe_attachment(
    prog_fd: int | None, preposition: str, cgroup_fd: int, attach_type: int
) -> str:
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
    # Imported here: the hooks table is built from this module's enums.
    from cgpolicy.kernel.hooks import hook_name

    return hook_name(attach_type)
