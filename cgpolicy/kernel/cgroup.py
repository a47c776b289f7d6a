"""cgroup v2 and bpffs on the running host: where they are, cgroup fds and ids, walks.

Mount discovery itself lives in :mod:`cgpolicy.mounts` (a plain read of mountinfo that the
doctor and the CLI use too); this module is every other touch of cgroupfs: mounting bpffs,
opening a cgroup as an attach target, its id, finding, making and removing cgroups, and
walking a subtree while containers come and go.
"""

from __future__ import annotations

import ctypes
import fnmatch
import logging
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from cgpolicy.mounts import DEFAULT_BPFFS, find_bpffs, find_cgroup2_root

_libc = ctypes.CDLL(None, use_errno=True)


class CgroupError(OSError):
    """A cgroup or bpffs operation failed; the message says which path and why."""


def cgroup2_root() -> Path:
    """The cgroup2 mount point, or CgroupError saying there is none."""
    root = find_cgroup2_root()
    if root is None:
        raise CgroupError("no cgroup2 filesystem is mounted (see /proc/self/mountinfo)")
    return root


def ensure_bpffs(path: Path = DEFAULT_BPFFS) -> Path:
    """The bpffs mount point, mounting bpffs at ``path`` first if none is mounted.

    Pins need bpffs; on hosts without systemd nobody else mounts it.
    """
    mounted = find_bpffs()
    if mounted is not None:
        return mounted
    path.mkdir(parents=True, exist_ok=True)
    if _libc.mount(b"bpf", os.fsencode(path), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise CgroupError(err, f"mount -t bpf bpf {path}: {os.strerror(err)}")
    logging.getLogger(__name__).warning("bpffs was not mounted: mounted it at %s", path)
    return path


def resolve(relative: str | os.PathLike[str], root: Path | None = None) -> Path:
    """An absolute cgroup path for one given relative to the cgroup2 mount, as policies
    write them; refuses paths that leave the hierarchy (``..``, absolute elsewhere)."""
    base = root or cgroup2_root()
    path = Path(os.path.normpath(base / Path(relative)))
    if path != base and base not in path.parents:
        raise CgroupError(f"cgroup path {relative!s} is outside the cgroup2 mount {base}")
    return path


def open_cgroup(path: str | os.PathLike[str]) -> int:
    """An O_RDONLY directory fd for a cgroup: the target of attach, link and query calls.

    The caller closes it; links and legacy attachments do not need it kept open.
    """
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise CgroupError(error.errno, f"cannot open cgroup {path}: {error.strerror}") from None


def cgroup_id(path: str | os.PathLike[str] | int) -> int:
    """The kernel's id for a cgroup (what link info and bpf_get_current_cgroup_id() report).

    On cgroup2 that id is the kernfs node id, which is the cgroup directory's inode number on
    64-bit hosts; stat() gives it without name_to_handle_at(). Takes a path or an open fd.
    """
    return os.stat(path).st_ino


def walk_cgroups_with_ids(top: str | os.PathLike[str]) -> Iterator[tuple[Path, int]]:
    """(path, id) of ``top`` and every cgroup below it, parents before children; the ids
    come from the directory listing (no stat per cgroup).

    cgroups vanish at any moment (a container exits): a directory that is gone (or cannot
    be read) by the time it is read is skipped, not an error. Symlinks are not followed
    (cgroupfs has none).
    """
    try:
        stack = [(Path(top), os.stat(top).st_ino)]
    except OSError:
        return
    while stack:
        current, current_id = stack.pop()
        try:
            with os.scandir(current) as entries:
                children = [
                    (Path(e.path), e.inode()) for e in entries if e.is_dir(follow_symlinks=False)
                ]
        except OSError:
            continue
        yield current, current_id
        stack.extend(sorted(children, reverse=True))


def walk_cgroups(top: str | os.PathLike[str]) -> Iterator[Path]:
    """``top`` and every cgroup below it, parents before children (as above, without ids)."""
    return (path for path, _ in walk_cgroups_with_ids(top))


def cgroup_names(root: Path) -> dict[int, str]:
    """cgroup id -> path relative to ``root`` ("." for root itself), for every cgroup in
    the tree now."""
    return {cid: os.path.relpath(path, root) for path, cid in walk_cgroups_with_ids(root)}


class NotACgroup(Exception):
    """A path under the cgroup2 mount exists but is a file (``cgroup.procs``, say) or a
    symlink, not a cgroup."""


def cgroup_at(path: Path) -> int | None:
    """The id of the cgroup at ``path``, not following a symlink; None when nothing is
    there (it may vanish at any moment); NotACgroup when something else is."""
    try:
        info = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISDIR(info.st_mode):
        raise NotACgroup(str(path))
    return info.st_ino


def is_cgroup(path: Path) -> bool:
    return path.is_dir()


def matching_children(folder: Path, pattern: str) -> list[Path]:
    """The cgroups directly in ``folder`` whose names match the shell pattern ``pattern``
    (one path component: '*' never crosses a '/'); none when ``folder`` is gone. Any other
    failure to list it raises: matching nothing would detach what a glob target covers."""
    return [folder / name for name, _ in matching_child_ids(folder, pattern)]


def matching_child_ids(folder: Path, pattern: str) -> list[tuple[str, int]]:
    """The same cgroups as (name, cgroup id), the id read from the listing itself (a
    glob over 10,000 cgroups costs no lstat of each)."""
    try:
        with os.scandir(folder) as entries:
            return [
                (e.name, e.inode())
                for e in entries
                if e.is_dir(follow_symlinks=False) and fnmatch.fnmatchcase(e.name, pattern)
            ]
    except (FileNotFoundError, NotADirectoryError):
        return []


class CgroupExists(CgroupError):
    """A cgroup that was to be made exists already."""


def make_cgroup(path: Path, attempts: int = 10) -> None:
    """Make the cgroup ``path`` and its parent if missing (another process may remove an
    empty parent meanwhile: retried). CgroupExists when ``path`` exists already."""
    for _ in range(attempts):
        path.parent.mkdir(exist_ok=True)
        try:
            path.mkdir()
            return
        except FileExistsError:
            raise CgroupExists(f"cgroup {path} exists already") from None
        except FileNotFoundError:
            continue  # the parent was removed between the two mkdirs
    path.mkdir()


def join_cgroup(path: Path) -> None:
    """Move the calling process into the cgroup ``path`` (a child's ``preexec_fn``)."""
    (path / "cgroup.procs").write_text("0")


def remove_if_empty(path: Path) -> None:
    """Remove the cgroup ``path`` if nothing is in it (no child, no process); else leave it."""
    try:
        path.rmdir()
    except OSError:
        pass


class LeavesHierarchy(CgroupError):
    """A path given as a cgroup leaves the cgroup2 hierarchy (``..``)."""


def cgroup_and_ancestors(root: Path, given: str) -> tuple[Path, list[Path]]:
    """A cgroup given as an absolute path under ``root``, relative to it, or as
    /proc/PID/cgroup writes it (0::/a/b): its path relative to ``root``, and its full path
    followed by every ancestor's up to ``root`` (which need not exist: see is_cgroup).
    LeavesHierarchy for ``..`` out of it; CgroupError when the path cannot be resolved,
    with the reason only (the caller shows ``given`` safely)."""
    path = Path(given)
    try:
        resolved_root = root.resolve()
        resolved = path.resolve() if path.is_absolute() else None
    except (OSError, ValueError, RuntimeError) as error:  # a NUL; RuntimeError: a link loop
        raise CgroupError(str(error)) from None
    if resolved is not None and resolved.is_relative_to(resolved_root):
        relative = resolved.relative_to(resolved_root)
    else:
        relative = Path(os.path.normpath(given.lstrip("/") or "."))
        if relative.parts[:1] == ("..",):
            raise LeavesHierarchy("it leaves the cgroup2 hierarchy")
    return relative, [root / relative, *[root / p for p in relative.parents]]


def remove_cgroup_tree(path: Path, timeout: float = 5.0) -> None:
    """Kill every process in the cgroup ``path`` and its descendants (cgroup.kill), then
    remove them bottom-up. A cgroup that is already gone is fine; one still busy after
    ``timeout`` raises the OSError of the last rmdir."""
    if not path.is_dir():
        return
    for child in [p for p in path.iterdir() if p.is_dir()]:
        remove_cgroup_tree(child, timeout)
    kill = path / "cgroup.kill"
    if kill.exists():
        kill.write_text("1")
    deadline = time.monotonic() + timeout
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:  # EBUSY until the killed processes are reaped
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
