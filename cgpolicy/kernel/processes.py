"""Processes as the lockout guard and the rollback process need them: which processes a
policy must not cut off (and the cgroup each is in), and starting a process that outlives
the terminal, its session and the login that started it.

What is read here comes from ``/proc``, as root sees it. A local user can make a process
*look* like an sshd or a reconcile service (its name and command line are its own), which
only makes the guard refuse more; a user cannot hide root's processes nor change their
cgroup, so the guard cannot be talked out of a refusal.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cgpolicy.kernel.cgroup import join_cgroup, make_cgroup, remove_if_empty


@dataclass(frozen=True)
class Protected:
    """A process a policy must not cut off, and why."""

    pid: int
    command: str
    why: str  # "this cgpolicy", "its parent", "the session leader", "an sshd", ...
    cgroup: str  # its cgroup v2 path relative to the hierarchy's root ("" for the root)


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as opened:
            return opened.read()
    except OSError:
        return None


def argv(pid: int) -> list[str]:
    raw = _read(f"/proc/{pid}/cmdline") or b""
    return [word.decode(errors="replace") for word in raw.rstrip(b"\0").split(b"\0") if word]


def command(pid: int) -> str:
    """The command line to show a person: its owner chose it, so characters that are not
    printable (line breaks, escape sequences) are shown escaped, never printed as such."""
    words = argv(pid)
    text = " ".join(words) if words else (comm(pid) or "?")
    text = "".join(
        char
        if char.isprintable()
        else repr(char)[1:-1]
        if ord(char) > 0xFF
        else f"\\x{ord(char):02x}"
        for char in text
    )
    return text if len(text) <= 120 else text[:117] + "..."


def comm(pid: int) -> str:
    return (_read(f"/proc/{pid}/comm") or b"").decode(errors="replace").strip()


def exe_name(pid: int) -> str:
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe")).removesuffix(" (deleted)")
    except OSError:
        return ""


def cgroup_of(pid: int) -> str | None:
    """The process's cgroup v2 path relative to the hierarchy's root ("" for the root), as
    this process's cgroup namespace names it; None when it is gone or outside the
    namespace (a path that climbs with ``..``)."""
    raw = _read(f"/proc/{pid}/cgroup")
    if raw is None:
        return None
    # only '\n' ends a line (the kernel refuses it in cgroup names); a name may hold any
    # other character, spaces at its ends and what str.splitlines() would split at
    for line in raw.decode(errors="surrogateescape").split("\n"):
        if line.startswith("0::"):
            path = line[3:]
            # ".." as a component: outside this cgroup namespace. A cgroup may well be
            # named "..x" (a user can make one in a subtree delegated to them), which
            # must not take its processes out of the guard's sight.
            if not path.startswith("/") or ".." in path.split("/"):
                return None
            return path.strip("/")
    return None


def parent_of(pid: int) -> int | None:
    raw = _read(f"/proc/{pid}/stat")
    if raw is None:
        return None
    try:
        return int(raw.rsplit(b")", 1)[1].split()[1])
    except (IndexError, ValueError):
        return None


def _pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def is_sshd(pid: int) -> bool:
    """sshd and its per-connection processes (``sshd: user [priv]``, ``sshd-session``)."""
    words = argv(pid)
    names = [comm(pid), exe_name(pid), os.path.basename(words[0]) if words else ""]
    return any(name.startswith("sshd") for name in names)


def is_reconcile_service(pid: int) -> bool:
    """A `cgpolicy reconcile` process, however it was started (the script, python -m)."""
    words = argv(pid)
    return "reconcile" in words[1:] and (
        comm(pid) == "cgpolicy" or any("cgpolicy" in word for word in words)
    )


def protected_processes() -> list[Protected]:
    """This process, its ancestors up to (not including) pid 1, the leader of its session,
    every `cgpolicy reconcile` and every sshd, each with its cgroup."""
    found: dict[int, Protected] = {}

    def add(pid: int, why: str) -> None:
        if pid in found or pid <= 1:
            return
        cgroup = cgroup_of(pid)
        if cgroup is not None:
            found[pid] = Protected(pid, command(pid), why, cgroup)

    me = os.getpid()
    add(me, "this cgpolicy")
    parent = parent_of(me)
    seen = {me}
    while parent is not None and parent > 1 and parent not in seen:
        seen.add(parent)
        add(parent, "the process that started cgpolicy" if len(seen) == 2 else "an ancestor")
        parent = parent_of(parent)
    try:
        add(os.getsid(0), "the leader of this terminal session")
    except OSError:
        pass
    for pid in _pids():
        if is_reconcile_service(pid):
            add(pid, "the reconcile service")
        elif is_sshd(pid):
            add(pid, "an sshd")
    return list(found.values())


class CommandNotRun(Exception):
    """The command could not be started; ``status`` is what a shell would exit with (127
    not found, 126 not runnable)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGHUP}


def popen_in_cgroup(command: list[str], cgroup: Path, **options: Any) -> subprocess.Popen[Any]:
    """subprocess.Popen of ``command`` in ``cgroup``. SIGTERM and SIGHUP are held while
    the child is forked: Python runs a handler whose signal arrives then inside the fork's
    after-fork callbacks, where the KeyboardInterrupt of :func:`sigterm_as_interrupt` is
    printed and dropped, and the command went on as if never stopped. Held, the signal is
    handled once Popen returns; the child releases it before it joins the cgroup."""

    def in_child() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        join_cgroup(cgroup)

    held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        return subprocess.Popen(command, preexec_fn=in_child, **options)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def run_in_cgroup(command: list[str], cgroup: Path) -> int:
    """Run ``command`` in ``cgroup`` until it exits (`run`, `learn -- CMD`): Ctrl-C is
    passed on to it as SIGINT, and it decides whether to end. Its exit status as Popen
    gives it (negative for a signal); CommandNotRun when it cannot be started."""
    try:
        child = popen_in_cgroup(command, cgroup)
    except OSError as error:
        status = 127 if isinstance(error, FileNotFoundError) else 126
        raise CommandNotRun(f"cannot run {command[0]}: {error.strerror}", status) from None
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:
            child.send_signal(signal.SIGINT)


def spawn_detached(command_line: list[str], cgroup: Path) -> int:
    """Start ``command_line`` as a process of its own that survives whatever ends this
    one: a new session without a terminal (setsid; stdin/out/err on /dev/null), SIGHUP
    ignored, in the cgroup ``cgroup`` (made here) so that whatever stops or kills the
    cgroup of this login (logind at logout, a scope stop) does not reach it. Its pid;
    OSError when it cannot be started (nothing is left behind then)."""
    make_cgroup(cgroup)

    def in_child() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        join_cgroup(cgroup)

    try:
        process = subprocess.Popen(
            command_line,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
            cwd="/",
            preexec_fn=in_child,
        )
    except subprocess.SubprocessError as error:  # joining the cgroup failed in the child
        remove_if_empty(cgroup)
        raise OSError(f"cannot start {command_line[0]} in {cgroup}: {error}") from error
    except OSError:
        remove_if_empty(cgroup)
        raise
    return process.pid


def leave_cgroup(root: Path, own: Path) -> None:
    """Move this process to the hierarchy's root cgroup, then remove ``own`` and its
    parent when they are empty (the last thing a detached process does)."""
    try:
        join_cgroup(root)
    except OSError:
        return
    for folder in (own, own.parent):
        try:
            folder.rmdir()
        except OSError:
            return


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt meanwhile, so that a command stopped by
    a service manager or a closed terminal ends as after Ctrl-C: `learn` still writes
    its policy, `test --kernel` removes what it made."""

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
