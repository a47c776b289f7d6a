"""The last good text of each policy file, kept where only root can change it.

The kernel holds what is applied (programs, links and each policy's metadata under bpffs),
but not the policy text: a glob cannot be attached to a cgroup that appears later without
it, and device paths and interface names cannot be resolved again. So the reconcile service
keeps, for each file of its folder, the last version that passed validation, and a file
that turns invalid or unreadable keeps that version enforced across SIGHUP, restarts and
reboots.

    <state dir>/last-good/<first 16 hex of sha256(policy folder)>/<file name>

Each entry is the file's bytes exactly as they were read (``cat`` shows what is kept).
Whoever can write here decides what is enforced after a restart, so the folder is checked
at every use (root's, closed to others, no symlinks; see :mod:`cgpolicy.kernel.trusted`),
entries are read through its descriptor without following links and must be root's
regular files, and what is read back is validated again like any policy file before it is
used. Entries are written atomically (temporary file, fsync, rename); an entry whose file
is really gone from the folder is deleted.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cgpolicy.kernel.trusted import (
    UntrustedFolder,
    is_trusted_file,
    open_trusted_dir,
    write_atomically,
)
from cgpolicy.policy.loader import MAX_FILE_BYTES
from cgpolicy.policy.validate import POLICY_SUFFIXES

DEFAULT_STATE_DIR = Path("/var/lib/cgpolicy")


class StoreError(Exception):
    """The store cannot be used; the message says why and, where it can, how to fix it."""


def is_entry_name(name: str) -> bool:
    """A name the store keeps: a policy file's (``*.yaml``/``*.yml``, not hidden)."""
    return name.endswith(POLICY_SUFFIXES) and not name.startswith(".") and "/" not in name


class LastGoodStore:
    """The last good text of the files of one policy folder."""

    def __init__(self, state_dir: Path, policy_dir: Path) -> None:
        self.state_dir = Path(os.path.abspath(state_dir))
        key = hashlib.sha256(os.fsencode(os.path.abspath(policy_dir))).hexdigest()[:16]
        self.path = self.state_dir / "last-good" / key

    def _open(self) -> int:
        try:
            return open_trusted_dir(self.path, create=True, mode=0o700)
        except UntrustedFolder as error:
            raise StoreError(f"refusing {self.path}: {error}") from None
        except OSError as error:
            raise StoreError(f"cannot open {self.path}: {error.strerror or error}") from None

    def load(self) -> tuple[dict[str, bytes], list[str]]:
        """Every entry, by file name, and a line for each entry that was refused (not a
        root-only regular file, too large, unreadable). Raises StoreError when the folder
        itself cannot be trusted or opened."""
        folder = self._open()
        entries: dict[str, bytes] = {}
        refused: list[str] = []
        try:
            for name in sorted(os.listdir(folder)):
                if not is_entry_name(name):
                    continue
                try:
                    entries[name] = _read_entry(folder, name)
                except StoreError as error:
                    refused.append(f"{self.path / name}: {error}")
        except OSError as error:
            raise StoreError(f"cannot list {self.path}: {error.strerror or error}") from None
        finally:
            os.close(folder)
        return entries, refused

    def save(self, name: str, content: bytes) -> None:
        """Replace the entry of ``name`` atomically. On failure the old entry is deleted
        (if it can be), so that a version older than the last good one is never used."""
        if not is_entry_name(name):
            raise StoreError(f"{name!r} is not a policy file name")
        folder = self._open()
        try:
            try:
                write_atomically(folder, name, content)
            except OSError as error:
                _try_unlink(folder, name)  # never leave an older version behind
                raise StoreError(
                    f"cannot write {self.path / name}: {error.strerror or error}"
                ) from None
        finally:
            os.close(folder)

    def forget(self, names: set[str]) -> None:
        """Delete the entries of files that are gone from the policy folder."""
        if not names:
            return
        folder = self._open()
        try:
            for name in sorted(names):
                if is_entry_name(name):
                    try:
                        _unlink_quietly(folder, name)
                    except OSError as error:
                        raise StoreError(
                            f"cannot delete {self.path / name}: {error.strerror or error}"
                        ) from None
        finally:
            os.close(folder)


def _read_entry(folder: int, name: str) -> bytes:
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder
        )
    except OSError as error:
        raise StoreError(f"cannot open it: {error.strerror or error}") from None
    with os.fdopen(fd, "rb") as entry:
        info = os.fstat(entry.fileno())
        if not is_trusted_file(info):
            raise StoreError(
                "not a regular file that only root can have written; not used "
                "(fix: remove it; the service writes it again from a valid file)"
            )
        data = entry.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise StoreError(f"larger than {MAX_FILE_BYTES} bytes; not used")
    return data


def _unlink_quietly(folder: int, name: str) -> None:
    """Delete an entry; one that is already gone is fine, any other failure raises."""
    try:
        os.unlink(name, dir_fd=folder)
    except FileNotFoundError:
        pass


def _try_unlink(folder: int, name: str) -> None:
    """Delete what a failed write left, if the file system lets us; the caller reports."""
    try:
        os.unlink(name, dir_fd=folder)
    except OSError:
        pass
