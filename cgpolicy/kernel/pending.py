"""The way back of an `apply --confirm-within`: what a policy was before, kept pinned until
`cgpolicy confirm` or the rollback (enforcer/rollout.py) ends it.

    <bpf_dir>/_pending/<policy>/record        array map, one entry: the PendingRecord as JSON
    <bpf_dir>/_pending/<policy>/<map>         the previous version's maps (meta, events, DNS)
    <bpf_dir>/_pending/<policy>/<hook>/prog   the previous version's program for that hook

The folder is root's and mode 0700 like every folder of the pin tree, checked at every use
(``_`` is never in a policy name, so nothing takes it for a policy). The record is written
last: a policy folder here without a record is a way back that was never armed (its apply
had not started), and is dropped. The deadline is on CLOCK_BOOTTIME, which counts through
suspend and, like bpffs, starts again at a reboot (when everything here is gone anyway).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cgpolicy.contract import PROGRAM_SLOTS, U32
from cgpolicy.kernel import pins
from cgpolicy.kernel.bpf import Map, Program
from cgpolicy.kernel.syscall import BpfError, MapType
from cgpolicy.kernel.trusted import UntrustedFolder, check_real_folder, open_trusted_dir

PENDING_FOLDER = "_pending"
RECORD_PIN = "record"
_KEY = U32.pack(0)


def boottime_ns() -> int:
    """Now, on the clock of deadlines."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


@dataclass(frozen=True)
class PendingRecord:
    """One policy applied with a way back, waiting for `cgpolicy confirm`."""

    policy: str
    token: str  # the apply that armed it (and the name of its rollback process's cgroup)
    deadline_ns: int  # boottime_ns() after which it is rolled back
    deadline_wall: float  # the same moment as a Unix time, for people
    previous: str | None  # the revision it goes back to; None: it was new (goes away)
    revision: str | None = None  # the revision waiting for confirmation, once applied
    applied_by: dict[str, object] = field(default_factory=dict)  # pid, command

    def overdue(self, now_ns: int | None = None) -> bool:
        return (boottime_ns() if now_ns is None else now_ns) >= self.deadline_ns

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> PendingRecord:
        data = json.loads(raw.rstrip(b"\0"))
        return cls(
            str(data["policy"]),
            str(data["token"]),
            int(data["deadline_ns"]),
            float(data["deadline_wall"]),
            data.get("previous"),
            data.get("revision"),
            data.get("applied_by") or {},
        )


def pending_root(bpf_dir: Path) -> Path:
    return bpf_dir / PENDING_FOLDER


def pending_dir(bpf_dir: Path, name: str) -> Path:
    return pending_root(bpf_dir) / name


def _write_json_map(path: Path, payload: bytes, name: str) -> None:
    size = max(4096, (len(payload) + 4095) // 4096 * 4096)
    with Map.create(MapType.ARRAY, 4, size, 1, name=name) as json_map:
        json_map.update(_KEY, payload.ljust(size, b"\0"))
        pins.pin_replacing(json_map, path)


def _read_json_map(path: Path) -> bytes | None:
    try:
        with Map.from_pin(path) as json_map:
            return json_map.lookup(_KEY)
    except (BpfError, OSError):
        return None


def _make_folder(bpf_dir: Path, name: str) -> Path:
    """The pending folder of ``name``, made (0700, ``_pending`` too) or checked."""
    pins.ensure_trusted(pending_root(bpf_dir))
    folder = pending_dir(bpf_dir, name)
    pins.ensure_trusted(folder)
    return folder


def write_record(bpf_dir: Path, record: PendingRecord) -> None:
    folder = _make_folder(bpf_dir, record.policy)
    _write_json_map(folder / RECORD_PIN, record.encode(), "cgp_pending")


def _folders(bpf_dir: Path) -> list[Path]:
    """The policy folders under ``_pending`` (checked: root's, closed to others)."""
    root = pending_root(bpf_dir)
    try:
        os.close(open_trusted_dir(root, create=False))
    except FileNotFoundError:
        return []
    return pins.real_subfolders(root)


def read_records(bpf_dir: Path) -> dict[str, PendingRecord]:
    """Every armed way back, by policy; folders without a readable record are left out
    (:func:`unarmed` lists them). Raises UntrustedFolder for a folder others could change."""
    found = {}
    for folder in _folders(bpf_dir):
        raw = _read_json_map(folder / RECORD_PIN)
        if raw is None:
            continue
        try:
            record = PendingRecord.decode(raw)
        except (ValueError, KeyError, TypeError):
            continue
        if record.policy == folder.name:
            found[folder.name] = record
    return found


def unarmed(bpf_dir: Path) -> list[str]:
    """Policies with a pending folder but no valid record (an apply killed before arming)."""
    return [f.name for f in _folders(bpf_dir) if f.name not in read_records(bpf_dir)]


def keep_previous(bpf_dir: Path, name: str) -> None:
    """Pin what the policy ``name`` holds now (its programs and maps, metadata included)
    under its pending folder, so that its links can be switched back to them."""
    source = pins.policy_dir(bpf_dir, name)
    target = _make_folder(bpf_dir, name)
    for map_name in pins.MAP_PINS:
        try:
            with Map.from_pin(source / map_name) as kept:
                pins.pin_replacing(kept, target / map_name)
        except (BpfError, OSError):
            continue  # this version has no such map
    for slot in PROGRAM_SLOTS:  # every hook's program, fail-fast's connect checks too
        try:
            with Program.from_pin(source / slot / pins.PROG_PIN) as program:
                pins.pin_replacing(program, target / slot / pins.PROG_PIN)
        except (BpfError, OSError):
            continue


@dataclass
class Previous:
    """The kept version of one policy, opened (the caller closes it)."""

    meta: pins.PolicyMeta | None  # None: there was no previous version
    raw_meta: dict[str, object] | None
    programs: dict[str, Program] = field(default_factory=dict)
    maps: dict[str, Map] = field(default_factory=dict)

    def close(self) -> None:
        for obj in [*self.programs.values(), *self.maps.values()]:
            obj.close()


def open_previous(bpf_dir: Path, name: str) -> Previous:
    folder = pending_dir(bpf_dir, name)
    check_real_folder(folder)
    raw = _read_json_map(folder / pins.META_PIN)
    meta = pins.read_meta(folder)
    previous = Previous(meta, json.loads(raw.rstrip(b"\0")) if raw and meta else None)
    if meta is None:
        return previous
    try:
        for map_name in pins.MAP_PINS:
            if map_name == pins.META_PIN:
                continue
            try:
                previous.maps[map_name] = Map.from_pin(folder / map_name)
            except (BpfError, OSError):
                continue
        for hook_folder in pins.real_subfolders(folder):
            if hook_folder.name in PROGRAM_SLOTS:
                previous.programs[hook_folder.name] = Program.from_pin(hook_folder / pins.PROG_PIN)
    except BaseException:
        previous.close()
        raise
    return previous


def write_raw_meta(bpf_dir: Path, name: str, data: dict[str, object]) -> None:
    """Pin metadata given as its JSON object (what :class:`pins.PolicyMeta` reads back,
    with keys it does not know kept for other readers) over the policy's metadata."""
    payload = json.dumps(data, sort_keys=True).encode()
    _write_json_map(pins.policy_dir(bpf_dir, name) / pins.META_PIN, payload, "cgp_meta")


def read_raw_meta(bpf_dir: Path, name: str) -> dict[str, object] | None:
    raw = _read_json_map(pins.policy_dir(bpf_dir, name) / pins.META_PIN)
    try:
        data = json.loads(raw.rstrip(b"\0")) if raw else None
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def drop(bpf_dir: Path, name: str) -> None:
    """Unpin everything kept for ``name`` (the kept objects go unless something else holds
    them), then its folder, and ``_pending`` once empty."""
    folder = pending_dir(bpf_dir, name)
    try:
        check_real_folder(folder)
    except UntrustedFolder:
        if not os.path.lexists(folder):
            return
        raise
    for hook_folder in pins.real_subfolders(folder):
        pins.remove_folder(hook_folder)
    pins.remove_folder(folder)
    pins.remove_empty(pending_root(bpf_dir))
