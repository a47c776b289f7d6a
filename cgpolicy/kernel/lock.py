"""One change at a time per pin folder: an exclusive ``flock`` on its ``_lock`` folder.

Whatever changes what is pinned under a pin folder (`apply`, `remove`, `run`, a reconcile
pass) holds this lock from observing the kernel to the last pin written, so that no change
is planned against a state another process is busy changing.

- **On bpffs** (which holds no regular files, hence a folder): every process that sees the
  same bpffs sees the same lock, whatever its mount namespace or ``/run`` (the service in a
  container and an operator's CLI on the host).
- **Only root can take it**: the lock is a folder ``_lock`` inside the pin folder (``_`` is
  never in a policy name), made mode 0700 and refused if it is anything else. A flock
  needs an open descriptor, and a folder that was never readable by others has never been
  opened by anyone but root: locking the pin folder itself would not do, since a user who
  opened it while it was still readable (an older cgpolicy made it 0755) keeps that
  descriptor after any chmod, and with it the power to hold the lock forever.
- **Bounded**: a waiter gives up after ``timeout`` seconds with a message naming the holder
  (its pid and command line, from ``/proc/locks``); the kernel releases the lock when its
  holder exits, however it exits, so a crashed holder never leaves it taken.
- **Reentrant within a process**, and never inherited: the descriptor is close-on-exec.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cgpolicy.kernel.cgroup import ensure_bpffs
from cgpolicy.kernel.trusted import open_trusted_dir
from cgpolicy.mounts import read_mounts

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
LOCK_FOLDER = "_lock"  # inside the pin folder; "_" is never in a policy name


class LockError(OSError):
    """The pin folder could not be locked (its message says why and what to do)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "pin folder lock failed"


@dataclass
class _Held:
    fd: int
    depth: int


_held: dict[str, _Held] = {}  # folder -> this process's hold on it


def _require_bpffs(folder: Path) -> None:
    ensure_bpffs(folder.parent)
    mounts = [m.mount_point for m in read_mounts() if m.fs_type == "bpf"]
    if not any(mount == folder or mount in folder.parents for mount in mounts):
        raise LockError(f"{folder} is not on a bpf filesystem; pins cannot live there")


def holders(fd: int) -> list[int]:
    """Pids of the processes holding a flock on the file behind ``fd`` (``/proc/locks``;
    pids outside this process's pid namespace are not listed)."""
    info = os.fstat(fd)
    wanted = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    found = []
    try:
        with open("/proc/locks") as locks:
            for line in locks:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 00:27:939880 0 EOF"; waiters have "->"
                if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":
                    continue
                if fields[5] == wanted and fields[4].isdigit() and int(fields[4]) > 0:
                    found.append(int(fields[4]))  # 0: a holder this namespace cannot see
    except OSError:
        return []
    return [pid for pid in found if pid != os.getpid()]


def describe_process(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            words = cmdline.read().rstrip(b"\0").split(b"\0")
    except OSError:
        return f"pid {pid}"
    command = " ".join(w.decode(errors="replace") for w in words if w)
    if len(command) > 160:
        command = command[:157] + "..."
    return f"pid {pid} ({command})" if command else f"pid {pid}"


def _describe_holders(fd: int) -> str:
    pids = holders(fd)
    if not pids:
        return "held by a process this pid namespace cannot see"
    return "held by " + ", ".join(describe_process(pid) for pid in pids)


class PinFolderLock:
    """``with PinFolderLock(bpf_dir, timeout):`` holds the exclusive lock on ``bpf_dir``
    (made, 0700, if missing); raises LockError after ``timeout`` seconds of waiting."""

    def __init__(self, folder: Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.folder = Path(os.path.abspath(folder))
        self.timeout = timeout

    def __enter__(self) -> PinFolderLock:
        key = str(self.folder)
        held = _held.get(key)
        if held is not None:
            held.depth += 1
            return self
        _require_bpffs(self.folder)
        os.close(open_trusted_dir(self.folder, create=True, mode=0o700))
        lock_folder = self.folder / LOCK_FOLDER
        fd = open_trusted_dir(lock_folder, create=True, mode=0o700)
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
            if mode & 0o077:
                raise LockError(
                    f"{lock_folder} is mode {mode:04o}: someone else may hold it open, and "
                    f"with it the lock; fix: rmdir {lock_folder} (cgpolicy makes it again)"
                )
            self._wait(fd)
        except BaseException:
            os.close(fd)
            raise
        _held[key] = _Held(fd, 1)
        return self

    def _wait(self, fd: int) -> None:
        deadline = time.monotonic() + self.timeout
        delay = 0.01
        said = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            if not said:
                log.info("waiting for the lock on %s, %s", self.folder, _describe_holders(fd))
                said = True
            if time.monotonic() >= deadline:
                raise LockError(
                    f"gave up after {self.timeout:g} s waiting for the lock on {self.folder}, "
                    f"{_describe_holders(fd)}; another change of these pins is in progress "
                    "(wait for it, or give --lock-timeout more seconds)"
                )
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.2)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        key = str(self.folder)
        held = _held[key]
        held.depth -= 1
        if held.depth == 0:
            del _held[key]
            os.close(held.fd)  # releases the flock
