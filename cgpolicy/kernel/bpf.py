"""The BPF objects cgpolicy holds: ``Map``, ``Program`` and ``CgroupLink`` each own a file
descriptor, close it once, pin it and reopen it from a pin or an id.

Their commands go through :mod:`cgpolicy.kernel.syscall`, the bpf() ABI.
"""

from __future__ import annotations

import ctypes
import errno as errnos
import functools
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import ClassVar, Self

from cgpolicy.kernel.hooks import hook_name
from cgpolicy.kernel.syscall import (
    BPF_ANY,
    BPF_F_REPLACE,
    ENOTSUPP,
    AttachType,
    BpfError,
    BtfLoadAttr,
    Cmd,
    LinkCreateAttr,
    LinkDetachAttr,
    LinkInfo,
    LinkUpdateAttr,
    MapBatchAttr,
    MapCreateAttr,
    MapElemAttr,
    MapInfo,
    MapType,
    ProgLoadAttr,
    ProgramInfo,
    ProgType,
    TestRunResult,
    VerifierError,
    addr,
    bpf,
    describe_attachment,
    link_get_fd_by_id,
    link_info,
    map_get_fd_by_id,
    map_info,
    obj_get,
    obj_pin,
    prog_get_fd_by_id,
    prog_info,
    prog_test_run,
)

_FUNC_INFO = struct.Struct("<II")  # struct bpf_func_info: insn_off, type_id
_PERCPU_MAPS = frozenset({MapType.PERCPU_HASH, MapType.PERCPU_ARRAY})
# Map types whose MAP_UPDATE_BATCH this kernel refused: not asked again in this process.
_NO_BATCH: set[MapType] = set()


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


def _check_name(kind: str, name: str) -> bytes:
    """Kernel object names: at most 15 characters of [A-Za-z0-9_.] (else EINVAL)."""
    if len(name) > 15 or not all(c.isascii() and (c.isalnum() or c in "_.") for c in name):
        raise ValueError(f"{kind} name {name!r}: at most 15 characters of A-Z a-z 0-9 _ .")
    return name.encode()


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
        inner_map_fd: int = 0,
    ) -> Map:
        attr = MapCreateAttr(
            map_type=map_type,
            key_size=key_size,
            value_size=value_size,
            max_entries=max_entries,
            map_flags=flags,
            inner_map_fd=inner_map_fd,
            map_name=_check_name("map", name),
        )
        what = (
            f"{name or '(unnamed)'} ({map_type.name.lower()}, key {key_size} B, "
            f"value {value_size} B, max {max_entries}, flags {flags:#x})"
        )
        fd = bpf(Cmd.MAP_CREATE, attr, what)
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
        attr = MapElemAttr(map_fd=self.fd, key=_bytes_addr(k), value=_bytes_addr(v), flags=flags)
        bpf(Cmd.MAP_UPDATE_ELEM, attr, self._what(key))

    def lookup(self, key: bytes) -> bytes | None:
        return self._lookup(Cmd.MAP_LOOKUP_ELEM, key)

    def take(self, key: bytes) -> bytes | None:
        """Look ``key`` up and delete it in one step (a hash map); None if it was not there."""
        return self._lookup(Cmd.MAP_LOOKUP_AND_DELETE_ELEM, key)

    def _lookup(self, command: Cmd, key: bytes) -> bytes | None:
        k = self._key(key)
        out = ctypes.create_string_buffer(self._value_len)
        attr = MapElemAttr(map_fd=self.fd, key=_bytes_addr(k), value=addr(out))
        try:
            bpf(command, attr, self._what(key))
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
            bpf(
                Cmd.MAP_DELETE_ELEM,
                MapElemAttr(map_fd=self.fd, key=_bytes_addr(k)),
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
        attr = MapElemAttr(map_fd=self.fd, key=_bytes_addr(k) if k else 0, value=addr(out))
        try:
            bpf(Cmd.MAP_GET_NEXT_KEY, attr, self._what(key))
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
        if self.info.type not in _NO_BATCH:
            try:
                self._update_batch(entries, flags)
                return
            except BpfError as error:
                if error.errno not in (errnos.EINVAL, errnos.EOPNOTSUPP, ENOTSUPP):
                    raise
                _NO_BATCH.add(MapType(self.info.type))
        for key, value in entries:
            self.update(key, value, flags)

    def _update_batch(self, entries: Sequence[tuple[bytes, bytes]], flags: int) -> None:
        key_list, value_list = [k for k, _ in entries], [v for _, v in entries]
        if self._per_cpu or set(map(len, value_list)) != {self._value_len}:
            value_list = [self._value(v) for v in value_list]  # padded, or the error
        if set(map(len, key_list)) != {self.info.key_size}:
            key_list = [self._key(k) for k in key_list]  # the error
        keys, values = b"".join(key_list), b"".join(value_list)  # only read by the kernel
        done = 0
        while done < len(entries):
            attr = MapBatchAttr(
                keys=_bytes_addr(keys) + done * self.info.key_size,
                values=_bytes_addr(values) + done * self._value_len,
                count=len(entries) - done,
                map_fd=self.fd,
                elem_flags=flags,
            )
            try:
                bpf(Cmd.MAP_UPDATE_BATCH, attr, f"{self._what()} ({len(entries)} entries)")
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
        license: str = "GPL",
        btf: Btf | None = None,
        func_info: Sequence[tuple[int, int]] = (),
    ) -> Program:
        """PROG_LOAD. Tried first without a verifier log (the log slows the verifier); on a
        rejection it loads again with a log, growing the buffer until the log fits, and raises
        VerifierError with it. ``func_info``: (first instruction, FUNC type id in ``btf``) of
        the main function and of each subprogram, for a program with subprograms."""
        if len(insns) % 8:
            raise ValueError(f"program {name}: {len(insns)} bytes is not whole instructions")
        insn_buf = ctypes.create_string_buffer(insns, len(insns))
        lic = ctypes.create_string_buffer(license.encode())
        funcs = b"".join(_FUNC_INFO.pack(insn, type_id) for insn, type_id in func_info)
        func_buf = ctypes.create_string_buffer(funcs, len(funcs)) if funcs else None
        attr = ProgLoadAttr(
            prog_type=prog_type,
            insn_cnt=len(insns) // 8,
            insns=addr(insn_buf),
            license=addr(lic),
            prog_name=_check_name("program", name),
            expected_attach_type=expected_attach_type,
        )
        if func_info:
            if btf is None:
                raise ValueError(f"program {name}: func_info without its BTF")
            attr.prog_btf_fd = btf.fd
            attr.func_info_rec_size = _FUNC_INFO.size
            attr.func_info = addr(func_buf)
            attr.func_info_cnt = len(func_info)
        what = f"of {name} ({ProgType(prog_type).name.lower()}, {len(insns) // 8} insns)"
        try:
            return cls(_load(attr, what))
        except BpfError as first:
            if first.errno in (errnos.EPERM, errnos.E2BIG, errnos.ENOMEM):
                raise  # not the verifier talking: a log would not explain it
            error = first
        for log_size in (1 << 20, 1 << 22, 1 << 24):
            log = ctypes.create_string_buffer(log_size)
            attr.log_level, attr.log_size, attr.log_buf = 1, log_size, addr(log)
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

    def test_run(
        self, data: bytes, repeat: int = 1, data_size_out: int = 0, ifindex: int = 0
    ) -> TestRunResult:
        return prog_test_run(self.fd, data, repeat, data_size_out, ifindex)


def _load(attr: ProgLoadAttr, what: str) -> int:
    """PROG_LOAD, retried on EAGAIN as libbpf does (the verifier was interrupted)."""
    for _ in range(4):
        try:
            return bpf(Cmd.PROG_LOAD, attr, what)
        except BpfError as error:
            if error.errno != errnos.EAGAIN:
                raise
    return bpf(Cmd.PROG_LOAD, attr, what)


class Btf(_FdObject):
    """A BTF object (BTF_LOAD), the types a program's func_info names. A program loaded
    with it keeps its own reference: close it after PROG_LOAD."""

    _kind = "BTF"

    @classmethod
    def load(cls, blob: bytes) -> Btf:
        """BTF_LOAD; on a rejection, loaded again with a log, which the error carries."""
        buf = ctypes.create_string_buffer(blob, len(blob))
        attr = BtfLoadAttr(btf=addr(buf), btf_size=len(blob))
        try:
            return cls(bpf(Cmd.BTF_LOAD, attr, "of a program's BTF"))
        except BpfError as error:
            if error.errno in (errnos.EPERM, errnos.ENOMEM):
                raise
            log = ctypes.create_string_buffer(1 << 16)
            attr.btf_log_buf, attr.btf_log_size, attr.btf_log_level = addr(log), len(log), 1
            try:
                return cls(bpf(Cmd.BTF_LOAD, attr, "of a program's BTF"))
            except BpfError as retry:
                text = log.value.decode(errors="replace")
                raise VerifierError(retry.op, retry.errno, retry.message, text) from None


class CgroupLink(_FdObject):
    """A BPF link holding one program on one cgroup hook.

    Link attachments compose with every other program on the hook as with BPF_F_ALLOW_MULTI,
    never replace another owner's program, and end when the last fd or pin is gone. Dropping
    the last reference to this object closes its fd: pin the link first to keep it.
    """

    _kind = "link"

    @classmethod
    def create(cls, prog_fd: int, cgroup_fd: int, attach_type: AttachType) -> CgroupLink:
        attr = LinkCreateAttr(prog_fd=prog_fd, target_fd=cgroup_fd, attach_type=attach_type)
        return cls(
            bpf(
                Cmd.LINK_CREATE,
                attr,
                lambda: describe_attachment(prog_fd, "on", cgroup_fd, attach_type),
            )
        )

    @classmethod
    def from_id(cls, link_id: int) -> CgroupLink:
        return cls(link_get_fd_by_id(link_id))

    def info(self) -> LinkInfo:
        return link_info(self.fd)

    def update(self, new_prog_fd: int, old_prog_fd: int | None = None) -> None:
        """Swap the linked program atomically. With ``old_prog_fd`` the swap happens only if
        that program is still the linked one (BPF_F_REPLACE), so a racing writer is caught."""
        attr = LinkUpdateAttr(link_fd=self.fd, new_prog_fd=new_prog_fd)
        if old_prog_fd is not None:
            attr.flags, attr.old_prog_fd = BPF_F_REPLACE, old_prog_fd
        bpf(Cmd.LINK_UPDATE, attr, lambda: f"of {self._describe()} to program fd {new_prog_fd}")

    def detach(self) -> None:
        """End the attachment now, even while pins or other fds still hold the link."""
        bpf(Cmd.LINK_DETACH, LinkDetachAttr(link_fd=self.fd), self._describe)

    def _describe(self) -> str:
        try:
            info = self.info()
        except BpfError:
            return f"link fd {self._fd}"
        return f"link {info.id} (program id {info.prog_id}, {hook_name(info.attach_type)})"


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
