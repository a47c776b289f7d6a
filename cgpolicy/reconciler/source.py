"""The policy folder as the reconciler sees it: valid files, and the last good version of
files that have turned bad.

A file in the folder is one of three things at each reading:

- **valid**: a regular file (or a symlink to one in the folder, as a ConfigMap volume has)
  whose content passes validation; its policies are enforced and its text becomes its last
  good version (kept in memory and, when a store is given, on disk: :mod:`lastgood`);
- **bad**: it exists as a name in the folder but is invalid, or cannot be read (a dangling
  symlink, a symlink loop, a symlink that leads out of the folder, a FIFO, a folder, a
  device, a file those who can write the folder could not read, a read error). Its last good
  version stays enforced: from this process's memory, else from the store (validated
  again). With neither, what the kernel has from it is left as it is;
- **gone**: no such name in the folder. Only then are its policies removed (and its
  stored last good version deleted).

This module reads the files and the store; which version of each file is enforced is
decided in :mod:`versions`, from what was read.

Files are read by this module, not by the validator: a name that is not a regular file is
never opened (opening a device or a FIFO can block or have effects), and the bytes that are
validated are the bytes that were read. The service reads as root for whoever writes the
folder, so it reads nothing they could not read themselves: no symlink out of the folder,
no root-only file (a hard link) in a folder others than root can write.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from cgpolicy.policy.loader import MAX_FILE_BYTES
from cgpolicy.policy.model import Policy
from cgpolicy.policy.validate import FileMemo, Problem, load_contents
from cgpolicy.reconciler.lastgood import LastGoodStore, StoreError, is_entry_name
from cgpolicy.reconciler.versions import (
    FileVersion,
    enforced_versions,
    folder_changed,
    judge,
    last_good_sources,
)

log = logging.getLogger("cgpolicy.reconcile")

STORE_RETRY_SECONDS = 30.0  # a store that failed is tried again after this, changes or not

# What identifies a file's content without reading it, as (the file a name leads to, the
# name itself): device, inode, mode, size, mtime, ctime of each, None where there is none.
# A ConfigMap's symlink swap changes the first; a symlink re-pointed, the second.
StatKey = tuple[int, int, int, int, int, int]
Signature = tuple[StatKey | None, StatKey | None]

_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def _key(info: os.stat_result) -> StatKey:
    return (
        info.st_dev,
        info.st_ino,
        info.st_mode,
        info.st_size,
        info.st_mtime_ns,
        info.st_ctime_ns,
    )


def _signature(path: str) -> Signature:
    keys: list[StatKey | None] = []
    for look in (os.stat, os.lstat):
        try:
            keys.append(_key(look(path)))
        except (OSError, ValueError):
            keys.append(None)
    return keys[0], keys[1]


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` (resolved) is in ``folder`` (resolved), at any depth."""
    return path != folder and os.path.commonpath([path, folder]) == folder


def _folder_owner_could_read(info: os.stat_result, folders: list[os.stat_result]) -> bool:
    """Whether those who can write the folders (the policy folder and the one the file is
    in) could read the file themselves. A folder that only root can write: anything in it
    is root's doing. Otherwise the file must be readable by others, or be owned by the
    folder's owner (not root): a hard link to a root-only file made by the folder's writer
    is not read for them."""
    for folder in folders:
        if folder.st_uid == 0 and not folder.st_mode & 0o022:
            continue
        if info.st_mode & stat.S_IROTH:
            continue
        if folder.st_uid != 0 and info.st_uid == folder.st_uid:
            continue
        return False
    return True


def read_policy_file(path: str, folder: str | None = None) -> bytes | str | None:
    """The bytes of a policy file; a sentence saying why it cannot be read; or None when
    the name is not in the folder at all (really gone).

    Symlinks are followed (a ConfigMap volume is made of them) only while they stay in the
    policy folder (``folder``, by default the one ``path`` is in): the name is resolved,
    the result must be in the folder, and it is opened with O_NOFOLLOW; what was opened is
    checked again (a regular file, still in the folder) before it is read. A file that
    those who can write the folder could not read themselves is not read either (see
    :func:`_folder_owner_could_read`). Whoever writes the folder must not be able to make
    the service read for them what they cannot."""
    folder = os.path.realpath(folder if folder is not None else os.path.dirname(path))
    try:
        real = os.path.realpath(path, strict=True)
        info = os.stat(real, follow_symlinks=False)
    except FileNotFoundError:
        if not os.path.lexists(path):
            return None
        try:
            target = os.readlink(path)
        except OSError:
            return "it is a symlink whose target does not exist"
        return f"it is a symlink to {target}, which does not exist"
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "it is a symlink loop (too many levels of symbolic links)"
        return f"cannot look at it: {error.strerror or error}"
    if not _inside(real, folder):
        return f"it is a symlink to {real}, which leaves the policy folder: not read"
    if not stat.S_ISREG(info.st_mode):
        kind = _KINDS.get(stat.S_IFMT(info.st_mode), "not a file")
        return f"it is {kind}, not a regular file"
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        return None if not os.path.lexists(path) else "it vanished while being read"
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "it changed into a symlink while being read"
        return f"cannot open it: {error.strerror or error}"
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):  # swapped since it was looked at
            kind = _KINDS.get(stat.S_IFMT(opened.st_mode), "not a file")
            return f"it is {kind}, not a regular file"
        try:  # a folder on the way swapped for a symlink since it was resolved
            where = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            where = real
        if not _inside(where, folder):
            return f"it led to {where} while being read, which leaves the policy folder: not read"
        try:
            folders = [os.stat(folder), os.stat(os.path.dirname(where))]
        except OSError as error:
            return f"cannot look at its folder: {error.strerror or error}"
        if not _folder_owner_could_read(opened, folders):
            return (
                f"it is owned by uid {opened.st_uid} with mode "
                f"{stat.S_IMODE(opened.st_mode):04o}, so those who can write the policy "
                "folder could not read it themselves (a hard link to another's file?): not read"
            )
        chunks = []
        size = 0
        while size <= MAX_FILE_BYTES:
            chunk = os.read(fd, min(1 << 20, MAX_FILE_BYTES + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)  # over the limit by a byte at most: the loader refuses it
    except OSError as error:
        return f"cannot read it: {error.strerror or error}"
    finally:
        os.close(fd)


def _digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


@dataclass
class FileState:
    signature: Signature  # of the content ``version`` was decided from
    version: FileVersion


@dataclass
class Snapshot:
    """One reading of the folder."""

    policies: list[Policy]  # everything to enforce
    invalid_files: dict[str, list[Problem]]  # file -> its current problems (invalid or unreadable)
    files: set[str]  # every policy file present now
    changed: bool  # anything differs from the previous reading
    signatures: dict[str, Signature] = field(default_factory=dict)
    # bad files whose last good version is not known (so nothing from them is enforced on
    # cgroups that appear later)
    without_last_good: set[str] = field(default_factory=set)
    store_error: str | None = None  # why the last-good store could not be used, if it could not


class PolicySource:
    def __init__(self, folder: Path, store: LastGoodStore | None = None) -> None:
        self.folder = folder
        self.store = store
        self._files: dict[str, FileState] = {}
        self._force = True
        self._memo = FileMemo()  # a reading checks only the files whose bytes changed
        # file name -> sha256 of its entry in the store; None until the store was read
        self._stored: dict[str, str] | None = None
        self.store_error: str | None = None
        self._store_retry_at = 0.0

    def reread(self) -> None:
        """Read every file (and the store) again at the next reading, as after a restart,
        but keep the last good versions known so far (SIGHUP)."""
        self._force = True
        self._memo = FileMemo()
        self._stored = None

    def _list(self) -> list[str]:
        """Every name in the folder that a policy file may have, whatever it is now. A
        folder that cannot be listed raises: it must not read as an empty one."""
        with os.scandir(self.folder) as entries:
            names = [e.name for e in entries if is_entry_name(e.name)]
        return [str(self.folder / name) for name in sorted(names)]

    def read(self) -> Snapshot:
        """Re-read the files that changed; keep each bad file's last good policies."""
        present = {file: _signature(file) for file in self._list()}
        if self.store_error is not None and time.monotonic() >= self._store_retry_at:
            self.reread()  # the whole reading again: what to save is what is read now
        known = {file: state.signature for file, state in self._files.items()}
        changed = self._force or folder_changed(known, present)
        if changed:
            self._force = False
            self._reload(present)
        versions = {file: state.version for file, state in self._files.items()}
        return Snapshot(
            [p for version in versions.values() for p in version.policies],
            {f: v.problems for f, v in versions.items() if v.problems},
            set(self._files),
            changed,
            {f: s.signature for f, s in self._files.items()},
            {f for f, v in versions.items() if v.problems and v.last_good is None},
            self.store_error,
        )

    def _reload(self, present: dict[str, Signature]) -> None:
        contents: dict[str, bytes] = {}
        unreadable: dict[str, str] = {}
        for file in present:
            got = read_policy_file(file, str(self.folder))
            if got is None:
                continue  # gone since it was listed
            if isinstance(got, str):
                unreadable[file] = got
            else:
                contents[file] = got

        # Every readable file is validated together, so that names must be unique across files.
        result = load_contents(sorted(contents.items()), self._memo)
        for skipped in result.skipped:  # `cgpolicy test` files beside the policies
            log.info("%s", skipped.format())
        good, problems = judge(result, contents, unreadable)
        remembered = {
            file: state.version.last_good
            for file, state in self._files.items()
            if state.version.last_good is not None
        }
        stored = self._read_store()
        last_good, from_store = last_good_sources(problems, remembered, stored)
        last_good.update(
            self._validate_stored([(file, stored[Path(file).name]) for file in from_store])
        )
        versions, conflicts = enforced_versions(good, problems, last_good)
        for conflict in conflicts:
            log.warning(
                "%s: the last good version of %s also defines it; %s's is enforced",
                conflict.name,
                conflict.file,
                conflict.enforced_from,
            )
        self._files = {
            file: FileState(present[file], version) for file, version in versions.items()
        }
        self._update_store({f: contents[f] for f in good}, {Path(f).name for f in versions})

    def _read_store(self) -> dict[str, bytes]:
        """The store's entries when it is first read (at start and after SIGHUP); later
        readings need only what this process already knows."""
        if self.store is None or self._stored is not None:
            return {}
        try:
            entries, refused = self.store.load()
        except StoreError as error:
            self._store_failed(str(error))
            return {}
        for line in refused:
            log.error("last good version refused: %s", line)
        self._stored = {name: _digest(content) for name, content in entries.items()}
        self.store_error = None
        return entries

    def _validate_stored(self, stored: list[tuple[str, bytes]]) -> dict[str, list[Policy]]:
        """Stored last good versions, validated again like any file (under the file's own
        name, together); one that fails is not used."""
        if not stored:
            return {}
        result = load_contents(stored)
        failed: dict[str, list[Problem]] = {}
        for problem in result.problems:
            failed.setdefault(problem.file, []).append(problem)
        kept: dict[str, list[Policy]] = {}
        for file, _ in stored:
            if file in failed:
                for problem in failed[file]:
                    log.error(
                        "the stored last good version of %s is not valid now, not used: %s",
                        file,
                        problem.format(),
                    )
                continue
            policies = [p for p in result.policies if p.source and p.source.file == file]
            kept[file] = policies
            names = ", ".join(p.name for p in policies)
            log.warning(
                "%s is invalid or unreadable; enforcing its last good version from %s (%s)",
                file,
                self.store.path if self.store else "the store",
                names,
            )
        return kept

    def _update_store(self, good: dict[str, bytes], names: set[str]) -> None:
        """Record each valid file's text; delete the entries of files that are gone."""
        if self.store is None or self._stored is None:
            return
        try:
            for file, content in sorted(good.items()):
                name, digest = Path(file).name, _digest(content)
                if self._stored.get(name) != digest:
                    self._stored.pop(name, None)  # save() deletes the old entry if it fails
                    self.store.save(name, content)
                    self._stored[name] = digest
            gone = set(self._stored) - names
            self.store.forget(gone)
            for name in gone:
                del self._stored[name]
        except StoreError as error:
            self._store_failed(str(error))
            self._stored = None  # read it again at the next change
            return
        self.store_error = None

    def _store_failed(self, error: str) -> None:
        self._store_retry_at = time.monotonic() + STORE_RETRY_SECONDS
        if error != self.store_error:
            log.error(
                "last-good store: %s; a file that turns invalid keeps its last good version "
                "only while this process runs",
                error,
            )
        self.store_error = error
