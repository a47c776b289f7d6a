"""cgroup v2 and bpffs on the running host: where they are, cgroup fds and ids.

Mount discovery itself lives in :mod:`cgpolicy.mounts` (a plain read of mountinfo that the
doctor and the CLI use too); this module adds what touches the filesystems: mounting bpffs,
opening a cgroup as an attach target, its id, and removing a subtree.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
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
