"""What cgpolicy keeps on bpffs: the layout of its folder, the metadata, and pinning,
replacing and unpinning there (:mod:`cgpolicy.kernel.applied` reads it all back).

The kernel is the source of truth: everything cgpolicy has applied is found under its bpffs
folder, so no state file can go stale.

    <bpf_dir>/<policy>/meta                     array map, one entry: the policy's metadata as JSON
    <bpf_dir>/<policy>/events                   ring buffer of deny events, shared by its programs
    <bpf_dir>/<policy>/learned                  addresses learned from DNS answers (fqdns rules)
    <bpf_dir>/<policy>/dns_jump                 the DNS programs the ingress program tail-calls
    <bpf_dir>/<policy>/dns_stats                what learning did: addresses learned, and refused
    <bpf_dir>/<policy>/dns_scope, dns_targets   the depths and ids of its target cgroups
    <bpf_dir>/<policy>/dns_pending, dns_seen    queries awaiting answers, address slots ever learned
    <bpf_dir>/<policy>/<hook>/prog              the policy's program for that hook
    <bpf_dir>/<policy>/<hook>/link-<cgroup id>  a BPF link holding that program on one cgroup

Pins are replaced by pinning under a temporary name and renaming over the old one, so a
reader (or a crash) never sees a policy folder without its metadata or program.

bpffs is mounted world-writable (1777) by default, so whoever could write these folders
could unpin links (lifting enforcement) or plant links that make a removal wander out of
the tree. Every folder here is made mode 0700 and checked at every use (``trusted``): owned
by root, not writable by others, never a symlink; enumeration and removal never follow a
link.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cgpolicy.contract import U32
from cgpolicy.kernel.bpf import CgroupLink, Map, Program
from cgpolicy.kernel.syscall import BpfError, MapType
from cgpolicy.kernel.trusted import UntrustedFolder, check_real_folder, open_trusted_dir

META_PIN = "meta"
EVENTS_PIN = "events"
# With rules naming fqdns: the addresses learned from DNS answers, and the prog array the
# ingress program tail-calls through (its entries last only while it is pinned or open)
LEARNED_PIN = "learned"
DNS_JUMP_PIN = "dns_jump"
DNS_STATS_PIN = "dns_stats"
DNS_SCOPE_PIN = "dns_scope"
DNS_TARGETS_PIN = "dns_targets"
DNS_PENDING_PIN = "dns_pending"
DNS_SEEN_PIN = "dns_seen"
PROG_PIN = "prog"
LINK_PREFIX = "link-"
_META_KEY = U32.pack(0)


@dataclass(frozen=True)
class PolicyMeta:
    """What an applied policy is, as recorded next to its programs."""

    name: str
    revision: str
    mode: str
    source: str | None = None
    # cgroup id -> path relative to the cgroup2 mount, for the links below this policy
    cgroups: dict[int, str] = field(default_factory=dict)
    # hook -> its rules in counter-slot order: {"text": "deny tcp to ...", "line": 12}
    rules: dict[str, list[dict[str, object]]] = field(default_factory=dict)
    # `path:` device rules and what their paths named when applied (DevicePath.to_json);
    # a deny rule's device is kept from here if its path names nothing later
    devices: list[dict[str, object]] = field(default_factory=list)
    # hook -> the id of the program this metadata was written for: a pinned program that
    # differs means an apply was interrupted after its links and programs moved on
    programs: dict[str, int] = field(default_factory=dict)
    # who applied it (ownership.Owner.to_json); None in metadata from before owners
    owner: dict[str, object] | None = None
    # the fqdns patterns (CompiledPolicy.names): what a learned entry's name_id stands for
    names: list[str] = field(default_factory=list)

    def encode(self) -> bytes:
        data: dict[str, object] = {
            "policy": self.name,
            "revision": self.revision,
            "mode": self.mode,
            "source": self.source,
            "cgroups": {str(k): v for k, v in sorted(self.cgroups.items())},
            "rules": self.rules,
            "programs": self.programs,
        }
        if self.devices:
            data["devices"] = self.devices
        if self.owner is not None:
            data["owner"] = self.owner
        if self.names:
            data["names"] = self.names
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> PolicyMeta:
        data = json.loads(raw.rstrip(b"\0"))
        cgroups = {int(k): v for k, v in data.get("cgroups", {}).items()}
        rules = data.get("rules") or {}
        listed = data.get("devices")
        devices = [d for d in listed if isinstance(d, dict)] if isinstance(listed, list) else []
        recorded = data.get("programs")
        programs = (
            {str(k): v for k, v in recorded.items() if isinstance(v, int)}
            if isinstance(recorded, dict)
            else {}
        )
        return cls(
            data["policy"],
            data["revision"],
            data["mode"],
            data.get("source"),
            cgroups,
            rules,
            devices,
            programs,
            owner if isinstance(owner := data.get("owner"), dict) else None,
            [n for n in names if isinstance(n, str)]
            if isinstance(names := data.get("names"), list)
            else [],
        )


def policy_dir(bpf_dir: Path, name: str) -> Path:
    return bpf_dir / name


def hook_dir(bpf_dir: Path, name: str, hook: str) -> Path:
    return bpf_dir / name / hook


def link_pin(bpf_dir: Path, name: str, hook: str, cgroup_id: int) -> str:
    """As text: an apply over 10,000 cgroups makes one per link, and a Path costs ~3
    times the memory and time."""
    return os.path.join(bpf_dir, name, hook, f"{LINK_PREFIX}{cgroup_id}")


class Pinnable(Protocol):
    def pin(self, path: str | os.PathLike[str]) -> None: ...


# Folders ensure_trusted() checked within one `checked_once()` block (None: outside one).
_checked: set[Path] | None = None


@contextmanager
def checked_once() -> Iterator[None]:
    """Within the block, ensure_trusted() checks each folder once: pinning a link on each of
    10,000 cgroups checks the hook folder (and its ancestors) once, not 10,000 times. For a
    caller holding the pin folder's lock (kernel/lock.py), which nothing but root can take."""
    global _checked
    outer, _checked = _checked, set() if _checked is None else _checked
    try:
        yield
    finally:
        _checked = outer


def ensure_trusted(folder: Path) -> None:
    """Make ``folder`` (and what is missing above it) mode 0700, or check the existing one:
    root's, closed to others, not a symlink. Raises UntrustedFolder with the fix."""
    if _checked is not None and folder in _checked:
        return
    os.close(open_trusted_dir(folder, create=True, mode=0o700))
    if _checked is not None:
        _checked.add(folder)


def bpf_dir_exists(bpf_dir: Path) -> bool:
    """Whether cgpolicy's folder exists; raises UntrustedFolder when it exists but someone
    other than root could change it (then nothing read from it can be believed)."""
    try:
        os.close(open_trusted_dir(bpf_dir, create=False))
    except FileNotFoundError:
        return False
    return True


def real_subfolders(folder: Path) -> list[Path]:
    """The folders directly in ``folder``, symlinks left out (and never followed); each one
    checked to be root's and closed to others. Names starting with ``.`` or ``_`` (the
    lock) are not policies: policy names are DNS labels."""
    found = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    for entry in entries:
        if entry.is_dir(follow_symlinks=False) and not entry.name.startswith((".", "_")):
            try:
                check_real_folder(Path(entry.path))
            except UntrustedFolder:
                if not os.path.lexists(entry.path):
                    continue  # removed since listed (a concurrent remove): not there
                raise
            found.append(Path(entry.path))
    return sorted(found)


def pin_replacing(obj: Pinnable, path: str | os.PathLike[str]) -> None:
    """Pin ``obj`` at ``path``, atomically replacing whatever was pinned there."""
    path = os.fspath(path)
    ensure_trusted(Path(os.path.dirname(path)))
    temporary = f"{path}_new"  # bpffs refuses names with a '.'
    if os.path.lexists(temporary):
        os.unlink(temporary)
    obj.pin(temporary)
    os.replace(temporary, path)


def write_meta(bpf_dir: Path, meta: PolicyMeta) -> None:
    """Record ``meta`` in a fresh map pinned over the old one (sized to fit, so no limit on
    how many cgroups a policy covers)."""
    payload = meta.encode()
    size = max(4096, (len(payload) + 4095) // 4096 * 4096)
    with Map.create(MapType.ARRAY, 4, size, 1, name="cgp_meta") as meta_map:
        meta_map.update(_META_KEY, payload.ljust(size, b"\0"))
        pin_replacing(meta_map, policy_dir(bpf_dir, meta.name) / META_PIN)


def read_meta(folder: Path) -> PolicyMeta | None:
    """The metadata pinned in a policy folder, or None if it is missing or unreadable."""
    try:
        with Map.from_pin(folder / META_PIN) as meta_map:
            raw = meta_map.lookup(_META_KEY)
    except (BpfError, OSError):
        return None
    if raw is None:
        return None
    try:
        return PolicyMeta.decode(raw)
    except (ValueError, KeyError):
        return None


def policy_folders(bpf_dir: Path) -> list[Path]:
    """One folder per applied policy; raises UntrustedFolder if the tree is not root's."""
    if not bpf_dir_exists(bpf_dir):
        return []
    return real_subfolders(bpf_dir)


def remove_folder(folder: Path) -> None:
    """Unpin everything in ``folder`` (which holds no folders any more), then remove it.
    Nothing is followed: a symlink is removed itself, never what it points at."""
    check_real_folder(folder)
    for entry in os.scandir(folder):
        if not entry.is_dir(follow_symlinks=False):
            os.unlink(entry.path)
    folder.rmdir()


def unpin(path: str | os.PathLike[str]) -> None:
    """Drop one pin (the object lives on while something else holds it); gone is fine."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def link_pins(folder: Path) -> dict[int, str]:
    """cgroup id -> link pin (its path), for one hook folder."""
    return {
        cgroup_id: os.path.join(folder, name) for cgroup_id, name in link_pin_names(folder).items()
    }


def link_pin_names(folder: Path) -> dict[int, str]:
    """cgroup id -> the name of its link pin in one hook folder (as text: a pass reads
    90,000 of them at 10,000 cgroups)."""
    found = {}
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return {}
    for entry in entries:
        suffix = entry.name[len(LINK_PREFIX) :]
        # only the names link_pin gives: ASCII digits, no leading zero
        canonical = suffix.isascii() and suffix.isdigit() and suffix[0] != "0"
        if entry.name.startswith(LINK_PREFIX) and canonical and not entry.is_symlink():
            found[int(suffix)] = entry.name
    return found


def remove_empty(folder: Path) -> None:
    """Remove a pin folder if nothing is left in it; else leave it."""
    try:
        folder.rmdir()
    except OSError:
        pass


def policy_exists(bpf_dir: Path, name: str) -> bool:
    """Whether anything (even a symlink) is at the policy folder ``name``."""
    return os.path.lexists(policy_dir(bpf_dir, name))


@dataclass(frozen=True)
class PinnedObject:
    """One pinned object: where, what kind, and which object (its id)."""

    path: Path
    kind: str  # "link", "program" or "map"
    object_id: int


DNS_PINS = (  # the maps of DNS names (fqdns rules)
    LEARNED_PIN,
    DNS_JUMP_PIN,
    DNS_STATS_PIN,
    DNS_SCOPE_PIN,
    DNS_TARGETS_PIN,
    DNS_PENDING_PIN,
    DNS_SEEN_PIN,
)
MAP_PINS = (META_PIN, EVENTS_PIN, *DNS_PINS)


def _kind_of(name: str) -> str | None:
    name = name.removesuffix("_new")  # a temporary pin of pin_replacing
    if name.startswith(LINK_PREFIX):
        return "link"
    if name == PROG_PIN:
        return "program"
    if name in MAP_PINS:
        return "map"
    return None


def _object_id(path: Path, kind: str) -> int | None:
    """The id of the object pinned at ``path`` (None when nothing of that kind is there)."""
    try:
        if kind == "link":
            with CgroupLink.from_pin(path) as link:
                return link.info().id
        if kind == "program":
            with Program.from_pin(path) as program:
                return program.id
        with Map.from_pin(path) as pinned_map:
            return pinned_map.id
    except (BpfError, OSError):
        return None


def pin_paths(folder: Path) -> list[Path]:
    """Every pin in a policy folder and its hook folders; symlinks are never followed."""
    found = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        if entry.is_symlink():
            continue
        if entry.is_dir():
            try:
                inner = list(os.scandir(entry.path))
            except OSError:
                continue
            found += [Path(e.path) for e in inner if not e.is_symlink() and not e.is_dir()]
        else:
            found.append(Path(entry.path))
    return sorted(found)


def pinned_objects(folder: Path) -> list[PinnedObject]:
    """Every link, program and map pinned in a policy folder, with the object's id now."""
    found = []
    for path in pin_paths(folder):
        kind = _kind_of(path.name)
        object_id = _object_id(path, kind) if kind else None
        if kind is not None and object_id is not None:
            found.append(PinnedObject(path, kind, object_id))
    return found


def unpin_if_same(pinned: PinnedObject) -> None:
    """Unpin ``pinned`` (detaching it first if it is an attached link), but only while the
    same object is pinned there: one gone already, or another object pinned there now, is
    left alone."""
    if _object_id(pinned.path, pinned.kind) != pinned.object_id:
        return
    if pinned.kind == "link":
        with CgroupLink.from_pin(pinned.path) as link:
            if link.info().cgroup_id:
                link.detach()
    pinned.path.unlink()
