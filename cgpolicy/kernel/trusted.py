"""Folders cgpolicy trusts: made by root, closed to everyone else, reached without symlinks.

Whoever can write a folder cgpolicy reads from decides what the kernel enforces, so every
such folder is checked at every use, not only when it is created:

- the folder itself is a real directory (not a symlink), owned by root, and neither group
  nor others may write it;
- every folder above it is owned by root and not writable by group or others, unless it
  is sticky (``/tmp``, bpffs mounted 1777): in a sticky folder nobody else can rename or
  delete what root made there, and a name someone else made first fails the owner check;
- every symlink on the way there, those inside a link's target included, is root's.

Files inside are opened relative to the checked folder's descriptor with ``O_NOFOLLOW``,
so a path swapped after the check cannot redirect a read or a write.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path


class UntrustedFolder(PermissionError):
    """A folder cgpolicy would read from or write to could be changed by someone other
    than root. The message says what is wrong and how to fix it."""


def _fix(path: Path) -> str:
    return (
        f"fix: remove it and let cgpolicy make it again, or, if root made it and what is "
        f"inside can be trusted, chown root:root {path} && chmod go-w {path}"
    )


def _check_mode(path: Path, info: os.stat_result, *, is_leaf: bool) -> None:
    if info.st_uid != 0:
        raise UntrustedFolder(f"{path} is owned by uid {info.st_uid}, not root; {_fix(path)}")
    writable_by_others = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable_by_others and (is_leaf or not info.st_mode & stat.S_ISVTX):
        mode = stat.S_IMODE(info.st_mode)
        raise UntrustedFolder(
            f"{path} is writable by group or others (mode {mode:04o}); {_fix(path)}"
        )


_MAX_SYMLINKS = 40  # as the kernel's own limit on a path lookup


def _check_ancestors(path: Path) -> None:
    """Every folder above ``path`` is root's, and so is every symlink the way there
    passes through, those inside a link's target included: the path is walked one
    component at a time, as the kernel would resolve it."""
    pending = list(Path(os.path.abspath(path.parent)).parts[1:])
    current = Path("/")
    _check_mode(current, os.lstat(current), is_leaf=False)
    hops = 0
    while pending:
        name = pending.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            current = current.parent
            continue
        candidate = current / name
        try:
            info = os.lstat(candidate)
        except OSError as error:
            raise UntrustedFolder(f"cannot inspect {candidate}: {error.strerror}") from None
        if stat.S_ISLNK(info.st_mode):
            # A link must be root's, in a folder only root controls (``current``, checked):
            # in a sticky folder anyone may make a link, and repoint it later.
            if info.st_uid != 0:
                raise UntrustedFolder(
                    f"{candidate} is a symlink owned by uid {info.st_uid}, not root; "
                    f"fix: remove it, or give cgpolicy a path without it"
                )
            hops += 1
            if hops > _MAX_SYMLINKS:
                raise UntrustedFolder(f"too many symlinks on the way to {path}")
            target = Path(os.readlink(candidate))
            if target.is_absolute():
                current = Path("/")
            pending[:0] = [part for part in target.parts if part != "/"]
            continue
        _check_mode(candidate, info, is_leaf=False)
        current = candidate


def open_trusted_dir(path: Path, *, create: bool = True, mode: int = 0o700) -> int:
    """A descriptor of ``path`` after checking that only root can change it; missing
    folders are made (``mode`` for the last, 0755 above it) when ``create`` is set.

    Raises UntrustedFolder naming the problem and its fix, FileNotFoundError when the
    folder is missing and ``create`` is not set."""
    path = Path(os.path.abspath(path))
    missing: list[Path] = []
    probe = path
    while not os.path.lexists(probe):
        missing.append(probe)
        probe = probe.parent
    if missing and not create:
        _check_ancestors(missing[-1])  # an untrusted way there says so, not just "missing"
        raise FileNotFoundError(f"{path} does not exist")
    for folder in reversed(missing):
        _check_ancestors(folder)
        try:
            os.mkdir(folder, mode if folder == path else 0o755)
        except FileExistsError:
            pass  # made by someone meanwhile: the checks below judge it
        except OSError as error:  # not a trust problem: a read-only or odd file system
            raise OSError(error.errno, f"cannot create {folder}: {error.strerror}") from None
    _check_ancestors(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        if os.path.islink(path):
            raise UntrustedFolder(
                f"{path} is a symlink; cgpolicy does not follow links to the folders it "
                f"trusts; fix: remove it and let cgpolicy recreate it"
            ) from None
        raise OSError(error.errno, f"cannot open {path}: {error.strerror}") from None
    try:
        _check_mode(path, os.fstat(fd), is_leaf=True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_real_folder(path: Path) -> None:
    """``path`` is a real folder (not a symlink), owned by root and closed to others; its
    parent was checked by whoever listed it."""
    try:
        info = os.lstat(path)
    except OSError as error:
        raise UntrustedFolder(f"cannot inspect {path}: {error.strerror}") from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UntrustedFolder(f"{path} is not a folder (a symlink or file); {_fix(path)}")
    _check_mode(path, info, is_leaf=True)


def is_trusted_file(info: os.stat_result) -> bool:
    """A regular file that only root can have written."""
    return (
        stat.S_ISREG(info.st_mode)
        and info.st_uid == 0
        and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


def write_atomically(folder: int, name: str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``name`` in the folder behind ``folder`` (a descriptor, from
    :func:`open_trusted_dir` for what cgpolicy trusts) with ``data``: a new temp file
    (``.tmp-…``, ``O_EXCL | O_NOFOLLOW``, root-only unless ``mode`` says otherwise), fsync,
    rename over ``name``, fsync of the folder. A reader sees the old content or the new,
    never a part; a failure leaves no temp file; a link planted under ``name`` is
    replaced, never written through."""
    temp = f".tmp-{os.getpid()}-{secrets.token_hex(4)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temp, flags, mode, dir_fd=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.rename(temp, name, src_dir_fd=folder, dst_dir_fd=folder)
        os.fsync(folder)
    except BaseException:
        try:
            os.unlink(temp, dir_fd=folder)
        except OSError:
            pass
        raise
