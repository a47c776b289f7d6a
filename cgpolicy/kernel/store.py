"""The compiled-program store: what bcc made of each C file in ``bpf/``, kept on disk so
that a process which finds its programs here never imports bcc or LLVM.

An entry holds, for one C file, every function's instructions, where those name which map
(the relocations) and how the C declares those maps. It is keyed by everything that can
change what bcc produces: the text of the file and of the local headers it includes, the
cflags, bcc's version and library, the kernel headers used and the kernel release they
are looked up for. A key that changed is simply a different entry, so a stale one is never
read; the file set of that source is rebuilt and the old entry pruned.

Whoever can write the store decides what the kernel enforces: it lives in a folder only
root can change (see ``trusted``), entries are read through that folder's descriptor
without following links, must be root's regular files, and carry a SHA-256 of their
content and their full key. An entry that fails any check is rebuilt, never loaded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from cgpolicy.kernel.trusted import (
    UntrustedFolder,
    is_trusted_file,
    open_trusted_dir,
    write_atomically,
)

log = logging.getLogger(__name__)

DEFAULT_STORE_DIR = Path("/var/cache/cgpolicy")
STORE_DIR_ENV = "CGPOLICY_CACHE_DIR"
FORMAT = 1
_MAX_ENTRY_BYTES = 16 << 20
_LOCAL_INCLUDE = re.compile(rb'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


class StoreError(Exception):
    """The store cannot be used (its folder is not root's, or cannot be made)."""


@dataclass(frozen=True, slots=True)
class MapTemplate:
    """A map as the C declares it (bcc's template for it)."""

    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int


@dataclass(frozen=True, slots=True)
class CompiledFunction:
    """One C function's instructions and where they name which map."""

    source: Path
    function: str
    insns: bytes
    relocations: tuple[tuple[int, str], ...]  # (byte offset of the ld_imm64, map name)
    templates: Mapping[str, MapTemplate]  # the maps the function references


CompiledFile = dict[str, CompiledFunction]  # every function of one C file, by name


class EntryDamaged(Exception):
    """An entry's bytes do not hold what its key and checksum say."""


_configured_dir: Path | None = None


def configure_store_dir(path: Path | None) -> None:
    """Use ``path`` instead of $CGPOLICY_CACHE_DIR or the default (the `--cache-dir` option)."""
    global _configured_dir
    _configured_dir = path


def store_dir() -> Path:
    return _configured_dir or Path(os.environ.get(STORE_DIR_ENV) or DEFAULT_STORE_DIR)


# --- the key ----------------------------------------------------------------------------


def _sources(source: Path) -> dict[str, str]:
    """sha256 of ``source`` and of every local header it includes, recursively."""
    digests: dict[str, str] = {}
    pending = [source]
    while pending:
        path = pending.pop()
        name = os.path.relpath(path, source.parent)
        if name in digests:
            continue
        try:
            text = path.read_bytes()
        except OSError as error:
            raise OSError(error.errno, f"cannot read BPF source {path}: {error.strerror}") from None
        digests[name] = hashlib.sha256(text).hexdigest()
        pending.extend(path.parent / include.decode() for include in _LOCAL_INCLUDE.findall(text))
    return digests


def _file_identity(path: Path) -> list[Any] | None:
    """Path, size and mtime: what a package update changes. Not the inode, which differs
    between an image's build and its run (overlayfs layers)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return [str(path), info.st_size, info.st_mtime_ns]


def _bcc_identity() -> dict[str, Any]:
    """bcc's version and the library it compiles with, found without importing it."""
    spec = find_spec("bcc")
    if spec is None or spec.origin is None:
        return {"python": None}
    package = Path(spec.origin).parent
    try:
        version = (package / "version.py").read_text().strip()
    except OSError:
        version = None
    libraries = [
        _file_identity(Path(folder) / "libbcc.so.0")
        for folder in (
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
            "/usr/lib64",
            "/usr/lib",
            "/usr/local/lib",
        )
    ]
    return {
        "python": str(package),
        "version": version,
        "libbcc": [found for found in libraries if found],
    }


def _headers_identity() -> dict[str, Any]:
    """The kernel headers bcc will compile against, as bcc itself finds them: the folder
    ``BCC_KERNEL_SOURCE`` names (pinned headers, as the container image uses), else
    ``/lib/modules/<running release>/build`` and ``source``."""
    pinned = os.environ.get("BCC_KERNEL_SOURCE")
    if pinned:
        folders = {"build": Path(pinned)}
        release = None
    else:
        release = os.uname().release
        base = Path("/lib/modules") / release
        folders = {"build": base / "build", "source": base / "source"}
    identity: dict[str, Any] = {
        "kernel_release": release,
        "version_override": os.environ.get("BCC_LINUX_VERSION_CODE"),
    }
    for role, folder in folders.items():
        real = Path(os.path.realpath(folder))
        try:
            uts = (real / "include/generated/utsrelease.h").read_text().strip()
        except OSError:
            uts = None
        identity[role] = {
            "path": str(real),
            "utsrelease": uts,
            "files": [
                _file_identity(real / name)
                for name in (
                    ".config",
                    "include/generated/autoconf.h",
                    "include/uapi/linux/bpf.h",
                    "include/generated/uapi/linux/version.h",
                )
            ],
        }
    return identity


def entry_key(source: Path, cflags: Sequence[str]) -> dict[str, Any]:
    """Everything that can change what bcc makes of ``source``."""
    return {
        "format": FORMAT,
        "source": source.name,
        "texts": _sources(source),
        "cflags": list(cflags),
        "bcc": _bcc_identity(),
        "headers": _headers_identity(),
    }


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def entry_name(source: Path, key: Mapping[str, Any]) -> str:
    return f"{source.name}-{hashlib.sha256(_canonical(key)).hexdigest()}.json"


# --- entries ----------------------------------------------------------------------------


def encode_entry(key: Mapping[str, Any], compiled: CompiledFile) -> bytes:
    body = {
        "key": key,
        "functions": {
            name: {
                "insns": base64.b64encode(function.insns).decode(),
                "relocations": [list(item) for item in function.relocations],
                "maps": {
                    map_name: [t.type, t.key_size, t.value_size, t.max_entries, t.flags]
                    for map_name, t in function.templates.items()
                },
            }
            for name, function in sorted(compiled.items())
        },
    }
    return _canonical({"sha256": hashlib.sha256(_canonical(body)).hexdigest(), "body": body})


def decode_entry(data: bytes, key: Mapping[str, Any], source: Path) -> CompiledFile:
    """The functions an entry holds, after checking its checksum, its key and that every
    relocation points at a map-load instruction inside the code."""
    try:
        document = json.loads(data)
        body = document["body"]
        if document["sha256"] != hashlib.sha256(_canonical(body)).hexdigest():
            raise EntryDamaged("checksum does not match the content")
        if body["key"] != key:
            raise EntryDamaged("its key is not the one it is stored under")
        compiled: CompiledFile = {}
        for name, function in body["functions"].items():
            insns = base64.b64decode(function["insns"], validate=True)
            relocations = tuple(
                (int(offset), str(map_name)) for offset, map_name in function["relocations"]
            )
            templates = {
                str(map_name): MapTemplate(*(int(v) for v in values))
                for map_name, values in function["maps"].items()
            }
            for offset, map_name in relocations:
                if (
                    offset % 8
                    or not 0 <= offset <= len(insns) - 16
                    or insns[offset] != 0x18
                    or map_name not in templates
                ):
                    raise EntryDamaged(f"{name}: relocation at byte {offset} is not a map load")
            if not insns or len(insns) % 8:
                raise EntryDamaged(f"{name}: {len(insns)} bytes of code is not whole instructions")
            compiled[str(name)] = CompiledFunction(source, str(name), insns, relocations, templates)
    except EntryDamaged:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise EntryDamaged(f"unreadable ({type(error).__name__}: {error})") from None
    return compiled


class CompiledStore:
    """Entries in one trusted folder; every access re-checks the folder."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _open(self, create: bool) -> int:
        try:
            return open_trusted_dir(self.path, create=create)
        except UntrustedFolder as error:
            raise StoreError(f"refusing the compiled-program store: {error}") from None

    def load(self, source: Path, key: Mapping[str, Any]) -> CompiledFile | None:
        """The entry for ``key``, or None when it is missing; a damaged one is logged and
        reported as missing so that it is rebuilt."""
        name = entry_name(source, key)
        try:
            folder = self._open(create=False)
        except FileNotFoundError:
            return None
        try:
            data = _read_trusted(folder, name)
        finally:
            os.close(folder)
        if data is None:
            return None
        try:
            return decode_entry(data, key, source)
        except EntryDamaged as error:
            log.warning(
                "compiled-program store: %s/%s is damaged (%s); rebuilding it",
                self.path,
                name,
                error,
            )
            return None

    def save(self, source: Path, key: Mapping[str, Any], compiled: CompiledFile) -> None:
        """Write atomically (temp file, fsync, rename), then prune this source's other
        entries, which belong to keys that no longer hold."""
        name = entry_name(source, key)
        data = encode_entry(key, compiled)
        folder = self._open(create=True)
        try:
            try:
                write_atomically(folder, name, data)
            except IsADirectoryError:  # a folder in the entry's place: not an entry
                _unlink_quietly(folder, name)
                write_atomically(folder, name, data)
            for other in os.listdir(folder):
                if (
                    other != name
                    and other.startswith(f"{source.name}-")
                    and other.endswith(".json")
                ):
                    _unlink_quietly(folder, other)
        finally:
            os.close(folder)

    def clear(self) -> int:
        """Remove every entry (and leftover temp file); the folder stays."""
        try:
            folder = self._open(create=False)
        except FileNotFoundError:
            return 0
        removed = 0
        try:
            for name in os.listdir(folder):
                if name.endswith(".json") or name.startswith(".tmp-"):
                    removed += _unlink_quietly(folder, name)
        finally:
            os.close(folder)
        return removed


def _read_trusted(folder: int, name: str) -> bytes | None:
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder
        )
    except FileNotFoundError:
        return None
    except OSError as error:
        log.warning(
            "compiled-program store: cannot open %s (%s); rebuilding it", name, error.strerror
        )
        return None
    info = os.fstat(fd)  # before fdopen, which refuses a folder with an exception
    if not is_trusted_file(info) or info.st_size > _MAX_ENTRY_BYTES:
        os.close(fd)
        log.warning(
            "compiled-program store: %s is not a root-only regular file of at most %d bytes;"
            " rebuilding it",
            name,
            _MAX_ENTRY_BYTES,
        )
        return None
    with os.fdopen(fd, "rb") as entry:
        return entry.read(_MAX_ENTRY_BYTES + 1)


def _unlink_quietly(folder: int, name: str) -> int:
    """Remove one entry (an empty folder in its place too); 0 if there was none or it
    cannot be removed, which is logged."""
    try:
        os.unlink(name, dir_fd=folder)
    except FileNotFoundError:
        return 0
    except IsADirectoryError:
        try:
            os.rmdir(name, dir_fd=folder)
        except OSError as error:
            log.warning(
                "compiled-program store: cannot remove the folder %s: %s", name, error.strerror
            )
            return 0
    return 1
