"""Many probe actions in one process: a JSON list of argument lists on stdin (each as
probe.py takes them, plus `mknod PATH char|block MAJOR MINOR`), a JSON list of outcomes
({"ok": bool, "errno": int}) on stdout. Standard library only; used by test_differential.py
to run a batch of real actions inside a scratch cgroup without one interpreter per action.

With ``--serve`` it answers batches until stdin ends: one JSON list per line in, one per
line out, so that one interpreter serves every batch of a test (a hook decides by the
cgroup the calling process is in when it calls, whenever that process started).
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


def run(batch: list[list[object]]) -> list[dict[str, object]]:
    actions = {**ACTIONS, "mknod": do_mknod}
    results: list[dict[str, object]] = []
    for args in batch:
        try:
            actions[str(args[0])](*map(str, args[1:]))
        except TimeoutError:
            results.append({"ok": False, "errno": errno.ETIMEDOUT})
        except OSError as error:
            results.append({"ok": False, "errno": error.errno or 0})
        else:
            results.append({"ok": True, "errno": 0})
    return results


def main(argv: list[str]) -> int:
    if argv == ["--serve"]:
        for line in sys.stdin:
            print(json.dumps(run(json.loads(line))), flush=True)
        return 0
    print(json.dumps(run(json.load(sys.stdin))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
