"""The probe process of `cgpolicy test --kernel`: run as a script (standard library only)
inside a test cgroup, it performs one action per line of JSON on stdin and answers one line
of JSON per action on stdout: ``{"ok": bool, "errno": int, "stage": "socket"|"action"}``.

Every connect is non-blocking and the socket is closed at once: it never waits for, or
sends, anything after the SYN (and the runner only lets it connect for real to loopback).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import sys
from typing import Any


class _SocketFailed(Exception):
    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def _socket(family: int, kind: int, protocol: int = 0) -> socket.socket:
    try:
        return socket.socket(family, kind | socket.SOCK_NONBLOCK, protocol)
    except OSError as error:
        raise _SocketFailed(error) from None


def _address(request: dict[str, Any]) -> tuple[Any, ...]:
    return (request["address"], request["port"])


def _connect(request: dict[str, Any]) -> None:
    with _socket(request["family"], request["type"]) as sock:
        try:
            sock.connect(_address(request))
        except BlockingIOError:  # EINPROGRESS: the hook allowed it; the SYN is on its way
            pass


def _sendto(request: dict[str, Any]) -> None:
    with _socket(request["family"], socket.SOCK_DGRAM) as sock:
        sock.sendto(b"", _address(request))


def _bind(request: dict[str, Any]) -> None:
    with _socket(request["family"], request["type"]) as sock:
        sock.bind(_address(request))


def _create(request: dict[str, Any]) -> None:
    socket.socket(request["family"], request["type"], request["protocol"]).close()


def _open(request: dict[str, Any]) -> None:
    os.close(os.open(request["path"], request["flags"] | os.O_NONBLOCK | os.O_NOCTTY))


def _mknod(request: dict[str, Any]) -> None:
    kind = stat.S_IFCHR if request["kind"] == "char" else stat.S_IFBLK
    os.mknod(request["path"], kind | 0o600, os.makedev(request["major"], request["minor"]))
    os.unlink(request["path"])


def _sysctl_read(request: dict[str, Any]) -> None:
    fd = os.open(f"/proc/sys/{request['name']}", os.O_RDONLY)
    try:
        os.read(fd, 65536)
    finally:
        os.close(fd)


def _sysctl_write(request: dict[str, Any]) -> None:
    fd = os.open(f"/proc/sys/{request['name']}", os.O_WRONLY)
    try:
        os.write(fd, request["value"].encode())
    finally:
        os.close(fd)


ACTIONS = {
    "connect": _connect,
    "sendto": _sendto,
    "bind": _bind,
    "socket": _create,
    "open": _open,
    "mknod": _mknod,
    "sysctl-read": _sysctl_read,
    "sysctl-write": _sysctl_write,
}


def perform(request: dict[str, Any]) -> dict[str, Any]:
    try:
        ACTIONS[request["op"]](request)
    except _SocketFailed as failed:
        return {"ok": False, "errno": failed.error.errno or 0, "stage": "socket"}
    except OSError as error:
        return {"ok": False, "errno": error.errno or errno.EIO, "stage": "action"}
    return {"ok": True, "errno": 0, "stage": "action"}


def main() -> int:
    for line in sys.stdin:
        print(json.dumps(perform(json.loads(line))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
