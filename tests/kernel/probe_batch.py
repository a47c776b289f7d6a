"""Many probe actions in one process: a JSON list of argument lists on stdin (each as
probe.py takes them, plus `mknod PATH char|block MAJOR MINOR`), a JSON list of outcomes
({"ok": bool, "errno": int}) on stdout. Standard library only; used by test_differential.py
to run a batch of real actions inside a scratch cgroup without one interpreter per action.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys

from probe import ACTIONS


def do_mknod(path: str, kind: str, major: str, minor: str) -> None:
    mode = (stat.S_IFCHR if kind == "char" else stat.S_IFBLK) | 0o600
    os.mknod(path, mode, os.makedev(int(major), int(minor)))
    os.unlink(path)


def main() -> int:
    actions = {**ACTIONS, "mknod": do_mknod}
    results = []
    for args in json.load(sys.stdin):
        try:
            actions[args[0]](*map(str, args[1:]))
        except TimeoutError:
            results.append({"ok": False, "errno": errno.ETIMEDOUT})
        except OSError as error:
            results.append({"ok": False, "errno": error.errno or 0})
        else:
            results.append({"ok": True, "errno": 0})
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
